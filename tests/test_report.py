"""Cost reports: totals and per-key sums agree with the ledger on random ledgers (preemptions too, by
domain); JSON, CSV and the PNG chart carry the same numbers, CSV under the `--by` dimension's name;
money ticks tell small amounts apart; a piped table prints whole names; `meetara report` /
`meetara budget` fail in one line on bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import tempfile
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from budgets import usd
from budgets.caps import BudgetConfig
from budgets.cli import budget_command, report_command
from budgets.ledger import Ledger
from budgets.report import BY, chart, money_ticks, plot, report, to_csv, to_json
from tests.conftest import run_cli

T0 = datetime(2025, 5, 28, 18, 0, tzinfo=UTC)
PROVIDERS, DOMAINS, RUNS = (
    ("lambda", "runpod", "vast"),
    ("legal", "finance", "health", "math"),
    ("r1", "r2", "r3"),
)
NO_CAPS = {"daily": None, "weekly": None, "monthly": None}
CSV_VALUES = ["cost", "gpu_hours", "domains_done", "dollars_per_domain", "preemptions", "over_plan"]
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None

job = st.fixed_dictionaries(
    {
        "provider": st.sampled_from(PROVIDERS),
        "run": st.sampled_from(RUNS),
        "domains": st.lists(st.sampled_from(DOMAINS), max_size=3),
        "gpus": st.integers(1, 4),
        "hour": st.integers(0, 24 * 12),  # spread over 12 days: crosses days, a week and a month
        "amount": st.floats(0, 20, allow_nan=False),
        "accruals": st.lists(st.tuples(st.integers(1, 600), st.floats(-1, 5, allow_nan=False)), max_size=3),
        "live_minutes": st.none() | st.integers(1, 300),  # accrue_until from start
        "end": st.sampled_from(["open", "settle", "billed", "stopped", "release"]),
        "billed": st.floats(0, 10, allow_nan=False),
        "events": st.lists(st.tuples(st.sampled_from(["preempted", "recovered"]), st.booleans()), max_size=3),
    }
)


def build(ledger: Ledger, jobs: list[dict]) -> None:
    for i, j in enumerate(jobs):
        at = T0 + timedelta(hours=j["hour"])
        common = {"provider": j["provider"], "gpu": "A100", "rate_per_hour": 1.7, "rate_source": "live"}
        rid = ledger.reserve(
            j["run"], f"job{i}", j["amount"], domains=j["domains"], gpu_count=j["gpus"], now=at, **common
        )
        ledger.start(rid, at)
        for minutes, amount in j["accruals"]:
            ledger.accrue(rid, amount, seconds=minutes * 60, now=at + timedelta(minutes=minutes))
        if j["live_minutes"]:
            ledger.accrue_until(rid, at + timedelta(minutes=j["live_minutes"]))
        for k, (kind, named) in enumerate(j["events"]):
            ledger.record_event(
                j["run"],
                kind,
                job=f"job{i}",
                reservation_id=rid if named else None,
                now=at + timedelta(minutes=k),
            )
        end = at + timedelta(hours=6)
        if j["end"] == "settle":
            ledger.settle(rid, ended_at=end, note="done")
        elif j["end"] == "billed":
            ledger.settle(rid, j["billed"], ended_at=end)
        elif j["end"] == "stopped":
            ledger.settle(rid, ended_at=end, note="stopped: budget")
        elif j["end"] == "release":
            ledger.release(rid, now=end)


def expected(ledger: Ledger, by: str, since=None, until=None) -> tuple[dict, dict]:
    """Per-key cost and GPU-hours computed independently of budgets.report, from ledger.entries()."""
    zone = ledger.config.zone
    cost: dict[str, float] = defaultdict(float)
    hours: dict[str, float] = defaultdict(float)
    for e in ledger.entries(since, until):
        if by == "domain":
            names = sorted(set(e.domains)) or ["(no domain)"]
            keys = {d: 1 / len(names) for d in names}
        else:
            key = {"provider": e.provider, "run": e.run_id, "day": str(e.at.astimezone(zone).date())}[by]
            keys = {key: 1.0}
        for key, share in keys.items():
            cost[key] += e.amount * share
            hours[key] += (e.seconds or 0) / 3600 * e.gpu_count * share
    return cost, hours


def preemptions(jobs: list[dict], by: str, since, until, zone) -> dict[str, float]:
    """Preemptions per key, from what `build` recorded (its events are k minutes after their job); by
    domain, each is shared evenly by its job's domains."""
    out: dict[str, float] = defaultdict(float)
    for j in jobs:
        for k, (kind, _) in enumerate(j["events"]):
            at = T0 + timedelta(hours=j["hour"], minutes=k)
            if kind != "preempted" or (since and at < since) or (until and at >= until):
                continue
            if by == "domain":
                names = set(j["domains"]) or {"(no domain)"}
                for d in names:
                    out[d] += 1 / len(names)
            else:
                out[
                    {"provider": j["provider"], "run": j["run"], "day": str(at.astimezone(zone).date())}[by]
                ] += 1
    return dict(out)


