"""`meetara`: a thin CLI. It parses and prints; the work happens in importable functions."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import typer

from budgets import usd, usd_rate
from launcher import api
from launcher.console import EXIT_DECLINED, escape, fail, print_whole, say
from train.bounds import MAX_EPOCHS, MAX_SAMPLES, MIN_EPOCHS, MIN_SAMPLES
from train.cli import train_command

HELP_OPTIONS = ["-h", "--help"]
app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_OPTIONS},
    help="Fine-tune one LoRA adapter per knowledge domain on cheap spot GPUs; bring back GGUFs.",
)


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    show_version: bool = typer.Option(False, "--version", is_eager=True, help="print the version and exit"),
) -> None:
    """`meetara` alone prints the help and exits 0 (asking for help is not an error)."""
    if show_version:
        from launcher.console import version

        typer.echo(f"meetara {version()}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help(), nl=False)
        raise typer.Exit(0)


app.command("train", help="Train domains here (the embedded default: local CPU/GPU, file store).")(
    train_command
)


@app.command("domains")
def domains_command(category: str = typer.Option(None, help="only this category")) -> None:
    """List the domain registry (tasks/domains.yaml)."""
    from rich.table import Table

    from train import BadInput
    from train.domains import load_registry

    try:
        reg = load_registry()
    except BadInput as e:
        raise fail(str(e)) from None
    if category and category not in reg.categories:
        raise fail(f"unknown category {category!r}; categories: {', '.join(reg.categories)}")
    table = Table("domain", "category", "description")
    for d in reg.domains:
        if not category or d.category == category:
            _row(table, d.name, d.category, d.description)
    print_whole(table)


def _row(table, *cells, **kwargs) -> None:
    """Add a table row whose text cells print verbatim (rich reads a str cell as markup)."""
    table.add_row(*(escape(c) if isinstance(c, str) else c for c in cells), **kwargs)


def _console(stderr: bool = False):
    from launcher.console import console

    return console(stderr)


def main(argv: list[str] | None = None) -> None:
    from launcher.console import run_app

    run_app(app, "meetara", argv)


@app.command("offers")
def offers_command(
    gpu: str = typer.Option(None, help="GPU name or prefix, e.g. A100, H100, RTX4090"),
    spot: bool = typer.Option(None, "--spot/--on-demand", help="only spot (interruptible) or only on-demand"),
    provider: list[str] = typer.Option(None, "--provider", "-p", help="lambda, runpod, vast (repeatable)"),
    live: bool = typer.Option(False, help="ask the providers' APIs (keys from env / credential files)"),
    refresh: bool = typer.Option(False, help="with --live: ignore the disk cache"),
    ignore_preferences: bool = typer.Option(False, "--all", help="show offers your preferences exclude too"),
    limit: int = typer.Option(25, min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Price table across providers, cheapest expected $/h x provider weight first (your provider
    preferences applied; a weighted $/h column shows when a weight is not 1)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from train import BadInput

    try:
        view = api.offers(
            gpu=gpu,
            spot=spot,
            providers=provider or None,
            live=live,
            refresh=refresh,
            ignore_preferences=ignore_preferences,
            limit=limit,
        )
    except (BadInput, ValueError) as e:
        raise fail(str(e)) from None
    for name, why in view.notes.items():
        Console(stderr=True).print(
            f"[yellow]{escape(name)}:[/] {escape(why)}", highlight=False, soft_wrap=True
        )
    if live and not view.gathered:
        raise fail(
            f"no live offers: {', '.join(sorted({**view.skipped, **view.errors}))} gave none (above); "
            "`meetara offers` without --live shows the bundled snapshot",
            1 if view.errors else 2,
        )
    rows = view.offers
    if as_json:
        typer.echo(json.dumps([{**o.detail, **o.model_dump(exclude={"detail"})} for o in rows], indent=1))
        return
    when = f"snapshot of {view.snapshot_date}" if view.source == "snapshot" else "live"
    shown = f"{len(rows)} of {view.matching}" if view.matching > len(rows) else f"{view.matching}"
    out = Table(title=f"{shown} offer{'' if view.matching == 1 else 's'} ({when})")
    # the order is by expected $/h x the provider's weight: shown when a weight makes them differ
    weighted = any(abs(o.weighted_hour - o.expected_hour) > 1e-12 for o in rows)
    hidden = sorted(set(view.matching_providers) - {o.provider for o in rows})
    if view.matching > len(rows):
        out.caption = escape(
            f"cheapest {'weighted $/h ' if weighted else ''}first; --limit {view.matching} shows all"
            + (f", -p {hidden[0]} one provider (not shown: {', '.join(hidden)})" if hidden else "")
        )
    headers = ["provider", "GPU", "n", "GB", "region", "market", "$/h", "$/GPU-h", "exp. $/h"]
    for header in headers + ["weighted $/h"] * weighted:
        numeric = "$" in header or header in ("n", "GB")
        out.add_column(
            header,
            no_wrap=header in ("GPU", "market"),
            overflow="fold",
            justify="right" if numeric else "left",
        )
    for o in rows:
        _row(
            out,
            o.provider,
            o.gpu,
            str(o.gpu_count),
            str(o.gpu_mem_gb),
            o.region,
            "spot" if o.spot else "on-demand",
            usd(o.price_hour, symbol=False),
            usd(o.price_hour / o.gpu_count, symbol=False),
            usd(o.expected_hour, symbol=False),
            *[usd(o.weighted_hour, symbol=False)] * weighted,
        )
    print_whole(out)


def _register_budget_commands() -> None:
    import budgets.cli
    from budgets.cli import budget_command, report_command

    budgets.cli.finished_domains = api.finished_in_stores  # domains done: the runs' stores say
    app.command("report", help="Cost reports from the ledger: by provider, domain, day or run.")(
        report_command
    )
    app.command("budget", help="Caps, spent, reserved and remaining per window.")(budget_command)


_register_budget_commands()


def _register_notebook_command() -> None:
    from launcher.notebook import notebook_command

    app.command("notebook", help="Write a Colab notebook that trains domains into a store.")(notebook_command)


_register_notebook_command()


@app.command("mcp")
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
        False,
        "--allow-outside-workdir",
        help="let clients name models_dir and file:// stores outside --workdir",
    ),
) -> None:
    """Serve meetara's tools (offers, plan, launch, status, report, recover, pull, wait) and resources
    (budget, runs, quality) over the Model Context Protocol on stdin/stdout, for an MCP client to start."""
    from launcher import mcp_server

    config = config.expanduser().resolve() if config else None  # before a chdir: relative to the cwd
    if workdir is not None:
        try:
            os.chdir(workdir.expanduser())
        except OSError as e:
            raise fail(f"--workdir {workdir}: {e.strerror or e}") from None
    mcp_server.serve(config, Path.cwd(), allow_outside=allow_outside_workdir)


@app.command("dashboard")
def dashboard_command(
    host: str = typer.Option("127.0.0.1", help="address to listen on (not the loopback: needs --token)"),
    port: int = typer.Option(8765, min=0, max=65535, help="port (0: a free one, printed)"),
    token: str = typer.Option(
        None, envvar="MEETARA_DASHBOARD_TOKEN", help="required on every request (?token= once, then a cookie)"
    ),
    allow_launch: bool = typer.Option(
        False, "--allow-launch", help="let the page launch runs (behind a token, made up if not given)"
    ),
    config: Path = typer.Option(None, help="preferences file (its budget caps apply)"),
) -> None:
    """A local web dashboard: spend against the caps, runs with their domains, loss curves and
    preemptions, cost reports, offers and plans, updated live. Read-only unless --allow-launch."""
    from launcher import dashboard

    try:
        dashboard.serve(host=host, port=port, config=config, token=token, allow_launch=allow_launch)
    except dashboard.Refused as e:
        raise fail(str(e)) from None


providers_app = typer.Typer(
    help="Show and edit provider preferences (a YAML file to keep in version control)."
)
app.add_typer(providers_app, name="providers")


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@providers_app.callback(invoke_without_command=True)
def providers_show(ctx: typer.Context, config: Path = typer.Option(None, help="preferences file")) -> None:
    """Show the preferences in force (file, then env)."""
    if ctx.invoked_subcommand:
        return
    from rich.table import Table

    from train import BadInput

    try:
        view = api.preferences(config)
    except BadInput as e:
        raise fail(str(e)) from None
    prefs = dict(view.preferences)
    t = Table("provider", "enabled", "weight", "max $/GPU-h", "regions", title=escape(view.path))
    for name, p in prefs.pop("providers").items():
        _row(
            t,
            name,
            "yes" if p["enabled"] else "no",
            f"{p['weight']:g}",
            "-" if p["max_price_per_gpu_hour"] is None else usd(p["max_price_per_gpu_hour"], symbol=False),
            ",".join(p["regions"]) or "any",
        )
    console = _console()
    console.print(t)
    for key, value in prefs.items():
        console.print(f"{key}: {value}", highlight=False, markup=False)


@providers_app.command("set")
def providers_set(
    provider: str = typer.Argument(None, help="lambda, runpod or vast; omit for settings across providers"),
    enable: bool = typer.Option(None, "--enable/--disable"),
    weight: float = typer.Option(None, help="price multiplier when ranking (1.2 = 20% less preferred)"),
    max_price: float = typer.Option(None, help="max $ per GPU-hour"),
    regions: str = typer.Option(None, help="comma-separated allowed regions ('' = any)"),
    spot_policy: str = typer.Option(None, help="spot, on-demand or auto"),
    min_gpu_mem: float = typer.Option(None, help="minimum GB of memory per GPU"),
    allowed_gpus: str = typer.Option(None, help="comma-separated ('' = any)"),
    blocked_gpus: str = typer.Option(None, help="comma-separated"),
    max_recoveries: int = typer.Option(None, help="relaunches per job after preemptions"),
    preemption_overhead: float = typer.Option(None, help="expected extra cost fraction of spot"),
    max_domains_per_job: int = typer.Option(None, help="domains packed into one job at most"),
    max_hours_per_job: float = typer.Option(None, help="planned hours of one job at most"),
    job_startup_minutes: float = typer.Option(None, help="a cloud job's fixed start-up, minutes"),
    backend: str = typer.Option(None, help="auto, local or skypilot"),
    local_price_hour: float = typer.Option(None, help="$/h charged for jobs on the local backend"),
    config: Path = typer.Option(None, help="preferences file"),
) -> None:
    """Change preferences and write them back to the file."""
    from train import BadInput

    if provider is not None:
        changes = {
            "enabled": enable,
            "weight": weight,
            "max_price_per_gpu_hour": max_price,
            "regions": _csv(regions),
        }
    else:
        changes = {
            "enabled": enable,
            "weight": weight,
            "regions": _csv(regions),
            "spot_policy": spot_policy,
            "min_gpu_mem_gb": min_gpu_mem,
            "allowed_gpus": _csv(allowed_gpus),
            "blocked_gpus": _csv(blocked_gpus),
            "max_recoveries": max_recoveries,
            "preemption_overhead": preemption_overhead,
            "max_price_per_gpu_hour": max_price,
            "max_domains_per_job": max_domains_per_job,
            "max_hours_per_job": max_hours_per_job,
            "job_startup_minutes": job_startup_minutes,
            "backend": backend,
            "local_price_hour": local_price_hour,
        }
    try:
        saved = api.set_preferences(provider, changes, config)
    except BadInput as e:
        raise fail(str(e)) from None
    typer.echo(f"saved {saved.path}")
    for name, why in saved.warnings.items():
        say(f"warning: {name}: {why}")


# ---- plan / launch / status / pull / doctor ------------------------------------------------------

DOMAINS_HELP = "'all', a category, or comma-separated domain names (repeatable: -d a -d b is -d a,b)"
WARM_START = typer.Option(
    False,
    "--warm-start/--no-warm-start",
    help="order the domains as a similarity chain before packing them into jobs, and start each LoRA "
    "from the most similar domain done (off by default: bench/RESULTS.md measured no gain from the "
    "similarity)",
)


MERGED = typer.Option(
    False,
    "--merged",
    help="also ship each domain's merged model quantized to Q4_K_M [default: one Q4_K_M base per run "
    "and an adapter per domain]",
    show_default=False,
)


def _plan_table(plan) -> object:
    from rich.table import Table

    title = f"run {plan.run_id}: {sum(len(j.domains) for j in plan.jobs)} domains in {len(plan.jobs)} jobs"
    src = plan.offers_source + (f" of {plan.snapshot_date}" if plan.snapshot_date else "")
    t = Table(
        title=escape(title),
        caption=escape(
            f"offers: {src}; throughput: {plan.throughput_source}; base {plan.workload.base_model}; "
            + api.plan_overheads(plan)
            + (f"; {plan.outputs.describe()}" if plan.outputs else "")
        ),
    )
    for h in ("job", "domains", "offer", "$/h", "hours", "cost $", "fallbacks"):
        t.add_column(h, overflow="fold", justify="right" if h in ("$/h", "hours", "cost $") else "left")
    for j in plan.jobs:
        shown = ", ".join(j.domains[:3]) + (f" +{len(j.domains) - 3}" if len(j.domains) > 3 else "")
        _row(
            t,
            j.name,
            f"{len(j.domains)}: {shown}",
            j.offer.label,
            usd(j.offer.expected_hour, symbol=False),
            f"{j.hours:.2f}",
            usd(j.cost, symbol=False),
            str(len(j.fallbacks)),
        )
    _row(
        t,
        "total",
        "",
        "",
        "",
        f"{plan.total_hours:.2f}",
        usd(plan.total_cost, symbol=False),
        "",
        style="bold",
    )
    return t


@app.command("plan")
def plan_command(
    domain_args: list[str] = typer.Option(..., "--domains", "-d", metavar="<str>", help=DOMAINS_HELP),
    backend: str = typer.Option(None, help="local, skypilot or auto (default from preferences: auto)"),
    run_id: str = typer.Option("default", "--run-id", envvar="MEETARA_RUN_ID"),
    base_model: str = typer.Option(None, help="default: tiny (local), microsoft/DialoGPT-medium (cloud)"),
    samples: int = typer.Option(200, min=MIN_SAMPLES, max=MAX_SAMPLES, help="conversations per domain"),
    epochs: float = typer.Option(2.0, min=MIN_EPOCHS, max=MAX_EPOCHS),
    live: bool = typer.Option(False, help="price from the providers' live APIs"),
    provider: list[str] = typer.Option(None, "--provider", "-p"),
    store: str = typer.Option(
        None, help="the store `launch` would use, to skip domains done there (default as for launch)"
    ),
    endpoint_url: str = typer.Option(None, "--endpoint-url", envvar="MEETARA_S3_ENDPOINT_URL"),
    config: Path = typer.Option(None, help="preferences file"),
    as_json: bool = typer.Option(False, "--json"),
    warm_start: bool = WARM_START,
    deadline: str = typer.Option(None, help="e.g. 12h: whether the plan's jobs fit, and their slack"),
    merged: bool = MERGED,
) -> None:
    """Dry run: what `launch` with the same arguments would run (domains already done are skipped), the
    offer, the jobs and their projected cost. Launches nothing."""
    domains = ",".join(domain_args)  # -d a -d b adds up

    from train import BadInput

    try:
        names = api.domain_names(domains)
        deadline_s, _ = api.deadline_and_policy(deadline, None)
        plan = api.plan(
            domains,
            backend=backend,
            run_id=run_id,
            base_model=base_model,
            samples=samples,
            epochs=epochs,
            store=store,
            endpoint_url=endpoint_url,
            live=live,
            providers=provider,
            warm_start=warm_start,
            deadline_s=deadline_s,
            config=config,
            merged=merged,
        )
    except (BadInput, ValueError) as e:
        raise fail(str(e)) from None
    if deadline_s is not None and plan.jobs:
        need = max(j.hours for j in plan.jobs)
        say(
            f"deadline {deadline_s / 3600:.2f} h: the longest job needs {need:.2f} h, "
            f"{deadline_s / 3600 - need:.2f} h of slack for preemptions (launch --deadline: policy meetara)"
        )
    if as_json:
        typer.echo(plan.model_dump_json(indent=1))
        return
    for name, why in plan.excluded.items():
        say(f"warning: {name}: {why}")
    if plan.done:
        say(f"{len(plan.done)} of {len(names)} domains already done in {plan.store}: skipped")
    if not plan.jobs:
        say(f"nothing to plan: run {run_id} has every domain asked for; `meetara pull` fetches them")
        return
    print_whole(_plan_table(plan))


@app.command("launch")
def launch_command(
    domain_args: list[str] = typer.Option(..., "--domains", "-d", metavar="<str>", help=DOMAINS_HELP),
    budget: float = typer.Option(..., min=0, help="most this launch may cost, USD"),
    backend: str = typer.Option(None, help="local, skypilot or auto (default from preferences: auto)"),
    run_id: str = typer.Option(
        "default", "--run-id", envvar="MEETARA_RUN_ID", help="same id = resume that run"
    ),
    store: str = typer.Option(None, help="file://DIR or s3://BUCKET/PREFIX (env MEETARA_STORE)"),
    endpoint_url: str = typer.Option(None, "--endpoint-url", envvar="MEETARA_S3_ENDPOINT_URL"),
    base_model: str = typer.Option(None, help="default: tiny (local), microsoft/DialoGPT-medium (cloud)"),
    samples: int = typer.Option(200, min=MIN_SAMPLES, max=MAX_SAMPLES, help="conversations per domain"),
    epochs: float = typer.Option(2.0, min=MIN_EPOCHS, max=MAX_EPOCHS),
    live: bool = typer.Option(False, help="price from the providers' live APIs"),
    provider: list[str] = typer.Option(None, "--provider", "-p"),
    models_dir: Path = typer.Option(Path("models"), help="where validated GGUFs land"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask before spending money"),
    poll: float = typer.Option(2.0, min=0.1, help="seconds between status polls"),
    preempt_every: float = typer.Option(
        None,
        min=0.1,
        help="local backend: inject a preemption (SIGKILL) within this many seconds of training",
    ),
    preempt_seed: int = typer.Option(0, help="seed of the injected preemptions"),
    preempt_max: int = typer.Option(3, min=0, help="at most this many injected preemptions"),
    config: Path = typer.Option(None, help="preferences file"),
    warm_start: bool = WARM_START,
    deadline: str = typer.Option(
        None, help="e.g. 12h: spot while the slack allows, on-demand when it must (policy meetara)"
    ),
    policy: str = typer.Option(
        None, help="spot policy: greedy (default), meetara, uniform-progress, on-demand (see simulate)"
    ),
    detach: bool = typer.Option(
        False, "--detach", help="return once the money is reserved: a background process follows and pulls"
    ),
    merged: bool = MERGED,
) -> None:
    """Plan, check the budget, launch, follow the jobs, pull validated GGUFs into ./models."""
    domains = ",".join(domain_args)  # -d a -d b adds up
    from train import BadInput

    try:
        prefs, names, backend, work = api.resolve(
            domains, backend, run_id, base_model, samples, epochs, config, warm_start, merged
        )
        deadline_s, policy = api.deadline_and_policy(deadline, policy)
    except (BadInput, ValueError) as e:
        raise fail(str(e)) from None
    if preempt_every is not None and backend != "local":
        raise fail("--preempt-every injects preemptions on the local backend only")
    chaos = api.chaos(preempt_every, preempt_seed, preempt_max)
    _launch(
        names,
        prefs,
        backend,
        work,
        run_id,
        store,
        endpoint_url,
        models_dir,
        budget,
        yes,
        poll,
        live,
        provider,
        chaos,
        config,
        deadline_s,
        policy,
        detach,
    )


def _launch(
    names,
    prefs,
    backend,
    work,
    run_id,
    store,
    endpoint_url,
    models_dir,
    budget,
    yes,
    poll,
    live=False,
    provider=None,
    chaos=None,
    config=None,
    deadline_s=None,
    policy=None,
    detach=False,
) -> None:
    """The body of `launch` and `recover`: skip done domains, plan the rest, reserve, launch, follow, pull."""

    from budgets.lease import LeaseLost, RunOwned
    from launcher.launch import EXIT_OWNED
    from train import BadInput

    refusals = tuple(r for r in api.refusals() if r not in (RunOwned, LeaseLost))
    out = _console(stderr=True)
    try:
        prep = api.prepare_launch(
            names,
            prefs=prefs,
            backend=backend,
            work=work,
            run_id=run_id,
            store=store,
            endpoint_url=endpoint_url,
            budget=budget,
            live=live,
            providers=provider,
            config=config,
            models_dir=models_dir,
        )
    except RunOwned as e:
        raise fail(str(e), EXIT_OWNED) from None
    except refusals as e:
        raise fail(api.message(e)) from None
    with prep:  # holds the run's lease until the run is followed, settled and pulled
        try:
            if prep.settled:
                out.print(f"settled {len(prep.settled)} reservation(s) an earlier launcher left open")
            rec = prep.rec
            if rec is not None:
                out.print(f"run {run_id} has jobs still running: following them", highlight=False)
            elif prep.skipped:
                out.print(
                    f"{prep.skipped} of {len(names)} domains already done in {prep.store.url}: skipped",
                    markup=False,
                    highlight=False,
                )
            if prep.plan is not None:
                for name, why in prep.plan.excluded.items():
                    say(f"warning: {name}: {why}")
                api.check_deadline(prep.plan, deadline_s)
                out.print(_plan_table(prep.plan))
                if budget is None:
                    raise BadInput("pass --budget to launch the unfinished domains (see the table)")
                if prep.plan.total_cost > 0 and not yes:
                    if not sys.stdin.isatty():
                        raise BadInput("not a terminal, so nobody can confirm the spend: pass --yes")
                    if not typer.confirm(f"launch for about {usd(prep.plan.total_cost)}?"):
                        say("not launched: nothing was reserved or started")
                        raise typer.Exit(EXIT_DECLINED)
                rec = api.commit_launch(
                    prep,
                    endpoint_url=endpoint_url,
                    models_dir=models_dir,
                    budget=budget,
                    deadline_s=deadline_s,
                    policy=policy,
                )
        except LeaseLost as e:
            raise fail(str(e), EXIT_OWNED) from None
        except refusals as e:
            raise fail(api.message(e)) from None
        if rec is None:  # everything was done already: make sure the files are here
            _pull_and_report(prep.store, run_id, names, models_dir)
            return
        if detach:
            from launcher.backends.base import BackendError

            try:
                started = api.detach(prep, rec, poll=poll, config=config, chaos=chaos)
            except BackendError as e:
                raise fail(str(e), 1) from None
            say(
                f"run {run_id}: followed in the background by pid {started.pid} (it pulls into "
                f"{models_dir}); `meetara status {run_id}` shows it, its log is {started.log}"
            )
            typer.echo(run_id)
            return
        code = _conduct(rec, prep, prefs, poll, chaos)
        _pull_and_report(
            prep.store, run_id, [d for j in rec.jobs.values() for d in j.domains], models_dir, rec
        )
    raise typer.Exit(code)


@app.command("recover")
def recover_command(
    run_id: str = typer.Argument(None, help="the run to resume; omit to list runs with unfinished domains"),
    budget: float = typer.Option(None, min=0, help="most the relaunch may cost, USD (needed to relaunch)"),
    yes: bool = typer.Option(False, "--yes", "-y"),
    poll: float = typer.Option(2.0, min=0.1),
    config: Path = typer.Option(None, help="preferences file"),
    detach: bool = typer.Option(False, "--detach", help="return at once: a background process follows"),
) -> None:
    """Resume a run: finished domains are skipped, unfinished ones resume from their checkpoints."""
    from rich.table import Table

    from budgets import clock
    from launcher.preferences import load_preferences
    from train import BadInput

    try:
        prefs = load_preferences(config)
        rows = [(api.load(r.run), r.unfinished) for r in api.recoverable(run_id)]
    except BadInput as e:
        raise fail(str(e)) from None
    t = Table(title="runs with unfinished domains")
    for header in ("run", "backend", "store", "unfinished", "planned $/h"):
        # a long store URL folds; the run and its unfinished domains stay whole, one row per run
        t.add_column(header, overflow="fold" if header == "store" else "ellipsis", no_wrap=header != "store")
    for rec, todo in rows:
        if todo:
            rates = {usd(j.offer.expected_hour, symbol=False) for j in rec.plan.jobs}
            _row(
                t, rec.run_id, rec.backend, rec.store, f"{len(todo)}: {', '.join(todo[:4])}", ",".join(rates)
            )
    if not run_id:
        if not any(todo for _, todo in rows):
            say(
                "nothing to recover: every run on this machine has all its domains done"
                if rows
                else "nothing to recover: no run was launched from this machine"
            )
        else:
            print_whole(t, stderr=True)
        return
    rec, todo = rows[0]
    if todo:
        print_whole(t, stderr=True)
    else:
        say(f"run {run_id}: every domain is done; settling and pulling")
    # under the run's lease: adopt running jobs, settle what a dead launcher left, relaunch the rest
    _launch(
        [d for j in rec.plan.jobs for d in j.domains],
        prefs,
        rec.backend,
        rec.plan.workload,
        rec.run_id,
        rec.store,
        rec.endpoint_url,
        Path(rec.models_dir),
        budget,
        yes,
        poll,
        config=config,
        deadline_s=None if rec.deadline is None else max((rec.deadline - clock.now()).total_seconds(), 1.0),
        policy=rec.policy,
        detach=detach,
    )


def _conduct(rec, prep, prefs, poll: float, chaos=None) -> int:
    """Follow the run with a progress bar per job; Ctrl-C cancels the jobs (they checkpoint first)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from launcher.conductor import Hooks

    err = Console(stderr=True)
    tty = err.is_terminal
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=err,
        disable=not tty,
    )
    bars = {
        n: progress.add_task(escape(n), total=len(j.domains), state="planned") for n, j in rec.jobs.items()
    }
    seen: dict[str, tuple] = {}

    said: dict[str, float] = {}  # job -> when a line last said its activity (not a terminal)
    every_s = float(os.environ.get("MEETARA_PROGRESS_EVERY_S", "30"))  # ... at most this often

    def on_job(job, done: int) -> None:
        phase = job.phase(prefs.max_recoveries)
        doing = job.activity if job.state == "RUNNING" else ""
        progress.update(bars[job.name], completed=done, state=escape(f"{phase}: {doing}" if doing else phase))
        before = seen.get(job.name)
        seen[job.name] = (phase, done, job.recoveries)
        if not tty and before != seen[job.name]:
            say(f"{job.name}: {phase}, {done}/{len(job.domains)} domains")
            said[job.name] = time.monotonic()
        elif not tty and doing and time.monotonic() - said.get(job.name, 0) >= every_s:
            say(f"{job.name}: {doing}")  # the minutes before a domain finishes are not silent
            said[job.name] = time.monotonic()
        elif tty and before is not None and job.recoveries > before[2]:  # an event: kept above the bars
            progress.console.print(f"{escape(job.name)}: {escape(phase)}", highlight=False)

    def on_pulled(r) -> None:
        if not tty or r.status == "error":
            say(f"{r.domain}: {r.status} {r.detail}".rstrip())

    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM: cancel, settle, exit like Ctrl-C
    try:
        with progress:
            outcome = api.follow_run(rec, prep, prefs, poll=poll, hooks=Hooks(on_job, on_pulled), chaos=chaos)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if outcome.code == 1:
        for j in rec.jobs.values():
            if j.state != "SUCCEEDED" and j.handle:
                try:
                    tail = prep.backend.logs(j.handle, 5)
                except Exception:
                    tail = ""
                say(f"{j.name}: {j.state.lower()} (exit code {j.exit_code})\n{tail}")
    if outcome.message:
        err.print(
            f"{'error: ' if outcome.code in (1, 3, 4) else ''}{escape(outcome.message)}",
            highlight=False,
            soft_wrap=True,
        )
    return outcome.code


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _pull_and_report(store, run_id: str, domains: list[str], models_dir: Path, rec=None) -> None:
    """Pull what is not here yet and print one row per domain (stdout: the summary table)."""
    _report_pulled(api.pull_from(store, run_id, domains, models_dir), rec)


