"""`meetara mcp`: the launcher as a Model Context Protocol server on stdin/stdout (official `mcp` SDK).

Tools are the CLI's commands, calling the same library functions under the same budget caps and the
same validation of arguments: offers, plan, launch, status, report, recover, pull. A refused call
comes back as a tool error whose text is the one-line message the CLI prints after "error: " (for
launch and recover, `launch_message`; for an argument of the wrong type or out of range, click's
"Invalid value for '--budget': ..." without the CLI's "(see meetara --help)" pointer). Arguments are
checked strictly, before anything is planned or reserved: "5" is not a number, "true" not a boolean,
an unknown argument is refused, a run id follows the job's rule (`train.names.RunId`).

Resources (JSON): meetara://budget (caps, spent, reserved per window; open reservations),
meetara://runs (every run this machine launched, per job state and domains done),
meetara://runs/{run_id} (per domain: done / failed / training / pending, checkpoint step, held-out
loss before and after, validation) and meetara://quality (per finished domain: data acceptance rate,
held-out losses, validation checks).

`launch` does not ask: calling it is the consent to spend up to `budget` (the CLI's --yes). It
blocks until the run's jobs end and their GGUFs are pulled; relative paths (models_dir, the default
./store) are relative to the server's working directory (`meetara mcp --workdir`). A client names
paths only inside that directory: `models_dir` and a file:// (or bare path) `store` are resolved
(symlinks, "..") and refused outside it unless the server was started with `--allow-outside-workdir`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import Field

from train.names import RunId as JobRunId

# Argument types: the SDK builds each tool's argument model (and its JSON schema) from them; the server
# validates them strictly and answers a mismatch in the CLI's words (see _argument_error).
Budget = Annotated[
    float,
    Field(ge=0, description="most this launch may cost, USD (calling launch is the consent to spend it)"),
]
OptionalBudget = Annotated[
    Annotated[float, Field(ge=0)] | None,
    Field(description="most the relaunch may cost, USD (needed to relaunch)"),
]
Samples = Annotated[int, Field(ge=16, description="conversations per domain")]
Epochs = Annotated[float, Field(ge=0.01, description="epochs")]
Limit = Annotated[int, Field(ge=1, description="rows at most")]
Domains = Annotated[str, Field(description="'all', a category, or comma-separated domain names")]
Backend = Annotated[str | None, Field(description="local, skypilot or auto (default from preferences: auto)")]
RunId = Annotated[JobRunId, Field(description="names the run; the same id resumes it")]
BaseModelName = Annotated[
    str | None, Field(description="default: tiny (local), microsoft/DialoGPT-medium (cloud)")
]
Store = Annotated[
    str | None,
    Field(
        description="file://DIR (under the server's workdir) or s3://BUCKET/PREFIX (default: MEETARA_STORE)"
    ),
]
ModelsDir = Annotated[str, Field(description="where validated GGUFs land (under the server's workdir)")]

# The CLI's name of an argument where it is not "--" + the name with dashes.
FLAGS = {"providers": "--provider", "spot": "--spot/--on-demand"}

ALLOW_FLAG = "--allow-outside-workdir"


def _argument_error(tool: str, arg_model: Any, arguments: dict[str, Any]) -> str | None:
    """What is wrong with a tool's `arguments`, in one line and the CLI's words; None when nothing is.

    Strict: no coercion ("5" is not a number, "true" not a boolean, 1 not true) and no unknown names."""
    from pydantic import ValidationError

    from train.names import check_run_id

    names = [f.alias or n for n, f in arg_model.model_fields.items()]
    unknown = [k for k in arguments if k not in names]
    if unknown:
        return f"No such option: {unknown[0]} ({tool} takes {', '.join(names) or 'no arguments'})"
    try:
        arg_model.model_validate(arguments, strict=True)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        if err["type"] == "missing":
            return f"Missing option '{flag}'."
        if name == "run_id":  # the job's rule, in its words
            try:
                check_run_id(arguments[name])
            except ValueError as bad:
                return str(bad)
        return " ".join(f"Invalid value for '{flag}': {err['msg']}".split())
    return None


def _confine(value: str, arg: str, workdir: Path | None, path: str | None = None) -> None:
    """BadInput unless the path `value` names (`path`, default `value` itself; relative: to the workdir,
    the server's cwd), symlinks and ".." resolved, lies in `workdir` (None: anywhere is allowed, the
    server was started with --allow-outside-workdir)."""
    from train import BadInput

    if workdir is None:
        return
    real = Path(value if path is None else path).expanduser().resolve()
    if not real.is_relative_to(workdir):
        shown = repr(value) if str(real) == value else f"{value!r} ({real})"
        raise BadInput(
            f"{arg} {shown} is outside the server's workdir {workdir}: use a path under it, or start "
            f"the server with `meetara mcp {ALLOW_FLAG}`"
        )


def _confine_store(url: str | None, workdir: Path | None) -> None:
    """A file:// store (or a bare path) must lie in the workdir; s3:// and the rest are not local paths."""
    if url is not None and (url.startswith("file://") or "://" not in url):
        _confine(url, "store", workdir, url.removeprefix("file://"))


