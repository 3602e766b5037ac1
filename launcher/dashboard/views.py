"""The dashboard's pages as HTML, rendered from what `launcher.api` returns (its models dumped to JSON
dicts). Pure functions of their inputs: the app calls the api, these turn the answers into markup.

A live page's body is one fragment (`overview`, `run_page`, `report_page`); the app renders it again
for its server-sent events and the page swaps it in when it changed."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from launcher.dashboard import charts

NAV = (("/", "Overview"), ("/report", "Reports"), ("/offers", "Offers"), ("/plan", "Plan"))
BY = ("provider", "domain", "day", "run")


def rate(planned: float | None, billed: float | None) -> str:
    """A job's $/h as `meetara status` shows it: planned, or billed and how it differs from the plan."""
    if planned is None:
        return "–"
    from budgets import usd_rate

    return escape(usd_rate(planned, billed))


def usd(x: float | None) -> str:
    """Dollars as meetara's messages show them ($0.000417: small local runs never read as $0.00)."""
    if x is None:
        return "–"
    from budgets import usd as _usd

    return _usd(x)


def size(n: int | None) -> str:
    """Bytes for people: 812 B, 3.1 MB."""
    if n is None:
        return "–"
    x = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1000 or unit == "GB":
            return f"{int(x)} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    return f"{x:.1f} GB"


def duration(seconds: float | None) -> str:
    """1h 02m, 3m 05s, 42s."""
    if seconds is None:
        return "–"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def when(iso: str | None) -> str:
    """An ISO time as 'YYYY-MM-DD HH:MM:SS' (its own zone)."""
    if not iso:
        return "–"
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return escape(str(iso))


