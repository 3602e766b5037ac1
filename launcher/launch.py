"""`meetara plan` / `launch` as functions: the CLI, the tests and the MCP server call these.

launch = check every input -> take the run's lease (one launcher per run, budgets/lease.py) -> adopt
what an earlier launcher of the run left (jobs found by name, money settled) -> plan the unfinished
domains -> check the budget -> reserve and record the run -> the conductor launches the jobs, follows
them and pulls each finished domain into the models folder -> release the lease.

Nothing that moves money happens before every input is checked (run id, store URL, models folder,
plan, budget); everything after the lease is taken happens under it, and `Prepared.close` (or leaving
its `with` block) releases it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from launcher.backends.base import Backend, BackendError
from launcher.plan import Plan, Workload, plan_cloud, plan_local
from launcher.preferences import Preferences
from launcher.runs import ACTIVE, LAUNCHING, JobRecord, RunRecord, load_run
from launcher.stores import absolute_store, default_store
from train import BadInput
from train.domains import load_registry, select_domains
from train.names import check_run_id
from train.pipeline import is_done
from train.store import ObjectStore, open_store


def resolve_backend(prefs: Preferences, name: str | None = None) -> str:
    """`local` or `skypilot`. `auto` means skypilot when it is installed and some provider has
    credentials, else the embedded local backend."""
    name = name or prefs.backend
    if name not in ("auto", "local", "skypilot"):
        raise BadInput(f"unknown backend {name!r}; use local, skypilot or auto")
    if name != "auto":
        return name
    from launcher.backends import skypilot

    return "skypilot" if skypilot.available() and skypilot.configured_clouds() else "local"


def make_backend(name: str) -> Backend:
    if name == "local":
        from launcher.backends.local import LocalBackend

        return LocalBackend()
    from launcher import skyserver
    from launcher.backends.skypilot import SkyPilotBackend

    try:  # before anything in this process imports SkyPilot (it anchors some paths at import)
        skyserver.activate()
    except skyserver.SkyServerError as e:
        raise BadInput(str(e)) from None
    return SkyPilotBackend()


def select(domains: str) -> list[str]:
    return [
        d.name for d in select_domains([x for x in domains.split(",") if x.strip()] or [""], load_registry())
    ]


def make_plan(
    domains: Sequence[str],
    *,
    backend: str,
    prefs: Preferences,
    work: Workload,
    run_id: str,
    live: bool = False,
    providers: list[str] | None = None,
) -> Plan:
    """Plan `domains` for `backend`; raises BadInput when nothing can run them."""
    if backend == "local":
        return plan_local(domains, prefs, work, run_id)
    from launcher.offers import gather_offers
    from launcher.plan import NoOffer, needs_for
    from launcher.select import emptied_providers

    try:
        table = gather_offers(live=live, providers=providers)
        excluded = emptied_providers(table.offers, prefs, needs_for(work))
        plan = plan_cloud(
            domains,
            table.offers,
            prefs,
            work,
            run_id,
            offers_source=table.source,
            snapshot_date=str(table.snapshot_date) if table.snapshot_date else None,
        )
    except NoOffer as e:
        why = "".join(f"; {p}: {w}" for p, w in excluded.items())
        raise BadInput(f"{e}{why}") from None
    except ValueError as e:
        raise BadInput(str(e)) from None
    return plan.model_copy(update={"excluded": excluded})


def plan_unfinished(
    names: Sequence[str],
    *,
    backend: str,
    prefs: Preferences,
    work: Workload,
    run_id: str,
    store: str | None = None,
    endpoint_url: str | None = None,
    live: bool = False,
    providers: list[str] | None = None,
) -> Plan:
    """`meetara plan`: what `launch` with the same arguments would plan. Domains already done in the
    run's store are listed in `Plan.done`, not planned; all of them done gives a plan with no jobs."""
    from train.store import StoreError

    url = store or os.environ.get("MEETARA_STORE")
    if url is None:
        rec = load_run(run_id)
        url = rec.store if rec is not None else (default_store(backend) if backend == "local" else None)
        endpoint_url = endpoint_url or (rec.endpoint_url if rec is not None else None)
    todo, url = list(names), url and absolute_store(url)
    missing_folder = url is not None and url.startswith("file://") and not Path(url[7:]).exists()
    if url is not None and not missing_folder:  # a dry run makes no folder
        try:
            todo = todo_domains(open_store(url, endpoint_url=endpoint_url, writable=False), run_id, names)
        except StoreError as e:
            raise BadInput(f"cannot check which domains are done: {e}") from None
    done = [d for d in names if d not in todo]
    if todo:
        plan = make_plan(
            todo, backend=backend, prefs=prefs, work=work, run_id=run_id, live=live, providers=providers
        )
    else:
        plan = Plan(
            run_id=run_id,
            backend=backend,
            workload=work,
            jobs=[],
            total_hours=0,
            total_cost=0,
            offers_source="none",
            throughput_source="none",
        )
    return plan.model_copy(update={"done": done, "store": url})


