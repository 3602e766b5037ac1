"""The plan: which offer, which domains in which job, how long and how much.

Domains are packed into jobs because a job's fixed start-up (provisioning, setup, base-model download)
costs more than training one small adapter; jobs are capped in domains and hours so that one job's
preemption or failure costs little and jobs can run side by side. Time per domain comes from the
throughput table (launcher/throughput.py) plus the measured per-domain overhead (`STAGE_COSTS`); cost =
hours x expected $/h of the chosen offer, where the expected price includes the spot preemption overhead
(launcher/select.py).
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import AliasChoices, BaseModel, Field

from launcher.offers import Offer
from launcher.preferences import Preferences
from launcher.select import Choice, Needs, rank
from launcher.throughput import model_params, speed
from train.bounds import Epochs, Samples

KEPT_SHARE = 0.9  # share of generated samples the quality filter keeps (measured 85-95 %, bench/RESULTS.md)
# A local job's start-up, from its launch to its first training step: the runner, setup's `import train`,
# `python -m train`'s imports, the base model's load, the first domain's data. Measured by
# bench/local_startup.py (bench/local_startup.json; bench/RESULTS.md, "Local jobs: start-up and load")
# on the 2-core VM at load 1.7-13, as seconds on an idle machine (`local_slowdown`'s rule applied
# backwards to the load each job was planned at): the most any measured job needed beyond the table's
# time for its domain (13.2 s; 2.0 s at load 1.7, training slows more than linearly under load).
# `TINY_BUILD_S`: what the first job adds when the tiny base model is not cached yet (its tokenizer and
# 120 pretraining steps): 6.4 s measured at load 1.8, x3 for the load, as the training above.
LOCAL_STARTUP_S = 13.5
TINY_BUILD_S = 20.0

# What a job spends besides training steps, measured stage by stage by bench/stages.py (recorded in
# bench/stages.json, "planner"; bench/RESULTS.md, "Stage costs" and "Outputs users load") on a 2-core AMD
# EPYC VM, in jobs of 3 domains at two shapes: per domain, data + export (the f16 adapter) + validation
# (reference logits, GGUF read, three evaluations in the job's llama.cpp worker) + upload of the outputs to
# S3; per job, interpreter + imports + base model load/build + the base f16 GGUF's export, its Q4_K_M
# quantization and the upload (the machine's boot, setup and model download are the user's
# `job_startup_minutes`, added on top for cloud jobs). DialoGPT-medium's shape: 2.37 s per domain, 30.7 s
# per job (quantize 11.4 s of it); tiny: 0.15 s and 4.6 s (2026-12-01 11:20, load 1.4-1.5).
# With merged models (`Workload.merged`), each domain adds the merge, its f16 export, its quantization and
# their checks: `MERGED_EXTRA`, the same job measured at the commit before (bench/stages-before.json:
# 26.68 s per domain at the real shape) less the figure above; tiny's from the stage costs of issue 14
# item 2 (1.26 s) less tiny's above; scaled as the rest, with the share that job measured (0.687).
# Scaling rule for other shapes and machines (`overheads`):
# - shape: linear in the base model's parameters through the two measured points (export, quantize,
#   llama.cpp's loads and the uploads move bytes in proportion to the parameters; processes and imports
#   are the fixed part), never below the tiny model's figure;
# - machine: Amdahl, t(c vCPUs) = t(2) x (s + (1 - s) x 2 / c); s, the share of the 2-core time that a
#   second core did not shorten, is each heavy stage timed alone on 1 and on 2 cores (quantize 0.33,
#   llama.cpp checks 0.85-0.90, f16 export 0.97, model build 1.0) weighted by its seconds in the job,
#   other stages counted as serial (`STAGE_SERIAL_SHARE`); s x t(2) is the floor no machine goes below.
STAGE_COSTS_VCPUS = 2  # the measuring machine's cores
# base model: (parameters, per-domain seconds, per-job seconds), at STAGE_COSTS_VCPUS
STAGE_COSTS: dict[str, tuple[float, float, float]] = {
    "tiny": (1.3e6, 0.15, 4.63),
    "microsoft/DialoGPT-medium": (355e6, 2.37, 30.72),
}
STAGE_SERIAL_SHARE = {"per_domain": 0.903, "per_job": 0.747}
# base model: (parameters, per-domain seconds that --merged adds), at STAGE_COSTS_VCPUS; its serial share
MERGED_EXTRA: dict[str, tuple[float, float]] = {
    "tiny": (1.3e6, 1.11),
    "microsoft/DialoGPT-medium": (355e6, 24.31),
}
MERGED_SERIAL_SHARE = 0.687
STAGE_COSTS_SOURCE = "measured (bench/stages.py)"
# a cloud GPU box's vCPUs, for the planner (which prices per GPU type, not per machine, as SkyPilot's
# time estimator does, launcher/skycatalog.py): the bundled snapshot's offers have 6-30 vCPUs per GPU, two
# thirds of them 16 or more; 8 errs on the dear side
CLOUD_VCPUS = 8


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
    samples: Samples = 200
    epochs: Epochs = 2
    max_len: int = Field(128, ge=8)
    warm_start: bool = False  # plan the domains in similarity-chain order; the jobs warm-start them
    merged: bool = False  # also ship each domain's merged Q4_K_M model (`python -m train --merged`)

    def domain_tokens(self) -> float:
        return self.samples * KEPT_SHARE * self.epochs * self.max_len


# What a run ships (issue 14): its base model once as a Q4_K_M GGUF, and per domain an f16 LoRA adapter
# GGUF; with `merged`, each domain's merged model quantized to Q4_K_M as well. The rule for the bytes:
# - a Q4_K_M file: measured where meetara has made one (`Q4_K_M_BYTES`: the base at the real shape and
#   tiny's), else 0.6819 bytes per base parameter, DialoGPT-medium's measured ratio (242,057,248 B for its
#   355M parameters: Q4_K and Q6_K blocks, F32 norms, biases and positions);
# - an adapter: exactly its tensors, f16 lora_a {n_embd, r} and lora_b {r, 3 n_embd} on every layer's
#   c_attn (2 x n_layer x 4 x n_embd x r bytes) + 4 KB for its header (measured 0.6-3.7 KB);
# - upload = pull + each domain's final LoRA weights in f32 (`adapter.safetensors`, for warm starts;
#   not pulled). Checkpoints are not counted: they are deleted with the run's store, never pulled.
Q4_K_M_BYTES: dict[str, int] = {"tiny": 1_454_400, "microsoft/DialoGPT-medium": 242_057_248}
Q4_K_M_BYTES_PER_PARAM = 242_057_248 / 355e6
LORA_R = 8  # `python -m train`'s default rank, which launched jobs use


def _shape(base_model: str) -> tuple[int, int]:
    """(n_layer, n_embd) of a known base model."""
    from train.model import GPT2_SHAPES, TINY_CONFIG

    arch = base_model.removeprefix("random:")
    if arch == "tiny":
        return TINY_CONFIG["n_layer"], TINY_CONFIG["n_embd"]
    if arch not in GPT2_SHAPES:
        raise ValueError(f"unknown base model {base_model!r}; known: tiny, {', '.join(GPT2_SHAPES)}")
    return GPT2_SHAPES[arch][:2]


class OutputBytes(BaseModel):
    """Bytes a run's outputs take: uploaded by its jobs, pulled by `meetara pull` (the rule above)."""

    domains: int
    base_q4_k_m: int
    adapter: int  # each domain's
    merged_q4_k_m: int  # each domain's, 0 unless `merged`
    pull: int
    upload: int

    def describe(self) -> str:
        merged = f" + {self.domains} merged Q4_K_M x {_mb(self.merged_q4_k_m)}" if self.merged_q4_k_m else ""
        return (
            f"outputs: {_mb(self.pull)} to pull (base Q4_K_M {_mb(self.base_q4_k_m)} once + {self.domains} "
            f"adapters x {_mb(self.adapter)}{merged}), {_mb(self.upload)} uploaded"
        )