def _refusals() -> tuple[type[BaseException], ...]:
    """What the CLI turns into a one-line error (the rest is a bug and gets the SDK's generic error)."""
    from budgets import BudgetExceeded, LedgerError
    from launcher.backends.base import BackendError
    from train.store import StoreError

    return (BudgetExceeded, StoreError, BackendError, LedgerError, ValueError)  # BadInput is a ValueError


def _tool_error(message: str):
    import mcp.types as types

    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


def _refusing(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Return the CLI's one-line message as the tool error (the SDK would prefix it)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from launcher.launch import launch_message

        try:
            return fn(*args, **kwargs)
        except _refusals() as e:
            return _tool_error(launch_message(e))

    return wrapper


def _strict_server_class():
    """MCPServer whose tools check their arguments strictly and answer a mismatch in one line (the SDK
    would parse JSON out of strings, coerce "5" to 5, and answer a mismatch with a pydantic dump)."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.utilities.func_metadata import FuncMetadata

    class StrictArguments(FuncMetadata):
        def pre_parse_json(self, data: dict[str, Any]) -> dict[str, Any]:
            return data  # a string stays a string: "5" is not a number, "null" not null

        def validate_arguments(self, arguments_to_validate: dict[str, Any]) -> dict[str, Any]:
            return self.arg_model.model_validate(arguments_to_validate, strict=True).model_dump_one_level()

    class StrictServer(MCPServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # meetara has no prompts: without their handlers the server does not advertise a prompts
            # capability that would list nothing
            handlers = getattr(self._lowlevel_server, "_request_handlers", {})  # the SDK's own table
            for method in ("prompts/list", "prompts/get"):
                handlers.pop(method, None)

        def add_tool(self, fn: Callable[..., Any], name: str | None = None, **kwargs: Any) -> None:
            super().add_tool(fn, name=name, **kwargs)
            tool = self._tool_manager.get_tool(name or fn.__name__)
            meta = tool.fn_metadata
            tool.fn_metadata = StrictArguments(
                arg_model=meta.arg_model,
                output_schema=meta.output_schema,
                output_model=meta.output_model,
                wrap_output=meta.wrap_output,
            )

        async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
            tool = self._tool_manager.get_tool(name)
            if tool is not None:
                problem = _argument_error(name, tool.fn_metadata.arg_model, arguments)
                if problem is not None:
                    return _tool_error(problem)
            return await super().call_tool(name, arguments, context)

    return StrictServer


# ---- what the resources and `status` show --------------------------------------------------------


def _domains_in_store(rec) -> tuple[dict[str, dict], str | None]:
    """Per domain of the run: which of manifest.json / failed.json / checkpoints its store holds.
    One listing of the run's folder; (state, error) where the store cannot be read."""
    import re

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


def _quality(manifest: dict) -> dict:
    """The quality numbers of one domain's manifest (or failed.json)."""
    m, v = manifest.get("metrics", {}), manifest.get("validation", {})
    q = manifest.get("data", {}).get("quality", {})
    before, after = m.get("heldout_loss_before"), m.get("heldout_loss_after")
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
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "heldout_loss_improved": v.get("heldout_loss_improved"),
        "validation_passed": bool(v.get("passed")),
        "checks_passed": sum(bool(c["passed"]) for c in checks.values()),
        "checks": checks,
        "steps": m.get("steps"),
        "final_train_loss": m.get("final_train_loss"),
        "tokens_per_second": m.get("tokens_per_second"),
    }


