"""Runs one local job: the task's `setup`, then its `run`, in bash, with the task's envs.

Started by the local backend in a session of its own, so the backend can signal the whole job as one
process group. It records the exit code in `rc` (written atomically) when the job ends; a job whose
runner vanished without an `rc` was killed from outside, which the backend reports as a preemption.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

EXIT_BUDGET = 77  # train.cli's: the job stopped at its budget reservation's end


def main(job_dir: str) -> int:
    from budgets import write_private
    from launcher.backends.local import write_meta

    d = Path(job_dir)
    write_meta(d, os.getpid())  # if the launcher died before writing it, the job is still found
    task = yaml.safe_load((d / "task.yaml").read_text())
    env = {**os.environ, **{k: str(v) for k, v in (task.get("envs") or {}).items() if v is not None}}
    # SIGTERM goes to the whole group: the training process checkpoints and exits 75; the runner
    # stays to record that exit code
    # (a handler, not SIG_IGN: an ignored signal would stay ignored in the children)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    # the reservation's end (MEETARA_STOP_HARD_AT, from the launcher): the job is ended then whatever
    # it does, so it never runs past the money reserved for it (python -m train stops itself earlier)
    hard = env.get("MEETARA_STOP_HARD_AT")
    hard_at = float(hard) if hard else None
    rc = 0
    for phase in ("setup", "run"):
        script = task.get(phase)
        if not script:
            continue
        print(f"[meetara local] {phase}", flush=True)
        proc = subprocess.Popen(["bash", "-c", script], env=env, cwd=task.get("workdir") or None)
        try:
            rc = proc.wait(None if hard_at is None else max(hard_at - time.time(), 0.0))
        except subprocess.TimeoutExpired:
            print("[meetara local] stopped: budget (the job's reservation ends now)", flush=True)
            # the exit code first (the budget stop's, 77): the backend reads this job as stopped at its
            # reservation's end, not as vanished; then the whole process group, this runner included
            write_private(d / "rc", str(EXIT_BUDGET))
            os.killpg(os.getpgrp(), signal.SIGKILL)
        if rc != 0:
            break
    write_private(d / "rc", str(rc))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
