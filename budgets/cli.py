"""`meetara report` and `meetara budget`: plain functions that launcher/cli.py registers with typer.

Bad input (config values, dates) and an unreadable ledger end in one line on stderr with exit code 2.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import typer

from budgets import LedgerError
from budgets.query import open_ledger, parse_when, query_report  # noqa: F401 (re-exported)
from launcher.console import fail, print_whole
from train import BadInput

# per run, its domains finished in its store and when (`budgets.report.report`'s `done`): set by a
# front end that knows the runs' stores (meetara's CLI); None: domains done by the ledger's rule
finished_domains = None


def report_command(
    by: str = typer.Option("provider", "--by", help="provider, domain, day or run"),
    since: str = typer.Option(
        None, help="YYYY-MM-DD (budget time zone), an ISO time, 'today', 'yesterday' or Nd"
    ),
    until: str = typer.Option(
        None, help="YYYY-MM-DD (that day included), an ISO time, 'today' or 'yesterday'"
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    csv_path: Path = typer.Option(None, "--csv", help="also write CSV here ('-': stdout)"),
    plot_path: Path = typer.Option(None, "--plot", help="also write a PNG bar chart here"),
    config: Path = typer.Option(None, help="config file (its `budgets:` section)"),
) -> None:
    """Cost per provider, domain, day or run, from the budget ledger."""
    from budgets import report as rep

    try:
        done = finished_domains() if finished_domains is not None else None
        rows, total, start, stop = query_report(config, by, since, until, done)
    except (BadInput, LedgerError) as e:
        raise fail(str(e)) from None
    if plot_path is not None:
        try:
            rep.plot(rows, plot_path, by=by, since=start, until=stop)
        except OSError as e:
            raise fail(f"{plot_path}: cannot write the chart ({e.strerror or e})") from None
        typer.echo(f"wrote {plot_path}", err=True)
    if csv_path is not None:
        text = rep.to_csv(rows, by=by)
        if str(csv_path) == "-":
            typer.echo(text, nl=False)
        else:
            try:
                csv_path.write_text(text)
            except OSError as e:
                raise fail(f"{csv_path}: cannot write the CSV ({e.strerror or e})") from None
            typer.echo(f"wrote {csv_path}", err=True)
    if as_json:
        typer.echo(rep.to_json(rows, by=by, since=start, until=stop, total=total))
    elif str(csv_path) != "-":
        title = f"cost by {by}, {rep.period_label(start, stop)}"
        print_whole(rep.render_table(rows, by=by, title=title, total=total))


def budget_command(
    config: Path = typer.Option(None, help="config file (its `budgets:` section)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Caps, spent, reserved and remaining per window (day, week, month in the budget time zone)."""
    from budgets import usd

    try:
        with open_ledger(config) as ledger:
            windows = ledger.window_status()
            held = ledger.open_reservations()
            location, tz = ledger.location, ledger.config.timezone
    except (BadInput, LedgerError) as e:
        raise fail(str(e)) from None
    if as_json:
        doc = {
            "timezone": tz,
            "ledger": location,
            "open_reservations": len(held),
            "windows": [w.as_dict() for w in windows],
        }
        typer.echo(json.dumps(doc, indent=1))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"meetara budget ({tz})")
    t.add_column("window")
    t.add_column("period")
    for name in ("cap", "spent", "reserved", "remaining"):
        t.add_column(name, justify="right")
    for w in windows:
        last = (w.end - timedelta(days=1)).date()
        period = w.start.date().isoformat() + ("" if w.name == "daily" else f" to {last.isoformat()}")
        if w.remaining is None:
            left = "no cap"
        else:
            left = f"[red]{usd(w.remaining)}[/]" if w.remaining <= 0 else usd(w.remaining)
        cap = "none" if w.cap is None else usd(w.cap)
        t.add_row(w.name, period, cap, usd(w.spent), usd(w.reserved), left)
    t.caption = escape(f"{len(held)} open reservation(s); ledger: {location}")
    Console().print(t)
