"""meetara's offers as SkyPilot catalogs, and SkyPilot's own optimizer run offline over them.

SkyPilot prices tasks from CSV catalogs, `<home>/.sky/catalogs/v8/<cloud>/vms.csv`. Written in
SkyPilot's own naming (instance types its provisioners can parse, its accelerator names, RunPod's
country + data-centre split, Vast's "place, CC" regions), meetara's offers become machines SkyPilot can
price, validate and launch, and a test can check that both pick the same machine for a job.

A catalog written by hand has no `.meta/<cloud>/vms.csv.md5` beside it, which SkyPilot reads as "edited
by the user": it never re-fetches it from its hosted mirror, and it ships it to its jobs controller
as it is (`sky.catalog.common.get_modified_catalog_file_mounts`).

Importing this module is cheap (no SkyPilot, no pandas); SkyPilot is imported by the functions that
run it.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from launcher.offers import Offer
from launcher.preferences import Preferences
from train import first_line

if TYPE_CHECKING:
    from launcher.plan import JobPlan, OfferRef, Workload

CATALOG_VERSION = "v8"  # sky.skylet.constants.CATALOG_SCHEMA_VERSION in skypilot 0.14
SKY_CLOUD = {"lambda": "lambda", "runpod": "runpod", "vast": "vast"}  # meetara provider -> SkyPilot infra
PROVIDER_OF = {"lambda": "lambda", "runpod": "runpod", "vast": "vast"}  # str(cloud).lower() -> provider
_CLOUD_CLASS = {"lambda": "Lambda", "runpod": "RunPod", "vast": "Vast"}

# The columns each SkyPilot catalog reader expects, in the order its own fetchers write them.
CATALOG_COLUMNS: dict[str, list[str]] = {
    "lambda": [
        "InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "Price", "Region",
        "GpuInfo", "SpotPrice",
    ],
    "runpod": [
        "InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "Region", "SpotPrice",
        "Price", "AvailabilityZone", "GpuInfo",
    ],
    "vast": [
        "InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "GpuInfo", "Price",
        "SpotPrice", "Region", "HostingType",
    ],
}  # fmt: skip

# RunPod GPU type ids (what meetara's RunPod offers carry as instance_type) -> the key SkyPilot's RunPod
# catalog and provisioner use in instance types such as "1x_RTX4090_SECURE" (its provision/runpod
# GPU_NAME_MAP, inverted; tests/test_task.py checks the two agree).
RUNPOD_GPU_KEYS: dict[str, str] = {
    "NVIDIA A100 80GB PCIe": "A100-80GB",
    "NVIDIA A100-SXM4-80GB": "A100-80GB-SXM",
    "NVIDIA A30": "A30",
    "NVIDIA A40": "A40",
    "NVIDIA B200": "B200",
    "NVIDIA GeForce RTX 3090": "RTX3090",
    "NVIDIA GeForce RTX 3090 Ti": "RTX3090Ti",
    "NVIDIA GeForce RTX 4080": "RTX4080",
    "NVIDIA GeForce RTX 4090": "RTX4090",
    "NVIDIA GeForce RTX 5090": "RTX5090",
    "NVIDIA H100 80GB HBM3": "H100-SXM",
    "NVIDIA H100 NVL": "H100-NVL",
    "NVIDIA H100 PCIe": "H100",
    "NVIDIA H200": "H200-SXM",
    "NVIDIA L4": "L4",
    "NVIDIA L40": "L40",
    "NVIDIA L40S": "L40S",
    "NVIDIA RTX 4000 Ada Generation": "RTX4000-Ada",
    "NVIDIA RTX 5000 Ada Generation": "RTX5000-Ada",
    "NVIDIA RTX 6000 Ada Generation": "RTX6000-Ada",
    "NVIDIA RTX A4000": "RTXA4000",
    "NVIDIA RTX A4500": "RTXA4500",
    "NVIDIA RTX A5000": "RTXA5000",
    "NVIDIA RTX A6000": "RTXA6000",
}

# meetara GPU -> Vast's own `gpu_name`, for offers that do not carry Vast's name (`Offer.gpu_name`: the
# bundled snapshot, offers rebuilt from a run record's OfferRefs). SkyPilot's Vast provisioner reads the
# name back from the instance type. meetara's names drop the form factor of the A100 and H100, so those
# entries are the most common Vast variant, not necessarily the offer's own; an offer from a live search
# carries its own name and never comes here.
VAST_GPU_NAMES: dict[str, str] = {
    "A100-40GB": "A100 PCIE",
    "A100-80GB": "A100 SXM4",
    "A100": "A100 SXM4",
    "H100": "H100 SXM",
    "H100-NVL": "H100 NVL",
    "H200-NVL": "H200 NVL",
    "GH200": "GH200 SXM",
    "RTX8000": "Q RTX 8000",
    "RTX6000": "Q RTX 6000",
    "V100": "Tesla V100",
    "T4": "Tesla T4",
    "P100": "Tesla P100",
}

# RunPod data-centre ids ("US-TX-3", "EU-RO-1", "EUR-IS-2", "CA-MTL-1") name their country first, or
# second after a continent prefix; SkyPilot's RunPod region is that country, its zone the data centre.
_CONTINENT_PREFIXES = {"EU", "EUR", "OC", "AP", "SEA", "AF", "SA", "ME", "NA"}


def sky_accelerator(provider: str, instance_type: str, gpu: str) -> str:
    """The accelerator name SkyPilot's catalog for `provider` uses for this machine."""
    if provider == "lambda":
        parts = instance_type.lower().split("_")
        if len(parts) >= 3 and parts[0] == "gpu":
            # Lambda's instance types name the GPU: gpu_1x_a100_sxm4 -> A100 (40 GB), unless "80gb" says so
            return "A100-80GB" if parts[2] == "a100" and "80gb" in parts else parts[2].upper()
    if provider == "runpod" and instance_type in RUNPOD_GPU_KEYS:
        return RUNPOD_GPU_KEYS[instance_type]
    if re.fullmatch(r"A\d{4}", gpu):  # the RTX A-series workstation cards: SkyPilot says RTXA6000
        return "RTX" + gpu
    return "A100" if gpu == "A100-40GB" else gpu


