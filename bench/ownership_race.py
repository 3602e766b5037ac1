"""Launchers racing: 32 `meetara launch` processes over 4 run ids under one daily cap, on the local
backend, against a SQLite ledger and a PostgreSQL one.

    python bench/ownership_race.py [--launchers 32] [--runs 4] [--pg] [--out FILE]

Per ledger it reports: how each launcher ended (0 followed its run to the end, 2 refused by the cap,
3 refused because another launcher owns the run), how many jobs started per run (must be at most 1:
one owner per run), the cap and what was spent (must not pass it), and spend recorded in the ledger
against spend incurred (each local job's runtime from its start to its exit code, x the rate).
With --pg a throwaway PostgreSQL server is started (Debian's `postgresql`), as the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from budgets.caps import BudgetConfig  # noqa: E402
from budgets.ledger import Ledger  # noqa: E402
from launcher.backends.local import LocalBackend  # noqa: E402

RATE_H = 10.0
DOMAINS = ["nutrition", "legal", "fitness", "cooking", "travel", "parenting", "gardening", "music"]
STEP_ONE = re.compile(r"^(\S+): step 1/\d+", re.M)


def race(ledger_url: str, work: Path, launchers: int, runs: int, cap: float) -> dict:
    env = {
        **os.environ,
        "MEETARA_STORE": f"file://{work}/store",
        "MEETARA_LEDGER_URL": ledger_url,
        "MEETARA_STATE_DIR": str(work / "state"),
        "MEETARA_LOCAL_PRICE_HOUR": str(RATE_H),
        "MEETARA_LOCAL_STARTUP_S": "60",
        "MEETARA_DAILY_CAP": str(cap),
        "MEETARA_WEEKLY_CAP": "1000",
        "MEETARA_MONTHLY_CAP": "1000",
    }
    t0 = time.monotonic()
    procs = []
    for i in range(launchers):
        run = f"r{i % runs}"
        args = ["launch", "-d", DOMAINS[i % runs], "--budget", "5", "-y", "--run-id", run, "--poll", "0.5"]
        procs.append(
            (
                run,
                subprocess.Popen(
                    [sys.executable, "-m", "launcher", *args],
                    cwd=work,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    ends: dict[str, int] = {}
    other = []
    for run, p in procs:
        rc = p.wait(timeout=1800)
        ends[str(rc)] = ends.get(str(rc), 0) + 1
        if rc not in (0, 2, 3):
            other.append((run, rc, p.stderr.read()[-500:]))
    wall = time.monotonic() - t0

    backend = LocalBackend(root=work / "state" / "local-jobs")
    jobs_per_run: dict[str, int] = {}
    trainings: dict[str, int] = {}
    incurred = 0.0
    for d in sorted((work / "state" / "local-jobs").iterdir()):
        run = d.name.split("-", 1)[0]
        jobs_per_run[run] = jobs_per_run.get(run, 0) + 1
        st = backend.status(d.name)
        incurred += (st.ended_at - st.started_at).total_seconds() * RATE_H / 3600
        for domain in STEP_ONE.findall((d / "log").read_text(errors="replace")):
            trainings[domain] = trainings.get(domain, 0) + 1
    with Ledger(ledger_url, config=BudgetConfig(daily=cap)) as ledger:
        reservations = ledger.reservations()
        recorded = sum(r.accrued for r in reservations)
        daily = ledger.window_status()[0]
        open_left = sum(r.state == "open" for r in reservations)
    return {
        "launchers": launchers,
        "runs": runs,
        "exit_codes": ends,
        "unexpected": other,
        "jobs_per_run": jobs_per_run,
        "trainings_per_domain": trainings,
        "cap": cap,
        "spent_in_window": round(daily.spent, 6),
        "cap_held": daily.spent <= cap + 1e-9,
        "recorded": round(recorded, 6),
        "incurred": round(incurred, 6),
        "open_reservations": open_left,
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--launchers", type=int, default=32)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--cap", type=float, default=0.6, help="daily cap, USD (room for about 2 of the runs)")
    ap.add_argument("--pg", action="store_true", help="also race on a throwaway PostgreSQL ledger")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "ownership_race.json")
    args = ap.parse_args()
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    with tempfile.TemporaryDirectory(prefix="meetara-race-") as tmp:
        work = Path(tmp) / "sqlite"
        work.mkdir()
        result["sqlite"] = race(str(work / "ledger.sqlite"), work, args.launchers, args.runs, args.cap)
        print(json.dumps(result["sqlite"]), flush=True)
        if args.pg:
            from pg import pg_server

            def fail(message: str) -> None:
                raise SystemExit(message)

            with pg_server(fail) as url:
                work = Path(tmp) / "pg"
                work.mkdir()
                result["postgresql"] = race(url, work, args.launchers, args.runs, args.cap)
                print(json.dumps(result["postgresql"]), flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
