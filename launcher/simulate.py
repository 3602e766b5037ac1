"""`meetara simulate`: replay a spot market under the real conductor and money code, on a virtual clock.

Each replay: the plan (from the bundled offer snapshot, as `meetara plan` makes it) is recorded as a run,
its jobs reserve their money in a fresh ledger (SQLite, with the caps of your config), and the real
`Conductor` with the real `Money` hooks (reserve, accrue, watchdog, settle) follows them on a
`SimBackend` over a market `replay` (launcher/market.py), with a policy choosing each launch's offer
(launcher/policies.py). Nothing here decides about money: what a replay cost is what its ledger settled.

The omniscient optimum of a replay is a lower bound: knowing the whole future, each job buys its
machine time (one start-up plus its training) in the cheapest spells before the deadline, spot where an
offer is up and on-demand elsewhere, with no restart ever lost.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from budgets import clock
from budgets.caps import BudgetConfig
from launcher.market import Trace, offer_key, replay
from launcher.plan import Plan
from launcher.policies import NAMES, Timing, domain_seconds, make_policy
from launcher.runs import JobRecord, RunRecord

T0 = datetime(2026, 1, 5, tzinfo=UTC)  # replays start on a Monday at 00:00 UTC: whole windows ahead
POLL_S = 60.0  # the conductor's poll interval in simulated time (its waits also end at every event)


class MemoryStore:
    """An object store in memory: the simulated jobs' manifests (the conductor lists and pulls them)."""

    url = "memory://simulate"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, key: str, data: bytes) -> None:
        self.objects[key] = data

    def get(self, key: str) -> bytes:
        return self.objects[key]

    def exists(self, key: str) -> bool:
        return key in self.objects

    def list(self, prefix: str) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix.rstrip("/") + "/"))

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def local_path(self, key: str) -> Path | None:
        return None

    def get_file(self, key: str, path: Path) -> None:
        path.write_bytes(self.objects[key])

    resume_file = get_file

    def put_file(self, key: str, path: Path) -> None:
        self.objects[key] = path.read_bytes()


class SimRecord(RunRecord):
    """A run record kept in memory (a replay writes nothing to the state directory)."""

    def save(self) -> None:
        pass


@dataclass
class ReplayResult:
    policy: str
    seed: int
    cost: float
    hours: float  # from the start until the last domain was done (inf if some never was)
    deadline_missed: bool
    preemptions: int
    redone_hours: float
    stopped_by: str | None = None  # a cap that stopped it (the caps win over the deadline)
    refused: str | None = None  # a cap refused the launch outright
    events: list[tuple[str, str | None]] = field(default_factory=list)  # the ledger's (kind, detail)
    spent: float = 0.0  # the ledger's spend in the replay's month (what its caps count)


@dataclass
class Setup:
    """What every replay of one `simulate` shares."""

    plans: dict[str, Plan]  # policy -> its plan (on-demand plans the on-demand market only)
    traces: list[Trace]
    budget: float | None
    deadline_s: float | None
    caps: BudgetConfig
    startup_s: float
    checkpoint_s: float
    max_recoveries: int
    start_timeout_s: float
    poll_s: float = POLL_S
    start_tick: int | None = None  # where replays start in the traces; None: seeded random
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="meetara-simulate-")))


def make_setup(
    names: list[str],
    traces: list[Trace],
    policies: list[str],
    *,
    prefs,
    caps: BudgetConfig,
    work,
    budget: float | None,
    deadline_s: float | None,
    checkpoint_s: float = 600.0,
) -> Setup:
    """A `Setup` as `meetara simulate` makes it: each policy's plan from the bundled offer snapshot
    (on-demand's from the on-demand market only, the others' from spot and on-demand: `auto`), spot
    priced with the preemption overhead the traces show (`market.preemption_overhead`)."""
    from launcher.launch import make_plan
    from launcher.market import preemption_overhead
    from launcher.plan import job_startup_hours

    startup_s = job_startup_hours(prefs, work) * 3600  # boot and setup + the measured per-job overhead
    # the market's own preemption rate prices spot in the plans, not the preferences' guess
    overhead = preemption_overhead(traces, startup_s, checkpoint_s)

    def plan(spot_policy: str) -> Plan:
        p = prefs.model_copy(update={"spot_policy": spot_policy, "preemption_overhead": min(overhead, 10.0)})
        return make_plan(names, backend="skypilot", prefs=p, work=work, run_id="sim")

    plans = {p: plan("on-demand" if p == "on-demand" else "auto") for p in [*policies, "greedy"]}
    return Setup(
        plans,
        traces,
        budget,
        deadline_s,
        caps,
        startup_s,
        checkpoint_s,
        prefs.max_recoveries,
        prefs.start_timeout_minutes * 60,
    )


