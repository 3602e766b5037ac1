"""RunPod: GraphQL `POST /graphql`, `gpuTypes` with the secure cloud's lowest 1-GPU price.

RunPod ended spot (interruptible) pods in September 2026 and retired the `podRentInterruptable`
mutation that SkyPilot 0.14.1's RunPod provisioner still sends for a spot pod: a spot price the API
still sends is not offered (`SPOT_RETIRED`), so no plan ever rents one.

Every pod is priced with its container disk: RunPod bills `CONTAINER_DISK_USD_GB_MONTH` per GB-month
for the `DISK_GB` a meetara task asks for (launcher/task.py), kept in `disk_price_hour` as for Vast.
"""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.offer import Offer, ProviderError, normalize_gpu
from launcher.providers.base import Fetched, field_of, parse_rows, positive, request_json, rows_of

if TYPE_CHECKING:
    import requests

NAME = "runpod"
SPOT_RETIRED = True  # RunPod's interruptible pods and their mutation are gone (see the module doc)
CONTAINER_DISK_USD_GB_MONTH = 0.10  # RunPod's container disk price (https://www.runpod.io/pricing)
HOURS_PER_MONTH = 30 * 24
DEFAULT_URL = "https://api.runpod.io"
URL_ENV = "MEETARA_RUNPOD_API_URL"
KEY_ENV = "RUNPOD_API_KEY"
KEY_FILE = "~/.runpod/config.toml"
KEY_FILES = (KEY_FILE,)
# The gpuTypes query answers without a key; a key, when there is one, is sent anyway.
NEEDS_KEY = False

QUERY = """
query GpuTypes($lowestPriceInput: GpuLowestPriceInput) {
  gpuTypes {
    id displayName manufacturer memoryInGb maxGpuCount
    securePrice communityPrice secureSpotPrice communitySpotPrice
    lowestPrice(input: $lowestPriceInput) {
      minimumBidPrice uninterruptablePrice minVcpu minMemory stockStatus countryCode
    }
  }
}
"""
GPU_COUNT = 1


def read_key_file(path: Path) -> str | None:
    """`api_key` of the `[default]` profile in runpodctl's / runpod-python's config.toml."""
    profile = tomllib.loads(path.read_text(encoding="utf-8")).get("default", {})
    key = profile.get("api_key") if isinstance(profile, dict) else None
    return key.strip() if isinstance(key, str) and key.strip() else None


def _parse(gpu: Any, fetched_at: datetime) -> list[Offer]:
    lowest = gpu["lowestPrice"]
    # A null lowestPrice or stockStatus means no machine of this type is free right now.
    if lowest is None or lowest.get("stockStatus") is None:
        return []
    if str(gpu.get("manufacturer") or "Nvidia").lower() != "nvidia":
        return []  # the training image is CUDA-only
    price = positive(gpu.get("securePrice")) or positive(lowest.get("uninterruptablePrice"))
    spot = positive(gpu.get("secureSpotPrice")) or positive(lowest.get("minimumBidPrice"))
    if SPOT_RETIRED:
        spot = None
    if price is None and spot is None:
        return []
    return [
        Offer(
            provider=NAME,
            instance_type=gpu["id"],
            gpu=normalize_gpu(gpu["displayName"], gpu["memoryInGb"]),
            gpu_name=gpu["displayName"],
            gpu_count=GPU_COUNT,
            gpu_mem_gb=gpu["memoryInGb"],
            # the cheapest pod's CPUs and memory; 0 (unknown) where RunPod sends none. RunPod says
            # "GB"; SkyPilot's own RunPod catalog takes the figure as GiB, and so does meetara
            vcpus=int(positive(lowest.get("minVcpu")) or 0),
            mem_gib=positive(lowest.get("minMemory")) or 0.0,
            region=lowest.get("countryCode") or "any",
            price_hour=None if price is None else price * GPU_COUNT,
            spot_price_hour=None if spot is None else spot * GPU_COUNT,
            disk_price_hour=container_disk_hour(),
            fetched_at=fetched_at,
            source="live",
        )
    ]


def _check_graphql(body: Any) -> None:
    """GraphQL reports query errors with HTTP 200 and an `errors` list: ProviderError with the first."""
    if isinstance(body, dict) and body.get("errors"):
        errors = body["errors"]
        first = errors[0] if isinstance(errors, list) and errors else errors
        message = first.get("message") if isinstance(first, dict) else first
        raise ProviderError(f"GraphQL error: {str(message)[:200]}")


def parse_response(body: Any, fetched_at: datetime | None = None) -> Fetched:
    """Offers from the body of the `gpuTypes` query (ProviderError for a GraphQL error)."""
    _check_graphql(body)
    rows = rows_of(field_of(field_of(body, "data"), "gpuTypes"), "GPU types")
    now = fetched_at or datetime.now(UTC)
    return parse_rows(NAME, rows, lambda gpu: _parse(gpu, now))


def fetch(
    session: requests.Session, base_url: str, api_key: str | None = None, timeout: float = 15.0
) -> Fetched:
    """RunPod's GPU types in stock on the secure cloud, priced for one GPU."""
    # The key goes in a header, not the documented `?api_key=` query: URLs end up in logs.
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    payload = {
        "query": QUERY,
        "variables": {"lowestPriceInput": {"gpuCount": GPU_COUNT, "secureCloud": True}},
    }
    body = request_json(
        session,
        "POST",
        f"{base_url.rstrip('/')}/graphql",
        json=payload,
        headers=headers,
        timeout=timeout,
        secret=api_key,
    )
    return parse_response(body)


PODS_QUERY = "query meetaraPods { myself { pods { id name costPerHr } } }"


def billed_hour(
    session: requests.Session, base_url: str, api_key: str | None, name: str, timeout: float = 15.0
) -> float | None:
    """What RunPod bills an hour for the pod named `name` (SkyPilot names a node `<cluster name on the
    cloud>-head`): its `costPerHr` (the GPUs; SkyPilot's and the SDK's pod query read the same field)
    plus its container disk at RunPod's rate, as the plan priced it (`container_disk_hour`); None when no
    pod has that name."""
    body = request_json(
        session,
        "POST",
        f"{base_url.rstrip('/')}/graphql",
        json={"query": PODS_QUERY},
        headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        timeout=timeout,
        secret=api_key,
    )
    _check_graphql(body)
    pods = field_of(field_of(field_of(body, "data"), "myself"), "pods")
    for pod in pods if isinstance(pods, list) else []:
        if isinstance(pod, dict) and pod.get("name") == name:
            gpus = positive(pod.get("costPerHr"))
            return None if gpus is None else round(gpus + container_disk_hour(), 6)
    return None


def container_disk_hour(disk_gb: int | None = None) -> float:
    """What RunPod bills per hour for a pod's container disk of `disk_gb` (default: the task's DISK_GB)."""
    from launcher.providers.vast import DISK_GB

    return round((DISK_GB if disk_gb is None else disk_gb) * CONTAINER_DISK_USD_GB_MONTH / HOURS_PER_MONTH, 6)
