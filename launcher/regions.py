"""Region preferences as users write them: a provider's own region (`us-east-1`), a prefix of one
(`us-east`, `EU`), or a country code (`US`, `DE`) that names every region in that country whatever
the provider's own naming (Lambda's `us-east-1`, RunPod's `EU-SE-1`, Vast's `US-Texas`).

Matching ignores case. A prefix matches at a `-` boundary only: `US` matches `US-Texas` and `us-east-1`,
not `USA-x`; `us-east` matches `us-east-1` and `us-east-3`.
"""

from __future__ import annotations

import re

# Lambda's regions outside the US, by the data centre's country (Lambda's docs list the cities)
_LAMBDA_COUNTRY = {
    "europe-central-1": "DE",  # Frankfurt
    "asia-northeast-1": "JP",  # Tokyo
    "asia-northeast-2": "JP",  # Osaka
    "asia-south-1": "IN",  # Bangalore
    "me-west-1": "IL",  # Tel Aviv
    "australia-southeast-1": "AU",  # Sydney
}
# RunPod writes a European data centre as EU-<country>-<n>
_RUNPOD_CONTINENTS = {"EU", "AP", "OC", "SA", "AF", "ME"}
_CODE = re.compile(r"[A-Za-z]{2}")


def country(provider: str, region: str) -> str | None:
    """The ISO country code of a provider's region, or None where it names no country."""
    head, _, rest = region.partition("-")
    if provider == "lambda":
        return "US" if head.lower() == "us" else _LAMBDA_COUNTRY.get(region.lower())
    if provider == "runpod":
        if head.upper() in _RUNPOD_CONTINENTS:
            head = rest.partition("-")[0]
        return head.upper() if _CODE.fullmatch(head) else None
    if provider == "vast":  # `<country code>[-<place>]` (launcher/providers/vast.py); ZZ: unknown
        return head.upper() if _CODE.fullmatch(head) and head.upper() != "ZZ" else None
    return None


def matches(wanted: str, provider: str, region: str) -> bool:
    """Whether a region preference entry (`us-east-1`, `us-east`, `US`) allows a provider's region."""
    w, r = wanted.strip().lower(), region.lower()
    if not w:
        return False
    if r == w or r.startswith(w + "-"):
        return True
    code = country(provider, region)
    return bool(_CODE.fullmatch(w)) and code is not None and code.lower() == w


def allowed(wanted: list[str], provider: str, region: str) -> bool:
    """An empty list allows every region; otherwise one entry must match."""
    return not wanted or any(matches(w, provider, region) for w in wanted)
