"""Vast.ai: `POST /api/v0/bundles/` (search needs no key). Each offer is one host's machine.

On-demand price is `dph_base`, interruptible is a bid of at least `min_bid`; both are billed
storage on top (`storage_cost` $/GB/month for the disk asked for), kept in `disk_price_hour`. Every
offer is priced with `DISK_GB` of disk: the disk the SkyPilot task must ask for (launcher/task.py) and
the one meetara's SkyPilot plugin takes out of the catalog price to bid (launcher/skyplugin.py).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.offer import Offer, nominal_gpu_mem_gb, normalize_gpu
from launcher.providers.base import Fetched, field_of, parse_rows, positive, request_json, rows_of

if TYPE_CHECKING:
    import requests

NAME = "vast"
DEFAULT_URL = "https://console.vast.ai"
URL_ENV = "MEETARA_VAST_API_URL"
KEY_ENV = "VAST_API_KEY"
KEY_FILE = "~/.config/vastai/vast_api_key"
# where vastai keeps the key (vastai 1.9.1: $XDG_CONFIG_HOME, else ~/.config, then the older ~/.vast_api_key)
KEY_FILES = ("$XDG_CONFIG_HOME/vastai/vast_api_key", KEY_FILE, "~/.vast_api_key")
NEEDS_KEY = False

DISK_GB = 50
HOURS_PER_MONTH = 30 * 24
MIN_RELIABILITY = 0.95
LIMIT = 500


# ISO 3166 country codes for the country names Vast hosts give instead of a code ("Sweden"); "ZZ" (the
# code ISO leaves to users and CLDR uses for "unknown region") where there is no country to be had.
UNKNOWN_COUNTRY = "ZZ"
COUNTRY_CODES: dict[str, str] = {
    "argentina": "AR", "australia": "AU", "austria": "AT", "bangladesh": "BD", "belarus": "BY",
    "belgium": "BE", "brazil": "BR", "bulgaria": "BG", "canada": "CA", "chile": "CL", "china": "CN",
    "colombia": "CO", "croatia": "HR", "cyprus": "CY", "czech republic": "CZ", "czechia": "CZ",
    "denmark": "DK", "egypt": "EG", "estonia": "EE", "finland": "FI", "france": "FR", "georgia": "GE",
    "germany": "DE", "greece": "GR", "hong kong": "HK", "hungary": "HU", "iceland": "IS", "india": "IN",
    "indonesia": "ID", "ireland": "IE", "israel": "IL", "italy": "IT", "japan": "JP", "kazakhstan": "KZ",
    "kenya": "KE", "korea": "KR", "south korea": "KR", "republic of korea": "KR", "latvia": "LV",
    "lithuania": "LT", "luxembourg": "LU", "malaysia": "MY", "mexico": "MX", "moldova": "MD",
    "morocco": "MA", "netherlands": "NL", "the netherlands": "NL", "new zealand": "NZ", "nigeria": "NG",
    "norway": "NO", "pakistan": "PK", "peru": "PE", "philippines": "PH", "poland": "PL",
    "portugal": "PT", "romania": "RO", "russia": "RU", "russian federation": "RU", "saudi arabia": "SA",
    "serbia": "RS", "singapore": "SG", "slovakia": "SK", "slovenia": "SI", "south africa": "ZA",
    "spain": "ES", "sweden": "SE", "switzerland": "CH", "taiwan": "TW", "thailand": "TH", "turkey": "TR",
    "turkiye": "TR", "ukraine": "UA", "united arab emirates": "AE", "uae": "AE", "united kingdom": "GB",
    "great britain": "GB", "uk": "GB", "united states": "US", "united states of america": "US",
    "usa": "US", "uruguay": "UY", "vietnam": "VN", "viet nam": "VN",
}  # fmt: skip
_CODE = re.compile(r"[A-Z]{2}")
# continents vastai's "georegion" appends ("Texas, US, NA"): dropped when a country code precedes one
_CONTINENTS = {"AF", "AS", "EU", "NA", "OC", "SA"}


def read_key_file(path: Path) -> str | None:
    """The key alone on the first line, as the vastai CLI writes it."""
    lines = path.read_text(encoding="utf-8").split()
    return lines[0] if lines else None


def country_code(text: str) -> str | None:
    """The ISO country code `text` is ("US") or names ("Sweden", "United States"); None if neither."""
    text = text.strip()
    if _CODE.fullmatch(text):
        return text
    return COUNTRY_CODES.get(" ".join(text.casefold().split()))


def _region(geolocation: Any) -> str:
    """meetara's Vast region, `<country code>[-<place>]`: "Texas, US" -> "US-Texas", "Sweden" ->
    "SE-Sweden", "US" -> "US"; "ZZ" when Vast gives no location, "ZZ-<place>" when it names no known
    country. The code leads so that SkyPilot, which reads a Vast region's country from its last two
    characters, gets it back from the "<place>, <code>" that launcher/skycatalog.py writes."""
    if not isinstance(geolocation, str) or not geolocation.strip():
        return UNKNOWN_COUNTRY
    parts = [p.strip() for p in geolocation.split(",") if p.strip()]
    if len(parts) >= 2 and parts[-1] in _CONTINENTS and _CODE.fullmatch(parts[-2]):
        parts.pop()
    code = country_code(parts[-1])
    if code is None:
        code, place_parts = UNKNOWN_COUNTRY, parts
    elif _CODE.fullmatch(parts[-1]):
        place_parts = parts[:-1]
    else:  # a country named, not coded: the name is the place
        place_parts = parts
    # no spaces (as before) and no "/", which would split SkyPilot's "vast/<region>" infra string
    place = ",".join(p.replace(" ", "").replace("/", "") for p in place_parts)
    return f"{code}-{place}" if place else code


def _host_share(offer: Any) -> tuple[int, float]:
    """(vCPUs, memory GiB) the rental gets: `cpu_cores_effective` of the host's `cpu_cores`, and that
    share of its `cpu_ram` (MiB, the host's whole). 0 for what the host does not report (null or 0)."""
    cores, effective = positive(offer.get("cpu_cores")), positive(offer.get("cpu_cores_effective"))
    ram_mib = positive(offer.get("cpu_ram"))
    vcpus = int(effective) if effective else 0
    if not (cores and effective and ram_mib):
        return vcpus, 0.0
    return vcpus, round(ram_mib * min(effective / cores, 1.0) / 1024, 1)


def _parse(offer: Any, fetched_at: datetime, disk_gb: int) -> list[Offer]:
    gpu_name = offer["gpu_name"]
    if not isinstance(gpu_name, str) or not gpu_name.strip():
        raise ValueError(f"no GPU name: {gpu_name!r}")
    reported_gib = float(offer["gpu_ram"]) / 1024  # MiB per GPU, as the host's driver reports it
    gpu = normalize_gpu(gpu_name, reported_gib)
    vcpus, mem_gib = _host_share(offer)
    disk_hour = disk_gb * float(offer["storage_cost"]) / HOURS_PER_MONTH
    return [
        Offer(
            provider=NAME,
            instance_type=str(offer["id"]),
            gpu=gpu,
            gpu_name=gpu_name.strip(),
            gpu_count=offer["num_gpus"],
            gpu_mem_gb=nominal_gpu_mem_gb(gpu, reported_gib),
            vcpus=vcpus,
            mem_gib=mem_gib,
            region=_region(offer.get("geolocation")),
            price_hour=float(offer["dph_base"]),
            spot_price_hour=positive(offer.get("min_bid")),
            disk_price_hour=round(disk_hour, 6),
            fetched_at=fetched_at,
            source="live",
        )
    ]


def parse_response(body: Any, disk_gb: int = DISK_GB, fetched_at: datetime | None = None) -> Fetched:
    """Offers from the body of a `bundles` search (priced with `disk_gb` of disk)."""
    rows = rows_of(field_of(body, "offers"), "offers")
    now = fetched_at or datetime.now(UTC)
    return parse_rows(NAME, rows, lambda offer: _parse(offer, now, disk_gb))


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
    return parse_response(body, disk_gb)


def billed_hour(
    session: requests.Session, base_url: str, api_key: str | None, name: str, timeout: float = 15.0
) -> float | None:
    """What Vast bills an hour for the instance labelled `name` (SkyPilot labels a node
    `<cluster name on the cloud>-head`): its `dph_total`, the rate `vastai show instances` shows, GPU and
    disk together (docs.vast.ai, "show instance"); None when no instance has that label."""
    body = request_json(
        session,
        "GET",
        f"{base_url.rstrip('/')}/api/v0/instances/",
        params={"owner": "me"},
        headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        timeout=timeout,
        secret=api_key,
    )
    rows = field_of(body, "instances")
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and row.get("label") == name:
            return positive(row.get("dph_total"))
    return None
