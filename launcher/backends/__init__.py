"""Backends run rendered tasks: `local` (the embedded default) and `skypilot` (managed cloud jobs)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# where each provider's credentials live for SkyPilot (env var, or its credential file)
CREDENTIALS = {
    "lambda": ("LAMBDA_API_KEY", "~/.lambda_cloud/lambda_keys"),
    "runpod": ("RUNPOD_API_KEY", "~/.runpod/config.toml"),
    "vast": ("VAST_API_KEY", "~/.config/vastai/vast_api_key"),
}


def skypilot_installed() -> bool:
    return importlib.util.find_spec("sky") is not None


def configured_clouds() -> list[str]:
    """Providers with credentials on this machine (presence only: nothing is read or sent)."""
    return [
        name
        for name, (var, path) in CREDENTIALS.items()
        if os.environ.get(var) or Path(path).expanduser().is_file()
    ]
