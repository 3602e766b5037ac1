"""The service layer: what meetara does, as typed functions its three faces call.

The faces only translate arguments and render results: `launcher/cli.py` (typer + rich),
`launcher/mcp_server.py` (the MCP tools and resources) and `launcher/dashboard/` (the web app). None
of them imports another; each calls the functions here, which take plain arguments and return
pydantic models (`.model_dump(mode="json")` is what the MCP server and the dashboard send).

A refusal is an exception whose `str()` is the one-line message every face shows: the types are
`refusals()` (bad input is `train.BadInput`, an unknown run `NotFound`, both ValueErrors; a cap is
`budgets.BudgetExceeded`; `budgets.lease.RunOwned` when another launcher follows the run). `message`
words a refusal as the CLI prints it after "error: ".

Imports stay light at module level (pydantic only): `meetara --help` must answer at once.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from train import BadInput


class NotFound(BadInput):
    """No such run (or domain) on this machine or in its store."""


def version() -> str:
    """meetara's installed version ("unknown" when run from a source tree that was not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("meetara")
    except PackageNotFoundError:
        return "unknown"


def refusals() -> tuple[type[BaseException], ...]:
    """The exceptions a face turns into its one-line error (anything else is a bug)."""
    from budgets import BudgetExceeded, LedgerError
    from budgets.lease import LeaseLost, RunOwned
    from launcher.backends.base import BackendError
    from train.store import StoreError

    # BadInput (and NotFound, NoOffer) are ValueErrors
    return (BudgetExceeded, StoreError, BackendError, LedgerError, RunOwned, LeaseLost, ValueError)


def message(e: BaseException) -> str:
    """A refusal in one line, as the CLI prints it after "error: " (a cap: "refused: ...")."""
    from launcher.launch import launch_message

    return launch_message(e)


# ---- the workload a plan or launch asks for --------------------------------------------------------


def domain_names(domains: str) -> list[str]:
    """'all', a category, or comma-separated names -> the registry's domain names (BadInput if unknown)."""
    from launcher.launch import select

    return select(domains)


def resolve(
    domains: str,
    backend: str | None = None,
    run_id: str = "default",
    base_model: str | None = None,
    samples: int = 200,
    epochs: float = 2.0,
    config: Path | None = None,
    warm_start: bool = False,
    merged: bool = False,
):
    """The front half of plan and launch: (preferences, domain names, backend, workload). Unknown
    domains, backends, models and bad run ids raise BadInput here, before anything is planned."""
    from launcher.launch import resolve_backend, select
    from launcher.preferences import load_preferences
    from launcher.throughput import model_params
    from train.names import check_run_id

    check_run_id(run_id)
    prefs = load_preferences(config)
    names = select(domains)
    backend = resolve_backend(prefs, backend)
    model = base_model or ("tiny" if backend == "local" else "microsoft/DialoGPT-medium")
    model_params(model)  # unknown models fail here, before anything is planned
    work = workload(base_model=model, samples=samples, epochs=epochs, warm_start=warm_start, merged=merged)
    return prefs, names, backend, work


def workload(**fields: Any):
    """A `launcher.plan.Workload`, its numbers checked against `train.bounds` (samples, epochs: finite,
    at most their maximum); a bad one is BadInput in the CLI's words, one line, whichever face asked."""
    from pydantic import ValidationError

    from launcher.plan import Workload

    try:
        return Workload(**fields)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        name = str(err["loc"][0]).replace("_", "-") if err["loc"] else "value"
        raise BadInput(f"Invalid value for '--{name}': {err['msg']}") from None


def deadline_and_policy(deadline: str | None, policy: str | None) -> tuple[float | None, str | None]:
    """`--deadline` (e.g. 12h, 90m) in seconds and the policy that keeps it (meetara unless named)."""
    from launcher.policies import NAMES

    if policy is not None and policy not in NAMES:
        raise BadInput(f"unknown policy {policy!r}; known: {', '.join(NAMES)}")
    deadline_s = duration_s(deadline) if deadline else None
    return deadline_s, policy or ("meetara" if deadline_s else None)


MAX_DEADLINE_DAYS = 365  # a run is planned, priced and replayed within this; past it, it is a typo


