"""The embedded default backend: a job is a process group on this machine.

Each job has a directory under the state directory (`local-jobs/<handle>/`) holding the task, its log,
the runner's pid and start time, and, once it ended, its exit code. That is all `status` needs, so a
launcher that crashed and came back finds its jobs again.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import yaml

from launcher.backends.base import BackendError, JobState, JobStatus

EXIT_INTERRUPTED = 75  # `python -m train` checkpointed and stopped on SIGTERM


def jobs_dir() -> Path:
    from budgets import state_dir

    return state_dir() / "local-jobs"


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks (tells a pid apart from a later one reusing it), or None
    if no live process has that pid (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


class LocalBackend:
    name = "local"

    def __init__(self, root: Path | None = None, max_parallel: int | None = None) -> None:
        self.root = root or jobs_dir()
        self.max_parallel = max_parallel or int(os.environ.get("MEETARA_LOCAL_PARALLEL", "1"))
        self._children: dict[str, subprocess.Popen] = {}

    def _dir(self, handle: str) -> Path:
        d = self.root / handle
        if not handle or "/" in handle or not (d / "meta.json").exists():
            raise BackendError(f"no local job {handle!r} (looked in {self.root})")
        return d

    def launch(self, task: dict, name: str) -> str:
        handle = f"{name}-{uuid.uuid4().hex[:8]}"
        d = self.root / handle
        d.mkdir(parents=True)
        (d / "task.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
        # `python` in the task means this interpreter (the one meetara is installed in)
        shim = d / "bin"
        shim.mkdir()
        (shim / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (shim / "python").chmod(0o755)
        env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ.get('PATH', '')}"}
        with open(d / "log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "launcher.backends.local_runner", str(d)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self._children[handle] = proc
        meta = {
            "pid": proc.pid,
            "proc_start": _proc_start(proc.pid),
            "started_at": datetime.now(UTC).isoformat(),
        }
        (d / "meta.json").write_text(json.dumps(meta))
        return handle

    def _meta(self, d: Path) -> dict:
        return json.loads((d / "meta.json").read_text())

    def status(self, handle: str) -> JobStatus:
        d = self._dir(handle)
        if handle in self._children:
            self._children[handle].poll()  # reap our own child so it does not linger as a zombie
        meta = self._meta(d)
        started = datetime.fromisoformat(meta["started_at"])
        cancelled = (d / "cancelled").exists()
        rc_file = d / "rc"
        if rc_file.exists():
            rc = int(rc_file.read_text())
            ended = datetime.fromtimestamp(rc_file.stat().st_mtime, UTC)
            if rc == 0:
                state = JobState.SUCCEEDED
            elif rc == EXIT_INTERRUPTED or cancelled:
                state = JobState.CANCELLED if cancelled else JobState.PREEMPTED
            else:
                state = JobState.FAILED
            return JobStatus(state, started, ended, rc)
        alive = meta["proc_start"] is not None and _proc_start(meta["pid"]) == meta["proc_start"]
        if alive:
            return JobStatus(JobState.RUNNING, started)
        # the runner is gone without recording an exit code: killed from outside (a preemption)
        ended = datetime.fromtimestamp((d / "log").stat().st_mtime, UTC)
        state = JobState.CANCELLED if cancelled else JobState.PREEMPTED
        return JobStatus(state, started, ended, detail="the job's processes vanished without an exit code")

    def cancel(self, handle: str, grace_s: float = 30.0) -> None:
        """SIGTERM the job (training checkpoints and exits), SIGKILL what is left after `grace_s`."""
        d = self._dir(handle)
        (d / "cancelled").touch()
        self.signal(handle, signal.SIGTERM)
        proc = self._children.get(handle)
        if proc is not None:
            try:
                proc.wait(grace_s)
                return
            except subprocess.TimeoutExpired:
                pass
        else:  # launched by another process: watch /proc
            deadline = time.monotonic() + grace_s
            while self.status(handle).state == JobState.RUNNING and time.monotonic() < deadline:
                time.sleep(0.2)
        self.signal(handle, signal.SIGKILL)
        if proc is not None:
            proc.wait()

    def signal(self, handle: str, sig: int) -> bool:
        """Send `sig` to the job's whole process group; False if it is not running."""
        meta = self._meta(self._dir(handle))
        if meta["proc_start"] is None or _proc_start(meta["pid"]) != meta["proc_start"]:
            return False
        try:
            os.killpg(meta["pid"], sig)  # the runner leads its own session: pgid == pid
        except ProcessLookupError:
            return False
        return True

    def wait(self, handle: str, timeout: float | None = None) -> JobStatus:
        """Block until a job this process launched ends (tests and the conductor's shutdown use it)."""
        proc = self._children.get(handle)
        if proc is not None:
            proc.wait(timeout)
        return self.status(handle)

    def logs(self, handle: str, tail: int = 50) -> str:
        lines = (self._dir(handle) / "log").read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:])
