"""The local backend: real process groups on this machine; launch, status, logs, cancel, preemption."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time

import pytest

from launcher.backends.base import BackendError, JobState
from launcher.backends.local import LocalBackend


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    """Poll until `predicate()` is truthy (a condition, not a fixed sleep); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def waiting_task(ready, extra: str = "") -> dict:
    """A job that says it is ready, then waits; on SIGTERM it exits 75 like `python -m train`."""
    code = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
        f"pathlib.Path({str(ready)!r}).write_text('up')\n"
        "time.sleep(120)\n"
    )
    return {"envs": {"MEETARA_RUN_ID": "t"}, "run": f"{extra}python -c {shlex.quote(code)}"}


@pytest.fixture
def backend(tmp_path):
    return LocalBackend(root=tmp_path / "jobs")


def test_a_job_runs_setup_then_run_with_the_task_envs(backend):
    task = {
        "envs": {"MEETARA_DOMAINS": "legal,nutrition"},
        "setup": "echo setting-up",
        "run": "echo domains=$MEETARA_DOMAINS; python -c 'import sys; print(sys.executable)'",
    }
    handle = backend.launch(task, "job1")
    st = backend.wait(handle, timeout=60)
    assert st.state is JobState.SUCCEEDED and st.exit_code == 0
    assert st.started_at is not None and st.ended_at >= st.started_at
    log = backend.logs(handle)
    assert "setting-up" in log and "domains=legal,nutrition" in log
    assert sys.executable in log  # `python` in a task is the interpreter meetara runs in


def test_a_failing_run_is_failed_with_its_exit_code(backend):
    handle = backend.launch({"setup": "true", "run": "exit 3"}, "job")
    st = backend.wait(handle, timeout=60)
    assert (st.state, st.exit_code) == (JobState.FAILED, 3)
    handle = backend.launch({"setup": "exit 4", "run": "echo never"}, "job-2")
    st = backend.wait(handle, timeout=60)
    assert (st.state, st.exit_code) == (JobState.FAILED, 4)
    assert "never" not in backend.logs(handle)


def test_a_job_is_found_by_the_name_it_was_launched_under(backend):
    assert backend.find("job") is None  # never launched
    handle = backend.launch({"run": "exit 0"}, "job")
    assert handle == "job" and backend.find("job") == "job"
    assert LocalBackend(root=backend.root).find("job") == "job"  # another process finds it too
    with pytest.raises(BackendError, match="exists already"):  # a name is launched once
        backend.launch({"run": "exit 0"}, "job")
    backend.wait(handle, timeout=60)
    # a folder left by a launcher that died before starting the runner is not a job
    (backend.root / "ghost").mkdir()
    old = time.time() - 3600
    os.utime(backend.root / "ghost", (old, old))
    assert backend.find("ghost") is None


def test_cancel_stops_the_job_gracefully(backend, tmp_path):
    ready = tmp_path / "ready"
    handle = backend.launch(waiting_task(ready), "job")
    wait_for(ready.exists, what="the job to start")
    assert backend.status(handle).state is JobState.RUNNING
    backend.cancel(handle, grace_s=30)
    st = backend.status(handle)
    assert (st.state, st.exit_code) == (JobState.CANCELLED, 75)


def test_a_killed_job_is_a_preemption_seen_from_a_new_launcher(backend, tmp_path):
    ready = tmp_path / "ready"
    handle = backend.launch(waiting_task(ready), "job")
    wait_for(ready.exists, what="the job to start")
    # a launcher started later (no memory of the child process) finds the job by its handle
    other = LocalBackend(root=backend.root)
    assert other.status(handle).state is JobState.RUNNING
    assert other.signal(handle, signal.SIGKILL)  # the machine vanishes: no exit code is written
    st = wait_for(lambda: (s := other.status(handle)).state.finished and s, what="the job to die")
    assert st.state is JobState.PREEMPTED and st.exit_code is None
    assert "vanished" in st.detail
    assert backend.wait(handle).state is JobState.PREEMPTED


def test_unknown_handles_are_a_clear_error(backend):
    with pytest.raises(BackendError, match="no local job"):
        backend.status("nope-123")
    with pytest.raises(BackendError):
        backend.cancel("../etc")
