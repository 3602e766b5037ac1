"""Budgets: ledger, caps, reservations, watchdog and cost reports (see the budgets issue).

`budgets.caps` holds the configuration and calendar windows, `budgets.ledger` the ledger (SQLite by
default, PostgreSQL for a team), `budgets.report` the cost reports, `budgets.cli` the commands.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600  # state, ledger, run records and job logs: the user's alone


STATE_MARKS = {"ledger.sqlite", "local-jobs"}  # what marks an existing folder as meetara's state


def state_dir() -> Path:
    """meetara's state directory: $MEETARA_STATE_DIR, else $XDG_STATE_HOME/meetara, else
    ~/.local/state/meetara (created on demand, mode 0700). An existing one is tightened to 0700 when it
    is plainly meetara's (empty, or holding its ledger or local jobs; owned by this user; not sticky),
    never a shared folder someone pointed MEETARA_STATE_DIR at, such as /tmp or a home folder."""
    if os.environ.get("MEETARA_STATE_DIR"):
        d = Path(os.environ["MEETARA_STATE_DIR"])
    elif os.environ.get("XDG_STATE_HOME"):
        d = Path(os.environ["XDG_STATE_HOME"]) / "meetara"
    else:
        d = Path.home() / ".local" / "state" / "meetara"
    if not d.is_dir():
        return private_dir(d)
    try:
        st = d.stat()
        entries = {p.name for p in d.iterdir()}
    except OSError:
        return d
    if st.st_uid == os.getuid() and not st.st_mode & stat.S_ISVTX and (not entries or entries & STATE_MARKS):
        return private_dir(d)
    return d


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) if absent; make `path` itself mode 0700. Returns `path`.
    For meetara's own folders (the state dir's subfolders): it tightens an existing folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(PRIVATE_DIR)
    except OSError:  # not ours to change: leave it
        pass
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty with mode 0600 if it does not exist (an existing file is left as it is).
    Call it before a library opens the file (sqlite3.connect, logging.FileHandler, open(..., "a"))."""
    path = Path(path)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    return path


def open_private(path: Path, mode: str = "ab"):
    """`open(path, mode)` for appending or writing, creating the file 0600 (job logs, lock files)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, PRIVATE_FILE), mode)


def write_private(path: Path, data: str | bytes) -> Path:
    """Write `data` to `path` atomically (temp file beside it, fsync, rename), mode 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mkstemp: 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


MONEY_PLACES = 6  # the ledger's figures, as `meetara budget --json` and reports give them


def usd(x: float, symbol: bool = True) -> str:
    """Dollars as every message and table shows them: $1,234.50, $0.045, $0.000417. At least two
    decimals, and as many more (up to MONEY_PLACES) as the amount needs, so a figure read back equals
    the ledger's value rounded to MONEY_PLACES: small local runs never read as $0.00, and the sums a
    refusal names add up to the cap they pass."""
    x = round(float(x), MONEY_PLACES) + 0.0  # + 0.0: no "-$0.00"
    whole, _, frac = f"{abs(x):,.{MONEY_PLACES}f}".partition(".")
    frac = frac.rstrip("0").ljust(2, "0")
    return f"{'-' if x < 0 else ''}{'$' if symbol else ''}{whole}.{frac}"


def rate_change(planned: float, billed: float) -> str:
    """How a billed $/h differs from the planned one: "+20%" ("unplanned" against a free plan)."""
    return f"{(billed - planned) / planned:+.0%}" if planned > 0 else "unplanned"


def usd_rate(planned: float, billed: float | None) -> str:
    """A machine's $/h as status shows it: the planned one, or what its provider bills and how that
    differs from the plan ("$0.30 billed (+20% on $0.25)")."""
    if billed is None or abs(billed - planned) < 1e-9:
        return usd(planned)
    return f"{usd(billed)} billed ({rate_change(planned, billed)} on {usd(planned)})"


class BudgetExceeded(Exception):
    """A reservation would pass a cap; nothing was written. The message names the cap and the sums."""

    def __init__(self, cap_name: str, cap: float, spent: float, reserved: float, asked: float) -> None:
        self.cap_name, self.cap, self.spent, self.reserved, self.asked = cap_name, cap, spent, reserved, asked
        super().__init__(
            f"{cap_name} cap {usd(cap)} would be passed: spent {usd(spent)} + reserved {usd(reserved)}"
            f" + asked {usd(asked)}"
        )


class LedgerError(Exception):
    """The ledger cannot be read or written (corrupt file, not a ledger, server unreachable): one line."""
