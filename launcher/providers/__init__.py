"""Live offer fetchers, one module per provider behind one interface.

Each provider module has NAME, DEFAULT_URL, URL_ENV, KEY_ENV, KEY_FILE (the one messages name), KEY_FILES
(where its own tools keep the key, in their order), NEEDS_KEY,
`read_key_file(path)` and `fetch(session, base_url, api_key=None, timeout=...) -> Fetched`.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from launcher.offer import OfferTable, ProviderError
from launcher.providers import cache, lambda_cloud, runpod, vast
from launcher.providers.base import Fetched, http_timeout, redact

log = logging.getLogger("launcher.offers")

MODULES: dict[str, ModuleType] = {m.NAME: m for m in (lambda_cloud, runpod, vast)}


def api_key(provider: str) -> str | None:
    """The provider's API key: its environment variable, else its usual credentials file."""
    module = MODULES[provider]
    if key := os.environ.get(module.KEY_ENV, "").strip():
        return key
    # the first of the provider's own tools' places that holds a file ($VARS unset: that place is skipped)
    found = (Path(os.path.expandvars(p)).expanduser() for p in module.KEY_FILES)
    path = next((p for p in found if "$" not in str(p) and p.is_file()), None)
    if path is None:
        return None
    try:
        key = module.read_key_file(path)
    except (OSError, ValueError) as e:
        log.warning("%s: cannot read %s (%s)", provider, path, type(e).__name__)
        return None
    if key:
        from train.redact import add_secret

        add_secret(key)  # read from a file, not the environment: the log redaction must learn it
    return key


def base_url(provider: str) -> str:
    """The provider's API root; its MEETARA_<PROVIDER>_API_URL variable overrides the default."""
    module = MODULES[provider]
    return os.environ.get(module.URL_ENV) or module.DEFAULT_URL


@dataclass
class _Outcome:
    fetched: Fetched | None = None
    provenance: str = "live"
    error: str | None = None
    skipped: str | None = None


def _fetch_one(provider: str, refresh: bool) -> _Outcome:
    module = MODULES[provider]
    key = api_key(provider)
    if module.NEEDS_KEY and not key:
        return _Outcome(skipped=f"no API key: set {module.KEY_ENV} or write {module.KEY_FILE}")
    url = base_url(provider)
    if not refresh and (hit := cache.load(provider, url)) is not None:
        return _Outcome(fetched=hit, provenance="cache")
    import requests

    try:
        with requests.Session() as session:
            fetched = module.fetch(session, url, api_key=key, timeout=http_timeout())
    except ProviderError as e:
        return _Outcome(error=redact(str(e), key))
    except Exception as e:  # a bug in one parser must not cost the other providers' offers
        return _Outcome(error=redact(f"unexpected {type(e).__name__}: {e}", key))
    cache.save(provider, url, fetched)
    return _Outcome(fetched=fetched)


def fetch_all(providers: list[str], refresh: bool = False) -> OfferTable:
    """Ask each provider in parallel; collect offers, per-provider errors and skips."""
    with ThreadPoolExecutor(max_workers=max(1, len(providers))) as pool:
        outcomes = list(pool.map(lambda p: _fetch_one(p, refresh), providers))
    table = OfferTable(offers=[], source="live")
    for provider, outcome in zip(providers, outcomes, strict=True):
        if outcome.skipped:
            log.info("%s: skipped (%s)", provider, outcome.skipped)
            table.skipped[provider] = outcome.skipped
        elif outcome.fetched is None:
            log.info("%s: no offers (%s)", provider, outcome.error)  # in table.errors: callers show it
            table.errors[provider] = str(outcome.error)
        else:
            log.info("%s: %d offers (%s)", provider, len(outcome.fetched.offers), outcome.provenance)
            table.offers.extend(outcome.fetched.offers)
            table.provenance[provider] = outcome.provenance
            if outcome.fetched.bad_rows:
                table.bad_rows[provider] = outcome.fetched.bad_rows
    return table


def billed_hour(provider: str, name: str) -> float | None:
    """What `provider` reports billing an hour for its instance named `name` (its own instance listing,
    with the user's key); None when it lists no such instance. ProviderError (key masked) on a failure."""
    import requests

    module = MODULES[provider]
    key = api_key(provider)
    try:
        with requests.Session() as session:
            return module.billed_hour(session, base_url(provider), key, name, timeout=http_timeout())
    except ProviderError as e:
        raise ProviderError(redact(str(e), key)) from None