def _report_pulled(view: api.PullView, rec=None) -> None:
    """One row per domain pulled (or not), the machine time and cost of `rec`; exit 1 on a refusal."""
    from rich.table import Table

    t = Table(title=escape(f"run {view.run_id}: models in {view.models_dir}"))
    for h in ("domain", "status", "files", "MB"):
        t.add_column(h)
    for r in view.domains:
        own = {k: p for k, p in r.files.items() if not k.startswith("base")}  # the base: in the caption
        size = sum(Path(p).stat().st_size for p in own.values()) / 1e6
        _row(
            t,
            r.domain,
            r.status,
            ", ".join(Path(p).name for p in own.values()),
            f"{size:.2f}",
        )
    cost = ""
    if rec is not None:  # what the ledger holds for the run (as `meetara status` shows it)
        rows = api.job_rows(rec)
        hours = sum(r["machine_seconds"] for r in rows) / 3600
        cost = f"; {hours:.2f} machine-hours, {usd(sum(r['cost_so_far'] for r in rows))} spent"
    bases = sorted({Path(p) for r in view.domains for k, p in r.files.items() if k.startswith("base")})
    shared = "".join(f"; base {p.name} ({p.stat().st_size / 1e6:.2f} MB)" for p in bases if p.exists())
    t.caption = escape(f"{view.here}/{len(view.domains)} domains validated and here{shared}{cost}")
    print_whole(t)
    bad = [r for r in view.domains if r.status == "error"]
    if bad:
        raise fail(f"{len(bad)} download(s) refused: {bad[0].detail}", 1)