def duration_s(text: str) -> float:
    """'12h', '90m', '2d', '3600s' (or plain seconds) in seconds, at most MAX_DEADLINE_DAYS; BadInput
    otherwise (launch, plan, recover and simulate all read --deadline here)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise BadInput(f"--deadline {text!r}: write a duration such as 12h, 90m or 2d")
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds > MAX_DEADLINE_DAYS * 86400:
        raise BadInput(f"--deadline {text!r}: at most {MAX_DEADLINE_DAYS}d")
    return seconds


def check_deadline(plan, deadline_s: float | None) -> None:
    """A deadline the plan cannot meet even with no preemption is refused before anything is spent."""
    if deadline_s is not None and plan.total_hours and max(j.hours for j in plan.jobs) * 3600 > deadline_s:
        need = max(j.hours for j in plan.jobs)
        raise BadInput(
            f"--deadline {deadline_s / 3600:.2f} h: the plan's longest job needs {need:.2f} h without a "
            "single preemption; allow more time or fewer domains per job (max_hours_per_job)"
        )


# ---- offers and plans -----------------------------------------------------------------------------


class OfferRow(BaseModel):
    provider: str
    gpu: str
    gpu_count: int
    gpu_mem_gb: int | float
    region: str
    spot: bool
    price_hour: float
    expected_hour: float  # price_hour with the expected preemption overhead (spot)
    weighted_hour: float  # expected_hour x the provider's weight: what the order (and a plan) ranks by
    detail: dict[str, Any] = {}  # the offer's other fields, as the provider gave them


class OffersView(BaseModel):
    source: str  # "snapshot" or "live"
    snapshot_date: str | None
    offers: list[OfferRow]  # cheapest weighted $/h first (expected x provider weight), at most `limit`
    gathered: int  # offers the providers (or the snapshot) gave, before preferences and filters
    matching: int  # how many passed the preferences and filters
    matching_providers: list[str]  # the providers of those
    skipped: dict[str, str] = {}  # per provider not asked: why (no API key, not selected)
    errors: dict[str, str] = {}  # per provider whose API failed: its error
    excluded: dict[str, str] = {}  # per provider whose offers the preferences all exclude: why

    @property
    def notes(self) -> dict[str, str]:
        return {**self.skipped, **self.errors, **self.excluded}


def offers(
    *,
    gpu: str | None = None,
    spot: bool | None = None,
    providers: list[str] | None = None,
    live: bool = False,
    refresh: bool = False,
    ignore_preferences: bool = False,
    limit: int = 25,
    config: Path | None = None,
) -> OffersView:
    """The price table across providers, ranked by expected $/h under the preferences."""
    if limit < 1:
        raise BadInput(f"Invalid value for '--limit': {limit} is not at least 1")
    from launcher.offers import gather_offers
    from launcher.preferences import Preferences, load_preferences
    from launcher.select import emptied_providers, rank

    table = gather_offers(live=live, providers=providers or None, refresh=refresh)
    prefs = Preferences() if ignore_preferences else load_preferences(config)
    if spot is not None:
        prefs = prefs.model_copy(update={"spot_policy": "spot" if spot else "on-demand"})
    found = [o for o in table.offers if not gpu or o.gpu.lower().startswith(gpu.lower())]
    ranked = rank(found, prefs)
    rows = []
    for c in ranked[:limit]:
        o = c.offer.model_dump(mode="json")
        keep = {k: o.pop(k) for k in ("provider", "gpu", "gpu_count", "gpu_mem_gb", "region")}
        rows.append(
            OfferRow(
                **keep,
                spot=c.spot,
                price_hour=c.price_hour,
                expected_hour=c.expected_hour,
                weighted_hour=c.score,
                detail=o,
            )
        )
    return OffersView(
        source=table.source,
        snapshot_date=str(table.snapshot_date) if table.snapshot_date else None,
        offers=rows,
        gathered=len(table.offers),
        matching=len(ranked),
        matching_providers=sorted({c.offer.provider for c in ranked}),
        skipped=table.skipped,
        errors=table.errors,
        excluded=emptied_providers(
            table.offers,
            prefs,
            flags={"spot_policy": "--spot" if spot else "--on-demand"} if spot is not None else None,
        ),
    )


def plan(
    domains: str,
    *,
    backend: str | None = None,
    run_id: str = "default",
    base_model: str | None = None,
    samples: int = 200,
    epochs: float = 2.0,
    store: str | None = None,
    endpoint_url: str | None = None,
    live: bool = False,
    providers: list[str] | None = None,
    warm_start: bool = False,
    deadline_s: float | None = None,
    config: Path | None = None,
    merged: bool = False,
):
    """Dry run (a `launcher.plan.Plan`): what `launch` with the same arguments would run. Domains done
    in the store are in `done`, not planned; a deadline the plan cannot meet is refused. `merged`: the
    jobs ship each domain's merged Q4_K_M model too (`plan.outputs` counts the bytes)."""
    from launcher.launch import plan_unfinished

    prefs, names, backend, work = resolve(
        domains, backend, run_id, base_model, samples, epochs, config, warm_start, merged
    )
    p = plan_unfinished(
        names,
        backend=backend,
        prefs=prefs,
        work=work,
        run_id=run_id,
        store=store,
        endpoint_url=endpoint_url,
        live=live,
        providers=providers,
    )
    if p.jobs:
        check_deadline(p, deadline_s)
    return p


def plan_overheads(plan) -> str:
    """The plan's per-domain and per-job overheads (export, validation, start-up), in words."""
    from launcher.plan import plan_overheads as overheads

    return overheads(plan).describe()


# ---- budget and reports ---------------------------------------------------------------------------


class BudgetView(BaseModel):
    timezone: str
    ledger: str
    windows: list[dict[str, Any]]  # daily, weekly, monthly: cap, spent, reserved, remaining, bounds
    open_reservations: list[dict[str, Any]]


