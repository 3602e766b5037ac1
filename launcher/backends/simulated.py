"""A backend for `meetara simulate`: jobs that progress on a virtual clock over a replayed spot market.

It answers the conductor exactly as a real backend does (launch, status, cancel, logs; `placed` when it
chose among the job's offers, as SkyPilot's ordered failover does), so the real conductor and money code
run unchanged above it. A launch takes the first of its task's offers that is up (a spot offer whose
market is down waits, unbilled, as SkyPilot retries "no capacity"); the machine is billed from then on.
It spends `startup_s` starting, then trains the job's domains one after another at the planned time per
domain. Progress is kept at each domain's end (its manifest, written to the store as `python -m train`
does) and at each checkpoint (every `checkpoint_s` of training); a preemption loses the training since
the last checkpoint, a cancel or the in-job budget guard (`stop_at`, exit 77) checkpoints first.
Every moment something happens is scheduled on the clock, so the conductor's waits end right then.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from budgets.clock import VirtualClock
from launcher.backends.base import JobState, JobStatus
from launcher.market import Availability, offer_key
from train.cli import EXIT_BUDGET
from train.pipeline import MANIFEST, domain_prefix
from train.store import ObjectStore


@dataclass
class Progress:
    """A job's saved progress, across its launches (what its store holds)."""

    done: int = 0  # domains finished
    saved_s: float = 0.0  # training seconds of the current domain in its newest checkpoint
    redone_s: float = 0.0  # training seconds lost to preemptions (done again)
    preemptions: int = 0


@dataclass
class Launch:
    job: str
    offers: list  # OfferRefs, in the task's order
    stop_at: float | None  # Unix time of the in-job budget guard
    asked_at: float  # seconds since the replay's start
    machine_at: float | None = None
    offer: object | None = None
    end: tuple[str, float] | None = None  # (why, when) once known: preempted, budget, done, cancelled
    base: float = 0.0  # the job's training seconds done when this launch got its machine


