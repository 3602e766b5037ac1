"""The budget ledger: caps per calendar window and per launch, reservations that are atomic across
processes (SQLite file and a real PostgreSQL server), accruals, settlements, and bad input."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pg import postgres_url  # noqa: F401

from budgets import BudgetExceeded, LedgerError
from budgets.caps import BudgetConfig, load_budget_config
from budgets.ledger import Ledger
from train import BadInput

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)  # a Monday, early in a month
JOB = {"provider": "vast", "gpu": "A100", "domains": ["legal"], "rate_per_hour": 1.0, "rate_source": "live"}


def caps(daily=None, weekly=None, monthly=None, timezone="UTC") -> BudgetConfig:
    return BudgetConfig(daily=daily, weekly=weekly, monthly=monthly, timezone=timezone)


def spend(ledger: Ledger, amount: float, at: datetime, run: str = "r") -> int:
    """A job that cost `amount`, settled at `at`."""
    rid = ledger.reserve(run, "j", amount, now=at, **JOB)
    ledger.settle(rid, amount, ended_at=at, now=at)
    return rid


def pg_database(server: str, name: str) -> str:
    """A fresh database on the test server (each test gets empty tables); returns its URL."""
    import psycopg

    with psycopg.connect(server, autocommit=True) as con:
        con.execute(f"DROP DATABASE IF EXISTS {name}")
        con.execute(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite")
    name = "t_" + re.sub(r"\W", "_", request.node.name).lower()[-50:]
    return pg_database(request.getfixturevalue("postgres_url"), name)


# -- the race -------------------------------------------------------------------------------------------

WORKER = r"""
import json, random, sys
from datetime import datetime
from budgets import BudgetExceeded
from budgets.caps import BudgetConfig
from budgets.ledger import Ledger

url, seed, rounds, mode, now = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
now = datetime.fromisoformat(now)
ledger = Ledger(url, config=BudgetConfig(daily=10.0, weekly=None, monthly=None))
rng = random.Random(seed)
print("ready", flush=True)
sys.stdin.readline()  # the start line: the parent releases every worker at once
accepted, settled, refused = [], [], 0
for i in range(rounds):
    amount = round(rng.uniform(0.02, 0.4), 2)
    try:
        rid = ledger.reserve(f"run-{seed}", f"job-{i}", amount, provider="vast", gpu="A100",
                             domains=["d"], rate_per_hour=1.0, rate_source="live", now=now)
    except BudgetExceeded:
        refused += 1
        continue
    accepted.append([rid, amount])
    if mode == "mixed" and rng.random() < 0.3:  # finished cheaper than reserved: the rest is released
        actual = round(amount * rng.random(), 4)
        ledger.settle(rid, actual, now=now)
        settled.append([rid, actual])
print(json.dumps({"accepted": accepted, "settled": settled, "refused": refused}))
"""


def race(url: str, mode: str, workers: int = 16, rounds: int = 50) -> list[dict]:
    """`workers` processes, each `rounds` reserve attempts against one ledger, all started at once."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(seed), str(rounds), mode, T0.isoformat()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for seed in range(workers)
    ]
    try:
        for p in procs:  # each has imported and opened the ledger (creating it: that races too)
            line = p.stdout.readline()
            assert line.strip() == "ready", p.stderr.read()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, errs = p.communicate(timeout=120)
            assert p.returncode == 0, errs
            results.append(json.loads(out))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def check_race(ledger_url: str, results: list[dict], mode: str) -> None:
    accepted = [tuple(a) for r in results for a in r["accepted"]]
    ids = [rid for rid, _ in accepted]
    assert len(ids) == len(set(ids)), "a reservation id was handed out twice"
    with Ledger(ledger_url, config=caps(daily=10.0)) as ledger:
        rows = {r.id: r for r in ledger.reservations()}
        assert set(rows) == set(ids), "the ledger and the workers disagree on which reservations exist"
        for rid, amount in accepted:
            assert rows[rid].amount == amount
        settled = {rid: actual for r in results for rid, actual in r["settled"]}
        for rid, actual in settled.items():
            assert rows[rid].state == "settled" and rows[rid].accrued == pytest.approx(actual)
        held = sum(r.accrued + r.outstanding for r in rows.values())
        assert held <= 10.0 + 1e-9, f"the cap was passed: ${held:.4f} spent + reserved"
        assert sum(r["refused"] for r in results) > 0
        assert ledger.outstanding() + ledger.spent("daily", now=T0) == pytest.approx(held)
    if mode == "reserve":
        # if reserve were not atomic, racing workers would each see room and overfill the cap; with it,
        # the cap is nearly full: what is left is less than the last refused ask (at most 0.40)
        assert 10.0 - 0.4 < sum(a for _, a in accepted) <= 10.0 + 1e-9
    else:  # settles gave back what jobs did not spend, and later reservations used it
        assert sum(a for _, a in accepted) > 10.0