@app.command("pull")
def pull_command(
    run_id: str = typer.Option("default", "--run-id", envvar="MEETARA_RUN_ID"),
    domain_args: list[str] = typer.Option(["all"], "--domains", "-d", metavar="<str>", help=DOMAINS_HELP),
    store: str = typer.Option(None, help="default: the run's store, else MEETARA_STORE or ./store"),
    endpoint_url: str = typer.Option(None, "--endpoint-url", envvar="MEETARA_S3_ENDPOINT_URL"),
    models_dir: Path = typer.Option(Path("models")),
) -> None:
    """Download a run's validated GGUFs (sha256-checked, atomic, resumable) into ./models."""
    domains = ",".join(domain_args)  # -d a -d b adds up
    from train import BadInput
    from train.store import StoreError

    try:
        view = api.pull(run_id, domains, store=store, endpoint_url=endpoint_url, models_dir=models_dir)
    except (BadInput, StoreError) as e:
        raise fail(str(e)) from None
    _report_pulled(view)


@app.command("status")
def status_command(
    run_id: str = typer.Argument(None, help="a run id; default: every run this machine launched"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Runs and their jobs: state, domains done, preemptions, start, elapsed, machine time, cost so far."""
    from rich.table import Table

    from train import BadInput

    try:
        rows = api.status(run_id)
    except BadInput as e:
        raise fail(str(e)) from None
    if as_json:
        import json

        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:  # a run id that is unknown was refused above: this is a machine with no runs
        say("no runs yet on this machine: `meetara launch` starts one")
        return
    t = Table(title="runs")
    for h in (
        "run",
        "job",
        "state",
        "domains",
        "offer",
        "$/h",
        "launches",
        "preempted",
        "steps redone",
        "lost s",
        "started",
        "elapsed",
        "machine s",
        "cost so far",
    ):
        t.add_column(h, justify="right" if h in ("machine s", "cost so far", "elapsed", "lost s") else "left")
    for r in rows:
        _row(
            t,
            r["run"],
            r["job"],
            r["state"].lower(),
            f"{r['domains_done']}/{r['domains']}",
            r["offer"],
            usd_rate(r["planned_hour"], r["billed_hour"]),
            str(r["launches"]),
            str(r["preemptions"]),
            str(r["recomputed_steps"]),
            f"{r['lost_seconds']:.1f}",
            _local_time(r["started_at"]),
            "-" if r["elapsed_seconds"] is None else _duration(r["elapsed_seconds"]),
            f"{r['machine_seconds']:.0f}",
            usd(r["cost_so_far"]),
        )
    print_whole(t)


def _local_time(iso: str | None) -> str:
    """An ISO time as this machine's local time, the date only when it is not today."""
    if iso is None:
        return "-"
    from datetime import datetime

    t = datetime.fromisoformat(iso).astimezone()
    return t.strftime("%H:%M:%S" if t.date() == datetime.now().astimezone().date() else "%Y-%m-%d %H:%M")


def _duration(seconds: float) -> str:
    """1:02:03 (hours:minutes:seconds), as SkyPilot's and rich's elapsed columns write it."""
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@app.command("simulate")
def simulate_command(
    domain_args: list[str] = typer.Option(..., "--domains", "-d", metavar="<str>", help=DOMAINS_HELP),
    market: str = typer.Option(
        ..., help="synthetic:HOURS (mean hours a spot machine stays up), or a spot trace file or folder"
    ),
    budget: float = typer.Option(None, min=0, help="the launch's --budget, USD"),
    deadline: str = typer.Option(None, help="e.g. 12h, 90m, 2d: the run must be done by then"),
    replays: int = typer.Option(50, min=1, max=10_000),
    policy: list[str] = typer.Option(
        None, "--policy", help="on-demand, greedy, uniform-progress, meetara (repeatable; default all)"
    ),
    base_model: str = typer.Option("microsoft/DialoGPT-medium", help="the model the plan is priced for"),
    samples: int = typer.Option(200, min=MIN_SAMPLES, max=MAX_SAMPLES),
    epochs: float = typer.Option(2.0, min=MIN_EPOCHS, max=MAX_EPOCHS),
    checkpoint_minutes: float = typer.Option(10.0, min=0.1, help="training between checkpoints"),
    seed: int = typer.Option(0, help="first replay's seed"),
    config: Path = typer.Option(None, help="preferences file (its caps apply)"),
    as_json: bool = typer.Option(False, "--json"),
    plot_path: Path = typer.Option(None, "--plot", help="also write a PNG chart of the costs here"),
) -> None:
    """Replay a spot market under the real conductor and money code on a virtual clock: per policy,
    cost, hours, deadlines missed and preemptions, beside the omniscient optimum."""
    domains = ",".join(domain_args)  # -d a -d b adds up
    from rich.progress import Progress

    from train import BadInput

    try:
        names = api.domain_names(domains)
        with Progress(console=_console(stderr=True), transient=True, disable=as_json) as bar:
            task = bar.add_task("replaying", total=replays)
            out = api.simulate(
                domains,
                market,
                policies=policy,
                replays=replays,
                seed=seed,
                budget=budget,
                deadline=deadline,
                base_model=base_model,
                samples=samples,
                epochs=epochs,
                checkpoint_minutes=checkpoint_minutes,
                config=config,
                on_replay=lambda k: bar.update(task, completed=k),
            )
    except (BadInput, ValueError) as e:
        raise fail(str(e)) from None
    if plot_path is not None:
        try:
            api.plot_simulation(
                out, plot_path, f"{len(names)} domains, {replays} replays of {Path(market).name}"
            )
        except OSError as e:
            raise fail(f"{plot_path}: cannot write the chart ({e.strerror or e})") from None
        say(f"wrote {plot_path}")
    if as_json:
        import json

        typer.echo(json.dumps(out, indent=1))
        return
    from rich.table import Table

    t = Table(title=escape(f"{len(names)} domains, {replays} replays of {market}"))
    for h in ("policy", "cost mean", "cost p95", "hours mean", "hours p95", "missed", "preempt.", "by caps"):
        t.add_column(h, justify="left" if h == "policy" else "right")
    for name, r in out["policies"].items():
        hours = [("-" if r[k] is None else f"{r[k]:.2f}") for k in ("hours_mean", "hours_p95")]
        _row(
            t,
            name,
            usd(r["cost_mean"]),
            usd(r["cost_p95"]),
            *hours,
            f"{r['deadline_missed']:.0%}",
            f"{r['preemptions_mean']:.2f}",
            str(r["stopped_by_caps"]),
        )
    o = out["optimum"]
    _row(
        t, "optimum (bound)", usd(o["cost_mean"]), "", f"{o['hours_mean']:.2f}", "", "", "", "", style="bold"
    )
    print_whole(t)


@app.command("doctor")
def doctor_command(config: Path = typer.Option(None, help="preferences file")) -> None:
    """What is installed and configured: training deps, SkyPilot and provider credentials, store, state."""
    import importlib.util
    import platform

    from rich.table import Table
    from rich.text import Text

    from launcher.preferences import config_path, load_preferences
    from train import BadInput

    rows: list[tuple[str, bool, str]] = [("python", sys.version_info >= (3, 11), platform.python_version())]
    for mod, what in (("torch", "training"), ("peft", "training"), ("llama_cpp", "GGUF validation")):
        ok = importlib.util.find_spec(mod) is not None
        rows.append((mod, ok, what if ok else f'missing: pip install -e ".[train]" ({what})'))
    try:
        prefs = load_preferences(config)
        rows.append(("preferences", True, str(config_path(config))))
    except BadInput as e:
        prefs = None
        rows.append(("preferences", False, str(e)))
    from budgets import state_dir

    rows.append(("state directory", True, str(state_dir())))
    from launcher.backends import skypilot

    rows.extend(skypilot.doctor())
    if prefs is not None:
        from launcher.launch import open_ledger, resolve_backend

        rows.append(("backend", True, resolve_backend(prefs)))
        from budgets import LedgerError

        try:
            with open_ledger(config) as ledger:
                n = len(ledger.open_reservations())
                rows.append(("ledger", True, f"{ledger.location}; {n} open reservation(s)"))
        except (LedgerError, BadInput) as e:
            rows.append(("ledger", False, str(e)))
    t = Table("check", "ok", "detail", title="meetara doctor")
    for name, ok, detail in rows:
        _row(t, name, Text("yes", style="green") if ok else Text("no", style="red"), detail)
    print_whole(t)


@app.command("cancel")
def cancel_command(
    target: str = typer.Argument(..., metavar="RUN|JOB", help="a run id (all its jobs) or a job name"),
    config: Path = typer.Option(None, help="preferences file (its ledger)"),
) -> None:
    """Stop a run's jobs, or one job (training checkpoints first); settle what ran, release the rest."""
    from budgets import LedgerError
    from launcher.jobs import cancel, cancel_lines
    from train import BadInput

    try:
        report = cancel(target, config=config)
    except (BadInput, LedgerError) as e:
        raise fail(str(e)) from None
    for line in cancel_lines(report):
        say(line, stderr=False)
    if report.failed:
        raise typer.Exit(1)


@app.command("logs")
def logs_command(
    job: str = typer.Argument(..., metavar="JOB", help="a job name (meetara status), or a run with one job"),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="keep printing what the job writes until it ends"
    ),
    tail: int = typer.Option(None, "--tail", "-n", min=1, help="only the last N lines [default: all]"),
) -> None:
    """Show a job's log (its current launch): local jobs' log file, SkyPilot's managed-job log."""
    from launcher.backends.base import BackendError
    from launcher.jobs import follow_log, read_log
    from train import BadInput

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        if follow:
            follow_log(job, write, tail=tail)
        else:
            write(read_log(job, tail))
    except (BadInput, BackendError) as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


sky_app = typer.Typer(
    no_args_is_help=True, help="meetara's own SkyPilot API server (state in meetara's state directory)."
)
app.add_typer(sky_app, name="sky")


@sky_app.command("status")
def sky_status_command() -> None:
    """Whether meetara's SkyPilot API server runs, on which port, and what holds the port if not it."""
    from launcher import skyserver

    try:
        ok, detail = skyserver.describe(skyserver.state())
    except skyserver.SkyServerError as e:
        raise fail(str(e)) from None
    _console().print(detail, soft_wrap=True, highlight=False, markup=False)
    if not ok:
        raise typer.Exit(1)


@sky_app.command("stop")
def sky_stop_command() -> None:
    """Stop meetara's SkyPilot API server and the jobs controller it runs (managed jobs' machines keep
    running; the next cloud command starts the server again and it picks them up)."""
    from launcher import skyserver
    from launcher.backends.skypilot import INSTALL_HINT, available

    if not available():
        raise fail(INSTALL_HINT)
    try:
        was = skyserver.stop()
    except skyserver.SkyServerError as e:
        raise fail(str(e)) from None
    st = skyserver.state()
    if st.healthy:
        raise fail(f"the SkyPilot API server on port {st.port} is still running (pid {st.pid})", 1)
    _console().print("stopped" if was else "it was not running", highlight=False)
