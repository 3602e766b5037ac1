"""Offer selection: each preference honoured (table-driven), ranking by expected price, fallback order."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from launcher.offers import Offer
from launcher.preferences import Preferences, ProviderPrefs
from launcher.select import Needs, rank

NOW = datetime(2026, 11, 25, tzinfo=UTC)


def offer(provider, gpu, price, spot=None, *, mem=80, count=1, region="us-east", disk=0.0, name=None):
    return Offer(
        provider=provider,
        instance_type=name or f"{provider}-{gpu}-{count}",
        gpu=gpu,
        gpu_count=count,
        gpu_mem_gb=mem,
        vcpus=8,
        mem_gib=64,
        region=region,
        price_hour=price,
        spot_price_hour=spot,
        disk_price_hour=disk,
        fetched_at=NOW,
        source="snapshot",
    )


OFFERS = [
    offer("lambda", "H100", 3.29, region="us-west-1"),
    offer("runpod", "A100-80GB", 1.39, region="EU-RO-1"),
    offer("vast", "A100-80GB", 0.87, 0.40, region="US", disk=0.02),
    offer("vast", "RTX4090", 0.40, 0.20, mem=24, region="CA", disk=0.02),
    offer("lambda", "A10", 1.29, mem=24, region="us-east-1"),
    offer("vast", "H100", 3.60, 1.60, count=2, region="US", disk=0.05),
]


def picked(prefs: Preferences, needs: Needs | None = None) -> list[str]:
    return [
        f"{c.offer.provider}:{c.offer.gpu}:{'spot' if c.spot else 'od'}" for c in rank(OFFERS, prefs, needs)
    ]


def test_auto_ranks_spot_and_on_demand_by_expected_price():
    choices = rank(OFFERS, Preferences())
    first = choices[0]
    assert (first.offer.gpu, first.spot) == ("RTX4090", True)
    assert first.price_hour == pytest.approx(0.22)  # bid + disk
    assert first.expected_hour == pytest.approx(0.22 * 1.15)  # + expected preemption overhead
    assert [c.score for c in choices] == sorted(c.score for c in choices)
    assert len(choices) == 6 + 3  # every offer on demand, plus the three that have a spot market


CASES = {
    "disabled provider": (
        Preferences(providers={"vast": ProviderPrefs(enabled=False)}),
        lambda p: not any(x.startswith("vast") for x in p),
    ),
    "allowed regions": (
        Preferences(providers={"lambda": ProviderPrefs(regions=["us-east-1"])}),
        lambda p: "lambda:H100:od" not in p and "lambda:A10:od" in p,
    ),
    "allowed GPUs": (
        Preferences(allowed_gpus=["a100-80gb"]),
        lambda p: {x.split(":")[1] for x in p} == {"A100-80GB"},
    ),
    "blocked GPUs": (
        Preferences(blocked_gpus=["RTX4090", "H100"]),
        lambda p: not any(":RTX4090:" in x or ":H100:" in x for x in p),
    ),
    "minimum GPU memory": (
        Preferences(min_gpu_mem_gb=48),
        lambda p: not any(":RTX4090:" in x or ":A10:" in x for x in p),
    ),
    "spot only": (Preferences(spot_policy="spot"), lambda p: p and all(x.endswith(":spot") for x in p)),
    "on-demand only": (
        Preferences(spot_policy="on-demand"),
        lambda p: len(p) == 6 and all(x.endswith(":od") for x in p),
    ),
    "global max $/GPU-h": (
        Preferences(max_price_per_gpu_hour=1.0),
        lambda p: "runpod:A100-80GB:od" not in p and "vast:H100:spot" in p,
    ),  # 1.65 / 2 GPUs
    "provider max $/GPU-h": (
        Preferences(providers={"vast": ProviderPrefs(max_price_per_gpu_hour=0.3)}),
        lambda p: [x for x in p if x.startswith("vast")] == ["vast:RTX4090:spot"],
    ),
    "provider weight": (
        Preferences(providers={"vast": ProviderPrefs(weight=10)}, spot_policy="on-demand"),
        lambda p: p[0] == "lambda:A10:od" and p[-1].startswith("vast"),
    ),
    "preemption overhead": (
        Preferences(preemption_overhead=3.0, allowed_gpus=["A100-80GB"]),
        lambda p: p[0] == "vast:A100-80GB:od",
    ),  # 0.42 x 4 > 0.89 on demand
}


@pytest.mark.parametrize("name", CASES)
def test_each_preference_is_honoured(name):
    prefs, check = CASES[name]
    assert check(picked(prefs)), (name, picked(prefs))


def test_job_needs():
    assert all(":RTX4090:" not in x and ":A10:" not in x for x in picked(Preferences(), Needs(gpu_mem_gb=40)))
    assert {x.split(":")[1] for x in picked(Preferences(), Needs(gpu_count=2))} == {"H100"}
    assert picked(Preferences(), Needs(gpu_mem_gb=200)) == []


def test_same_input_same_order():
    shuffled = list(reversed(OFFERS))
    assert [c.label for c in rank(OFFERS, Preferences())] == [c.label for c in rank(shuffled, Preferences())]


def test_a_5000_offer_table_ranks_completely():
    many = [
        offer("vast", "RTX4090", 0.3 + i * 1e-4, 0.15 + i * 1e-4, mem=24, name=f"v{i}") for i in range(5000)
    ]
    choices = rank(many, Preferences())
    assert len(choices) == 10000 and choices[0].offer.instance_type == "v0"
    assert [c.score for c in choices] == sorted(c.score for c in choices)
