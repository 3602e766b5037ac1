"""Planner benchmark: `plan_cloud` for all 62 domains over a 5,000-offer table, and SkyPilot's optimizer
on one job of that plan over the same offers (written as its catalogs under a temporary HOME).

    python bench/plan_bench.py [--offers 5000] [--seed 2026] [--repeat 5] [--out bench/plan_bench.json]

The table is synthesised from the bundled snapshot (seeded): each snapshot row's GPU, shape and
provider, with prices +-30 %, other regions and GPU counts. SkyPilot's own rules shape it: one
on-demand price per instance type and region, one vCPU / memory figure per instance type (so RunPod is
priced per GPU type, count and country, and Lambda per instance type and region, as both really are).
Target: the plan in under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.offers import Offer, load_snapshot  # noqa: E402
from launcher.plan import Workload, plan_cloud  # noqa: E402
from launcher.preferences import Preferences  # noqa: E402

LAMBDA_REGIONS = [
    "us-east-1", "us-east-2", "us-east-3", "us-west-1", "us-west-2", "us-west-3", "us-south-1",
    "us-south-2", "us-south-3", "us-midwest-1", "europe-central-1", "europe-south-1", "asia-south-1",
    "asia-northeast-1", "asia-northeast-2", "australia-east-1", "me-west-1",
]  # fmt: skip
RUNPOD_DATACENTRES = [
    "US-TX-1", "US-TX-3", "US-KS-2", "US-GA-1", "US-GA-2", "US-CA-2", "US-IL-1", "US-NC-1", "US-OR-1",
    "CA-MTL-1", "CA-MTL-3", "EU-RO-1", "EU-SE-1", "EU-CZ-1", "EU-NL-1", "EU-FR-1", "EUR-IS-1",
    "EUR-NO-1", "OC-AU-1", "AP-JP-1", "SEA-SG-1",
]  # fmt: skip
VAST_PLACES = [
    "US-Texas", "US-California", "US-Nevada", "US-Oregon", "US-Virginia", "US-Illinois", "US-Utah",
    "CA-Quebec", "CA-Ontario", "SE-Sweden", "NO-Norway", "FI-Finland", "PL-Poland", "DE-Germany",
    "NL-Netherlands", "FR-France", "ES-Spain", "CZ-Czechia", "JP-Japan", "KR-Korea", "AU-Australia",
    "BR-Brazil", "IN-India", "TW-Taiwan",
]  # fmt: skip


def synthesise(n: int, seed: int) -> list[Offer]:
    """About `n` offers in the snapshot's image (seeded), shaped by SkyPilot's catalog rules."""
    rng = random.Random(seed)
    snap = load_snapshot()

    def jitter(p: float | None) -> float | None:
        return None if p is None else round(p * rng.uniform(0.7, 1.3), 4)

    out: list[Offer] = []
    # Lambda: every instance type of the snapshot in every region, priced per (type, region)
    lam = {o.instance_type: o for o in snap if o.provider == "lambda"}
    for o in lam.values():
        for region in LAMBDA_REGIONS:
            out.append(o.model_copy(update={"region": region, "price_hour": jitter(o.price_hour)}))
    # RunPod: each GPU type in 1/2/4/8-GPU pods in each data centre, priced per (type, count, country)
    pods = {o.instance_type: o for o in snap if o.provider == "runpod" and o.gpu_count == 1}
    for o in pods.values():
        for count in (1, 2, 4, 8):
            by_country: dict[str, float | None] = {}
            for dc in RUNPOD_DATACENTRES:
                country = dc.split("-")[1] if dc.split("-")[0] in ("EU", "EUR", "OC", "AP", "SEA") else dc[:2]
                price = by_country.setdefault(country, jitter(o.price_hour * count))
                out.append(
                    o.model_copy(
                        update={
                            "region": dc,
                            "gpu_count": count,
                            "vcpus": o.vcpus * count,
                            "mem_gib": o.mem_gib * count,
                            "price_hour": price,
                        }
                    )
                )
    # Vast: the rest, one offer per machine (its own id), any place, 1-8 GPUs, bid about half the price
    vast = [o for o in snap if o.provider == "vast"]
    next_id = 40_000_000
    while len(out) < n:
        o = rng.choice(vast)
        count = rng.choice((1, 1, 1, 2, 2, 4, 8))
        per_gpu = (o.price_hour or 0.5) / o.gpu_count
        price = jitter(per_gpu * count)
        out.append(
            o.model_copy(
                update={
                    "instance_type": str(next_id),
                    "region": rng.choice(VAST_PLACES),
                    "gpu_count": count,
                    "vcpus": max(4, o.vcpus // o.gpu_count * count),
                    "mem_gib": round(o.mem_gib / o.gpu_count * count, 1),
                    "price_hour": price,
                    "spot_price_hour": round(price * rng.uniform(0.4, 0.6), 4),
                    "disk_price_hour": round(rng.uniform(0.004, 0.02), 6),
                }
            )
        )
        next_id += rng.randint(1, 500)
    return out[:n]


def best_of(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--offers", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "plan_bench.json")
    args = ap.parse_args()

    from train.domains import load_registry

    domains = [d.name for d in load_registry().domains]
    t0 = time.perf_counter()
    offers = synthesise(args.offers, args.seed)
    synth_s = time.perf_counter() - t0
    # preemption overhead 0: SkyPilot has no such notion, so both sides minimise the same price x time
    prefs = Preferences(preemption_overhead=0)
    work = Workload(base_model="microsoft/DialoGPT-medium")

    plan_s, plan = best_of(lambda: plan_cloud(domains, offers, prefs, work, "bench"), args.repeat)
    job = plan.jobs[0]

    # SkyPilot writes ~/.sky when imported and reads its catalogs from there: a throw-away HOME
    home = Path(tempfile.mkdtemp(prefix="meetara-bench-home-"))
    os.environ["HOME"] = str(home)
    os.environ.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
    try:
        t0 = time.perf_counter()
        import sky

        import_s = time.perf_counter() - t0
        from launcher.skycatalog import sky_choice, write_catalogs

        t0 = time.perf_counter()
        write_catalogs(offers, home)
        write_s = time.perf_counter() - t0
        picks = [sky_choice(job, offers, prefs, work, home, write=False) for _ in range(args.repeat)]
    finally:
        shutil.rmtree(home, ignore_errors=True)
    sky_times = [p.seconds for p in picks]
    ours = (job.offer.provider, job.offer.instance_type, job.offer.region, job.offer.spot)
    theirs = tuple(picks[0])[:4]

    result = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "python": platform.python_version(),
        "skypilot": sky.__version__,
        "offers": len(offers),
        "offers_by_provider": {p: sum(o.provider == p for o in offers) for p in ("lambda", "runpod", "vast")},
        "domains": len(domains),
        "jobs": len(plan.jobs),
        "seed": args.seed,
        "synthesise_s": round(synth_s, 4),
        "plan_cloud_best_s": round(plan_s, 4),
        "plan_cloud_repeat": args.repeat,
        "sky_import_s": round(import_s, 3),
        "sky_catalog_write_s": round(write_s, 4),
        "sky_optimizer_first_s": round(sky_times[0], 4),
        "sky_optimizer_best_s": round(min(sky_times), 4),
        "job": {"name": job.name, "domains": len(job.domains), "hours": job.hours, "cost": job.cost},
        "meetara_pick": list(ours),
        "skypilot_pick": list(theirs),
        "same_pick": ours == theirs,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    split = " / ".join(map(str, result["offers_by_provider"].values()))
    rows = [
        ("offers (lambda / runpod / vast)", f"{len(offers):,} ({split})"),
        ("domains -> jobs", f"{len(domains)} -> {len(plan.jobs)}"),
        (f"plan_cloud, best of {args.repeat}", f"{plan_s * 1000:.1f} ms"),
        ("import sky", f"{import_s:.2f} s"),
        ("write SkyPilot catalogs", f"{write_s * 1000:.1f} ms"),
        ("SkyPilot optimizer, one job: first / best", f"{sky_times[0]:.3f} s / {min(sky_times):.3f} s"),
        ("meetara's pick", " ".join(map(str, ours))),
        ("SkyPilot's pick", " ".join(map(str, theirs)) + (" (same)" if ours == theirs else " (DIFFERENT)")),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"wrote {args.out}")
    return 0 if plan_s < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
