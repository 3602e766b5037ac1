"""One `Offer` shape for every provider, and the GPU names they are normalised to.

The model module the offer table (`launcher/offers.py`) and the providers' fetchers
(`launcher/providers/`) both use, so neither imports the other's module for it. Cheap to import
(pydantic and the standard library only).
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

ProviderName = Literal["lambda", "runpod", "vast"]
PROVIDERS: tuple[ProviderName, ...] = ("lambda", "runpod", "vast")
SNAPSHOT_CSV = "offers_snapshot.csv"
SNAPSHOT_META = "offers_snapshot.meta.json"


class ProviderError(Exception):
    """A provider's offers could not be had: HTTP error, unreachable, or an unusable response."""


class Offer(BaseModel):
    """One rentable machine shape at one provider, in one region, at one price.

    Prices are USD per hour for the whole instance. `gpu` is meetara's name for the GPU model
    (`normalize_gpu`), `gpu_name` the provider's own spelling of it, verbatim ("" where not known: the
    bundled snapshot, offers rebuilt from a run record). `gpu_mem_gb` is the nominal memory of one GPU
    (what the model is sold with: a Vast host reporting 23,028 MiB on an RTX 4090 has a 24 GB card).
    `vcpus` and `mem_gib` are the host CPUs and memory (GiB) the rental gets; 0 where the provider did
    not say (a Vast host with no core count, say): the GPU and the price make the offer, and
    launcher/skycatalog.py derives a figure where SkyPilot needs a positive one.
    """

    model_config = ConfigDict(frozen=True)

    provider: ProviderName
    instance_type: str
    gpu: str = Field(min_length=1)
    gpu_name: str = ""
    gpu_count: int = Field(ge=1)
    gpu_mem_gb: int = Field(ge=0)
    vcpus: int = Field(ge=0)
    # "mem_gb" is what this field was called (it always held GiB for Lambda): old caches and run
    # records still load
    mem_gib: float = Field(ge=0, validation_alias=AliasChoices("mem_gib", "mem_gb"))
    region: str
    price_hour: float | None = Field(default=None, ge=0)
    spot_price_hour: float | None = Field(default=None, ge=0)
    disk_price_hour: float = Field(default=0.0, ge=0)
    fetched_at: datetime
    source: Literal["snapshot", "live"]

    def effective_price(self, spot: bool) -> float | None:
        """$/h billed for the whole instance, disk included; None if that market is not offered."""
        base = self.spot_price_hour if spot else self.price_hour
        return None if base is None else round(base + self.disk_price_hour, 6)

    def price_per_gpu_hour(self, spot: bool) -> float | None:
        """`effective_price` divided by the number of GPUs."""
        price = self.effective_price(spot)
        return None if price is None else round(price / self.gpu_count, 6)


class OfferTable(BaseModel):
    """Offers gathered from several providers, with what went wrong per provider."""

    offers: list[Offer]
    errors: dict[str, str] = {}
    skipped: dict[str, str] = {}
    bad_rows: dict[str, int] = {}
    source: Literal["snapshot", "live"]
    # Per provider: "snapshot", "live" or "cache" (a live answer reused within the cache TTL).
    provenance: dict[str, str] = {}
    snapshot_date: date | None = None


_VENDOR_WORDS = re.compile(r"\b(NVIDIA|GEFORCE|TESLA|QUADRO)\b")
_NOISE = re.compile(r"\(.*?\)|\b(PCIE|SXM\d?|HBM\dE?|GENERATION|\d+\s*GB)\b")
_NVL = re.compile(r"\bNVL\b")


