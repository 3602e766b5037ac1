"""The conductor: launch a run's jobs, follow them, recover preempted ones, pull finished domains.

It is a loop over the run record: launch planned jobs up to the backend's parallelism, poll each
active job's state, relaunch a preempted job (on its next offer, within the recovery cap) from its
checkpoints, pull each domain as soon as its manifest is in the store. A status call that fails is
counted and retried on the next poll, never taken for a preemption.

Intent before action: a launch is recorded (state LAUNCHING, its `launch_name`) before the backend is
asked to start it, so a launcher that dies at any point leaves a record the next one resolves by name
(launch.adopt): no job runs unbilled, no domain trains twice.

Containment: nothing that goes wrong while following a run escapes the loop. A failed launch marks the
job FAILED and gives its reservation back; a pull that fails (full disk, corrupt manifest, refused
download) marks the domain in `rec.errors` and the run goes on; a store or status call that fails is
retried next poll. Anything else that fails `max_loop_errors` polls in a row ends following with a
ConductorError (one line); the caller then cancels the jobs and settles their money. A lost lease
(budgets.lease.LeaseLost) ends following at once and moves no money: another launcher owns the run.
"""

from __future__ import annotations

import logging
import random
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from budgets import clock, rate_change, usd
from budgets.lease import LeaseLost
from launcher.backends.base import Backend, JobState, JobStatus, ended_at
from launcher.crash import crash_point
from launcher.pull import PullResult, pull_domain
from launcher.runs import ACTIVE, LAUNCHING, JobRecord, RunRecord, cancel_requested
from train import first_line
from train.cli import EXIT_BUDGET
from train.pipeline import MANIFEST
from train.store import ObjectStore


@dataclass
class Hooks:
    """Progress callbacks (the CLI draws them; tests record them)."""

    job: Callable[[JobRecord, int], None] = lambda job, domains_done: None
    pulled: Callable[[PullResult], None] = lambda result: None
    # called before each launch and after each poll; budgets use them (reserve / accrue / stop)
    before_launch: Callable[[JobRecord], None] = lambda job: None
    after_poll: Callable[[RunRecord], None] = lambda rec: None
    launch_failed: Callable[[JobRecord], None] = lambda job: None  # gives the job's money back
    placed: Callable[[JobRecord], None] = lambda job: None  # the backend ran it on another of its offers
    billed: Callable[[JobRecord], None] = lambda job: None  # the provider reported the machine's $/h


class ConductorError(RuntimeError):
    """Following the run failed repeatedly; the message is one line."""


log = logging.getLogger("meetara.conductor")


STEP_LINE = re.compile(r"^(\S+): step (\d+)/(\d+) loss \S+(?: \(([\d.]+) s/step\))?", re.M)


def last_step(log: str) -> tuple[str, int, float | None] | None:
    """The last training step a job's log shows: (domain, step, seconds per step)."""
    found = STEP_LINE.findall(log)
    if not found:
        return None
    domain, step, _, sps = found[-1]
    rates = [float(r) for _, _, _, r in found if r]
    return domain, int(step), (float(sps) if sps else (rates[-1] if rates else None))


def first_step(log: str) -> tuple[str, int] | None:
    found = STEP_LINE.search(log)
    return (found.group(1), int(found.group(2))) if found else None


@dataclass
class Chaos:
    """Injected preemptions (local backend): once a launch shows training steps in its log, SIGKILL
    its process group after a seeded random delay in [0, every_s) seconds; at most `max_kills`."""

    every_s: float
    seed: int = 0
    max_kills: int = 3
    kills: int = 0
    rng: random.Random = field(init=False)
    due: dict[str, float] = field(default_factory=dict)  # handle -> monotonic time to kill

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


