"""Packing, the training step's throughput options, and the throughput harness (bench/train_throughput.py)."""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch
from conftest import ROOT

from train.lora import LoraParams, StopFlag, _Forward, attach_lora, plan_rows, train
from train.model import collate_rows, pack
from train.store import open_store

sys.path.insert(0, str(ROOT / "bench"))
import train_throughput  # noqa: E402


def small_gpt2(attn: str = "sdpa", dropout: float = 0.0):
    """A random 2-layer GPT-2 (nothing cached or downloaded); dropout off makes outputs comparable."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=256, bos_token_id=0, eos_token_id=0
    )
    cfg.attn_pdrop = cfg.resid_pdrop = cfg.embd_pdrop = dropout
    torch.manual_seed(0)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)
    return model


def samples(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 300) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


# ---------------------------------------------------------------------------------------- packing
def test_packing_loses_nothing_fits_and_is_deterministic():
    lengths = [len(x) for x in samples(500)]
    rows = pack(lengths, 128, seed=3)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(500))  # every sample exactly once
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert pack(lengths, 128, seed=3) == rows  # same seed, same rows
    assert pack(lengths, 128, seed=4) != rows
    # best fit fills rows: fewer rows than one sample each, and close to the bound
    assert len(rows) < 500 and len(rows) <= 1.1 * sum(lengths) / 128 + 1


def test_collated_rows_keep_labels_and_positions_inside_each_sample():
    data = samples(40, seed=1)
    rows = pack([len(x) for x in data], 128, seed=0)
    batch = collate_rows([[data[i] for i in row] for row in rows], pad_id=0, pad_to=128)
    assert batch["input_ids"].shape == (len(rows), 128)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(data[i])
            assert batch["input_ids"][r, at : at + n].tolist() == data[i]
            assert batch["position_ids"][r, at : at + n].tolist() == list(range(n))
            # the sample's first token is never a target (it would be predicted from the previous sample)
            assert batch["labels"][r, at].item() == -100
            assert batch["labels"][r, at + 1 : at + n].tolist() == data[i][1:]
            at += n
        assert (batch["labels"][r, at:] == -100).all()  # padding is no target
        assert batch["position_ids"][r, at:].tolist() == list(range(128 - at))  # its own segment
    # every real token but each sample's first is a target, exactly once
    assert int((batch["labels"] != -100).sum()) == sum(len(x) - 1 for x in data)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_samples_do_not_attend_across_boundaries(attn):
    model = small_gpt2(attn)
    data = samples(12, seed=2)
    rows = pack([len(x) for x in data], 128, seed=0)
    assert any(len(r) > 1 for r in rows)
    batch = collate_rows([[data[i] for i in row] for row in rows], pad_id=0)
    model.train()  # the training mode: use_cache defaults to True there, which would disable packing
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                alone = model(input_ids=torch.tensor([data[i]]), use_cache=False).logits[0]
                got = logits[r, at : at + len(data[i])]
                assert torch.allclose(got, alone, atol=1e-4), (attn, r, i, (got - alone).abs().max())
                at += len(data[i])
        # the training forward's loss is the token-weighted mean of the samples' own losses
        packed_loss = _Forward(model, False).fn(batch)
        per = [(model(input_ids=torch.tensor([x]), labels=torch.tensor([x])).loss, len(x) - 1) for x in data]
    expected = sum(loss * n for loss, n in per) / sum(n for _, n in per)
    assert torch.allclose(packed_loss, expected, atol=1e-5)


def test_auto_packing_packs_only_when_it_saves_positions():
    short = [10, 60, 25, 40] * 16  # varied and short: padding each batch to its longest wastes a lot
    long = [70] * 64  # two never fit a row
    params = LoraParams(max_len=128)
    assert plan_rows(short, params, 8, compiling=False).packed
    assert not plan_rows(long, params, 8, compiling=False).packed
    forced = plan_rows(long, params.model_copy(update={"pack": True}), 8, compiling=False)
    assert forced.packed and len(forced.rows) == 64
    off = plan_rows(short, params.model_copy(update={"pack": False}), 8, compiling=False)
    assert not off.packed and off.rows == [[i] for i in range(64)]
    assert not plan_rows([20] * 64, params, 8, compiling=False).packed  # equal lengths: no padding to save
    assert plan_rows([20] * 64, params, 8, compiling=True).packed  # but rows padded to max_len would


def _adapter(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _run(tmp_path, name, params, data, stop_at=None):
    model = attach_lora(small_gpt2(dropout=0.1), params)  # dropout: the RNG state matters on resume
    stop = StopFlag()

    def on_step(done, total, loss):
        if done == stop_at:
            stop.signum = 15

    store = open_store(f"file://{tmp_path}/{name}")
    return model, (
        lambda: train(model, data, params, pad_id=0, store=store, prefix="c", stop=stop, on_step=on_step)
    )


def test_packed_training_resumes_to_the_same_adapter(tmp_path):
    from train.lora import Interrupted

    data = samples(90, seed=5)
    params = LoraParams(pack=True, batch_size=4, epochs=2, checkpoint_every=3, max_len=128, lr=1e-2)
    clean, go = _run(tmp_path, "clean", params, data)
    result = go()
    assert result.packed and result.rows < len(data) and result.tokens == 2 * sum(len(x) for x in data)
    assert result.steps >= 10
    killed, go = _run(tmp_path, "killed", params, data, stop_at=5)
    with pytest.raises(Interrupted):
        go()
    resumed, go = _run(tmp_path, "killed", params, data)
    again = go()
    assert again.resumed_from == 5 and again.packed
    a, b = _adapter(clean), _adapter(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_failing_compile_falls_back_to_eager_with_the_same_result(tmp_path, monkeypatch):
    data = samples(40, seed=6)
    params = LoraParams(batch_size=4, epochs=1, checkpoint_every=100, torch_compile=False)
    eager, go = _run(tmp_path, "eager", params, data)
    go()

    def broken_compile(fn, **kw):
        def run(batch):
            raise RuntimeError("backend compiler failed (simulated)")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    params = params.model_copy(update={"torch_compile": True, "pad_to_max_len": False})
    fell, go = _run(tmp_path, "fell", params, data)
    result = go()
    assert result.compiled.startswith("fell back to eager: RuntimeError")
    a, b = _adapter(eager), _adapter(fell)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------- harness
def test_the_harness_runs_naive_and_optimized_on_cpu(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nearlier sections stay as they are\n")
    out = tmp_path / "tp.json"
    report = train_throughput.main(
        ["--steps", "2", "--warmup", "1", "--repeats", "1", "--domains", "3", "--json", str(out)]
        + ["--results", str(results)]
    )
    saved = json.loads(out.read_text())
    assert saved["ratio_optimized_vs_naive"] == report["ratio_optimized_vs_naive"] > 0
    for key in ("device", "torch", "date", "model", "data", "peak_flops", "peak_source", "variants"):
        assert key in saved, key
    naive, opt = saved["variants"]["naive"], saved["variants"]["optimized"]
    for v in (naive, opt):
        assert v["tokens_per_s"] > 0 and v["s_per_step"] > 0 and v["peak_memory_bytes"] > 0
        assert 0 < v["mfu"] < 1 and 0 < v["padding_efficiency"] <= 1
        assert len(v["step_seconds"]) == 3
    assert naive["batch_size"] == 2 and not naive["packed"] and naive["dtype"] == "fp32"
    assert naive["padding_efficiency"] < opt["padding_efficiency"]  # naive pads every row to max_len
    assert opt["batch_size"] == 8 and opt["threads"] >= 1
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nearlier sections stay as they are\n")
    assert train_throughput.ROWS_MARKER in text and "| naive |" in text and "| optimized |" in text
    train_throughput.append_rows(results, report)  # a second run adds rows to the same table
    assert results.read_text().count("| optimized |") == 2
    assert results.read_text().count(train_throughput.ROWS_MARKER) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on the device machine")
def test_the_optimized_path_beats_naive_on_cuda(tmp_path):
    report = train_throughput.main(
        [
            "--device",
            "cuda",
            "--model",
            "dialogpt-medium-shape",
            "--steps",
            "5",
            "--warmup",
            "3",
            "--repeats",
            "1",
            "--json",
            str(tmp_path / "tp.json"),
            "--no-results",
        ]
    )
    opt = report["variants"]["optimized"]
    assert opt["dtype"] == "bf16" and opt["packed"]
    assert report["variants"]["optimized"]["tokens_per_s"] > report["variants"]["naive"]["tokens_per_s"]