def normalize_gpu(name: str, mem_gb: float | None) -> str:
    """One name per GPU model across providers: "NVIDIA GeForce RTX 4090" -> "RTX4090".

    Form factors of one chip with the same memory (PCIe, SXM) are dropped; what makes a different
    GPU stays: the A100 keeps its memory size ("A100-80GB"), the H100 / H200 NVL (94 / 141 GB, its
    own board and clocks) is "H100-NVL" / "H200-NVL", and "Ti" stays "Ti" ("RTX3090Ti", as RunPod's
    and SkyPilot's names spell it).
    """
    upper = name.upper()
    nvl = bool(_NVL.search(upper))
    s = _NOISE.sub(" ", _VENDOR_WORDS.sub(" ", _NVL.sub(" ", upper))).replace("-", " ")
    words = s.split()
    if words[:2] == ["Q", "RTX"]:  # Vast spells the Quadro RTX cards "Q RTX 8000"
        words = words[1:]
    joined = re.sub(r"(?<=[\dS])TI$", "Ti", "".join(words))
    if joined.startswith("RTXA") and joined[4:].isdigit():  # "RTX A6000" is the A6000
        return joined[3:]
    if joined.startswith("RTX") and joined.endswith("ADA"):
        return joined[:-3] + "-Ada"
    if joined.startswith("A100"):
        if not mem_gb:
            hint = re.search(r"(\d+)\s*GB", upper)
            mem_gb = float(hint.group(1)) if hint else None
        if mem_gb:
            return "A100-80GB" if mem_gb >= 60 else "A100-40GB"
        return "A100"
    if joined.startswith(("H100", "H200")):
        return joined[:4] + ("-NVL" if nvl else "")
    return joined


# The memory each GPU model is sold with (GB, as its name and spec sheet say), per meetara name. Hosts
# report what the driver leaves usable (ECC, reserved memory: an RTX 4090 at 23,028 or 24,564 MiB, an
# L40S at 46,068 MiB), which must not make a 24 GB card fail a 24 GB minimum. Several sizes where the
# model comes in several (and the 48 GB RTX 4090 boards some hosts run).
GPU_MEMORY_GB: dict[str, tuple[int, ...]] = {
    "B200": (180, 192),
    "GH200": (96, 144),
    "H200": (141,),
    "H200-NVL": (141,),
    "H100": (80,),
    "H100-NVL": (94,),
    "A100-80GB": (80,),
    "A100-40GB": (40,),
    "A100": (40, 80),
    "A800": (40, 80),
    "L40S": (48,),
    "L40": (48,),
    "L4": (24,),
    "A40": (48,),
    "A30": (24,),
    "A16": (16,),
    "A10": (24,),
    "A10G": (24,),
    "A6000": (48,),
    "A5000": (24,),
    "A4500": (20,),
    "A4000": (16,),
    "A2000": (6, 12),
    "RTX6000-Ada": (48,),
    "RTX5880-Ada": (48,),
    "RTX5000-Ada": (32,),
    "RTX4500-Ada": (24,),
    "RTX4000-Ada": (20,),
    "RTX8000": (48,),
    "RTX6000": (24,),
    "V100": (16, 32),
    "T4": (16,),
    "P100": (12, 16),
    "RTX5090": (32,),
    "RTX5080": (16,),
    "RTX5070Ti": (16,),
    "RTX5070": (12,),
    "RTX5060Ti": (8, 16),
    "RTX4090": (24, 48),
    "RTX4090D": (24, 48),
    "RTX4080S": (16,),
    "RTX4080": (16,),
    "RTX4070STi": (16,),
    "RTX4070Ti": (12,),
    "RTX4070S": (12,),
    "RTX4070": (12,),
    "RTX4060Ti": (8, 16),
    "RTX4060": (8,),
    "RTX3090Ti": (24,),
    "RTX3090": (24,),
    "RTX3080Ti": (12,),
    "RTX3080": (10, 12),
    "RTX3070Ti": (8,),
    "RTX3070": (8,),
    "RTX3060Ti": (8,),
    "RTX3060": (8, 12),
    "RTX2080Ti": (11,),
    "GTX1080Ti": (11,),
}
# A reported size counts as a nominal one from 90 % of it (ECC alone takes 6.25 %) to 1 GB over.
_NOMINAL_LOW, _NOMINAL_HIGH_GB = 0.9, 1.0


def nominal_gpu_mem_gb(gpu: str, reported_gib: float) -> int:
    """The nominal memory (GB) of one `gpu` (meetara's name) that reports `reported_gib` GiB usable.

    The model's size from `GPU_MEMORY_GB` that the report is close to; the report rounded for a model
    the table does not know, or a size it does not list (a modified board).
    """
    for size in GPU_MEMORY_GB.get(gpu, ()):
        if _NOMINAL_LOW * size <= reported_gib <= size + _NOMINAL_HIGH_GB:
            return size
    return round(reported_gib)
