"""`meetara`: a thin CLI. It parses and prints; the work happens in importable functions."""

from __future__ import annotations

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
