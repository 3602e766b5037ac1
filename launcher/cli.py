"""`meetara`: a thin CLI. It parses and prints; the work happens in importable functions."""

from __future__ import annotations

from pathlib import Path

import typer

from train.cli import fail, train_command

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Fine-tune one LoRA adapter per knowledge domain on cheap spot GPUs; bring back GGUFs.",
)
app.command("train", help="Train domains here (the embedded default: local CPU/GPU, file store).")(
    train_command
)


@app.command("domains")
def domains_command(category: str = typer.Option(None, help="only this category")) -> None:
    """List the domain registry (tasks/domains.yaml)."""
    from rich.console import Console
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
            table.add_row(d.name, d.category, d.description)
    Console().print(table)


def main() -> None:
    from train.cli import run_app

    run_app(app, "meetara")


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
    """Price table across providers, cheapest expected $/h first (your provider preferences applied)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from launcher.offers import gather_offers
    from launcher.preferences import Preferences, load_preferences
    from launcher.select import rank
    from train import BadInput

    try:
        table = gather_offers(live=live, providers=provider or None, refresh=refresh)
        prefs = Preferences() if ignore_preferences else load_preferences()
    except (BadInput, ValueError) as e:
        raise fail(str(e)) from None
    if spot is not None:
        prefs = prefs.model_copy(update={"spot_policy": "spot" if spot else "on-demand"})
    offers = [o for o in table.offers if not gpu or o.gpu.lower().startswith(gpu.lower())]
    choices = rank(offers, prefs)[:limit]
    for name, why in {**table.skipped, **table.errors}.items():
        Console(stderr=True).print(f"[yellow]{name}:[/] {why}", highlight=False)
    if as_json:
        rows = [
            c.offer.model_dump(mode="json")
            | {"spot": c.spot, "price_hour": c.price_hour, "expected_hour": c.expected_hour}
            for c in choices
        ]
        typer.echo(json.dumps(rows, indent=1))
        return
    when = f"snapshot of {table.snapshot_date}" if table.source == "snapshot" else "live"
    out = Table(title=f"{len(choices)} offers ({when})")
    for header in ("provider", "GPU", "n", "GB", "region", "market", "$/h", "$/GPU-h", "exp. $/h"):
        out.add_column(header, no_wrap=header in ("GPU", "market"), overflow="fold")
    for c in choices:
        o = c.offer
        out.add_row(
            o.provider,
            o.gpu,
            str(o.gpu_count),
            str(o.gpu_mem_gb),
            o.region,
            "spot" if c.spot else "on-demand",
            f"{c.price_hour:.3f}",
            f"{c.price_hour / o.gpu_count:.3f}",
            f"{c.expected_hour:.3f}",
        )
    Console().print(out)


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
    from rich.console import Console
    from rich.table import Table

    from launcher.preferences import config_path, load_preferences
    from train import BadInput

    try:
        prefs = load_preferences(config)
    except BadInput as e:
        raise fail(str(e)) from None
    t = Table("provider", "enabled", "weight", "max $/GPU-h", "regions", title=str(config_path(config)))
    for name, p in prefs.providers.items():
        t.add_row(
            name,
            "yes" if p.enabled else "no",
            f"{p.weight:g}",
            "-" if p.max_price_per_gpu_hour is None else f"{p.max_price_per_gpu_hour:g}",
            ",".join(p.regions) or "any",
        )
    console = Console()
    console.print(t)
    for key, value in prefs.model_dump(exclude={"providers"}).items():
        console.print(f"{key}: {value}", highlight=False)


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
    config: Path = typer.Option(None, help="preferences file"),
) -> None:
    """Change preferences and write them back to the file."""
    from pydantic import ValidationError

    from launcher.preferences import PROVIDERS, Preferences, load_preferences, save_preferences
    from train import BadInput

    try:
        data = load_preferences(config).model_dump()
        if provider is not None:
            if provider not in PROVIDERS:
                raise BadInput(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
            changes = {
                "enabled": enable,
                "weight": weight,
                "max_price_per_gpu_hour": max_price,
                "regions": _csv(regions),
            }
            data["providers"][provider].update({k: v for k, v in changes.items() if v is not None})
        else:
            if any(v is not None for v in (enable, weight, regions)):
                raise BadInput(
                    "--enable/--disable, --weight and --regions need a provider (meetara providers set vast)"
                )
            changes = {
                "spot_policy": spot_policy,
                "min_gpu_mem_gb": min_gpu_mem,
                "allowed_gpus": _csv(allowed_gpus),
                "blocked_gpus": _csv(blocked_gpus),
                "max_recoveries": max_recoveries,
                "preemption_overhead": preemption_overhead,
                "max_price_per_gpu_hour": max_price,
            }
            data.update({k: v for k, v in changes.items() if v is not None})
        try:
            prefs = Preferences.model_validate(data)
        except ValidationError as e:
            raise BadInput.from_validation(e) from None
    except BadInput as e:
        raise fail(str(e)) from None
    typer.echo(f"saved {save_preferences(prefs, config)}")
