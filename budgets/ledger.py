"""The ledger: reservations made before launches, accruals while jobs run, settlements, events.

SQLite (WAL) by default; PostgreSQL via psycopg 3 for a ledger a team shares across machines. Both
run the same SQL through a small dialect shim. Every write is one transaction that first takes the
ledger's write lock (SQLite `BEGIN IMMEDIATE`, PostgreSQL `pg_advisory_xact_lock`), so a cap check
and the reservation it allows are atomic across processes and machines.

Times are stored as UTC epoch seconds (floats) and handed out as aware UTC datetimes. Money is USD.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from budgets import BudgetExceeded, LedgerError, private_file, state_dir
from budgets.caps import WINDOWS, BudgetConfig, utcnow, window
from budgets.lease import Lease, LeaseLost, Owner, RunOwned, is_dead
from train import first_line

SCHEMA_VERSION = 2  # 2: the leases table (one owner per run, budgets/lease.py)
APP = "meetara-ledger"
RATE_SOURCES = ("billed", "live", "snapshot", "local")
OPEN, SETTLED, RELEASED = "open", "settled", "released"
PREEMPTED, RECOVERED, CANCELLED = "preempted", "recovered", "cancelled"
REPRICED = "repriced"  # accrual source: the correction when a machine's rate is learnt after it started
BILLED_RATE = "billed-rate"  # event: the $/h a provider reports billing, beside the planned one (JSON)
# money compares with a micro-cent of slack so that amounts that exactly fill a cap are accepted
EPS = 1e-9
PG_LOCK = 0x6D65657461726131  # "meetara1": the advisory lock every write transaction takes

Query = Callable[[str, Sequence], list[tuple]]


def _ddl(id_col: str) -> list[str]:
    money, time = "DOUBLE PRECISION", "DOUBLE PRECISION"
    return [
        "CREATE TABLE schema_version (app TEXT NOT NULL, version INTEGER NOT NULL)",
        f"""CREATE TABLE reservations (
            id {id_col}, run_id TEXT NOT NULL, job TEXT NOT NULL, provider TEXT NOT NULL,
            gpu TEXT NOT NULL, gpu_count INTEGER NOT NULL DEFAULT 1, domains TEXT NOT NULL DEFAULT '[]',
            rate_per_hour {money} NOT NULL,
            rate_source TEXT NOT NULL CHECK (rate_source IN ('billed', 'live', 'snapshot', 'local')),
            amount {money} NOT NULL CHECK (amount >= 0), launch_cap {money},
            state TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'settled', 'released')),
            created_at {time} NOT NULL, started_at {time}, ended_at {time}, settled_amount {money},
            note TEXT)""",
        "CREATE INDEX reservations_state ON reservations (state)",
        "CREATE INDEX reservations_run ON reservations (run_id)",
        f"""CREATE TABLE accruals (
            id {id_col}, reservation_id BIGINT NOT NULL REFERENCES reservations (id),
            amount {money} NOT NULL, at {time} NOT NULL, seconds DOUBLE PRECISION, source TEXT NOT NULL,
            until_at {time})""",
        "CREATE INDEX accruals_at ON accruals (at)",
        "CREATE INDEX accruals_reservation ON accruals (reservation_id)",
        f"""CREATE TABLE events (
            id {id_col}, run_id TEXT NOT NULL, job TEXT, reservation_id BIGINT REFERENCES reservations (id),
            kind TEXT NOT NULL, at {time} NOT NULL, detail TEXT)""",
        "CREATE INDEX events_at ON events (at)",
        *_leases_ddl(),
        "INSERT INTO schema_version (app, version) VALUES (?, ?)",
    ]


def _leases_ddl() -> list[str]:
    time = "DOUBLE PRECISION"
    return [
        f"""CREATE TABLE leases (
            run_id TEXT PRIMARY KEY, owner TEXT NOT NULL, host TEXT NOT NULL, boot_id TEXT NOT NULL,
            pid INTEGER NOT NULL, pid_start TEXT, since {time} NOT NULL, renewed_at {time} NOT NULL,
            expires_at {time} NOT NULL)"""
    ]


LEDGER_TABLES = {"schema_version", "reservations", "accruals", "events", "leases"}


@dataclass(frozen=True)
class Reservation:
    id: int
    run_id: str
    job: str
    provider: str
    gpu: str
    gpu_count: int
    domains: tuple[str, ...]
    rate_per_hour: float
    rate_source: str
    amount: float
    launch_cap: float | None
    state: str
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    settled_amount: float | None
    note: str | None
    accrued: float

    @property
    def outstanding(self) -> float:
        """What this reservation still holds back from the caps: unspent reserve while it is open."""
        return max(self.amount - self.accrued, 0.0) if self.state == OPEN else 0.0

    @property
    def stopped(self) -> bool:
        """Closed by a stop (budget, cancel) rather than by finishing its work."""
        return (self.note or "").startswith("stopped")


@dataclass(frozen=True)
class JobUsage:
    """What a job's reservations accrued, and where its open one's accruals stop (`Ledger.job_usage`)."""

    dollars: float
    seconds: float
    open_rate: float | None = None  # $/h of its open reservation
    open_since: datetime | None = None  # ... accrued up to this time (None: its billing never started)

    def until(self, end: datetime | None, started: datetime | None = None) -> tuple[float, float]:
        """(dollars, seconds) with the open reservation's unrecorded time up to `end` (None: none)
        added, from its last accrual (or from `started`, the backend's start, if it never accrued)."""
        since = self.open_since or started
        if end is None or since is None or self.open_rate is None:
            return self.dollars, self.seconds
        extra = max((end - since).total_seconds(), 0.0)
        return self.dollars + extra / 3600 * self.open_rate, self.seconds + extra


@dataclass(frozen=True)
class Entry:
    """One accrual with the reservation it belongs to."""

    id: int
    reservation_id: int
    amount: float
    at: datetime
    seconds: float | None
    source: str
    run_id: str
    job: str
    provider: str
    gpu: str
    gpu_count: int
    domains: tuple[str, ...]


@dataclass(frozen=True)
class Event:
    id: int
    run_id: str
    job: str | None
    reservation_id: int | None
    kind: str
    at: datetime
    detail: str | None


@dataclass(frozen=True)
class WindowStatus:
    name: str
    start: datetime  # local time of the config's zone
    end: datetime
    cap: float | None
    spent: float
    reserved: float  # outstanding reservations (all open ones, whenever made)
    remaining: float | None  # cap - spent - reserved; negative when a cap is already passed

    def as_dict(self) -> dict:
        """JSON-able, as `meetara budget --json` and the MCP budget resource show it."""
        return {
            "window": self.name,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "cap": self.cap,
            "spent": round(self.spent, 6),
            "reserved": round(self.reserved, 6),
            "remaining": None if self.remaining is None else round(self.remaining, 6),
        }


RES_COLS = (
    "r.id, r.run_id, r.job, r.provider, r.gpu, r.gpu_count, r.domains, r.rate_per_hour, r.rate_source,"
    " r.amount, r.launch_cap, r.state, r.created_at, r.started_at, r.ended_at, r.settled_amount, r.note,"
    " (SELECT COALESCE(SUM(a.amount), 0) FROM accruals a WHERE a.reservation_id = r.id)"
)
OUTSTANDING = (
    "SELECT COALESCE(SUM(CASE WHEN amount > acc THEN amount - acc ELSE 0 END), 0) FROM ("
    "SELECT r.amount AS amount,"
    " (SELECT COALESCE(SUM(a.amount), 0) FROM accruals a WHERE a.reservation_id = r.id) AS acc"
    " FROM reservations r WHERE r.state = 'open'{where}) t"
)


def _ts(t: datetime) -> float:
    if t.tzinfo is None:
        raise ValueError(f"naive datetime {t.isoformat()}: the ledger needs time-zone-aware times")
    return t.timestamp()


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _money(x: float, what: str, allow_negative: bool = False) -> float:
    x = float(x)
    if not math.isfinite(x) or (x < 0 and not allow_negative):
        raise ValueError(
            f"{what} must be a finite{'' if allow_negative else ' non-negative'} number, not {x}"
        )
    return x


class _Sqlite:
    """One connection; writes in BEGIN IMMEDIATE (the file's write lock), reads in a WAL snapshot."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.where = str(path)
        if path.exists() and not path.is_file():
            raise LedgerError(f"{path}: not a file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            private_file(path)  # 0600; SQLite gives the -wal and -shm files the database file's mode
            self.con = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise LedgerError(f"{path}: cannot open the ledger ({e})") from None
        # read before any write: a foreign or corrupt file must be left exactly as it is
        try:
            tables = {n for (n,) in self.con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            self.con.close()
            raise LedgerError(f"{path}: not a meetara ledger ({e}); the file was left untouched") from None
        if tables and ("schema_version" not in tables or tables - LEDGER_TABLES - {"sqlite_sequence"}):
            self.con.close()
            names = ", ".join(sorted(tables)[:5])
            raise LedgerError(f"{path}: not a meetara ledger (tables: {names}); the file was left untouched")
        try:
            self._wal(timeout)
            self.con.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as e:
            self.con.close()
            raise LedgerError(f"{path}: cannot use the ledger ({e})") from None
        self.id_col = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def _wal(self, timeout: float) -> None:
        """Switch to WAL (readers never wait for the writer). Switching needs the file to itself and
        SQLite does not wait for that with its busy timeout: when processes open a new ledger at once,
        the loser is told "locked" at once, so it asks again until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self.con.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _q(self, sql: str, params: Sequence = ()) -> list[tuple]:
        return self.con.execute(sql, tuple(params)).fetchall()

    @contextmanager
    def tx(self, write: bool) -> Iterator[Query]:
        try:
            self.con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._q
            except BaseException:
                if self.con.in_transaction:
                    self.con.execute("ROLLBACK")
                raise
            self.con.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            if self.con.in_transaction:
                self.con.execute("ROLLBACK")
            raise LedgerError(f"{self.where}: ledger {'write' if write else 'read'} failed ({e})") from None

    def tables(self, q: Query) -> set[str]:
        return {n for (n,) in q("SELECT name FROM sqlite_master WHERE type = 'table'", ())}

    def close(self) -> None:
        self.con.close()


class _Postgres:
    """One psycopg connection; writes take an exclusive advisory lock, reads a shared one."""

    def __init__(self, url: str, timeout: float) -> None:
        import psycopg  # only for postgres URLs: keeps `import budgets.ledger` cheap

        self.psycopg = psycopg
        self.where = _redact(url)
        try:
            self.con = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout)))
        except psycopg.Error as e:
            raise LedgerError(f"{self.where}: cannot connect ({first_line(e)})") from None
        self.id_col = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"

    def _q(self, sql: str, params: Sequence = ()) -> list[tuple]:
        cur = self.con.execute(sql.replace("?", "%s"), tuple(params))
        return cur.fetchall() if cur.description else []

    @contextmanager
    def tx(self, write: bool) -> Iterator[Query]:
        try:
            with self.con.transaction():
                lock = "pg_advisory_xact_lock" if write else "pg_advisory_xact_lock_shared"
                self.con.execute(f"SELECT {lock}(%s)", (PG_LOCK,))
                yield self._q
        except self.psycopg.Error as e:
            raise LedgerError(
                f"{self.where}: ledger {'write' if write else 'read'} failed ({first_line(e)})"
            ) from None

    def tables(self, q: Query) -> set[str]:
        rows = q("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()", ())
        return {n for (n,) in rows} & LEDGER_TABLES

    def close(self) -> None:
        self.con.close()


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def sqlite_path(url: str | Path | None) -> Path | None:
    """The file of a SQLite ledger URL (None: the default in the state dir); None for PostgreSQL.

    `sqlite:///abs/path` (and `sqlite:////abs/path`) is an absolute path, `sqlite://rel/path` a
    relative one; anything without `://` is a plain path (`~` expanded)."""
    if url is None:
        return state_dir() / "ledger.sqlite"
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        return None
    if text.startswith("sqlite://"):
        rest = text[len("sqlite://") :]
        return Path("/" + rest.lstrip("/")) if rest.startswith("/") else Path(rest)
    if "://" in text:
        raise LedgerError(f"{text}: unsupported ledger URL (sqlite:///PATH, a path, or postgresql://...)")
    return Path(text).expanduser()