def budget(config: Path | None = None) -> BudgetView:
    """Caps, spent, reserved and remaining per window (budget time zone), and the open reservations."""
    from budgets.query import open_ledger

    with open_ledger(config) as ledger:
        windows, held = ledger.window_status(), ledger.open_reservations()
        location, tz = ledger.location, ledger.config.timezone
    return BudgetView(
        timezone=tz,
        ledger=location,
        windows=[w.as_dict() for w in windows],
        open_reservations=[
            {
                "id": r.id,
                "run_id": r.run_id,
                "job": r.job,
                "provider": r.provider,
                "gpu": f"{r.gpu_count}x{r.gpu}",
                "domains": list(r.domains),
                "rate_per_hour": r.rate_per_hour,
                "amount": round(r.amount, 6),
                "accrued": round(r.accrued, 6),
                "outstanding": round(r.outstanding, 6),
                "created_at": r.created_at.isoformat(),
                "started_at": r.started_at.isoformat() if r.started_at else None,
            }
            for r in held
        ],
    )


class ReportView(BaseModel):
    by: str
    since: str | None
    until: str | None
    rows: list[dict[str, Any]]
    total: dict[str, Any]


def report(
    by: str = "provider",
    since: str | None = None,
    until: str | None = None,
    config: Path | None = None,
    max_age_s: float = 0.0,
) -> ReportView:
    """Cost per provider, domain, day or run from the ledger over [since, until] (`meetara report`);
    `max_age_s`: the stores' listings may be that old (`_domains_in_store`)."""
    from budgets import report as rep
    from budgets.query import query_report

    rows, total, start, stop = query_report(config, by, since, until, finished_in_stores(max_age_s))
    doc = json.loads(rep.to_json(rows, by=by, since=start, until=stop, total=total))
    return ReportView(
        by=by,
        since=start.isoformat() if start else None,
        until=stop.isoformat() if stop else None,
        rows=doc.get("rows", []),
        total=doc.get("total", {}),
    )


def report_rows(by: str, since: str | None, until: str | None, config: Path | None = None):
    """The report as `budgets.report.Row`s (rows, total, start, stop), for the CLI's table, CSV, PNG."""
    from budgets.query import query_report

    return query_report(config, by, since, until, finished_in_stores())


def finished_in_stores(max_age_s: float = 0.0) -> dict[str, dict[str, Any]]:
    """Per run this machine launched whose store can be read: its domains with a manifest there, and
    when each was written (the report counts domains done from this, not from how jobs ended)."""
    from datetime import UTC, datetime

    from launcher.runs import list_runs

    out: dict[str, dict[str, Any]] = {}
    for rec in list_runs():
        found, error = _domains_in_store(rec, max_age_s)
        if error is not None:
            continue  # the ledger's rule for this run
        out[rec.run_id] = {  # every domain of the run's store: a recover's plan names only the rest
            d: datetime.fromtimestamp(float(f["manifest"].get("created") or 0), UTC)
            for d, f in found.items()
            if f["manifest"] is not None
        }
    return out


# ---- runs -----------------------------------------------------------------------------------------


def load(run_id: str):
    """The run record of `run_id` (NotFound when this machine never launched it)."""
    from launcher.runs import load_run
    from train.names import check_run_id

    rec = load_run(check_run_id(run_id))
    if rec is None:
        raise NotFound(f"no run {run_id!r} on this machine (see meetara status)")
    return rec


def status(run_id: str | None = None) -> list[dict[str, Any]]:
    """One row per job of one run (or of every run): state, domains done, launches, preemptions,
    work lost, started, elapsed, machine time and cost so far (`meetara status --json`)."""
    from launcher.launch import status_rows

    return status_rows(run_id)


def job_rows(rec) -> list[dict[str, Any]]:
    """`status`'s rows for one run record in hand (the launcher's own, after following it)."""
    from launcher.launch import job_rows as rows

    return rows([rec])


class RunSummary(BaseModel):
    run_id: str
    backend: str
    store: str
    budget: float | None
    planned_cost: float
    created_at: str
    domains_done: int
    domains_total: int
    preemptions: int
    cost_so_far: float
    state: str  # running (a job active or planned), done (all succeeded), else the jobs' states
    jobs: list[dict[str, Any]]


class RunsView(BaseModel):
    runs: list[RunSummary]


def _run_state(rows: list[dict]) -> str:
    states = {r["state"] for r in rows}
    from launcher.runs import ACTIVE, LAUNCHING

    if states & (ACTIVE | {LAUNCHING, "planned"}):
        return "running"
    if states == {"SUCCEEDED"}:
        return "done"
    return ", ".join(sorted(s.lower() for s in states))


def runs(max_age_s: float = 0.0) -> RunsView:
    """Every run this machine launched, newest first, with its jobs' rows (`max_age_s`: the stores'
    listings may be that old, `_domains_in_store`)."""
    from launcher.launch import job_rows
    from launcher.runs import list_runs

    out = []
    for rec in sorted(list_runs(), key=lambda r: r.created_at, reverse=True):
        if max_age_s > 0:  # the dashboard's: one reading of the store shared by its pages
            found, error = _domains_in_store(rec, max_age_s)
            rows = job_rows([rec], None if error else _done(found))
        else:
            rows = job_rows([rec])
        out.append(
            RunSummary(
                run_id=rec.run_id,
                backend=rec.backend,
                store=rec.store,
                budget=rec.budget,
                planned_cost=rec.plan.total_cost,
                created_at=rec.created_at.isoformat(),
                domains_done=sum(r["domains_done"] for r in rows),
                domains_total=sum(r["domains"] for r in rows),
                preemptions=sum(r["preemptions"] for r in rows),
                cost_so_far=round(sum(r["cost_so_far"] for r in rows), 6),
                state=_run_state(rows),
                jobs=rows,
            )
        )
    return RunsView(runs=out)


