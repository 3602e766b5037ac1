"""Background runs: a detached follower process owns a launched run until it ends.

`meetara launch --detach`, `meetara recover --detach`, the MCP `launch` tool and the dashboard start a
run without waiting for it: the caller plans and reserves under the run's lease (so a refusal comes
back at once), then `start` hands the run over to a follower (`python -m launcher.background`) in
its own session, which outlives the caller (a closed terminal, an MCP client that timed out, a
stopped dashboard). The follower takes over the caller's lease (same token, its own pid), follows the
jobs as `meetara launch` does in the foreground (relaunching after preemptions, accruing and settling
money), pulls every validated domain into the run's models folder, records how it ended in the run
record (`RunRecord.follower`), and releases the lease.

If the follower dies before it takes the lease over, the lease expires with the caller (or `ttl_s`
after the caller stopped renewing it) and `meetara recover RUN` adopts the run as after any crash.
SIGTERM (e.g. `kill PID`) stops it as Ctrl-C stops a foreground launch: the jobs checkpoint and are
cancelled, their money settled.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "MEETARA_LEASE_TOKEN"  # the lease token handed to the follower (never logged)


@dataclass(frozen=True)
class Follower:
    pid: int
    log: Path


def log_path(run_id: str) -> Path:
    from launcher.runs import runs_dir

    return runs_dir() / f"{run_id}.follower.log"


def start(prep, rec, *, poll: float, config: Path | None = None, chaos=None) -> Follower:
    """Hand the committed run `rec` (whose lease `prep` holds) over to a detached follower process.
    The caller's lease stops being renewed here and is not released: the follower takes it over."""
    from budgets import private_dir

    log = log_path(rec.run_id)
    private_dir(log.parent)
    cmd = [sys.executable, "-m", "launcher.background", rec.run_id, "--poll", str(poll)]
    if config is not None:
        cmd += ["--config", str(Path(config).resolve())]
    if chaos is not None:
        cmd += ["--preempt-every", str(chaos.every_s), "--preempt-seed", str(chaos.seed)]
        cmd += ["--preempt-max", str(chaos.max_kills)]
    env = {**os.environ, TOKEN_ENV: prep.owner}
    with open(log, "ab") as out:
        os.chmod(log, 0o600)
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path.cwd(),
            start_new_session=True,  # not in the caller's process group: Ctrl-C there does not reach it
        )
    _await_handover(prep, rec, proc, log)
    prep.hand_over()  # the follower holds the lease now: stop renewing it here, never release it
    return Follower(proc.pid, log)


HANDOVER_S = 30.0  # the follower takes the lease over within this, or the launch is called off


def _await_handover(prep, rec, proc: subprocess.Popen, log: Path) -> None:
    """Wait until the follower holds the run's lease and has put itself on the run's record (after
    which only it writes the record). If it exits (or hangs) first, nothing was launched: release the
    run's reservations and raise BackendError."""
    import time

    from launcher.backends.base import BackendError
    from launcher.money import settle_stale
    from launcher.runs import load_run

    until = time.monotonic() + HANDOVER_S
    while True:
        on_record = (load_run(rec.run_id) or rec).follower or {}
        if on_record.get("pid") == proc.pid:
            return
        if proc.poll() is not None or time.monotonic() > until:
            break
        time.sleep(0.05)  # polling the run record: the follower is another process
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    released = settle_stale(prep.ledger, rec.run_id, prep.backend, rec, owner=prep.owner)
    rec.save()
    last = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    raise BackendError(
        f"the background follower did not take run {rec.run_id} over (exit code {proc.returncode}"
        + (f": {last[0][:200]}" if last else "")
        + f"); nothing was launched and {len(released)} reservation(s) released; its log: {log}"
    )


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def follow_detached(run_id: str, *, poll: float, config: Path | None, chaos=None) -> int:
    """The follower's body: take the lease over, follow the run to its end, pull, record the outcome.
    Returns the exit code `meetara launch` would have returned in the foreground."""
    from budgets.lease import Holder, Owner, RunOwned
    from budgets.query import open_ledger
    from launcher.crash import crash_point

    crash_point("follower")
    token = os.environ.pop(TOKEN_ENV, None)
    ledger = open_ledger(config)
    try:  # first of all: the caller waits for this (and calls the launch off if it does not come)
        holder = Holder(ledger, run_id, owner=Owner(token=token) if token else None).acquire()
    except RunOwned as e:
        print(f"error: {e}", flush=True)
        return 3  # launch.EXIT_OWNED
    from launcher.launch import Prepared, follow, make_backend
    from launcher.preferences import load_preferences
    from launcher.pull import pull
    from launcher.runs import load_run
    from train.store import open_store

    rec = load_run(run_id)
    if rec is None:
        holder.release()
        print(f"error: no run {run_id!r} on this machine", flush=True)
        return 2
    prefs = load_preferences(config)
    rec.follower = {"pid": os.getpid(), "log": str(log_path(run_id)), "state": "following"}
    rec.save()  # the caller waits for this: from here on only this process writes the record
    store = open_store(rec.store, endpoint_url=rec.endpoint_url)
    names = [d for j in rec.jobs.values() for d in j.domains]
    prep = Prepared(names, rec.store, store, make_backend(rec.backend), ledger, lease=holder, rec=rec)
    signal.signal(signal.SIGTERM, _stop)
    with prep:
        print(f"following run {run_id} (pid {os.getpid()})", flush=True)
        outcome = follow(rec, prep, prefs, poll=poll, chaos=chaos)
        results = pull(store, run_id, names, Path(rec.models_dir))
        here = sum(r.status in ("pulled", "up-to-date") for r in results)
        for r in results:
            print(f"{r.domain}: {r.status} {r.detail}".rstrip(), flush=True)
        rec.follower = (rec.follower or {}) | {
            "state": "ended",
            "exit_code": outcome.code,
            "message": outcome.message,
            "domains_here": here,
        }
        rec.save()
    print(f"ended: exit {outcome.code}" + (f": {outcome.message}" if outcome.message else ""), flush=True)
    return outcome.code


def main(argv: list[str] | None = None) -> int:
    from launcher.conductor import Chaos

    p = argparse.ArgumentParser(prog="python -m launcher.background", description=__doc__.split("\n")[0])
    p.add_argument("run_id")
    p.add_argument("--poll", type=float, default=2.0)
    p.add_argument("--config", type=Path)
    p.add_argument("--preempt-every", type=float)
    p.add_argument("--preempt-seed", type=int, default=0)
    p.add_argument("--preempt-max", type=int, default=3)
    a = p.parse_args(argv)
    chaos = Chaos(a.preempt_every, a.preempt_seed, a.preempt_max) if a.preempt_every else None
    return follow_detached(a.run_id, poll=a.poll, config=a.config, chaos=chaos)


if __name__ == "__main__":
    sys.exit(main())