def _mb(n: int) -> str:
    """Bytes in decimal units (GB = 1e9)."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def output_bytes(work: Workload, domains: int) -> OutputBytes:
    """The bytes a run of `domains` domains ships and uploads, from the base model's shape (rule above)."""
    arch = work.base_model.removeprefix("random:")
    q4 = Q4_K_M_BYTES.get(arch) or round(model_params(arch) * Q4_K_M_BYTES_PER_PARAM)
    n_layer, n_embd = _shape(work.base_model)
    tensors = n_layer * 4 * n_embd * LORA_R  # lora_a + lora_b elements
    adapter = 2 * tensors + 4096
    merged = q4 if work.merged else 0
    pull = q4 + domains * (adapter + merged)
    return OutputBytes(
        domains=domains,
        base_q4_k_m=q4,
        adapter=adapter,
        merged_q4_k_m=merged,
        pull=pull,
        upload=pull + domains * 4 * tensors,
    )


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
    outputs: OutputBytes | None = None  # the bytes the planned domains upload and pull (`output_bytes`)

    def job(self, name: str) -> JobPlan:
        return next(j for j in self.jobs if j.name == name)


class NoOffer(ValueError):
    """No offer passes the preferences (the message says which rule excluded the most)."""


@dataclass(frozen=True)
class Overheads:
    """Seconds a job spends besides training steps: per domain and once per job (`STAGE_COSTS`)."""

    per_domain_s: float
    per_job_s: float
    vcpus: int
    source: str
    job_source: str | None = None  # where per_job_s comes from, when not from `source`

    def describe(self) -> str:
        if self.job_source:
            return (
                f"overheads: {self.per_domain_s:.1f} s/domain, {self.source}; "
                f"{self.per_job_s:.1f} s/job, {self.job_source}"
            )
        return f"overheads: {self.per_domain_s:.1f} s/domain, {self.per_job_s:.1f} s/job, {self.source}"


