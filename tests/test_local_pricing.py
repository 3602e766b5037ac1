"""Priced local runs (issue 27, item 3): a job never runs past its reservation, even one that ignores
its in-job guard (the runner ends it at MEETARA_STOP_HARD_AT), so the ledger settles no more than was
reserved."""

from __future__ import annotations

import shlex

from budgets.ledger import Ledger
from launcher.backends.local import LocalBackend
from launcher.launch import Prepared, conductor_for, new_run, task_factory
from launcher.money import Money
from launcher.plan import Workload, plan_local
from launcher.preferences import Preferences
from train.store import open_store

RATE_H = 36.0  # $0.01 a second


def test_a_job_that_ignores_its_guard_is_ended_at_its_reservation(tmp_path, monkeypatch):
    monkeypatch.setenv("MEETARA_STATE_DIR", str(tmp_path / "state"))
    # a small reservation (a few seconds), and a job that neither stops itself nor on SIGTERM (a
    # checkpoint upload stuck past the guard's margin): only the hard stop ends it
    monkeypatch.setenv("MEETARA_LOCAL_STARTUP_S", "6")
    monkeypatch.setenv("MEETARA_LOCAL_TOKENS_S", "1e9")
    plan = plan_local(["legal"], Preferences(local_price_hour=RATE_H), Workload(), "stuck")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    store = f"file://{tmp_path}/store"
    rec = new_run(plan, store=store, endpoint_url=None, models_dir=tmp_path / "models", budget=None)
    backend = LocalBackend(root=tmp_path / "jobs")
    prep = Prepared(["legal"], store, open_store(store), backend, ledger)
    Money(ledger, rec, backend, poll_s=0.2).reserve_plan()
    code = (
        "import signal, time\n"
        "for s in (signal.SIGTERM, signal.SIGALRM): signal.signal(s, signal.SIG_IGN)\n"
        "time.sleep(600)"
    )
    real = task_factory(rec, Preferences(local_price_hour=RATE_H))

    def stuck(job):
        task = real(job)  # the launcher's own task, its budget envs included; only the command differs
        task.pop("setup", None)
        task["run"] = f"python -c {shlex.quote(code)}"
        return task

    c = conductor_for(rec, prep, Preferences(local_price_hour=RATE_H), poll=0.2)
    c.task_for = stuck
    c.run()
    (job,) = rec.jobs.values()
    (res,) = ledger.reservations("stuck")
    assert job.state == "STOPPED-BUDGET", job.history
    assert res.state == "settled"
    st = backend.status(job.handle)
    ran = (st.ended_at - st.started_at).total_seconds()  # what the machine really ran
    assert ran * RATE_H / 3600 <= res.amount + 1e-9  # never past what was reserved ...
    assert res.accrued <= res.amount + 1e-9  # ... and the ledger settled no more
    assert res.accrued >= 0.5 * res.amount  # ... and it did run on what was reserved
