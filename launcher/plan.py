"""The plan: which offer, which domains in which job, how long and how much.

Domains are packed into jobs because a job's fixed start-up (provisioning, setup, base-model download)
costs more than training one small adapter; jobs are capped in domains and hours so that one job's
preemption or failure costs little and jobs can run side by side. Time per domain comes from the
throughput table (launcher/throughput.py); cost = hours x expected $/h of the chosen offer, where the
expected price includes the spot preemption overhead (launcher/select.py).
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from datetime import UTC, datetime

from pydantic import AliasChoices, BaseModel, Field

from launcher.offers import Offer
from launcher.preferences import Preferences
from launcher.select import Choice, Needs, rank
from launcher.throughput import model_params, speed

KEPT_SHARE = 0.9  # share of generated samples the quality filter keeps (measured 85-95 %, bench/RESULTS.md)
LOCAL_STARTUP_MINUTES = 0.5  # process start + imports + base model load on this machine (tiny model)


class OfferRef(BaseModel):
    """The machine a job runs on, as planned."""

    provider: str
    instance_type: str
    region: str
    gpu: str
    gpu_count: int
    gpu_mem_gb: float
    spot: bool
    price_hour: float
    expected_hour: float
    source: str  # snapshot | live | local
    # the machine's host CPUs and memory (GiB), as the offer stated them; SkyPilot's catalogs need both
    # positive. 0: not recorded (a run planned before they were kept): launcher/skycatalog.py derives them
    vcpus: int = 0
    # "mem_gb" is what this field was called (it held GiB): run records planned before still load
    mem_gib: float = Field(0.0, validation_alias=AliasChoices("mem_gib", "mem_gb"))
    gpu_name: str = ""  # the provider's own name of the GPU ("H100 PCIE"), for launching exactly it

    @classmethod
    def of(cls, c: Choice) -> OfferRef:
        o = c.offer
        return cls(
            provider=o.provider,
            instance_type=o.instance_type,
            region=o.region,
            gpu=o.gpu,
            gpu_count=o.gpu_count,
            gpu_mem_gb=o.gpu_mem_gb,
            spot=c.spot,
            price_hour=c.price_hour,
            expected_hour=c.expected_hour,
            source=o.source,
            vcpus=o.vcpus,
            mem_gib=o.mem_gib,
            gpu_name=o.gpu_name,
        )

    @property
    def label(self) -> str:
        market = "spot" if self.spot else "on-demand"
        if self.provider == "local":
            return f"local {self.gpu} ({self.instance_type})"
        return f"{self.provider} {self.gpu_count}x{self.gpu} {self.region} {market}"


class JobPlan(BaseModel):
    name: str
    domains: list[str]
    hours: float
    cost: float  # hours x expected $/h: what the launch reserves for this job
    offer: OfferRef
    fallbacks: list[OfferRef] = []


class Workload(BaseModel):
    """What each domain's training amounts to (the fields `python -m train` gets)."""

    base_model: str = "tiny"
    samples: int = Field(200, ge=16)
    epochs: float = Field(2, gt=0)
    max_len: int = Field(128, ge=8)
    warm_start: bool = False  # plan the domains in similarity-chain order; the jobs warm-start them

    def domain_tokens(self) -> float:
        return self.samples * KEPT_SHARE * self.epochs * self.max_len


class Plan(BaseModel):
    run_id: str
    backend: str
    workload: Workload
    jobs: list[JobPlan]
    total_hours: float
    total_cost: float
    offers_source: str
    snapshot_date: str | None = None
    throughput_source: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    # asked for but already done in the run's store: not planned, not paid for again (`meetara plan`)
    done: list[str] = []
    store: str | None = None  # the store that was checked for done domains
    # providers with offers the preferences exclude every one of, and why (`emptied_providers`)
    excluded: dict[str, str] = {}

    def job(self, name: str) -> JobPlan:
        return next(j for j in self.jobs if j.name == name)


