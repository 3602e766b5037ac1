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
    """A file store (`file://DIR` in any case, `file:DIR`, a bare path) as an absolute file:// URL, so a
    job started elsewhere (another cwd) writes to the same place; other URLs as given."""
    from train.store import file_root

    path = file_root(url)
    return url if not path else f"file://{Path(path).expanduser().resolve()}"
