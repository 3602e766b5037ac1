"""What every provider fetcher shares: the result shape, HTTP with bounded retries, redaction."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from launcher.offer import Offer, ProviderError

if TYPE_CHECKING:
    import requests

log = logging.getLogger("launcher.offers")

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass
class Fetched:
    """A provider's parsed answer: usable offers plus how many rows had to be skipped."""

    offers: list[Offer]
    bad_rows: int = 0


class _Retryable(Exception):
    """A transient failure (connection, timeout, 5xx, 429) worth another attempt."""


def http_timeout() -> float:
    """Seconds per HTTP request (`MEETARA_HTTP_TIMEOUT`, default 15)."""
    return float(os.environ.get("MEETARA_HTTP_TIMEOUT", "15"))


def redact(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` masked."""
    return text.replace(secret, "***") if secret else text


def _error_detail(resp: requests.Response) -> str:
    """The provider's own error message if its body carries one, else the start of the body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200].strip()
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return f"{err.get('code', '')} {err['message']}".strip()
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return str(errors[0].get("message", ""))
        for key in ("msg", "message", "error"):
            if isinstance(body.get(key), str):
                return body[key]
    return json.dumps(body)[:200]


def request_json(
    session: requests.Session,
    method: str,
    url: str,
    *,
    timeout: float,
    secret: str | None = None,
    **kwargs: Any,
) -> Any:
    """Send one request, retrying transient failures; return the decoded JSON body.

    Raises ProviderError (with `secret` masked) on a final HTTP error, an unreachable host or a
    body that is not JSON. Retries: `MEETARA_HTTP_RETRIES` (default 3) more attempts with
    exponential backoff from `MEETARA_HTTP_BACKOFF` seconds (default 1, capped at 10).
    """
    import requests
    from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

    retries = int(os.environ.get("MEETARA_HTTP_RETRIES", "3"))
    backoff = float(os.environ.get("MEETARA_HTTP_BACKOFF", "1"))

    @retry(
        retry=retry_if_exception_type(_Retryable),
        stop=stop_after_attempt(retries + 1),
        wait=wait_exponential(multiplier=backoff, max=10),
        reraise=True,
    )
    def attempt() -> requests.Response:
        try:
            resp = session.request(method, url, timeout=timeout, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as e:
            # Only the exception's type: its text repeats the URL and connection internals.
            log.debug("%s %s failed: %s", method, url, type(e).__name__)
            raise _Retryable(f"unreachable ({type(e).__name__})") from None
        if resp.status_code in RETRYABLE_STATUS:
            log.debug("%s %s -> HTTP %s, may retry", method, url, resp.status_code)
            raise _Retryable(f"HTTP {resp.status_code}: {_error_detail(resp)}")
        return resp

    try:
        resp = attempt()
    except _Retryable as e:
        raise ProviderError(redact(f"{e} after {retries + 1} attempts", secret)) from None
    if not resp.ok:
        raise ProviderError(redact(f"HTTP {resp.status_code}: {_error_detail(resp)}", secret))
    try:
        return resp.json()
    except ValueError:
        raise ProviderError(f"response is not valid JSON: {redact(resp.text[:80], secret)!r}") from None


def field_of(body: Any, key: str) -> Any:
    """`body[key]` of a JSON object, else ProviderError: the response is not the expected shape."""
    if not isinstance(body, dict) or key not in body:
        raise ProviderError(f"malformed response: no {key!r} field")
    return body[key]


def rows_of(value: Any, what: str) -> list:
    """The rows of a JSON array (or the values of an object keyed by id); ProviderError if none."""
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, list):
        raise ProviderError(f"malformed response: {what} is not a list")
    if not value:
        raise ProviderError(f"empty response: no {what}")
    return value


def positive(value: Any) -> float | None:
    """A price that is really offered: a positive number, else None (providers send 0 or null)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value > 0 else None


def parse_rows(provider: str, rows: Iterable[Any], parse: Callable[[Any], list[Offer]]) -> Fetched:
    """Apply `parse` to each row; a row it cannot read is skipped and counted, never fatal.

    `parse` returns the row's offers (none when the row has no capacity) and raises
    KeyError/TypeError/ValueError/AttributeError/ArithmeticError on a malformed row.
    """
    offers: list[Offer] = []
    bad = total = 0
    for row in rows:
        total += 1
        try:
            offers.extend(parse(row))
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
            bad += 1
            log.debug("%s: skipped a malformed row (%s: %s)", provider, type(e).__name__, e)
    if bad:
        log.warning("%s: skipped %d malformed row(s) of %d", provider, bad, total)
        if bad == total:
            raise ProviderError(f"malformed response: all {total} rows unreadable")
    return Fetched(offers, bad)