@dataclass
class Conductor:
    rec: RunRecord
    backend: Backend
    store: ObjectStore
    task_for: Callable[[JobRecord], dict]
    max_recoveries: int = 3
    poll_s: float = 2.0
    hooks: Hooks = field(default_factory=Hooks)
    stop: threading.Event = field(default_factory=threading.Event)
    results: dict[str, PullResult] = field(default_factory=dict)
    chaos: Chaos | None = None
    money: object | None = None  # launcher.money.Money when budgets are enforced (set by conductor_for)
    confirm_polls: int = 2  # a lost job must look lost this many polls in a row before it is relaunched
    lease: object | None = None  # budgets.lease.Holder of the run: following stops when it is lost
    max_loop_errors: int = 5  # polls in a row that fail unexpectedly before following is given up
    max_status_errors: int = 60  # status calls in a row that fail before a job is given up as LOST
    max_start_s: float | None = None  # a launch with no machine this long is cancelled (NO-MACHINE)
    _status_failures: dict[str, int] = field(default_factory=dict)
    _suspect: dict[str, int] = field(default_factory=dict)
    _done: set[str] = field(default_factory=set)
    _log_read: dict[str, float] = field(default_factory=dict)  # job -> when its log was last read
    # chooses the offer of each (re)launch (launcher/policies.py); None: the planned order, moving to the
    # next offer after a preemption (greedy)
    policy: object | None = None

    def done_domains(self) -> set[str]:
        """Domains with a manifest in the store; the last answer when the store cannot be listed."""
        prefix = f"runs/{self.rec.run_id}/domains/"
        try:
            self._done = {
                k[len(prefix) :].split("/", 1)[0]
                for k in self.store.list(prefix.rstrip("/"))
                if k.endswith(f"/{MANIFEST}")
            }
        except Exception as e:  # the store is down for a moment: jobs go on; ask again next poll
            log.warning("listing %s failed (%s); retrying next poll", self.store.url, first_line(e))
        return self._done

    def run(self) -> RunRecord:
        """Until every job is finished (or `stop` is set): launch, poll, recover, pull.

        Raises LeaseLost (another launcher took the run over) or ConductorError (see the module doc)."""
        failures = 0
        while not self.stop.is_set():
            if self.lease is not None and self.lease.lost.is_set():
                raise LeaseLost(f"run {self.rec.run_id}: another launcher took the run over")
            try:
                finished = self._step()
                failures = 0
            except LeaseLost:
                raise
            except Exception as e:
                failures += 1
                log.debug("following run %s failed", self.rec.run_id, exc_info=True)
                if failures >= self.max_loop_errors:
                    raise ConductorError(
                        f"following run {self.rec.run_id} failed {failures} polls in a row: "
                        f"{type(e).__name__}: {first_line(e)}"
                    ) from None
                finished = False
            if finished:
                break
            clock.wait(self.stop, self.poll_s)
        return self.rec

    def _step(self) -> bool:
        """One poll: pull, launch, poll jobs, pull, account. True when no job is left to follow."""
        done = self.done_domains()
        self._pull(done)
        self._launch_planned(done)
        for job in self.rec.jobs.values():
            if job.state in ACTIVE:
                self._poll(job)
        self.rec.save()
        done = self.done_domains()
        self._pull(done)
        for job in self.rec.jobs.values():
            self.hooks.job(job, sum(d in done for d in job.domains))
        self.hooks.after_poll(self.rec)
        return not any(j.state in ACTIVE or j.state in ("planned", LAUNCHING) for j in self.rec.jobs.values())

    def _launch_planned(self, done: set[str]) -> None:
        running = sum(j.state in ACTIVE for j in self.rec.jobs.values())
        for job in self.rec.jobs.values():
            if job.state != "planned":
                continue
            if all(d in done for d in job.domains):
                job.state = "SUCCEEDED"
                job.note("all domains already in the store")
                continue
            if running >= self.backend.max_parallel:
                break
            if self.policy is not None:
                allowed = self.policy.choose(job, sum(d in done for d in job.domains), clock.now())
                job.allowed = list(allowed)
                if allowed[0] != job.offer_index:
                    job.offer_index = allowed[0]
                    job.note(f"policy {self.policy.name}: {job.offer.label}")
                    self.hooks.placed(job)  # the money follows the offer's rate
            self.hooks.before_launch(job)
            if job.state != "planned":  # a hook may refuse the launch (budget)
                continue
            # intent before action: the launch is on record, under its name, before it starts
            job.launch_name = f"{job.name}-{uuid.uuid4().hex[:8]}"  # job names start with the run id
            job.handle, job.state = None, LAUNCHING
            job.launches += 1
            job.first_launched_at = job.first_launched_at or clock.now()
            job.started_at, job.ended_at, job.exit_code = None, None, None
            job.billed_hour = job.machine_since = None  # a new machine: its provider reports its own rate
            job.launched_at = clock.now()
            self.rec.save()
            try:
                handle = self.backend.launch(self.task_for(job), job.launch_name)
            except Exception as e:
                job.state, job.ended_at = "FAILED", clock.now()
                job.note(f"launch failed: {type(e).__name__}: {first_line(e)}")
                self.hooks.launch_failed(job)
                self.rec.save()
                continue
            crash_point("launched")
            job.handle, job.state = handle, "PENDING"
            job.note(f"launched on {job.offer.label} as {job.handle}")
            running += 1
            self.rec.save()

    def _poll(self, job: JobRecord) -> None:
        try:
            st = self.backend.status(job.handle)
        except Exception as e:  # a flaky status call is not a preemption: try again next poll
            job.status_errors += 1
            failed = self._status_failures[job.handle] = self._status_failures.get(job.handle, 0) + 1
            job.note(f"status call failed ({type(e).__name__}: {first_line(e)}); retrying next poll")
            if failed >= self.max_status_errors:
                self._lose(job, failed)
            return
        self._status_failures.pop(job.handle, None)
        if st.machine_since is not None:
            job.machine_since = st.machine_since
        if st.placed is not None:
            self._follow_placement(job, st.placed)
        if st.started_at and job.started_at is None:
            job.started_at = st.started_at
        if st.billed_hour is not None and st.billed_hour != job.billed_hour:
            self._follow_billing(job, st.billed_hour)
            if job.state not in ACTIVE and job.state not in ("planned", LAUNCHING):
                return  # stopped: the provider bills past what the job may spend
        if st.recoveries > job.launch_recoveries:  # the backend recovered it itself (SkyPilot)
            job.launch_recoveries = st.recoveries
            job.note(f"the backend recovered it from a preemption ({job.recoveries}/{self.max_recoveries})")
        if job.recoveries > self.max_recoveries and not st.state.finished:
            self._give_up(job)
            return
        if not st.state.finished:
            self._suspect.pop(job.handle, None)
            if self._no_machine(job, st):
                return
            job.state = st.state.value
            if st.state is JobState.RUNNING:
                crash_point("running")
                try:  # reading logs is bookkeeping: a failure must not stop the following
                    self._account_resume(job)
                    self._maybe_inject(job)
                    self._read_activity(job)
                except Exception as e:
                    log.warning("%s: reading its log failed (%s)", job.name, first_line(e))
            return
        if st.state is JobState.PREEMPTED:
            # a status that says "lost" once may be a flap of the backend: act on a confirmed loss only
            seen = self._suspect[job.handle] = self._suspect.get(job.handle, 0) + 1
            if seen < self.confirm_polls:
                return
        self._finish(job, st)

    def _cancel(self, job: JobRecord) -> bool:
        """Ask the backend to cancel the job; a refusal is noted in its history (False)."""
        try:
            self.backend.cancel(job.handle)
        except Exception as e:
            job.note(f"cancel failed: {type(e).__name__}: {first_line(e)}")
            return False
        return True

    def _lose(self, job: JobRecord, failed: int) -> None:
        """The backend cannot say what became of the job: stop following it. It is cancelled if the
        backend still takes that; its money is settled to its whole reservation (the most it can
        spend: the in-job deadline stops it there)."""
        self._cancel(job)
        job.state, job.ended_at = "LOST", None
        job.note(f"lost: {failed} status calls in a row failed; settled to its whole reservation")

    def _read_activity(self, job: JobRecord) -> None:
        """The job's last log line as its `activity` (setup, a domain starting, a training step), at most
        every `backend.log_poll_s`: what progress shows while no domain has finished yet."""
        now = time.monotonic()
        if now - self._log_read.get(job.name, -1e9) < getattr(self.backend, "log_poll_s", 30.0):
            return
        self._log_read[job.name] = now
        lines = [line.strip() for line in self.backend.logs(job.handle, tail=5).splitlines() if line.strip()]
        if lines:
            job.activity = lines[-1][:100]

    def _account_resume(self, job: JobRecord) -> None:
        """After a relaunch: how many steps the preemption cost (its last logged step minus the step
        the new launch resumed from), from the two launches' logs."""
        pending = [p for p in job.preemption_log if p.get("resumed_from_step") is None and p.get("domain")]
        if not pending:
            return
        p = pending[-1]
        first = first_step(self.backend.logs(job.handle, tail=400))
        if first is None:
            return
        domain, step = first
        resumed = step - 1 if domain == p["domain"] else p["killed_at_step"]
        p["resumed_from_step"] = resumed
        p["lost_steps"] = max(p["killed_at_step"] - resumed, 0)
        p["lost_seconds"] = round(p["lost_steps"] * (p.get("s_per_step") or 0.0), 3)
        # from the machine going away to training again (within a poll interval at either end)
        gone = datetime.fromisoformat(p["at"])
        p["recovery_seconds"] = round((clock.now() - gone).total_seconds(), 2)
        if domain == p["domain"]:
            job.note(f"resumed {domain} from step {resumed}: {p['lost_steps']} step(s) recomputed")
        else:
            job.note(f"{p['domain']} was finished when preempted; went on with {domain}")

    def _maybe_inject(self, job: JobRecord) -> None:
        chaos = self.chaos
        if chaos is None or chaos.kills >= chaos.max_kills or not hasattr(self.backend, "signal"):
            return
        import time

        if job.handle not in chaos.due:
            if last_step(self.backend.logs(job.handle, tail=50)) is None:
                return  # not training yet: preempt during training, where it costs work
            chaos.due[job.handle] = time.monotonic() + chaos.rng.uniform(0, chaos.every_s)
        if time.monotonic() >= chaos.due[job.handle] and self.backend.signal(job.handle, signal.SIGKILL):
            chaos.kills += 1
            job.note(f"injected preemption {chaos.kills}/{chaos.max_kills} (SIGKILL)")

    def _follow_placement(self, job: JobRecord, placed: tuple) -> None:
        """The backend chose the machine among the job's offers (SkyPilot's ordered failover after "no
        capacity"): the record, and the money (its rate), follow the offer it really runs on."""
        from launcher.skycatalog import placed_index

        idx = placed_index(job.offers, placed)
        if idx is None:
            note = f"placed on a machine outside its offers: {placed}"
            if not job.history or not job.history[-1].endswith(note):
                job.note(note)
            return
        if idx == job.offer_index:
            return
        before = job.offer
        job.offer_index = idx
        job.billed_hour = None  # another machine: its provider reports its own rate
        job.note(
            f"placed on {job.offer.label} at {usd(job.offer.price_hour)}/h (offer {idx + 1} of "
            f"{len(job.offers)}; planned {before.label} had no capacity)"
        )
        self.hooks.placed(job)

    def _follow_billing(self, job: JobRecord, billed: float) -> None:
        """The provider reports what it bills for the launch's machine: the record and the money follow
        it (Money.billed stops the job when it is past what the job's reservation allows)."""
        planned = job.offer.price_hour
        job.billed_hour = billed
        diff = rate_change(planned, billed)
        job.note(
            f"{job.offer.provider} bills {usd(billed)}/h for its machine (planned {usd(planned)}/h, {diff})"
        )
        self.hooks.billed(job)

    def _no_machine(self, job: JobRecord, st: JobStatus) -> bool:
        """A launch still waiting for a machine past `max_start_s` (SkyPilot retries "no capacity" on
        every offer of the task forever), or whose machine the provider created but that never ran the
        job: cancel it. A launch that never had a machine releases its reservation; one whose machine
        was billed (the backend gave it a start) pays for its minutes. True if so. Under a deadline-aware
        policy (launcher/policies.py) the wait for a machine is the policy's, and the launch goes back to
        it ("planned") instead of ending as NO-MACHINE."""
        billed = st.started_at is not None
        waiting = st.state is JobState.PENDING and job.launched_at is not None
        limit = self.max_start_s
        requeue = self.policy is not None and self.policy.requeues() and not billed
        if requeue and waiting:  # how long the policy can afford to wait for these offers
            done = sum(d in self._done for d in job.domains)
            limit = self.policy.max_wait_s(job, done, clock.now(), limit)
            if job.stop_at is not None:
                # the in-job budget guard counts from the launch: a machine that starts late would have
                # little of it left, so a long wait is cut into launches that each get their own
                budget_s = job.stop_at - job.launched_at.timestamp()
                limit = min(limit if limit is not None else float("inf"), max(budget_s / 4, 60.0))
        if limit is None or not waiting:
            return False
        waited = (clock.now() - job.launched_at).total_seconds()
        if waited < limit or not self._cancel(job):
            return False
        if requeue:
            job.state, job.ended_at = "planned", None  # the policy chooses again (on-demand, say)
            job.note(f"no machine after {waited / 60:.1f} min: policy {self.policy.name} chooses again")
            return True
        offers = len(job.offers) - job.offer_index
        if billed:  # its minutes are paid up to its teardown (Money.after_poll)
            job.state, job.ended_at = "NO-MACHINE", self._ended(job.handle)
            job.note(
                f"no machine after {waited / 60:.1f} min: {job.offer.provider} created one that never ran "
                f"the job ({st.detail or 'pending'}); cancelled, its minutes paid"
            )
            return True
        job.state, job.ended_at = "NO-MACHINE", None
        job.note(
            f"no machine after {waited / 60:.1f} min on any of its {offers} offer(s) "
            f"({st.detail or 'pending'}): cancelled before it ran"
        )
        return True

    def _give_up(self, job: JobRecord) -> None:
        """Past the recovery cap while the backend keeps recovering it: cancel it (it checkpoints)."""
        if not self._cancel(job):
            return  # tried again next poll
        job.end_launch(self._ended(job.handle))
        job.state = "GAVE-UP"
        job.note(f"recovered {job.recoveries} times, over the cap of {self.max_recoveries}: cancelled")

    def _finish(self, job: JobRecord, st: JobStatus) -> None:
        # the backend's own recoveries of this launch now count with the earlier ones
        job.backend_recoveries += job.launch_recoveries
        job.launch_recoveries = 0
        job.end_launch(st.ended_at or clock.now())
        job.exit_code = st.exit_code
        if st.exit_code == EXIT_BUDGET and self.policy is not None and self.policy.requeues():
            # a deadline-aware run: its next launch asks for a new reservation (the caps decide)
            job.state, job.started_at = "planned", None
            job.note("stopped itself at its reservation's end (checkpoints kept): relaunching")
            return
        if st.exit_code == EXIT_BUDGET:
            job.state = "STOPPED-BUDGET"
            job.note("stopped itself: its reservation ran out (checkpoints kept; a new launch resumes)")
            return
        if st.state is JobState.PREEMPTED and job.handle in cancel_requested(self.rec.run_id):
            # a user's cancel, however the backend ended it (SkyPilot: FAILED_CONTROLLER): never relaunched
            job.state = JobState.CANCELLED.value
            job.note(f"cancelled by a user ({st.detail or 'ended'}): not relaunched")
            return
        if st.state is not JobState.PREEMPTED:
            job.state = st.state.value
            # a job that never ran its command (exit code unknown) ended for the backend's reason
            why = f": {st.detail}" if st.exit_code is None and st.detail else ""
            job.note(f"{st.state.value.lower()} (exit code {st.exit_code}){why}")
            return
        job.preemptions += 1
        try:
            seen = last_step(self.backend.logs(job.handle, tail=400)) if job.handle else None
        except Exception:  # the log went with the machine: the preemption is counted without it
            seen = None
        job.preemption_log.append(
            {
                "at": job.ended_at.isoformat(),
                "domain": seen[0] if seen else None,
                "killed_at_step": seen[1] if seen else None,
                "s_per_step": seen[2] if seen else None,
                "resumed_from_step": None,
            }
        )
        if job.recoveries > self.max_recoveries:
            job.state = "GAVE-UP"
            job.note(f"preempted; recovery cap of {self.max_recoveries} reached, not relaunching")
            return
        # the next launch resumes from the checkpoints; on the next offer, since this one was taken away
        if job.offer_index + 1 < len(job.offers):
            job.offer_index += 1
        job.state, job.started_at = "planned", None
        job.note(
            f"preempted ({st.detail or 'machine lost'}); relaunching ({job.recoveries}/{self.max_recoveries})"
        )

    def _pull(self, done: set[str]) -> None:
        for d in sorted(done - set(self.rec.pulled)):
            if d not in {x for j in self.rec.jobs.values() for x in j.domains}:
                continue
            if d in self.results and self.results[d].status == "error":
                continue  # a refused download is reported once; `meetara pull` retries it
            crash_point("pulling")
            try:
                r = pull_domain(self.store, self.rec.run_id, d, Path(self.rec.models_dir))
            except Exception as e:  # full disk, corrupt manifest, store down: this domain only
                r = PullResult(d, "error", detail=f"{type(e).__name__}: {first_line(e)}")
            self.results[d] = r
            if r.status in ("pulled", "up-to-date"):
                self.rec.pulled.append(d)
                self.rec.errors.pop(d, None)
            elif r.status == "error":
                self.rec.errors[d] = r.detail
            self.hooks.pulled(r)

    def _ended(self, handle: str) -> datetime:
        """When a cancelled job stopped: the backend's time once it reports the end (a SkyPilot machine
        is billed until its teardown: waited for, up to `backend.teardown_s`), else now."""
        return ended_at(self.backend, handle) or clock.now()

    def cancel_all(self, why: str) -> list[str]:
        """Cancel every active job (training checkpoints first); returns their names. A job the backend
        could not cancel keeps its state (a later `recover` finds it); the failure is in its history."""
        names = []
        for job in self.rec.jobs.values():
            if job.state == LAUNCHING and job.launch_name and hasattr(self.backend, "find"):
                try:
                    job.handle = self.backend.find(job.launch_name)
                except Exception as e:
                    job.note(f"cancel: could not look the launch up ({first_line(e)})")
                    continue
                job.state = "PENDING" if job.handle else "planned"
            if job.state in ACTIVE and job.handle:
                if not self._cancel(job):
                    continue
                job.state = "CANCELLED"
                job.note(f"cancelled: {why}")
                names.append(job.name)
        for name in names:  # every cancel asked first: their machines are torn down side by side
            job = self.rec.jobs[name]
            job.end_launch(self._ended(job.handle))
        self.rec.save()
        return names
