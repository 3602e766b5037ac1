"""One owner per run: a lease in the ledger's database names the launcher that follows a run.

Money moves only under the lease: reserving, settling and releasing a run's reservations check, in
the same ledger transaction, that the caller holds the run's lease. The lease lives in the ledger's
database, so it holds across processes and, with a PostgreSQL ledger, across machines.

States of a run's lease (one row per run in the `leases` table; no row = free):

    FREE  --acquire-->  HELD(A)                 a launcher (A) starts following the run
    HELD(A) --renew by A-->  HELD(A)            every `ttl_s / 4` seconds, from a background thread
    HELD(A) --release by A-->  FREE             A finished following (jobs settled, outputs pulled)
    HELD(A) --acquire by B, A alive-->  refused (RunOwned: names A's host, pid and since)
    HELD(A) --A proven dead-->  STALE           A's lease expired (no renewal for ttl_s), or A ran on
                                                this machine (same boot) and its process is gone
    STALE --acquire by B-->  HELD(B)            takeover: B adopts A's jobs (follows the running ones,
                                                settles the finished ones, releases never-launched ones)
    HELD(B) --renew/settle by A-->  LeaseLost   A was taken for dead: it stops following and moves no money

A lease is never taken from a live owner; "dead" is proven, never guessed from a slow answer.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

DEFAULT_TTL_S = 60.0


class RunOwned(Exception):
    """Another live launcher holds the run's lease; the message names it."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        super().__init__(
            f"run {lease.run_id} is followed by another launcher (pid {lease.pid} on {lease.host}, since "
            f"{lease.since.isoformat(timespec='seconds')}): wait for it to finish, or stop it first"
            f" (`meetara status {lease.run_id}` shows its jobs)"
        )


class LeaseLost(Exception):
    """The caller's lease on a run was taken over (it was presumed dead): it must stop moving money."""


@dataclass(frozen=True)
class Lease:
    run_id: str
    owner: str  # a random token per launcher process
    host: str
    boot_id: str  # tells this machine apart from another of the same host name
    pid: int
    pid_start: str | None  # the owner's process start time (tells a pid apart from a reused one)
    since: datetime
    renewed_at: datetime
    expires_at: datetime


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks, or None if no live process has that pid (zombie = gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


@dataclass(frozen=True)
class Owner:
    """This process as a lease owner."""

    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    host: str = field(default_factory=socket.gethostname)
    boot_id: str = field(default_factory=boot_id)
    pid: int = field(default_factory=os.getpid)
    pid_start: str | None = field(default_factory=lambda: proc_start(os.getpid()))


def is_dead(lease: Lease, now: datetime) -> bool:
    """Proven dead: expired, or on this machine with its process gone (or its pid reused)."""
    if now >= lease.expires_at:
        return True
    if lease.boot_id == boot_id() and lease.pid_start is not None:
        return proc_start(lease.pid) != lease.pid_start
    return False


class Holder:
    """Holds a run's lease: acquires it, renews it from a daemon thread, releases it.

    `lost` is set when a renewal finds the lease taken over; the conductor checks it and stops."""

    def __init__(self, ledger, run_id: str, owner: Owner | None = None, ttl_s: float = DEFAULT_TTL_S):
        self.ledger, self.run_id, self.ttl_s = ledger, run_id, ttl_s
        self.owner = owner or Owner()
        self.lost = threading.Event()
        self.taken_from: Lease | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.owner.token

    def acquire(self) -> Holder:
        """Take the lease (RunOwned if a live launcher holds it) and start renewing it."""
        self.taken_from = self.ledger.acquire_lease(self.run_id, self.owner, self.ttl_s)
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.ledger.renew_lease(self.run_id, self.token, self.ttl_s)
            except LeaseLost:
                self.lost.set()
                return
            except Exception:  # a ledger hiccup: try again next round; expiry is ttl_s away
                continue

    def stop_renewing(self) -> None:
        """Stop the renewal thread; the lease stays ours until it expires or is taken over (handover)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def release(self) -> None:
        """Give the run up. A ledger that is gone (a lost PostgreSQL) cannot be told: the lease then
        expires by itself after `ttl_s` (one warning line; the money was handled before this)."""
        from budgets import LedgerError

        self.stop_renewing()
        if not self.lost.is_set():
            try:
                self.ledger.release_lease(self.run_id, self.token)
            except LeaseLost:
                pass
            except LedgerError as e:
                logging.getLogger("meetara").warning(
                    "run %s: its lease could not be released (%s); it expires by itself in %.0f s",
                    self.run_id,
                    e,
                    self.ttl_s,
                )

    def __enter__(self) -> Holder:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