def overheads(base_model: str, vcpus: int = STAGE_COSTS_VCPUS, merged: bool = False) -> Overheads:
    """The measured overheads (`STAGE_COSTS`, + `MERGED_EXTRA` with `merged`) for `base_model` on a
    machine of `vcpus`, scaled by the stated rule (above `STAGE_COSTS`)."""
    n = model_params(base_model)
    (n0, d0, j0), (n1, d1, j1) = STAGE_COSTS["tiny"], STAGE_COSTS["microsoft/DialoGPT-medium"]
    (_, m0), (_, m1) = MERGED_EXTRA["tiny"], MERGED_EXTRA["microsoft/DialoGPT-medium"]

    def shape(lo: float, hi: float) -> float:
        return max(lo, lo + (hi - lo) * (n - n0) / (n1 - n0))

    def machine(t: float, serial: float) -> float:
        return t * (serial + (1 - serial) * STAGE_COSTS_VCPUS / max(1, vcpus))

    arch = base_model.removeprefix("random:")
    scaled = [] if arch in STAGE_COSTS or n in (n0, n1) else [f"{n / 1e6:.0f}M params"]
    if vcpus != STAGE_COSTS_VCPUS:
        scaled.append(f"{vcpus} vCPUs")
    extra = machine(shape(m0, m1), MERGED_SERIAL_SHARE) if merged else 0.0
    return Overheads(
        per_domain_s=round(machine(shape(d0, d1), STAGE_SERIAL_SHARE["per_domain"]) + extra, 2),
        per_job_s=round(machine(shape(j0, j1), STAGE_SERIAL_SHARE["per_job"]), 2),
        vcpus=vcpus,
        source=STAGE_COSTS_SOURCE + (f" scaled to {' and '.join(scaled)}" if scaled else ""),
    )


def _vcpus(gpu: str) -> int:
    """The vCPUs the overheads are scaled to: the measuring machine's for "cpu", a cloud GPU box's else."""
    return STAGE_COSTS_VCPUS if gpu == "cpu" else CLOUD_VCPUS


