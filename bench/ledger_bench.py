"""Ledger benchmark: write latency in one process, reserve throughput with many processes racing for one
cap, and read/report time on a ledger of a year's size.

    python bench/ledger_bench.py [--workers 16] [--rounds 100] [--rows 20000] [--pg URL] [--out FILE]

SQLite on a temp dir of this machine's disk (WAL, synchronous=FULL: each commit is fsync'd); with
--pg, the same on that PostgreSQL database too (its tables must not exist yet, or belong to a ledger).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from budgets.caps import BudgetConfig  # noqa: E402
from budgets.ledger import Ledger  # noqa: E402
from budgets.report import report  # noqa: E402

NO_CAPS = BudgetConfig(daily=None, weekly=None, monthly=None)
HIGH_CAPS = BudgetConfig(daily=1e9, weekly=1e9, monthly=1e9)
JOB = {"provider": "vast", "gpu": "A100", "domains": ["legal"], "rate_per_hour": 1.2, "rate_source": "live"}
WORKER = r"""
import sys, time
from budgets import BudgetExceeded
from budgets.caps import BudgetConfig
from budgets.ledger import Ledger
url, rounds = sys.argv[1], int(sys.argv[2])
ledger = Ledger(url, config=BudgetConfig(daily=1e9, weekly=1e9, monthly=1e9))
print("ready", flush=True)
sys.stdin.readline()
t = time.perf_counter()
for i in range(rounds):
    try:
        ledger.reserve("bench", f"j{i}", 0.01, provider="vast", gpu="A100", rate_per_hour=1,
                       rate_source="live")
    except BudgetExceeded:
        pass
print(time.perf_counter() - t, flush=True)
"""


def ms(samples: list[float]) -> dict:
    s = sorted(samples)
    return {
        "median_ms": round(statistics.median(s) * 1e3, 3),
        "p99_ms": round(s[int(len(s) * 0.99)] * 1e3, 3),
    }


def single(url: str, rounds: int) -> dict:
    """Latency of each write, one process, no contention."""
    times: dict[str, list[float]] = {"reserve": [], "accrue_until": [], "settle": [], "window_status": []}
    with Ledger(url, config=HIGH_CAPS) as ledger:
        now = datetime.now(UTC)
        for i in range(rounds):
            t = time.perf_counter()
            rid = ledger.reserve("bench", f"j{i}", 1.0, **JOB)
            times["reserve"].append(time.perf_counter() - t)
            ledger.start(rid, now)
            t = time.perf_counter()
            ledger.accrue_until(rid, now + timedelta(minutes=30))
            times["accrue_until"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ledger.settle(rid)
            times["settle"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ledger.window_status()
            times["window_status"].append(time.perf_counter() - t)
    return {k: ms(v) for k, v in times.items()}


def race(url: str, workers: int, rounds: int) -> dict:
    """`workers` processes released at once, each `rounds` reserves on one ledger."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(rounds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(workers)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    t = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    per_worker = [float(p.communicate()[0]) for p in procs]
    wall = time.perf_counter() - t
    n = workers * rounds
    return {"workers": workers, "reserves": n, "wall_s": round(wall, 3), "reserves_per_s": round(n / wall, 1),
            "slowest_worker_s": round(max(per_worker), 3)}  # fmt: skip


def big_ledger(path: Path, rows: int) -> None:
    """`rows` reservations over a year, three accruals each, written straight into the tables."""
    Ledger(path, config=NO_CAPS).close()
    rng = random.Random(2026)
    start = datetime(2025, 1, 1, tzinfo=UTC).timestamp()
    with sqlite3.connect(path) as con:
        res, acc = [], []
        for i in range(1, rows + 1):
            t = start + rng.uniform(0, 365 * 86400)
            domains = json.dumps(rng.sample(["legal", "finance", "health", "math", "law", "tax"], 3))
            provider = rng.choice(["lambda", "runpod", "vast"])
            res.append((i, f"run{i % 300}", f"j{i}", provider, "A100", 1, domains, 1.2, "live", 3.0, None,
                        "settled", t, t, t + 3 * 3600, 3.0, "done"))  # fmt: skip
            acc += [(i, 1.0, t + k * 3600, 3600.0, "live", t + k * 3600) for k in (1, 2, 3)]
        con.executemany(f"INSERT INTO reservations VALUES ({', '.join('?' * 17)})", res)
        con.executemany(
            "INSERT INTO accruals (reservation_id, amount, at, seconds, source, until_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            acc,
        )
    con.close()


def reads(path: Path, rows: int) -> dict:
    big_ledger(path, rows)
    out = {"reservations": rows, "accruals": 3 * rows}
    with Ledger(path, config=HIGH_CAPS) as ledger:  # caps set, so that every window is summed
        now = datetime(2025, 7, 1, tzinfo=UTC)
        for name, fn in [
            ("window_status", lambda: ledger.window_status(now)),
            ("reserve", lambda: ledger.reserve("x", "j", 1.0, now=now, **JOB)),
            *[
                (f"report_by_{by}", lambda by=by: report(ledger, by))
                for by in ("provider", "domain", "day", "run")
            ],
        ]:
            times = []
            for _ in range(5):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            out[name] = ms(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--pg", help="also bench this PostgreSQL URL (an empty database)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }
    with tempfile.TemporaryDirectory() as tmp:
        result["sqlite_single"] = single(str(Path(tmp) / "single.sqlite"), args.rounds)
        result["sqlite_race"] = race(str(Path(tmp) / "race.sqlite"), args.workers, args.rounds)
        result["sqlite_reads"] = reads(Path(tmp) / "big.sqlite", args.rows)
    if args.pg:
        result["pg_single"] = single(args.pg, args.rounds)
        result["pg_race"] = race(args.pg, args.workers, args.rounds)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
