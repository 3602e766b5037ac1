"""Training curves in the store (train/metrics.py) as `python -m train` writes them: every step once with
the loss the log prints, the held-out losses, a curve that never runs ahead of the checkpoints while a
job trains, and after a SIGKILL and a resume the same curve as an uninterrupted run's."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from train.metrics import FILE, dump, metrics_key, parse, read_metrics
from train.store import open_store

FAST = ["--samples", "80", "--epochs", "3", "--checkpoint-every", "3", "--no-merged"]
DOMAIN = "fitness"
TRAIN_FIELDS = {"kind", "step", "epoch", "loss", "lr", "tokens", "s_per_step", "tokens_per_s", "time"}
KILL_AT = 8  # two steps past the checkpoint at step 6: a preemption loses them, the resume redoes them


def _args(store: Path) -> list[str]:
    return ["--domains", DOMAIN, "--store", f"file://{store}", *FAST]


def _curve(store: Path) -> list[dict]:
    return read_metrics(open_store(f"file://{store}", writable=False), "default", DOMAIN)


def _steps(records: list[dict]) -> list[dict]:
    return [r for r in records if r["kind"] == "train"]


def _ckpts(store: Path) -> Path:
    return store / f"runs/default/domains/{DOMAIN}/checkpoints"


def _committed(store: Path) -> list[int]:
    """Steps of the committed checkpoints (those with a manifest), oldest first."""
    folders = _ckpts(store).glob("step-*") if _ckpts(store).is_dir() else []
    return sorted(int(p.name.split("-")[1]) for p in folders if (p / "MANIFEST.json").exists())


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted run: its store and its log (a line per step)."""
    store = tmp_path_factory.mktemp("clean")
    r = run_cli(*_args(store), env={"MEETARA_LOG_EVERY": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return store, r.stderr


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """The store of the same job SIGKILLed at step KILL_AT. At every step before, the job is paused
    (SIGSTOP, wherever it is: mid-checkpoint too) and its stored curve must be steps 1..n, n no further
    than the newest committed checkpoint."""
    store = tmp_path_factory.mktemp("killed")
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", *_args(store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "MEETARA_LOG_EVERY": "1"},
    )
    seen: list[str] = []
    try:
        for line in proc.stderr:
            seen.append(line)
            m = re.search(rf"{DOMAIN}: step (\d+)/", line)
            if not m:
                continue
            proc.send_signal(signal.SIGSTOP)
            steps = [r["step"] for r in _steps(_curve(store))]
            committed = _committed(store)
            assert steps == list(range(1, len(steps) + 1)), (line, steps)
            assert len(steps) <= (committed[-1] if committed else 0), (line, steps, committed)
            if int(m.group(1)) >= KILL_AT:
                proc.send_signal(signal.SIGKILL)
                break
            proc.send_signal(signal.SIGCONT)
        else:
            raise AssertionError(f"the job ended before step {KILL_AT}: {''.join(seen)[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (store / f"runs/default/domains/{DOMAIN}/manifest.json").exists()
    return store


def _run(store: Path) -> dict:
    r = run_cli(*_args(store))
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["domains"][DOMAIN]


def test_an_uninterrupted_run_records_every_step_once_with_the_logged_loss(clean):
    store, log = clean
    found = re.findall(rf"{DOMAIN}: step (\d+)/(\d+) loss (\S+)", log)
    logged = [(int(s), int(n), loss) for s, n, loss in found]
    total = logged[-1][1]
    assert total >= 12 and [s for s, _, _ in logged] == list(range(1, total + 1))

    records = _curve(store)
    steps = _steps(records)
    assert [r["step"] for r in steps] == list(range(1, total + 1))  # every step, once, in order
    assert [f"{r['loss']:.4f}" for r in steps] == [loss for _, _, loss in logged]
    for r in steps:
        assert set(r) == TRAIN_FIELDS
        assert r["tokens"] > 0 and r["s_per_step"] > 0 and r["tokens_per_s"] > 0 and r["lr"] >= 0
    assert steps[-1]["epoch"] == 3.0 and max(r["lr"] for r in steps) == pytest.approx(2e-3)
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)

    manifest = json.loads((store / f"runs/default/domains/{DOMAIN}/manifest.json").read_text())
    assert manifest["metrics"]["curve"] == metrics_key("default", DOMAIN)
    assert manifest["metrics"]["final_train_loss"] == round(steps[-1]["loss"], 5)
    # the same records given the store's URL; and the newest checkpoint holds the curve up to its step
    assert read_metrics(f"file://{store}", "default", DOMAIN) == records
    newest = _committed(store)[-1]
    part = parse((_ckpts(store) / f"step-{newest:08d}" / FILE).read_bytes())
    assert part == [r for r in records if r["step"] <= newest and r.get("when") != "after"]


def test_held_out_losses_are_recorded_before_and_after_training(clean):
    store, _ = clean
    records = _curve(store)
    heldout = [r for r in records if r["kind"] == "heldout"]
    total = _steps(records)[-1]["step"]
    assert [(r["when"], r["step"]) for r in heldout] == [("before", 0), ("after", total)]
    assert records[0] is heldout[0] and records[-1] is heldout[1]  # the curve's first and last records
    m = json.loads((store / f"runs/default/domains/{DOMAIN}/manifest.json").read_text())["metrics"]
    assert round(heldout[0]["loss"], 5) == m["heldout_loss_before"]
    assert round(heldout[1]["loss"], 5) == m["heldout_loss_after"] < m["heldout_loss_before"]
    assert read_metrics(f"file://{store}", "default", "legal") == []  # a domain not trained: nothing


def _same_curve(resumed: list[dict], clean: list[dict]) -> None:
    """Every step once, and the values of the uninterrupted run (bit-exact resume: equal floats)."""
    fields = ("kind", "when", "step", "epoch", "loss", "lr", "tokens")

    def view(records: list[dict]) -> list[tuple]:
        return [tuple(r.get(f) for f in fields) for r in records]

    assert view(resumed) == view(clean)


def test_a_killed_and_resumed_run_has_the_curve_of_an_uninterrupted_one(killed, clean, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(killed, store)
    interrupted = _curve(store)
    newest = _committed(store)[-1]
    n = len(_steps(interrupted))
    assert 6 <= n <= newest and n % 3 == 0  # up to a checkpoint: the steps after it were lost
    assert not any(r.get("when") == "after" for r in interrupted)
    saved = parse((_ckpts(store) / f"step-{newest:08d}" / FILE).read_bytes())
    assert [r["step"] for r in _steps(saved)] == list(range(1, newest + 1))

    out = _run(store)
    assert out["resumed_from_step"] == newest
    resumed = _curve(store)
    _same_curve(resumed, _curve(clean[0]))
    # the steps up to the checkpoint are the interrupted run's records, as they were
    assert [r for r in resumed if r["step"] <= newest and r.get("when") != "after"] == saved
    assert interrupted == saved[: len(interrupted)]


@pytest.mark.parametrize("hazard", ["newest checkpoint corrupt", "curve copy behind"])
def test_a_resume_repeats_no_step_and_loses_none(killed, clean, tmp_path, hazard):
    """The stored curve ahead of the checkpoint resumed (its newest checkpoint is corrupt: the resume
    takes the one before, and redoes the steps the curve already has), or behind it (the job was killed
    between committing a checkpoint and copying the curve beside it: the checkpoint holds them)."""
    store = tmp_path / "store"
    shutil.copytree(killed, store)
    newest = _committed(store)[-1]
    key = store / metrics_key("default", DOMAIN)
    before = _curve(store)
    if hazard == "newest checkpoint corrupt":
        before = parse((_ckpts(store) / f"step-{newest:08d}" / FILE).read_bytes())
        key.write_bytes(dump(before))  # the copy as that checkpoint left it (were it killed just before)
        (_ckpts(store) / f"step-{newest:08d}" / "adapter.safetensors").write_bytes(b"torn write")
        resume_at = newest - 3
        assert _steps(before)[-1]["step"] > resume_at  # the curve claims steps the resume redoes
    else:
        resume_at = newest
        key.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in before if r["step"] <= newest - 3))

    out = _run(store)
    assert out["resumed_from_step"] == resume_at
    resumed = _curve(store)
    _same_curve(resumed, _curve(clean[0]))
    by_step = {r["step"]: r for r in _steps(resumed)}
    for r in _steps(before):
        if r["step"] <= resume_at:
            assert by_step[r["step"]] == r  # kept as recorded (from the checkpoint resumed)
        else:
            assert by_step[r["step"]]["time"] > r["time"]  # redone: the new record, not the old one