def run_replay(setup: Setup, policy_name: str, seed: int) -> ReplayResult:
    """One replay of one policy (see the module doc)."""
    from budgets import BudgetExceeded
    from budgets.ledger import Ledger
    from launcher.backends.simulated import SimBackend
    from launcher.conductor import Conductor, Hooks
    from launcher.money import Money

    plan = setup.plans[policy_name]
    run_id = f"sim-{policy_name}-{seed}"
    refs = [o for j in plan.jobs for o in (j.offer, *j.fallbacks)]
    market = replay(setup.traces, refs, seed, setup.start_tick)
    vclock = clock.VirtualClock(T0)
    with clock.use(vclock):
        ledger = Ledger(setup.workdir / f"{run_id}.sqlite", config=setup.caps)
        try:
            rec = SimRecord(
                run_id=run_id,
                backend="simulated",
                store=MemoryStore.url,
                models_dir=str(setup.workdir / run_id),
                budget=setup.budget,
                plan=plan,
                jobs={j.name: JobRecord.of(j) for j in plan.jobs},
            )
            store = MemoryStore()
            per = domain_seconds(plan, setup.startup_s)
            backend = SimBackend(
                vclock,
                market,
                store,
                run_id,
                {j.name: j.domains for j in plan.jobs},
                per,
                startup_s=setup.startup_s,
                checkpoint_s=setup.checkpoint_s,
            )
            money = Money(ledger, rec, backend, poll_s=setup.poll_s)
            try:
                money.reserve_plan()
            except BudgetExceeded as e:
                return ReplayResult(policy_name, seed, 0.0, math.inf, True, 0, 0.0, refused=str(e))
            deadline = T0 + timedelta(seconds=setup.deadline_s) if setup.deadline_s else None
            hooks = Hooks(before_launch=money.before_launch, after_poll=money.after_poll)
            hooks.launch_failed, hooks.placed, hooks.billed = money.launch_failed, money.placed, money.billed
            conductor = Conductor(
                rec,
                backend,
                store,
                lambda job: {
                    "job": job.name,
                    "offers": job.task_offers(),
                    "stop_at": job.stop_at,
                },
                setup.max_recoveries,
                setup.poll_s,
                hooks,
                confirm_polls=1,  # a simulated status never flaps
                max_start_s=setup.start_timeout_s,
            )
            # greedy is the conductor's own rule: no policy object at all, as in a real launch today
            timing = Timing(T0, deadline, per, setup.startup_s, setup.checkpoint_s, setup.max_recoveries)
            conductor.policy = None if policy_name == "greedy" else make_policy(policy_name, timing)
            conductor.money = money
            conductor.run()
            cost = sum(
                (r.settled_amount if r.settled_amount is not None else r.accrued)
                for r in ledger.reservations(run_id)
            )
            done = conductor.done_domains()
            wanted = {d for j in plan.jobs for d in j.domains}
            ends = [j.ended_at for j in rec.jobs.values() if j.ended_at is not None]
            finished = (max(ends) - T0).total_seconds() if ends and wanted <= done else math.inf
            return ReplayResult(
                policy_name,
                seed,
                round(cost, 6),
                finished / 3600,
                deadline is None
                and not wanted <= done
                or (
                    deadline is not None
                    and (finished == math.inf or T0 + timedelta(seconds=finished) > deadline)
                ),
                sum(p.preemptions for p in backend.progress.values()),
                sum(p.redone_s for p in backend.progress.values()) / 3600,
                stopped_by=money.stopped_by,
                events=[(e.kind, e.detail) for e in ledger.events()],
                spent=ledger.spent("monthly"),
            )
        finally:
            ledger.close()
            (setup.workdir / f"{run_id}.sqlite").unlink(missing_ok=True)