def todo_domains(store: ObjectStore, run_id: str, domains: Sequence[str]) -> list[str]:
    """The domains whose manifest is not in the store yet (finished work is never paid for twice)."""
    return [d for d in domains if not is_done(store, run_id, d)]


def check_budget(plan: Plan, budget: float | None) -> None:
    from budgets import usd

    if budget is not None and plan.total_cost > budget + 1e-9:
        raise BadInput(
            f"the plan costs {usd(plan.total_cost)} (expected, preemption overhead included), over --budget "
            f"{usd(budget)}: raise the budget, choose fewer domains, or loosen provider preferences"
        )


def adopt(rec: RunRecord | None, backend: Backend) -> RunRecord | None:
    """An earlier launcher's record of this run if some of its jobs still run (follow them instead of
    launching the same work twice). Launches recorded but never confirmed (the launcher died while
    starting them) are looked up by name first: found, they are followed; not found, launched again.
    The caller holds the run's lease."""
    if rec is None or rec.backend != backend.name:
        return None
    alive = False
    for job in rec.jobs.values():
        if job.state == LAUNCHING:
            found = backend.find(job.launch_name) if job.launch_name and hasattr(backend, "find") else None
            if found:
                job.handle, job.state = found, "PENDING"
                job.note(f"found {found} after its launcher stopped: following it")
            else:
                job.handle, job.state = None, "planned"
                job.note("its launch never started (the launcher stopped first)")
        if job.state in ACTIVE and job.handle:
            try:
                alive |= not backend.status(job.handle).state.finished
            except BackendError:
                job.state = "planned"  # the backend forgot it: it will be launched again
    rec.save()
    return rec if alive else None


def new_run(
    plan: Plan, *, store: str, endpoint_url: str | None, models_dir: Path, budget: float | None
) -> RunRecord:
    rec = RunRecord(
        run_id=plan.run_id,
        backend=plan.backend,
        store=store,
        endpoint_url=endpoint_url,
        models_dir=str(models_dir.resolve()),
        budget=budget,
        plan=plan,
        jobs={j.name: JobRecord.of(j) for j in plan.jobs},
    )
    return rec


def carry_over(rec: RunRecord, prior: RunRecord | None) -> None:
    """A run planned anew (`recover`, a relaunch) keeps what its earlier record knew of each job of
    the same name: its launches (an unwatched one included), machine time, preemptions and history,
    so status and the time line show every launch the ledger paid for."""
    if prior is None or prior.run_id != rec.run_id:
        return
    planned = {d for j in rec.jobs.values() for d in j.domains}
    for name, job in rec.jobs.items():
        old = prior.jobs.get(name)
        if old is None:
            continue
        # the domains it finished before stay its own (status counts them; the task trains the plan's)
        job.domains = [*(d for d in old.domains if d not in planned), *job.domains]
        job.launches = old.launches
        job.first_launched_at = old.first_launched_at
        job.run_seconds, job.billed_usd = old.run_seconds, old.billed_usd
        job.earlier_preemptions = old.preemptions + old.earlier_preemptions
        job.preemption_log = list(old.preemption_log)
        job.history = [*old.history]
        job.note("planned anew (recover): the unfinished domains resume from their checkpoints")