@pytest.mark.parametrize("mode", ["reserve", "mixed"])
def test_race_sqlite(tmp_path, mode):
    url = str(tmp_path / "ledger.sqlite")
    check_race(url, race(url, mode), mode)


@pytest.mark.parametrize("mode", ["reserve", "mixed"])
def test_race_postgresql(postgres_url, mode):  # noqa: F811
    url = pg_database(postgres_url, f"race_{mode}")
    check_race(url, race(url, mode), mode)


# -- caps -----------------------------------------------------------------------------------------------


def test_each_window_refuses_at_its_cap_and_resets_at_its_boundary(url):
    with Ledger(url, config=caps(daily=5, weekly=8, monthly=10)) as ledger:
        spend(ledger, 5.0, T0)  # Monday June 2: the day is full
        with pytest.raises(BudgetExceeded, match=r"^daily cap \$5\.00 would be passed: spent \$5\.00"):
            ledger.reserve("r", "j", 0.01, now=T0.replace(hour=23, minute=59, second=59), **JOB)
        tuesday = T0.replace(day=3, hour=0)
        spend(ledger, 3.0, tuesday)  # a new day; the week now holds 8
        with pytest.raises(BudgetExceeded, match=r"^weekly cap \$8\.00 would be passed: spent \$8\.00"):
            ledger.reserve("r", "j", 0.01, now=tuesday + timedelta(days=1), **JOB)
        next_monday = T0 + timedelta(days=7)
        spend(ledger, 2.0, next_monday)  # a new week; the month now holds 10
        with pytest.raises(BudgetExceeded, match=r"^monthly cap \$10\.00 would be passed: spent \$10\.00"):
            ledger.reserve("r", "j", 0.01, now=next_monday + timedelta(days=1), **JOB)
        july = datetime(2025, 7, 1, tzinfo=UTC)
        ledger.reserve("r", "j", 5.0, now=july, **JOB)  # a new month: exactly the daily cap fits
        status = {w.name: w for w in ledger.window_status(july)}
        assert status["daily"].remaining == pytest.approx(0) and status["monthly"].spent == 0
        assert status["weekly"].start == datetime(2025, 6, 30, tzinfo=UTC)  # ISO week: from Monday


def test_windows_follow_the_configured_time_zone(tmp_path):
    late = datetime(2025, 6, 3, 3, 30, tzinfo=UTC)  # 23:30 on June 2 in New York (UTC-4)
    ny = Ledger(tmp_path / "ny.sqlite", config=caps(daily=5, timezone="America/New_York"))
    spend(ny, 5.0, late)
    with pytest.raises(BudgetExceeded, match="daily cap"):
        ny.reserve("r", "j", 1.0, now=late + timedelta(minutes=20), **JOB)  # 23:50 local: same day
    ny.reserve("r", "j", 1.0, now=late + timedelta(minutes=40), **JOB)  # 00:10 local: a new day
    day = ny.window_status(late + timedelta(minutes=40))[0]
    assert (day.start.isoformat(), day.end.isoformat()) == (
        "2025-06-03T00:00:00-04:00",
        "2025-06-04T00:00:00-04:00",
    )
    assert ny.spent("daily", now=late) == 5.0 and ny.spent("daily", now=late + timedelta(minutes=40)) == 0
    # in UTC the same two moments are one day: the second ask is refused
    utc = Ledger(tmp_path / "utc.sqlite", config=caps(daily=5))
    spend(utc, 5.0, late)
    with pytest.raises(BudgetExceeded, match="daily cap"):
        utc.reserve("r", "j", 1.0, now=late + timedelta(minutes=40), **JOB)


