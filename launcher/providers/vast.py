"""Vast.ai: `POST /api/v0/bundles/` (search needs no key). Each offer is one host's machine.

On-demand price is `dph_base`, interruptible is a bid of at least `min_bid`; both are billed
storage on top (`storage_cost` $/GB/month for the disk asked for), kept in `disk_price_hour`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.offers import Offer, normalize_gpu
from launcher.providers.base import Fetched, field_of, parse_rows, positive, request_json, rows_of

if TYPE_CHECKING:
    import requests

NAME = "vast"
DEFAULT_URL = "https://console.vast.ai"
URL_ENV = "MEETARA_VAST_API_URL"
KEY_ENV = "VAST_API_KEY"
KEY_FILE = "~/.vast_api_key"
NEEDS_KEY = False

DISK_GB = 50
HOURS_PER_MONTH = 30 * 24
MIN_RELIABILITY = 0.95
LIMIT = 500


def read_key_file(path: Path) -> str | None:
    """The key alone on the first line, as the vastai CLI writes it."""
    lines = path.read_text(encoding="utf-8").split()
    return lines[0] if lines else None


def _region(geolocation: Any) -> str:
    """ "Texas, US" -> "US-Texas"; a bare country stays as sent; unknown when absent."""
    if not isinstance(geolocation, str) or not geolocation.strip():
        return "unknown"
    place, _, country = geolocation.rpartition(",")
    place, country = place.strip(), country.strip()
    return f"{country}-{place}".replace(" ", "") if place else country


def _parse(offer: Any, fetched_at: datetime, disk_gb: int) -> list[Offer]:
    cores, effective = offer["cpu_cores"], offer["cpu_cores_effective"]
    # cpu_ram is the whole host's (MB); a rental gets the share of its CPU cores.
    mem_gb = offer["cpu_ram"] * effective / cores / 1000
    disk_hour = disk_gb * offer["storage_cost"] / HOURS_PER_MONTH
    return [
        Offer(
            provider=NAME,
            instance_type=str(offer["id"]),
            gpu=normalize_gpu(offer["gpu_name"], offer["gpu_ram"] / 1024),
            gpu_count=offer["num_gpus"],
            gpu_mem_gb=round(offer["gpu_ram"] / 1024),
            vcpus=int(effective),
            mem_gb=round(mem_gb, 1),
            region=_region(offer.get("geolocation")),
            price_hour=float(offer["dph_base"]),
            spot_price_hour=positive(offer.get("min_bid")),
            disk_price_hour=round(disk_hour, 6),
            fetched_at=fetched_at,
            source="live",
        )
    ]


def fetch(
    session: requests.Session,
    base_url: str,
    api_key: str | None = None,
    timeout: float = 15.0,
    disk_gb: int = DISK_GB,
) -> Fetched:
    """Rentable Vast offers with room for `disk_gb`, cheapest first."""
    query = {
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "num_gpus": {"gte": 1},
        "disk_space": {"gte": disk_gb},
        "reliability2": {"gte": MIN_RELIABILITY},
        "order": [["dph_total", "asc"]],
        "limit": LIMIT,
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = request_json(
        session,
        "POST",
        f"{base_url.rstrip('/')}/api/v0/bundles/",
        json=query,
        headers=headers,
        timeout=timeout,
        secret=api_key,
    )
    rows = rows_of(field_of(body, "offers"), "offers")
    now = datetime.now(UTC)
    return parse_rows(NAME, rows, lambda offer: _parse(offer, now, disk_gb))
