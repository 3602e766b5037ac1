"""CPU threads for a job that shares its machine with other work (issue 27, item 3).

On a loaded CPU (2 cores, load 10) torch's default, one intra-op thread per core whose OpenMP waits
spin, trains 16-80x slower than one thread: a spinning thread waits at each barrier for a partner the
kernel has descheduled (bench/RESULTS.md, "Local jobs under load"). So a job's OpenMP threads sleep
while they wait (OMP_WAIT_POLICY=PASSIVE) and it trains with the cores the others leave free (the
1-minute load average), one at least. A user's OMP_NUM_THREADS / OMP_WAIT_POLICY are kept.
"""

from __future__ import annotations

import os


def passive_wait() -> None:
    """OpenMP threads that sleep while they wait; before torch is imported (OpenMP reads it once)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def free_cores() -> int:
    """The cores this process may use that the machine's load leaves free (at least 1)."""
    cores = len(os.sched_getaffinity(0))
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average here: the machine reads as idle
        load = 0.0
    return max(1, min(cores, round(cores - load)))


def job_threads() -> int | None:
    """Threads for a CPU job's training and its llama.cpp checks: the free cores, or None where the
    user chose (OMP_NUM_THREADS)."""
    return None if os.environ.get("OMP_NUM_THREADS") else free_cores()