def sky_instance_type(provider: str, instance_type: str, gpu: str, gpu_count: int, gpu_name: str = "") -> str:
    """The instance type SkyPilot's provisioner for `provider` can launch for this offer.

    Lambda's are Lambda's own. RunPod's are `<n>x_<GPU key>_SECURE` (the offers are secure-cloud
    prices). Vast's are SkyPilot's invention `<n>x-<gpu_name>-<cores>-<RAM MB>`, of which the
    provisioner reads the count, the Vast GPU name (spaces as `_`) and the RAM floor: meetara writes
    `<n>x-<gpu_name>-m<offer id>-0`, so that each offer stays its own catalog row and meetara's SkyPilot
    plugin (launcher/skyplugin.py) rents exactly that offer; the RAM floor is 0. `gpu_name` is the
    provider's own name for the GPU (`Offer.gpu_name`), Vast's verbatim in its instance type.
    """
    if provider == "runpod":
        key = RUNPOD_GPU_KEYS.get(instance_type) or sky_accelerator(provider, instance_type, gpu)
        return f"{gpu_count}x_{key}_SECURE"
    if provider == "vast":
        return f"{gpu_count}x-{vast_gpu_name(gpu, gpu_name).replace(' ', '_')}-m{instance_type}-0"
    return instance_type


def vast_gpu_name(gpu: str, gpu_name: str = "") -> str:
    """Vast's `gpu_name` for an offer of meetara's `gpu`: the offer's own (`gpu_name`) where it has one
    that SkyPilot's parser gives back unchanged (it splits the instance type at "-" and reads "_" as a
    space), else the usual Vast spelling of that GPU."""
    name = " ".join(gpu_name.split())
    if name and "-" not in name and "_" not in name:
        return name
    return VAST_GPU_NAMES.get(gpu) or _vast_name(gpu)


