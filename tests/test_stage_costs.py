"""The planner's overheads are bench/stages.py's measured figures (bench/stages.json), scaled by the
stated rule, and `meetara plan` shows them."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, run_cli

from launcher import plan as P
from launcher.plan import Workload, domain_hours, overheads, plan_cloud, plan_local
from launcher.preferences import Preferences
from launcher.throughput import speed
from train.domains import load_registry

RECORDED = json.loads((ROOT / "bench" / "stages.json").read_text())["planner"]
REAL = "microsoft/DialoGPT-medium"
NAMES = [d.name for d in load_registry().domains]


def test_the_planner_holds_the_recorded_figures():
    assert RECORDED["measured_vcpus"] == P.STAGE_COSTS_VCPUS
    for name, point in RECORDED["points"].items():
        assert P.STAGE_COSTS[name] == (point["params"], point["per_domain_s"], point["per_job_s"])
    assert {k: v for k, v in RECORDED["serial_share"].items() if k != "from"} == P.STAGE_SERIAL_SHARE
    # at the measured shape on the measuring machine, the figures come through unscaled
    for name, point in RECORDED["points"].items():
        o = overheads(name, RECORDED["measured_vcpus"])
        assert (o.per_domain_s, o.per_job_s) == (point["per_domain_s"], point["per_job_s"])
        assert o.source == "measured (bench/stages.py)"


@pytest.mark.parametrize("gpu", ["H100", "RTX3090", "cpu"])
def test_domain_hours_is_tokens_over_speed_plus_the_measured_overhead(gpu):
    work = Workload(base_model=REAL, samples=2000, epochs=3)
    tps = speed(gpu, REAL).tokens_per_s
    measured = RECORDED["points"][REAL]["per_domain_s"]
    hours, _ = domain_hours(gpu, work, vcpus=RECORDED["measured_vcpus"])
    assert hours * 3600 == pytest.approx(work.domain_tokens() / tps + measured, rel=1e-9)
    # by default a GPU is on a cloud box of CLOUD_VCPUS, "cpu" is the measuring machine
    default = overheads(REAL, P.STAGE_COSTS_VCPUS if gpu == "cpu" else P.CLOUD_VCPUS).per_domain_s
    assert domain_hours(gpu, work)[0] * 3600 == pytest.approx(work.domain_tokens() / tps + default, rel=1e-9)


def test_the_tiny_local_path_uses_the_tiny_figure():
    work = Workload()  # tiny, the local default
    hours, source = domain_hours("cpu", work)
    tiny = RECORDED["points"]["tiny"]["per_domain_s"]
    assert hours * 3600 == pytest.approx(work.domain_tokens() / speed("cpu", "tiny").tokens_per_s + tiny)
    assert source == "measured"


def test_machine_scaling_is_amdahl_with_the_measured_serial_share():
    t = RECORDED["points"][REAL]
    s = RECORDED["serial_share"]
    for c in (1, 2, 4, 8, 16, 64):
        o = overheads(REAL, c)
        assert o.per_domain_s == pytest.approx(
            t["per_domain_s"] * (s["per_domain"] + (1 - s["per_domain"]) * 2 / c), abs=0.01
        )
        assert o.per_job_s == pytest.approx(
            t["per_job_s"] * (s["per_job"] + (1 - s["per_job"]) * 2 / c), abs=0.01
        )
        # more vCPUs never cost more, and never go below the part a second core did not shorten
        assert o.per_domain_s >= t["per_domain_s"] * s["per_domain"] - 0.01
    ds = [overheads(REAL, c).per_domain_s for c in (1, 2, 4, 8, 16, 64)]
    assert ds == sorted(ds, reverse=True)
    assert "scaled to 8 vCPUs" in overheads(REAL, 8).source


def test_shape_scaling_is_linear_in_parameters_between_the_measured_points():
    (n0, d0, j0), (n1, d1, j1) = P.STAGE_COSTS["tiny"], P.STAGE_COSTS[REAL]
    o = overheads("gpt2", 2)  # 124M: between the points
    f = (124e6 - n0) / (n1 - n0)
    assert o.per_domain_s == pytest.approx(d0 + (d1 - d0) * f, abs=0.01)
    assert o.per_job_s == pytest.approx(j0 + (j1 - j0) * f, abs=0.01)
    assert "124M params" in o.source
    big = overheads("gpt2-large", 2)  # 774M: extrapolated on the same line
    assert big.per_domain_s == pytest.approx(d0 + (d1 - d0) * (774e6 - n0) / (n1 - n0), abs=0.01)
    assert overheads("random:microsoft/DialoGPT-medium", 2) == overheads(REAL, 2)  # same shape


def test_cloud_jobs_add_the_measured_per_job_overhead_to_the_users_start_up():
    from launcher.offers import load_snapshot

    work = Workload(base_model=REAL, samples=2000, epochs=3)
    prefs = Preferences()
    plan = plan_cloud(NAMES[:10], load_snapshot(), prefs, work, "r")
    per_job = overheads(REAL, P.CLOUD_VCPUS).per_job_s
    for j in plan.jobs:
        assert j.hours == pytest.approx(
            prefs.job_startup_minutes / 60
            + per_job / 3600
            + len(j.domains) * domain_hours(j.offer.gpu, work)[0],
            rel=1e-3,
        )


def test_local_plans_scale_to_this_machines_cores(monkeypatch):
    monkeypatch.setattr(P, "_local_vcpus", lambda: 16)
    monkeypatch.delenv("MEETARA_LOCAL_TOKENS_S", raising=False)
    monkeypatch.delenv("MEETARA_LOCAL_STARTUP_S", raising=False)
    monkeypatch.setattr(P, "local_slowdown", lambda vcpus=None: 1.5)  # the load, as the plan sees it
    plan = plan_local(NAMES[:2], Preferences(), Workload(), "r")
    h = domain_hours("cpu", Workload(), vcpus=16)[0]
    startup_s = P.local_startup_s(Workload(), 1.5)[0]
    # the measured start-up and the table's time per domain, both 1.5 x longer on this loaded machine
    assert startup_s >= P.LOCAL_STARTUP_S * 1.5
    assert plan.jobs[0].hours == pytest.approx(startup_s / 3600 + 2 * h * 1.5, abs=1e-4)
    assert P.plan_overheads(plan).per_domain_s == overheads("tiny", 16).per_domain_s


def test_meetara_plan_shows_the_overheads():
    r = run_cli("plan", "-d", "nutrition", "--backend", "skypilot", module="launcher")
    assert r.returncode == 0, r.stderr
    o = overheads(REAL, P.CLOUD_VCPUS)
    text = " ".join(r.stdout.split())  # the caption may wrap
    assert f"overheads: {o.per_domain_s:.1f} s/domain, {o.per_job_s:.1f} s/job" in text
    assert "measured (bench/stages.py)" in text
