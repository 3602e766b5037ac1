"""`meetara mcp`: the launcher as a Model Context Protocol server on stdin/stdout (official `mcp` SDK).

Tools are the CLI's commands, calling the same library functions under the same budget caps and the
same validation of arguments: offers, plan, launch, status, report, recover, pull, wait. A refused call
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
returns once the money is reserved, with the run id; a background follower (launcher/background.py)
runs the jobs and pulls their GGUFs, whatever the client does next. Progress: notifications while
`launch` runs (planned, reserved, handed over) and while `wait` watches the run (domains done, jobs'
phases), and the run resources at any time. Relative paths (models_dir, the default
./store) are relative to the server's working directory (`meetara mcp --workdir`). A client names
paths only inside that directory: `models_dir` and a file store (`file://DIR` with the scheme in any
case, `file:DIR` or a bare path; plan's, launch's and pull's `store`) are parsed as the store's opener
parses them, resolved (symlinks, "..") and refused outside it unless the server was started with
`--allow-outside-workdir`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from mcp.server.mcpserver import Context
from pydantic import Field

from launcher import api
from train import bounds
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
Samples = Annotated[bounds.Samples, Field(description="conversations per domain")]
Epochs = Annotated[bounds.Epochs, Field(description="epochs")]
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
WaitSeconds = Annotated[
    float,
    Field(
        ge=0, le=3600, description="follow the started run this long with progress notifications (0: return)"
    ),
]

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
    """A file store must lie in the workdir: the directory the store's opener would use (`file_root`:
    any case of the scheme, `file:DIR`, a bare path); s3:// and the rest are not local paths."""
    from train.store import file_root

    path = None if url is None else file_root(url)
    if path is not None:
        _confine(url, "store", workdir, path)


def _sdk_log_level() -> str:
    """MEETARA_LOG (read as the CLI reads it: `train.cli.log_level`) as one of the level names the SDK
    takes: 10 is DEBUG, WARN is WARNING, 25 is INFO (the named level at or below it)."""
    import logging

    from train.cli import log_level

    level = log_level()
    named = [n for n in ("CRITICAL", "ERROR", "WARNING", "INFO") if logging.getLevelName(n) <= level]
    return named[0] if named else "DEBUG"


def _tool_error(message: str):
    import mcp.types as types

    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