def _run_detail(rec) -> dict:
    """One run: its jobs and, per domain, where it stands (store first, then the job's state)."""
    from launcher.launch import job_rows
    from launcher.runs import ACTIVE

    rows = job_rows([rec])
    state_of = {r["job"]: r["state"] for r in rows}
    found, error = _domains_in_store(rec)
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
                qual = _quality(manifest)
                entry.update({k: qual[k] for k in ("heldout_loss_before", "heldout_loss_after")})
                entry["validation_passed"] = qual["validation_passed"]
                entry["acceptance_rate"] = qual["acceptance_rate"]
            entry["pulled"] = (models / d / "manifest.json").exists()
            domains.append(entry)
    count = {s: sum(e["state"] == s for e in domains) for s in ("done", "failed", "training", "pending")}
    return {
        "run_id": rec.run_id,
        "backend": rec.backend,
        "store": rec.store,
        "models_dir": rec.models_dir,
        "budget": rec.budget,
        "planned_cost": rec.plan.total_cost,
        "planned_hours": rec.plan.total_hours,
        "base_model": rec.plan.workload.base_model,
        "created_at": rec.created_at.isoformat(),
        "domains_total": len(domains),
        **count,
        "store_error": error,
        "jobs": rows,
        "domains": domains,
    }


# ---- the server ----------------------------------------------------------------------------------


