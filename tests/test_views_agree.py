"""Every view of a run's money and progress agrees with the ledger and the store (issue 27, item 2):
`status` (and through api.job_rows the dashboard and the MCP job rows) takes cost and machine time
from the ledger, a run planned anew by `recover` keeps its earlier launches, an unwatched budget stop
reads as one, and `report` counts the domains the store holds, whatever ended the job that made them.
Real launches through the CLI, the real SQLite ledger, real local jobs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from conftest import local_env, run_cli
from test_local_backend import wait_for

from budgets.caps import BudgetConfig
from budgets.ledger import Ledger
from launcher.backends.local import LocalBackend

RATE_H = 36.0  # $0.01 a second


def meetara(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(*args, module="launcher", cwd=cwd, env=env)


def status(run: str, env: dict, cwd: Path) -> list[dict]:
    r = meetara("status", run, "--json", env=env, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def ledger_job(ledger: Ledger, run: str, job: str) -> tuple[float, float]:
    """(dollars, machine seconds) the ledger holds for a job, from its accrual rows."""
    rows = [e for e in ledger.entries() if e.run_id == run and e.job == job]
    return sum(e.amount for e in rows), sum(e.seconds or 0 for e in rows)


def background_launch(tmp_path: Path, env: dict, run: str, domains: str) -> subprocess.Popen:
    args = ["launch", "-d", domains, "--budget", "50", "--yes", "--run-id", run, "--poll", "0.2"]
    args += ["--models-dir", str(tmp_path / "models")]
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_an_unwatched_budget_stop_and_its_recover_read_as_the_ledger_says(tmp_path):
    import os

    env = {**os.environ, **local_env(tmp_path, RATE_H)}
    # an optimistic estimate: the reservation runs out before the job is done, with nobody watching
    env.update(MEETARA_LOCAL_TOKENS_S="1e9", MEETARA_LOCAL_STARTUP_S="4")
    launcher = background_launch(tmp_path, env, "alone", "nutrition,legal")
    record = tmp_path / "state" / "runs" / "alone.json"

    def launched():
        if not record.exists():
            return None
        (job,) = json.loads(record.read_text())["jobs"].values()
        return job if job["handle"] else None

    job = wait_for(launched, timeout=120, what="the job to be launched")
    launcher.send_signal(signal.SIGKILL)  # the launcher's machine crashes; the job runs on, alone
    launcher.wait()
    backend = LocalBackend(root=tmp_path / "state" / "local-jobs")
    st = wait_for(
        lambda: (s := backend.status(job["handle"])).state.finished and s, timeout=120, what="the job to stop"
    )
    assert st.exit_code == 77, backend.logs(job["handle"])
    ran = (st.ended_at - st.started_at).total_seconds()

    # nobody settled it yet: status still reads it as the budget stop it was, billed for what it ran
    (row,) = status("alone", env, tmp_path)
    assert row["state"] == "STOPPED-BUDGET"
    assert abs(row["machine_seconds"] - ran) <= 0.1
    assert abs(row["cost_so_far"] - ran * RATE_H / 3600) <= 1e-6 + 0.1 * RATE_H / 3600

    env.pop("MEETARA_LOCAL_TOKENS_S")
    env["MEETARA_LOCAL_STARTUP_S"] = "600"
    again = meetara("recover", "alone", "--budget", "20", "--yes", "--poll", "0.2", env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]

    ledger = Ledger(tmp_path / "ledger.sqlite")
    (row,) = status("alone", env, tmp_path)
    dollars, seconds = ledger_job(ledger, "alone", row["job"])
    assert len(ledger.reservations("alone")) == 2 and dollars > ran * RATE_H / 3600
    # the run planned anew keeps the unwatched launch: both launches, both paid for
    assert row["launches"] == 2 and row["state"] == "SUCCEEDED"
    assert abs(row["cost_so_far"] - dollars) <= 1e-6
    assert abs(row["machine_seconds"] - seconds) <= 0.1
    detail = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import json,launcher.api as a; print(a.run_detail('alone').model_dump_json())",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert abs(detail["cost_so_far"] - dollars) <= 1e-6
    assert sum(e["kind"] == "launched" for e in detail["timeline"]) == 2


def test_domains_a_cancelled_job_finished_count_in_the_report(tmp_path):
    import os

    env = {**os.environ, **local_env(tmp_path, RATE_H)}
    launcher = background_launch(tmp_path, env, "cut", "nutrition,legal,fitness")
    first = tmp_path / "store" / "runs" / "cut" / "domains" / "nutrition" / "manifest.json"
    wait_for(lambda: first.exists(), timeout=300, what="the first domain to finish")
    r = meetara("cancel", "cut", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    launcher.wait(timeout=120)
    done = {p.parent.name for p in (tmp_path / "store" / "runs" / "cut" / "domains").glob("*/manifest.json")}
    assert "nutrition" in done and len(done) < 3

    def report() -> dict:
        r = meetara("report", "--by", "provider", "--json", env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        (row,) = json.loads(r.stdout)["rows"]
        return row

    row = report()
    assert row["domains_done"] == len(done)  # the cancelled job's finished domains count
    assert abs(row["dollars_per_domain"] - row["cost"] / len(done)) <= 1e-6

    again = meetara("recover", "cut", "--budget", "20", "--yes", "--poll", "0.2", env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    row = report()
    assert row["domains_done"] == 3  # each once: the first launch's and the recover's
    ledger = Ledger(tmp_path / "ledger.sqlite")
    rows = status("cut", env, tmp_path)
    assert sum(r["domains_done"] for r in rows) == 3
    assert abs(sum(r["cost_so_far"] for r in rows) - sum(e.amount for e in ledger.entries())) <= 1e-6
    assert abs(row["cost"] - sum(e.amount for e in ledger.entries())) <= 1e-6


def test_a_recovered_job_launches_on_the_reservation_made_for_it(tmp_path, monkeypatch):
    """`recover`'s record keeps a job's earlier launches (launch.carry_over), so its first launch has
    launches > 0: it is no relaunch, and the reservation made for it is kept (it was replaced by a
    third one whenever the plan's hours rounded up past its cost: the ledger then held 3)."""
    from launcher.launch import new_run
    from launcher.money import RESERVE_MARGIN, Money
    from launcher.plan import Workload, plan_local
    from launcher.preferences import Preferences

    monkeypatch.setenv("MEETARA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MEETARA_LOCAL_TOKENS_S", "1e4")  # no load in the figures: the same plan each time
    prefs = Preferences(local_price_hour=RATE_H)
    for tenth in range(6000, 6100):  # a start-up whose job's hours round up at the plan's 4 digits
        monkeypatch.setenv("MEETARA_LOCAL_STARTUP_S", str(tenth / 10))
        plan = plan_local(["legal"], prefs, Workload(), "again")
        (pj,) = plan.jobs
        if round(pj.hours * RATE_H * RESERVE_MARGIN, 6) > round(pj.cost * RESERVE_MARGIN, 6):
            break
    else:
        raise AssertionError("no start-up in the range rounds up")
    ledger = Ledger(tmp_path / "ledger.sqlite", config=BudgetConfig(daily=100, weekly=100, monthly=100))
    rec = new_run(plan, store=f"file://{tmp_path}/store", endpoint_url=None, models_dir=tmp_path, budget=20)
    money = Money(ledger, rec, LocalBackend(root=tmp_path / "jobs"), poll_s=0.2)
    money.reserve_plan()
    (job,) = rec.jobs.values()
    made = job.reservation_id
    job.launches = 1  # what carry_over keeps of the unwatched launch
    money.before_launch(job)
    assert job.state == "planned" and job.reservation_id == made and job.stop_hard_at is not None
    (res,) = ledger.reservations("again")
    assert res.state == "open" and res.amount == round(pj.cost * RESERVE_MARGIN, 6)