def raw(path: Path, sql: str, params=()) -> float:
    """Straight from the SQLite file, bypassing budgets entirely."""
    with sqlite3.connect(path) as con:
        value = con.execute(sql, params).fetchone()[0]
    con.close()
    return value or 0


@settings(
    max_examples=40, deadline=None, report_multiple_bugs=False, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    jobs=st.lists(job, max_size=8),
    zone=st.sampled_from(["UTC", "America/New_York", "Asia/Kolkata"]),
    window=st.none() | st.tuples(st.integers(0, 24 * 12), st.integers(1, 24 * 6)),
)
def test_reports_add_up(jobs, zone, window):
    # a fresh ledger per example, on tmpfs where there is one: each commit's fsync on a busy disk costs
    # tens of milliseconds, and this property is about sums, not durability
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        path = Path(tmp) / "ledger.sqlite"
        with Ledger(path, config=BudgetConfig(**NO_CAPS, timezone=zone)) as ledger:
            build(ledger, jobs)
            since = until = None
            if window:
                since = T0 + timedelta(hours=window[0])
                until = since + timedelta(hours=window[1])
            bounds = (since or T0 - timedelta(days=1), until or T0 + timedelta(days=60))
            in_range = "WHERE at >= ? AND at < ?"
            spent = raw(path, f"SELECT SUM(amount) FROM accruals {in_range}", [b.timestamp() for b in bounds])
            preempted = raw(
                path,
                f"SELECT COUNT(*) FROM events {in_range} AND kind = 'preempted'",
                [b.timestamp() for b in bounds],
            )
            for by in BY:
                rows = report(ledger, by, since, until)
                assert sum(r.cost for r in rows) == pytest.approx(spent, abs=1e-9)
                cost, hours = expected(ledger, by, since, until)
                got = {r.key: r for r in rows}
                assert {k for k in got if got[k].cost or got[k].gpu_hours} <= set(cost)
                for key in cost:
                    assert got[key].cost == pytest.approx(cost[key], abs=1e-9)
                    assert got[key].gpu_hours == pytest.approx(hours[key], abs=1e-9)
                assert {k: r.preemptions for k, r in got.items() if r.preemptions} == pytest.approx(
                    preemptions(jobs, by, since, until, ledger.config.zone)
                )
                # each preemption counted once, by domain as much as by provider, day or run
                assert sum(r.preemptions for r in rows) == pytest.approx(preempted, abs=1e-9)
                for r in rows:
                    if r.domains_done:
                        assert r.dollars_per_domain == pytest.approx(r.cost / r.domains_done)
                    else:
                        assert r.dollars_per_domain is None
                doc = json.loads(to_json(rows, by=by, since=since, until=until))
                text = to_csv(rows, by=by)
                assert text.splitlines()[0].split(",") == [by, *CSV_VALUES]  # the key column named for by
                from_csv = [
                    {k: (None if v == "" else (v if k == by else float(v))) for k, v in row.items()}
                    for row in csv.DictReader(io.StringIO(text))
                ]
                # the same numbers, in the same order; JSON names the key both ways
                assert [{k: v for k, v in d.items() if k != "key"} for d in doc["rows"]] == from_csv
                assert (
                    [d["key"] for d in doc["rows"]] == [d[by] for d in doc["rows"]] == [r.key for r in rows]
                )
            total = report(ledger, "total", since, until)
            assert sum(r.cost for r in total) == pytest.approx(spent, abs=1e-9)
            assert sum(r.preemptions for r in total) == preempted