class NoOffer(ValueError):
    """No offer passes the preferences (the message says which rule excluded the most)."""


def domain_hours(gpu: str, work: Workload) -> tuple[float, str]:
    """Hours to train, export and validate one domain on one `gpu` ("cpu" for this machine)."""
    s = speed(gpu, work.base_model)
    n = model_params(work.base_model)
    # export (f16 write + Q4_K_M quantize) and validation (two llama.cpp loads, logits compare) grow
    # with the model: measured 0.7 s for the tiny model on CPU; ~10 s + 1 s per 10M params on a GPU box
    overhead_s = 0.7 if gpu == "cpu" else 10 + n / 1e7
    return (work.domain_tokens() / s.tokens_per_s + overhead_s) / 3600, s.source


def order(domains: Sequence[str], work: Workload) -> list[str]:
    """With warm starts, the domains as a similarity chain (train/similarity.py), so that packing cuts
    it into jobs of neighbours and each domain has a similar one trained before it; else as given."""
    if not work.warm_start:
        return list(domains)
    from train.similarity import similarity_chain

    return similarity_chain(domains)


def pack(
    domains: Sequence[str], per_domain_h: float, startup_h: float, prefs: Preferences
) -> list[list[str]]:
    """Split `domains` (kept in order) into the fewest jobs within the per-job caps, balanced in size."""
    if not domains:
        return []
    room = max(prefs.max_hours_per_job - startup_h, per_domain_h)  # a domain longer than a job gets its own
    per_job = max(1, min(prefs.max_domains_per_job, int(room / per_domain_h) if per_domain_h else 10**9))
    n_jobs = math.ceil(len(domains) / per_job)
    size, extra = divmod(len(domains), n_jobs)
    out, i = [], 0
    for j in range(n_jobs):
        k = size + (j < extra)
        out.append(list(domains[i : i + k]))
        i += k
    return out


def _jobs(
    groups: list[list[str]],
    run_id: str,
    choices: list[Choice],
    hours_of,
    startup_h: float,
    prefs: Preferences,
) -> list[JobPlan]:
    jobs = []
    for i, group in enumerate(groups):
        scored = sorted(
            choices,
            key=lambda c: (
                (startup_h + len(group) * hours_of(c.offer.gpu))
                * c.expected_hour
                * prefs.provider(c.offer.provider).weight,
                c.score,
                c.offer.provider,
                c.offer.instance_type,
                c.offer.region,
            ),
        )
        best = scored[0]
        hours = startup_h + len(group) * hours_of(best.offer.gpu)
        jobs.append(
            JobPlan(
                name=f"{run_id}-j{i + 1}",
                domains=group,
                hours=round(hours, 4),
                cost=round(hours * best.expected_hour, 4),
                offer=OfferRef.of(best),
                fallbacks=[OfferRef.of(c) for c in scored[1 : 1 + prefs.fallbacks]],
            )
        )
    return jobs


def needs_for(work: Workload) -> Needs:
    """GPU memory a job needs: bf16 weights x4 (activations, LoRA, optimizer, CUDA context) + 4 GB."""
    return Needs(gpu_mem_gb=math.ceil(model_params(work.base_model) * 2 / 1e9 * 4 + 4))