# the dashboard's live pages poll about once a second each: what they read of a run's store (one LIST
# on S3, and its manifests) is shared between them for this long (keyed by store and run)
LISTING_MAX_AGE_S = 5.0
_listings: dict[tuple[str, str | None, str], tuple[float, dict[str, dict], str | None]] = {}
_listings_lock = threading.Lock()


def _done(found: dict[str, dict]) -> set[str]:
    return {d for d, f in found.items() if f["manifest"] is not None}


def _domains_in_store(rec, max_age_s: float = 0.0) -> tuple[dict[str, dict], str | None]:
    """Per domain of the run: its manifest.json / failed.json, checkpoint steps and file sizes in the
    store. One listing of the run's folder; ({}, error) where the store cannot be read. With
    `max_age_s`, a reading of the same store and run at most that old is reused (the dashboard's)."""
    key = (rec.store, rec.endpoint_url, rec.run_id)
    if max_age_s <= 0:
        found, error = _read_domains(rec)
        with _listings_lock:
            _listings[key] = (time.monotonic(), found, error)
        return found, error
    with _listings_lock:  # held while reading: pages asking at once share one listing
        hit = _listings.get(key)
        if hit is not None and time.monotonic() - hit[0] < max_age_s:
            return hit[1], hit[2]
        found, error = _read_domains(rec)
        _listings[key] = (time.monotonic(), found, error)
        return found, error


def _read_domains(rec) -> tuple[dict[str, dict], str | None]:
    from train.store import StoreError, open_store

    prefix = f"runs/{rec.run_id}/domains/"
    found: dict[str, dict] = {}
    try:
        st = open_store(rec.store, endpoint_url=rec.endpoint_url, writable=False)
        keys = st.list(prefix.rstrip("/"))
    except StoreError as e:
        return {}, str(e)
    step = re.compile(r"/checkpoints/step-(\d{8})/")
    for key in keys:
        rest = key[len(prefix) :] if key.startswith(prefix) else None
        if not rest or "/" not in rest:
            continue
        domain, name = rest.split("/", 1)
        d = found.setdefault(domain, {"manifest": None, "failed": None, "steps": set()})
        if name in ("manifest.json", "failed.json"):
            with contextlib.suppress(StoreError, KeyError, ValueError):
                d["manifest" if name == "manifest.json" else "failed"] = json.loads(st.get(key))
        elif m := step.search("/" + name):
            d["steps"].add(int(m.group(1)))
    return found, None


def quality_of(manifest: dict) -> dict[str, Any]:
    """The quality numbers of one domain's manifest (or failed.json)."""
    m, v = manifest.get("metrics", {}), manifest.get("validation", {})
    q = manifest.get("data", {}).get("quality", {})
    checks = {}
    for name, f in v.get("files", {}).items():
        llama = f.get("llama_cpp") or {}
        checks[name] = {
            "passed": f.get("passed"),
            "header_ok": f.get("header_ok"),
            "size_ok": (f.get("size") or {}).get("ok"),
            "max_abs_diff": llama.get("max_abs_diff"),
            "top1_agreement": llama.get("top1_agreement"),
        }
    return {
        "status": manifest.get("status"),
        "base_model": manifest.get("base_model"),
        "acceptance_rate": q.get("acceptance_rate"),
        "samples_accepted": q.get("accepted"),
        "samples_total": q.get("total"),
        "rejected": q.get("rejected"),
        "heldout_loss_before": m.get("heldout_loss_before"),
        "heldout_loss_after": m.get("heldout_loss_after"),
        "heldout_loss_improved": v.get("heldout_loss_improved"),
        "validation_passed": bool(v.get("passed")),
        "checks_passed": sum(bool(c["passed"]) for c in checks.values()),
        "checks": checks,
        "steps": m.get("steps"),
        "final_train_loss": m.get("final_train_loss"),
        "tokens_per_second": m.get("tokens_per_second"),
    }


class RunDetail(BaseModel):
    run_id: str
    backend: str
    store: str
    models_dir: str
    budget: float | None
    planned_cost: float
    planned_hours: float
    cost_so_far: float
    base_model: str
    workload: dict[str, Any] = {}  # what each domain trains: base model, samples, epochs
    created_at: str
    state: str
    domains_total: int
    done: int
    failed: int
    training: int
    pending: int
    store_error: str | None
    jobs: list[dict[str, Any]]
    domains: list[dict[str, Any]]  # per domain: state, checkpoint step, losses, validation, files
    # per domain: the training curve (train steps and held-out losses, as train.metrics records them)
    curves: dict[str, list[dict[str, Any]]] = {}
    # what happened when, oldest first: {at, job, kind (launched, preempted, relaunched, ...), text}
    timeline: list[dict[str, Any]] = []