def _vast_name(gpu: str) -> str:
    m = re.fullmatch(r"RTX(\d{4})(S?)(Ti)?", gpu)
    if m:  # RTX3090Ti -> "RTX 3090 Ti", RTX4070STi -> "RTX 4070S Ti"
        return f"RTX {m.group(1)}{m.group(2)}" + (" Ti" if m.group(3) else "")
    m = re.fullmatch(r"RTX(\d{4})-Ada", gpu)
    if m:  # RTX6000-Ada -> "RTX 6000Ada"
        return f"RTX {m.group(1)}Ada"
    if re.fullmatch(r"A\d{4}", gpu):
        return f"RTX {gpu}"
    return gpu


def sky_location(provider: str, region: str) -> tuple[str, str | None]:
    """(region, zone) in SkyPilot's terms for a meetara region."""
    if provider == "runpod":
        parts = region.split("-")
        if len(parts) < 2:
            return region, None  # a bare country code (what RunPod's API reports)
        country = parts[1] if parts[0] in _CONTINENT_PREFIXES else parts[0]
        return country, region
    if provider == "vast":
        # meetara writes Vast's "Texas, US" as "US-Texas" (launcher/providers/vast.py); SkyPilot's
        # provisioner reads the country from the last two characters of the region
        country, _, place = region.partition("-")
        if not re.fullmatch(r"[A-Z]{2}", country):
            # a region written before the country code led ("Sweden", "unknown"), from a run record
            from launcher.providers.vast import UNKNOWN_COUNTRY, country_code

            country, place = country_code(region) or UNKNOWN_COUNTRY, region
        return (f"{place}, {country}" if place else country), None
    return region, None


def sky_key(o: OfferRef | Offer, spot: bool | None = None) -> tuple[str, str, str, str | None, bool]:
    """(provider, instance type, region, zone, spot) of an offer in SkyPilot's terms: what a launched
    managed job reports (`JobStatus.placed`). The zone is None where meetara's region names none."""
    region, zone = sky_location(o.provider, o.region)
    itype = sky_instance_type(o.provider, o.instance_type, o.gpu, o.gpu_count, o.gpu_name)
    return o.provider, itype, region, zone, bool(o.spot if spot is None else spot)


def placed_index(offers: Sequence[OfferRef], placed: tuple) -> int | None:
    """Which of a job's offers SkyPilot placed it on (`placed` as `sky_key`), or None. A RunPod offer
    priced per country matches any data centre of it."""
    provider, itype, region, zone, spot = placed
    for i, o in enumerate(offers):
        p, t, r, z, s = sky_key(o)
        if (p, t, r, s) == (provider, itype, region, bool(spot)) and (z is None or z == zone):
            return i
    return None


def offers_from_refs(refs: Sequence[OfferRef | Offer]) -> list[Offer]:
    """Offers for SkyPilot's catalogs from a plan's OfferRefs (what a run record keeps), priced for
    the market each was planned in, with the vCPUs and memory the ref carries (0 in a run record saved
    before refs kept them: `machine_shape` derives them when the rows are built). Offers pass through;
    local refs are left out."""
    from datetime import UTC, datetime

    out: list[Offer] = []
    for r in refs:
        if isinstance(r, Offer):
            out.append(r)
            continue
        if r.provider not in SKY_CLOUD:
            continue
        out.append(
            Offer(
                provider=r.provider,
                instance_type=r.instance_type,
                gpu=r.gpu,
                gpu_name=r.gpu_name,
                gpu_count=r.gpu_count,
                gpu_mem_gb=round(r.gpu_mem_gb),
                vcpus=max(int(r.vcpus), 0),
                mem_gib=max(float(r.mem_gib), 0.0),
                region=r.region,
                price_hour=None if r.spot else r.price_hour,
                spot_price_hour=r.price_hour if r.spot else None,
                fetched_at=datetime.now(UTC),
                source="live" if r.source == "live" else "snapshot",
            )
        )
    return out


