"""Crash points: a launcher killed at a named moment of its life, for the tests of recovery.

`MEETARA_CRASH_AT=<point>` makes the launcher SIGKILL itself when it reaches that point (nothing is
cleaned up, as with a real crash). Points, in the order a launch reaches them:

    planning   the plan is made and the run recorded; nothing reserved yet
    reserving  the jobs' reservations are in the ledger; the run record does not name them yet
    launched   a job's process/managed job started; its handle is not saved yet
    running    a job is running (the first poll that sees it so)
    pulling    a domain is done in the store; its files are being pulled
    follower   a background follower (launch --detach) starts, before it takes the run over
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    """Die at once (SIGKILL) if MEETARA_CRASH_AT names this point."""
    if os.environ.get("MEETARA_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
