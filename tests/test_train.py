"""`python -m train` as a user runs it: S3 store on a real local server, kill and resume, reruns,
GGUF outputs loaded by llama.cpp, and bad input."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys

import gguf
import numpy as np
from conftest import ROOT, closed_port, run_cli

from train.llama_check import run_llama_check
from train.store import open_store

FAST = ["--samples", "80", "--epochs", "3", "--checkpoint-every", "3"]


def adapter_tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


def test_train_two_domains_on_s3_then_rerun_skips(bucket, s3_server, tmp_path):
    url = f"s3://{bucket}/team/a"
    args = [
        "--domains",
        "nutrition,legal",
        "--store",
        url,
        "--endpoint-url",
        s3_server,
        "--run-id",
        "r1",
        *FAST,
    ]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads(first.stdout)
    assert summary["counts"] == {"done": 2, "failed": 0, "skipped": 0}
    # one llama.cpp worker validated both domains; the base was exported and quantized once
    assert summary["llama_worker_starts"] == 1
    assert {"load", "base_export_f16", "base_quantize", "base_upload"} <= set(summary["timings"])

    store = open_store(url, endpoint_url=s3_server)
    for name in ("nutrition", "legal"):
        m = json.loads(store.get(f"runs/r1/domains/{name}/manifest.json"))
        assert m["status"] == "done" and m["validation"]["passed"]
        assert m["metrics"]["heldout_loss_after"] < m["metrics"]["heldout_loss_before"]
        # what ships by default (issue 14): an f16 adapter per domain, the run's one Q4_K_M base
        assert set(m["files"]) == {"adapter"} and m["files"]["adapter"]["gguf"]["tensor_types"] == {"F16": 4}
        assert set(m["base_files"]) == {"q4_k_m"} and m["base_gguf"] == m["base_files"]["q4_k_m"]
        assert m["base_gguf"]["key"] == "runs/r1/base/tiny-Q4_K_M.gguf"
        assert set(m["timings"]) == {"data", "train", "export", "validate", "upload"}
        assert {"adapter_export", "validate_reference", "validate_llama_q4_k_m_adapter"} <= set(
            m["timings_detail"]
        )
        assert m["validation"]["files"]["adapter"]["llama_cpp"]["adapter_delta_max_rel_diff"] < 0.35
        # every file the manifest names is in the store with the recorded checksum
        for f in [m["base_gguf"], *m["files"].values()]:
            import hashlib

            assert hashlib.sha256(store.get(f["key"])).hexdigest() == f["sha256"]

    # the outputs load in llama.cpp (llama-cpp-python) and generate, here, independently of the pipeline
    base, adapter = tmp_path / "base.gguf", tmp_path / "adapter.gguf"
    store.get_file("runs/r1/base/tiny-Q4_K_M.gguf", base)
    assert not store.exists("runs/r1/base/tiny-f16.gguf")  # only with --base-f16
    store.get_file("runs/r1/domains/legal/adapter.gguf", adapter)
    ids = [5, 17, 42, 99, 7]
    with_lora = run_llama_check(base, ids, lora=adapter, generate=6)
    without = run_llama_check(base, ids, generate=6)
    assert len(with_lora["generated"]) == 6
    assert np.abs(with_lora["logits"] - without["logits"]).max() > 0.05  # the adapter is applied

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["counts"] == {"done": 0, "failed": 0, "skipped": 2}


def _start(store: str, extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "train", "--domains", "fitness", "--store", store, "--no-merged", *FAST],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "MEETARA_LOG_EVERY": "1", **(extra_env or {})},
    )


def _wait_for_step(proc: subprocess.Popen, step: int) -> list[str]:
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if f": step {step}/" in line:
            return seen
    raise AssertionError(f"process ended before step {step}: {''.join(seen)[-2000:]}")


def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(tmp_path):
    clean = run_cli("--domains", "fitness", "--store", f"file://{tmp_path}/clean", "--no-merged", *FAST)
    assert clean.returncode == 0, clean.stderr[-2000:]

    total = int(re.findall(r"step \d+/(\d+)", clean.stderr)[-1])
    assert total >= 12
    seed = random.randrange(10**6)
    kill_at = random.Random(seed).randrange(7, total - 1)  # after the second checkpoint (every 3 steps)
    proc = _start(f"file://{tmp_path}/killed")
    _wait_for_step(proc, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # the newest checkpoint is corrupt on top of that: resume must take the previous valid one
    ckpts = tmp_path / "killed/runs/default/domains/fitness/checkpoints"
    newest = max(p for p in ckpts.iterdir() if (p / "MANIFEST.json").exists())
    (newest / "adapter.safetensors").write_bytes(b"torn write")
    newest_step = int(newest.name.split("-")[1])

    resumed = run_cli("--domains", "fitness", "--store", f"file://{tmp_path}/killed", "--no-merged", *FAST)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    out = json.loads(resumed.stdout)["domains"]["fitness"]
    assert out["resumed_from_step"] == newest_step - 3, (seed, kill_at, newest_step, out)
    a = adapter_tensors(tmp_path / "clean/runs/default/domains/fitness/adapter.gguf")
    b = adapter_tensors(tmp_path / "killed/runs/default/domains/fitness/adapter.gguf")
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:
        assert np.array_equal(a[k], b[k]), (k, seed, kill_at)


def test_sigterm_checkpoints_and_exits_with_the_interrupted_code(tmp_path):
    proc = _start(f"file://{tmp_path}/s")
    _wait_for_step(proc, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    steps = sorted((tmp_path / "s/runs/default/domains/fitness/checkpoints").iterdir())
    assert steps and int(steps[-1].name.split("-")[1]) >= 5


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "legal.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "oops"\n')
    cases = {
        "unknown domain": (["--domains", "legal,helthcare"], "closest: healthcare"),
        "malformed JSONL": (["--domains", "legal", "--data-dir", str(data)], f"{data / 'legal.jsonl'}:2:"),
        "bad store URL": (["--domains", "legal", "--store", "ftp://x/y"], "bad store URL"),
        "unreachable endpoint": (
            [
                "--domains",
                "legal",
                "--store",
                "s3://b/p",
                "--endpoint-url",
                f"http://127.0.0.1:{closed_port()}",
            ],
            "failed",
        ),
        "bad option value": (["--domains", "legal", "--samples", "many"], "--samples"),
        "bad run id": (["--domains", "legal", "--run-id", "../etc"], "run_id"),
    }
    for name, (args, expected) in cases.items():
        r = run_cli(*args, "--store", f"file://{tmp_path}/st") if "--store" not in args else run_cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (name, r.stderr)
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in r.stderr, (name, r.stderr)
        assert "testing" not in r.stderr  # no secret in errors
    assert not (tmp_path / "st" / "runs").exists()  # nothing was written for bad input
