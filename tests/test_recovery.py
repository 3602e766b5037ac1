"""Preemption recovery on the local backend: injected SIGKILLs at random points, relaunch, resume from
checkpoints, byte-identical adapters; a flapping status never causes a relaunch."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path

from conftest import run_cli

from launcher.backends.base import JobState, JobStatus
from launcher.backends.local import LocalBackend
from launcher.conductor import Conductor
from launcher.plan import Workload, plan_local
from launcher.preferences import Preferences
from launcher.runs import RunRecord, runs_dir
from train.store import open_store

DOMAINS = "nutrition,legal,financial,fitness,programming"
CHECKPOINT_EVERY = 10  # pinned (the default interval is measured as training runs)


def adapters(models: Path) -> dict[str, str]:
    return {
        d: hashlib.sha256((models / d / "adapter.gguf").read_bytes()).hexdigest() for d in DOMAINS.split(",")
    }


def launch(tmp_path: Path, name: str, *extra: str):
    env = {
        "MEETARA_STORE": f"file://{tmp_path}/{name}-store",
        "MEETARA_CHECKPOINT_EVERY": str(CHECKPOINT_EVERY),
    }
    args = ["launch", "-d", DOMAINS, "--budget", "1", "--samples", "80", "--run-id", name, "--poll", "0.2"]
    args += ["--models-dir", str(tmp_path / f"{name}-models"), *extra]
    return run_cli(*args, module="launcher", cwd=tmp_path, env=env)


def test_three_random_preemptions_resume_to_identical_adapters(tmp_path):
    chaos = launch(tmp_path, "chaos", "--preempt-every", "2.5", "--preempt-seed", "7", "--preempt-max", "3")
    assert chaos.returncode == 0, chaos.stderr[-3000:]
    calm = launch(tmp_path, "calm")
    assert calm.returncode == 0, calm.stderr[-3000:]
    # the interrupted run's adapters are the uninterrupted run's, bit for bit
    assert adapters(tmp_path / "chaos-models") == adapters(tmp_path / "calm-models")

    rec = json.loads((runs_dir() / "chaos.json").read_text())
    (job,) = rec["jobs"].values()
    assert job["state"] == "SUCCEEDED" and job["preemptions"] == 3 and job["launches"] == 4
    killed_in_training = [p for p in job["preemption_log"] if p["domain"]]
    assert killed_in_training, job["preemption_log"]
    for p in killed_in_training:
        # the work a preemption cost is counted, and never more than one checkpoint interval
        assert p["resumed_from_step"] is not None, p
        assert 0 <= p["lost_steps"] <= CHECKPOINT_EVERY, p
        assert p["lost_steps"] == p["killed_at_step"] - p["resumed_from_step"]
    status = json.loads(run_cli("status", "chaos", "--json", module="launcher").stdout)
    assert status[0]["preemptions"] == 3
    assert status[0]["recomputed_steps"] == sum(p["lost_steps"] for p in killed_in_training)


class FlappingBackend(LocalBackend):
    """The real local backend whose status calls fail now and then, and once claim the job was lost."""

    def __init__(self, root: Path, fail_calls: set[int], lost_calls: set[int]) -> None:
        super().__init__(root=root)
        self.calls, self.fail_calls, self.lost_calls = 0, fail_calls, lost_calls

    def status(self, handle: str) -> JobStatus:
        self.calls += 1
        if self.calls in self.fail_calls:
            raise ConnectionError("status endpoint timed out")
        if self.calls in self.lost_calls:
            return JobStatus(JobState.PREEMPTED, detail="flap")
        return super().status(handle)


def test_a_flapping_status_does_not_relaunch(tmp_path):
    ready = tmp_path / "go"
    plan = plan_local(["legal"], Preferences(), Workload(), "flap")
    rec = RunRecord(
        run_id="flap",
        backend="local",
        store=f"file://{tmp_path}/store",
        models_dir=str(tmp_path / "models"),
        plan=plan,
        jobs={},
    )
    from launcher.runs import JobRecord

    rec.jobs = {j.name: JobRecord.of(j) for j in plan.jobs}
    backend = FlappingBackend(tmp_path / "jobs", fail_calls={1, 2, 4}, lost_calls={3, 6})
    # the job runs until the test lets it finish (a file appears), so the flaps happen while it runs
    code = f"import pathlib, time\nwhile not pathlib.Path({str(ready)!r}).exists(): time.sleep(0.02)"
    task = {"run": f"python -c {shlex.quote(code)}"}

    def after_poll(r: RunRecord) -> None:
        if backend.calls >= 8:
            ready.touch()

    from launcher.conductor import Hooks

    conductor = Conductor(
        rec, backend, open_store(rec.store), lambda job: task, poll_s=0.05, hooks=Hooks(after_poll=after_poll)
    )
    conductor.run()
    (job,) = rec.jobs.values()
    assert job.state == "SUCCEEDED", job.history
    assert job.launches == 1 and job.preemptions == 0
    assert job.status_errors == 3
    assert os.path.exists(ready)