def build_server(config: Path | None = None, workdir: Path | None = None, allow_outside: bool = False):
    """The MCP server: tools and resources over the launcher (`config`: the preferences file). Paths a
    client names must lie in `workdir` (default: the cwd) unless `allow_outside`."""
    from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError

    confined_to = None if allow_outside else (workdir or Path.cwd()).resolve()
    from launcher.console import version

    server = _strict_server_class()(
        "meetara",
        version=version(),
        instructions=(
            "meetara fine-tunes one LoRA adapter per knowledge domain on rented spot GPUs (or this machine) "
            "under dollar budgets and brings back validated GGUF files. Call plan before launch; launch "
            "spends at most its budget (and the ledger's daily/weekly/monthly caps) and blocks until the "
            "jobs end. Read meetara://budget for what is left, meetara://runs for progress."
        ),
        log_level=os.environ.get("MEETARA_LOG", "WARNING").upper(),  # type: ignore[arg-type]
    )
    launching = threading.Lock()  # one launch at a time per server: two would race for the same run

    def launch_alone(names: list[str], **kwargs: Any) -> dict[str, Any]:
        """run_launch, one at a time in this server (a second caller is told to wait)."""
        from launcher.launch import run_launch

        if not launching.acquire(blocking=False):
            return _tool_error(
                "another launch or recover is running in this server: wait for it (see status)"
            )
        try:
            return _with_outcome(run_launch(names, config=config, **kwargs))
        finally:
            launching.release()

    @server.tool()
    @_refusing
    def offers(
        gpu: Annotated[str | None, Field(description="GPU name or prefix, e.g. A100, H100, RTX4090")] = None,
        spot: Annotated[bool | None, Field(description="true: only spot; false: only on-demand")] = None,
        providers: Annotated[list[str] | None, Field(description="lambda, runpod, vast")] = None,
        live: Annotated[bool, Field(description="ask the providers' APIs (keys from env)")] = False,
        limit: Limit = 25,
    ) -> dict[str, Any]:
        """Price table across providers, cheapest expected $/h first (your provider preferences applied)."""
        from launcher.offers import gather_offers
        from launcher.preferences import load_preferences
        from launcher.select import rank

        table = gather_offers(live=live, providers=providers or None)
        prefs = load_preferences(config)
        if spot is not None:
            prefs = prefs.model_copy(update={"spot_policy": "spot" if spot else "on-demand"})
        found = [o for o in table.offers if not gpu or o.gpu.lower().startswith(gpu.lower())]
        rows = [
            c.offer.model_dump(mode="json")
            | {"spot": c.spot, "price_hour": c.price_hour, "expected_hour": c.expected_hour}
            for c in rank(found, prefs)[:limit]
        ]
        return {
            "source": table.source,
            "snapshot_date": str(table.snapshot_date) if table.snapshot_date else None,
            "offers": rows,
            "notes": {**table.skipped, **table.errors},
        }

    @server.tool()
    @_refusing
    def plan(
        domains: Domains,
        backend: Backend = None,
        run_id: RunId = "default",
        base_model: BaseModelName = None,
        samples: Samples = 200,
        epochs: Epochs = 2.0,
        store: Store = None,
    ) -> dict[str, Any]:
        """Dry run: the offer, the jobs and their projected cost (`meetara plan --json`); domains already
        done in the run's store are listed under `done`, not planned. Launches nothing."""
        from launcher.cli import _plan_options
        from launcher.launch import plan_unfinished

        prefs, names, backend, work = _plan_options(
            domains, backend, run_id, base_model, samples, epochs, config
        )
        p = plan_unfinished(names, backend=backend, prefs=prefs, work=work, run_id=run_id, store=store)
        return p.model_dump(mode="json")

    @server.tool()
    @_refusing
    def launch(
        domains: Domains,
        budget: Budget,
        backend: Backend = None,
        run_id: RunId = "default",
        base_model: BaseModelName = None,
        samples: Samples = 200,
        epochs: Epochs = 2.0,
        store: Store = None,
        models_dir: ModelsDir = "models",
    ) -> dict[str, Any]:
        """Plan, check the budget, launch, follow the jobs to the end and pull the validated GGUFs.

        Finished domains are skipped; a run whose jobs still run is followed, not launched twice. The plan
        must fit `budget` and the ledger's caps, else nothing is launched. Blocks until the jobs end."""
        from launcher.cli import _plan_options

        _confine(models_dir, "models_dir", confined_to)
        _confine_store(store, confined_to)
        prefs, names, backend, work = _plan_options(
            domains, backend, run_id, base_model, samples, epochs, config
        )
        return launch_alone(
            names,
            prefs=prefs,
            backend=backend,
            work=work,
            run_id=run_id,
            budget=budget,
            store=store,
            endpoint_url=os.environ.get("MEETARA_S3_ENDPOINT_URL"),
            models_dir=Path(models_dir),
        )

    @server.tool()
    @_refusing
    def status(
        run_id: Annotated[JobRunId | None, Field(description="a run id; default: every run")] = None,
    ) -> dict[str, Any]:
        """Runs and their jobs: state, domains done, preemptions, machine time (`meetara status --json`)."""
        from launcher.launch import status_rows

        return {"jobs": status_rows(run_id)}

    @server.tool()
    @_refusing
    def report(
        by: Annotated[str, Field(description="provider, domain, day or run")] = "provider",
        since: Annotated[
            str | None, Field(description="YYYY-MM-DD, an ISO time, today, yesterday or Nd")
        ] = None,
        until: Annotated[str | None, Field(description="YYYY-MM-DD (included), an ISO time, today")] = None,
    ) -> dict[str, Any]:
        """Cost per provider, domain, day or run from the budget ledger (`meetara report --json`)."""
        from budgets import report as rep
        from budgets.cli import query_report

        rows, total, start, stop = query_report(config, by, since, until)
        return json.loads(rep.to_json(rows, by=by, since=start, until=stop, total=total))

    @server.tool()
    @_refusing
    def recover(
        run_id: Annotated[JobRunId | None, Field(description="the run to resume; omit to list runs")] = None,
        budget: OptionalBudget = None,
    ) -> dict[str, Any]:
        """Resume a run: finished domains are skipped, unfinished ones resume from their checkpoints.
        Without run_id: the runs with unfinished domains. With run_id and budget: relaunch and follow."""
        from launcher.launch import unfinished
        from launcher.preferences import load_preferences
        from launcher.runs import select_runs
        from train import BadInput

        prefs = load_preferences(config)
        rows = [(rec, unfinished(rec)) for rec in select_runs(run_id, "meetara recover")]
        listing = [
            {
                "run": rec.run_id,
                "backend": rec.backend,
                "store": rec.store,
                "unfinished": todo,
                "planned_hour": sorted({round(j.offer.expected_hour, 3) for j in rec.plan.jobs}),
            }
            for rec, todo in rows
            if todo
        ]
        if not run_id:
            return {"runs": listing}
        rec, todo = rows[0]
        if not todo:
            return {"run_id": run_id, "unfinished": [], "message": f"run {run_id}: every domain is done"}
        if budget is None:
            raise BadInput("pass --budget to relaunch (the table above shows what is left)")
        return launch_alone(
            todo,
            prefs=prefs,
            backend=rec.backend,
            work=rec.plan.workload,
            run_id=rec.run_id,
            budget=budget,
            store=rec.store,
            endpoint_url=rec.endpoint_url,
            models_dir=Path(rec.models_dir),
        )

    @server.tool()
    @_refusing
    def pull(
        run_id: RunId = "default",
        domains: Domains = "all",
        store: Annotated[
            str | None,
            Field(
                description="file://DIR (under the server's workdir) or s3://BUCKET/PREFIX; "
                "default: the run's store, else MEETARA_STORE"
            ),
        ] = None,
        models_dir: ModelsDir = "models",
    ) -> dict[str, Any]:
        """Download a run's validated GGUFs (sha256-checked, atomic, resumable) into models_dir."""
        from launcher.launch import select
        from launcher.pull import open_run_store
        from launcher.pull import pull as pull_run

        _confine(models_dir, "models_dir", confined_to)
        _confine_store(store, confined_to)
        names = select(domains)
        st = open_run_store(run_id, store, os.environ.get("MEETARA_S3_ENDPOINT_URL"))
        results = pull_run(st, run_id, names, Path(models_dir))
        bad = [r for r in results if r.status == "error"]
        if bad:
            return _tool_error(f"{len(bad)} download(s) refused: {bad[0].detail}")
        return {
            "run_id": run_id,
            "models_dir": str(models_dir),
            "domains": {
                r.domain: {"status": r.status, "files": r.files, "bytes": r.bytes, "detail": r.detail}
                for r in results
            },
        }

    # ---- resources ---------------------------------------------------------------------------------

    def _resource(fn: Callable[..., Any]) -> Callable[..., str]:
        """JSON text; a refusal is a resource error carrying the CLI's one-line message."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> str:
            try:
                return json.dumps(fn(*args, **kwargs), indent=1, default=str)
            except _refusals() as e:
                raise ResourceError(str(e)) from None

        return wrapper

    @server.resource("meetara://budget", name="budget", mime_type="application/json")
    @_resource
    def budget_resource() -> dict:
        """Caps, spent, reserved and remaining per window (budget time zone); the open reservations."""
        from launcher.launch import open_ledger

        with open_ledger(config) as ledger:
            windows, held = ledger.window_status(), ledger.open_reservations()
            location, tz = ledger.location, ledger.config.timezone
        return {
            "timezone": tz,
            "ledger": location,
            "windows": [w.as_dict() for w in windows],
            "open_reservations": [
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
        }

    @server.resource("meetara://runs", name="runs", mime_type="application/json")
    @_resource
    def runs_resource() -> dict:
        """Every run this machine launched: backend, budget, domains done of total, per job state."""
        from launcher.launch import job_rows
        from launcher.runs import list_runs

        out = []
        for rec in list_runs():
            rows = job_rows([rec])
            out.append(
                {
                    "run_id": rec.run_id,
                    "backend": rec.backend,
                    "store": rec.store,
                    "budget": rec.budget,
                    "planned_cost": rec.plan.total_cost,
                    "created_at": rec.created_at.isoformat(),
                    "domains_done": sum(r["domains_done"] for r in rows),
                    "domains_total": sum(r["domains"] for r in rows),
                    "preemptions": sum(r["preemptions"] for r in rows),
                    "jobs": rows,
                }
            )
        return {"runs": out}

    @server.resource("meetara://runs/{run_id}", name="run", mime_type="application/json")
    def run_resource(run_id: str) -> str:
        """One run per domain: done / failed / training / pending, checkpoint step, held-out loss before and
        after training, validation passed, pulled here; and its jobs' state."""
        from launcher.runs import load_run
        from train.names import check_run_id

        try:
            rec = load_run(check_run_id(run_id))
            if rec is None:
                raise ResourceNotFoundError(f"no run {run_id!r} on this machine (see meetara status)")
            return json.dumps(_run_detail(rec), indent=1, default=str)
        except _refusals() as e:
            raise ResourceError(str(e)) from None

    @server.resource("meetara://quality", name="quality", mime_type="application/json")
    @_resource
    def quality_resource() -> dict:
        """Per finished domain of every run: data acceptance rate, held-out loss before/after, validation
        checks (GGUF header, size, llama.cpp logits against the trained model)."""
        from launcher.runs import list_runs

        out = []
        for rec in list_runs():
            found, error = _domains_in_store(rec)
            for d in [d for j in rec.plan.jobs for d in j.domains]:
                manifest = (found.get(d) or {}).get("manifest") or (found.get(d) or {}).get("failed")
                if manifest is not None:
                    out.append({"run_id": rec.run_id, "domain": d, **_quality(manifest)})
            if error:
                out.append({"run_id": rec.run_id, "store_error": error})
        passed = [q for q in out if q.get("validation_passed")]
        return {
            "domains": out,
            "validated": len(passed),
            "mean_acceptance_rate": (
                round(sum(q["acceptance_rate"] or 0 for q in passed) / len(passed), 4) if passed else None
            ),
        }

    return server


