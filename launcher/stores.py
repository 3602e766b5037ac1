"""Which store a run writes to: the default (MEETARA_STORE, else ./store locally) and absolute URLs."""

from __future__ import annotations

import os
from pathlib import Path

from train import BadInput


def default_store(backend: str) -> str:
    url = os.environ.get("MEETARA_STORE")
    if url:
        return url
    if backend == "skypilot":
        raise BadInput("cloud jobs need an s3:// store they can reach: pass --store s3://BUCKET/PREFIX")
    return f"file://{Path('store').resolve()}"


def absolute_store(url: str) -> str:
    """file:// URLs made absolute, so a job started elsewhere (another cwd) writes to the same place."""
    if url.startswith("file://"):
        return f"file://{Path(url[7:]).expanduser().resolve()}"
    if "://" not in url:
        return f"file://{Path(url).expanduser().resolve()}"
    return url