@functools.cache
def _snapshot_shapes() -> tuple[dict[tuple[str, str, int], tuple[float, float]], list[Offer]]:
    from launcher.offers import load_snapshot

    snap = [o for o in load_snapshot() if o.vcpus > 0 and o.mem_gib > 0]
    exact = {(o.provider, o.instance_type, o.gpu_count): (float(o.vcpus), float(o.mem_gib)) for o in snap}
    return exact, snap


def machine_shape(o: Offer) -> tuple[float, float]:
    """(vCPUs, memory GiB) for the catalog row of `o`: both positive, as SkyPilot requires.

    Every provider states them per offer (Vast: the rental's share of the host's cores and RAM; RunPod:
    the `minVcpu` / `minMemory` of its cheapest pod of that GPU; Lambda: the instance type's specs), and
    they are used as stated. Where an offer has none (a run record saved before OfferRefs kept them, or a
    provider answer with 0), they are derived: from the same machine (provider, instance type, GPU
    count) in the bundled snapshot, else as the smallest per-GPU figures among the snapshot's offers of
    that provider and GPU (else of that provider, else of any) times the GPU count. That is a floor for
    such a machine, in the spirit of SkyPilot's own RunPod fetcher falling back to the API's minimum
    (sky/catalog/data_fetchers/fetch_runpod.py, `get_gpu_info`); SkyPilot only uses the figures to
    validate and display resources, and to filter when a task asks for cpus / memory (meetara's don't).
    """
    if o.vcpus > 0 and o.mem_gib > 0:
        return float(o.vcpus), float(o.mem_gib)
    exact, snap = _snapshot_shapes()
    found = exact.get((o.provider, o.instance_type, o.gpu_count))
    if found is None:
        for pool in (
            [x for x in snap if x.provider == o.provider and x.gpu == o.gpu],
            [x for x in snap if x.provider == o.provider],
            snap,
        ):
            if pool:
                per_gpu_cpus = min(x.vcpus / x.gpu_count for x in pool)
                per_gpu_mem = min(x.mem_gib / x.gpu_count for x in pool)
                found = (round(per_gpu_cpus * o.gpu_count, 1), round(per_gpu_mem * o.gpu_count, 1))
                break
        else:  # an empty snapshot: one vCPU and one GiB per GPU rather than a row SkyPilot refuses
            found = (float(o.gpu_count), float(o.gpu_count))
    vcpus, mem = found
    return (float(o.vcpus) if o.vcpus > 0 else vcpus), (float(o.mem_gib) if o.mem_gib > 0 else mem)


