"""`meetara launch` end to end on the embedded default (local backend, file store), as a user runs it."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import run_cli

from train.llama_check import run_llama_check


def meetara(*args: str, cwd=None, env=None):
    return run_cli(*args, module="launcher", cwd=cwd, env=env)


def one_line_error(r) -> str:
    """The error is one line, the last on stderr (a plan table may come before it), exit code 2."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert [x for x in lines if x.startswith("error:")] == lines[-1:], r.stderr
    assert "Traceback" not in r.stderr
    return lines[-1]


def test_launch_two_domains_pulls_validated_ggufs_then_rerun_skips(tmp_path):
    args = ["launch", "--domains", "nutrition,legal", "--budget", "1", "--samples", "80", "--run-id", "e2e"]
    env = {"MEETARA_STORE": f"file://{tmp_path}/store"}
    r = meetara(*args, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "e2e-j1: succeeded, 2/2 domains" in r.stderr
    models = tmp_path / "models"
    for domain in ("nutrition", "legal"):
        manifest = json.loads((models / domain / "manifest.json").read_text())
        assert manifest["status"] == "done" and manifest["validation"]["passed"]
        for name, f in manifest["files"].items():
            local = models / domain / f["key"].rsplit("/", 1)[1]
            assert hashlib.sha256(local.read_bytes()).hexdigest() == f["sha256"], name
    # the pulled files load in llama.cpp: the base with the adapter applied generates text
    base = next((models / "base").glob("*.gguf"))
    out = run_llama_check(base, [1, 2, 3], lora=models / "legal" / "adapter.gguf", generate=4)
    assert len(out["generated"]) == 4

    status = json.loads(meetara("status", "e2e", "--json", cwd=tmp_path, env=env).stdout)
    assert [(s["state"], s["domains_done"], s["launches"]) for s in status] == [("SUCCEEDED", 2, 1)]

    again = meetara(*args, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 of 2 domains already done" in again.stderr
    assert "up-to-date" in again.stdout
    status = json.loads(meetara("status", "e2e", "--json", cwd=tmp_path, env=env).stdout)
    assert status[0]["launches"] == 1  # nothing was launched (or paid for) twice


def test_a_plan_over_budget_launches_nothing(tmp_path):
    env = {"MEETARA_STORE": f"file://{tmp_path}/store", "MEETARA_LOCAL_PRICE_HOUR": "1000"}
    r = meetara("launch", "--domains", "legal", "--budget", "0.5", "--run-id", "dear", cwd=tmp_path, env=env)
    assert "over --budget $0.50" in one_line_error(r)
    assert meetara("status", "dear", cwd=tmp_path, env=env).returncode == 2  # no run was recorded
    assert not (tmp_path / "store" / "runs").exists()


def test_spending_needs_a_yes_when_nobody_can_be_asked(tmp_path):
    env = {"MEETARA_STORE": f"file://{tmp_path}/store", "MEETARA_LOCAL_PRICE_HOUR": "1"}
    r = meetara("launch", "--domains", "legal", "--budget", "5", cwd=tmp_path, env=env)
    assert "pass --yes" in one_line_error(r)


@pytest.mark.parametrize(
    "args,message",
    [
        (["launch", "--domains", "legal", "--budget", "-1"], "--budget"),
        (["launch", "--domains", "legal", "--budget", "abc"], "--budget"),
        (["launch", "--domains", "legall", "--budget", "5"], "legal"),
        (["plan", "--domains", "legal", "--backend", "skypilot", "--provider", "aws"], "unknown provider"),
        (["plan", "--domains", "legal", "--backend", "moon"], "unknown backend"),
        (["plan", "--domains", "legal", "--base-model", "llama-70b"], "unknown base model"),
        (["launch", "--domains", "legal", "--budget", "5", "--store", "ftp://x"], "bad store URL"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    assert message in one_line_error(meetara(*args, cwd=tmp_path))


def test_a_malformed_config_file_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "meetara.yaml"
    cfg.write_text("preferences:\n  spot_policy: sometimes\n")
    line = one_line_error(meetara("plan", "--domains", "legal", "--config", str(cfg), cwd=tmp_path))
    assert "spot_policy" in line
    cfg.write_text("preferences: [unclosed\n")
    assert "not valid YAML" in one_line_error(
        meetara("launch", "-d", "legal", "--budget", "5", cwd=tmp_path, env={"MEETARA_CONFIG": str(cfg)})
    )


def test_plan_json_for_the_cloud(tmp_path):
    r = meetara("plan", "--domains", "all", "--backend", "skypilot", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert sum(len(j["domains"]) for j in plan["jobs"]) == 62
    assert plan["workload"]["base_model"] == "microsoft/DialoGPT-medium"
    assert plan["total_cost"] == pytest.approx(sum(j["cost"] for j in plan["jobs"]), abs=1e-3)
    assert all(j["offer"]["provider"] in ("lambda", "runpod", "vast") for j in plan["jobs"])


def test_a_cloud_run_id_skypilot_cannot_name_a_cluster_after_is_refused_before_money(tmp_path):
    """SkyPilot's jobs controller names a job's cluster after it and refuses a name that starts with a digit
    (`check_cluster_name_is_valid`), but only once the job runs and its money is reserved: meetara asks
    SkyPilot's own two functions first and refuses in one line, exit 2, nothing reserved or recorded."""
    from budgets.ledger import Ledger

    state = tmp_path / "state"
    args = ["launch", "-d", "nutrition", "--budget", "1", "-y", "--backend", "skypilot", "--run-id",
            "2026-12-03", "--store", "s3://bucket/x", "--endpoint-url", "http://127.0.0.1:9"]  # fmt: skip
    r = meetara(*args, cwd=tmp_path, env={"MEETARA_STATE_DIR": str(state)})
    line = one_line_error(r)
    assert "must start with a letter" in line and "--run-id run-2026-12-03" in line, line
    ledger = state / "ledger.sqlite"
    assert not ledger.exists() or Ledger(ledger).reservations() == []
    assert not (state / "runs" / "2026-12-03.json").exists()
    from launcher.backends.skypilot import cluster_name_problem

    assert cluster_name_problem("run-2026-12-03-j1") is None  # the id it suggests is one SkyPilot takes