def _refusing(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Return the CLI's one-line message as the tool error (the SDK would prefix it)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except api.refusals() as e:
            return _tool_error(api.message(e))

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


# ---- the server ----------------------------------------------------------------------------------


def build_server(config: Path | None = None, workdir: Path | None = None, allow_outside: bool = False):
    """The MCP server: tools and resources over the launcher (`config`: the preferences file). Paths a
    client names must lie in `workdir` (default: the cwd) unless `allow_outside`."""
    from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError

    confined_to = None if allow_outside else (workdir or Path.cwd()).resolve()
    server = _strict_server_class()(
        "meetara",
        version=api.version(),
        instructions=(
            "meetara fine-tunes one LoRA adapter per knowledge domain on rented spot GPUs (or this machine) "
            "under dollar budgets and brings back validated GGUF files. Call plan before launch; launch "
            "spends at most its budget (and the ledger's daily/weekly/monthly caps) and returns the run id "
            "once the money is reserved; a background process runs the jobs and pulls the GGUFs. Call wait "
            "(progress notifications) or read meetara://runs/{run_id} for progress, meetara://budget for "
            "what is left."
        ),
        log_level=_sdk_log_level(),  # type: ignore[arg-type]
    )

    def progress(ctx: Any):
        """on_progress for the service layer: each message a progress notification of this call (a
        no-op when the client asked for none)."""
        import anyio.from_thread

        count = [0]

        def say(text: str, done: float | None = None, total: float | None = None) -> None:
            count[0] += 1
            with contextlib.suppress(Exception):  # a client that went away does not stop the run
                anyio.from_thread.run(
                    ctx.report_progress, done if done is not None else count[0], total, text
                )

        return say

    @server.tool()
    @_refusing
    def offers(
        gpu: Annotated[str | None, Field(description="GPU name or prefix, e.g. A100, H100, RTX4090")] = None,
        spot: Annotated[bool | None, Field(description="true: only spot; false: only on-demand")] = None,
        providers: Annotated[list[str] | None, Field(description="lambda, runpod, vast")] = None,
        live: Annotated[bool, Field(description="ask the providers' APIs (keys from env)")] = False,
        limit: Limit = 25,
    ) -> dict[str, Any]:
        """Price table across providers, cheapest weighted_hour (expected $/h x provider weight) first
        (your provider preferences applied)."""
        view = api.offers(gpu=gpu, spot=spot, providers=providers, live=live, limit=limit, config=config)
        return {
            "source": view.source,
            "snapshot_date": view.snapshot_date,
            "offers": [{**o.detail, **o.model_dump(exclude={"detail"})} for o in view.offers],
            "notes": view.notes,
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
        _confine_store(store, confined_to)  # the plan reads the store (and makes its directory)
        p = api.plan(
            domains,
            backend=backend,
            run_id=run_id,
            base_model=base_model,
            samples=samples,
            epochs=epochs,
            store=store,
            config=config,
        )
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
        wait_s: WaitSeconds = 0,
        ctx: Context | None = None,
    ) -> dict[str, Any]:
        """Plan, check the budget, reserve it, and start the run in the background; returns the run id
        at once (within a second or two), with progress notifications for planning, reserving and the
        handover. A background process then launches and follows the jobs (relaunching after
        preemptions) and pulls the validated GGUFs into models_dir, with no further call: read
        meetara://runs/{run_id}, or call `wait` for progress notifications until it ends.

        Finished domains are skipped; a run whose jobs still run is followed, not launched twice. The plan
        must fit `budget` and the ledger's caps, else nothing is launched and nothing is reserved."""
        _confine(models_dir, "models_dir", confined_to)
        _confine_store(store, confined_to)
        say = progress(ctx)
        started = api.start_launch(
            domains,
            budget,
            backend=backend,
            run_id=run_id,
            base_model=base_model,
            samples=samples,
            epochs=epochs,
            store=store,
            endpoint_url=os.environ.get("MEETARA_S3_ENDPOINT_URL"),
            models_dir=Path(models_dir),
            config=config,
            on_progress=say,
        )
        return _started(started, wait_s, say)

    @server.tool()
    @_refusing
    def status(
        run_id: Annotated[JobRunId | None, Field(description="a run id; default: every run")] = None,
    ) -> dict[str, Any]:
        """Runs and their jobs: state, domains done, preemptions, machine time (`meetara status --json`)."""
        return {"jobs": api.status(run_id)}

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

        rows, total, start, stop = api.report_rows(by, since, until, config)
        return json.loads(rep.to_json(rows, by=by, since=start, until=stop, total=total))

    @server.tool()
    @_refusing
    def recover(
        run_id: Annotated[JobRunId | None, Field(description="the run to resume; omit to list runs")] = None,
        budget: OptionalBudget = None,
        wait_s: WaitSeconds = 0,
        ctx: Context | None = None,
    ) -> dict[str, Any]:
        """Resume a run: finished domains are skipped, unfinished ones resume from their checkpoints.
        Without run_id: the runs with unfinished domains. With run_id and budget: relaunch in the
        background (returns at once, as launch does)."""
        from train import BadInput

        listing = api.recoverable(run_id)
        if not run_id:
            return {"runs": [r.model_dump() for r in listing if r.unfinished]}
        todo = listing[0].unfinished
        if not todo:
            return {"run_id": run_id, "unfinished": [], "message": f"run {run_id}: every domain is done"}
        if budget is None:
            raise BadInput("pass --budget to relaunch (the table above shows what is left)")
        say = progress(ctx)
        return _started(api.start_recover(run_id, budget, config=config, on_progress=say), wait_s, say)

    @server.tool()
    @_refusing
    def wait(
        run_id: RunId,
        wait_s: Annotated[float, Field(ge=0, le=3600, description="return after this long at most")] = 50,
        ctx: Context | None = None,
    ) -> dict[str, Any]:
        """Watch a run for up to wait_s seconds: a progress notification per change (domains done of
        all, jobs' phases), then the run's state (`ended` true once its follower finished and pulled)."""
        return api.watch(run_id, wait_s, progress(ctx)).model_dump(mode="json")

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
        _confine(models_dir, "models_dir", confined_to)
        _confine_store(store, confined_to)
        view = api.pull(
            run_id,
            domains,
            store=store,
            endpoint_url=os.environ.get("MEETARA_S3_ENDPOINT_URL"),
            models_dir=Path(models_dir),
        )
        bad = [r for r in view.domains if r.status == "error"]
        if bad:
            return _tool_error(f"{len(bad)} download(s) refused: {bad[0].detail}")
        return {
            "run_id": run_id,
            "models_dir": str(models_dir),
            "domains": {r.domain: r.model_dump(exclude={"domain"}) for r in view.domains},
        }

    # ---- resources ---------------------------------------------------------------------------------

    def _resource(fn: Callable[..., Any]) -> Callable[..., str]:
        """JSON text; a refusal is a resource error carrying the CLI's one-line message."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> str:
            try:
                return json.dumps(fn(*args, **kwargs), indent=1, default=str)
            except api.refusals() as e:
                raise ResourceError(str(e)) from None

        return wrapper

    @server.resource("meetara://budget", name="budget", mime_type="application/json")
    @_resource
    def budget_resource() -> dict:
        """Caps, spent, reserved and remaining per window (budget time zone); the open reservations."""
        return api.budget(config).model_dump(mode="json")

    @server.resource("meetara://runs", name="runs", mime_type="application/json")
    @_resource
    def runs_resource() -> dict:
        """Every run this machine launched: backend, budget, domains done of total, per job state."""
        return api.runs().model_dump(mode="json")

    @server.resource("meetara://runs/{run_id}", name="run", mime_type="application/json")
    def run_resource(run_id: str) -> str:
        """One run per domain: done / failed / training / pending, checkpoint step, held-out loss before and
        after training, validation passed, pulled here; and its jobs' state."""
        try:
            detail = api.run_detail(run_id)
        except api.NotFound as e:
            raise ResourceNotFoundError(str(e)) from None
        except api.refusals() as e:
            raise ResourceError(str(e)) from None
        return json.dumps(detail.model_dump(mode="json"), indent=1, default=str)

    @server.resource("meetara://quality", name="quality", mime_type="application/json")
    @_resource
    def quality_resource() -> dict:
        """Per finished domain of every run: data acceptance rate, held-out loss before/after, validation
        checks (GGUF header, size, llama.cpp logits against the trained model)."""
        return api.quality().model_dump(mode="json")

    return server


def _started(started, wait_s: float, say) -> dict[str, Any]:
    """What launch and recover return: the started run, and with wait_s > 0 where it stands then."""
    out = started.model_dump(mode="json")
    if wait_s > 0 and started.state == "following":
        out["progress"] = api.watch(started.run_id, wait_s, say).model_dump(mode="json")
    return out


def serve(config: Path | None, workdir: Path, allow_outside: bool = False) -> None:
    """Serve over stdin/stdout until the client closes them (`meetara mcp`)."""
    build_server(config, workdir, allow_outside=allow_outside).run("stdio")