_KINDS = (  # a job history note's first words -> its kind on the time line
    ("injected preemption", "injected"),  # the kill (--preempt-every); "preempted" follows when seen
    ("preempted", "preempted"),
    ("the backend recovered", "recovered"),
    ("launched", "launched"),
    ("relaunch", "launched"),
    ("cancel", "cancelled"),
    ("succeeded", "succeeded"),
    ("failed", "failed"),
)


def _timeline(rec) -> list[dict[str, Any]]:
    out = []
    for job in rec.jobs.values():
        for note in job.history:
            at, _, text = note.partition(" ")
            kind = next((k for prefix, k in _KINDS if text.lower().startswith(prefix)), "note")
            out.append({"at": at, "job": job.name, "kind": kind, "text": text})
    return sorted(out, key=lambda e: e["at"])


def run_detail(run_id: str, *, curves: bool = True, max_age_s: float = 0.0) -> RunDetail:
    """One run: its jobs and, per domain, where it stands (store first, then the job's state), the
    files it produced and their sizes, its training curves and its time line (`max_age_s`: the
    store's listing may be that old, `_domains_in_store`)."""
    from launcher.launch import job_rows
    from launcher.runs import ACTIVE
    from train.metrics import read_metrics
    from train.store import StoreError, open_store

    rec = load(run_id)
    found, error = _domains_in_store(rec, max_age_s)  # one listing of the store serves the job rows too
    rows = job_rows([rec], None if error else _done(found))
    state_of = {r["job"]: r["state"] for r in rows}
    models = Path(rec.models_dir)
    domains = []
    for job in rec.jobs.values():
        for d in job.domains:
            f = found.get(d, {"manifest": None, "failed": None, "steps": set()})
            entry: dict[str, Any] = {"domain": d, "job": job.name, "job_state": state_of.get(job.name)}
            if f["manifest"] is not None:
                entry["state"] = "done"
            elif f["failed"] is not None:
                entry["state"] = "failed"
            elif f["steps"] and state_of.get(job.name) in ACTIVE:
                entry["state"] = "training"
            else:
                entry["state"] = "pending"  # not started, or waiting to resume from its checkpoint
            entry["checkpoint_step"] = max(f["steps"], default=None)
            manifest = f["manifest"] or f["failed"]
            if manifest is not None:
                qual = quality_of(manifest)
                entry.update({k: qual[k] for k in ("heldout_loss_before", "heldout_loss_after")})
                entry["validation_passed"] = qual["validation_passed"]
                entry["acceptance_rate"] = qual["acceptance_rate"]
                entry["files"] = {
                    name: {"bytes": info.get("size"), "sha256": info.get("sha256")}
                    for name, info in (manifest.get("files") or {}).items()
                    if isinstance(info, dict)
                }
            entry["pulled"] = (models / d / "manifest.json").exists()
            domains.append(entry)
    count = {s: sum(e["state"] == s for e in domains) for s in ("done", "failed", "training", "pending")}
    got: dict[str, list[dict]] = {}
    if curves and error is None:
        with contextlib.suppress(StoreError):
            st = open_store(rec.store, endpoint_url=rec.endpoint_url, writable=False)
            for e in domains:
                if found.get(e["domain"]):
                    got[e["domain"]] = read_metrics(st, rec.run_id, e["domain"])
    return RunDetail(
        run_id=rec.run_id,
        backend=rec.backend,
        store=rec.store,
        models_dir=rec.models_dir,
        budget=rec.budget,
        planned_cost=rec.plan.total_cost,
        planned_hours=rec.plan.total_hours,
        cost_so_far=round(sum(r["cost_so_far"] for r in rows), 6),
        base_model=rec.plan.workload.base_model,
        workload=rec.plan.workload.model_dump(mode="json"),
        created_at=rec.created_at.isoformat(),
        state=_run_state(rows),
        domains_total=len(domains),
        **count,
        store_error=error,
        jobs=rows,
        domains=domains,
        curves=got,
        timeline=_timeline(rec),
    )


class QualityView(BaseModel):
    domains: list[dict[str, Any]]
    validated: int
    mean_acceptance_rate: float | None


def quality() -> QualityView:
    """Per finished domain of every run: data acceptance, held-out losses, validation checks."""
    from launcher.runs import list_runs

    out: list[dict[str, Any]] = []
    for rec in list_runs():
        found, error = _domains_in_store(rec)
        for d in [d for j in rec.plan.jobs for d in j.domains]:
            manifest = (found.get(d) or {}).get("manifest") or (found.get(d) or {}).get("failed")
            if manifest is not None:
                out.append({"run_id": rec.run_id, "domain": d, **quality_of(manifest)})
        if error:
            out.append({"run_id": rec.run_id, "store_error": error})
    passed = [q for q in out if q.get("validation_passed")]
    mean = round(sum(q["acceptance_rate"] or 0 for q in passed) / len(passed), 4) if passed else None
    return QualityView(domains=out, validated=len(passed), mean_acceptance_rate=mean)


class Recoverable(BaseModel):
    run: str
    backend: str
    store: str
    unfinished: list[str]
    planned_hour: list[float]