def check_catalog_rows(offers: Sequence[OfferRef | Offer]) -> int:
    """Every catalog row meetara would write for `offers` (OfferRefs or Offers) passes SkyPilot's own
    validation; returns the number of (row, market) pairs checked. Raises BadInput, one line naming the
    first bad row, otherwise; BackendError when SkyPilot is not installed.

    The rows are written to a temporary catalog (the real one is not touched) and read back through
    SkyPilot's catalog readers. Each row, in each market it is priced in, must make a `sky.Resources`
    (instance type, region, zone, market) with the row's vCPUs and memory (`Resources._set_cpus`,
    `_set_memory`, `_try_validate_cpus_mem` against the catalog), and survive the round trip
    `Resources.from_yaml_config(r.to_yaml_config())`: that is where `sky jobs launch` failed with
    'The "memory" field should be positive' (`to_yaml_config` writes the `memory` property, which
    reads the catalog's MemoryGiB, and `from_yaml_config` validates it; sky/resources.py).
    """
    import tempfile

    from train import BadInput

    rows_of = offers_from_refs(offers)
    if not rows_of:
        return 0
    try:
        import sky
    except ImportError:
        from launcher.backends.base import BackendError

        raise BackendError('SkyPilot is not installed: pip install "meetara[cloud]"') from None
    cat = build_catalog(rows_of)
    checked = 0
    with tempfile.TemporaryDirectory(prefix="meetara-skycat-") as tmp:
        write_catalogs(rows_of, Path(tmp))
        providers = sorted({o.provider for o in rows_of})
        with offline_sky(Path(tmp), providers):
            for cloud, rows in cat.rows.items():
                for row in rows:
                    zone = row.get("AvailabilityZone")
                    infra = "/".join([cloud, row["Region"], *([zone] if zone else [])])
                    for spot, price in ((False, row["Price"]), (True, row["SpotPrice"])):
                        if price is None:
                            continue
                        try:
                            r = sky.Resources(
                                infra=infra,
                                instance_type=row["InstanceType"],
                                use_spot=spot,
                                cpus=_num(row["vCPUs"]),
                                memory=_num(row["MemoryGiB"]),
                            )
                            sky.Resources.from_yaml_config(r.copy(cpus=None, memory=None).to_yaml_config())
                        except Exception as e:  # ValueError from SkyPilot's checks, or whatever else
                            market = "spot" if spot else "on-demand"
                            raise BadInput(
                                f"SkyPilot refuses the {cloud} catalog row {row['InstanceType']} in {infra} "
                                f"({market}; vCPUs {row['vCPUs']}, memory {row['MemoryGiB']} GiB): "
                                f"{first_line(e)}"
                            ) from None
                        checked += 1
    return checked


def _num(value: float) -> str:
    return str(float(value))  # as the CSV holds it, so SkyPilot's exact comparison with the catalog holds


def catalog_dir(home: Path) -> Path:
    """Where SkyPilot reads its catalogs when its HOME (or SKY_RUNTIME_DIR) is `home`."""
    return Path(home) / ".sky" / "catalogs" / CATALOG_VERSION


@dataclass
class SkyCatalog:
    """Catalog rows per SkyPilot cloud, and the way back from a SkyPilot pick to meetara's offers."""

    rows: dict[str, list[dict]] = field(default_factory=dict)
    # (cloud, instance type, region) -> [(zone, offer)]
    offers: dict[tuple[str, str, str], list[tuple[str | None, Offer]]] = field(default_factory=dict)
    gpu_of: dict[tuple[str, str], str] = field(default_factory=dict)  # (cloud, accelerator) -> meetara GPU
    gpu_mem_gb: dict[str, float] = field(default_factory=dict)  # accelerator -> memory of one GPU

    def offer_for(self, cloud: str, instance_type: str, region: str, zone: str | None, spot: bool) -> Offer:
        """The meetara offer behind a SkyPilot launchable (the cheapest where several share it)."""
        found = [
            o
            for z, o in self.offers.get((cloud, instance_type, region), [])
            if (zone is None or z == zone) and o.effective_price(spot) is not None
        ]
        if not found:
            raise KeyError(f"no meetara offer behind {cloud} {instance_type} {region} {zone}")
        return min(found, key=lambda o: (o.effective_price(spot), o.region))


