"""`meetara cancel` and `meetara logs` as functions: find a run's jobs by name, stop them, read their logs.

A target is a run id (every job of the run) or a job name as `meetara status` shows it (`RUN-j1`; a
launch's own name, `RUN-j1-1a2b3c4d`, and a backend handle work too).

Cancelling moves money only under the run's lease (budgets/lease.py), like every launcher:

- a live launcher follows the run: the job is cancelled through the backend, and that launcher sees it
  end at its next poll and settles its reservation (what ran is spent, the rest released);
- nobody follows it (the launcher died, or was never there for this job): `cancel` takes the lease,
  cancels, then settles the job's reservation from the backend's start and end times, releases the
  reservation of a job that never started, and gives the lease back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from launcher.backends.base import BackendError
from launcher.runs import ACTIVE, LAUNCHING, JobRecord, RunRecord, list_runs, load_run, request_cancel
from train import BadInput


@dataclass
class Target:
    rec: RunRecord
    jobs: list[JobRecord]
    whole_run: bool


def find_target(target: str) -> Target:
    """The run named `target` (all its jobs), else the job whose name, launch name or handle it is."""
    if not target or not target.strip():
        raise BadInput("name a run or a job (see meetara status)")
    try:
        rec = load_run(target)
    except BadInput:  # not a valid run id: it may still be a handle
        rec = None
    if rec is not None:
        return Target(rec, list(rec.jobs.values()), True)
    for rec in list_runs():
        for job in rec.jobs.values():
            if target in (job.name, job.launch_name, job.handle):
                return Target(rec, [job], False)
    raise BadInput(f"no run or job {target!r} on this machine (see meetara status)")


@dataclass
class CancelReport:
    run_id: str
    cancelled: list[str] = field(default_factory=list)  # jobs the backend stopped
    not_running: list[str] = field(default_factory=list)  # jobs with nothing to stop
    failed: dict[str, str] = field(default_factory=dict)  # job -> why the backend refused
    followed_by: str | None = None  # the live launcher that settles the money, if one follows the run
    settled: dict[str, float] = field(default_factory=dict)  # job -> dollars spent (settled here)
    released: dict[str, float] = field(default_factory=dict)  # job -> dollars given back to the caps
    open: list[str] = field(default_factory=list)  # jobs whose money stays open (still stopping)


def _handle(job: JobRecord, backend) -> str | None:
    """The job's current launch, looked up by name when its launcher died while starting it."""
    if job.state == LAUNCHING and job.launch_name and hasattr(backend, "find"):
        return backend.find(job.launch_name)
    return job.handle if job.state in ACTIVE else None


def cancel(target: str, *, config: Path | None = None, backend=None) -> CancelReport:
    """Stop the target's running jobs (training checkpoints first) and settle their money (see the
    module doc). Raises BadInput (unknown target), LedgerError."""
    from budgets.lease import Holder, RunOwned
    from launcher.launch import make_backend, open_ledger
    from launcher.money import settle_stale

    t = find_target(target)
    rec = t.rec
    report = CancelReport(rec.run_id)
    be = backend or make_backend(rec.backend)
    with open_ledger(config) as ledger:
        try:
            holder = Holder(ledger, rec.run_id).acquire()
        except RunOwned as e:
            holder = None
            report.followed_by = f"pid {e.lease.pid} on {e.lease.host}"
        try:
            if holder is not None:
                rec = load_run(rec.run_id) or rec  # the newest record, now that nobody else writes it
                t = Target(rec, [rec.jobs[j.name] for j in t.jobs if j.name in rec.jobs], t.whole_run)
            for job in t.jobs:
                try:
                    handle = _handle(job, be)
                    if holder is not None and handle is not None and job.state == LAUNCHING:
                        # found after its launcher died (as launch.adopt does): recorded before anything
                        # else, so its money is settled from the backend's times whatever follows, never
                        # released as if it had not launched
                        job.handle, job.state = handle, "PENDING"
                        job.note(f"found {handle} after its launcher stopped")
                    if handle is None or be.status(handle).state.finished:
                        report.not_running.append(job.name)
                        continue
                    request_cancel(rec.run_id, handle)  # before the backend hears of it: never relaunched
                    try:
                        be.cancel(handle)
                    except BackendError:
                        request_cancel(rec.run_id, handle, withdraw=True)
                        raise
                except BackendError as e:
                    report.failed[job.name] = str(e)
                    continue
                report.cancelled.append(job.name)
                if holder is not None:
                    job.note("cancelled by `meetara cancel`")
            if holder is not None:
                rec.save()
                ids = {j.reservation_id: j.name for j in t.jobs if j.reservation_id is not None}
                before = {r.id: r for r in ledger.open_reservations(rec.run_id) if r.id in ids}
                settle_stale(ledger, rec.run_id, be, rec, owner=holder.token, only=set(before))
                for rid, name in ids.items():
                    if rid not in before:
                        continue
                    res = ledger.reservation(rid)
                    if res.state == "open":
                        report.open.append(name)
                    elif res.state == "released":
                        report.released[name] = res.amount
                    else:
                        report.settled[name] = res.settled_amount or 0.0
                        report.released[name] = max(res.amount - (res.settled_amount or 0.0), 0.0)
        finally:
            if holder is not None:
                holder.release()
    return report