def loss(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def state_badge(state: str | None) -> str:
    s = str(state or "unknown")
    cls = re.sub(r"[^a-z0-9]+", "-", s.lower())
    return f'<span class="state state-{cls}">{escape(s)}</span>'


def yes_no(x: bool | None) -> str:
    if x is None:
        return "–"
    return '<span class="ok">yes</span>' if x else '<span class="bad">no</span>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "", empty: str = "none") -> str:
    """An HTML table; `rows` hold markup already escaped."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="muted {escape(cls)}">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f'<table class="{escape(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def digest(fragment: str) -> str:
    """What a live page sends back to its event stream: the stream pushes only a fragment that differs."""
    return hashlib.sha256(fragment.encode()).hexdigest()[:16]


def layout(
    title: str, body: str, *, path: str = "/", live: str | None = None, allow_launch: bool = False
) -> str:
    """A whole page: header, navigation, and `body` in <main>; `live` is the URL of the page's event
    stream (the page then replaces <main>'s content with each fragment it pushes)."""
    nav = "".join(
        f'<a href="{href}"{" class=current" if path == href else ""}>{name}</a>' for href, name in NAV
    )
    mode = "launch enabled" if allow_launch else "read-only"
    live_attrs = ""
    if live:
        live_attrs = (
            f' data-events="{escape(live + ("&" if "?" in live else "?") + "digest=" + digest(body))}"'
        )
    live_mark = '<span id="live-state" class="live-state">connecting</span>' if live else ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · meetara</title>"
        '<link rel="icon" href="data:,">'
        '<link rel="stylesheet" href="/static/dashboard.css">'
        '<script src="/static/dashboard.js" defer></script>'
        "</head><body>"
        f'<header><a class="brand" href="/">meetara</a><nav>{nav}</nav>'
        f'<span class="mode">{mode}</span>{live_mark}</header>'
        f'<main id="main"{live_attrs}>{body}</main>'
        "</body></html>\n"
    )


def error_page(status: int, title: str, message: str) -> str:
    """A plain page for 4xx/5xx answers: a title and one line, never a traceback."""
    body = (
        f'<section class="error" data-status="{status}"><h1>{status}: {escape(title)}</h1>'
        f'<p class="message">{escape(message)}</p><p><a href="/">Back to the overview</a></p></section>'
    )
    return layout(title, body, path="")


# ---- overview ------------------------------------------------------------------------------------


def spend(budget: dict[str, Any]) -> str:
    """The budget windows (spent and reserved against each cap) and the open reservations."""
    rows = []
    for w in budget.get("windows", []):
        cap, spent, reserved = w.get("cap"), w.get("spent") or 0.0, w.get("reserved") or 0.0
        rows.append(
            f'<div class="window" data-window="{escape(str(w.get("window")))}">'
            f'<span class="window-name">{escape(str(w.get("window")))}</span>'
            f"{charts.meter(str(w.get('window')), cap, spent, reserved)}"
            f'<span class="window-text"><b class="spent">{usd(spent)}</b> spent + {usd(reserved)} reserved'
            f" of {usd(cap) if cap is not None else 'no cap'}"
            f" · {usd(w.get('remaining')) if w.get('remaining') is not None else '–'} left</span></div>"
        )
    held = table(
        ("run", "job", "provider", "gpu", "domains", "$/h", "reserved", "accrued"),
        (
            (
                run_link(r.get("run_id")),
                escape(str(r.get("job") or "–")),
                escape(str(r.get("provider"))),
                escape(str(r.get("gpu"))),
                escape(", ".join(r.get("domains") or [])),
                usd(r.get("rate_per_hour")),
                usd(r.get("amount")),
                usd(r.get("accrued")),
            )
            for r in budget.get("open_reservations", [])
        ),
        cls="reservations",
        empty="no open reservations",
    )
    return (
        '<section class="spend"><h2>Spend against the caps</h2>'
        f'<p class="muted">budget time zone {escape(str(budget.get("timezone")))} · ledger '
        f"{escape(str(budget.get('ledger')))}</p>{''.join(rows)}"
        f"<h3>Open reservations</h3>{held}</section>"
    )


def run_link(run_id: str | None) -> str:
    if not run_id:
        return "–"
    return (
        f'<a class="run-link" data-run="{escape(run_id)}" href="/runs/{quote(run_id)}">{escape(run_id)}</a>'
    )


def runs_table(runs: dict[str, Any]) -> str:
    items = sorted(runs.get("runs", []), key=lambda r: str(r.get("created_at")), reverse=True)
    return table(
        (
            "run",
            "state",
            "backend",
            "domains done",
            "preemptions",
            "cost so far",
            "budget",
            "planned",
            "created",
        ),
        (
            (
                run_link(r.get("run_id")),
                state_badge(r.get("state")),
                escape(str(r.get("backend"))),
                f"{r.get('domains_done', 0)} / {r.get('domains_total', 0)}",
                str(r.get("preemptions", 0)),
                usd(r.get("cost_so_far")),
                usd(r.get("budget")),
                usd(r.get("planned_cost")),
                when(r.get("created_at")),
            )
            for r in items
        ),
        cls="runs",
        empty="no runs on this machine yet",
    )


def overview(budget: dict[str, Any], runs: dict[str, Any]) -> str:
    """The overview fragment: spend against the caps, then every run."""
    return f'{spend(budget)}<section class="runs"><h2>Runs</h2>{runs_table(runs)}</section>'


# ---- one run -------------------------------------------------------------------------------------


def _domain_step(d: dict[str, Any], curve: Sequence[dict]) -> str:
    steps = [r.get("step") for r in curve if r.get("kind", "train") == "train" and r.get("step") is not None]
    last = max(steps, default=d.get("checkpoint_step"))
    if last is None:
        return "–"
    epoch = next((r.get("epoch") for r in reversed(curve) if r.get("epoch") is not None), None)
    return f"step {last}" + (f" (epoch {epoch:.2f})" if isinstance(epoch, int | float) else "")


def run_page(detail: dict[str, Any], now: datetime | None = None) -> str:
    """The run fragment: what it cost, its jobs, per-domain state and progress, loss curves, the time
    line of its jobs and events (preemptions), validation, and the files it produced."""
    now = now or datetime.now(UTC)
    run_id = str(detail.get("run_id"))
    curves: dict[str, list[dict]] = detail.get("curves") or {}
    jobs = detail.get("jobs", [])
    events = detail.get("timeline") or []
    cost = detail.get("cost_so_far")
    preempted = sum(j.get("preemptions") or 0 for j in jobs)
    counts = " · ".join(
        f"{detail.get(k, 0)} {k}" for k in ("done", "training", "pending", "failed") if detail.get(k)
    )
    head = (
        f'<section class="run-head" data-run="{escape(run_id)}"><h1>Run <span class="run-id">{escape(run_id)}'
        f"</span> {state_badge(detail.get('state'))}</h1><dl>"
        f'<dt>cost so far</dt><dd class="cost">{usd(cost)}</dd>'
        f"<dt>budget</dt><dd>{usd(detail.get('budget'))}</dd>"
        f"<dt>planned</dt><dd>{usd(detail.get('planned_cost'))}</dd>"
        f"<dt>domains</dt><dd>{detail.get('done', 0)} / {detail.get('domains_total', 0)} done"
        f"{' (' + escape(counts) + ')' if counts else ''}</dd>"
        f'<dt>preemptions</dt><dd class="preemptions">{preempted}</dd>'
        f"<dt>backend</dt><dd>{escape(str(detail.get('backend')))}</dd>"
        f"<dt>base model</dt><dd>{escape(str(detail.get('base_model', '–')))}</dd>"
        f"<dt>store</dt><dd><code>{escape(str(detail.get('store')))}</code></dd>"
        f"<dt>created</dt><dd>{when(detail.get('created_at'))}</dd></dl>"
        + (
            f'<p class="bad">store: {escape(str(detail["store_error"]))}</p>'
            if detail.get("store_error")
            else ""
        )
        + "</section>"
    )
    job_table = table(
        (
            "job",
            "state",
            "domains done",
            "offer",
            "$/h",
            "launches",
            "preemptions",
            "started",
            "elapsed",
            "cost so far",
        ),
        (
            (
                escape(str(j.get("job"))),
                state_badge(j.get("state")),
                f"{j.get('domains_done', 0)} / {j.get('domains', 0)}",
                escape(str(j.get("offer"))),
                rate(j.get("planned_hour"), j.get("billed_hour")),
                str(j.get("launches", 0)),
                str(j.get("preemptions", 0)),
                when(j.get("started_at")),
                duration(j.get("elapsed_seconds")),
                usd(j.get("cost_so_far")),
            )
            for j in jobs
        ),
        cls="jobs",
    )
    domains = detail.get("domains", [])
    domain_table = table(
        ("domain", "job", "state", "progress", "held-out loss before → after", "validation", "pulled"),
        (
            (
                f'<span class="domain" data-domain="{escape(str(d.get("domain")))}">'
                f"{escape(str(d.get('domain')))}</span>",
                escape(str(d.get("job"))),
                state_badge(d.get("state")),
                _domain_step(d, curves.get(str(d.get("domain")), [])),
                f"{loss(d.get('heldout_loss_before'))} → {loss(d.get('heldout_loss_after'))}",
                yes_no(d.get("validation_passed")) if d.get("state") in ("done", "failed") else "–",
                yes_no(d.get("pulled")),
            )
            for d in domains
        ),
        cls="domains",
    )
    names = [str(d.get("domain")) for d in domains] + sorted(
        set(curves) - {str(d.get("domain")) for d in domains}
    )
    curve_cards = "".join(
        f'<figure class="curve"><figcaption>{escape(n)}</figcaption>{charts.loss_curve(n, curves.get(n, []))}'
        "</figure>"
        for n in names
    )
    lanes = []
    for j in jobs:
        start = charts._parse(j.get("started_at"))
        end = None
        if start is not None and j.get("elapsed_seconds") is not None:
            end = start + timedelta(seconds=float(j["elapsed_seconds"]))
        lanes.append((str(j.get("job")), start, end))
    event_table = table(
        ("time", "job", "event", "detail"),
        (
            (
                when(e.get("at")),
                escape(str(e.get("job") or "–")),
                f'<span class="event-kind ev-{escape(str(e.get("kind")))}">'
                f"{escape(str(e.get('kind')))}</span>",
                escape(str(e.get("text") or "")),
            )
            for e in events
        ),
        cls="events",
        empty="no events: nothing was preempted, recovered or cancelled",
    )
    file_rows, total = [], 0
    for d in domains:
        for name, f in (d.get("files") or {}).items():
            file_rows.append(
                (escape(str(d.get("domain"))), f"<code>{escape(name)}</code>", size(f.get("bytes")))
            )
            total += f.get("bytes") or 0
    file_table = table(("domain", "file", "size"), file_rows, cls="files", empty="no files yet")
    return (
        head
        + f"<section><h2>Jobs</h2>{job_table}</section><section><h2>Domains</h2>{domain_table}</section>"
        + f'<section><h2>Loss curves</h2><div class="curves">{curve_cards or "<p class=muted>none yet</p>"}'
        + "</div></section>"
        + f'<section class="timeline-section"><h2>Time line</h2>{charts.timeline(lanes, events, now)}'
        + f"{event_table}</section>"
        + f'<section><h2>Files</h2>{file_table}<p class="muted">{len(file_rows)}'
        + f" file{'' if len(file_rows) == 1 else 's'}, {size(total)}</p>"
        + "</section>"
    )


# ---- reports, offers, plan -----------------------------------------------------------------------


def report_page(rep: dict[str, Any], query: dict[str, str]) -> str:
    """The report fragment: a form (by, since, until), a bar chart of cost per row, the table."""
    by = str(rep.get("by") or query.get("by") or "provider")
    options = "".join(f"<option{' selected' if b == by else ''}>{b}</option>" for b in BY)
    form = (
        '<form class="filters" method="get" action="/report">'
        f'<label>by <select name="by">{options}</select></label>'
        f'<label>since <input type="date" name="since" value="{escape(query.get("since", ""))}"></label>'
        f'<label>until <input type="date" name="until" value="{escape(query.get("until", ""))}"></label>'
        "<button>Show</button></form>"
    )
    rows = rep.get("rows", [])
    chart = charts.bars([(str(r.get(by, r.get("key"))), float(r.get("cost") or 0)) for r in rows], usd)
    # billed over the plan (`meetara report`'s column): shown once a provider billed another rate
    over = any(abs(r.get("over_plan") or 0) >= 5e-7 for r in rows)
    cols = ("cost", "gpu_hours", "domains_done", "dollars_per_domain", "preemptions", *(["over_plan"] * over))

    def cells(r: dict, label: str) -> list[str]:
        return [
            label,
            usd(r.get("cost")),
            f"{r.get('gpu_hours') or 0:.4f}",
            str(r.get("domains_done", 0)),
            usd(r.get("dollars_per_domain")),
            str(r.get("preemptions", 0)),
            *([usd(r.get("over_plan"))] * over),
        ]

    body_rows = [cells(r, escape(str(r.get(by, r.get("key"))))) for r in rows]
    if rep.get("total") and rows:
        body_rows.append(cells(rep["total"], "<b>total</b>"))
    tab = table((by, *[c.replace("_", " ") for c in cols]), body_rows, cls="report") if rows else ""
    since = f"from {when(rep['since'])}" if rep.get("since") else "from the start"
    until = f"until {when(rep['until'])} (exclusive)" if rep.get("until") else "until now"
    return f'<h1>Cost by {escape(by)}</h1>{form}<p class="muted">{since} {until}</p>{chart}{tab}'


def offers_page(view: dict[str, Any], query: dict[str, str]) -> str:
    """Offers: a filter form and the table, cheapest expected $/h x provider weight first (as the api
    ranks them; the last column is that product)."""
    form = (
        '<form class="filters" method="get" action="/offers">'
        f'<label>GPU <input name="gpu" value="{escape(query.get("gpu", ""))}" placeholder="A100"></label>'
        f'<label>providers <input name="providers" value="{escape(query.get("providers", ""))}"'
        ' placeholder="runpod,vast"></label>'
        f'<label><input type="checkbox" name="spot" value="1"{" checked" if query.get("spot") else ""}>'
        " spot only</label>"
        f'<label><input type="checkbox" name="live" value="1"{" checked" if query.get("live") else ""}>'
        " live prices</label><button>Show</button></form>"
    )
    rows = [
        (
            escape(str(o.get("provider"))),
            escape(f"{o.get('gpu_count')}x {o.get('gpu')}"),
            f"{o.get('gpu_mem_gb')} GB",
            escape(str(o.get("region"))),
            "spot" if o.get("spot") else "on-demand",
            usd(o.get("price_hour")),
            usd(o.get("expected_hour")),
            usd(o.get("weighted_hour", o.get("expected_hour"))),
        )
        for o in view.get("offers", [])
    ]
    source = str(view.get("source"))
    if view.get("snapshot_date"):
        source += f" of {view['snapshot_date']}"
    notes = "".join(
        f"<li><b>{escape(k)}</b>: {escape(str(v))}</li>" for k, v in (view.get("notes") or {}).items()
    )
    return (
        f"<h1>Offers</h1>{form}"
        f'<p class="muted">{len(rows)} of {view.get("matching", 0)} matching offers · prices: '
        f"{escape(source)}</p>"
        + table(
            ("provider", "gpus", "gpu memory", "region", "market", "$/h", "expected $/h", "x weight $/h"),
            rows,
            cls="offers",
            empty="no offer matches",
        )
        + (f'<ul class="notes">{notes}</ul>' if notes else "")
    )


def plan_form(query: dict[str, str]) -> str:
    def field(name: str, label: str, placeholder: str = "") -> str:
        return (
            f'<label>{label} <input name="{name}" value="{escape(query.get(name, ""))}"'
            f' placeholder="{escape(placeholder)}"></label>'
        )

    return (
        '<form class="filters" method="get" action="/plan">'
        + field("domains", "domains", "nutrition,legal or all")
        + field("backend", "backend", "local")
        + field("run_id", "run id", "default")
        + field("samples", "samples", "200")
        + field("epochs", "epochs", "2")
        + "<button>Preview</button></form>"
    )


def plan_page(
    plan: dict[str, Any] | None,
    query: dict[str, str],
    *,
    error: str | None = None,
    allow_launch: bool = False,
    token: str | None = None,
) -> str:
    """Plan preview: the form, then the jobs the plan packs, their offers and the projected cost; with
    launching on, a launch form (budget) that carries the token."""
    out = ["<h1>Plan preview</h1>", plan_form(query)]
    if error:
        out.append(f'<p class="bad refusal">{escape(error)}</p>')
    if plan is None:
        out.append('<p class="muted">name domains to see which jobs, offers and cost a launch would take</p>')
        return "".join(out)
    rows = []
    for j in plan.get("jobs", []):
        o = j.get("offer") or {}
        rows.append(
            (
                escape(str(j.get("name"))),
                escape(", ".join(j.get("domains") or [])),
                escape(f"{o.get('provider')} {o.get('gpu_count')}x{o.get('gpu')} {o.get('region')}"),
                "spot" if o.get("spot") else "on-demand",
                usd(o.get("price_hour")),
                f"{j.get('hours', 0):.3f}",
                usd(j.get("cost")),
            )
        )
    out.append(table(("job", "domains", "offer", "market", "$/h", "hours", "cost"), rows, cls="plan"))
    out.append(
        f'<p class="total">projected <b>{usd(plan.get("total_cost"))}</b>'
        f" over {plan.get('total_hours', 0):.3f} h · offers: {escape(str(plan.get('offers_source')))}</p>"
    )
    if plan.get("done"):
        out.append(f'<p class="muted">already done, skipped: {escape(", ".join(plan["done"]))}</p>')
    if allow_launch and token:
        hidden = "".join(
            f'<input type="hidden" name="{k}" value="{escape(query[k])}">'
            for k in ("domains", "backend", "run_id", "samples", "epochs")
            if query.get(k)
        )
        out.append(
            '<form class="launch" method="post" action="/launch">'
            f'<input type="hidden" name="token" value="{escape(token)}">{hidden}'
            '<label>budget $ <input name="budget" type="number" step="0.01" min="0" required'
            f' value="{plan.get("total_cost", 0) * 1.5:.2f}"></label>'
            "<button>Launch (spends money)</button></form>"
        )
    return "".join(out)


def query_string(query: dict[str, str]) -> str:
    """The query's non-empty parameters, URL-encoded."""
    return urlencode({k: v for k, v in query.items() if v})
