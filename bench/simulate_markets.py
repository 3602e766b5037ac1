"""`meetara simulate` over three real spot-trace folders: every policy, 200 replays each, all 62 domains,
a 12 h deadline and a $50 budget, the default preferences and caps (as the README's command).

    python bench/simulate_markets.py [--replays 200] [--out bench/simulate_markets.json]

Writes per folder the `--json` summary, the wall and CPU seconds it took and the load average around
it; bench/RESULTS.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "data" / "spot-traces" / "availability"
FOLDERS = ["1-node/aws-02-15-2023", "1-node/aws-10-26-2022", "16-node/aws-08-27-2023"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "simulate_markets.json")
    args = ap.parse_args()

    from budgets.caps import BudgetConfig
    from launcher.launch import select
    from launcher.market import load_traces
    from launcher.plan import Workload
    from launcher.policies import NAMES
    from launcher.preferences import Preferences
    from launcher.simulate import make_setup, simulate

    out = {}
    for folder in FOLDERS:
        load_before = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        setup = make_setup(
            select("all"),
            load_traces(TRACES / folder),
            list(NAMES),
            prefs=Preferences(),
            caps=BudgetConfig(),
            work=Workload(base_model="microsoft/DialoGPT-medium"),
            budget=50.0,
            deadline_s=12 * 3600,
        )
        summary = simulate(setup, list(NAMES), args.replays)
        out[folder] = {
            **summary,
            "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
            "replays": args.replays,
        }
        print(folder, json.dumps(out[folder]), flush=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