def cancel_lines(report: CancelReport) -> list[str]:
    """What `meetara cancel` prints, one line each."""
    from budgets import usd

    lines = []
    if report.cancelled:
        lines.append(
            f"cancelled {', '.join(report.cancelled)} (checkpoints are kept: `meetara recover` resumes)"
        )
    elif not report.failed:
        lines.append(f"nothing to cancel: no job of run {report.run_id} is running")
    for name, why in report.failed.items():
        lines.append(f"{name}: not cancelled: {why}")
    if report.followed_by:
        lines.append(f"the launcher following run {report.run_id} ({report.followed_by}) settles the money")
    for name, spent in report.settled.items():
        lines.append(f"{name}: settled {usd(spent)} spent, released {usd(report.released.get(name, 0.0))}")
    for name, amount in report.released.items():
        if name not in report.settled:
            lines.append(f"{name}: released {usd(amount)} (it never started)")
    for name in report.open:
        lines.append(f"{name}: still stopping; `meetara recover {report.run_id}` settles its money")
    return lines


def log_handle(target: str) -> tuple[RunRecord, JobRecord]:
    """The job whose log `meetara logs` shows: a job name, or a run with a single job."""
    t = find_target(target)
    if t.whole_run and len(t.jobs) != 1:
        names = ", ".join(j.name for j in t.jobs) or "none"
        raise BadInput(f"run {t.rec.run_id} has {len(t.jobs)} jobs: name one ({names})")
    job = t.jobs[0]
    if not (job.handle or job.launch_name):
        raise BadInput(f"job {job.name} was never launched: no log")
    return t.rec, job


def read_log(target: str, tail: int | None = None) -> str:
    """The job's log (its current launch), the last `tail` lines if given."""
    from launcher.launch import make_backend

    rec, job = log_handle(target)
    be = make_backend(rec.backend)
    if rec.backend == "local":
        text = local_log(be, job).read_text(errors="replace")
        lines = text.splitlines(keepends=True)
        return "".join(lines[-tail:] if tail else lines)
    handle = job.handle or _handle(job, be)
    if handle is None:
        raise BadInput(f"job {job.name}: its launch is not known to {rec.backend}")
    out: list[str] = []
    be.stream_logs(handle, out.append, tail=tail, follow=False)
    return "".join(out)


def local_log(be, job: JobRecord) -> Path:
    d = be.root / (job.handle or job.launch_name or "")
    if not (d / "log").is_file():
        raise BadInput(f"job {job.name}: no log at {d / 'log'}")
    return d / "log"


def follow_log(
    target: str,
    write: Callable[[str], None],
    *,
    tail: int | None = None,
    poll_s: float = 0.5,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Write the job's log, then what it appends, until the job ends (or `stop()` says so)."""
    from launcher.launch import make_backend

    rec, job = log_handle(target)
    be = make_backend(rec.backend)
    if rec.backend != "local":
        handle = job.handle or _handle(job, be)
        if handle is None:
            raise BadInput(f"job {job.name}: its launch is not known to {rec.backend}")
        be.stream_logs(handle, write, tail=tail, follow=True)
        return
    path = local_log(be, job)
    handle = path.parent.name
    with path.open("r", errors="replace") as f:
        lines = f.readlines()
        write("".join(lines[-tail:] if tail else lines))
        while not stop():
            ended = be.status(handle).state.finished  # before the read: what it wrote last is read
            chunk = f.read()
            if chunk:
                write(chunk)
            elif ended:
                return
            else:
                time.sleep(poll_s)
