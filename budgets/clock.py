"""The time meetara's money and run code read: the wall clock, or a virtual one for `meetara simulate`.

Everything that decides about money or a job's progress (the ledger's timestamps, accrual, the watchdog,
the conductor's polls and its records) asks `now()` and waits with `wait()`. A replay installs a
`VirtualClock` with `use()`: the same code then runs on simulated time, and a wait jumps straight to the
next thing that happens (the end of the poll interval, or an event the simulated backend scheduled).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta


class WallClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(seconds)


class VirtualClock:
    """Simulated time: `wait` returns at once, having moved time to the end of the wait or to the first
    wake-up scheduled (`wake_at`) before it, whichever comes first."""

    def __init__(self, start: datetime) -> None:
        self.t = start
        self._wakeups: list[datetime] = []

    def now(self) -> datetime:
        return self.t

    def wake_at(self, when: datetime) -> None:
        if when > self.t:
            heapq.heappush(self._wakeups, when)

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        if event.is_set():
            return True
        end = self.t + timedelta(seconds=seconds)
        while self._wakeups and self._wakeups[0] <= self.t:
            heapq.heappop(self._wakeups)
        self.t = min(end, self._wakeups[0]) if self._wakeups else end
        return event.is_set()


_clock: WallClock | VirtualClock = WallClock()


def now() -> datetime:
    """The current time (UTC, aware) of the clock in use."""
    return _clock.now()


def wait(event: threading.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `event` on the clock in use; True if it is set."""
    return _clock.wait(event, seconds)


@contextmanager
def use(clock: WallClock | VirtualClock) -> Iterator[WallClock | VirtualClock]:
    """Run a block on `clock` (one replay at a time: the clock is process-wide)."""
    global _clock
    before, _clock = _clock, clock
    try:
        yield clock
    finally:
        _clock = before
