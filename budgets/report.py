"""Cost reports from the ledger: per provider, domain, day or run; as a table, JSON, CSV or PNG chart."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path
from zoneinfo import ZoneInfo

from budgets import usd
from budgets.ledger import BILLED_RATE, PREEMPTED, SETTLED, Entry, Event, Ledger, Reservation

BY = ("provider", "domain", "day", "run")
# after the key column
VALUES = ("cost", "gpu_hours", "domains_done", "dollars_per_domain", "preemptions", "over_plan")
NO_DOMAIN, UNKNOWN = "(no domain)", "(unknown)"
SPLIT_NOTE = "a job's cost and preemptions are split evenly across the domains it trained"  # by domain


@dataclass
class Row:
    key: str
    cost: float = 0.0  # USD: sum of accruals
    gpu_hours: float = 0.0  # accrued seconds / 3600 x the reservation's GPU count
    domains_done: int = 0
    dollars_per_domain: float | None = None  # cost / domains_done
    preemptions: float = 0  # a whole count, except by domain: a job's preemption is split over its domains
    # USD of `cost` that providers billed over the planned $/h (their reported rates, 'billed-rate' events)
    over_plan: float = 0.0


def report(
    ledger: Ledger,
    by: str,
    since: datetime | None = None,
    until: datetime | None = None,
    done: dict[str, dict[str, datetime]] | None = None,
) -> list[Row]:
    """Cost per provider, domain, day (in the budget time zone) or run, for accruals in [since, until).

    - cost: sum of accrual amounts; gpu_hours: accrued seconds x GPU count (accruals without seconds,
      such as settlement corrections, add cost but no hours).
    - domains_done: with `done` (per run: its domains finished in its store, and when), each of those
      finished in the range, once, for the run's reservation that trained it (the latest made before it
      finished, of those naming it), whatever closed that reservation (a job cancelled or stopped after
      finishing some of its domains); for a run not in `done`, the distinct domains of its settled
      reservations (ended in the range) not closed by a stop.
    - preemptions: 'preempted' events in the range, keyed through the reservation they name (else the
      run's latest reservation of that job).
    - by='domain': a job trains several domains on one machine, so its cost, GPU-hours and preemptions
      are split evenly across its domains (a preemption stops the machine, not one domain, and the ledger
      does not record which domain was training): a job of 4 domains preempted once gives each 0.25, and
      the domain rows' preemptions add up to the events, as for every other `by`.
    - by='total' gives a single row over everything.
    Rows: by day in date order, otherwise by cost, highest first."""
    if by not in (*BY, "total"):
        raise ValueError(f"by must be one of {', '.join(BY)}, not {by!r}")
    zone = ledger.config.zone
    finished = done or {}  # (the name `done` is this function's tally below)
    rows: dict[str, Row] = {}

    def row(key: str) -> Row:
        return rows.setdefault(key, Row(key))

    billed = _billed_rates(ledger)
    for e in ledger.entries(since, until):
        over = _over_plan(e, billed.get(e.reservation_id))
        for key, share in _keys(by, e.provider, e.run_id, e.domains, e.at, zone):
            r = row(key)
            r.cost += e.amount * share
            r.over_plan += over * share
            r.gpu_hours += (e.seconds or 0.0) / 3600 * e.gpu_count * share
    reservations = ledger.reservations()
    by_id = {r.id: r for r in reservations}
    done: dict[str, set[str]] = defaultdict(set)
    for res in reservations:
        if res.run_id in finished:
            continue
        if res.domains and res.state == SETTLED and not res.stopped and _within(res.ended_at, since, until):
            for key, _ in _keys(by, res.provider, res.run_id, res.domains, res.ended_at, zone):
                done[key].update([key] if by == "domain" else res.domains)
    for run_id, domains in finished.items():
        for domain, at in domains.items():
            res = _trained_by(run_id, domain, at, reservations)
            if res is None or not _within(at, since, until):
                continue
            for key, _ in _keys(by, res.provider, run_id, [domain], at, zone):
                done[key].add(f"{run_id}/{domain}")
    preempted: dict[str, Fraction] = defaultdict(Fraction)  # exact shares: whole sums stay whole
    for ev in ledger.events(since, until, kind=PREEMPTED):
        res = event_reservation(ev, reservations, by_id)
        provider, domains = (res.provider, res.domains) if res else (UNKNOWN, (UNKNOWN,))
        keys = _keys(by, provider, ev.run_id, domains, ev.at, zone)
        for key, _ in keys:
            preempted[key] += Fraction(1, len(keys))
    for key, n in preempted.items():
        row(key).preemptions = int(n) if n.denominator == 1 else float(n)
    for key, names in done.items():
        row(key).domains_done = len(names)
    for r in rows.values():
        r.dollars_per_domain = r.cost / r.domains_done if r.domains_done else None
    if by == "day":
        return sorted(rows.values(), key=lambda r: r.key)
    return sorted(rows.values(), key=lambda r: (-r.cost, r.key))


def _billed_rates(ledger: Ledger) -> dict[int, list[tuple[datetime, float, float]]]:
    """Per reservation, the rates its providers reported billing: (when, planned $/h, billed $/h)."""
    out: dict[int, list[tuple[datetime, float, float]]] = defaultdict(list)
    for ev in ledger.events(kind=BILLED_RATE):
        try:
            d = json.loads(ev.detail or "")
            out[ev.reservation_id].append((ev.at, float(d["planned_hour"]), float(d["billed_hour"])))
        except (ValueError, KeyError, TypeError):
            continue  # an unreadable note costs the comparison, never the report
    return out


def _over_plan(e: Entry, rates: list[tuple[datetime, float, float]] | None) -> float:
    """What of accrual `e` was billed over the planned rate: under the rate reported last before it (the
    first one for what accrued before any report: the machine's start)."""
    if not rates:
        return 0.0
    _at, planned, billed = max((r for r in rates if r[0] <= e.at), default=rates[0], key=lambda r: r[0])
    return e.amount * (1 - planned / billed) if billed > 0 else 0.0


def _keys(by: str, provider: str, run_id: str, domains: Iterable[str], at: datetime, zone: ZoneInfo):
    """The report keys one accrual / reservation / event counts for, with its share of the amount."""
    if by == "provider":
        return [(provider, 1.0)]
    if by == "run":
        return [(run_id, 1.0)]
    if by == "day":
        return [(at.astimezone(zone).date().isoformat(), 1.0)]
    if by == "total":
        return [("total", 1.0)]
    names = list(dict.fromkeys(domains)) or [NO_DOMAIN]
    return [(d, 1.0 / len(names)) for d in names]


def _trained_by(
    run_id: str, domain: str, at: datetime, reservations: list[Reservation]
) -> Reservation | None:
    """The reservation of `run_id` that paid for `domain`, finished at `at`: the latest made before
    then of those naming it (else the first naming it: clocks differ between machines)."""
    named = [r for r in reservations if r.run_id == run_id and domain in r.domains]
    before = [r for r in named if r.created_at <= at]
    return max(before, key=lambda r: (r.created_at, r.id)) if before else (named[0] if named else None)


def _within(t: datetime | None, since: datetime | None, until: datetime | None) -> bool:
    return t is not None and (since is None or t >= since) and (until is None or t < until)


def event_reservation(
    ev: Event, reservations: list[Reservation], by_id: dict[int, Reservation] | None = None
) -> Reservation | None:
    """The reservation an event belongs to: the one it names, else the run's latest one for its job
    made at or before the event."""
    if ev.reservation_id is not None:
        if by_id is not None:
            return by_id.get(ev.reservation_id)
        return next((r for r in reservations if r.id == ev.reservation_id), None)
    candidates = [
        r
        for r in reservations
        if r.run_id == ev.run_id and (ev.job is None or r.job == ev.job) and r.created_at <= ev.at
    ]
    return max(candidates, key=lambda r: (r.created_at, r.id), default=None)


# -- renderers -------------------------------------------------------------------------------------------


def _round(x: float | None) -> float | None:
    # one rounding for JSON and CSV: micro-dollars, so both carry the same numbers
    return None if x is None else round(x, 6)


def as_dicts(rows: Iterable[Row], by: str | None = None) -> list[dict]:
    """The rows as dicts of rounded numbers ('key' first). With `by`, each also names its key for what it
    is ({"domain": "legal", "key": "legal", ...}); 'key' stays for readers of earlier reports."""
    out = []
    for r in rows:
        d = {k: (_round(v) if isinstance(v, float) else v) for k, v in asdict(r).items()}
        if float(d["preemptions"]).is_integer():  # a whole count reads as one (3, not 3.0)
            d["preemptions"] = int(d["preemptions"])
        out.append({by: r.key, **d} if by else d)
    return out


def to_json(
    rows: list[Row],
    *,
    by: str,
    since: datetime | None = None,
    until: datetime | None = None,
    total: Row | None = None,
) -> str:
    doc = {
        "by": by,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "rows": as_dicts(rows, by),
    }
    if total is not None:
        doc["total"] = as_dicts([total])[0]
    return json.dumps(doc, indent=1)


def to_csv(rows: list[Row], *, by: str) -> str:
    """CSV with a header row: the `by` dimension ('provider', 'domain', 'day' or 'run'), then VALUES; an
    empty cell where dollars_per_domain is undefined."""
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=(by, *VALUES), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for d in as_dicts(rows, by):
        w.writerow({k: ("" if v is None else v) for k, v in d.items()})
    return out.getvalue()


def period_label(since: datetime | None, until: datetime | None) -> str:
    """'2025-03-01 to 2025-03-31' (an `until` at midnight is shown as the day before: it is exclusive)."""
    start = since.date().isoformat() if since else "start"
    if until is None:
        end = "now"
    else:
        last = until - timedelta(days=1) if until.time() == datetime.min.time() else until
        end = last.date().isoformat()
    return f"{start} to {end}"


def _fill_days(rows: list[Row], most: int = 62) -> list[Row]:
    """Day rows with the days between that had no spending as zero rows (for spans up to `most` days),
    so that a chart's gaps show as gaps."""
    from datetime import date

    if not rows:
        return []
    have = {r.key: r for r in rows}
    first, last = date.fromisoformat(min(have)), date.fromisoformat(max(have))
    if (last - first).days >= most:
        return sorted(rows, key=lambda r: r.key)
    days = [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
    return [have.get(d) or Row(d) for d in days]


def render_table(rows: list[Row], *, by: str, title: str | None = None, total: Row | None = None):
    """A rich Table of the rows (and a total row)."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(title or f"cost by {by}"))
    t.add_column(by, no_wrap=True, overflow="fold")  # a name is never cut short: folded if it must be
    # billed over the plan: a column once a provider billed another rate than planned
    over = any(abs(r.over_plan) >= 5e-7 for r in [*rows, *([total] if total else [])])
    for name in ("cost", "GPU-hours", "domains done", "$ / domain", "preemptions", *(["over plan"] * over)):
        t.add_column(name, justify="right")

    def cells(r: Row) -> list[str]:
        per = usd(r.dollars_per_domain) if r.dollars_per_domain is not None else "-"
        return [
            escape(r.key),
            usd(r.cost),
            f"{r.gpu_hours:.2f}",
            str(r.domains_done),
            per,
            count(r.preemptions),
            *([usd(r.over_plan)] * over),
        ]

    for r in rows:
        t.add_row(*cells(r))
    if total is not None:
        t.add_section()
        t.add_row(*cells(total), style="bold")
    if by == "domain":
        t.caption = SPLIT_NOTE
    return t


def count(x: float) -> str:
    """A count as the table shows it: 3, or a share of one such as 0.25 or 1.33 (by domain)."""
    return f"{x:.2f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def money_ticks(values: Sequence[float]) -> list[str]:
    """Dollar labels for an axis's ticks, all with one number of decimals: the fewest that write each
    tick exactly (none for whole dollars, else at least cents), so ticks never read alike:
    $0 $5 $10, $0.00 $2.50 $5.00, $0.0000 $0.0005 $0.0010."""
    xs = [float(v) for v in values]
    if not xs:
        return []
    marks = sorted(set(xs))
    step = min((b - a for a, b in zip(marks, marks[1:], strict=False)), default=abs(marks[0]) or 1.0)
    places = next((p for p in range(13) if all(abs(round(x, p) - x) <= step * 1e-3 for x in xs)), 12)
    places = max(places, 2) if places else 0

    def label(x: float) -> str:
        x = round(x, places) + 0.0  # + 0.0: no "-$0"
        return f"{'-' if x < 0 else ''}${abs(x):,.{places}f}"

    return [label(x) for x in xs]


def chart(
    rows: list[Row],
    *,
    by: str = "provider",
    since: datetime | None = None,
    until: datetime | None = None,
    max_bars: int = 40,
):
    """The matplotlib Figure of `plot`: a horizontal bar chart of cost per key, each bar labelled with its
    cost as the table gives it (budgets.usd), the money axis with `money_ticks`. A bare Figure: no
    pyplot, no display, nothing to close.

    Past `max_bars` keys the cheapest are summed into one 'others' bar (days are never merged)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import Formatter

    class MoneyTicks(Formatter):
        def __call__(self, x, pos=None):  # one value alone (not a tick): as the table writes it
            return usd(x)

        def format_ticks(self, values):
            return money_ticks(values)

    rows = _fill_days(rows) if by == "day" else sorted(rows, key=lambda r: -r.cost)
    if by != "day" and len(rows) > max_bars:
        rest = rows[max_bars - 1 :]
        rows = [*rows[: max_bars - 1], Row(f"others ({len(rest)})", cost=sum(r.cost for r in rest))]
    labels = [r.key for r in rows][::-1]  # barh draws bottom-up: first row on top
    costs = [r.cost for r in rows][::-1]
    total = sum(r.cost for r in rows)

    fig = Figure(figsize=(9, max(2.8, 0.42 * len(rows) + 1.6)), dpi=110)
    ax = fig.subplots()
    bars = ax.barh(labels, costs, color="#3b75af", height=0.65)
    top = max([*costs, 0.0])
    ax.set_xlim(min([*costs, 0.0]) * 1.25, top * 1.22 if top > 0 else 1.0)
    ax.bar_label(bars, labels=[usd(c) for c in costs], padding=4, fontsize=10)
    ax.set_xlabel("cost (USD)", fontsize=11)
    zone = since.tzinfo if since is not None and by == "day" else None
    ax.set_ylabel(f"day ({zone})" if zone else by, fontsize=11)
    ax.set_title(f"meetara cost by {by}, {period_label(since, until)} (total {usd(total)})", fontsize=12)
    ax.xaxis.set_major_formatter(MoneyTicks())
    ax.tick_params(axis="y", labelsize=10)
    ax.margins(y=0.02)  # bars from top to bottom, no empty band
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if not rows:
        ax.text(0.5, 0.5, "no spending in this period", ha="center", va="center", transform=ax.transAxes)
    if by == "domain":
        fig.text(0.01, 0.01, SPLIT_NOTE, fontsize=8, alpha=0.7)
    fig.tight_layout()
    return fig


def plot(
    rows: list[Row],
    path: Path | str,
    *,
    by: str = "provider",
    since: datetime | None = None,
    until: datetime | None = None,
    max_bars: int = 40,
) -> Path:
    """A PNG of `chart` (cost per key, dollar values on the bars) at `path`; returns the path."""
    path = Path(path)
    chart(rows, by=by, since=since, until=until, max_bars=max_bars).savefig(path, format="png")
    return path