def test_domains_done_and_preemptions_by_key(tmp_path):
    with Ledger(tmp_path / "l.sqlite", config=BudgetConfig(**NO_CAPS)) as ledger:
        job = {"gpu": "A100", "rate_per_hour": 2.0, "rate_source": "live"}
        a = ledger.reserve("r1", "j1", 5, provider="vast", domains=["legal", "math"], now=T0, **job)
        b = ledger.reserve("r1", "j2", 5, provider="runpod", domains=["health"], now=T0, **job)
        c = ledger.reserve("r2", "j1", 5, provider="vast", domains=["legal", "finance"], now=T0, **job)
        for rid in (a, b, c):
            ledger.start(rid, T0)
            ledger.accrue_until(rid, T0 + timedelta(hours=1))
        ledger.record_event("r1", "preempted", job="j1", now=T0 + timedelta(minutes=5))  # found via run + job
        ledger.settle(a, note="done", now=T0 + timedelta(hours=2))
        ledger.settle(b, note="stopped: budget", now=T0 + timedelta(hours=2))
        ledger.settle(c, 3.0, now=T0 + timedelta(hours=2))
        by_provider = {r.key: r for r in report(ledger, "provider")}
        assert by_provider["vast"].cost == pytest.approx(5.0) and by_provider["vast"].domains_done == 3
        assert by_provider["vast"].dollars_per_domain == pytest.approx(5 / 3)
        assert by_provider["vast"].preemptions == 1 and by_provider["runpod"].preemptions == 0
        assert by_provider["runpod"].domains_done == 0 and by_provider["vast"].gpu_hours == pytest.approx(2)
        by_domain = {r.key: r for r in report(ledger, "domain")}
        assert by_domain["legal"].cost == pytest.approx(1.0 + 1.5)  # half of each job that trained it
        assert by_domain["health"].domains_done == 0  # its job was stopped
        # the one preemption of r1/j1 (legal, math) is shared by its two domains: counted once in all
        assert (by_domain["legal"].preemptions, by_domain["math"].preemptions) == (0.5, 0.5)
        assert sum(r.preemptions for r in by_domain.values()) == 1 == report(ledger, "total")[0].preemptions
        assert [r.key for r in report(ledger, "day")] == ["2025-05-28"]
        assert [r.key for r in report(ledger, "run")] == ["r1", "r2"]  # by cost, highest first
        with pytest.raises(ValueError, match="by must be one of"):
            report(ledger, "gpu")


def test_plot_writes_a_readable_png(tmp_path):
    import matplotlib.image

    with Ledger(tmp_path / "l.sqlite", config=BudgetConfig(**NO_CAPS)) as ledger:
        for i, (provider, cost) in enumerate(
            [("vast", 12.4), ("runpod", 7.15), ("lambda", 21.9), ("local", 0.04)]
        ):
            rid = ledger.reserve(
                "r", f"j{i}", cost, provider=provider, gpu="A100", rate_per_hour=1, rate_source="live"
            )
            ledger.accrue(rid, cost, seconds=3600 * cost, now=T0)
        rows = report(ledger, "provider")
    path = plot(rows, tmp_path / "cost.png", by="provider", since=T0, until=T0 + timedelta(days=7))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 15_000
    image = matplotlib.image.imread(path)
    assert image.shape[1] == 9 * 110 and abs(image.shape[0] - max(2.8, 0.42 * 4 + 1.6) * 110) <= 1
    many = [type(rows[0])(f"domain-{i:02d}", cost=i / 3) for i in range(70)]
    image = matplotlib.image.imread(plot(many, tmp_path / "many.png", by="domain"))
    assert abs(image.shape[0] - (0.42 * 40 + 1.6) * 110) <= 1  # 40 bars: the cheapest merged into one


@pytest.mark.parametrize(
    ("ticks", "labels"),
    [
        ([0, 0.0005, 0.001, 0.0015], ["$0.0000", "$0.0005", "$0.0010", "$0.0015"]),
        ([0, 5, 10, 15], ["$0", "$5", "$10", "$15"]),
        ([0, 2.5, 5], ["$0.00", "$2.50", "$5.00"]),
        ([0.1, 0.2, 0.30000000000000004], ["$0.10", "$0.20", "$0.30"]),  # float noise of the locator
        ([-0.5, -1e-17, 0.5], ["-$0.50", "$0.00", "$0.50"]),  # no "-$0.00"
        ([0, 1000, 2000], ["$0", "$1,000", "$2,000"]),
        ([0, 2e-6, 4e-6], ["$0.000000", "$0.000002", "$0.000004"]),
        ([], []),
    ],
)
def test_money_ticks_carry_the_decimals_their_spacing_needs(ticks, labels):
    assert money_ticks(ticks) == labels