def test_dst_days_are_calendar_days(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite", config=caps(daily=5, timezone="Europe/Berlin"))
    day = ledger.window_status(datetime(2025, 3, 30, 12, tzinfo=UTC))[0]  # clocks go forward: 23 hours
    # (subtract as timestamps: Python subtracts datetimes of one zone as wall-clock times)
    assert day.end.timestamp() - day.start.timestamp() == 23 * 3600


def test_launch_cap_counts_the_runs_spent_and_reserved(url):
    with Ledger(url, config=caps(daily=100)) as ledger:
        first = ledger.reserve("a", "j1", 2.0, launch_cap=3.0, now=T0, **JOB)
        with pytest.raises(BudgetExceeded, match=r"^launch \(run a\) cap \$3\.00 would be passed"):
            ledger.reserve("a", "j2", 1.5, launch_cap=3.0, now=T0, **JOB)
        ledger.reserve("b", "j1", 1.5, launch_cap=3.0, now=T0, **JOB)  # another run has its own cap
        ledger.settle(first, 1.0, now=T0)
        ledger.reserve("a", "j2", 1.5, launch_cap=3.0, now=T0, **JOB)  # 1.0 spent + 1.5 <= 3
        with pytest.raises(BudgetExceeded, match="spent \\$1.00 \\+ reserved \\$1.50 \\+ asked \\$0.60"):
            ledger.reserve("a", "j3", 0.6, launch_cap=3.0, now=T0, **JOB)


def test_settle_releases_the_unspent_rest_and_is_idempotent(url):
    with Ledger(url, config=caps(daily=5)) as ledger:
        rid = ledger.reserve("r", "j", 4.0, now=T0, **JOB)
        ledger.accrue(rid, 0.75, seconds=2700, now=T0)
        assert ledger.outstanding() == pytest.approx(3.25)
        with pytest.raises(BudgetExceeded, match=r"reserved \$3\.25 \+ asked \$2\.00"):
            ledger.reserve("r", "j2", 2.0, now=T0, **JOB)
        done = ledger.settle(rid, 1.0, note="done", now=T0)  # billed 1.0: a 0.25 correction accrual
        assert (done.state, done.accrued, done.settled_amount, done.outstanding) == ("settled", 1.0, 1.0, 0)
        assert ledger.settle(rid, 3.0, note="again", now=T0) == done  # a second settle changes nothing
        assert [e.amount for e in ledger.entries()] == pytest.approx([0.75, 0.25])
        ledger.reserve("r", "j2", 3.5, now=T0, **JOB)  # the released 3.0 is usable again
        assert ledger.spent("daily", now=T0) == pytest.approx(1.0)
        # billed less than accrued: a negative correction
        other = ledger.reserve("r", "j3", 0.0, now=T0, **JOB)
        ledger.accrue(other, 0.5, now=T0)
        assert ledger.settle(other, 0.2, now=T0).accrued == pytest.approx(0.2)
        never_ran = ledger.reserve("s", "j", 0.3, now=T0, **JOB)  # 1.2 spent + 3.5 + 0.3 = the cap
        freed = ledger.release(never_ran, note="launch failed", now=T0)
        assert (freed.state, freed.outstanding, freed.settled_amount) == ("released", 0, 0)
        assert [r.id for r in ledger.open_reservations()] == [2]


def test_accrue_until_is_idempotent_and_skips_unbilled_gaps(url):
    with Ledger(url, config=caps()) as ledger:
        rid = ledger.reserve("r", "j", 10.0, **{**JOB, "rate_per_hour": 2.0}, gpu_count=2, now=T0)
        assert ledger.accrue_until(rid, T0 + timedelta(minutes=30)) == 0  # not started: nothing billed
        ledger.start(rid, T0)
        assert ledger.accrue_until(rid, T0 + timedelta(minutes=30)) == pytest.approx(1.0)
        assert ledger.accrue_until(rid, T0 + timedelta(minutes=30)) == 0
        assert ledger.accrue_until(rid, T0 + timedelta(minutes=10)) == 0
        assert ledger.accrue_until(rid, T0 + timedelta(minutes=45)) == pytest.approx(0.5)
        ledger.start(rid, T0 + timedelta(hours=2))  # relaunched after a preemption at :45
        assert ledger.accrue_until(rid, T0 + timedelta(hours=2, minutes=30)) == pytest.approx(1.0)
        assert ledger.reservation(rid).accrued == pytest.approx(2.5)
        # polls of one day extend one row (so a watchdog polling every few seconds does not bloat the
        # ledger), dated at the start of what it covers; the relaunch after a gap starts a new row
        assert [(e.at, e.seconds) for e in ledger.entries()] == [(T0, 2700), (T0 + timedelta(hours=2), 1800)]
        # a period across local midnight is cut there, so each day's window gets its own part
        assert ledger.accrue_until(rid, T0 + timedelta(hours=13)) == pytest.approx(21.0)
        assert [(e.at, e.amount) for e in ledger.entries()] == [
            (T0, pytest.approx(1.5)),
            (T0 + timedelta(hours=2), pytest.approx(1.0 + 19.0)),
            (T0.replace(day=3, hour=0), pytest.approx(2.0)),
        ]
        assert ledger.spent("daily", now=T0) == pytest.approx(21.5)
        ledger.settle(rid, now=T0 + timedelta(hours=3))
        assert ledger.accrue_until(rid, T0 + timedelta(hours=4)) == 0  # closed: nothing more


def test_a_cap_lowered_below_spent_refuses_and_shows_it(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger(path, config=caps(daily=5)) as ledger:
        spend(ledger, 4.0, T0)
    with Ledger(path, config=caps(daily=3)) as ledger:
        day = ledger.window_status(T0)[0]
        assert day.cap == 3 and day.spent == 4 and day.remaining == pytest.approx(-1)
        with pytest.raises(BudgetExceeded, match=r"daily cap \$3\.00 would be passed: spent \$4\.00"):
            ledger.reserve("r", "j", 0.0, now=T0, **JOB)


def test_events_and_read_helpers(url):
    with Ledger(url, config=caps()) as ledger:
        rid = ledger.reserve("r", "j", 1.0, now=T0, **{**JOB, "domains": ["a", "b"]})
        ledger.record_event("r", "preempted", job="j", reservation_id=rid, detail="spot reclaimed", now=T0)
        ledger.record_event("r", "recovered", job="j", now=T0 + timedelta(minutes=5))
        assert [e.kind for e in ledger.events()] == ["preempted", "recovered"]
        assert [e.detail for e in ledger.events(kind="preempted")] == ["spot reclaimed"]
        assert ledger.events(since=T0 + timedelta(minutes=1))[0].kind == "recovered"
        res = ledger.reservation(rid)
        assert res.domains == ("a", "b") and res.created_at == T0 and res.rate_source == "live"
        with pytest.raises(KeyError):
            ledger.reservation(rid + 100)
        with pytest.raises(ValueError, match="rate_source"):
            ledger.reserve("r", "j", 1.0, **{**JOB, "rate_source": "guess"})
        with pytest.raises(ValueError, match="amount"):
            ledger.reserve("r", "j", -1.0, **JOB)
        assert len(ledger.reservations()) == 1  # refused asks wrote nothing


# -- unreadable ledgers and bad configuration -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "foreign-sqlite", "newer-schema"])
def test_an_unreadable_ledger_is_one_line_and_left_untouched(tmp_path, kind):
    path = tmp_path / "ledger.sqlite"
    if kind == "random":
        path.write_bytes(os.urandom(8192))
    elif kind == "foreign-sqlite":
        with sqlite3.connect(path) as con:
            con.execute("CREATE TABLE notes (x TEXT)")
        con.close()
    else:
        Ledger(path).close()
        with sqlite3.connect(path) as con:
            con.execute("UPDATE schema_version SET version = 99")
        con.close()
    before = path.read_bytes()
    with pytest.raises(LedgerError) as e:
        Ledger(path)
    message = str(e.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert ("newer" if kind == "newer-schema" else "not a meetara ledger") in message
    assert path.read_bytes() == before
    if kind != "newer-schema":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.sqlite"]  # no journal, no WAL


def test_an_unreachable_postgres_is_one_line():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LedgerError) as e:
        Ledger(f"postgresql://u:secret@127.0.0.1:{port}/x", timeout=2)
    assert "cannot connect" in str(e.value) and "secret" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("budgets:\n  daily: -1\n", "invalid daily: Input should be greater than or equal to 0"),
        (
            "budgets:\n  timezone: Mars/Olympus\n",
            "invalid timezone: Value error, unknown time zone 'Mars/Olympus'",
        ),
        ("budgets:\n  daily: abc\n", "invalid daily: Input should be a valid number"),
        ("budgets:\n  dayly: 3\n", "invalid dayly: Extra inputs are not permitted"),
        ("budgets:\n  ledger_url: mysql://h/db\n", "invalid ledger_url"),
        ("budgets: [1, 2]\n", "`budgets` must be a mapping"),
        ("budgets: {daily: [\n", "not valid YAML"),
    ],
)
def test_bad_config_is_one_line(tmp_path, text, expected):
    path = tmp_path / "meetara.yaml"
    path.write_text(text)
    with pytest.raises(BadInput) as e:
        load_budget_config(path)
    assert str(e.value).startswith(str(path)) and expected in str(e.value) and "\n" not in str(e.value)


