"""The embedded default backend: a job is a process group on this machine.

Each job has a directory under the state directory (`local-jobs/<name>/`, the name the conductor
recorded before launching, which is also the handle) holding the task, its log, the runner's pid and
start time (written by whichever of launcher and runner gets there first, so a launcher killed right
after starting the runner still leaves the job findable), and, once it ended, its exit code. That is
all `status` needs, so a launcher that crashed and came back finds its jobs again.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from budgets import open_private, private_dir, write_private
from budgets.lease import proc_start
from launcher.backends.base import BackendError, JobState, JobStatus

EXIT_INTERRUPTED = 75  # `python -m train` checkpointed and stopped on SIGTERM
# a job folder without a runner's pid this long after it was made was never started (the launcher died
# between making the folder and starting the runner): it is forgotten, and its job launched again
NEVER_STARTED_S = 60.0


def jobs_dir() -> Path:
    from budgets import state_dir

    return state_dir() / "local-jobs"


def write_meta(d: Path, pid: int) -> None:
    """Record the runner's pid and start time once: the first writer wins (a hard link never replaces
    a file), and launcher and runner both write the same pid."""
    meta = {"pid": pid, "proc_start": proc_start(pid), "started_at": datetime.now(UTC).isoformat()}
    tmp = d / f".meta.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(meta))
    try:
        os.link(tmp, d / "meta.json")
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


class LocalBackend:
    name = "local"

    def __init__(self, root: Path | None = None, max_parallel: int | None = None) -> None:
        self.root = root or jobs_dir()
        self.max_parallel = max_parallel or int(os.environ.get("MEETARA_LOCAL_PARALLEL", "1"))
        self.log_poll_s = 0.0  # a file on this machine: every poll
        self.teardown_s = 0.0  # a cancelled job's process is gone when cancel returns
        self._children: dict[str, subprocess.Popen] = {}

    def _dir(self, handle: str) -> Path:
        d = self.root / handle
        if not handle or "/" in handle or not (d / "meta.json").exists():
            raise BackendError(f"no local job {handle!r} (looked in {self.root})")
        return d

    def find(self, name: str) -> str | None:
        """The handle of the job launched under `name`, or None if it was never started."""
        d = self.root / name
        if not name or "/" in name or not d.is_dir():
            return None
        if (d / "meta.json").exists():
            return name
        if time.time() - d.stat().st_mtime < NEVER_STARTED_S:
            # the runner may still be starting: wait for its pid rather than launch the job twice
            deadline = time.monotonic() + NEVER_STARTED_S
            while time.monotonic() < deadline and not (d / "meta.json").exists():
                time.sleep(0.2)
            if (d / "meta.json").exists():
                return name
        return None

    def launch(self, task: dict, name: str) -> str:
        """Start the task as job `name` (its handle); BackendError if a job of that name exists."""
        handle = name
        if not name or "/" in name or name.startswith("."):
            raise BackendError(f"invalid local job name {name!r}")
        d = self.root / handle
        private_dir(d.parent)
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            raise BackendError(f"a local job named {name!r} exists already ({d})") from None
        write_private(d / "task.yaml", yaml.safe_dump(task, sort_keys=False))
        # `python` in the task means this interpreter (the one meetara is installed in)
        shim = private_dir(d / "bin")
        write_private(shim / "python", f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (shim / "python").chmod(0o700)
        env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ.get('PATH', '')}"}
        with open_private(d / "log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "launcher.backends.local_runner", str(d)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self._children[handle] = proc
        write_meta(d, proc.pid)
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
        alive = meta["proc_start"] is not None and proc_start(meta["pid"]) == meta["proc_start"]
        if alive:
            return JobStatus(JobState.RUNNING, started)
        # the runner is gone without recording an exit code: killed from outside (a preemption)
        # it ended after its last word in the log, and not before it started (killed while starting)
        ended = max(datetime.fromtimestamp((d / "log").stat().st_mtime, UTC), started)
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
        killed = self.signal(handle, signal.SIGKILL)
        if proc is not None:
            proc.wait()
        if killed and not (d / "rc").exists():
            # the runner died with the job and recorded nothing: record when it was stopped, so the job
            # is billed until now (not until its last log line) and reads as CANCELLED, exit code 137
            write_private(d / "rc", str(128 + signal.SIGKILL))

    def signal(self, handle: str, sig: int) -> bool:
        """Send `sig` to the job's whole process group; False if it is not running."""
        meta = self._meta(self._dir(handle))
        if meta["proc_start"] is None or proc_start(meta["pid"]) != meta["proc_start"]:
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