def test_chart_of_small_costs_has_distinct_money_ticks(tmp_path):
    with Ledger(tmp_path / "l.sqlite", config=BudgetConfig(**NO_CAPS)) as ledger:
        for i, (domains, cost) in enumerate(
            [(["legal", "finance", "health", "math"], 0.013), (["legal"], 0.0021), (["art"], 0.0004)]
        ):
            rid = ledger.reserve(
                "r",
                f"j{i}",
                1,
                provider="local",
                domains=domains,
                gpu="cpu",
                rate_per_hour=1,
                rate_source="live",
            )
            ledger.accrue(rid, cost, seconds=60, now=T0)
        rows = report(ledger, "domain")
    assert max(r.cost for r in rows) < 0.01  # every bar under a cent: the case that read "$0 $0 $0 $0.01"
    fig = chart(rows, by="domain")
    fig.draw_without_rendering()  # lays the ticks out as savefig would
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    locs = list(ax.get_xticks())
    assert len(labels) == len(locs) >= 3 and len(set(labels)) == len(labels), labels
    for label, loc in zip(labels, locs, strict=True):  # each tick reads as its own value
        assert float(label.replace("$", "").replace(",", "")) == pytest.approx(loc, abs=1e-12), labels
    # and each bar is labelled with its cost as the table shows it
    assert sorted(t.get_text() for t in ax.texts) == sorted(usd(r.cost) for r in rows)
    assert {"$0.00535", "$0.00325", "$0.0004"} <= {t.get_text() for t in ax.texts}