def domain_hours(gpu: str, work: Workload, vcpus: int | None = None) -> tuple[float, str]:
    """Hours to train, export, validate and upload one domain on one `gpu` ("cpu" for this machine):
    training tokens / the GPU's tokens/s (launcher/throughput.py) + the measured per-domain overhead
    (`overheads`) on a machine of `vcpus` (default: `_vcpus(gpu)`)."""
    s = speed(gpu, work.base_model)
    overhead_s = overheads(work.base_model, vcpus or _vcpus(gpu), work.merged).per_domain_s
    return (work.domain_tokens() / s.tokens_per_s + overhead_s) / 3600, s.source


def job_startup_hours(prefs: Preferences, work: Workload) -> float:
    """A cloud job's fixed start-up: the user's `job_startup_minutes` (boot, setup, model download) + the
    measured per-job overhead (imports, model load, base GGUF export and upload) on a GPU box."""
    return prefs.job_startup_minutes / 60 + overheads(work.base_model, CLOUD_VCPUS).per_job_s / 3600


def plan_overheads(plan: Plan) -> Overheads:
    """The overheads `plan` was priced with (for `meetara plan`'s caption). A local plan's per-job
    figure is its start-up (`local_startup_s`, or MEETARA_LOCAL_STARTUP_S)."""
    if plan.backend != "local":
        return overheads(plan.workload.base_model, CLOUD_VCPUS, plan.workload.merged)
    o = overheads(plan.workload.base_model, _local_vcpus(), plan.workload.merged)
    startup_s, job_source = local_startup_s(plan.workload)
    return Overheads(o.per_domain_s, startup_s, o.vcpus, o.source, job_source)


def local_slowdown(vcpus: int | None = None) -> float:
    """How many times longer than on an idle machine a local job takes now: its threads share this
    machine's cores with what already runs there (the 1-minute load average), so 1 + load / cores
    (bench/RESULTS.md, "Local jobs: start-up and load", checks the rule against measured jobs)."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this system: price it as idle
        load = 0.0
    return 1.0 + max(load, 0.0) / (vcpus or _local_vcpus())


def local_startup_s(work: Workload, slowdown: float | None = None) -> tuple[float, str]:
    """A local job's start-up in seconds and where the figure comes from: MEETARA_LOCAL_STARTUP_S as
    given, else the measured `LOCAL_STARTUP_S` (+ `TINY_BUILD_S` when the tiny base model is not cached
    yet) x the machine's slowdown now (`local_slowdown`)."""
    env = os.environ.get("MEETARA_LOCAL_STARTUP_S")
    if env:
        return float(env), "MEETARA_LOCAL_STARTUP_S"
    slow = local_slowdown() if slowdown is None else slowdown
    seconds = LOCAL_STARTUP_S + (0.0 if _tiny_cached(work) else TINY_BUILD_S)
    return round(seconds * slow, 2), f"measured start-up (bench/local_startup.py) x {slow:.2f} for the load"


def _tiny_cached(work: Workload) -> bool:
    """Whether the job finds its base model built (only the tiny one is built by the job itself)."""
    if work.base_model != "tiny":
        return True
    from train.domains import load_registry
    from train.model import cache_dir, tiny_key

    return (cache_dir() / f"tiny-{tiny_key(load_registry())}" / "model.safetensors").exists()


def _local_vcpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    startup_h = job_startup_hours(prefs, work)
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
    vcpus = _local_vcpus()
    # the measured figures are an idle machine's: a loaded one shares its cores with the job
    slow = local_slowdown(vcpus)
    h, source = domain_hours("cpu" if gpu == "cpu" else "A10", work, vcpus)
    h *= slow
    # calibration for a machine unlike the one the table was measured on (bench/train_throughput.py)
    if os.environ.get("MEETARA_LOCAL_TOKENS_S"):
        overhead_s = overheads(work.base_model, vcpus, work.merged).per_domain_s
        h = (work.domain_tokens() / float(os.environ["MEETARA_LOCAL_TOKENS_S"]) + overhead_s) / 3600
        source = "MEETARA_LOCAL_TOKENS_S"
    startup_h = local_startup_s(work, slow)[0] / 3600
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
        outputs=output_bytes(work, sum(len(j.domains) for j in jobs)),
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