def recoverable(run_id: str | None = None) -> list[Recoverable]:
    """The runs (or the one run) with domains not done in their stores."""
    from launcher.launch import unfinished
    from launcher.runs import select_runs

    out = []
    for rec in select_runs(run_id, "meetara recover"):
        out.append(
            Recoverable(
                run=rec.run_id,
                backend=rec.backend,
                store=rec.store,
                unfinished=unfinished(rec),
                planned_hour=sorted({round(j.offer.expected_hour, 3) for j in rec.plan.jobs}),
            )
        )
    return out


# ---- pulling outputs ------------------------------------------------------------------------------


class Pulled(BaseModel):
    domain: str
    status: str  # pulled, up-to-date, not-finished, failed-validation, error
    files: dict[str, str] = {}
    bytes: int = 0
    detail: str = ""


class PullView(BaseModel):
    run_id: str
    models_dir: str
    domains: list[Pulled]

    @property
    def here(self) -> int:
        return sum(r.status in ("pulled", "up-to-date") for r in self.domains)


def pull(
    run_id: str = "default",
    domains: str = "all",
    *,
    store: str | None = None,
    endpoint_url: str | None = None,
    models_dir: Path = Path("models"),
) -> PullView:
    """Download a run's validated GGUFs (sha256-checked, atomic, resumable) into `models_dir`."""
    from launcher.launch import select
    from launcher.pull import open_run_store

    names = select(domains)
    st = open_run_store(run_id, store, endpoint_url)
    return pull_from(st, run_id, names, models_dir)


def pull_from(st, run_id: str, names: list[str], models_dir: Path, on_result=None) -> PullView:
    """`pull` from an open store (the launcher's own, after following a run)."""
    from launcher.pull import pull as pull_run

    results = pull_run(st, run_id, names, models_dir, on_result or (lambda r: None))
    return PullView(
        run_id=run_id,
        models_dir=str(models_dir),
        domains=[
            Pulled(domain=r.domain, status=r.status, files=r.files, bytes=r.bytes, detail=r.detail or "")
            for r in results
        ],
    )


# ---- launching ------------------------------------------------------------------------------------


class Started(BaseModel):
    """A run handed to a background follower (or found done, or already followed)."""

    run_id: str
    state: str  # "following": a follower owns it now; "done": every domain was done already
    backend: str
    planned_cost: float
    domains: list[str]  # the domains the run trains (skipped ones not included)
    skipped: int  # asked for but already done in the store
    jobs: dict[str, str] = {}
    pid: int | None = None  # the follower's
    log: str | None = None  # the follower's output
    models_dir: str
    settled: int = 0  # reservations an earlier, dead launcher left open and this call settled


def start_launch(
    domains: str,
    budget: float,
    *,
    backend: str | None = None,
    run_id: str = "default",
    base_model: str | None = None,
    samples: int = 200,
    epochs: float = 2.0,
    store: str | None = None,
    endpoint_url: str | None = None,
    models_dir: Path = Path("models"),
    poll: float = 2.0,
    deadline: str | None = None,
    policy: str | None = None,
    warm_start: bool = False,
    chaos=None,
    config: Path | None = None,
    on_progress=None,
) -> Started:
    """Plan, check the budget and reserve it (refusals raise here, before anything runs), then hand the
    run to a background follower that launches and follows its jobs and pulls their GGUFs. Returns at
    once. Calling it is the consent to spend up to `budget`. `on_progress(message)` hears each step."""
    prefs, names, backend, work = resolve(
        domains, backend, run_id, base_model, samples, epochs, config, warm_start
    )
    deadline_s, policy = deadline_and_policy(deadline, policy)
    return start_prepared(
        names,
        prefs=prefs,
        backend=backend,
        work=work,
        run_id=run_id,
        budget=budget,
        store=store,
        endpoint_url=endpoint_url,
        models_dir=models_dir,
        poll=poll,
        deadline_s=deadline_s,
        policy=policy,
        chaos=chaos,
        config=config,
        on_progress=on_progress,
    )


def start_recover(
    run_id: str, budget: float | None, *, poll: float = 2.0, config: Path | None = None, on_progress=None
) -> Started:
    """`recover` in the background: adopt what still runs, settle what a dead launcher left, relaunch
    the unfinished domains from their checkpoints (within `budget`) under a background follower."""
    from budgets import clock
    from launcher.preferences import load_preferences

    rec = load(run_id)
    deadline_s = None if rec.deadline is None else max((rec.deadline - clock.now()).total_seconds(), 1.0)
    return start_prepared(
        [d for j in rec.plan.jobs for d in j.domains],
        prefs=load_preferences(config),
        backend=rec.backend,
        work=rec.plan.workload,
        run_id=rec.run_id,
        budget=budget,
        store=rec.store,
        endpoint_url=rec.endpoint_url,
        models_dir=Path(rec.models_dir),
        poll=poll,
        deadline_s=deadline_s,
        policy=rec.policy,
        config=config,
        on_progress=on_progress,
    )