def task_factory(rec: RunRecord, prefs: Preferences):
    """The task each launch of a job runs (its current offer first, then the rest as fallbacks)."""
    from launcher.task import render_task

    def task_for(job: JobRecord) -> dict:
        offers = job.task_offers()
        plan_job = rec.plan.job(job.name).model_copy(update={"offer": offers[0], "fallbacks": offers[1:]})
        return render_task(
            rec.plan,
            plan_job,
            store=rec.store,
            endpoint_url=rec.endpoint_url,
            prefs=prefs,
            backend=rec.backend,
            # step lines let the conductor count the work a preemption cost (every step locally,
            # every 10th in the cloud, where steps are many and fast)
            extra_envs={
                "MEETARA_LOG_EVERY": "1" if rec.backend == "local" else "10",
                # not whole seconds: rounding could move the deadline up to half a second later
                **({"MEETARA_STOP_AT": f"{job.stop_at:.3f}"} if job.stop_at else {}),
                **({"MEETARA_STOP_HARD_AT": f"{job.stop_hard_at:.3f}"} if job.stop_hard_at else {}),
            },
        )

    return task_for


def unfinished(rec: RunRecord) -> list[str]:
    """The run's domains without a manifest in its store (unreachable store: all of them)."""
    from train.store import StoreError

    names = [d for j in rec.plan.jobs for d in j.domains]
    try:
        st = open_store(rec.store, endpoint_url=rec.endpoint_url, writable=False)
        return todo_domains(st, rec.run_id, names)
    except StoreError:
        return names


def open_ledger(config: Path | None = None):
    """The budget ledger with the caps of the config file (`budgets:`), env and defaults."""
    from budgets.query import open_ledger

    return open_ledger(config)


