"""SVG charts drawn on the server (no chart library): loss curves, a job time line with its events,
horizontal bars for reports and the spend meters of the budget windows.

Each function returns one `<svg>` element as text, with `data-*` attributes that say what it shows
(the domain, the number of points, an event's kind), so a page and its tests can read a chart back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from html import escape

PALETTE = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#2c7a7b", "#975a16", "#4a5568")


def _num(x: float) -> str:
    """A coordinate: short, stable text (two decimals)."""
    return f"{x:.2f}".rstrip("0").rstrip(".") if x == x else "0"


def _label(x: float) -> str:
    """An axis value: 3 significant figures."""
    return f"{x:.3g}"


def loss_curve(domain: str, records: Sequence[dict], width: int = 360, height: int = 170) -> str:
    """One domain's training loss per step as a line; the held-out loss before and after training as
    dots. `records` are the metrics file's records ({"kind": "train"|"heldout", "step", "loss", ...})."""
    train = [
        (float(r["step"]), float(r["loss"]))
        for r in records
        if r.get("kind", "train") == "train" and isinstance(r.get("loss"), int | float)
    ]
    held = [
        (float(r["step"]), float(r["loss"]), str(r.get("when", "")))
        for r in records
        if r.get("kind") == "heldout" and isinstance(r.get("loss"), int | float)
    ]
    if not train and not held:
        return f'<p class="muted" data-domain="{escape(domain)}">no steps recorded yet</p>'
    xs = [x for x, _ in train] + [x for x, _, _ in held]
    ys = [y for _, y in train] + [y for _, y, _ in held]
    left, right, top, bottom = 44, 10, 10, 24
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    w, h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def py(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * h

    parts = [
        f'<svg class="chart loss-curve" data-domain="{escape(domain)}" data-points="{len(train)}"'
        f' viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img"'
        f' aria-label="{escape(domain)}: training loss per step">',
        f'<line class="axis" x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + h}"/>',
        f'<text class="tick" x="{left - 4}" y="{top + 8}" text-anchor="end">{_label(y1)}</text>',
        f'<text class="tick" x="{left - 4}" y="{top + h}" text-anchor="end">{_label(y0)}</text>',
        f'<text class="tick" x="{left}" y="{height - 6}">{_label(x0)}</text>',
        f'<text class="tick" x="{left + w}" y="{height - 6}" text-anchor="end">step {_label(x1)}</text>',
    ]
    if train:
        d = " ".join(f"{'M' if i == 0 else 'L'}{_num(px(x))},{_num(py(y))}" for i, (x, y) in enumerate(train))
        parts.append(f'<path class="series" d="{d}" stroke="{PALETTE[0]}"/>')
    for x, y, when in held:
        parts.append(
            f'<circle class="heldout" data-when="{escape(when)}" cx="{_num(px(x))}" cy="{_num(py(y))}"'
            ' r="3.5">'
            f"<title>held-out loss {escape(when)}: {y:.4f}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _parse(t: str | datetime | None) -> datetime | None:
    if t is None or isinstance(t, datetime):
        return t
    try:
        return datetime.fromisoformat(t)
    except ValueError:
        return None


def timeline(
    lanes: Sequence[tuple[str, datetime | None, datetime | None]],
    events: Sequence[dict],
    now: datetime,
    width: int = 760,
) -> str:
    """Jobs as bars from their first launch to their end (or `now`), and the run's events (preempted,
    recovered, cancelled, ...) as marks on their job's lane; a preemption is a red triangle.
    `lanes`: (job, start, end); `events`: {kind, at, job, text}."""
    times = [t for _, s, e in lanes for t in (s, e) if t] + [t for e in events if (t := _parse(e.get("at")))]
    if not times:
        return '<p class="muted">nothing has run yet</p>'
    running = any(s is not None and e is None for _, s, e in lanes)  # a bar that still grows: up to now
    t0, t1 = min(times), max([*times, now] if running else times)
    span = max((t1 - t0).total_seconds(), 1.0)
    names = [name for name, _, _ in lanes]
    names += sorted({str(e.get("job") or "run") for e in events} - set(names))
    left, right, lane_h, top = 90, 16, 26, 8
    height = top + lane_h * len(names) + 24
    w = width - left - right

    def px(t: datetime) -> float:
        return left + (t - t0).total_seconds() / span * w

    parts = [
        f'<svg class="chart timeline" viewBox="0 0 {width} {height}" width="{width}" height="{height}"'
        f' role="img" aria-label="jobs and events over time">'
    ]
    for i, name in enumerate(names):
        y = top + i * lane_h
        parts.append(
            f'<text class="lane" x="{left - 6}" y="{y + 16}" text-anchor="end">{escape(name)}</text>'
        )
    for name, start, end in lanes:
        if start is None:
            continue
        y = top + names.index(name) * lane_h
        x = px(start)
        parts.append(
            f'<rect class="span" data-job="{escape(name)}" x="{_num(x)}" y="{y + 6}"'
            f' width="{_num(max(px(end or now) - x, 2))}" height="14"/>'
        )
    for e in events:
        at = _parse(e.get("at"))
        if at is None:
            continue
        kind, job = str(e.get("kind", "")), str(e.get("job") or "run")
        x, y = px(at), top + names.index(job) * lane_h
        tip = f"{kind} at {at:%H:%M:%S}" + (f": {e['text']}" if e.get("text") else "")
        attrs = f'class="event ev-{escape(kind)}" data-kind="{escape(kind)}" data-job="{escape(job)}"'
        if kind == "preempted":
            pts = f"{_num(x - 6)},{_num(y + 1)} {_num(x + 6)},{_num(y + 1)} {_num(x)},{_num(y + 13)}"
            parts.append(f'<polygon {attrs} points="{pts}"><title>{escape(tip)}</title></polygon>')
        else:
            parts.append(
                f'<circle {attrs} cx="{_num(x)}" cy="{y + 13}" r="4"><title>{escape(tip)}</title></circle>'
            )
    axis_y = top + lane_h * len(names) + 4
    parts += [
        f'<line class="axis" x1="{left}" y1="{axis_y}" x2="{left + w}" y2="{axis_y}"/>',
        f'<text class="tick" x="{left}" y="{axis_y + 16}">{t0:%H:%M:%S}</text>',
        f'<text class="tick" x="{left + w}" y="{axis_y + 16}" text-anchor="end">{t1:%H:%M:%S}</text>',
        "</svg>",
    ]
    return "".join(parts)


def bars(
    rows: Sequence[tuple[str, float]], fmt: Callable[[float], str], width: int = 640, kind: str = "cost"
) -> str:
    """Horizontal bars, one per (label, value), longest = largest value."""
    if not rows:
        return '<p class="muted">nothing in this period</p>'
    left, right, bar_h = 130, 90, 22
    height = bar_h * len(rows) + 6
    top = max(max(v for _, v in rows), 1e-12)
    w = width - left - right
    parts = [
        f'<svg class="chart bars" data-kind="{escape(kind)}" viewBox="0 0 {width} {height}" width="{width}"'
        f' height="{height}" role="img" aria-label="{escape(kind)} per row">'
    ]
    for i, (label, value) in enumerate(rows):
        y = 3 + i * bar_h
        bw = max(value, 0) / top * w
        parts.append(
            f'<text class="lane" x="{left - 6}" y="{y + 15}" text-anchor="end">{escape(label[:20])}</text>'
            f'<rect class="bar" data-label="{escape(label)}" x="{left}" y="{y + 3}" width="{_num(bw)}"'
            f' height="{bar_h - 6}" fill="{PALETTE[i % len(PALETTE)]}"/>'
            f'<text class="value" x="{_num(left + bw + 5)}" y="{y + 15}">{escape(fmt(value))}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def meter(window: str, cap: float | None, spent: float, reserved: float, width: int = 360) -> str:
    """A budget window: spent (solid) and reserved (hatched) against its cap (the bar's full width)."""
    h = 18
    full = cap if cap and cap > 0 else max(spent + reserved, 1e-12)
    s = min(spent / full, 1.0) * width
    s = max(s, 2.0) if spent > 0 else s  # a cent against $100 still shows
    r = min(reserved / full, 1.0 - s / width) * width
    over = " over" if cap is not None and spent + reserved > cap else ""
    return (
        f'<svg class="chart meter{over}" data-window="{escape(window)}" viewBox="0 0 {width} {h}"'
        f' width="{width}" height="{h}" role="img" aria-label="{escape(window)} spend against its cap">'
        f'<rect class="cap" x="0" y="0" width="{width}" height="{h}"/>'
        f'<rect class="spent" x="0" y="0" width="{_num(s)}" height="{h}"/>'
        f'<rect class="reserved" x="{_num(s)}" y="0" width="{_num(r)}" height="{h}"/>'
        "</svg>"
    )