class Ledger:
    """The budget ledger. Caps and their time zone come from `config` (a `BudgetConfig`).

    `url`: a path, `sqlite:///PATH` or `postgresql://...`; default `config.ledger_url`, else
    `state_dir()/ledger.sqlite`. `timeout`: seconds to wait for another writer's lock (SQLite) or to
    connect (PostgreSQL). Safe to share between threads; one per process is the usual shape."""

    def __init__(
        self, url: str | Path | None = None, *, config: BudgetConfig | None = None, timeout: float = 60.0
    ) -> None:
        self.config = config or BudgetConfig()
        url = url if url is not None else self.config.ledger_url
        path = sqlite_path(url)
        self.db: _Sqlite | _Postgres = _Sqlite(path, timeout) if path else _Postgres(str(url), timeout)
        self.location = self.db.where
        self._lock = threading.RLock()
        try:
            self._init_schema()
        except BaseException:
            self.db.close()
            raise

    def _init_schema(self) -> None:
        with self._tx(write=True) as q:
            tables = self.db.tables(q)
            if not tables:
                statements = _ddl(self.db.id_col)
                for sql in statements[:-1]:
                    q(sql, ())
                q(statements[-1], (APP, SCHEMA_VERSION))
                return
            if "schema_version" not in tables:
                raise LedgerError(f"{self.location}: has tables {sorted(tables)} but is not a meetara ledger")
            rows = q("SELECT app, version FROM schema_version", ())
        if len(rows) != 1 or rows[0][0] != APP:
            raise LedgerError(f"{self.location}: not a meetara ledger (schema_version holds {rows[:2]})")
        if rows[0][1] > SCHEMA_VERSION:
            raise LedgerError(
                f"{self.location}: ledger schema {rows[0][1]} is newer than this meetara's"
                f" ({SCHEMA_VERSION}); upgrade meetara"
            )
        if rows[0][1] < SCHEMA_VERSION:
            self._migrate()

    def _migrate(self) -> None:
        """Bring an older ledger up to SCHEMA_VERSION, in one write transaction (re-checked inside it:
        another process may have migrated it meanwhile)."""
        with self._tx(write=True) as q:
            (version,) = q("SELECT version FROM schema_version", ())[0]
            if version < 2:
                for sql in _leases_ddl():
                    q(sql, ())
            q("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    @contextmanager
    def _tx(self, write: bool) -> Iterator[Query]:
        with self._lock, self.db.tx(write) as q:
            yield q

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ---------------------------------------------------------------------------------------

    def reserve(
        self,
        run_id: str,
        job: str,
        amount: float,
        *,
        provider: str,
        gpu: str,
        domains: Sequence[str] = (),
        rate_per_hour: float,
        rate_source: str,
        gpu_count: int = 1,
        launch_cap: float | None = None,
        now: datetime | None = None,
        owner: str | None = None,
    ) -> int:
        """Reserve `amount` for a job; returns the reservation id. With `owner` (a lease token), the
        caller must hold the run's lease (LeaseLost otherwise, nothing written).

        Raises `BudgetExceeded` (and writes nothing) when, for a daily/weekly/monthly cap, spent in
        that window + outstanding reservations + amount would pass it, or when `launch_cap` is given
        and this run's spent + outstanding + amount would pass that."""
        amount = _money(amount, "amount")
        rate = _money(rate_per_hour, "rate_per_hour")
        if rate_source not in RATE_SOURCES:
            raise ValueError(f"rate_source must be one of {', '.join(RATE_SOURCES)}, not {rate_source!r}")
        if isinstance(domains, str):
            raise TypeError(f"domains must be a list of names, not the string {domains!r}")
        if int(gpu_count) < 1:
            raise ValueError(f"gpu_count must be at least 1, not {gpu_count}")
        if launch_cap is not None:
            launch_cap = _money(launch_cap, "launch_cap")
        now = now or utcnow()
        with self._tx(write=True) as q:
            if owner is not None:
                self._check_owner(q, run_id, owner)
            sums = self._sums(q, now, run_id if launch_cap is not None else None)
            reserved = sums["reserved"]
            for name in WINDOWS:
                cap = self.config.cap(name)
                if cap is not None and sums[name] + reserved + amount > cap + EPS:
                    raise BudgetExceeded(name, cap, sums[name], reserved, amount)
            if (
                launch_cap is not None
                and sums["run_spent"] + sums["run_reserved"] + amount > launch_cap + EPS
            ):
                raise BudgetExceeded(
                    f"launch (run {run_id})", launch_cap, sums["run_spent"], sums["run_reserved"], amount
                )
            rows = q(
                "INSERT INTO reservations (run_id, job, provider, gpu, gpu_count, domains, rate_per_hour,"
                " rate_source, amount, launch_cap, state, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " RETURNING id",
                (
                    run_id,
                    job,
                    provider,
                    gpu,
                    int(gpu_count),
                    json.dumps(list(domains)),
                    rate,
                    rate_source,
                    amount,
                    launch_cap,
                    OPEN,
                    _ts(now),
                ),
            )
        return int(rows[0][0])

    def start(self, reservation_id: int, started_at: datetime | None = None) -> None:
        """Billing (re)starts at `started_at`. After a preemption, accrue up to the preemption, then
        call start again at the relaunch: the gap between is not billed."""
        with self._tx(write=True) as q:
            self._row(q, reservation_id)
            q(
                "UPDATE reservations SET started_at = ? WHERE id = ?",
                (_ts(started_at or utcnow()), reservation_id),
            )

    def set_rate(
        self,
        reservation_id: int,
        rate_per_hour: float,
        *,
        since: datetime | None = None,
        owner: str | None = None,
    ) -> None:
        """The reservation accrues at `rate_per_hour`: its job runs on another machine than the one
        reserved for (the backend placed it on a fallback offer), or the provider bills another rate.
        From now on; with `since` (when that machine was created), what was accrued for the time after
        it is repriced too, by one correcting accrual dated `since` (the change is often learnt a poll or
        more after the machine started). With `owner`, only the holder of the run's lease changes it
        (LeaseLost otherwise)."""
        rate = _money(rate_per_hour, "rate_per_hour")
        with self._tx(write=True) as q:
            row = self._row(q, reservation_id)
            if owner is not None:
                self._check_owner(q, row.run_id, owner)
            if row.state != OPEN:
                return
            if since is not None and row.started_at is not None and rate != row.rate_per_hour:
                (covered,) = q(
                    "SELECT MAX(until_at) FROM accruals WHERE reservation_id = ?", (reservation_id,)
                )[0]
                begin = max(_ts(since), _ts(row.started_at))
                if covered is not None and covered > begin:
                    delta = (rate - row.rate_per_hour) * (covered - begin) / 3600
                    self._insert_accrual(q, reservation_id, delta, _dt(begin), None, REPRICED, None)
            q("UPDATE reservations SET rate_per_hour = ? WHERE id = ?", (rate, reservation_id))

    def accrue(
        self,
        reservation_id: int,
        amount: float,
        *,
        seconds: float | None = None,
        source: str = "live",
        now: datetime | None = None,
    ) -> int:
        """Record `amount` spent at `now` (the caller computes it, e.g. rate x elapsed); returns its id.

        Allowed on closed reservations too: money spent is recorded whenever it is learnt."""
        amount = _money(amount, "amount", allow_negative=True)
        with self._tx(write=True) as q:
            self._row(q, reservation_id)
            return self._insert_accrual(q, reservation_id, amount, now or utcnow(), seconds, source, None)

    def accrue_until(self, reservation_id: int, until: datetime, *, source: str = "live") -> float:
        """Accrue rate x (until - max(started_at, end of the last accrue_until)); returns the amount.

        Idempotent: a second call with the same (or an earlier) `until` records nothing. Nothing is
        accrued before `start` or after the reservation is closed. The period is cut at local
        midnights and each piece is dated at its start, so spend lands in the day (week, month) it
        happened. A watchdog may call this on every poll: a piece that continues the reservation's
        latest row on the same local day extends that row, so the ledger keeps about one row per job
        and day however often it polls."""
        end = _ts(until)
        zone = self.config.zone
        with self._tx(write=True) as q:
            row = self._row(q, reservation_id)
            if row.state != OPEN or row.started_at is None:
                return 0.0
            last = q(
                "SELECT id, at, until_at, source FROM accruals WHERE reservation_id = ?"
                " ORDER BY id DESC LIMIT 1",
                (reservation_id,),
            )
            covered = q("SELECT MAX(until_at) FROM accruals WHERE reservation_id = ?", (reservation_id,))[0][
                0
            ]
            begin = max(_ts(row.started_at), covered if covered is not None else -math.inf)
            total = 0.0
            while begin < end:
                day = window("daily", _dt(begin), zone)
                stop = min(end, _ts(day.end))
                amount = row.rate_per_hour * (stop - begin) / 3600
                if last and last[0][2] == begin and last[0][3] == source and _dt(last[0][1]) >= day.start:
                    q(
                        "UPDATE accruals SET amount = amount + ?, seconds = seconds + ?, until_at = ?"
                        " WHERE id = ?",
                        (amount, stop - begin, stop, last[0][0]),
                    )
                else:
                    self._insert_accrual(q, reservation_id, amount, _dt(begin), stop - begin, source, stop)
                total += amount
                begin = stop
        return total

    def settle(
        self,
        reservation_id: int,
        actual: float | None = None,
        *,
        ended_at: datetime | None = None,
        note: str | None = None,
        now: datetime | None = None,
        owner: str | None = None,
    ) -> Reservation:
        """Close a reservation; what it did not spend goes back to the caps.

        With `actual` (e.g. the billed cost), a final accrual of actual - accrued (negative when billed
        less) makes the total accrued equal `actual`; it is dated `ended_at` (else now). A note such as
        'stopped: budget' marks a job that did not finish. Settling a closed reservation is a no-op."""
        return self._close(reservation_id, SETTLED, actual, ended_at, note, now, owner)

    def release(
        self,
        reservation_id: int,
        *,
        note: str | None = None,
        now: datetime | None = None,
        owner: str | None = None,
    ) -> Reservation:
        """Close a reservation whose job never ran (launch failed, plan abandoned); no-op when closed.
        With `owner`, as for `settle`: only the holder of the run's lease closes it."""
        return self._close(reservation_id, RELEASED, None, None, note, now, owner)

    def _close(self, reservation_id, state, actual, ended_at, note, now, owner=None) -> Reservation:
        if actual is not None:
            actual = _money(actual, "actual")
        now = now or utcnow()
        end = ended_at or now
        with self._tx(write=True) as q:
            row = self._row(q, reservation_id)
            if row.state != OPEN:
                return row
            if owner is not None:
                self._check_owner(q, row.run_id, owner)
            total = row.accrued
            if actual is not None and abs(actual - row.accrued) > EPS:
                self._insert_accrual(q, reservation_id, actual - row.accrued, end, None, "settle", None)
                total = actual
            q(
                "UPDATE reservations SET state = ?, ended_at = ?, settled_amount = ?, note = ? WHERE id = ?",
                (state, _ts(end), total, note, reservation_id),
            )
            return self._row(q, reservation_id)

    def record_event(
        self,
        run_id: str,
        kind: str,
        *,
        job: str | None = None,
        reservation_id: int | None = None,
        detail: str | None = None,
        now: datetime | None = None,
    ) -> int:
        """Record something that happened to a run or job ('preempted', 'recovered', 'cancelled', ...)."""
        with self._tx(write=True) as q:
            rows = q(
                "INSERT INTO events (run_id, job, reservation_id, kind, at, detail) VALUES (?, ?, ?, ?, ?, ?)"
                " RETURNING id",
                (run_id, job, reservation_id, kind, _ts(now or utcnow()), detail),
            )
        return int(rows[0][0])

    # -- leases (budgets/lease.py has the states) -------------------------------------------------------

    def acquire_lease(
        self, run_id: str, owner: Owner, ttl_s: float, now: datetime | None = None
    ) -> Lease | None:
        """Take the run's lease for `owner`; returns the dead owner's lease it replaced (None if it
        was free or already ours). Raises RunOwned when a live launcher holds it."""
        now = now or utcnow()
        with self._tx(write=True) as q:
            held = self._lease(q, run_id)
            if held is not None and held.owner != owner.token and not is_dead(held, now):
                raise RunOwned(held)
            q("DELETE FROM leases WHERE run_id = ?", (run_id,))
            q(
                "INSERT INTO leases (run_id, owner, host, boot_id, pid, pid_start, since, renewed_at,"
                " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    owner.token,
                    owner.host,
                    owner.boot_id,
                    owner.pid,
                    owner.pid_start,
                    _ts(held.since if held and held.owner == owner.token else now),
                    _ts(now),
                    _ts(now) + ttl_s,
                ),
            )
            if held is not None and held.owner != owner.token:
                q(
                    "INSERT INTO events (run_id, job, reservation_id, kind, at, detail)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, None, None, "lease-takeover", _ts(now), f"from pid {held.pid} on {held.host}"),
                )
                return held
        return None

    def renew_lease(self, run_id: str, token: str, ttl_s: float, now: datetime | None = None) -> None:
        """Push the lease's expiry `ttl_s` ahead; LeaseLost if `token` no longer holds it."""
        now = now or utcnow()
        with self._tx(write=True) as q:
            self._check_owner(q, run_id, token)
            q(
                "UPDATE leases SET renewed_at = ?, expires_at = ? WHERE run_id = ?",
                (_ts(now), _ts(now) + ttl_s, run_id),
            )

    def release_lease(self, run_id: str, token: str) -> None:
        """Free the run; LeaseLost if `token` no longer holds it (nothing is changed then)."""
        with self._tx(write=True) as q:
            self._check_owner(q, run_id, token)
            q("DELETE FROM leases WHERE run_id = ?", (run_id,))

    def lease(self, run_id: str) -> Lease | None:
        """Who follows the run now (None: nobody; the lease may be stale, see lease.is_dead)."""
        with self._tx(write=False) as q:
            return self._lease(q, run_id)

    def _lease(self, q: Query, run_id: str) -> Lease | None:
        rows = q(
            "SELECT run_id, owner, host, boot_id, pid, pid_start, since, renewed_at, expires_at FROM leases"
            " WHERE run_id = ?",
            (run_id,),
        )
        if not rows:
            return None
        r = rows[0]
        return Lease(r[0], r[1], r[2], r[3], int(r[4]), r[5], _dt(r[6]), _dt(r[7]), _dt(r[8]))

    def _check_owner(self, q: Query, run_id: str, token: str) -> None:
        held = self._lease(q, run_id)
        if held is None or held.owner != token:
            who = "nobody" if held is None else f"pid {held.pid} on {held.host}"
            raise LeaseLost(f"run {run_id}: this launcher no longer holds the run's lease ({who} does)")

    # -- reads ----------------------------------------------------------------------------------------

    def reservation(self, reservation_id: int) -> Reservation:
        with self._tx(write=False) as q:
            return self._row(q, reservation_id)

    def reservations(self, run_id: str | None = None, state: str | None = None) -> list[Reservation]:
        where, params = _where(("r.run_id = ?", run_id), ("r.state = ?", state))
        with self._tx(write=False) as q:
            return [
                _reservation(r)
                for r in q(f"SELECT {RES_COLS} FROM reservations r{where} ORDER BY r.id", params)
            ]

    def open_reservations(self, run_id: str | None = None) -> list[Reservation]:
        return self.reservations(run_id, OPEN)

    def entries(self, since: datetime | None = None, until: datetime | None = None) -> list[Entry]:
        """Accruals with `at` in [since, until), each with its reservation's run, job, provider, GPU
        and domains."""
        where, params = _where(
            ("a.at >= ?", None if since is None else _ts(since)),
            ("a.at < ?", None if until is None else _ts(until)),
        )
        sql = (
            "SELECT a.id, a.reservation_id, a.amount, a.at, a.seconds, a.source, r.run_id, r.job, r.provider,"
            " r.gpu, r.gpu_count, r.domains"
            f" FROM accruals a JOIN reservations r ON r.id = a.reservation_id{where}"
            " ORDER BY a.at, a.id"
        )
        with self._tx(write=False) as q:
            rows = q(sql, params)
        return [
            Entry(i, rid, amt, _dt(at), sec, src, run, job, prov, gpu, n, _domains(d))
            for i, rid, amt, at, sec, src, run, job, prov, gpu, n, d in rows
        ]

    def events(
        self, since: datetime | None = None, until: datetime | None = None, kind: str | None = None
    ) -> list[Event]:
        where, params = _where(
            ("at >= ?", None if since is None else _ts(since)),
            ("at < ?", None if until is None else _ts(until)),
            ("kind = ?", kind),
        )
        with self._tx(write=False) as q:
            rows = q(
                f"SELECT id, run_id, job, reservation_id, kind, at, detail FROM events{where}"
                " ORDER BY at, id",
                params,
            )
        return [Event(i, run, job, rid, k, _dt(at), det) for i, run, job, rid, k, at, det in rows]

    def spent(self, window_name: str, now: datetime | None = None, provider: str | None = None) -> float:
        """Sum of accruals whose `at` falls in the daily/weekly/monthly window holding `now`."""
        with self._tx(write=False) as q:
            return self._spent(q, window_name, now or utcnow(), provider)

    def job_usage(self, run_id: str) -> dict[str, JobUsage]:
        """Per job of the run, over all its reservations: dollars and machine seconds accrued, and for
        an open reservation whose billing started, its rate and the time its accruals reach (what it
        costs from then on is not recorded until someone accrues it)."""
        with self._tx(write=False) as q:
            rows = q(
                "SELECT r.job, r.state, r.rate_per_hour, r.started_at,"
                " (SELECT COALESCE(SUM(a.amount), 0) FROM accruals a WHERE a.reservation_id = r.id),"
                " (SELECT COALESCE(SUM(a.seconds), 0) FROM accruals a WHERE a.reservation_id = r.id),"
                " (SELECT MAX(a.until_at) FROM accruals a WHERE a.reservation_id = r.id)"
                " FROM reservations r WHERE r.run_id = ? ORDER BY r.id",
                (run_id,),
            )
        out: dict[str, JobUsage] = {}
        for job, state, rate, started, dollars, seconds, until in rows:
            u = out.get(job) or JobUsage(0.0, 0.0)
            billing = None
            if state == OPEN and started is not None:
                billing = _dt(max(started, until) if until is not None else started)
            out[job] = JobUsage(
                u.dollars + float(dollars),
                u.seconds + float(seconds),
                rate if state == OPEN else u.open_rate,
                billing or u.open_since,
            )
        return out

    def outstanding(self, run_id: str | None = None) -> float:
        """Money held by open reservations beyond what they have accrued (of one run, or all)."""
        with self._tx(write=False) as q:
            if run_id is None:
                return _one(q(OUTSTANDING.format(where=""), ()))
            return _one(q(OUTSTANDING.format(where=" AND r.run_id = ?"), (run_id,)))

    def window_status(self, now: datetime | None = None) -> list[WindowStatus]:
        """Per window (daily, weekly, monthly): its bounds, cap, spent, reserved and what remains."""
        now = now or utcnow()
        with self._tx(write=False) as q:
            sums = self._sums(q, now)
        out = []
        for name in WINDOWS:
            w, cap = window(name, now, self.config.zone), self.config.cap(name)
            remaining = None if cap is None else cap - sums[name] - sums["reserved"]
            out.append(WindowStatus(name, w.start, w.end, cap, sums[name], sums["reserved"], remaining))
        return out

    # -- helpers --------------------------------------------------------------------------------------

    def _sums(self, q: Query, now: datetime, run_id: str | None = None) -> dict[str, float]:
        """In one statement (the write lock is held for as few round trips as possible): outstanding
        reservations, spent in each window holding `now`, and with `run_id` that run's spent and
        outstanding."""
        parts, params = [f"({OUTSTANDING.format(where='')})"], []
        for name in WINDOWS:
            w = window(name, now, self.config.zone)
            parts.append("(SELECT COALESCE(SUM(amount), 0) FROM accruals WHERE at >= ? AND at < ?)")
            params += [_ts(w.start), _ts(w.end)]
        keys = ["reserved", *WINDOWS]
        if run_id is not None:
            parts.append(
                "(SELECT COALESCE(SUM(a.amount), 0) FROM accruals a"
                " JOIN reservations r ON r.id = a.reservation_id WHERE r.run_id = ?)"
            )
            parts.append(f"({OUTSTANDING.format(where=' AND r.run_id = ?')})")
            params += [run_id, run_id]
            keys += ["run_spent", "run_reserved"]
        row = q("SELECT " + ", ".join(parts), params)[0]
        return {k: float(v or 0.0) for k, v in zip(keys, row, strict=True)}

    def _spent(self, q: Query, window_name: str, now: datetime, provider: str | None = None) -> float:
        w = window(window_name, now, self.config.zone)
        sql = "SELECT COALESCE(SUM(a.amount), 0) FROM accruals a"
        params: list = [_ts(w.start), _ts(w.end)]
        if provider is None:
            return _one(q(sql + " WHERE a.at >= ? AND a.at < ?", params))
        sql += (
            " JOIN reservations r ON r.id = a.reservation_id WHERE a.at >= ? AND a.at < ? AND r.provider = ?"
        )
        return _one(q(sql, [*params, provider]))

    def _row(self, q: Query, reservation_id: int) -> Reservation:
        rows = q(f"SELECT {RES_COLS} FROM reservations r WHERE r.id = ?", (reservation_id,))
        if not rows:
            raise KeyError(f"no reservation {reservation_id} in {self.location}")
        return _reservation(rows[0])

    @staticmethod
    def _insert_accrual(q, reservation_id, amount, at, seconds, source, until_at) -> int:
        rows = q(
            "INSERT INTO accruals (reservation_id, amount, at, seconds, source, until_at)"
            " VALUES (?, ?, ?, ?, ?, ?)"
            " RETURNING id",
            (reservation_id, amount, _ts(at), seconds, source, until_at),
        )
        return int(rows[0][0])


def _one(rows: list[tuple]) -> float:
    return float(rows[0][0] or 0.0)


def _where(*conditions: tuple[str, object]) -> tuple[str, list]:
    used = [(sql, v) for sql, v in conditions if v is not None]
    return (" WHERE " + " AND ".join(s for s, _ in used) if used else ""), [v for _, v in used]


@lru_cache(maxsize=4096)
def _domains(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))  # cached: a ledger holds few distinct domain lists, many rows


def _reservation(row: tuple) -> Reservation:
    v = list(row)  # in RES_COLS order, which is Reservation's field order
    v[0], v[5], v[6], v[17] = int(v[0]), int(v[5]), _domains(v[6]), float(v[17])
    v[12:15] = [_dt(t) for t in v[12:15]]
    return Reservation(*v)
