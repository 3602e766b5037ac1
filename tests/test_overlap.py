"""Finishing a domain (llama.cpp checks, upload, manifest) beside the next domain's training
(`--overlap`, train/pipeline.py `Finisher`): the same outputs as one after the other, the phases
really overlap, it is off by default on a CPU, and a stop while both run publishes nothing half-checked
and resumes. Real `python -m train` processes on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, run_cli

from train.llama_check import HOLD_ENV

DOMAINS = ["nutrition", "legal", "fitness"]
FAST = ["--samples", "16", "--epochs", "0.5", "--run-id", "r"]


def train(store: Path, *flags: str, domains: list[str] = DOMAINS) -> dict:
    r = run_cli("-d", ",".join(domains), "--store", f"file://{store}", *FAST, *flags, "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def manifest(store: Path, domain: str) -> dict:
    return json.loads((store / "runs" / "r" / "domains" / domain / "manifest.json").read_text())


def phases(summary: dict) -> dict[tuple[str, str], tuple[float, float]]:
    return {(e["domain"], e["phase"]): (e["start"], e["end"]) for e in summary["schedule"]}


def test_overlap_gives_the_same_outputs_and_really_overlaps(tmp_path):
    serial = train(tmp_path / "serial")  # the default on a CPU
    both = train(tmp_path / "overlap", "--overlap")
    assert (serial["overlap"], both["overlap"]) == (False, True)
    for d in DOMAINS:
        a, b = manifest(tmp_path / "serial", d), manifest(tmp_path / "overlap", d)
        assert a["status"] == b["status"] == "done"
        assert a["files"]["adapter"]["sha256"] == b["files"]["adapter"]["sha256"]
        speed = {"tokens_per_second"}  # the only metric that may differ: a measurement of time
        assert {k: v for k, v in a["metrics"].items() if k not in speed} == {
            k: v for k, v in b["metrics"].items() if k not in speed
        }
        assert a["validation"]["passed"] and b["validation"]["passed"]
    s, o = phases(serial), phases(both)
    for k, nxt in zip(DOMAINS, DOMAINS[1:], strict=False):
        # one after the other: a domain is finished before the next starts training
        assert s[(k, "finish")][1] <= s[(nxt, "train")][0], serial["schedule"]
        # overlapped: the next domain trains while this one is checked, uploaded and recorded
        assert o[(nxt, "train")][0] < o[(k, "finish")][1], both["schedule"]
        assert o[(k, "finish")][0] < o[(nxt, "train")][1], both["schedule"]
        # at most one domain waits: it is finished before the one after the next starts training
    for k, after in zip(DOMAINS, DOMAINS[2:], strict=False):
        assert o[(k, "finish")][1] <= o[(after, "train")][0] + 0.01, both["schedule"]


def test_a_stop_while_one_domain_is_checked_and_the_next_trains_resumes(tmp_path):
    store, marker = tmp_path / "store", tmp_path / "held"
    domains = DOMAINS[:2]
    cmd = [sys.executable, "-m", "train", "-d", ",".join(domains), "--store", f"file://{store}"]
    proc = subprocess.Popen(
        [*cmd, *FAST, "--epochs", "3", "--checkpoint-every", "2", "--overlap", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, HOLD_ENV: str(marker)},  # the llama.cpp worker holds when it starts
        start_new_session=True,
    )
    try:
        until = time.monotonic() + 180
        while not marker.exists():  # nutrition's checks started: legal trains beside them
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < until, "the checks never started"
            time.sleep(0.02)  # polling another process's file
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)  # the held check would take 60 s: the stop must not wait
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err
    for d in domains:  # nothing half-checked is published, nothing is marked failed
        folder = store / "runs" / "r" / "domains" / d
        assert not (folder / "manifest.json").exists() and not (folder / "failed.json").exists()
    assert list((store / "runs" / "r" / "domains" / "nutrition" / "checkpoints").glob("step-*"))

    again = train(store, "--epochs", "3", "--checkpoint-every", "2", "--overlap", domains=domains)
    assert all(again["domains"][d]["status"] == "done" for d in domains), again
    assert again["domains"]["nutrition"]["resumed_from_step"] > 0
