"""Background checkpoint uploads (train/checkpoint.py `Uploader`): training goes on while a checkpoint
uploads to a real S3 server, the result is the same as with blocking uploads, an outage mid-upload is
retried through, and an upload that cannot succeed stops training with the store's error. And the
checkpoint interval derived from the measured cost (`auto_interval`)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from faults import FlakyProxy
from test_throughput import _adapter, samples, small_gpt2

from train import checkpoint
from train.lora import LoraParams, attach_lora, auto_interval, train
from train.store import StoreError, open_store

PARAMS = LoraParams(batch_size=4, epochs=2, checkpoint_every=3, pack=False, torch_compile=False)
DATA = samples(40, seed=11)


def _train(store, params: LoraParams, on_step=None):
    model = attach_lora(small_gpt2(dropout=0.1), params)
    result = train(model, DATA, params, pad_id=0, store=store, prefix="c", on_step=on_step)
    return model, result


@pytest.fixture
def reference(tmp_path):
    """The same training with blocking uploads to a file store."""
    store = open_store(f"file://{tmp_path}/ref")
    model, result = _train(store, PARAMS.model_copy(update={"background_upload": False}))
    assert result.upload_seconds == [] and len(result.checkpoint_seconds) == len(range(3, result.steps, 3))
    return _adapter(model), store


class HeldStore:
    """A real store whose uploads wait at a gate until the test opens it (nothing else changes)."""

    def __init__(self, store) -> None:
        self.store, self.url = store, store.url
        self.gate = threading.Event()

    def put(self, key: str, data: bytes) -> None:
        self.gate.wait(timeout=120)
        self.store.put(key, data)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_training_runs_ahead_of_a_slow_upload_and_ends_the_same(bucket, s3_server, reference):
    s3 = open_store(f"s3://{bucket}/held", endpoint_url=s3_server)
    held = HeldStore(s3)
    seen = []

    def on_step(done, total, loss):
        if done == 5:  # two steps past the checkpoint at step 3, whose upload is still held
            seen.append(checkpoint.latest(s3, "c"))
            held.gate.set()

    model, result = _train(held, PARAMS, on_step)  # s3://: uploads go to the background by default
    assert seen == [None]  # step 3's checkpoint was not committed while steps 4 and 5 trained
    assert len(result.upload_seconds) == len(result.checkpoint_seconds) > 1
    want, ref_store = reference
    got = _adapter(model)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the checkpoints committed in the background hold exactly what blocking uploads wrote
    ours, theirs = checkpoint.latest(s3, "c"), checkpoint.latest(ref_store, "c")
    assert ours.step == theirs.step and ours.parts == theirs.parts
    assert checkpoint.steps(s3, "c") == checkpoint.steps(ref_store, "c")  # pruned alike


def test_an_outage_during_a_background_upload_is_retried_through(bucket, s3_server, reference, monkeypatch):
    # the request cut by the outage and two refused connections fail: the fourth attempt goes through
    monkeypatch.setenv("MEETARA_STORE_RETRIES", "4")
    host, port = s3_server.removeprefix("http://").split(":")
    proxy = FlakyProxy(host, int(port))
    try:
        store = open_store(f"s3://{bucket}/flaky", endpoint_url=proxy.url)

        def on_step(done, total, loss):
            if done == 2:  # the server goes away one request into step 3's upload, then comes back
                proxy.outage(after_requests=1, refuse=2)

        model, result = _train(store, PARAMS, on_step)
        assert proxy.dropped == 2
        want, _ = reference
        got = _adapter(model)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert checkpoint.latest(store, "c").step == max(checkpoint.steps(store, "c"))
    finally:
        proxy.close()


class OutageAt(HeldStore):
    """A real store behind a proxy whose server goes away for good at the first upload of `key`."""

    def __init__(self, store, proxy: FlakyProxy, key: str) -> None:
        super().__init__(store)
        self.proxy, self.key = proxy, key
        self.gate.set()

    def put(self, key: str, data: bytes) -> None:
        if self.key in key:
            self.proxy.outage(after_requests=0)  # this request is the first one refused
        super().put(key, data)


def test_an_upload_that_cannot_succeed_stops_training_with_the_store_error(bucket, s3_server, monkeypatch):
    monkeypatch.setenv("MEETARA_STORE_RETRIES", "2")
    monkeypatch.setenv("MEETARA_STORE_TIMEOUT", "1")
    host, port = s3_server.removeprefix("http://").split(":")
    proxy = FlakyProxy(host, int(port))
    steps = []
    try:
        s3 = open_store(f"s3://{bucket}/down", endpoint_url=proxy.url)
        store = OutageAt(s3, proxy, "step-00000006/")
        with pytest.raises(StoreError, match="failed"):
            _train(store, PARAMS, lambda done, total, loss: steps.append(done))
        # training went on while step 6 uploaded and stopped at the next checkpoint, which has to
        # wait for it: the failure is raised, not lost
        assert steps[-1] == 9 and max(steps) < PARAMS.epochs * 10
        proxy.heal()
        assert checkpoint.latest(s3, "c").step == 3  # the cut-off checkpoint is never resumed from
    finally:
        proxy.close()


@pytest.mark.parametrize(
    "step_s, blocking_s, upload_s, want",
    [
        (0.2, 0.02, None, 5),  # 20 ms per checkpoint may block 2 % of 1 s of training: 5 steps
        (0.2, 0.02, 3.0, 15),  # a 3 s upload must be done before the next checkpoint: 15 steps
        (7.0, 0.03, 0.2, 1),  # slow steps: every step
        (0.002, 0.02, 0.5, 500),  # fast GPU steps
        (0.2, 0.0, None, 1),
        (0.5, 30.0, None, 600),  # a 30 s checkpoint would want 1,500 s between: capped at 300 s
        (0.0, 0.02, None, 1),
    ],
)
def test_auto_interval_follows_the_cost(step_s, blocking_s, upload_s, want):
    assert auto_interval(step_s, blocking_s, upload_s, 0.02, 300) == want


class SlowDisk(HeldStore):
    """A real file store whose writes take `delay` seconds each (a slow disk)."""

    def __init__(self, store, delay: float) -> None:
        super().__init__(store)
        self.delay = delay
        self.gate.set()

    def put(self, key: str, data: bytes) -> None:
        time.sleep(self.delay)
        super().put(key, data)


def test_the_default_interval_is_measured_and_resumes_exactly(tmp_path, reference):
    from train.lora import Interrupted, StopFlag

    auto = PARAMS.model_copy(update={"checkpoint_every": None, "background_upload": False})
    store = open_store(f"file://{tmp_path}/auto")
    model = attach_lora(small_gpt2(dropout=0.1), auto)
    stop = StopFlag()

    def on_step(done, total, loss):
        if done == 7:
            stop.signum = 15  # SIGTERM: a checkpoint at 7, whatever the interval, then stop

    with pytest.raises(Interrupted):
        train(model, DATA, auto, pad_id=0, store=store, prefix="c", stop=stop, on_step=on_step)
    assert checkpoint.latest(store, "c").step == 7
    model, r = _train(store, auto)  # resumes at 7 with the auto interval, measured afresh
    assert r.resumed_from == 7 and r.checkpoint_steps[0] == 8  # its first checkpoint measures the cost
    want, _ = reference
    got = _adapter(model)
    assert all(torch.equal(got[k], want[k]) for k in want)  # the same as one uninterrupted run
    # a checkpoint that costs 1.2 s (3 parts x 0.4 s) may take 2 % of 60 s of training: far more
    # than this run's 20 steps, so after the first there is none
    _, slow = _train(SlowDisk(open_store(f"file://{tmp_path}/slow"), 0.4), auto)
    assert slow.checkpoint_steps == [1] and slow.checkpoint_intervals[0] > slow.steps
    # a 0.15 s checkpoint would want 7.5 s of training between two; a cap of 1 ms of training (less
    # than any step here) brings them back to (nearly) every step
    capped = auto.model_copy(update={"checkpoint_max_seconds": 0.001})
    _, cap = _train(SlowDisk(open_store(f"file://{tmp_path}/capped"), 0.05), capped)
    assert len(cap.checkpoint_steps) > 5
