"""What a local job really takes, start-up included, at the machine's load (issue 27, item 3).

    python bench/local_startup.py --busy 0,3 --reps 2      # ~4 min on a 2-core VM

For each level of background load (`--busy N`: N busy-looping Python processes, the kind of load other
work puts on a shared machine), the real local backend runs `--reps` one-domain jobs of the tiny model,
as `meetara launch` renders them (runner, setup, `python -m train`), and the log is read every 50 ms.
Reported per job: the 1-minute load average when it was planned (what the planner sees), seconds from
the launch to the first training step (the start-up: runner, setup's `import train`, `python -m
train`'s imports, the base model, the domain's data), from there to the end (training, export,
validation, upload), the machine time billed (the backend's start to its end), and what the local
planner prices the job at (`plan_local`, its hours in seconds) with the reservation (x RESERVE_MARGIN).
Writes bench/local_startup.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def one_job(tmp: Path, name: str) -> dict:
    from launcher.backends.local import LocalBackend
    from launcher.launch import new_run, task_factory
    from launcher.money import RESERVE_MARGIN
    from launcher.plan import Workload, local_slowdown, plan_local
    from launcher.preferences import Preferences

    prefs = Preferences(local_price_hour=1.0)
    load = os.getloadavg()[0]
    plan = plan_local(["nutrition"], prefs, Workload(), name)
    store = f"file://{tmp}/store"
    rec = new_run(plan, store=store, endpoint_url=None, models_dir=tmp / "models", budget=None)
    (job,) = rec.jobs.values()
    task = task_factory(rec, prefs)(job)
    be = LocalBackend(root=tmp / "jobs")
    t0 = time.time()
    handle = be.launch(task, name)
    seen: dict[str, float] = {}
    log = tmp / "jobs" / handle / "log"
    while not (tmp / "jobs" / handle / "rc").exists():
        text = log.read_text(errors="replace")
        for mark in ("[meetara local] run", ": domain 1/", ": step 1/"):
            if mark in text and mark not in seen:
                seen[mark] = time.time() - t0
        time.sleep(0.05)
    st = be.wait(handle)
    end = time.time() - t0
    return {
        "load_at_plan": round(load, 2),
        "load_at_end": round(os.getloadavg()[0], 2),
        "slowdown_planned": round(local_slowdown(), 3),
        "exit_code": st.exit_code,
        "to_run_phase_s": round(seen.get("[meetara local] run", -1), 2),
        "to_first_step_s": round(seen.get(": step 1/", -1), 2),
        "first_step_to_end_s": round(end - seen.get(": step 1/", end), 2),
        "machine_s": round((st.ended_at - st.started_at).total_seconds(), 2),
        "planned_s": round(plan.jobs[0].hours * 3600, 1),
        "planned_idle_s": round(plan.jobs[0].hours * 3600 / local_slowdown(), 1),
        "reserved_s": round(plan.jobs[0].hours * 3600 * RESERVE_MARGIN, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--busy", default="0,3", help="comma-separated numbers of busy processes")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--settle-s", type=float, default=40.0, help="wait after starting the load")
    ap.add_argument("--out", default=str(ROOT / "bench" / "local_startup.json"))
    args = ap.parse_args()
    os.environ.pop("MEETARA_LOCAL_STARTUP_S", None)
    os.environ.pop("MEETARA_LOCAL_TOKENS_S", None)
    results = []
    with tempfile.TemporaryDirectory(prefix="local-startup-") as d:
        tmp = Path(d)
        os.environ.setdefault("MEETARA_CACHE", str(tmp / "cache"))
        os.environ["MEETARA_STATE_DIR"] = str(tmp / "state")
        # the first job builds the tiny base model into the cache (the planner adds TINY_BUILD_S for it)
        first = one_job(tmp, "first")
        first["busy"] = 0
        first["built_tiny"] = True
        results.append(first)
        print(json.dumps(first), flush=True)
        for n in [int(x) for x in args.busy.split(",")]:
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
            try:
                if n:
                    time.sleep(args.settle_s)  # the load average follows the load over a minute
                for k in range(args.reps):
                    r = one_job(tmp, f"b{n}-{k}")
                    r["busy"] = n
                    results.append(r)
                    print(json.dumps(r), flush=True)
            finally:
                for p in busy:
                    p.kill()
                    p.wait()
    out = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "jobs": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
