"""The planner: packing within the per-job caps, the offer that finishes cheapest, costs that add up."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from launcher.offers import Offer, load_snapshot
from launcher.plan import (
    CLOUD_VCPUS,
    NoOffer,
    Workload,
    domain_hours,
    overheads,
    pack,
    plan_cloud,
    plan_local,
)
from launcher.preferences import Preferences
from launcher.throughput import GPU_TFLOPS, speed
from train.domains import load_registry

NAMES = [d.name for d in load_registry().domains]
CLOUD = Workload(base_model="microsoft/DialoGPT-medium", samples=2000, epochs=3)


def offer(provider: str, gpu: str, price: float, spot: float | None = None, **kw) -> Offer:
    return Offer(
        provider=provider,
        instance_type=kw.pop("instance_type", f"{gpu}-{price}"),
        gpu=gpu,
        gpu_count=kw.pop("gpu_count", 1),
        gpu_mem_gb=kw.pop("gpu_mem_gb", 24),
        vcpus=8,
        mem_gib=32,
        region=kw.pop("region", "us"),
        price_hour=price,
        spot_price_hour=spot,
        fetched_at=datetime(2026, 11, 20, tzinfo=UTC),
        source="snapshot",
    )


@pytest.mark.parametrize(
    "n,max_domains,max_hours,expected", [(62, 32, 4, [31, 31]), (62, 16, 4, [16, 16, 15, 15])]
)
def test_pack_balances_jobs_within_caps(n, max_domains, max_hours, expected):
    prefs = Preferences(max_domains_per_job=max_domains, max_hours_per_job=max_hours)
    groups = pack(NAMES[:n], per_domain_h=0.01, startup_h=0.1, prefs=prefs)
    assert [len(g) for g in groups] == expected
    assert [d for g in groups for d in g] == NAMES[:n]  # order kept, nothing lost or doubled


def test_pack_respects_the_hour_cap():
    prefs = Preferences(max_domains_per_job=100, max_hours_per_job=1.0)
    groups = pack(NAMES, per_domain_h=0.1, startup_h=0.2, prefs=prefs)
    assert all(0.2 + len(g) * 0.1 <= 1.0 + 1e-9 for g in groups)
    assert len(groups) == 8  # 8 domains fit in 0.8 h of room; 62 domains need 8 jobs


def test_a_fast_dear_gpu_can_beat_a_slow_cheap_one():
    # per hour the 3090 is cheaper; per finished domain the H100 is (it trains ~14x faster)
    slow, fast = offer("vast", "RTX3090", 0.20), offer("runpod", "H100", 0.30, gpu_mem_gb=80)
    h_slow, h_fast = domain_hours("RTX3090", CLOUD)[0], domain_hours("H100", CLOUD)[0]
    assert 0.20 * h_slow > 0.30 * h_fast
    plan = plan_cloud(NAMES[:10], [slow, fast], Preferences(job_startup_minutes=0), CLOUD, "r")
    assert plan.jobs[0].offer.gpu == "H100"
    assert plan.jobs[0].fallbacks[0].gpu == "RTX3090"


def test_plan_costs_add_up_and_match_hours_times_price():
    plan = plan_cloud(NAMES, load_snapshot(), Preferences(), CLOUD, "r1")
    assert sorted(d for j in plan.jobs for d in j.domains) == sorted(NAMES)
    for j in plan.jobs:
        assert j.cost == pytest.approx(j.hours * j.offer.expected_hour, rel=1e-3)
        assert j.hours == pytest.approx(
            # 6 min of machine start-up + the measured per-job overhead (bench/stages.py)
            6 / 60
            + overheads(CLOUD.base_model, CLOUD_VCPUS).per_job_s / 3600
            + len(j.domains) * domain_hours(j.offer.gpu, CLOUD)[0],
            rel=1e-3,
        )
    assert plan.total_cost == pytest.approx(sum(j.cost for j in plan.jobs), abs=1e-3)


def test_preferences_reach_the_plan():
    offers = load_snapshot()
    plan = plan_cloud(NAMES[:4], offers, Preferences(spot_policy="on-demand"), CLOUD, "r")
    assert not plan.jobs[0].offer.spot and all(not f.spot for f in plan.jobs[0].fallbacks)
    vast_off = Preferences.model_validate({"providers": {"vast": {"enabled": False}}})
    plan = plan_cloud(NAMES[:4], offers, vast_off, CLOUD, "r")
    assert "vast" not in {plan.jobs[0].offer.provider, *(f.provider for f in plan.jobs[0].fallbacks)}
    with pytest.raises(NoOffer, match="no offer passes"):
        plan_cloud(NAMES[:4], offers, Preferences(allowed_gpus=["B200"]), CLOUD, "r")


def test_big_models_need_big_gpus():
    small = offer("vast", "T4", 0.2, gpu_mem_gb=16)
    with pytest.raises(NoOffer, match="GPU memory"):
        plan_cloud(NAMES[:2], [small], Preferences(), Workload(base_model="gpt2-xl"), "r")


def test_throughput_table_scales_with_tflops_and_model_size():
    h100, a100 = speed("H100", "microsoft/DialoGPT-medium"), speed("A100-80GB", "microsoft/DialoGPT-medium")
    assert h100.source == "reported" and a100.source == "scaled"
    assert h100.tokens_per_s / a100.tokens_per_s == pytest.approx(
        GPU_TFLOPS["H100"] / GPU_TFLOPS["A100-80GB"]
    )
    assert speed("H100", "gpt2-large").tokens_per_s < h100.tokens_per_s
    assert speed("Mystery9000", "gpt2").source == "unknown-gpu"
    with pytest.raises(ValueError, match="unknown base model"):
        speed("H100", "llama-70b")


def test_local_plan_is_this_machine_at_the_local_rate():
    plan = plan_local(NAMES, Preferences(local_price_hour=0.5), Workload(), "r")
    assert {j.offer.provider for j in plan.jobs} == {"local"}
    assert plan.total_cost == pytest.approx(plan.total_hours * 0.5, abs=1e-3)
    assert sum(len(j.domains) for j in plan.jobs) == len(NAMES)
