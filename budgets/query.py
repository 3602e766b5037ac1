"""The budget ledger's read side, shared by the service layer and the CLI: open the configured ledger,
read a period, query the cost report. No printing here."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from budgets.caps import load_budget_config, midnight, utcnow
from train import BadInput


def open_ledger(config: Path | None = None):
    """The ledger the config file (`--config`, else the preferences file's usual place) points to."""
    from budgets.ledger import Ledger
    from launcher.preferences import config_path  # one place decides where the config file is

    return Ledger(config=load_budget_config(config_path(config)))


# a report's bounds (UTC, with room for a day either side in every time zone)
EARLIEST, LATEST = datetime(2, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC)


def parse_when(text: str, zone: ZoneInfo, *, end: bool = False, flag: str = "--since") -> datetime:
    """YYYY-MM-DD (local midnight in `zone`; with end=True the midnight after, so the day is included),
    an ISO time (naive = in `zone`), 'today', 'yesterday', or Nd (N x 24 hours ago)."""
    text = text.strip()
    now = utcnow()
    if text in ("today", "yesterday"):
        day = now.astimezone(zone).date() - timedelta(days=text == "yesterday")
        return midnight(day + timedelta(days=1) if end else day, zone)
    try:
        if m := re.fullmatch(r"(\d+)d", text):
            t = now - timedelta(days=int(m.group(1)))
        elif re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = date.fromisoformat(text)
            t = midnight(day + timedelta(days=1) if end else day, zone)
        else:
            t = datetime.fromisoformat(text)
            t = t if t.tzinfo else t.replace(tzinfo=zone)
        if not EARLIEST <= t <= LATEST:
            raise OverflowError
    except OverflowError:
        raise BadInput(
            f"{flag}: {text!r} is out of range (0002-01-01 to 9998-12-31); omit {flag} for no bound"
        ) from None
    except ValueError:
        raise BadInput(
            f"{flag}: cannot read {text!r} (YYYY-MM-DD, an ISO time, today, yesterday or Nd)"
        ) from None
    return t


def query_report(
    config: Path | None, by: str, since: str | None, until: str | None, done: dict | None = None
):
    """`meetara report`'s numbers (CLI and MCP): the rows by `by`, their total, and the period
    [start, stop) parsed in the budget's time zone. `done`: per run, its domains finished in its store
    and when (`budgets.report.report`). Raises BadInput on a bad `by` or period."""
    from budgets import report as rep

    if by not in rep.BY:
        raise BadInput(f"--by: {by!r} is not one of {', '.join(rep.BY)}")
    with open_ledger(config) as ledger:
        zone = ledger.config.zone
        start = parse_when(since, zone) if since else None
        stop = parse_when(until, zone, end=True, flag="--until") if until else None
        if start and stop and start >= stop:
            raise BadInput(f"--since {since} is not before --until {until}")
        rows = rep.report(ledger, by, start, stop, done)
        total = (rep.report(ledger, "total", start, stop, done) or [rep.Row("total")])[0]
    return rows, total, start, stop