def _price(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def build_catalog(offers: Sequence[Offer]) -> SkyCatalog:
    """meetara offers as SkyPilot catalog rows (SkyPilot's column names and naming).

    SkyPilot wants one vCPU / memory figure per instance type and one on-demand price per instance type
    and region; the first row of an instance type sets its shape, and a second row for the same
    (instance type, region, zone) keeps the cheaper prices. A RunPod instance type priced differently in
    two data centres of one country breaks SkyPilot's rule and raises ValueError.
    """
    cat = SkyCatalog()
    shapes: dict[tuple[str, str], tuple[float, float]] = {}
    keyed: dict[tuple[str, str, str, str | None], dict] = {}
    for o in offers:
        cloud = SKY_CLOUD[o.provider]
        acc = sky_accelerator(o.provider, o.instance_type, o.gpu)
        itype = sky_instance_type(o.provider, o.instance_type, o.gpu, o.gpu_count, o.gpu_name)
        region, zone = sky_location(o.provider, o.region)
        cat.gpu_of.setdefault((cloud, acc), o.gpu)
        cat.gpu_mem_gb[acc] = float(o.gpu_mem_gb)
        cat.offers.setdefault((cloud, itype, region), []).append((zone, o))
        vcpus, mem = shapes.setdefault((cloud, itype), machine_shape(o))
        mib = o.gpu_mem_gb * 1024
        gpu_info = {
            "Gpus": [
                {
                    "Name": acc,
                    "Manufacturer": "NVIDIA",
                    "Count": o.gpu_count,
                    "MemoryInfo": {"SizeInMiB": mib},
                }
            ],
            "TotalGpuMemoryInMiB": mib * o.gpu_count,
        }
        row = {
            "InstanceType": itype,
            "AcceleratorName": acc,
            "AcceleratorCount": float(o.gpu_count),
            "vCPUs": float(vcpus),
            "MemoryGiB": float(mem),
            "Price": o.effective_price(False),
            "SpotPrice": o.effective_price(True),
            "Region": region,
            "AvailabilityZone": zone,
            "GpuInfo": repr(gpu_info),  # SkyPilot reads it back with ast.literal_eval
            "HostingType": 0,
        }
        zones = [zone] if zone is not None or o.provider != "runpod" else _runpod_zones(region)
        for z in zones:
            key = (cloud, itype, region, z)
            old = keyed.get(key)
            if old is None:
                keyed[key] = {**row, "AvailabilityZone": z}
                continue
            for col in ("Price", "SpotPrice"):
                prices = [p for p in (old[col], row[col]) if p is not None]
                old[col] = min(prices) if prices else None
    ondemand: dict[tuple[str, str, str], set[float]] = {}
    for (cloud, itype, region, _), row in keyed.items():
        if row["Price"] is not None:
            ondemand.setdefault((cloud, itype, region), set()).add(row["Price"])
        cat.rows.setdefault(cloud, []).append(row)
    for (cloud, itype, region), prices in ondemand.items():
        if len(prices) > 1:
            raise ValueError(
                f"{cloud} {itype} has {len(prices)} on-demand prices in region {region}; SkyPilot needs one"
            )
    return cat


def _runpod_zones(country: str) -> list[str]:
    """RunPod data centres of a country, as SkyPilot's RunPod catalog fetcher lists them (the country
    itself if that list cannot be had): an offer priced per country is offered in each of them."""
    try:
        from sky.catalog.data_fetchers.fetch_runpod import REGION_ZONES
    except Exception:  # the fetcher imports runpod's SDK; without it the country stands in for its zones
        return [country]
    return list(REGION_ZONES.get(country) or [country])


def write_catalogs(offers: Sequence[Offer], home: Path, *, merge: bool = False) -> dict[str, Path]:
    """Write `offers` as SkyPilot's lambda / runpod / vast catalogs under `home`; returns the paths.

    Each file is replaced whole (written beside it, then renamed). A cloud with no offers gets a
    catalog with a header only, so SkyPilot never goes to the network for it. With `merge`, the rows
    already there stay, except those of the instance types meetara writes (SkyPilot wants one shape per
    instance type, so meetara's rows replace an instance type's rows rather than join them).
    """
    cat = build_catalog(offers)
    out: dict[str, Path] = {}
    for cloud, columns in CATALOG_COLUMNS.items():
        path = catalog_dir(home) / cloud / "vms.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {**row, "Price": _price(row["Price"]), "SpotPrice": _price(row["SpotPrice"])}
            for row in cat.rows.get(cloud, [])
        ]
        if merge:
            ours = {row["InstanceType"] for row in rows}
            rows = [r for r in _read_rows(path) if r.get("InstanceType") not in ours] + rows
        _write_rows(path, columns, rows)
        out[cloud] = path
    out.update(_write_common(cat, home))
    return out


