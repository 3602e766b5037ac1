"""The money side of a launch: reserve before launching, accrue while jobs run, stop them at a cap.

- Reserve: each job reserves its planned cost x RESERVE_MARGIN in the ledger before it launches; the
  ledger refuses (BudgetExceeded) when a daily/weekly/monthly cap or the launch's `--budget` would be
  passed, atomically across processes.
- In-job guard: each job is told (MEETARA_STOP_AT) when its reservation runs out at its rate, minus a
  margin; `python -m train` checkpoints and stops itself then, so a cap holds with nobody watching.
  MEETARA_STOP_HARD_AT, STOP_SLACK_S before the reservation's end, ends it whatever it is doing then (a
  checkpoint that takes longer than the margin): the local runner kills it, `python -m train` exits.
- Accrue: on every poll, rate x elapsed from the backend's start time (`Ledger.accrue_until`).
- Watchdog: when the spend would pass a cap (or `--budget`, or a job's reservation) before the next
  poll, the running jobs are cancelled (they checkpoint) and marked STOPPED-BUDGET. Accrual is brought
  up to date at every poll and the check looks one poll ahead, so spend passes a cap by at most what
  the jobs cost between the check and the moment cancellation takes effect: rate x poll interval
  bounds it when cancelling takes less than a poll.
- Settle: a finished job's reservation is settled to what it accrued; a rerun settles reservations a
  crashed launcher left open, from the backend's timestamps. A launch that fails gives its reservation
  back (released, or settled to what earlier launches of the job accrued).
- Ownership: every reserve, settle and release names the run's lease (budgets/lease.py); the ledger
  refuses it (LeaseLost) in the same transaction when another launcher has taken the run over.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta

from budgets import clock, usd
from budgets.ledger import BILLED_RATE, Ledger
from launcher.backends.base import Backend, BackendError, ended_at
from launcher.runs import ACTIVE, LAUNCHING, JobRecord, RunRecord
from train.cli import EXIT_BUDGET

RESERVE_MARGIN = 1.25  # estimates err; a job may spend a quarter more than planned before it is stopped
STOP_MARGIN = 0.1  # the in-job guard fires this share of the reservation early (at most 60 s) ...
STOP_MARGIN_MAX_S = 60.0  # ... leaving time for the checkpoint upload before the money runs out
# ... and at least this much: the step in progress, its checkpoint and the process's exit take seconds
# however small the reservation
STOP_MARGIN_MIN_S = 2.0
# the hard stop: this long before the reservation's end the job is ended whatever it is doing (the
# runner kills it; `python -m train` exits), leaving the exit and the backend's record of it the time
STOP_SLACK_S = 1.0
RATE_SOURCE = {"snapshot": "snapshot", "live": "live", "local": "local"}


def utcnow() -> datetime:
    return clock.now()


class Money:
    """Budget hooks for the conductor (see the module docstring)."""

    def __init__(
        self,
        ledger: Ledger,
        rec: RunRecord,
        backend: Backend,
        *,
        poll_s: float,
        clock: Callable[[], datetime] = utcnow,
        owner: str | None = None,
    ) -> None:
        self.ledger, self.rec, self.backend = ledger, rec, backend
        self.poll_s, self.clock, self.owner = poll_s, clock, owner
        self.stopped_by: str | None = None
        self._billing_from: dict[str, datetime] = {}  # job -> start time given to the ledger

    # -- before launching --------------------------------------------------------------------------

    def reserve_plan(self) -> None:
        """Reserve every job's planned cost; all or nothing (BudgetExceeded names the cap)."""
        made: list[JobRecord] = []
        try:
            for job in self.rec.jobs.values():
                if job.reservation_id is None and job.state == "planned":
                    self._reserve(job)
                    made.append(job)
        except BaseException:
            for job in made:
                self.ledger.release(job.reservation_id, note="launch refused", owner=self.owner)
                job.reservation_id = None
            raise
        from launcher.crash import crash_point

        crash_point("reserving")  # reserved in the ledger, not yet in the run record
        self.rec.save()

    def _reserve(self, job: JobRecord, amount: float | None = None) -> None:
        plan_job = self.rec.plan.job(job.name)
        offer = job.offer
        job.reservation_id = self.ledger.reserve(
            self.rec.run_id,
            job.name,
            round(plan_job.cost * RESERVE_MARGIN, 6) if amount is None else amount,
            provider=offer.provider,
            gpu=offer.gpu,
            gpu_count=offer.gpu_count,
            domains=job.domains,
            rate_per_hour=offer.price_hour,
            rate_source=RATE_SOURCE.get(offer.source, "snapshot"),
            launch_cap=self.rec.budget,
            now=self.clock(),
            owner=self.owner,
        )

    def before_launch(self, job: JobRecord) -> None:
        """Give the (re)launch its in-job deadline; a job without money left is not launched."""
        if job.reservation_id is None:
            self._reserve(job)
        res = self.ledger.reservation(job.reservation_id)
        dearer = job.offer.price_hour > res.rate_per_hour + 1e-12
        # a relaunch (after a preemption) runs on what an earlier launch left of its reservation; one
        # no launch used yet is the plan's whole cost (a recovered job's: its record keeps the earlier
        # launches), which `_cover`'s rounder figure could find short and replace
        relaunch = job.launches > 0 and (res.started_at is not None or res.accrued > 0)
        if (dearer or relaunch) and not self._cover(job, res):
            return
        res = self.ledger.reservation(job.reservation_id)
        left = res.amount - res.accrued
        job.stop_at = job.stop_hard_at = None
        if res.rate_per_hour > 0:
            seconds = left / res.rate_per_hour * 3600
            if seconds <= STOP_MARGIN_MIN_S:  # not even the time to stop cleanly: no launch
                job.state = "STOPPED-BUDGET"
                job.note("not launched: its reservation is used up")
                self._settle(job, "stopped: budget (reservation used up)")
                return
            # from before the launch: billing starts when the backend starts the job, later than now
            now = utcnow()
            margin = min(max(seconds * STOP_MARGIN, STOP_MARGIN_MIN_S), STOP_MARGIN_MAX_S)
            job.stop_at = (now + timedelta(seconds=seconds - margin)).timestamp()
            job.stop_hard_at = (now + timedelta(seconds=seconds - STOP_SLACK_S)).timestamp()

    def _cover(self, job: JobRecord, res, *, placed: bool = False) -> bool:
        """A relaunch (after a preemption, or on a dearer offer: a fallback, a policy's on-demand): the
        job's planned hours at the offer's rate, x RESERVE_MARGIN, must be left.
        If not, the reservation is settled to what it accrued and a new one is made, which the caps
        check as any reservation; refused, the job is not launched (the caps win). False if refused."""
        from budgets import BudgetExceeded

        # the whole job's planned hours bound what a relaunch still needs (its unfinished domains, a
        # start-up, the work a preemption undid), with the margin on top
        want = round(self.rec.plan.job(job.name).hours * job.offer.price_hour * RESERVE_MARGIN, 6)
        if res.amount - res.accrued >= want:
            if res.started_at is None:
                self.ledger.set_rate(res.id, job.offer.price_hour, owner=self.owner)
            return True
        note = f"moved to {job.offer.label}"
        if placed:  # the backend has the machine already: the old reservation stays until a new one is made
            try:
                self._reserve(job, want)
            except BudgetExceeded:  # it runs on what was reserved, at the new rate; the watchdog stops it
                self.ledger.set_rate(res.id, job.offer.price_hour, owner=self.owner)
                return False
            self._close(res, note)
            self._billing_from.pop(job.name, None)
            return True
        self._close(res, note)
        job.reservation_id = None
        self._billing_from.pop(job.name, None)
        try:
            self._reserve(job, want)
        except BudgetExceeded as e:
            self.stopped_by = str(e)
            job.state = "STOPPED-BUDGET"
            job.note(f"not launched on {job.offer.label}: {e}")
            self.ledger.record_event(self.rec.run_id, "stopped-budget", job=job.name, detail=str(e))
            return False
        self._placed_event(job, f"reserved {usd(want)} for ")
        return True

    def _placed_event(self, job: JobRecord, prefix: str = "") -> None:
        self.ledger.record_event(
            self.rec.run_id,
            "placed",
            job=job.name,
            reservation_id=job.reservation_id,
            detail=f"{prefix}{job.offer.label} at {usd(job.offer.price_hour)}/h",
        )

    def _close(self, res, note: str) -> None:
        """End a reservation a new one replaces: what earlier launches spent stays spent."""
        if res.accrued > 0:
            self.ledger.settle(res.id, note=note, now=self.clock(), owner=self.owner)
        else:
            self.ledger.release(res.id, note=note, now=self.clock(), owner=self.owner)

    def placed(self, job: JobRecord) -> None:
        """The job runs on another of its offers than reserved for: it accrues at that offer's rate."""
        if job.reservation_id is None:
            return
        res = self.ledger.reservation(job.reservation_id)
        # this launch's machine is not billed yet: the job has no start, and its reservation either
        # never started or started for an earlier launch
        not_billed = job.started_at is None and (res.started_at is None or job.launches > 1)
        if not_billed and job.offer.price_hour > res.rate_per_hour + 1e-12:
            self._cover(job, res, placed=True)  # a dearer fallback before billing began: reserve for it
            return
        # from its machine's creation: the placement is learnt a poll or more after it
        self.ledger.set_rate(
            job.reservation_id, job.offer.price_hour, since=job.machine_since, owner=self.owner
        )
        self._placed_event(job)

    def billed(self, job: JobRecord) -> None:
        """The provider reports what it bills for the job's machine (`job.billed_hour`): the reservation
        accrues at that rate from now on, the ledger records it beside the planned one, and a rate past
        the offer's planned price x RESERVE_MARGIN (what the reservation was sized with) stops the job
        now: its reservation could not pay for the planned hours."""
        if job.reservation_id is None or job.billed_hour is None:
            return
        planned, billed = job.offer.price_hour, job.billed_hour
        self._start_billing(job)  # (the rate is learnt with the machine's start, before after_poll)
        self.ledger.set_rate(job.reservation_id, billed, since=job.machine_since, owner=self.owner)
        self.ledger.record_event(
            self.rec.run_id,
            BILLED_RATE,
            job=job.name,
            reservation_id=job.reservation_id,
            detail=json.dumps({"planned_hour": planned, "billed_hour": billed}),
        )
        if billed > planned * RESERVE_MARGIN + 1e-9:
            reason = (
                f"{job.offer.provider} bills {usd(billed)}/h for its machine, over the planned "
                f"{usd(planned)}/h x {RESERVE_MARGIN} its reservation allows"
            )
            self._stop([job], reason, self.clock())

    def launch_failed(self, job: JobRecord) -> None:
        """The backend did not start the job: its money goes back (what earlier launches spent stays)."""
        if job.reservation_id is None:
            return
        res = self.ledger.reservation(job.reservation_id)
        if res.accrued > 0:
            self._settle(job, "stopped: launch failed")
        else:
            self.ledger.release(job.reservation_id, note="launch failed", owner=self.owner)

    # -- every poll --------------------------------------------------------------------------------

    def after_poll(self, rec: RunRecord) -> None:
        now = self.clock()
        for job in rec.jobs.values():
            if job.reservation_id is None:
                continue
            self._start_billing(job)
            if job.state in ACTIVE and job.started_at is not None:
                self.ledger.accrue_until(job.reservation_id, now)
            elif job.state == "planned" and job.ended_at is not None:  # preempted, waiting to relaunch
                self.ledger.accrue_until(job.reservation_id, min(job.ended_at, now))
                stopped_itself = job.exit_code == EXIT_BUDGET  # its budget guard (a policy relaunches it)
                if self._billing_from.pop(job.name, None) is not None and not stopped_itself:
                    self.ledger.record_event(
                        rec.run_id, "preempted", job=job.name, reservation_id=job.reservation_id
                    )
            elif job.state == "NO-MACHINE" and job.started_at is None:
                res = self.ledger.reservation(job.reservation_id)
                if res.state == "open" and res.accrued == 0:
                    self.ledger.release(job.reservation_id, note="no machine: no capacity", owner=self.owner)
                elif res.state == "open":  # an earlier launch of the job ran: what it spent stays
                    self._settle(job, "stopped: no machine for a relaunch")
            elif job.state == "LOST":
                res = self.ledger.reservation(job.reservation_id)
                if res.state == "open":
                    self.ledger.settle(
                        job.reservation_id, res.amount, note=_note(job), now=now, owner=self.owner
                    )
            elif job.state not in ACTIVE and job.state not in ("planned", LAUNCHING):
                if job.ended_at is not None:
                    self.ledger.accrue_until(job.reservation_id, min(job.ended_at, now))
                self._settle(job, _note(job))
        self._watchdog(rec, now)

    def _start_billing(self, job: JobRecord) -> None:
        """Billing of the current launch starts in the ledger when the backend says the machine was up."""
        if job.started_at is not None and self._billing_from.get(job.name) != job.started_at:
            self.ledger.start(job.reservation_id, job.started_at)
            self._billing_from[job.name] = job.started_at

    def close_unlaunched(self, rec: RunRecord, why: str) -> list[str]:
        """Following ends early (Ctrl-C, SIGTERM, a conductor that gave up): the jobs that are not
        running (never launched, or waiting to be relaunched) give their money back now, not at the
        next launch: released, or settled to what earlier launches accrued. Returns their names."""
        closed = []
        for job in rec.jobs.values():
            if job.reservation_id is None or job.state not in ("planned", LAUNCHING):
                continue
            res = self.ledger.reservation(job.reservation_id)
            if res.state != "open":
                continue
            if res.accrued > 0:
                self.ledger.settle(res.id, note=f"stopped: {why}", now=self.clock(), owner=self.owner)
            else:
                self.ledger.release(res.id, note=f"not launched: {why}", now=self.clock(), owner=self.owner)
            job.reservation_id = None  # a later launch reserves anew
            job.note(f"{why}: its reservation is given back")
            closed.append(job.name)
        if closed:
            rec.save()
        return closed

    def _watchdog(self, rec: RunRecord, now: datetime) -> None:
        running = [j for j in rec.jobs.values() if j.state in ACTIVE and j.started_at and j.reservation_id]
        if not running:
            return
        rate = sum(j.rate_hour for j in running)
        ahead = rate * self.poll_s / 3600  # what the running jobs cost until the next check
        reason = None
        for w in self.ledger.window_status(now):
            if w.cap is not None and w.spent + ahead > w.cap + 1e-9:
                reason = f"{w.name} cap {usd(w.cap)} (spent {usd(w.spent)})"
                break
        if reason is None and rec.budget is not None:
            spent = sum(
                self.ledger.reservation(j.reservation_id).accrued
                for j in rec.jobs.values()
                if j.reservation_id
            )
            if spent + ahead > rec.budget + 1e-9:
                reason = f"--budget {usd(rec.budget)} (spent {usd(spent)})"
        if reason is None:
            for j in running:
                res = self.ledger.reservation(j.reservation_id)
                if res.accrued + j.rate_hour * self.poll_s / 3600 > res.amount + 1e-9:
                    self._stop([j], f"its reservation {usd(res.amount)} (spent {usd(res.accrued)})", now)
            return
        self._stop(running, reason, now)

    def _stop(self, jobs: list[JobRecord], reason: str, now: datetime) -> None:
        self.stopped_by = reason
        for job in jobs:
            try:
                self.backend.cancel(job.handle)
            except BackendError as e:
                job.note(f"cancel failed: {e}")
        for job in jobs:  # every cancel asked first: their machines are torn down side by side
            # billed until it stopped: the backend's end time once it reports it (a SkyPilot machine until
            # its teardown; the in-job hard stop ends a job at its reservation's end at the latest), else now
            job.state, job.ended_at = "STOPPED-BUDGET", ended_at(self.backend, job.handle) or now
            job.note(f"stopped: budget: {reason}; checkpoints kept, a later launch resumes")
            self.ledger.accrue_until(job.reservation_id, job.ended_at)
            self._settle(job, f"stopped: budget: {reason}")
            self.ledger.record_event(self.rec.run_id, "stopped-budget", job=job.name, detail=reason)
        self.rec.save()


    def _settle(self, job: JobRecord, note: str | None) -> None:
        res = self.ledger.reservation(job.reservation_id)
        if res.state == "open":
            self.ledger.settle(
                job.reservation_id, ended_at=job.ended_at, note=note, now=self.clock(), owner=self.owner
            )


