"""Budgets in a launch: the ledger refuses, the watchdog stops a running job at a cap (controllable
clock), the in-job guard stops a job whose launcher died, and the next launch settles what was open."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from conftest import run_cli
from test_local_backend import wait_for

from budgets.caps import BudgetConfig
from budgets.ledger import Ledger
from launcher.backends.base import JobState
from launcher.backends.local import LocalBackend
from launcher.conductor import Hooks
from launcher.launch import Prepared, conductor_for, new_run
from launcher.money import RESERVE_MARGIN, Money
from launcher.plan import Workload, plan_local
from launcher.preferences import Preferences
from train.store import open_store


def meetara(*args, cwd, env):
    return run_cli(*args, module="launcher", cwd=cwd, env=env)


def test_a_reservation_over_a_cap_is_refused_and_nothing_runs(tmp_path):
    env = {
        "MEETARA_STORE": f"file://{tmp_path}/store",
        "MEETARA_LEDGER_URL": str(tmp_path / "ledger.sqlite"),
        "MEETARA_LOCAL_PRICE_HOUR": "10",
        "MEETARA_DAILY_CAP": "0.01",
        "MEETARA_STATE_DIR": str(tmp_path / "state"),
    }
    r = meetara(
        "launch", "-d", "legal", "--budget", "5", "--yes", "--run-id", "capped", cwd=tmp_path, env=env
    )
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and lines[-1].startswith("error: refused: daily cap $0.01 would be passed")
    assert "spent $0.00 + reserved $0.00 + asked $" in lines[-1]
    assert not (tmp_path / "state" / "local-jobs").exists()  # nothing was launched
    assert not (tmp_path / "state" / "runs" / "capped.json").exists()
    assert Ledger(tmp_path / "ledger.sqlite").reservations() == []


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def test_the_watchdog_stops_a_running_job_at_the_daily_cap(tmp_path):
    cap, poll = 5.0, 1.0  # $ per day; seconds of the controllable clock per poll
    ledger = Ledger(tmp_path / "ledger.sqlite", config=BudgetConfig(daily=cap, weekly=None, monthly=None))
    # another run holds $2 and will be billed $3.50 while ours runs (more than it reserved)
    other = ledger.reserve(
        "other", "j", 2.0, provider="vast", gpu="RTX4090", rate_per_hour=1, rate_source="live"
    )
    plan = plan_local(["legal"], Preferences(), Workload(), "wd")
    price = 2.0 / RESERVE_MARGIN / plan.jobs[0].hours  # so that our reservation is $2.00
    plan = plan_local(["legal"], Preferences(local_price_hour=price), Workload(), "wd")
    rate = price / 3600  # $ per second
    backend = LocalBackend(root=tmp_path / "jobs")
    prep = Prepared(
        ["legal"], f"file://{tmp_path}/store", open_store(f"file://{tmp_path}/store"), backend, ledger
    )
    prep.plan = plan
    rec = new_run(plan, store=prep.store_url, endpoint_url=None, models_dir=tmp_path / "models", budget=None)
    Money(ledger, rec, backend, poll_s=poll).reserve_plan()
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
        "time.sleep(600)\n"  # the workload: runs until stopped
    )
    clock, ticks = Clock(), []

    def tick(r) -> None:  # every poll is one second on the controllable clock
        clock.now += timedelta(seconds=poll)
        ticks.append(clock.now)
        if len(ticks) == 5:
            ledger.settle(other, actual=3.5)

    conductor = conductor_for(rec, prep, Preferences(), poll=poll, clock=clock, hooks=Hooks())
    conductor.task_for = lambda job: {"run": f"python -c {shlex.quote(code)}"}
    conductor.poll_s = 0.02  # real seconds between polls
    money_after = conductor.hooks.after_poll
    conductor.hooks.after_poll = lambda r: (tick(r), money_after(r))
    conductor.run()

    (job,) = rec.jobs.values()
    assert job.state == "STOPPED-BUDGET", job.history
    assert backend.status(job.handle).state is JobState.CANCELLED  # it got SIGTERM and checkpointed
    res = ledger.reservation(job.reservation_id)
    assert res.state == "settled" and res.note.startswith("stopped: budget: daily cap $5.00")
    spent = ledger.spent("daily", now=clock.now)
    # stopped before the cap, at most one poll's cost short of it; never past it by more than a poll
    assert cap - 2 * rate * poll <= spent <= cap + rate * poll
    assert res.accrued < res.amount  # it was the cap, not its own reservation, that stopped it


def test_a_job_whose_launcher_died_stops_itself_and_the_next_launch_settles(tmp_path):
    rate_h = 36.0  # $0.01 a second
    env = {
        **os.environ,
        "MEETARA_STORE": f"file://{tmp_path}/store",
        "MEETARA_LEDGER_URL": str(tmp_path / "ledger.sqlite"),
        "MEETARA_STATE_DIR": str(tmp_path / "state"),
        "MEETARA_LOCAL_PRICE_HOUR": str(rate_h),
        # an optimistic estimate (a machine calibrated as very fast): the reservation runs out mid-job
        "MEETARA_LOCAL_TOKENS_S": "1e9",
        "MEETARA_LOCAL_STARTUP_S": "4",
    }
    args = ["launch", "-d", "nutrition,legal,fitness", "--budget", "1", "--yes", "--samples", "80"]
    args += ["--run-id", "alone", "--poll", "0.2"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launcher", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    record = tmp_path / "state" / "runs" / "alone.json"

    def launched():
        if not record.exists():
            return None
        (job,) = json.loads(record.read_text())["jobs"].values()
        return job if job["handle"] else None

    job = wait_for(launched, timeout=60, what="the job to be launched")
    launcher.send_signal(signal.SIGKILL)  # the launcher's machine crashes; the job runs on, alone
    launcher.wait()

    backend = LocalBackend(root=tmp_path / "state" / "local-jobs")
    st = wait_for(
        lambda: (s := backend.status(job["handle"])).state.finished and s, timeout=120, what="the job to stop"
    )
    assert st.exit_code == 77, backend.logs(job["handle"])  # stopped itself: budget
    ledger = Ledger(tmp_path / "ledger.sqlite")
    (res,) = ledger.reservations("alone")
    assert res.state == "open"  # nobody was there to settle it
    ran = (st.ended_at - st.started_at).total_seconds()
    assert ran * rate_h / 3600 <= res.amount  # it stopped within what was reserved for it

    # `meetara recover` lists the run; recovering it (a realistic estimate now) settles the open
    # reservation, then finishes the work from the checkpoints
    env.pop("MEETARA_LOCAL_TOKENS_S")
    # a generous start-up allowance (300 s = $3 here) so a busy CI machine cannot run out of this
    # reservation too; the budget and calendar caps are raised to make room for it
    env["MEETARA_LOCAL_STARTUP_S"] = "300"
    env.update({"MEETARA_DAILY_CAP": "100", "MEETARA_WEEKLY_CAP": "100", "MEETARA_MONTHLY_CAP": "100"})
    listed = subprocess.run(
        [sys.executable, "-m", "launcher", "recover"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0 and "alone" in listed.stderr, listed.stderr
    assert "3: nutrition, legal, fitness" in listed.stderr
    again = subprocess.run(
        [sys.executable, "-m", "launcher", "recover", "alone", "--budget", "10", "--yes", "--poll", "0.2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "settled 1 reservation(s) an earlier launcher left open" in again.stderr
    first, second = sorted(ledger.reservations("alone"), key=lambda r: r.id)
    assert first.state == "settled" and first.note == "stopped: budget (in-job guard)"
    assert abs(first.accrued - ran * rate_h / 3600) < 1e-6
    assert second.state == "settled" and second.accrued <= second.amount
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "base",
        "fitness",
        "legal",
        "nutrition",
    ]


def _spend(ledger_path, amount: float) -> None:
    with Ledger(ledger_path, config=BudgetConfig(daily=None, weekly=None, monthly=None)) as led:
        rid = led.reserve(
            "earlier", "j", amount, provider="vast", gpu="RTX3090", rate_per_hour=1, rate_source="billed"
        )
        led.settle(rid, actual=amount)


def test_a_cap_below_what_is_spent_refuses_and_keeps_every_row(tmp_path):
    ledger_path = tmp_path / "ledger.sqlite"
    _spend(ledger_path, 3.0)
    env = {
        "MEETARA_STORE": f"file://{tmp_path}/store",
        "MEETARA_LEDGER_URL": str(ledger_path),
        "MEETARA_LOCAL_PRICE_HOUR": "1",
        "MEETARA_DAILY_CAP": "2",  # lowered below today's $3 spend
    }
    r = meetara("launch", "-d", "legal", "--budget", "5", "--yes", cwd=tmp_path, env=env)
    last = [x for x in r.stderr.splitlines() if x.strip()][-1]
    assert r.returncode == 2 and last.startswith(
        "error: refused: daily cap $2.00 would be passed: spent $3.00"
    )
    (res,) = Ledger(ledger_path).reservations()
    assert (res.run_id, res.state, res.accrued) == ("earlier", "settled", 3.0)


def test_a_corrupt_ledger_is_one_line_and_left_as_it_was(tmp_path):
    ledger_path = tmp_path / "ledger.sqlite"
    ledger_path.write_bytes(b"this is not a database" * 100)
    before = ledger_path.read_bytes()
    env = {"MEETARA_STORE": f"file://{tmp_path}/store", "MEETARA_LEDGER_URL": str(ledger_path)}
    for args in (["launch", "-d", "legal", "--budget", "5"], ["budget"], ["report", "--by", "provider"]):
        r = meetara(*args, cwd=tmp_path, env=env)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and str(ledger_path) in lines[0], (args, r.stderr)
    assert ledger_path.read_bytes() == before


@pytest.mark.parametrize("left_s, launched", [(1.0, False), (10.0, True), (30.0, True)])
def test_a_launch_gets_a_deadline_it_can_stop_by(tmp_path, monkeypatch, left_s, launched):
    """The in-job deadline leaves at least STOP_MARGIN_MIN_S to stop in (the step in progress, its
    checkpoint, the exit); a reservation with less money left than that is not launched at all."""
    from launcher.money import STOP_MARGIN, STOP_MARGIN_MIN_S

    monkeypatch.setenv("MEETARA_STATE_DIR", str(tmp_path / "state"))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    plan = plan_local(["legal"], Preferences(local_price_hour=36.0), Workload(), "dl")
    rec = new_run(plan, store=f"file://{tmp_path}/store", endpoint_url=None, models_dir=tmp_path, budget=None)
    money = Money(ledger, rec, backend=None, poll_s=1)
    money.reserve_plan()
    (job,) = rec.jobs.values()
    res = ledger.reservation(job.reservation_id)
    seconds = res.amount / res.rate_per_hour * 3600
    assert seconds > left_s  # the reservation (about 44 s of the tiny job here) has that much to spend
    t0 = datetime.now(UTC) - timedelta(seconds=seconds - left_s)
    ledger.start(job.reservation_id, t0)
    ledger.accrue_until(job.reservation_id, datetime.now(UTC))  # all but left_s of it is spent
    before = datetime.now(UTC).timestamp()
    money.before_launch(job)
    if launched:
        margin = max(left_s * STOP_MARGIN, STOP_MARGIN_MIN_S)
        assert job.stop_at == pytest.approx(before + left_s - margin, abs=0.5)
    else:
        assert job.stop_at is None and job.state == "STOPPED-BUDGET"
        assert ledger.reservation(job.reservation_id).state == "settled"