def _write_common(cat: SkyCatalog, home: Path) -> dict[str, Path]:
    """SkyPilot's common catalogs (accelerator names per cloud, GPU memory), with the accelerators of
    `cat` merged in: SkyPilot canonicalises names against them and would otherwise download them."""
    names: dict[str, set[str]] = {}
    for cloud, acc in cat.gpu_of:
        names.setdefault(acc, set()).add(_CLOUD_CLASS[cloud])
    d = catalog_dir(home) / "common"
    d.mkdir(parents=True, exist_ok=True)
    acc_path, meta_path = d / "accelerators.csv", d / "metadata.csv"
    acc = _read_rows(acc_path)
    for row in acc:
        extra = names.pop(row.get("AcceleratorName", ""), set())
        have = {c.strip() for c in (row.get("Clouds") or "").split(",") if c.strip()}
        row["Clouds"] = ", ".join(sorted(have | extra))
    acc += [{"AcceleratorName": n, "Clouds": ", ".join(sorted(c))} for n, c in sorted(names.items())]
    meta = _read_rows(meta_path)
    known = {r.get("GPU") for r in meta}
    meta += [
        {"GPU": n, "MemoryGB": f"{gb:g}", "Manufacturer": "NVIDIA"}
        for n, gb in sorted(cat.gpu_mem_gb.items())
        if n not in known
    ]
    _write_rows(acc_path, ["AcceleratorName", "Clouds"], acc)
    _write_rows(meta_path, ["GPU", "MemoryGB", "Manufacturer"], meta)
    return {"common/accelerators": acc_path, "common/metadata": meta_path}


