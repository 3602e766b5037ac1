"""Offer selection: rank every allowed (offer, spot or on-demand) pair for a job by expected price.

Expected price = what the provider bills per hour (disk included) times (1 + preemption overhead)
for spot, the plain on-demand price otherwise; the ranking score multiplies it by the provider's
weight. The whole ranked list is kept: it is the fallback order after a preemption or a failed launch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from budgets import usd
from launcher import regions
from launcher.offers import Offer
from launcher.preferences import Preferences


@dataclass(frozen=True)
class Needs:
    """What a job needs from one machine."""

    gpu_mem_gb: float = 0
    gpu_count: int = 1


@dataclass(frozen=True)
class Choice:
    offer: Offer
    spot: bool
    price_hour: float  # billed $/h for the instance, disk included
    expected_hour: float  # price_hour with the expected preemption overhead
    score: float  # expected_hour x provider weight: the ranking key

    @property
    def label(self) -> str:
        kind = "spot" if self.spot else "on-demand"
        o = self.offer
        return f"{o.provider} {o.gpu_count}x{o.gpu} {o.region} {kind} {usd(self.price_hour)}/h"


def _modes(policy: str) -> tuple[bool, ...]:
    return {"spot": (True,), "on-demand": (False,), "auto": (True, False)}[policy]


def why_excluded(offer: Offer, prefs: Preferences, needs: Needs) -> str | None:
    """The first preference or need the offer breaks (prices aside), or None if it is allowed."""
    pp = prefs.provider(offer.provider)
    gpu = offer.gpu.lower()
    if not pp.enabled:
        return f"provider {offer.provider} is disabled"
    if not regions.allowed(pp.regions, offer.provider, offer.region):
        return f"region {offer.region} not in {offer.provider}'s regions ({','.join(pp.regions)})"
    if prefs.allowed_gpus and gpu not in {g.lower() for g in prefs.allowed_gpus}:
        return f"GPU {offer.gpu} not in allowed GPUs"
    if gpu in {g.lower() for g in prefs.blocked_gpus}:
        return f"GPU {offer.gpu} is blocked"
    if offer.gpu_mem_gb < max(needs.gpu_mem_gb, prefs.min_gpu_mem_gb):
        return f"{offer.gpu_mem_gb:g} GB GPU memory is too little"
    if offer.gpu_count < needs.gpu_count:
        return f"{offer.gpu_count} GPUs, {needs.gpu_count} needed"
    return None


def rank(offers: Iterable[Offer], prefs: Preferences, needs: Needs | None = None) -> list[Choice]:
    """Every allowed (offer, spot/on-demand) pair, cheapest expected score first."""
    needs = needs or Needs()
    out: list[Choice] = []
    for offer in offers:
        if why_excluded(offer, prefs, needs):
            continue
        pp = prefs.provider(offer.provider)
        caps = [c for c in (pp.max_price_per_gpu_hour, prefs.max_price_per_gpu_hour) if c is not None]
        for spot in _modes(prefs.spot_policy):
            price = offer.effective_price(spot)
            if price is None or any(price / offer.gpu_count > cap for cap in caps):
                continue
            expected = price * (1 + prefs.preemption_overhead) if spot else price
            out.append(Choice(offer, spot, price, expected, expected * pp.weight))
    # ties break on stable fields so that the same input always gives the same plan
    out.sort(key=lambda c: (c.score, c.offer.provider, c.offer.instance_type, c.offer.region, c.spot))
    return out


def emptied_providers(
    offers: Iterable[Offer],
    prefs: Preferences,
    needs: Needs | None = None,
    flags: dict[str, str] | None = None,
) -> dict[str, str]:
    """Enabled providers with offers of which the preferences (and `needs`) allow none, each with why
    in one line: a preference that silently drops a whole provider changes every plan. `flags`: the
    settings of `prefs` a command-line flag set (e.g. {"spot_policy": "--spot"}): the line names the
    flag, not the preferences, when it is what excludes them."""
    needs = needs or Needs()
    by_provider: dict[str, list[Offer]] = {}
    for o in offers:
        by_provider.setdefault(o.provider, []).append(o)
    out = {}
    for provider, group in sorted(by_provider.items()):
        pp = prefs.provider(provider)
        if not pp.enabled or rank(group, prefs, needs):
            continue
        kinds: dict[str, int] = {}
        sources: set[str] = set()
        for o in group:
            kind, setting = _exclusion(o, prefs, needs)
            kinds[kind] = kinds.get(kind, 0) + 1
            sources.add((flags or {}).get(setting) or ("the job's needs" if setting == "needs" else "prefs"))
        why = "; ".join(sorted(kinds, key=lambda k: -kinds[k]))
        said = ["your preferences"] * ("prefs" in sources) + sorted(sources - {"prefs"})
        verb = "excludes" if len(said) == 1 and said[0] != "your preferences" else "exclude"
        out[provider] = f"{' and '.join(said)} {verb} all {len(group)} of its offers ({why})"
    return out


def _exclusion(offer: Offer, prefs: Preferences, needs: Needs) -> tuple[str, str]:
    """What keeps `offer` out, said of the preference (not of the offer), and the setting it is (or
    "needs": the job's), for `emptied_providers`."""
    pp = prefs.provider(offer.provider)
    if not regions.allowed(pp.regions, offer.provider, offer.region):
        return f"no region matches --regions {','.join(pp.regions)}", "regions"
    reason = why_excluded(offer, prefs, needs)
    if reason is None:
        caps = [c for c in (pp.max_price_per_gpu_hour, prefs.max_price_per_gpu_hour) if c is not None]
        if caps:
            return f"over the max {usd(min(caps))}/GPU-h", "max_price_per_gpu_hour"
        return f"no {prefs.spot_policy} price" if prefs.spot_policy != "auto" else "no price", "spot_policy"
    if "allowed GPUs" in reason:
        return f"no GPU in the allowed GPUs ({','.join(prefs.allowed_gpus)})", "allowed_gpus"
    if "blocked" in reason:
        return "its GPUs are blocked", "blocked_gpus"
    if "GPU memory" in reason:
        setting = "needs" if needs.gpu_mem_gb > prefs.min_gpu_mem_gb else "min_gpu_mem_gb"
        return f"less than {max(needs.gpu_mem_gb, prefs.min_gpu_mem_gb):g} GB of GPU memory", setting
    return reason, "needs" if "needed" in reason else "providers"