def start_prepared(
    names: list[str],
    *,
    prefs,
    backend: str,
    work,
    run_id: str,
    budget: float | None,
    store: str | None,
    endpoint_url: str | None,
    models_dir: Path,
    poll: float,
    deadline_s: float | None = None,
    policy: str | None = None,
    chaos=None,
    config: Path | None = None,
    on_progress=None,
) -> Started:
    """The body of `start_launch` and `start_recover`, for resolved arguments."""
    from budgets import usd
    from launcher import launch as L

    say = on_progress or (lambda text: None)
    prep = L.prepare(
        names,
        prefs=prefs,
        backend=backend,
        work=work,
        run_id=run_id,
        store=store,
        endpoint_url=endpoint_url,
        budget=budget,
        config=config,
        models_dir=models_dir,
    )
    with prep:
        rec = prep.rec
        if rec is None and prep.plan is None:  # every domain is done: make sure the files are here
            pull_from(prep.store, run_id, names, models_dir)
            return Started(
                run_id=run_id,
                state="done",
                backend=backend,
                planned_cost=0.0,
                domains=[],
                skipped=prep.skipped,
                models_dir=str(models_dir),
                settled=len(prep.settled),
            )
        if rec is None:
            check_deadline(prep.plan, deadline_s)
            if budget is None:
                raise BadInput("pass a budget to launch the unfinished domains (see plan)")
            p = prep.plan
            n = sum(len(j.domains) for j in p.jobs)
            say(f"planned {n} domains in {len(p.jobs)} job(s) for {usd(p.total_cost)}")
            rec = L.commit(
                prep,
                endpoint_url=endpoint_url,
                models_dir=models_dir,
                budget=budget,
                deadline_s=deadline_s,
                policy=policy,
            )
            held = sum(r.amount for r in prep.ledger.open_reservations(run_id))
            say(f"reserved {usd(held)} in the ledger (the plan's cost and its margin)")
        else:
            say(f"run {run_id} has jobs still running: a follower takes them over")
        started_run = detach(prep, rec, poll=poll, config=config, chaos=chaos)
        say(f"following in the background (pid {started_run.pid})")
        return started_run.model_copy(update={"skipped": prep.skipped, "settled": len(prep.settled)})


def detach(prep, rec, *, poll: float, config: Path | None = None, chaos=None) -> Started:
    """Hand a committed (or adopted) run, whose lease `prep` holds, to a background follower."""
    from launcher import background

    f = background.start(prep, rec, poll=poll, config=config, chaos=chaos)
    return Started(
        run_id=rec.run_id,
        state="following",
        backend=rec.backend,
        planned_cost=rec.plan.total_cost,
        domains=[d for j in rec.jobs.values() for d in j.domains],
        skipped=0,
        jobs={n: j.state for n, j in rec.jobs.items()},
        pid=f.pid,
        log=str(f.log),
        models_dir=rec.models_dir,
    )


class RunProgress(BaseModel):
    """Where a run stands, as `wait` (MCP) and the dashboard watch it."""

    run_id: str
    ended: bool  # its follower finished (and pulled), or nobody follows it any more
    state: str
    domains_done: int
    domains_total: int
    jobs: dict[str, str]  # job -> its phase
    exit_code: int | None = None  # the follower's, once ended
    message: str | None = None
    domains_here: int | None = None  # pulled into the models folder, once ended


def progress(run_id: str) -> RunProgress:
    """The run's progress now, from its record, its store and its follower's liveness."""
    from budgets.lease import proc_start
    from launcher.launch import done_in_store
    from launcher.preferences import load_preferences

    rec = load(run_id)
    f = rec.follower or {}
    max_recoveries = load_preferences().max_recoveries
    jobs = {n: j.phase(max_recoveries) for n, j in rec.jobs.items()}
    done = done_in_store(rec)
    names = [d for j in rec.jobs.values() for d in j.domains]
    ended, state, message = False, "following", f.get("message")
    if f.get("state") == "ended":
        ended, state = True, "ended"
    elif f.get("pid") and proc_start(int(f["pid"])) is None:
        ended, state = True, "orphaned"
        message = f"its follower (pid {f['pid']}) is gone; `meetara recover {run_id}` adopts the run"
    elif not f:
        ended, state = True, "not followed in the background"
    return RunProgress(
        run_id=run_id,
        ended=ended,
        state=state,
        domains_done=sum(d in done for d in names),
        domains_total=len(names),
        jobs=jobs,
        exit_code=f.get("exit_code"),
        message=message,
        domains_here=f.get("domains_here"),
    )


def watch(run_id: str, wait_s: float, on_progress=None, poll_s: float = 1.0) -> RunProgress:
    """Poll the run's progress every `poll_s` until it ends or `wait_s` passed; `on_progress(text,
    done, total)` hears every change. Returns the last progress read."""
    import time

    say = on_progress or (lambda *a: None)
    until = time.monotonic() + wait_s
    seen = None
    while True:
        p = progress(run_id)
        now = (p.ended, p.domains_done, tuple(p.jobs.items()))
        if now != seen:
            phases = "; ".join(f"{n}: {ph}" for n, ph in p.jobs.items())
            say(f"{p.domains_done}/{p.domains_total} domains done; {phases}", p.domains_done, p.domains_total)
            seen = now
        left = until - time.monotonic()
        if p.ended or left <= 0:
            return p
        time.sleep(min(poll_s, left))  # polling the run's files: its follower is another process


# ---- provider preferences -------------------------------------------------------------------------


class PreferencesView(BaseModel):
    path: str  # the preferences file
    preferences: dict[str, Any]  # in force: the file, then MEETARA_* variables