def test_report_by_domain_piped_prints_whole_names_and_counts_each_preemption_once(tmp_path):
    from train.domains import load_registry

    names = sorted(load_registry().names, key=len, reverse=True)[:4]  # the registry's longest names
    assert len(names[0]) >= 20
    ledger_path = tmp_path / "ledger.sqlite"
    with Ledger(ledger_path, config=BudgetConfig(**NO_CAPS)) as ledger:
        job = {"gpu": "A100", "rate_per_hour": 1.2, "rate_source": "live"}
        a = ledger.reserve("r1", "j1", 5, provider="vast", domains=names, now=T0, **job)
        b = ledger.reserve("r2", "j1", 5, provider="runpod", domains=names[:1], now=T0, **job)
        for rid in (a, b):
            ledger.start(rid, T0)
            ledger.accrue_until(rid, T0 + timedelta(hours=1))
        for k in range(3):  # the run of 4 domains is preempted 3 times (one event names its reservation)
            at = T0 + timedelta(minutes=10 + k)
            ledger.record_event("r1", "preempted", job="j1", reservation_id=a if k == 0 else None, now=at)
        ledger.record_event("r2", "preempted", job="j1", now=T0 + timedelta(minutes=20))
    config = tmp_path / "meetara.yaml"
    config.write_text(f"budgets:\n  daily: none\n  ledger_url: {ledger_path}\n")

    def meetara(*args: str):
        # piped, as `meetara report | less` or a script sees it; COLUMNS=80: rich's width off a terminal
        out = run_cli("report", *args, "--config", str(config), module="launcher", env={"COLUMNS": "80"})
        assert out.returncode == 0, out.stderr
        return out.stdout

    table = meetara("--by", "domain")
    cells = [
        [c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines() if line.startswith("│")
    ]
    assert "…" not in table, table
    assert [c[0] for c in cells] == [names[0], *sorted(names[1:]), "total"], table  # by cost, then name
    shown = {c[0]: c[5] for c in cells}
    assert shown == {names[0]: "1.75", **{n: "0.75" for n in names[1:]}, "total": "4"}, table

    header, *rows = csv.reader(io.StringIO(meetara("--by", "domain", "--csv", "-")))
    assert header == ["domain", *CSV_VALUES]
    n = header.index("preemptions")
    by_domain = {row[0]: float(row[n]) for row in rows}
    assert by_domain == {names[0]: 1.75, **{n: 0.75 for n in names[1:]}}
    for by in ("provider", "run"):  # the same 4 preemptions, however the report is cut
        header, *rows = csv.reader(io.StringIO(meetara("--by", by, "--csv", "-")))
        assert header[0] == by and sum(float(row[n]) for row in rows) == sum(by_domain.values()) == 4
    doc = json.loads(meetara("--by", "domain", "--json"))
    assert sum(d["preemptions"] for d in doc["rows"]) == doc["total"]["preemptions"] == 4


# -- the commands ------------------------------------------------------------------------------------------


def app() -> typer.Typer:
    """The commands as launcher/cli.py registers them."""
    a = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    a.command("report")(report_command)
    a.command("budget")(budget_command)
    return a


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click 8.1; click 8.2 always keeps stderr apart
    except TypeError:
        return CliRunner()


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "meetara.yaml"
    path.write_text(f"budgets:\n  daily: 5\n  ledger_url: {tmp_path / 'ledger.sqlite'}\n")
    with Ledger(tmp_path / "ledger.sqlite", config=BudgetConfig(daily=5)) as ledger:
        rid = ledger.reserve(
            "r1",
            "j1",
            2.0,
            provider="vast",
            gpu="A100",
            domains=["legal"],
            rate_per_hour=1,
            rate_source="live",
        )
        ledger.accrue(rid, 0.5, seconds=1800)
    return path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["report", "--by", "gpu"], "--by: 'gpu' is not one of provider, domain, day, run"),
        (["report", "--since", "last tuesday"], "--since: cannot read 'last tuesday'"),
        (["report", "--since", "2025-02-01", "--until", "2025-01-01"], "is not before --until"),
        (["budget"], "invalid daily"),
        (["report"], "not a meetara ledger"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, config, args, expected):
    if args == ["budget"]:
        config.write_text("budgets:\n  daily: -1\n")
    if args == ["report"]:
        (tmp_path / "ledger.sqlite").write_bytes(b"not a database" * 100)
        for extra in tmp_path.glob("ledger.sqlite-*"):
            extra.unlink()
    result = runner().invoke(app(), [*args, "--config", str(config)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr


def test_commands_print_tables_json_csv_and_a_chart(tmp_path, config):
    r = runner()
    out = r.invoke(app(), ["budget", "--config", str(config), "--json"])
    assert out.exit_code == 0, out.stderr
    doc = json.loads(out.stdout)
    daily = doc["windows"][0]
    assert (daily["window"], daily["cap"], daily["spent"], daily["reserved"], daily["remaining"]) == (
        "daily",
        5.0,
        0.5,
        1.5,
        3.0,
    )
    out = r.invoke(app(), ["budget", "--config", str(config)])
    assert out.exit_code == 0 and "daily" in out.stdout and "$3.00" in out.stdout
    png, table = tmp_path / "c.png", tmp_path / "c.csv"
    out = r.invoke(
        app(),
        [
            "report",
            "--by",
            "domain",
            "--json",
            "--csv",
            str(table),
            "--plot",
            str(png),
            "--since",
            "2000-01-01",
            "--config",
            str(config),
        ],
    )
    assert out.exit_code == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["rows"][0]["key"] == "legal" and doc["rows"][0]["cost"] == 0.5 and doc["total"]["cost"] == 0.5
    assert doc["rows"][0]["domain"] == "legal"
    assert png.read_bytes()[:4] == b"\x89PNG" and "legal,0.5," in table.read_text()
    assert table.read_text().startswith("domain,cost,gpu_hours,")
    out = r.invoke(app(), ["report", "--by", "run", "--config", str(config)])
    assert out.exit_code == 0 and "r1" in out.stdout and "$0.50" in out.stdout


def test_dates_on_the_command_line_are_in_the_budget_time_zone():
    from zoneinfo import ZoneInfo

    from budgets.cli import parse_when

    ny = ZoneInfo("America/New_York")
    assert parse_when("2025-03-01", ny).isoformat() == "2025-03-01T00:00:00-05:00"
    assert parse_when("2025-03-01", ny, end=True).isoformat() == "2025-03-02T00:00:00-05:00"  # day included
    assert parse_when("2025-03-01T08:30", ny).isoformat() == "2025-03-01T08:30:00-05:00"
    assert parse_when("2025-03-01T08:30+00:00", ny).isoformat() == "2025-03-01T08:30:00+00:00"
    today = parse_when("today", ny)
    assert (today.hour, today.minute) == (0, 0) and parse_when("yesterday", ny, end=True) == today
    assert abs((datetime.now(UTC) - parse_when("3d", ny)).total_seconds() - 3 * 86400) < 60
