"""How `meetara simulate`'s run time grows with domains, jobs and replays (issue 15, item 6).

    python bench/simulate_scale.py [--out bench/simulate_scale.json]

Synthetic domain names (the planner prices any name as a domain of the workload), packed into jobs of
at most `--per-job` domains, the meetara policy, one trace folder, a deadline that leaves slack.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "data" / "spot-traces" / "availability" / "1-node" / "aws-02-15-2023"


def run(domains: int, per_job: int, replays: int) -> dict:
    from budgets.caps import BudgetConfig
    from launcher.market import load_traces
    from launcher.plan import Workload
    from launcher.preferences import Preferences
    from launcher.simulate import make_setup, simulate

    prefs = Preferences(max_domains_per_job=per_job, max_hours_per_job=168)
    names = [f"domain-{i:04d}" for i in range(domains)]
    setup = make_setup(
        names,
        load_traces(TRACES),
        ["meetara"],
        prefs=prefs,
        caps=BudgetConfig(daily=None, weekly=None, monthly=None),
        work=Workload(base_model="microsoft/DialoGPT-medium"),
        budget=None,
        deadline_s=48 * 3600,
    )
    jobs = len(setup.plans["meetara"].jobs)
    t0, c0 = time.perf_counter(), time.process_time()
    out = simulate(setup, ["meetara"], replays)
    return {
        "domains": domains,
        "jobs": jobs,
        "replays": replays,
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(time.process_time() - c0, 2),
        "cpu_s_per_replay": round((time.process_time() - c0) / replays, 3),
        "load": round(os.getloadavg()[0], 2),
        "meetara": out["policies"]["meetara"],
        "optimum": out["optimum"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "simulate_scale.json")
    args = ap.parse_args()
    rows = []
    for domains, per_job, replays in [
        (62, 31, 20),
        (250, 20, 20),
        (1000, 20, 20),
        (1000, 100, 20),
        (1000, 20, 60),
    ]:
        rows.append(run(domains, per_job, replays))
        print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