def test_config_layers_file_env_overrides(tmp_path, monkeypatch):
    path = tmp_path / "meetara.yaml"
    path.write_text(
        "preferences:\n  spot_policy: spot\nbudgets:\n  daily: 7\n  weekly: null\n  timezone: Asia/Tokyo\n"
    )
    config = load_budget_config(path)
    assert (config.daily, config.weekly, config.monthly, config.timezone) == (7, None, 50, "Asia/Tokyo")
    assert load_budget_config(tmp_path / "absent.yaml") == BudgetConfig()
    monkeypatch.setenv("MEETARA_DAILY_CAP", "9.5")
    monkeypatch.setenv("MEETARA_MONTHLY_CAP", "off")
    monkeypatch.setenv("MEETARA_LEDGER_URL", "sqlite:///tmp/x.sqlite")
    config = load_budget_config(path)
    assert (config.daily, config.monthly, config.ledger_url) == (9.5, None, "sqlite:///tmp/x.sqlite")
    assert load_budget_config(path, {"daily": 1, "weekly": None}).daily == 1
    monkeypatch.setenv("MEETARA_BUDGET_TZ", "Nowhere/Special")
    with pytest.raises(BadInput, match="^MEETARA_BUDGET_TZ: invalid timezone"):
        load_budget_config(path)


