"""A SIGINT (Ctrl-C) or SIGTERM that lands while a domain is being validated interrupts the job (exit
75, rerun resumes); it never marks the domain as failed validation. Real processes throughout: the
job is `python -m train`, signalled while its llama.cpp check child is held by the
MEETARA_TEST_HOLD_LLAMA_CHECK hook (train/llama_check.py), which writes the child's pid to a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, run_cli

from train.llama_check import HOLD_ENV, LlamaCheckError, LlamaCheckInterrupted, run_llama_check

FAST = ["--samples", "32", "--epochs", "2", "--checkpoint-every", "2", "--no-merged"]


def _start(store: Path, domains: str, marker: Path) -> subprocess.Popen:
    """The job in its own process group, as a terminal runs a foreground command: Ctrl-C signals the group."""
    return subprocess.Popen(
        [sys.executable, "-m", "train", "--domains", domains, "--store", f"file://{store}", *FAST],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, HOLD_ENV: str(marker)},
        start_new_session=True,
    )


def _wait_for_check(marker: Path, proc: subprocess.Popen | None = None, timeout: float = 180) -> int:
    """The pid of the llama.cpp check child, once it is running (it wrote the marker)."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended before validation: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("validation never started")
        time.sleep(0.02)
    return int(marker.read_text())


def _gone(pid: int, timeout: float = 5) -> bool:
    """The process is gone (or a zombie about to be reaped) within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _interrupt(store: Path, domains: str, marker: Path, sig: int, *, group: bool) -> str:
    """Run the job, signal it while it validates (its whole process group, or the job alone), check
    that it stopped as interrupted, leaving no check child behind; returns its stderr."""
    marker.unlink(missing_ok=True)
    proc = _start(store, domains, marker)
    child = _wait_for_check(marker, proc)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=60)  # the check holds for 60 s: a job that waits for it fails
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 75, err[-2000:]
    assert last.startswith("error: interrupted:") and "validating" in last, err[-2000:]
    assert "failed" not in last and "Traceback" not in err, err[-2000:]
    assert out == ""  # no summary: the job did not finish
    assert _gone(child), "the llama.cpp check child outlived the job"
    return err


def _nothing_recorded(domain_dir: Path) -> None:
    """No manifest, no failed.json, no output published; the checkpoints are still there."""
    assert sorted(p.name for p in domain_dir.iterdir()) == ["checkpoints"], list(domain_dir.iterdir())
    assert any((domain_dir / "checkpoints").iterdir())


def test_a_signal_during_validation_interrupts_and_a_rerun_validates(tmp_path):
    store, marker = tmp_path / "store", tmp_path / "validating"
    domains = store / "runs/default/domains"

    # Ctrl-C in a terminal: SIGINT to the job and to its llama.cpp child (the user's report)
    _interrupt(store, "fitness", marker, signal.SIGINT, group=True)
    _nothing_recorded(domains / "fitness")

    rerun = run_cli("--domains", "fitness", "--store", f"file://{store}", *FAST)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout)["counts"] == {"done": 1, "failed": 0, "skipped": 0}
    manifest = domains / "fitness/manifest.json"
    assert json.loads(manifest.read_text())["validation"]["passed"]
    assert not (domains / "fitness/failed.json").exists()
    finished = manifest.read_bytes()

    # SIGTERM to the process group (a VM's shutdown, systemd): kills the check child too
    _interrupt(store, "fitness,legal", marker, signal.SIGTERM, group=True)
    _nothing_recorded(domains / "legal")
    # SIGTERM to the job alone (`kill PID`): the job stops its check child itself, at once
    _interrupt(store, "fitness,legal", marker, signal.SIGTERM, group=False)
    _nothing_recorded(domains / "legal")
    assert manifest.read_bytes() == finished  # the domain done before is untouched


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory) -> Path:
    from train.domains import load_registry
    from train.gguf_export import write_model_gguf
    from train.model import load_base

    base = load_base("tiny", load_registry())
    return write_model_gguf(
        base.model, base.tokenizer, tmp_path_factory.mktemp("gguf") / "base.gguf", name="tiny"
    )


def test_a_check_killed_by_a_stop_signal_is_no_verdict_on_the_file(base_gguf, tmp_path, monkeypatch):
    marker = tmp_path / "validating"
    monkeypatch.setenv(HOLD_ENV, str(marker))

    # the child alone is sent SIGTERM: it was stopped, the file did not fail
    caught: list[BaseException] = []

    def check() -> None:
        try:
            run_llama_check(base_gguf, [1, 2, 3])
        except BaseException as e:  # handed to the test thread
            caught.append(e)

    t = threading.Thread(target=check)
    t.start()
    os.kill(_wait_for_check(marker), signal.SIGTERM)
    t.join(60)
    assert not t.is_alive() and len(caught) == 1
    assert isinstance(caught[0], LlamaCheckInterrupted) and not isinstance(caught[0], LlamaCheckError)
    assert "SIGTERM" in str(caught[0])

    # `stop` turns true while the child runs: killed at once, not waited for
    marker.unlink()
    t0 = time.monotonic()
    with pytest.raises(LlamaCheckInterrupted):
        run_llama_check(base_gguf, [1, 2, 3], stop=marker.exists)
    assert time.monotonic() - t0 < 30
    assert _gone(int(marker.read_text()))
