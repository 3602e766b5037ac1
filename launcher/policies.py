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
    max_recoveries: int = 3  # a preemption past this many ends the job (preferences)


def _spot(job: JobRecord) -> list[int]:
    return [i for i, o in enumerate(job.offers) if o.spot]


def _on_demand(job: JobRecord) -> list[int]:
    return [i for i, o in enumerate(job.offers) if not o.spot]


@dataclass
class Policy:
    """`greedy`: the planned order, from the conductor's current offer (it moves on after a
    preemption), every later offer a fallback; waits for a machine as long as the conductor does."""

    timing: Timing
    name: str = "greedy"

    def choose(self, job: JobRecord, done: int, now: datetime) -> list[int]:
        """The offers (indices into `job.offers`) this launch may use, first choice first."""
        return list(range(job.offer_index, len(job.offers)))

    def max_wait_s(self, job: JobRecord, done: int, now: datetime, default: float | None) -> float | None:
        """How long this launch may wait for a machine before the conductor asks `choose` again."""
        return default

    def requeues(self) -> bool:
        """Whether a launch that found no machine in time goes back to `choose` (deadline-aware
        policies), rather than ending as NO-MACHINE (the conductor's own rule)."""
        return self.timing.deadline is not None and self.name != "greedy"

    def _left_s(self, job: JobRecord, done: int) -> float:
        """Seconds the job still needs on a machine, one start-up included."""
        return (len(job.domains) - done) * self.timing.domain_s[job.name] + self.timing.startup_s

    def _slack_s(self, job: JobRecord, done: int, now: datetime) -> float:
        if self.timing.deadline is None:
            return float("inf")
        return (self.timing.deadline - now).total_seconds() - self._left_s(job, done)

    def _last_chance(self, job: JobRecord) -> bool:
        """One more preemption would pass the recovery cap and end the job: only on-demand is safe."""
        return job.recoveries >= self.timing.max_recoveries

    def _cheapest_on_demand(self, job: JobRecord) -> list[int]:
        return sorted(_on_demand(job), key=lambda i: (job.offers[i].price_hour, i))[:1]


@dataclass
class OnDemand(Policy):
    name: str = "on-demand"

    def choose(self, job: JobRecord, done: int, now: datetime) -> list[int]:
        return self._cheapest_on_demand(job) or super().choose(job, done, now)


@dataclass
class UniformProgress(Policy):
    """Spot (any spot offer, waiting for one) while on or ahead of the straight line to the deadline;
    on-demand once behind it or when less slack is left than one restart."""

    name: str = "uniform-progress"

    def _ahead_s(self, job: JobRecord, done: int, now: datetime) -> float:
        """Seconds until the job falls behind the straight line from start to deadline (<= 0: behind)."""
        t = self.timing
        total = len(job.domains) * t.domain_s[job.name] + t.startup_s
        span = (t.deadline - t.start).total_seconds()
        made = total - self._left_s(job, done) + t.startup_s  # whole domains done
        return made / total * span - (now - t.start).total_seconds() if total > 0 else span

    def choose(self, job: JobRecord, done: int, now: datetime) -> list[int]:
        t = self.timing
        if t.deadline is None:
            return super().choose(job, done, now)
        restart = t.startup_s + t.checkpoint_s
        on_demand = self._cheapest_on_demand(job)
        behind = self._ahead_s(job, done, now) <= 0 or self._slack_s(job, done, now) < restart
        if on_demand and (behind or self._last_chance(job)):
            return on_demand
        spots = sorted(_spot(job), key=lambda i: (job.offers[i].price_hour, i))
        return spots or super().choose(job, done, now)

    def max_wait_s(self, job: JobRecord, done: int, now: datetime, default: float | None) -> float | None:
        if self.timing.deadline is None or not job.offers[job.offer_index].spot:
            return default
        return max(self._ahead_s(job, done, now), 0.0)


@dataclass
class Meetara(Policy):
    """Three stages, by the slack to the deadline (time left minus the work left):

    1. While more than a quarter of the deadline's span (plus the risk below) is slack: only the
       cheapest spot offers (within 5 % of the best expected $/h), waiting for one to have capacity.
    2. While the slack covers the risk of a preemption right now (a restart and a checkpoint interval of
       work, twice over): any spot offer, cheapest expected $/h first.
    3. Then on-demand; also for the launch a preemption would end (the recovery cap).

    Expected $/h prices in each offer's preemption rate as measured on this run so far."""

    name: str = "meetara"
    # offer label -> [preemptions seen, seconds run] on this run
    seen: dict[str, list[float]] = field(default_factory=dict)
    _last: dict[str, tuple[str, int, datetime]] = field(default_factory=dict)

    def _risk_s(self) -> float:
        return 2 * (self.timing.startup_s + self.timing.checkpoint_s)

    def _patient_s(self) -> float:
        """Slack above which only the cheapest spot offers are worth waiting for (stage 1)."""
        t = self.timing
        return (t.deadline - t.start).total_seconds() / 4 + self._risk_s()

    def choose(self, job: JobRecord, done: int, now: datetime) -> list[int]:
        self._learn(job, now)
        on_demand = self._cheapest_on_demand(job)
        spots = sorted(_spot(job), key=lambda i: (self._expected_hour(job, i), i))
        slack = self._slack_s(job, done, now)
        if on_demand and (not spots or slack < self._risk_s() or self._last_chance(job)):
            choice = on_demand
        elif spots and self.timing.deadline is not None and slack > self._patient_s():
            best = self._expected_hour(job, spots[0])
            choice = [i for i in spots if self._expected_hour(job, i) <= best * 1.05]
        else:
            choice = spots or super().choose(job, done, now)
        self._last[job.name] = (job.offers[choice[0]].label, job.preemptions, now)
        return choice

    def max_wait_s(self, job: JobRecord, done: int, now: datetime, default: float | None) -> float | None:
        if self.timing.deadline is None or not job.offers[job.offer_index].spot:
            return default
        slack = self._slack_s(job, done, now)
        stage_ends = self._patient_s() if slack > self._patient_s() else self._risk_s()
        return max(slack - stage_ends, 0.0)

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


def domain_seconds(plan, startup_s: float) -> dict[str, float]:
    """Training seconds per domain of each job, from the plan's hours (one start-up per job)."""
    return {j.name: max(j.hours * 3600 - startup_s, 0.0) / max(len(j.domains), 1) for j in plan.jobs}