def plan_cloud(
    domains: Sequence[str],
    offers: Sequence[Offer],
    prefs: Preferences,
    work: Workload,
    run_id: str,
    *,
    offers_source: str = "snapshot",
    snapshot_date: str | None = None,
) -> Plan:
    """Pick the offer that finishes the domains cheapest, pack the domains into jobs, price them."""
    domains = order(domains, work)
    choices = rank(offers, prefs, needs_for(work))
    if not choices:
        raise NoOffer(_why_none(offers, prefs, work))
    startup_h = prefs.job_startup_minutes / 60
    cache: dict[str, tuple[float, str]] = {}

    def hours_of(gpu: str) -> float:
        if gpu not in cache:
            cache[gpu] = domain_hours(gpu, work)
        return cache[gpu][0]

    # the GPU whose cheapest offer gives the cheapest plan (a fast GPU may beat a cheap one per hour)
    cheapest: dict[str, Choice] = {}
    for c in choices:
        cheapest.setdefault(c.offer.gpu, c)

    def plan_cost(c: Choice) -> float:
        h = hours_of(c.offer.gpu)
        groups = pack(domains, h, startup_h, prefs)
        return (
            sum(startup_h + len(g) * h for g in groups)
            * c.expected_hour
            * prefs.provider(c.offer.provider).weight
        )

    best = min(cheapest.values(), key=lambda c: (plan_cost(c), c.score))
    groups = pack(domains, hours_of(best.offer.gpu), startup_h, prefs)
    jobs = _jobs(groups, run_id, choices, hours_of, startup_h, prefs)
    return _plan(run_id, "skypilot", work, jobs, offers_source, snapshot_date, cache[best.offer.gpu][1])


def plan_local(domains: Sequence[str], prefs: Preferences, work: Workload, run_id: str) -> Plan:
    """All domains on this machine, one job after another, at the configured local $/h (default 0)."""
    domains = order(domains, work)
    gpu = _local_gpu()
    h, source = domain_hours("cpu" if gpu == "cpu" else "A10", work)
    startup_h = LOCAL_STARTUP_MINUTES / 60
    # calibration for a machine unlike the one the table was measured on (bench/train_throughput.py)
    if os.environ.get("MEETARA_LOCAL_TOKENS_S"):
        h = (work.domain_tokens() / float(os.environ["MEETARA_LOCAL_TOKENS_S"]) + 0.7) / 3600
        source = "MEETARA_LOCAL_TOKENS_S"
    if os.environ.get("MEETARA_LOCAL_STARTUP_S"):
        startup_h = float(os.environ["MEETARA_LOCAL_STARTUP_S"]) / 3600
    ref = OfferRef(
        provider="local",
        instance_type=platform.node() or "localhost",
        region="here",
        gpu=gpu,
        gpu_count=1,
        gpu_mem_gb=0,
        spot=False,
        price_hour=prefs.local_price_hour,
        expected_hour=prefs.local_price_hour,
        source="local",
    )
    jobs = []
    for i, group in enumerate(pack(domains, h, startup_h, prefs)):
        hours = startup_h + len(group) * h
        jobs.append(
            JobPlan(
                name=f"{run_id}-j{i + 1}",
                domains=group,
                hours=round(hours, 4),
                cost=round(hours * ref.expected_hour, 4),
                offer=ref,
            )
        )
    return _plan(run_id, "local", work, jobs, "local", None, source)


def _plan(run_id, backend, work, jobs, offers_source, snapshot_date, throughput_source) -> Plan:
    return Plan(
        run_id=run_id,
        backend=backend,
        workload=work,
        jobs=jobs,
        total_hours=round(sum(j.hours for j in jobs), 4),
        total_cost=round(sum(j.cost for j in jobs), 4),
        offers_source=offers_source,
        snapshot_date=snapshot_date,
        throughput_source=throughput_source,
    )


def _local_gpu() -> str:
    """ "cpu", or the CUDA GPU's name when torch is already imported and sees one (no torch import here)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def _why_none(offers: Sequence[Offer], prefs: Preferences, work: Workload) -> str:
    from collections import Counter

    from launcher.select import why_excluded

    if not offers:
        return "no offers at all (check --provider and the offers source)"
    needs = needs_for(work)
    reasons = Counter(
        why_excluded(o, prefs, needs) or "over the max $/GPU-hour or no market allowed" for o in offers
    )
    top, n = reasons.most_common(1)[0]
    return f"no offer passes your preferences ({len(offers)} offers; most common reason, {n}x: {top})"
