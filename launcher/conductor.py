"""The conductor: launch a run's jobs, follow them, recover preempted ones, pull finished domains.

It is a loop over the run record: launch planned jobs up to the backend's parallelism, poll each
active job's state, relaunch a preempted job (on its next offer, within the recovery cap) from its
checkpoints, pull each domain as soon as its manifest is in the store. A status call that fails is
counted and retried on the next poll, never taken for a preemption.
"""

from __future__ import annotations

import random
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from launcher.backends.base import Backend, JobState, JobStatus
from launcher.pull import PullResult, pull_domain
from launcher.runs import ACTIVE, JobRecord, RunRecord
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
    _suspect: dict[str, int] = field(default_factory=dict)

    def done_domains(self) -> set[str]:
        prefix = f"runs/{self.rec.run_id}/domains/"
        return {
            k[len(prefix) :].split("/", 1)[0]
            for k in self.store.list(prefix.rstrip("/"))
            if k.endswith(f"/{MANIFEST}")
        }

    def run(self) -> RunRecord:
        """Until every job is finished (or `stop` is set): launch, poll, recover, pull."""
        while not self.stop.is_set():
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
            if not any(j.state in ACTIVE or j.state == "planned" for j in self.rec.jobs.values()):
                break
            self.stop.wait(self.poll_s)
        return self.rec

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
            self.hooks.before_launch(job)
            if job.state != "planned":  # a hook may refuse the launch (budget)
                continue
            job.handle = self.backend.launch(self.task_for(job), job.name)
            job.launches += 1
            job.state, job.started_at, job.ended_at, job.exit_code = "PENDING", None, None, None
            job.note(f"launched on {job.offer.label} as {job.handle}")
            running += 1
            self.rec.save()

    def _poll(self, job: JobRecord) -> None:
        try:
            st = self.backend.status(job.handle)
        except Exception as e:  # a flaky status call is not a preemption: try again next poll
            job.status_errors += 1
            job.note(f"status call failed ({type(e).__name__}); retrying next poll")
            return
        if st.started_at and job.started_at is None:
            job.started_at = st.started_at
        if not st.state.finished:
            self._suspect.pop(job.handle, None)
            job.state = st.state.value
            if st.state is JobState.RUNNING:
                self._account_resume(job)
                self._maybe_inject(job)
            return
        if st.state is JobState.PREEMPTED:
            # a status that says "lost" once may be a flap of the backend: act on a confirmed loss only
            seen = self._suspect[job.handle] = self._suspect.get(job.handle, 0) + 1
            if seen < self.confirm_polls:
                return
        self._finish(job, st)

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
        p["recovery_seconds"] = round((datetime.now(UTC) - gone).total_seconds(), 2)
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

    def _finish(self, job: JobRecord, st: JobStatus) -> None:
        job.ended_at = st.ended_at or datetime.now(UTC)
        job.exit_code = st.exit_code
        if job.started_at:
            job.run_seconds += max((job.ended_at - job.started_at).total_seconds(), 0.0)
        if st.exit_code == EXIT_BUDGET:
            job.state = "STOPPED-BUDGET"
            job.note("stopped itself: its reservation ran out (checkpoints kept; a new launch resumes)")
            return
        if st.state is not JobState.PREEMPTED:
            job.state = st.state.value
            job.note(f"{st.state.value.lower()} (exit code {st.exit_code})")
            return
        job.preemptions += 1
        seen = last_step(self.backend.logs(job.handle, tail=400)) if job.handle else None
        job.preemption_log.append(
            {
                "at": job.ended_at.isoformat(),
                "domain": seen[0] if seen else None,
                "killed_at_step": seen[1] if seen else None,
                "s_per_step": seen[2] if seen else None,
                "resumed_from_step": None,
            }
        )
        if job.preemptions > self.max_recoveries:
            job.state = "GAVE-UP"
            job.note(f"preempted; recovery cap of {self.max_recoveries} reached, not relaunching")
            return
        # the next launch resumes from the checkpoints; on the next offer, since this one was taken away
        if job.offer_index + 1 < len(job.offers):
            job.offer_index += 1
        job.state, job.started_at = "planned", None
        job.note(
            f"preempted ({st.detail or 'machine lost'}); "
            f"relaunching ({job.preemptions}/{self.max_recoveries})"
        )

    def _pull(self, done: set[str]) -> None:
        for d in sorted(done - set(self.rec.pulled)):
            if d not in {x for j in self.rec.jobs.values() for x in j.domains}:
                continue
            if d in self.results and self.results[d].status == "error":
                continue  # a refused download is reported once; `meetara pull` retries it
            r = pull_domain(self.store, self.rec.run_id, d, Path(self.rec.models_dir))
            self.results[d] = r
            if r.status in ("pulled", "up-to-date"):
                self.rec.pulled.append(d)
            self.hooks.pulled(r)

    def cancel_all(self, why: str) -> list[str]:
        """Cancel every active job (training checkpoints first); returns their names."""
        names = []
        for job in self.rec.jobs.values():
            if job.state in ACTIVE and job.handle:
                self.backend.cancel(job.handle)
                job.state, job.ended_at = "CANCELLED", datetime.now(UTC)
                if job.started_at:
                    job.run_seconds += (job.ended_at - job.started_at).total_seconds()
                job.note(f"cancelled: {why}")
                names.append(job.name)
        self.rec.save()
        return names
