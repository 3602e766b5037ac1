"""A small disk cache of each provider's last live answer, so repeated commands stay fast.

One file per provider, `offers-<provider>.json`, under `MEETARA_CACHE` (default ~/.cache/meetara).
It holds offers only, never credentials. An entry counts for `MEETARA_OFFERS_TTL` seconds
(default 900) and only for the API URL it came from.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from launcher.offer import Offer
from launcher.providers.base import Fetched

log = logging.getLogger("launcher.offers")
DEFAULT_TTL_S = 15 * 60


def cache_dir() -> Path:
    """Where cached answers live."""
    return Path(os.environ.get("MEETARA_CACHE") or Path.home() / ".cache" / "meetara")


def cache_path(provider: str) -> Path:
    """The cache file of one provider."""
    return cache_dir() / f"offers-{provider}.json"


def load(provider: str, base_url: str) -> Fetched | None:
    """The cached answer if it is fresh and came from `base_url`; None otherwise (or unreadable)."""
    ttl = float(os.environ.get("MEETARA_OFFERS_TTL", DEFAULT_TTL_S))
    try:
        entry = json.loads(cache_path(provider).read_text(encoding="utf-8"))
        if entry["base_url"] != base_url or not 0 <= time.time() - entry["saved_at"] < ttl:
            return None
        return Fetched([Offer.model_validate(o) for o in entry["offers"]], int(entry["bad_rows"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: ignoring unreadable offers cache (%s)", provider, type(e).__name__)
        return None


def save(provider: str, base_url: str, fetched: Fetched) -> None:
    """Store `fetched` atomically; a cache that cannot be written only costs a warning."""
    entry = {
        "provider": provider,
        "base_url": base_url,
        "saved_at": time.time(),
        "bad_rows": fetched.bad_rows,
        "offers": [o.model_dump(mode="json") for o in fetched.offers],
    }
    path = cache_path(provider)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump(entry, f)
        os.replace(f.name, path)
    except OSError as e:
        log.warning("%s: could not write offers cache %s (%s)", provider, path, e)
