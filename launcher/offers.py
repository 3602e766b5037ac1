"""GPU offers: one `Offer` shape for every provider, the bundled snapshot, and `gather_offers`.

Importing this module stays cheap (pydantic and the standard library only): the HTTP stack is
imported by the live fetchers, which `gather_offers(live=True)` loads on demand.
"""

from __future__ import annotations

import csv
import json
import re
from datetime import UTC, date, datetime
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ProviderName = Literal["lambda", "runpod", "vast"]
PROVIDERS: tuple[ProviderName, ...] = ("lambda", "runpod", "vast")
SNAPSHOT_CSV = "offers_snapshot.csv"
SNAPSHOT_META = "offers_snapshot.meta.json"


class ProviderError(Exception):
    """A provider's offers could not be had: HTTP error, unreachable, or an unusable response."""


class Offer(BaseModel):
    """One rentable machine shape at one provider, in one region, at one price.

    Prices are USD per hour for the whole instance; `mem_gb` is host memory as the provider
    states it (Lambda in GiB, Vast a share of the host's RAM).
    """

    model_config = ConfigDict(frozen=True)

    provider: ProviderName
    instance_type: str
    gpu: str = Field(min_length=1)
    gpu_count: int = Field(ge=1)
    gpu_mem_gb: int = Field(ge=0)
    vcpus: int = Field(ge=0)
    mem_gb: float = Field(ge=0)
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


def normalize_gpu(name: str, mem_gb: float | None) -> str:
    """One name per GPU model across providers: "NVIDIA GeForce RTX 4090" -> "RTX4090".

    Form factors (PCIe, SXM, NVL) are dropped; the A100 keeps its memory size ("A100-80GB")
    because the 40 and 80 GB cards differ in what they can train.
    """
    upper = name.upper()
    s = _NOISE.sub(" ", _VENDOR_WORDS.sub(" ", upper)).replace("-", " ")
    words = s.split()
    if words[:2] == ["Q", "RTX"]:  # Vast spells the Quadro RTX cards "Q RTX 8000"
        words = words[1:]
    joined = "".join(words)
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
        return joined[:4]
    return joined


def _opt_float(cell: str) -> float | None:
    return float(cell) if cell.strip() else None


def load_snapshot() -> list[Offer]:
    """The bundled, dated offers snapshot (no network); `fetched_at` is the snapshot's date."""
    data = resources.files("launcher") / "data"
    meta = json.loads((data / SNAPSHOT_META).read_text(encoding="utf-8"))
    fetched_at = datetime.fromisoformat(meta["fetched_at"]).astimezone(UTC)
    with (data / SNAPSHOT_CSV).open(encoding="utf-8", newline="") as f:
        return [
            Offer(
                provider=row["provider"],
                instance_type=row["instance_type"],
                gpu=row["gpu"],
                gpu_count=int(row["gpu_count"]),
                gpu_mem_gb=int(row["gpu_mem_gb"]),
                vcpus=int(row["vcpus"]),
                mem_gb=float(row["mem_gb"]),
                region=row["region"],
                price_hour=_opt_float(row["price_hour"]),
                spot_price_hour=_opt_float(row["spot_price_hour"]),
                disk_price_hour=_opt_float(row["disk_price_hour"]) or 0.0,
                fetched_at=fetched_at,
                source="snapshot",
            )
            for row in csv.DictReader(f)
        ]


def gather_offers(
    live: bool = False, providers: list[str] | None = None, refresh: bool = False
) -> OfferTable:
    """Offers from the bundled snapshot (default) or live from the providers' APIs.

    Live: each provider is asked in parallel (or answered from the disk cache within its TTL
    unless `refresh`); a provider without an API key is listed in `skipped`, one that fails in
    `errors`, and the others' offers are still returned.
    """
    names = list(providers or PROVIDERS)
    unknown = sorted(set(names) - set(PROVIDERS))
    if unknown:
        raise ValueError(f"unknown provider(s) {', '.join(unknown)}; known: {', '.join(PROVIDERS)}")
    if not live:
        offers = [o for o in load_snapshot() if o.provider in names]
        return OfferTable(
            offers=offers,
            source="snapshot",
            provenance=dict.fromkeys(names, "snapshot"),
            snapshot_date=offers[0].fetched_at.date() if offers else None,
        )
    from launcher.providers import fetch_all

    return fetch_all(names, refresh=refresh)
