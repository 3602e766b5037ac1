"""Background runs (`launch --detach`, launcher/background.py): the launcher returns once the money is
reserved, a detached follower takes the run's lease over, follows the jobs, pulls and settles; while it
follows, no other launcher can take the run; a follower that dies before taking over calls the
launch off with its money released."""

from __future__ import annotations

import json
import time
from pathlib import Path

from conftest import local_env, run_cli

from budgets.ledger import Ledger

RATE_H = 10.0  # $/h of the local machine: reservations are real money amounts


def meetara(*args: str, tmp_path: Path, **env: str):
    return run_cli(
        *args, env=local_env(tmp_path, RATE_H, **env), cwd=tmp_path, module="launcher", timeout=300
    )


def record(tmp_path: Path, run_id: str) -> dict:
    return json.loads((tmp_path / "state" / "runs" / f"{run_id}.json").read_text())


def until_ended(tmp_path: Path, run_id: str, timeout_s: float = 300) -> dict:
    """Poll the run record (written by the follower, another process) until the follower recorded its
    end; returns the follower's entry."""
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        follower = record(tmp_path, run_id).get("follower") or {}
        if follower.get("state") == "ended":
            return follower
        time.sleep(0.5)  # polling another process's file
    log = tmp_path / "state" / "runs" / f"{run_id}.follower.log"
    raise AssertionError(f"the follower did not end in {timeout_s} s:\n{log.read_text()[-3000:]}")


LAUNCH = ("launch", "-d", "nutrition,legal", "--backend", "local", "--samples", "16", "--epochs", "0.1")


def test_detach_returns_at_once_and_the_follower_owns_the_run_to_its_end(tmp_path):
    t0 = time.monotonic()
    r = meetara(*LAUNCH, "--budget", "5", "--yes", "--detach", "--run-id", "bg", tmp_path=tmp_path)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "bg"
    follower = record(tmp_path, "bg")["follower"]
    assert (
        follower["state"] == "following"
        and f"followed in the background by pid {follower['pid']}" in r.stderr
    )

    # while it follows, the run is the follower's: a second launcher is refused, names it, does nothing
    again = meetara(*LAUNCH, "--budget", "5", "--yes", "--run-id", "bg", tmp_path=tmp_path)
    ended = until_ended(tmp_path, "bg")
    assert again.returncode == 3, again.stderr[-2000:]
    assert f"followed by another launcher (pid {follower['pid']}" in again.stderr

    assert (ended["exit_code"], ended["domains_here"]) == (0, 2), ended
    for d in ("nutrition", "legal"):
        manifest = json.loads((tmp_path / "models" / d / "manifest.json").read_text())
        assert manifest["validation"]["passed"]
    rec = record(tmp_path, "bg")
    assert [j["state"] for j in rec["jobs"].values()] == ["SUCCEEDED"]
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.open_reservations() == []  # settled by the follower
        assert ledger.lease("bg") is None  # released at the end
        [res] = ledger.reservations(run_id="bg")
        assert res.state == "settled" and 0 < res.settled_amount < res.amount
    assert took < 60, took  # returned long before the run ended (which took training and validation)
    status = meetara("status", "bg", "--json", tmp_path=tmp_path)
    assert [j["state"] for j in json.loads(status.stdout)] == ["SUCCEEDED"]


def test_a_follower_that_dies_before_taking_over_calls_the_launch_off(tmp_path):
    r = meetara(
        *LAUNCH,
        "--budget",
        "5",
        "--yes",
        "--detach",
        "--run-id",
        "dead",
        tmp_path=tmp_path,
        MEETARA_CRASH_AT="follower",
    )
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the background follower did not take run dead over (exit code -9")
    assert "nothing was launched and 1 reservation(s) released" in last and "Traceback" not in r.stderr
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.open_reservations() == []
        [res] = ledger.reservations(run_id="dead")
        assert res.state == "released" and (res.settled_amount or 0) == 0
        assert ledger.lease("dead") is None
    assert [j["state"] for j in record(tmp_path, "dead")["jobs"].values()] == ["planned"]
    assert not (tmp_path / "store" / "runs" / "dead").exists()  # no job ever ran


def test_a_follower_that_loses_its_postgresql_ledger_stops_the_jobs_and_ends_in_one_line(tmp_path):
    """The shared ledger goes away while the follower follows (PostgreSQL stopped): it cannot record
    money any more, so it stops the jobs (they checkpoint), records how it ended and says why in one
    line; the money is left to `recover` (the reservation bounds it). Before: a LedgerError traceback
    and a run record that still said "following"."""
    import psycopg
    from pg import pg_server

    with pg_server() as server:
        with psycopg.connect(server, autocommit=True) as con:
            con.execute("CREATE DATABASE lost")
        url = server.rsplit("/", 1)[0] + "/lost"
        slow = ("--samples", "64", "--epochs", "20")  # trains long enough to be running when it goes
        r = meetara(
            *LAUNCH[:-4], *slow, "--budget", "5", "--yes", "--detach", "--run-id", "pg", tmp_path=tmp_path,
            MEETARA_LEDGER_URL=url,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        until = time.monotonic() + 300
        while not any(j["state"] == "RUNNING" for j in record(tmp_path, "pg")["jobs"].values()):
            assert time.monotonic() < until, record(tmp_path, "pg")
            time.sleep(0.5)  # polling another process's file
    # the server is stopped (pg_ctl stop -m immediate): the follower's next ledger call fails
    ended = until_ended(tmp_path, "pg")
    log = (tmp_path / "state" / "runs" / "pg.follower.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert ended["exit_code"] == 1 and "ledger" in ended["message"], ended
    assert "meetara recover pg" in ended["message"] and "\n" not in ended["message"], ended
    rec = record(tmp_path, "pg")
    assert all(j["state"] not in ("RUNNING", "PENDING", "LAUNCHING") for j in rec["jobs"].values()), rec
