"""Budgets: ledger, caps, reservations, watchdog and cost reports (see the budgets issue)."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """meetara's state directory: $MEETARA_STATE_DIR, else $XDG_STATE_HOME/meetara, else
    ~/.local/state/meetara (created on demand)."""
    if os.environ.get("MEETARA_STATE_DIR"):
        d = Path(os.environ["MEETARA_STATE_DIR"])
    elif os.environ.get("XDG_STATE_HOME"):
        d = Path(os.environ["XDG_STATE_HOME"]) / "meetara"
    else:
        d = Path.home() / ".local" / "state" / "meetara"
    d.mkdir(parents=True, exist_ok=True)
    return d
