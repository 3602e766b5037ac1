"""A Ctrl-C'd launch gives back at once the reservation of a job it never started (issue 27, item 6):
the ledger holds nothing open after the launcher exits 75, so no cap stays lowered until the next
launch. A real launch through the CLI, the real SQLite ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from conftest import local_env
from test_local_backend import wait_for

from budgets.ledger import Ledger


def test_ctrl_c_releases_the_reservation_of_a_job_never_started(tmp_path):
    config = tmp_path / "meetara.yaml"
    config.write_text("max_domains_per_job: 1\n")  # two jobs, run one after the other
    env = {**os.environ, **local_env(tmp_path, 36.0), "MEETARA_CONFIG": str(config)}
    env["MEETARA_LOCAL_PARALLEL"] = "1"
    args = ["launch", "-d", "nutrition,legal", "--budget", "50", "--yes", "--run-id", "int", "--poll", "0.2"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launcher", *args, "--models-dir", str(tmp_path / "models")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    record = tmp_path / "state" / "runs" / "int.json"

    def first_running():
        if not record.exists():
            return None
        jobs = json.loads(record.read_text())["jobs"]
        return len(jobs) == 2 and jobs["int-j1"]["handle"] and jobs["int-j2"]["state"] == "planned"

    wait_for(first_running, timeout=120, what="the first job to run")
    launcher.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 75, err[-2000:]
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.open_reservations("int") == []
    by_job = {r.job: r for r in ledger.reservations("int")}
    assert by_job["int-j2"].state == "released" and by_job["int-j2"].accrued == 0
    assert by_job["int-j1"].state == "settled"