def optimum(setup: Setup, seed: int) -> tuple[float, float]:
    """The omniscient lower bound of replay `seed`: (cost, hours) (see the module doc)."""
    plan = setup.plans["greedy"]
    refs = [o for j in plan.jobs for o in (j.offer, *j.fallbacks)]
    market = replay(setup.traces, refs, seed, setup.start_tick)
    horizon = setup.deadline_s or 7 * 86400
    per = domain_seconds(plan, setup.startup_s)
    cost, hours = 0.0, 0.0
    for j in plan.jobs:
        offers = [j.offer, *j.fallbacks]
        demand = min((o.price_hour for o in offers if not o.spot), default=None)
        need = len(j.domains) * per[j.name] + setup.startup_s
        cuts = {0.0, float(horizon)}
        for o in offers:
            s = market.series.get(offer_key(o))
            if s is not None:
                t = 0.0
                while (t := s.next_change(t)) < horizon:
                    cuts.add(t)
        edges = sorted(cuts)
        spells = []
        for a, b in zip(edges, edges[1:], strict=False):
            prices = [o.price_hour for o in offers if o.spot and market.up(offer_key(o), a)]
            if demand is not None:
                prices.append(demand)
            if prices:
                spells.append((min(prices), a, b))
        spells.sort()
        last = 0.0
        for price, a, b in spells:
            take = min(b - a, need)
            cost += price * take / 3600
            need -= take
            last = max(last, a + take)
            if need <= 0:
                break
        hours = max(hours, last / 3600 if need <= 0 else math.inf)
    return cost, hours


def _p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(0.95 * len(xs)) - 1)]


def summarise(results: list[ReplayResult], optima: list[tuple[float, float]]) -> dict:
    """The JSON of `meetara simulate --json` (see the README)."""
    out: dict = {"policies": {}}
    for name in dict.fromkeys(r.policy for r in results):
        rs = [r for r in results if r.policy == name]
        finite = [r.hours for r in rs if math.isfinite(r.hours)]
        out["policies"][name] = {
            "cost_mean": round(statistics.fmean(r.cost for r in rs), 6),
            "cost_p95": round(_p95([r.cost for r in rs]), 6),
            "hours_mean": round(statistics.fmean(finite), 4) if finite else None,
            "hours_p95": round(_p95(finite), 4) if finite else None,
            "deadline_missed": round(sum(r.deadline_missed for r in rs) / len(rs), 4),
            "preemptions_mean": round(statistics.fmean(r.preemptions for r in rs), 3),
            "redone_hours_mean": round(statistics.fmean(r.redone_hours for r in rs), 4),
            "stopped_by_caps": sum(r.stopped_by is not None or r.refused is not None for r in rs),
            "replays": len(rs),
        }
    costs = [c for c, _ in optima]
    out["optimum"] = {
        "cost_mean": round(statistics.fmean(costs), 6),
        "hours_mean": round(statistics.fmean(h for _, h in optima), 4),
    }
    return out


def simulate(setup: Setup, policies: list[str], replays: int, seed: int = 0, progress=None) -> dict:
    """Every policy over `replays` replays (seeds seed..seed+replays-1) and the optimum of each."""
    results, optima = [], []
    for k in range(replays):
        for name in policies:
            results.append(run_replay(setup, name, seed + k))
        optima.append(optimum(setup, seed + k))
        if progress is not None:
            progress(k + 1)
    return summarise(results, optima)


def plot(summary: dict, path: Path, title: str) -> Path:
    """A PNG of `summary`: mean cost per policy (p95 as a whisker) beside the optimum's bound, each bar
    labelled with its cost and the share of replays that missed the deadline."""
    from matplotlib.figure import Figure

    from budgets import usd
    from budgets.report import money_ticks

    names = [*summary["policies"], "optimum (bound)"]
    means = [p["cost_mean"] for p in summary["policies"].values()] + [summary["optimum"]["cost_mean"]]
    p95 = [p["cost_p95"] - p["cost_mean"] for p in summary["policies"].values()] + [0.0]
    fig = Figure(figsize=(8, 0.6 * len(names) + 1.6), dpi=110)
    ax = fig.subplots()
    bars = ax.barh(names[::-1], means[::-1], xerr=[[0] * len(names), p95[::-1]], color="#3b75af", height=0.6)
    missed = [f" ({p['deadline_missed']:.0%} late)" for p in summary["policies"].values()] + [""]
    ax.bar_label(bars, labels=[f"{usd(m)}{x}" for m, x in zip(means, missed, strict=True)][::-1], padding=4)
    ax.set_xlim(0, max(m + d for m, d in zip(means, p95, strict=True)) * 1.45 or 1.0)
    ax.set_xticks(ax.get_xticks())
    ax.set_xticklabels(money_ticks(ax.get_xticks()))
    ax.set_xlabel("cost per run (mean; whisker: p95)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


__all__ = ["NAMES", "Setup", "simulate", "run_replay", "optimum", "summarise", "plot"]
