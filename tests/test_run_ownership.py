"""One owner per run (issue 12): the lease in the ledger, launchers racing for one run id, a launcher
killed at each point of its life and recovered, input refused before money moves, errors contained.

Everything runs for real: `meetara` subprocesses on the local backend (process groups), the SQLite
ledger file, a throwaway PostgreSQL server for the lease on a shared ledger."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import local_env
from pg import postgres_url  # noqa: F401
from test_ledger import url  # noqa: F401
from test_local_backend import wait_for

from budgets.caps import BudgetConfig, utcnow
from budgets.lease import Holder, LeaseLost, Owner, RunOwned
from budgets.ledger import Ledger
from launcher.backends.local import LocalBackend

RATE_H = 10.0  # $/h of the local machine in these tests
STEP_ONE = re.compile(r"^(\S+): step 1/\d+", re.M)


def _env(tmp_path: Path, **extra: str) -> dict:
    return {**os.environ, **local_env(tmp_path, RATE_H, **extra)}


def meetara(*args: str, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _jobs(tmp_path: Path) -> list[Path]:
    root = tmp_path / "state" / "local-jobs"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _log(job: Path) -> str:
    """A job's log; empty while the folder exists but the runner has not opened its log yet."""
    try:
        return (job / "log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _trainings(tmp_path: Path) -> dict[str, int]:
    """How many times each domain started training from scratch, over every local job's log."""
    counts: dict[str, int] = {}
    for d in _jobs(tmp_path):
        for domain in STEP_ONE.findall(_log(d)):
            counts[domain] = counts.get(domain, 0) + 1
    return counts


def _machine_cost(tmp_path: Path) -> float:
    """What the local jobs really ran, at the rate: from each job's start (meta) to its exit code."""
    backend = LocalBackend(root=tmp_path / "state" / "local-jobs")
    total = 0.0
    for d in _jobs(tmp_path):
        st = backend.status(d.name)
        assert st.state.finished, f"{d.name} still runs: an orphan"
        total += (st.ended_at - st.started_at).total_seconds() * RATE_H / 3600
    return total


def _check_money(tmp_path: Path, run_id: str) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    reservations = ledger.reservations(run_id)
    assert reservations and all(r.state != "open" for r in reservations), reservations
    assert ledger.outstanding() == 0
    spent = sum(r.accrued for r in reservations)
    # equal up to the file system's timestamp granularity (the end is an exit-code file's mtime)
    slack = len(_jobs(tmp_path)) * 0.02 * RATE_H / 3600
    assert spent == pytest.approx(_machine_cost(tmp_path), abs=slack)
    assert ledger.lease(run_id) is None  # the last launcher let go of the run
    ledger.close()


# -- the lease itself ------------------------------------------------------------------------------------


def _reserve(ledger: Ledger, owner: str) -> int:
    return ledger.reserve(
        "shared", "j1", 1.0, provider="local", gpu="cpu", rate_per_hour=1, rate_source="local", owner=owner
    )


HOLD = r"""
import sys, time
from budgets.lease import Holder
from budgets.ledger import Ledger
h = Holder(Ledger(sys.argv[1]), "shared", ttl_s=600).acquire()
print("held", flush=True)
sys.stdin.read()  # hold until told to go (or killed)
h.release()
"""


def _holder_process(ledger_url: str) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, ledger_url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_live_owner_keeps_its_run_and_a_dead_one_loses_it(url):  # noqa: F811
    other = _holder_process(url)
    ledger = Ledger(url)
    try:
        with pytest.raises(RunOwned) as refused:
            Holder(ledger, "shared").acquire()
        assert f"pid {other.pid}" in str(refused.value) and "\n" not in str(refused.value)
        lease = ledger.lease("shared")
        # a reservation for the run can be made or closed only by its owner
        with pytest.raises(LeaseLost):
            _reserve(ledger, Owner().token)
        assert ledger.reservations("shared") == []
        other.send_signal(signal.SIGKILL)  # the owner dies: on this machine that is proof enough
        other.wait()
        mine = Holder(ledger, "shared").acquire()
        assert mine.taken_from is not None and mine.taken_from.owner == lease.owner
        assert [e.kind for e in ledger.events(kind="lease-takeover")] == ["lease-takeover"]
        rid = _reserve(ledger, mine.token)
        with pytest.raises(LeaseLost):  # the dead owner's token moves no money any more
            ledger.settle(rid, owner=lease.owner)
        assert ledger.reservation(rid).state == "open"
        mine.release()
        assert ledger.lease("shared") is None
    finally:
        other.kill()
        ledger.close()


def test_an_owner_on_another_machine_is_dead_only_once_its_lease_expired(url):  # noqa: F811
    ledger = Ledger(url)
    away = Owner(host="elsewhere", boot_id="another-boot", pid=os.getpid())  # its pid means nothing here
    t0 = utcnow()
    ledger.acquire_lease("far", away, ttl_s=60, now=t0)
    with pytest.raises(RunOwned):
        ledger.acquire_lease("far", Owner(), ttl_s=60, now=t0 + timedelta(seconds=59))
    ledger.renew_lease("far", away.token, ttl_s=60, now=t0 + timedelta(seconds=50))
    with pytest.raises(RunOwned):  # renewed: alive again for another minute
        ledger.acquire_lease("far", Owner(), ttl_s=60, now=t0 + timedelta(seconds=100))
    me = Owner()
    taken = ledger.acquire_lease("far", me, ttl_s=60, now=t0 + timedelta(seconds=111))
    assert taken is not None and taken.host == "elsewhere"
    with pytest.raises(LeaseLost):  # the old owner comes back: it learns it lost the run
        ledger.renew_lease("far", away.token, ttl_s=60, now=t0 + timedelta(seconds=112))
    ledger.close()


def test_a_ledger_of_schema_1_gains_the_leases_table(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    Ledger(path).close()
    con = sqlite3.connect(path)
    con.execute("DROP TABLE leases")
    con.execute("UPDATE schema_version SET version = 1")
    con.commit()
    con.close()
    with Ledger(path, config=BudgetConfig()) as ledger:
        Holder(ledger, "r").acquire().release()
    con = sqlite3.connect(path)
    assert con.execute("SELECT version FROM schema_version").fetchone() == (2,)
    con.close()


# -- six launchers, one run id ---------------------------------------------------------------------------


def test_six_launchers_of_one_run_train_each_domain_once_and_spend_what_ran(tmp_path):
    env = _env(tmp_path)
    args = ["launch", "-d", "nutrition,legal", "--budget", "5", "-y", "--run-id", "same", "--poll", "0.2"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "launcher", *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert 0 in codes and set(codes) <= {0, 3}, [e[-3000:] for rc, e in results if rc != 3]
    for rc, err in results:
        if rc == 3:  # refused in one line that names the owner; nothing else done
            lines = [x for x in err.splitlines() if x.strip()]
            assert len(lines) == 1 and "followed by another launcher (pid" in lines[0], err
    rec = json.loads((tmp_path / "state" / "runs" / "same.json").read_text())
    assert len(_jobs(tmp_path)) == len(rec["jobs"])  # one job started per planned job
    assert _trainings(tmp_path) == {"nutrition": 1, "legal": 1}
    _check_money(tmp_path, "same")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["base", "legal", "nutrition"]


# -- a launcher killed at each point of its life, then `meetara recover` ---------------------------------


@pytest.mark.parametrize("point", ["planning", "reserving", "launched", "running", "pulling"])
def test_a_launcher_killed_anywhere_is_recovered_without_orphans_or_double_work(tmp_path, point):
    env = _env(tmp_path)
    run = ["--run-id", "crash", "--poll", "0.2"]
    died = meetara(
        "launch",
        "-d",
        "nutrition",
        "--budget",
        "5",
        "-y",
        *run,
        cwd=tmp_path,
        env={**env, "MEETARA_CRASH_AT": point},
    )
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    ledger = Ledger(tmp_path / "ledger.sqlite")
    open_before = [r for r in ledger.reservations("crash") if r.state == "open"]
    assert (point == "planning") == (not open_before)  # money was held from `reserving` on
    ledger.close()

    again = meetara("recover", "crash", "--budget", "5", "-y", "--poll", "0.2", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _trainings(tmp_path) == {"nutrition": 1}  # never trained twice
    if point in ("launched", "running"):  # the dead launcher's job was found and followed, not redone
        assert len(_jobs(tmp_path)) == 1
        assert "has jobs still running: following them" in again.stderr
    _check_money(tmp_path, "crash")
    manifest = tmp_path / "models" / "nutrition" / "manifest.json"
    assert json.loads(manifest.read_text())["validation"]["passed"]


# -- input is checked before any money moves ---------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["a/b", "has space", "ünïcode", "x" * 300, "../up", ""])
def test_a_bad_run_id_is_one_line_and_nothing_is_reserved_or_launched(tmp_path, run_id):
    env = _env(tmp_path)
    r = meetara(
        "launch", "-d", "legal", "--budget", "5", "-y", "--run-id", run_id, cwd=tmp_path, env=env, timeout=60
    )
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "invalid run id" in lines[0], r.stderr
    assert not (tmp_path / "ledger.sqlite").exists()  # refused before the ledger was even opened
    assert not (tmp_path / "state" / "local-jobs").exists()


def test_a_models_dir_that_is_a_file_is_refused_before_money_moves(tmp_path):
    (tmp_path / "models").write_text("not a folder")
    r = meetara("launch", "-d", "legal", "--budget", "5", "-y", cwd=tmp_path, env=_env(tmp_path), timeout=60)
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr, r.stderr
    assert not (tmp_path / "ledger.sqlite").exists()


# -- errors while following a run are contained -----------------------------------------------------------


def test_a_launch_the_backend_refuses_gives_its_money_back(tmp_path):
    env = _env(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "local-jobs").write_text("a file where the jobs' folder should be")
    r = meetara("launch", "-d", "legal", "--budget", "5", "-y", "--run-id", "nolaunch", cwd=tmp_path, env=env)
    assert r.returncode == 1, r.stderr
    assert "launch failed" in (tmp_path / "state" / "runs" / "nolaunch.json").read_text()
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 job(s) did not succeed: nolaunch-j1 failed (launch failed: "), last
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    ledger = Ledger(tmp_path / "ledger.sqlite")
    (res,) = ledger.reservations("nolaunch")
    assert res.state == "released" and res.accrued == 0 and ledger.lease("nolaunch") is None


def test_sigterm_cancels_the_jobs_settles_and_exits_75(tmp_path):
    env = _env(tmp_path)
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher",
            "launch",
            "-d",
            "nutrition,legal,fitness",
            "--budget",
            "5",
            "-y",
            "--run-id",
            "term",
            "--poll",
            "0.2",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def training():  # Ctrl-C in the middle of training, where it costs work
        assert launcher.poll() is None, launcher.stderr.read()
        return any(STEP_ONE.search(_log(d)) for d in _jobs(tmp_path))

    wait_for(training, timeout=300, what="a job to train")
    launcher.send_signal(signal.SIGTERM)
    rc = launcher.wait(timeout=120)
    err = launcher.stderr.read()
    assert rc == 75, err
    assert "interrupted: cancelled 1 job(s), their money is settled" in err
    jobs = json.loads((tmp_path / "state" / "runs" / "term.json").read_text())["jobs"]
    assert {j["state"] for j in jobs.values()} == {"CANCELLED"}
    _check_money(tmp_path, "term")


class DownBackend(LocalBackend):
    """The real local backend whose status endpoint stopped answering after the launch."""

    def status(self, handle: str):
        raise ConnectionError("status endpoint timed out")


def test_a_job_whose_status_never_answers_is_given_up_cancelled_and_settled_in_full(tmp_path):
    from launcher.conductor import Conductor, Hooks
    from launcher.launch import new_run
    from launcher.money import Money
    from launcher.plan import Workload, plan_local
    from launcher.preferences import Preferences
    from train.store import open_store

    ledger = Ledger(tmp_path / "ledger.sqlite")
    plan = plan_local(["legal"], Preferences(), Workload(), "down")
    rec = new_run(plan, store=f"file://{tmp_path}/store", endpoint_url=None, models_dir=tmp_path, budget=5)
    holder = Holder(ledger, "down").acquire()
    backend = DownBackend(root=tmp_path / "jobs")
    money = Money(ledger, rec, backend, poll_s=0.05, owner=holder.token)
    money.reserve_plan()
    task = {"run": "python -c 'import time; time.sleep(600)'"}
    hooks = Hooks(before_launch=money.before_launch, after_poll=money.after_poll)
    conductor = Conductor(
        rec, backend, open_store(rec.store), lambda job: task, poll_s=0.05, hooks=hooks, max_status_errors=5
    )
    conductor.run()  # returns: a job nobody can see is not followed forever
    (job,) = rec.jobs.values()
    assert job.state == "LOST" and job.status_errors == 5, job.history
    res = ledger.reservation(job.reservation_id)
    assert res.state == "settled" and res.accrued == pytest.approx(res.amount)
    real = LocalBackend(root=tmp_path / "jobs").status(job.handle)
    assert real.state.value == "CANCELLED"  # the cancel reached it: nothing runs on unwatched
    holder.release()
    ledger.close()


class RecoveringBackend(LocalBackend):
    """The real local backend, reporting one more recovery of its own (as SkyPilot's managed jobs do
    after a preemption) on every status call while the job runs."""

    def __init__(self, root: Path) -> None:
        super().__init__(root=root)
        self.seen = 0

    def status(self, handle: str):
        from dataclasses import replace

        st = super().status(handle)
        if st.state.finished:
            return st
        self.seen += 1
        return replace(st, recoveries=self.seen)


def test_recoveries_the_backend_makes_itself_count_against_max_recoveries(tmp_path):
    from launcher.conductor import Conductor
    from launcher.launch import new_run
    from launcher.plan import Workload, plan_local
    from launcher.preferences import Preferences
    from train.store import open_store

    plan = plan_local(["legal"], Preferences(), Workload(), "recov")
    rec = new_run(plan, store=f"file://{tmp_path}/store", endpoint_url=None, models_dir=tmp_path, budget=5)
    backend = RecoveringBackend(tmp_path / "jobs")
    task = {"run": "python -c 'import time; time.sleep(600)'"}
    conductor = Conductor(
        rec, backend, open_store(rec.store), lambda job: task, max_recoveries=2, poll_s=0.05
    )
    conductor.run()
    (job,) = rec.jobs.values()
    assert job.state == "GAVE-UP" and job.recoveries == 3 and job.launches == 1, job.history
    assert LocalBackend(root=tmp_path / "jobs").status(job.handle).state.value == "CANCELLED"


@pytest.mark.parametrize(
    "garbage", [b"{not json", b"[1, 2]", b'{"status": "done", "validation": {"passed": true}}']
)
def test_a_corrupt_manifest_in_the_store_marks_that_domain_and_the_run_goes_on(tmp_path, garbage):
    from launcher.conductor import Conductor
    from launcher.launch import new_run
    from launcher.plan import Workload, plan_local
    from launcher.preferences import Preferences
    from launcher.pull import pull
    from train.store import open_store

    store = open_store(f"file://{tmp_path}/store")
    store.put("runs/bad/domains/legal/manifest.json", garbage)
    (result,) = pull(store, "bad", ["legal"], tmp_path / "models")
    assert result.status == "error" and "unreadable manifest" in result.detail and "\n" not in result.detail

    plan = plan_local(["legal"], Preferences(), Workload(), "bad")
    rec = new_run(plan, store=store.url, endpoint_url=None, models_dir=tmp_path / "models", budget=5)
    conductor = Conductor(rec, LocalBackend(root=tmp_path / "jobs"), store, lambda job: {}, poll_s=0.05)
    conductor.run()  # the domain's manifest is there, so the job counts as done; its pull fails
    assert "unreadable manifest" in rec.errors["legal"] and rec.pulled == []
    assert not (tmp_path / "models" / "legal").exists()


def test_recover_after_the_orphaned_job_finished_settles_and_pulls(tmp_path):
    env = _env(tmp_path)
    died = meetara(
        "launch",
        "-d",
        "nutrition",
        "--budget",
        "5",
        "-y",
        "--run-id",
        "late",
        "--poll",
        "0.2",
        cwd=tmp_path,
        env={**env, "MEETARA_CRASH_AT": "running"},
    )
    assert died.returncode == -signal.SIGKILL
    (job,) = _jobs(tmp_path)
    backend = LocalBackend(root=tmp_path / "state" / "local-jobs")
    wait_for(lambda: backend.status(job.name).state.finished, timeout=300, what="the orphaned job to end")
    again = meetara("recover", "late", "-y", cwd=tmp_path, env=env)  # no --budget: nothing to relaunch
    assert again.returncode == 0, again.stderr[-3000:]
    assert "every domain is done; settling and pulling" in again.stderr
    assert "settled 1 reservation(s) an earlier launcher left open" in again.stderr
    _check_money(tmp_path, "late")
    assert (tmp_path / "models" / "nutrition" / "adapter.gguf").exists()