@pytest.mark.parametrize("word", ["off", "no", "false", "Off", "NO", "null"])
def test_a_cap_written_off_in_the_file_is_no_cap_as_in_the_environment(tmp_path, monkeypatch, word):
    """YAML 1.1 reads off/no/false as false, which pydantic took for $0 (before: `daily: off` was a $0
    cap, while MEETARA_DAILY_CAP=off is none)."""
    path = tmp_path / "meetara.yaml"
    path.write_text(f"budgets:\n  daily: {word}\n")
    assert load_budget_config(path).daily is None
    path.write_text("budgets:\n  daily: 3\n")
    monkeypatch.setenv("MEETARA_DAILY_CAP", word)
    assert load_budget_config(path).daily is None


@pytest.mark.parametrize("word", ["on", "yes", "true", "On", "YES"])
def test_a_cap_written_on_is_refused_not_a_dollar(tmp_path, word):
    path = tmp_path / "meetara.yaml"
    path.write_text(f"budgets:\n  weekly: {word}\n")
    with pytest.raises(BadInput) as e:
        load_budget_config(path)
    assert str(e.value) == (
        f"{path}: invalid weekly: Value error, on/yes/true is not a number: write one, or off for no cap"
    )


def test_ledger_url_forms(tmp_path, monkeypatch):
    from budgets.ledger import sqlite_path

    monkeypatch.setenv("MEETARA_STATE_DIR", str(tmp_path / "state"))
    assert sqlite_path(None) == tmp_path / "state" / "ledger.sqlite"
    assert sqlite_path("sqlite:///var/l.sqlite") == Path("/var/l.sqlite")
    assert sqlite_path("sqlite:////var/l.sqlite") == Path("/var/l.sqlite")
    assert sqlite_path("sqlite://rel/l.sqlite") == Path("rel/l.sqlite")
    assert sqlite_path("postgresql://h/db") is None
    with Ledger(config=BudgetConfig(ledger_url=f"sqlite://{tmp_path}/via-url.sqlite")) as ledger:
        assert ledger.location == str(tmp_path / "via-url.sqlite")
    with Ledger() as ledger:
        assert ledger.location == str(tmp_path / "state" / "ledger.sqlite")
