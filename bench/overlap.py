"""Job wall time with and without finishing each domain beside the next one's training (`--overlap`).

Runs `python -m train` for 8 domains at the real shape (`random:microsoft/DialoGPT-medium`, offline)
into a fresh file store, once with `--no-overlap` and once with `--overlap`, alternately `--reps`
times, and records per run: wall seconds of the process, seconds of the domain loop (`domains_seconds`
in the job's summary: training plus finishing, the part overlap can shorten), the per-domain schedule
(when each domain trained and was finished), peak RSS, and the machine's load before and after.

On a CPU both halves compete for the same cores (training uses them all), so this measures what
overlap costs there; on a GPU machine training leaves the CPU to the finishing, which is where it pays.

    python bench/overlap.py                  # writes bench/overlap.json (about 6 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = "nutrition,fitness,sleep,parenting,shopping,planning,marketing,sales"
REAL = "random:microsoft/DialoGPT-medium"


def run(mode: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="meetara-overlap-") as tmp:
        cmd = [sys.executable, "-m", "train", "-d", args.domains, "--base-model", args.base_model]
        cmd += ["--samples", str(args.samples), "--epochs", str(args.epochs), f"--{mode}", "-q"]
        cmd += ["--store", f"file://{tmp}/store", "--run-id", "bench"]
        load = os.getloadavg()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        r = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "MEETARA_STATE_DIR": tmp}
        )
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if r.returncode != 0:
            raise SystemExit(f"{mode}: exit {r.returncode}\n{r.stderr[-3000:]}")
        summary = json.loads(r.stdout)
    return {
        "mode": mode,
        "wall_s": round(wall, 2),
        "domains_s": summary["domains_seconds"],
        "overlap": summary["overlap"],
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
        "peak_rss_mb": round(after.ru_maxrss / 1024),
        "done": summary["counts"]["done"],
        "load_before": [round(x, 2) for x in load],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "schedule": summary["schedule"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", default=DOMAINS)
    p.add_argument("--base-model", default=REAL)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--epochs", type=float, default=0.25)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "overlap.json"))
    args = p.parse_args()
    runs = []
    for _ in range(args.reps):
        for mode in ("no-overlap", "overlap"):
            runs.append(run(mode, args))
            print(f"{mode}: wall {runs[-1]['wall_s']} s, domains {runs[-1]['domains_s']} s", flush=True)
    out = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} vCPUs",
        "settings": vars(args),
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