@dataclass
class Prepared:
    """What `launch` is about to do, before anything is spent: shown to the user, then committed.
    Holds the run's lease from `prepare` until `close` (a context manager too)."""

    names: list[str]
    store_url: str
    store: ObjectStore
    backend: Backend
    ledger: Any
    lease: Any = None  # budgets.lease.Holder
    plan: Plan | None = None  # None: nothing left to train (or jobs adopted)
    rec: RunRecord | None = None  # an earlier launcher's run whose jobs still run
    skipped: int = 0
    settled: list[int] = field(default_factory=list)

    @property
    def owner(self) -> str | None:
        return self.lease.token if self.lease is not None else None

    def close(self) -> None:
        """Release the run's lease (the jobs are settled or followed by nobody; `recover` adopts them)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def hand_over(self) -> None:
        """Stop renewing the run's lease without releasing it: another process (a background follower
        given `owner`) takes it over with the same token."""
        if self.lease is not None:
            self.lease.stop_renewing()
            self.lease = None

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prepare(
    names: Sequence[str],
    *,
    prefs: Preferences,
    backend: str,
    work: Workload,
    run_id: str,
    store: str | None,
    endpoint_url: str | None,
    budget: float | None,
    live: bool = False,
    providers: list[str] | None = None,
    config: Path | None = None,
    models_dir: Path | None = None,
    lease_ttl_s: float | None = None,
) -> Prepared:
    """Check everything, take the run's lease, adopt or settle what a crashed launcher left, plan the
    unfinished domains. Raises BadInput / StoreError / BackendError / LedgerError / RunOwned with
    one-line messages; on any of them nothing is reserved and the lease is not held."""
    from budgets.lease import DEFAULT_TTL_S, Holder
    from launcher.money import settle_stale

    check_run_id(run_id)
    if budget is not None and not (0 <= budget < float("inf")):
        raise BadInput(f"--budget must be a finite amount of dollars >= 0, not {budget}")
    if models_dir is not None:
        from launcher.pull import check_models_dir

        check_models_dir(models_dir)
    store_url = absolute_store(store or default_store(backend))
    if backend == "skypilot" and store_url.startswith("file://"):
        raise BadInput("cloud jobs cannot write to a local folder: pass --store s3://BUCKET/PREFIX")
    st = open_store(store_url, endpoint_url=endpoint_url)
    be = make_backend(backend)
    if backend == "skypilot":  # SkyPilot's controller would refuse it only after the money is reserved
        from launcher.backends.skypilot import cluster_name_problem

        problem = cluster_name_problem(f"{run_id}-j1")
        if problem:
            raise BadInput(problem)
    ledger = open_ledger(config)
    holder = Holder(ledger, run_id, ttl_s=lease_ttl_s or DEFAULT_TTL_S).acquire()
    prep = Prepared(list(names), store_url, st, be, ledger, lease=holder)
    try:
        prior = load_run(run_id)
        prep.rec = adopt(prior, be)
        if prep.rec is not None:
            return prep
        prep.settled = settle_stale(ledger, run_id, be, prior, owner=holder.token)
        todo = todo_domains(st, run_id, names)
        prep.skipped = len(names) - len(todo)
        if todo:
            prep.plan = make_plan(
                todo, backend=backend, prefs=prefs, work=work, run_id=run_id, live=live, providers=providers
            )
            check_budget(prep.plan, budget)
            if backend == "skypilot":  # a row SkyPilot would refuse fails here, before money moves
                from launcher.skycatalog import check_catalog_rows

                check_catalog_rows([o for j in prep.plan.jobs for o in (j.offer, *j.fallbacks)])
                be.ready()  # credentials, and meetara's SkyPilot API server up: before money moves
    except BaseException:
        prep.close()
        raise
    return prep


def commit(
    prep: Prepared,
    *,
    endpoint_url: str | None,
    models_dir: Path,
    budget: float | None,
    deadline_s: float | None = None,
    policy: str | None = None,
) -> RunRecord:
    """Reserve the plan's cost in the ledger (all jobs or none), then record the run (with its deadline
    and spot policy, which every later launch of its jobs follows)."""
    from launcher.crash import crash_point
    from launcher.money import Money

    rec = new_run(
        prep.plan, store=prep.store_url, endpoint_url=endpoint_url, models_dir=models_dir, budget=budget
    )
    carry_over(rec, load_run(rec.run_id))
    if deadline_s is not None:
        rec.deadline = rec.created_at + timedelta(seconds=deadline_s)
    rec.policy = policy
    path = rec.path()
    before = path.read_bytes() if path.exists() else None
    rec.save()  # the run is on record before money moves: `recover` finds it whatever happens next
    crash_point("planning")
    try:  # saves the record again when all are held
        Money(prep.ledger, rec, prep.backend, poll_s=1, owner=prep.owner).reserve_plan()
    except Exception:  # refused (a cap, the lease): nothing happened, so the record is as it was
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)
        raise
    return rec


def conductor_for(
    rec: RunRecord, prep: Prepared, prefs: Preferences, *, poll: float, hooks=None, chaos=None, clock=None
):
    """A conductor for the run, with the budget hooks (reserve, accrue, watchdog, settle) in place."""
    from launcher.conductor import Conductor, Hooks
    from launcher.money import Money, utcnow

    hooks = hooks or Hooks()
    if hasattr(prep.backend, "offers"):  # SkyPilot places offers from its catalogs: give it the run's
        prep.backend.offers = [o for j in rec.jobs.values() for o in j.offers]
    money = Money(prep.ledger, rec, prep.backend, poll_s=poll, clock=clock or utcnow, owner=prep.owner)
    policy = policy_for(rec, prefs)
    hooks.before_launch, hooks.after_poll = money.before_launch, money.after_poll
    hooks.launch_failed, hooks.placed, hooks.billed = money.launch_failed, money.placed, money.billed
    c = Conductor(
        rec,
        prep.backend,
        prep.store,
        task_factory(rec, prefs),
        prefs.max_recoveries,
        poll,
        hooks,
        chaos=chaos,
        lease=prep.lease,
        max_start_s=prefs.start_timeout_minutes * 60 if rec.backend == "skypilot" else None,
    )
    c.policy = policy
    c.money = money
    return c


CHECKPOINT_S = 600.0  # what a policy assumes a preemption can undo at most (a checkpoint interval)


def policy_for(rec: RunRecord, prefs: Preferences):
    """The spot policy object of a run launched with `--policy` or `--deadline` (None: the conductor's
    own rule, greedy)."""
    if rec.policy in (None, "greedy"):
        return None
    from launcher.plan import job_startup_hours
    from launcher.policies import Timing, domain_seconds, make_policy

    startup_s = job_startup_hours(prefs, rec.plan.workload) * 3600 if rec.backend != "local" else 0.0
    timing = Timing(
        rec.created_at,
        rec.deadline,
        domain_seconds(rec.plan, startup_s),
        startup_s,
        CHECKPOINT_S,
        prefs.max_recoveries,
    )
    return make_policy(rec.policy, timing)


def launch_message(e: BaseException) -> str:
    """The one-line message the CLI prints for a refused launch (the MCP server returns the same)."""
    from budgets import BudgetExceeded

    return f"refused: {e}" if isinstance(e, BudgetExceeded) else str(e)


EXIT_OWNED = 3  # another live launcher follows the run (or took it over): nothing was done here
EXIT_NO_MACHINE = 4  # no offer had a machine within start_timeout_minutes: cancelled before any job ran


@dataclass
class Outcome:
    """How following a run ended: the exit code the CLI returns and its one-line message."""

    code: int  # 0 done, 1 a job failed or following failed, 3 taken over, 4 no machine, 75 interrupted
    message: str | None = None


def follow(
    rec: RunRecord, prep: Prepared, prefs: Preferences, *, poll: float, hooks=None, chaos=None
) -> Outcome:
    """Run the conductor to the end, containing what can go wrong: Ctrl-C / SIGTERM (KeyboardInterrupt)
    and a conductor that gives up cancel the jobs (they checkpoint) and settle their money; a lost lease
    leaves both to the launcher that took the run over."""
    from budgets.lease import LeaseLost
    from launcher.conductor import ConductorError

    c = conductor_for(rec, prep, prefs, poll=poll, hooks=hooks, chaos=chaos)
    try:
        c.run()
    except LeaseLost as e:
        return Outcome(EXIT_OWNED, f"{e}; it follows the jobs and settles their money now")
    except (KeyboardInterrupt, ConductorError) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        names = c.cancel_all("interrupted" if interrupted else "following failed")
        try:
            c.money.after_poll(rec)  # settle what they cost
            # the jobs that never started give their reservations back now, not at the next launch
            c.money.close_unlaunched(rec, "interrupted" if interrupted else "following failed")
            settled = "their money is settled"
        except Exception as money_error:
            settled = f"settling failed ({money_error}); `meetara recover {rec.run_id}` settles it"
        if interrupted:
            return Outcome(
                75,
                f"interrupted: cancelled {len(names)} job(s), {settled}; checkpoints are kept, the same "
                "command resumes",
            )
        return Outcome(1, f"{e}; cancelled {len(names)} job(s), {settled}")
    failed = [j for j in rec.jobs.values() if j.state != "SUCCEEDED"]
    if c.money.stopped_by:
        return Outcome(1, f"stopped: budget: {c.money.stopped_by}; checkpoints are kept")
    if failed and all(j.state == "NO-MACHINE" for j in failed):
        billed = sum(j.started_at is not None for j in failed)  # a machine created that never ran the job
        money = (
            "their money is released"
            if not billed
            else f"the minutes of {billed} machine(s) that never ran it are paid, the rest released"
        )
        return Outcome(
            EXIT_NO_MACHINE,
            f"no machine: {len(failed)} job(s) found no capacity on any offer within "
            f"{prefs.start_timeout_minutes:g} min, no job ran and {money}; rerun later "
            "(or widen the preferences): " + "; ".join(map(_why, failed)),
        )
    if failed:
        return Outcome(1, f"{len(failed)} job(s) did not succeed: " + "; ".join(map(_why, failed)))
    return Outcome(0)


def _why(job: JobRecord) -> str:
    """`job state`, with the reason when the job never started (the backend's one line)."""
    last = job.history[-1].split(" ", 1)[-1] if job.history else ""
    ended = last.startswith(("launch failed", "no machine")) or (
        last.startswith("failed (exit code None): ") and job.state == "FAILED"
    )
    why = f" ({last[:300]})" if ended else ""
    return f"{job.name} {job.state.lower()}{why}"


def done_in_store(rec: RunRecord) -> set[str]:
    """The run's domains with a manifest in its store (empty if the store cannot be reached)."""
    from train.store import StoreError

    try:
        st = open_store(rec.store, endpoint_url=rec.endpoint_url, writable=False)
        return {
            k.split("/")[3] for k in st.list(f"runs/{rec.run_id}/domains") if k.endswith("/manifest.json")
        }
    except StoreError:
        return set()


def status_rows(run_id: str | None = None) -> list[dict]:
    """One row per job of one run (or of every run this machine launched): state (asked of the
    backend for active jobs, best effort), domains done, launches, preemptions, work lost, machine time."""
    from launcher.runs import select_runs

    return job_rows(select_runs(run_id))


def job_rows(runs: Sequence[RunRecord], done: set[str] | None = None) -> list[dict]:
    """`status_rows` for given run records (`done`: one run's domains done, if the caller listed its
    store already). Domains done come from the store; machine time and cost from the ledger (what it
    settled, and for a job still billing what its rate adds since the last accrual), the run record's
    own figures only for a run the ledger does not know (another ledger)."""
    rows = []
    now = datetime.now(UTC)
    usage = _ledger_usage(runs)
    for rec in runs:
        done = done_in_store(rec) if done is None or len(runs) > 1 else done
        backend = None
        for job in rec.jobs.values():
            ended = None
            if job.state in ACTIVE and job.handle:
                try:
                    backend = backend or make_backend(rec.backend)
                    st = backend.status(job.handle)
                    job.state = final_state(st)
                    job.started_at = job.started_at or st.started_at  # its launcher may not have seen it
                    ended = st.ended_at if st.state.finished else None
                except Exception as e:  # status is best effort here; the conductor decides
                    job.note(f"status unavailable: {type(e).__name__}")
            start = job.first_launched_at or job.launched_at
            unfinished = job.state in ACTIVE or job.state in ("planned", LAUNCHING)
            end = None if unfinished else (job.ended_at or ended or now)
            used = usage.get(rec.run_id)
            if used is not None:  # the ledger's figures: settled, accrued, and billing since
                # unrecorded billing: until now while it runs, until its end if it ended unwatched
                bill_to = now if job.state in ACTIVE and job.started_at else ended
                cost, seconds = used[job.name].until(bill_to, job.started_at) if job.name in used else (0, 0)
            else:
                if ended is not None and job.ended_at is None and job.started_at is not None:
                    job.end_launch(ended)  # finished while nobody watched: its time counts
                seconds, cost = job.machine_seconds(now), job.cost_so_far(now)
            rows.append(
                {
                    "run": rec.run_id,
                    "job": job.name,
                    "state": job.state,
                    "domains_done": sum(d in done for d in job.domains),
                    "domains": len(job.domains),
                    "offer": job.offer.label,
                    # the offer's $/h as planned, what its provider reports billing (None: not reported)
                    "planned_hour": job.offer.price_hour,
                    "billed_hour": job.billed_hour,
                    "launches": job.launches,
                    # the conductor's relaunches and the backend's own recoveries (SkyPilot's controller)
                    "preemptions": job.recoveries + job.earlier_preemptions,
                    "recomputed_steps": job.lost_steps,
                    "lost_seconds": round(job.lost_seconds, 1),
                    "started_at": start.isoformat(timespec="seconds") if start else None,
                    # since the first launch: until now while the job is not finished, else until its end
                    "elapsed_seconds": round(((end or now) - start).total_seconds(), 1) if start else None,
                    "machine_seconds": round(seconds, 1),
                    "cost_so_far": round(cost, 6),
                }
            )
    return rows


def final_state(st) -> str:
    """A job's state from its backend status: a launch that ended with the budget guard's exit code
    (77) stopped at its reservation, whatever the backend calls it (a failed command, locally)."""
    from train.cli import EXIT_BUDGET

    if st.state.finished and st.exit_code == EXIT_BUDGET:
        return "STOPPED-BUDGET"
    return st.state.value


def _ledger_usage(runs: Sequence[RunRecord]) -> dict[str, dict]:
    """Per run the ledger knows: per job, its `budgets.ledger.JobUsage` (empty when the ledger cannot
    be read: the rows fall back to the run records)."""
    from budgets import LedgerError

    out: dict[str, dict] = {}
    try:
        with open_ledger() as ledger:
            for rec in runs:
                used = ledger.job_usage(rec.run_id)
                if used:
                    out[rec.run_id] = used
    except (LedgerError, OSError, BadInput):
        return {}
    return out
