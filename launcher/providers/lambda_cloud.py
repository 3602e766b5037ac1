"""Lambda Cloud: `GET /api/v1/instance-types` (Bearer key). On-demand only; no spot market."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.offer import Offer, normalize_gpu
from launcher.providers.base import Fetched, field_of, parse_rows, positive, request_json, rows_of

if TYPE_CHECKING:
    import requests

NAME = "lambda"
DEFAULT_URL = "https://cloud.lambda.ai"
URL_ENV = "MEETARA_LAMBDA_API_URL"
KEY_ENV = "LAMBDA_API_KEY"
KEY_FILE = "~/.lambda_cloud/lambda_keys"
KEY_FILES = (KEY_FILE,)
NEEDS_KEY = True

# "1x H100 (80 GB SXM5)", "8x Tesla V100 (16 GB)", "2x RTX A6000 (48 GB)"
_DESCRIPTION = re.compile(r"^(\d+)x (.+?) \((\d+) GB")


def read_key_file(path: Path) -> str | None:
    """The `api_key = ...` line of Lambda's key file (the format SkyPilot reads)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "api_key" and value.strip():
            return value.strip()
    return None


def _parse(entry: Any, fetched_at: datetime) -> list[Offer]:
    itype = entry["instance_type"]
    match = _DESCRIPTION.match(itype["description"])
    if not match:
        raise ValueError(f"unreadable description {itype['description']!r}")
    count, gpu_name, gpu_mem = int(match[1]), match[2], int(match[3])
    specs = itype.get("specs") or {}
    # Regions without capacity are absent from the list: a type sold out everywhere gives no offer.
    return [
        Offer(
            provider=NAME,
            instance_type=itype["name"],
            gpu=normalize_gpu(gpu_name, gpu_mem),
            gpu_name=gpu_name,
            gpu_count=count,
            gpu_mem_gb=gpu_mem,
            # CPUs and memory (GiB, as `memory_gib` says) that Lambda does not state are 0: unknown
            vcpus=int(positive(specs.get("vcpus")) or 0),
            mem_gib=positive(specs.get("memory_gib")) or 0.0,
            region=region["name"],
            price_hour=itype["price_cents_per_hour"] / 100,
            fetched_at=fetched_at,
            source="live",
        )
        for region in entry["regions_with_capacity_available"]
    ]


def parse_response(body: Any, fetched_at: datetime | None = None) -> Fetched:
    """Offers from the body of `GET /api/v1/instance-types`."""
    rows = rows_of(field_of(body, "data"), "instance types")
    now = fetched_at or datetime.now(UTC)
    return parse_rows(NAME, rows, lambda entry: _parse(entry, now))


def fetch(
    session: requests.Session, base_url: str, api_key: str | None = None, timeout: float = 15.0
) -> Fetched:
    """Lambda's instance types, one offer per region with capacity."""
    body = request_json(
        session,
        "GET",
        f"{base_url.rstrip('/')}/api/v1/instance-types",
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=timeout,
        secret=api_key,
    )
    return parse_response(body)


def billed_hour(
    session: requests.Session, base_url: str, api_key: str | None, name: str, timeout: float = 15.0
) -> float | None:
    """What Lambda bills an hour for the instance named `name` (SkyPilot names a node `<cluster name on
    the cloud>-head`): its instance type's `price_cents_per_hour` (Lambda has no spot or disk price of
    its own); None when no instance has that name."""
    body = request_json(
        session,
        "GET",
        f"{base_url.rstrip('/')}/api/v1/instances",
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=timeout,
        secret=api_key,
    )
    rows = field_of(body, "data")
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and row.get("name") == name:
            cents = positive((row.get("instance_type") or {}).get("price_cents_per_hour"))
            return None if cents is None else cents / 100
    return None
