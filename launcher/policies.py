"""Spot policies: which of a job's offers each (re)launch asks for. The conductor calls `choose` before
every launch; the task then lists that offer first and the job's later offers as fallbacks.

- `on-demand`: never spot (its plan is made with the on-demand market only).
- `greedy`: today's behaviour: the planned (cheapest) offer, the next one after each preemption.
- `uniform-progress`: the rule of "Can't Be Late" (NSDI '24): spot while the job is on or ahead of the
  straight line from its start to the deadline, on-demand while behind it (or once the slack left is
  less than one restart).
- `meetara`: spot while the slack to the deadline covers what a preemption right now would cost (a
  restart, the work since the last checkpoint, a wait for capacity), on-demand once it does not; among
  spot offers the one with the lowest expected $/h once its preemption rate, measured on this run so
  far, is priced in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from launcher.runs import JobRecord

NAMES = ("on-demand", "greedy", "uniform-progress", "meetara")


@dataclass
class Timing:
    """What a policy knows of the run's shape: when it began and must end, and the planned times."""

    start: datetime
    deadline: datetime | None
    domain_s: dict[str, float]  # job -> seconds of training per domain
    startup_s: float
    checkpoint_s: float


def _first(job: JobRecord, spot: bool, start: int = 0) -> int | None:
    return next((i for i, o in enumerate(job.offers) if i >= start and o.spot == spot), None)


@dataclass
class Policy:
    timing: Timing
    name: str = "greedy"

    def choose(self, job: JobRecord, done: int, now: datetime) -> int:
        return job.offer_index

    def _left_s(self, job: JobRecord, done: int) -> float:
        """Seconds the job still needs on a machine, one start-up included."""
        return (len(job.domains) - done) * self.timing.domain_s[job.name] + self.timing.startup_s

    def _slack_s(self, job: JobRecord, done: int, now: datetime) -> float:
        if self.timing.deadline is None:
            return float("inf")
        return (self.timing.deadline - now).total_seconds() - self._left_s(job, done)


@dataclass
class OnDemand(Policy):
    name: str = "on-demand"

    def choose(self, job: JobRecord, done: int, now: datetime) -> int:
        found = _first(job, False)
        return job.offer_index if found is None else found


@dataclass
class UniformProgress(Policy):
    name: str = "uniform-progress"

    def choose(self, job: JobRecord, done: int, now: datetime) -> int:
        t = self.timing
        total = len(job.domains) * t.domain_s[job.name] + t.startup_s
        if t.deadline is None:
            return job.offer_index
        span = (t.deadline - t.start).total_seconds()
        expected = total * min((now - t.start).total_seconds() / span, 1.0) if span > 0 else total
        behind = total - self._left_s(job, done) + t.startup_s < expected
        restart = t.startup_s + t.checkpoint_s
        spot = _first(job, True)
        if behind or self._slack_s(job, done, now) < restart or spot is None:
            found = _first(job, False)
            return job.offer_index if found is None else found
        return spot


@dataclass
class Meetara(Policy):
    name: str = "meetara"
    # offer label -> (preemptions seen, seconds run) on this run
    seen: dict[str, list[float]] = field(default_factory=dict)
    _last: dict[str, tuple[str, int, datetime]] = field(default_factory=dict)

    def choose(self, job: JobRecord, done: int, now: datetime) -> int:
        self._learn(job, now)
        t = self.timing
        # a preemption right away would cost a restart, up to a checkpoint interval of work, and a wait
        risk = 2 * t.startup_s + t.checkpoint_s
        on_demand = _first(job, False)
        spots = [i for i, o in enumerate(job.offers) if o.spot]
        if on_demand is not None and (not spots or self._slack_s(job, done, now) < risk):
            choice = on_demand
        elif spots:
            choice = min(spots, key=lambda i: (self._expected_hour(job, i), i))
        else:
            choice = job.offer_index
        self._last[job.name] = (job.offers[choice].label, job.preemptions, now)
        return choice

    def _learn(self, job: JobRecord, now: datetime) -> None:
        """Charge the last launch's preemption (if it was preempted) and run time to its offer."""
        if job.name not in self._last:
            return
        label, preemptions, since = self._last.pop(job.name)
        stats = self.seen.setdefault(label, [0.0, 0.0])
        stats[0] += job.preemptions - preemptions
        stats[1] += max((now - since).total_seconds(), 0.0)

    def _expected_hour(self, job: JobRecord, i: int) -> float:
        """$/h with the measured preemption rate's cost: each preemption redoes a restart and half a
        checkpoint interval (a prior of one preemption per 10 hours until this run has measured it)."""
        o, t = job.offers[i], self.timing
        n, seconds = self.seen.get(o.label, [0.0, 0.0])
        rate_h = (n + 0.1) / (seconds / 3600 + 1.0)
        lost_h = (t.startup_s + t.checkpoint_s / 2) / 3600
        return o.price_hour * (1 + rate_h * lost_h)


def make_policy(name: str, timing: Timing) -> Policy:
    cls = {"on-demand": OnDemand, "greedy": Policy, "uniform-progress": UniformProgress, "meetara": Meetara}
    if name not in cls:
        from train import BadInput

        raise BadInput(f"unknown policy {name!r}; known: {', '.join(NAMES)}")
    return cls[name](timing)