@dataclass
class SimBackend:
    clock: VirtualClock
    market: Availability
    store: ObjectStore
    run_id: str
    domains: dict[str, list[str]]  # job -> its domains
    domain_s: dict[str, float]  # job -> training seconds per domain
    startup_s: float = 300.0
    checkpoint_s: float = 600.0
    name: str = "simulated"
    max_parallel: int = 10**6
    log_poll_s: float = math.inf
    teardown_s: float = 0.0  # a cancel ends the simulated machine at once (on the virtual clock)
    progress: dict[str, Progress] = field(default_factory=dict)
    launches: dict[str, Launch] = field(default_factory=dict)
    t0: datetime | None = None

    # -- time --------------------------------------------------------------------------------------

    def _t(self, when: datetime | None = None) -> float:
        self.t0 = self.t0 or self.clock.now()
        return ((when or self.clock.now()) - self.t0).total_seconds()

    def _at(self, t: float) -> datetime:
        return self.t0 + timedelta(seconds=t)

    def _wake(self, t: float) -> None:
        if math.isfinite(t):
            self.clock.wake_at(self._at(t))

    # -- the Backend interface ---------------------------------------------------------------------

    def launch(self, task: dict, name: str) -> str:
        now = self._t()
        launch = Launch(task["job"], list(task["offers"]), task.get("stop_at"), now)
        self.progress.setdefault(task["job"], Progress())
        self.launches[name] = launch
        self._place(launch, now)
        return name

    def status(self, handle: str) -> JobStatus:
        launch = self.launches[handle]
        now = self._t()
        self._advance(launch, now)
        if launch.machine_at is None:
            return JobStatus(JobState.PENDING, detail="no capacity on any offer yet")
        started, placed = self._at(launch.machine_at), _placed(launch.offer)
        if launch.end is None:
            return JobStatus(JobState.RUNNING, started, placed=placed)
        why, when = launch.end
        ended = self._at(when)
        if why == "preempted":
            return JobStatus(
                JobState.PREEMPTED, started, ended, detail="spot capacity reclaimed", placed=placed
            )
        if why == "budget":
            return JobStatus(JobState.FAILED, started, ended, exit_code=EXIT_BUDGET, placed=placed)
        if why == "cancelled":
            return JobStatus(JobState.CANCELLED, started, ended, exit_code=75, placed=placed)
        return JobStatus(JobState.SUCCEEDED, started, ended, exit_code=0, placed=placed)

    def cancel(self, handle: str) -> None:
        launch = self.launches[handle]
        now = self._t()
        self._advance(launch, now)
        if launch.end is None:
            if launch.machine_at is not None:
                self._checkpoint(launch, now)
            launch.end = ("cancelled", now)

    def logs(self, handle: str, tail: int = 50) -> str:
        launch = self.launches[handle]
        p = self.progress[launch.job]
        return f"[simulated] {launch.job}: {p.done}/{len(self.domains[launch.job])} domains\n"

    # -- the model ---------------------------------------------------------------------------------

    def _place(self, launch: Launch, now: float) -> None:
        """The first offer that is up now, else wait for the first to come up (SkyPilot's failover)."""
        ups = [(self.market.next_up(offer_key(o), now), i, o) for i, o in enumerate(launch.offers)]
        when, _, offer = min(ups, key=lambda x: (x[0], x[1]))
        if when <= now:
            launch.machine_at, launch.offer = now, offer
            self._schedule(launch)
        else:
            self._wake(when)

    def _schedule(self, launch: Launch) -> None:
        """Wake the clock at every moment this launch changes: its domains' ends and how it ends."""
        p, per = self.progress[launch.job], self.domain_s[launch.job]
        launch.base = p.done * per + p.saved_s
        start = launch.machine_at + self.startup_s
        for k in range(p.done + 1, len(self.domains[launch.job]) + 1):
            self._wake(start + k * per - launch.base)
        self._wake(self._ends(launch)[1])

    def _work(self, launch: Launch, t: float) -> float:
        """Training seconds of the whole job done by `t` in this launch (earlier launches' included)."""
        return launch.base + max(t - launch.machine_at - self.startup_s, 0.0)

    def _ends(self, launch: Launch) -> tuple[str, float]:
        n, per = len(self.domains[launch.job]), self.domain_s[launch.job]
        ends = [
            ("done", launch.machine_at + self.startup_s + n * per - launch.base),
            ("preempted", self.market.next_down(offer_key(launch.offer), launch.machine_at)),
        ]
        if launch.stop_at is not None:  # `python -m train` checks it once it runs: after the start-up
            guard = self._t(datetime.fromtimestamp(launch.stop_at, tz=self.t0.tzinfo))
            ends.append(("budget", max(guard, launch.machine_at + self.startup_s)))
        return min(ends, key=lambda e: e[1])

    def _advance(self, launch: Launch, now: float) -> None:
        if launch.end is not None:
            return
        if launch.machine_at is None:
            self._place(launch, now)
            if launch.machine_at is None:
                return
        why, when = self._ends(launch)
        self._train(launch, min(now, when))
        if when > now:
            return
        p = self.progress[launch.job]
        if why == "preempted" and p.done < len(self.domains[launch.job]):
            kept = math.floor(p.saved_s / self.checkpoint_s) * self.checkpoint_s  # the newest checkpoint
            kept = max(kept, launch.base - p.done * self.domain_s[launch.job])  # ... or where it resumed
            p.redone_s += p.saved_s - kept
            p.saved_s = kept
        if why == "preempted":
            p.preemptions += 1
        launch.end = (why, when)

    def _checkpoint(self, launch: Launch, when: float) -> None:
        """SIGTERM (a cancel): the step in progress is checkpointed, nothing is lost."""
        self._train(launch, when)

    def _train(self, launch: Launch, upto: float) -> None:
        """The job's progress at `upto`: manifests of the domains finished by then, the rest in training
        (`saved_s`, trimmed back to the newest checkpoint if the machine is lost)."""
        p, per, names = self.progress[launch.job], self.domain_s[launch.job], self.domains[launch.job]
        work = min(self._work(launch, upto), len(names) * per)
        while p.done < len(names) and work >= (p.done + 1) * per - 1e-9:
            self._manifest(names[p.done])
            p.done += 1
        p.saved_s = work - p.done * per if p.done < len(names) else 0.0

    def _manifest(self, domain: str) -> None:
        empty = {"key": f"{domain_prefix(self.run_id, 'base')}/empty", "size": 0, "sha256": _EMPTY_SHA}
        self.store.put(empty["key"], b"")
        adapter = {**empty, "key": f"{domain_prefix(self.run_id, domain)}/adapter.gguf"}
        self.store.put(adapter["key"], b"")  # an empty stand-in: the conductor pulls it as any file
        files = {"adapter": adapter}
        manifest = {"status": "done", "validation": {"passed": True}, "base_gguf": empty, "files": files}
        self.store.put(f"{domain_prefix(self.run_id, domain)}/{MANIFEST}", json.dumps(manifest).encode())


_EMPTY_SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _placed(offer) -> tuple:
    from launcher.skycatalog import sky_key

    return sky_key(offer)