def _read_rows(path: Path) -> list[dict]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _write_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Replace the CSV at `path` whole (written beside it, then renamed: SkyPilot never reads half)."""
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


class SkyChoice(NamedTuple):
    """SkyPilot's pick, in meetara's terms, and how long its optimizer took."""

    provider: str
    instance_type: str
    region: str
    spot: bool
    seconds: float


@contextlib.contextmanager
def offline_sky(home: Path, providers: Sequence[str]) -> Iterator[None]:
    """SkyPilot reads its lambda / runpod / vast catalogs from `home` and considers `providers` enabled.

    SkyPilot binds each catalog to a file path when its catalog module is first imported (from the
    HOME of that moment), canonicalises accelerator names against a common catalog it downloads, and
    asks `sky check` (credentials, network) which clouds are enabled; all three are patched for the
    duration, and restored after.
    """
    import pandas as pd
    import sky
    from sky import check as sky_check
    from sky.catalog import common, lambda_catalog, runpod_catalog, vast_catalog
    from sky.utils import accelerator_registry

    modules = {"lambda": lambda_catalog, "runpod": runpod_catalog, "vast": vast_catalog}
    saved = {name: mod._df for name, mod in modules.items()}
    saved_acc = accelerator_registry._accelerator_df
    saved_check = sky_check.get_cached_enabled_clouds_or_refresh
    order = [p for p in ("runpod", "vast", "lambda") if p in providers]
    enabled = [getattr(sky, _CLOUD_CLASS[p])() for p in order]
    try:
        names: dict[str, set[str]] = {}
        for name, mod in modules.items():
            path = catalog_dir(home) / name / "vms.csv"
            mod._df = common.LazyDataFrame(str(path), update_if_stale_func=lambda: False)
            for acc in pd.read_csv(path)["AcceleratorName"].dropna():
                names.setdefault(acc, set()).add(_CLOUD_CLASS[name])
        # Resources.validate() canonicalises accelerator names against SkyPilot's common catalog (which
        # it would download); these catalogs' own names are the canonical ones here
        accelerator_registry._accelerator_df = pd.DataFrame(
            {"AcceleratorName": list(names), "Clouds": [", ".join(sorted(c)) for c in names.values()]}
        )
        sky_check.get_cached_enabled_clouds_or_refresh = lambda *a, **k: list(enabled)
        yield
    finally:
        for name, mod in modules.items():
            mod._df = saved[name]
        accelerator_registry._accelerator_df = saved_acc
        sky_check.get_cached_enabled_clouds_or_refresh = saved_check


def sky_choice(
    job: JobPlan,
    offers: Sequence[Offer],
    prefs: Preferences,
    work: Workload,
    home: Path,
    *,
    write: bool = True,
) -> SkyChoice:
    """The machine SkyPilot's optimizer picks for `job`, offline, over `offers` as its catalogs.

    The preferences become SkyPilot resource candidates (`any_of`): enabled providers are the enabled
    clouds, the spot policy is `use_spot`, allowed regions pin `region`, the GPU rules (allowed, blocked,
    minimum memory) choose the accelerators, and the per-GPU price caps become `max_hourly_cost`. The
    task gets meetara's time estimate (start-up + domains x hours per domain on that GPU), so SkyPilot
    minimises price x time as meetara does. Provider weights and the spot preemption overhead have no
    SkyPilot counterpart: with weights 1 and `preemption_overhead: 0` both minimise the same quantity.
    """
    import sky

    from launcher.plan import domain_hours, needs_for
    from launcher.select import why_excluded

    cat = build_catalog(offers)
    if write:
        write_catalogs(offers, home)
    needs = needs_for(work)
    modes = {"spot": (True,), "on-demand": (False,), "auto": (True, False)}[prefs.spot_policy]
    candidates: dict[tuple, dict] = {}
    for o in offers:
        pp = prefs.provider(o.provider)
        if why_excluded(o, prefs, needs):
            continue
        caps = [c for c in (pp.max_price_per_gpu_hour, prefs.max_price_per_gpu_hour) if c is not None]
        region, zone = sky_location(o.provider, o.region) if pp.regions else (None, None)
        acc = sky_accelerator(o.provider, o.instance_type, o.gpu)
        for spot in modes:
            if o.effective_price(spot) is None:
                continue
            key = (o.provider, acc, o.gpu_count, spot, region, zone)
            candidates[key] = {
                "cloud": getattr(sky, _CLOUD_CLASS[o.provider])(),
                "accelerators": {acc: o.gpu_count},
                "use_spot": spot,
                "region": region,
                "zone": zone,
                # SkyPilot caps the instance's $/h; meetara caps $/GPU-hour
                "max_hourly_cost": min(caps) * o.gpu_count if caps else None,
            }
    if not candidates:
        raise ValueError("no offer passes the preferences")
    startup_h = prefs.job_startup_minutes / 60

    def seconds(resources: sky.Resources) -> float:
        ((acc, _count),) = resources.accelerators.items()
        gpu = cat.gpu_of[(str(resources.cloud).lower(), acc)]
        return (startup_h + len(job.domains) * domain_hours(gpu, work)[0]) * 3600

    from sky import sky_logging

    enabled = [p for p in SKY_CLOUD if prefs.provider(p).enabled]
    # silent: SkyPilot logs a line for each candidate over its price cap, and spinner payloads
    with offline_sky(home, enabled), sky_logging.silent():
        t0 = time.perf_counter()
        task = sky.Task(name=job.name, run="true")
        task.set_resources({sky.Resources(**c) for c in candidates.values()})
        task.set_time_estimator(seconds)
        dag = sky.Dag()
        dag.add(task)
        sky.Optimizer.optimize(dag, minimize=sky.OptimizeTarget.COST, quiet=True)
        taken = time.perf_counter() - t0
        best = task.best_resources
    cloud = str(best.cloud).lower()
    offer = cat.offer_for(cloud, best.instance_type, best.region, best.zone, bool(best.use_spot))
    return SkyChoice(PROVIDER_OF[cloud], offer.instance_type, offer.region, bool(best.use_spot), taken)
