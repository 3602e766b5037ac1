"""Budgets: ledger, caps, reservations, watchdog and cost reports (see the budgets issue).

`budgets.caps` holds the configuration and calendar windows, `budgets.ledger` the ledger (SQLite by
default, PostgreSQL for a team), `budgets.report` the cost reports, `budgets.cli` the commands.
"""

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


class BudgetExceeded(Exception):
    """A reservation would pass a cap; nothing was written. The message names the cap and the sums."""

    def __init__(self, cap_name: str, cap: float, spent: float, reserved: float, asked: float) -> None:
        self.cap_name, self.cap, self.spent, self.reserved, self.asked = cap_name, cap, spent, reserved, asked
        super().__init__(
            f"{cap_name} cap ${cap:.2f} would be passed: spent ${spent:.2f} + reserved ${reserved:.2f}"
            f" + asked ${asked:.2f}"
        )


class LedgerError(Exception):
    """The ledger cannot be read or written (corrupt file, not a ledger, server unreachable): one line."""
