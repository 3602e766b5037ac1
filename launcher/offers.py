"""The offer table: the bundled snapshot and `gather_offers` (snapshot, or the providers' live APIs).

Importing this module stays cheap (pydantic and the standard library only): the HTTP stack is
imported by the live fetchers, which `gather_offers(live=True)` loads on demand. The `Offer` model
lives in `launcher/offer.py`, which the fetchers use too.
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from importlib import resources

from launcher.offer import (  # noqa: F401 (the offer model's names, re-exported for callers)
    PROVIDERS,
    SNAPSHOT_CSV,
    SNAPSHOT_META,
    Offer,
    OfferTable,
    ProviderError,
    ProviderName,
    nominal_gpu_mem_gb,
    normalize_gpu,
)


def _opt_float(cell: str) -> float | None:
    return float(cell) if cell.strip() else None


# The bundled snapshot's `mem_gb` column held memory as each provider stated it: Lambda and RunPod in
# GiB, Vast in GB (MB / 1000); a `mem_gib` column, where present, is GiB already.
_SNAPSHOT_MEM_TO_GIB = {"lambda": 1.0, "runpod": 1.0, "vast": 1000 / 1024}


def _snapshot_mem_gib(row: dict[str, str]) -> float:
    if row.get("mem_gib"):
        return float(row["mem_gib"])
    return round(float(row["mem_gb"]) * _SNAPSHOT_MEM_TO_GIB[row["provider"]], 1)


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
                gpu_name=row.get("gpu_name") or "",
                gpu_count=int(row["gpu_count"]),
                gpu_mem_gb=int(row["gpu_mem_gb"]),
                vcpus=int(row["vcpus"]),
                mem_gib=_snapshot_mem_gib(row),
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