def _with_outcome(summary: dict) -> dict:
    """run_launch's summary, plus whether every job succeeded and every domain is here."""
    jobs_ok = all(s == "SUCCEEDED" for s in summary["jobs"].values())
    here = sum(s in ("pulled", "up-to-date") for s in summary["domains"].values())
    return summary | {"ok": jobs_ok and here == len(summary["domains"]), "domains_here": here}


def mcp_command(
    config: Path = typer.Option(
        None, help="preferences file (default: MEETARA_CONFIG, ./meetara.yaml, ~/.config)"
    ),
    workdir: Path = typer.Option(
        None,
        help="work here: ./models and the default ./store are relative to it, and the paths a client "
        "names (models_dir, a file:// store) must lie in it (default: the cwd)",
    ),
    allow_outside_workdir: bool = typer.Option(
        False, ALLOW_FLAG, help="let clients name models_dir and file:// stores outside --workdir"
    ),
) -> None:
    """Serve meetara's tools (offers, plan, launch, status, report, recover, pull) and resources (budget,
    runs, quality) over the Model Context Protocol on stdin/stdout, for an MCP client to start."""
    from launcher.console import fail

    config = config.expanduser().resolve() if config else None  # before a chdir: relative to the cwd
    if workdir is not None:
        try:
            os.chdir(workdir.expanduser())
        except OSError as e:
            raise fail(f"--workdir {workdir}: {e.strerror or e}") from None
    build_server(config, Path.cwd(), allow_outside=allow_outside_workdir).run("stdio")