def preferences(config: Path | None = None) -> PreferencesView:
    """The provider preferences in force (file, then env)."""
    from launcher.preferences import config_path, load_preferences

    return PreferencesView(path=str(config_path(config)), preferences=load_preferences(config).model_dump())


PROVIDER_FIELDS = {"enabled", "weight", "max_price_per_gpu_hour", "regions"}


class Saved(BaseModel):
    path: str
    warnings: dict[str, str]  # per provider whose snapshot offers the new preferences all exclude


def set_preferences(
    provider: str | None = None, changes: dict[str, Any] | None = None, config: Path | None = None
) -> Saved:
    """Change preferences (of one provider: enabled, weight, max_price_per_gpu_hour, regions; or the
    settings across providers) and write them back to the file, keeping its comments and layout.
    None values are left as they are. The warnings say which providers the change empties."""
    from pydantic import ValidationError

    from launcher.offers import gather_offers
    from launcher.preferences import PROVIDERS, Preferences, config_path, load_preferences, save_preferences
    from launcher.select import emptied_providers

    changes = {k: v for k, v in (changes or {}).items() if v is not None}
    # the file's settings alone: a MEETARA_* variable in force now is not written into the file
    data = load_preferences(config, env=False).model_dump()
    if provider is not None:
        if provider not in PROVIDERS:
            raise BadInput(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
        data["providers"][provider].update(changes)
    else:
        if changes.keys() & {"enabled", "weight", "regions"}:
            raise BadInput(
                "--enable/--disable, --weight and --regions need a provider (meetara providers set vast)"
            )
        data.update(changes)
    try:
        prefs = Preferences.model_validate(data)
    except ValidationError as e:
        raise BadInput.from_validation(e) from None
    try:
        saved = save_preferences(prefs, config)
    except OSError as e:
        raise BadInput(f"{config_path(config)}: cannot write ({e.strerror or type(e).__name__})") from None
    table = gather_offers()  # the bundled snapshot: no network
    return Saved(
        path=str(saved),
        warnings={
            name: f"{why} (snapshot of {table.snapshot_date}; see meetara offers --all)"
            for name, why in emptied_providers(table.offers, prefs).items()
        },
    )


# ---- launching in the foreground (the CLI asks before it spends) ----------------------------------


def prepare_launch(names: list[str], **kwargs: Any):
    """Step 1 of a foreground launch (`launcher.launch.prepare`): check everything, take the run's
    lease, adopt or settle what a crashed launcher left, plan the unfinished domains. Nothing spent."""
    from launcher.launch import prepare

    return prepare(names, **kwargs)


def commit_launch(prep, **kwargs: Any):
    """Step 2: reserve the plan's cost in the ledger (all jobs or none) and record the run."""
    from launcher.launch import commit

    return commit(prep, **kwargs)


def follow_run(rec, prep, prefs, **kwargs: Any):
    """Step 3: follow the jobs to their end in this process (`launcher.launch.follow`: an Outcome)."""
    from launcher.launch import follow

    return follow(rec, prep, prefs, **kwargs)


def chaos(every_s: float | None, seed: int = 0, max_kills: int = 3):
    """Injected preemptions for the local backend (`--preempt-every`), or None."""
    from launcher.conductor import Chaos

    return Chaos(every_s, seed, max_kills) if every_s else None


# ---- spot-market replay ---------------------------------------------------------------------------


def simulate(
    domains: str,
    market: str,
    *,
    policies: list[str] | None = None,
    replays: int = 50,
    seed: int = 0,
    budget: float | None = None,
    deadline: str | None = None,
    base_model: str = "microsoft/DialoGPT-medium",
    samples: int = 200,
    epochs: float = 2.0,
    checkpoint_minutes: float = 10.0,
    config: Path | None = None,
    on_replay=None,
) -> dict[str, Any]:
    """Replay a spot market under the real conductor and money code on a virtual clock: per policy,
    cost, hours, deadlines missed and preemptions, beside the omniscient optimum (`launcher.simulate`).
    `on_replay(k)` hears each finished replay."""
    from budgets.caps import load_budget_config
    from launcher.launch import select
    from launcher.market import market_from
    from launcher.policies import NAMES
    from launcher.preferences import config_path, load_preferences
    from launcher.simulate import make_setup
    from launcher.simulate import simulate as replay_all

    prefs = load_preferences(config)
    names = select(domains)
    chosen = list(dict.fromkeys(policies or NAMES))
    unknown = [p for p in chosen if p not in NAMES]
    if unknown:
        raise BadInput(f"unknown policy {unknown[0]!r}; known: {', '.join(NAMES)}")
    setup = make_setup(
        names,
        market_from(market),
        chosen,
        prefs=prefs,
        caps=load_budget_config(config_path(config)),
        work=workload(base_model=base_model, samples=samples, epochs=epochs),
        budget=budget,
        deadline_s=duration_s(deadline) if deadline else None,
        checkpoint_s=checkpoint_minutes * 60,
    )
    return replay_all(setup, chosen, replays, seed, progress=on_replay or (lambda k: None))


def plot_simulation(out: dict[str, Any], path: Path, title: str) -> None:
    """A PNG chart of `simulate`'s costs per policy."""
    from launcher.simulate import plot

    plot(out, path, title)
