"""torch's CPU threads on a loaded machine (issue 27, item 3; bench/RESULTS.md, "Local jobs under load").

    python bench/cpu_threads.py --busy 3        # ~1 min

Training steps per second of a small MLP (8 x 256x256 linear layers, batch 64: the tiny model's
shape of work) for 8 s each with 1 and 2 intra-op threads, OpenMP's default (spinning) wait and
OMP_WAIT_POLICY=PASSIVE, beside `--busy` busy-looping processes. Each case runs in its own process
(OpenMP reads its settings once). Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASE = """
import os, time, torch
torch.set_num_threads(int(os.environ["THREADS"]))
torch.manual_seed(0)
m = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
x = torch.randn(64, 256)
opt = torch.optim.SGD(m.parameters(), lr=1e-3)
t, k = time.time(), 0
while time.time() - t < 8:
    opt.zero_grad(); m(x).sum().backward(); opt.step(); k += 1
print(round(k / (time.time() - t), 1), round(os.getloadavg()[0], 2))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--busy", type=int, default=3)
    args = ap.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        for threads, wait in ((1, None), (2, None), (2, "PASSIVE")):
            env = {**os.environ, "THREADS": str(threads)}
            env.pop("OMP_WAIT_POLICY", None)
            if wait:
                env["OMP_WAIT_POLICY"] = wait
            out = subprocess.run([sys.executable, "-c", CASE], env=env, capture_output=True, text=True)
            rate, load = out.stdout.split()
            case = {"busy": args.busy, "threads": threads, "wait": wait or "default", "load": float(load)}
            print(json.dumps({**case, "steps_per_s": float(rate)}), flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
