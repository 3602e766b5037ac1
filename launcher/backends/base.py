"""The backend interface: launch a rendered task, ask its state, cancel it, read its logs.

Backends are stateless objects: everything a later process needs to find a job again is in its handle
(a string), so a launcher that crashed can pick its jobs up after a restart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol


class JobState(StrEnum):
    PENDING = "PENDING"  # accepted, not running yet (provisioning, queued)
    RUNNING = "RUNNING"
    RECOVERING = "RECOVERING"  # preempted; the backend itself is bringing it back (SkyPilot managed jobs)
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # the run command failed (exit != 0): a domain failed validation, bad input
    PREEMPTED = "PREEMPTED"  # the machine went away under the job; relaunching resumes from checkpoints
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.PREEMPTED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    started_at: datetime | None = None  # when billing began (the machine was up)
    ended_at: datetime | None = None
    exit_code: int | None = None
    detail: str = ""
    # recoveries the backend itself made of this launch (SkyPilot's preemption recovery); the conductor
    # counts them with its own relaunches against max_recoveries
    recoveries: int = 0
    # where the backend put the launch when it chose among the job's offers itself (SkyPilot's ordered
    # failover): (provider, instance type, region, zone, spot) in the backend's terms; None if unknown
    placed: tuple[str, str, str, str | None, bool] | None = None
    # when the machine the launch runs on now was created (a recovery's machine, not the first one's); None:
    # unknown, the launch's start then
    machine_since: datetime | None = None
    # the $/h the provider itself reports billing for the machine the launch runs on now (its instance
    # listing), where the backend can ask it; None: not reported
    billed_hour: float | None = None


class BackendError(RuntimeError):
    """The backend cannot do what was asked (missing SkyPilot, missing credentials, unknown handle)."""


class Backend(Protocol):
    name: str
    max_parallel: int  # jobs the conductor runs at once on this backend
    log_poll_s: float  # the conductor reads a running job's last log line this often (progress)
    # after a cancel, how long the backend may still bill the machine while it tears it down (SkyPilot's
    # controller deletes the instance after the cancel): `ended_at` waits up to this for the end it reports
    teardown_s: float

    def launch(self, task: dict, name: str) -> str:
        """Start the task (a SkyPilot task mapping, see launcher/task.py); return a handle."""
        ...

    def status(self, handle: str) -> JobStatus: ...

    def cancel(self, handle: str) -> None: ...

    def logs(self, handle: str, tail: int = 50) -> str: ...


def ended_at(backend: Backend, handle: str) -> datetime | None:
    """When a launch that was cancelled or stopped ended, as `backend` reports it once it has finished
    (its machine torn down: billed until then), asking every second for up to `backend.teardown_s`;
    None when the backend does not say by then (callers bill until now)."""
    deadline = time.monotonic() + backend.teardown_s
    while True:
        try:
            st = backend.status(handle)
        except Exception:
            st = None
        if st is not None and st.state.finished:
            return st.ended_at
        if time.monotonic() >= deadline:
            return None
        time.sleep(1.0)