def _note(job: JobRecord) -> str | None:
    return {
        "SUCCEEDED": None,
        "STOPPED-BUDGET": "stopped: budget (in-job guard)",
        "CANCELLED": "stopped: cancelled",
        "GAVE-UP": "stopped: recovery cap reached",
        "FAILED": "stopped: failed",
        "LOST": "stopped: lost track of the job; settled to its whole reservation",
    }.get(job.state, f"stopped: {job.state.lower()}")


def settle_stale(
    ledger: Ledger,
    run_id: str,
    backend: Backend,
    rec: RunRecord | None,
    owner: str | None = None,
    only: set[int] | None = None,
) -> list[int]:
    """Settle the reservations of `run_id` that a launcher which died left open: from the backend's
    start and end times where the job ran, released where it never launched. Returns their ids.
    The caller holds the run's lease (`owner`) and has resolved LAUNCHING jobs (launch.adopt).
    `only`: these reservation ids and no others (`meetara cancel JOB`)."""
    jobs = {j.reservation_id: j for j in (rec.jobs.values() if rec else []) if j.reservation_id}
    closed = []
    for res in ledger.open_reservations(run_id):
        if only is not None and res.id not in only:
            continue
        job = jobs.get(res.id)
        if job is None or job.handle is None:
            ledger.release(res.id, note="never launched (launcher stopped first)", owner=owner)
            closed.append(res.id)
            continue
        try:
            st = backend.status(job.handle)
        except BackendError:
            ledger.settle(
                res.id, note="stopped: the backend forgot the job; settled to what was accrued", owner=owner
            )
            closed.append(res.id)
            continue
        if not st.state.finished:
            continue  # still running: the launcher that follows it will settle it
        if st.started_at is not None:
            if res.started_at is None or res.started_at < st.started_at:
                ledger.start(res.id, st.started_at)
            ledger.accrue_until(res.id, st.ended_at or utcnow())
        note = "stopped: budget (in-job guard)" if st.exit_code == 77 else None
        if st.state.value != "SUCCEEDED" and note is None:
            note = f"stopped: {st.state.value.lower()} while no launcher watched"
        ledger.settle(res.id, ended_at=st.ended_at, note=note, owner=owner)
        job.state = "STOPPED-BUDGET" if st.exit_code == 77 else st.state.value
        if job.ended_at is None:  # no launcher saw this launch end: its machine time counts here
            job.started_at = job.started_at or st.started_at
            job.end_launch(st.ended_at or utcnow())
        job.exit_code = st.exit_code
        job.note(f"settled after the launcher stopped: {note or 'finished'}")
        closed.append(res.id)
    if rec is not None and closed:
        rec.save()
    return closed
