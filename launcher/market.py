"""A spot market to replay: when each spot offer can be had, over time.

From real traces (e.g. skypilot-org/spot-traces, copied to `../shared/data/spot-traces/` beside this
repository: `{"metadata": {"gap_seconds": N}, "data": [...]}`, one number per tick: spot instances
obtainable, 0 = none; a file or a folder of them, one zone each) or a synthetic model
(`synthetic:HOURS`: each spot offer is up for exponentially distributed spells of mean HOURS and down
for spells a tenth as long).

Replay `seed` maps the traces onto a plan's spot offers in a stated, seeded way: the offers, sorted by
(provider, instance type, region), take the traces in a seeded random order (cycling when there are
more offers than traces), and all start at one seeded random tick of the traces' common length, so
offers keep the traces' correlations in time. A replay longer than the trace wraps around.
On-demand offers are always up.
"""

from __future__ import annotations

import bisect
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from train import BadInput


@dataclass(frozen=True)
class Trace:
    name: str
    gap_s: float
    up: tuple[bool, ...]  # per tick: could a spot instance be had

    @property
    def seconds(self) -> float:
        return self.gap_s * len(self.up)


class _Meta(BaseModel):
    gap_seconds: float = Field(ge=1, allow_inf_nan=False)  # real traces tick every 32 to 300 s


class _TraceFile(BaseModel):
    """A trace file as read: strict, so "0" (a string), true, a dict or NaN is not a tick."""

    model_config = ConfigDict(strict=True)

    metadata: _Meta
    data: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(min_length=1)


def load_traces(path: str | Path) -> list[Trace]:
    """The traces in a trace file or a folder of them (sorted by name); BadInput if there are none, or
    if one is not a trace (one line naming the file and the first bad field)."""
    p = Path(path)
    files = sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not p.exists() or not files:
        raise BadInput(f"--market {path}: no trace files (*.json) there")
    out = []
    for f in files:
        try:
            doc = _TraceFile.model_validate(json.loads(f.read_text()))
        except ValidationError as e:
            raise BadInput.from_validation(e, f"--market {f}: not a spot trace: ") from None
        except (OSError, ValueError) as e:
            raise BadInput(f"--market {f}: not a spot trace ({type(e).__name__}: {e})") from None
        out.append(Trace(f.stem, doc.metadata.gap_seconds, tuple(x > 0 for x in doc.data)))
    return out


def synthetic_traces(mean_up_h: float, n: int = 8, days: float = 30, gap_s: float = 300) -> list[Trace]:
    """`n` traces of `days`: up spells of mean `mean_up_h` hours, down spells a tenth as long (seed 0)."""
    rng = random.Random(0)
    ticks = int(days * 86400 / gap_s)
    out = []
    for i in range(n):
        up, state = [], True
        while len(up) < ticks:
            mean_s = mean_up_h * 3600 * (1 if state else 0.1)
            spell = rng.expovariate(1 / mean_s) / gap_s  # a spell past the trace's end ends with it
            up += [state] * max(1, round(min(spell, ticks - len(up))))
            state = not state
        out.append(Trace(f"synthetic-{i}", gap_s, tuple(up[:ticks])))
    return out


def market_from(spec: str) -> list[Trace]:
    """`--market`: a trace file or folder, or `synthetic:HOURS` (mean hours a spot machine stays up)."""
    if spec.startswith("synthetic:"):
        try:
            hours = float(spec.split(":", 1)[1])
        except ValueError:
            hours = -1
        if not 0 < hours < math.inf:
            raise BadInput(f"--market {spec}: synthetic:HOURS needs a finite mean up-time in hours > 0")
        return synthetic_traces(hours)
    return load_traces(spec)


@dataclass
class Series:
    """One offer's availability in a replay: up/down from `offset` ticks into its trace, wrapping."""

    trace: Trace
    offset: int
    _changes: list[float] = field(default_factory=list)  # seconds from the trace's start where it flips

    def __post_init__(self) -> None:
        up = self.trace.up
        self._changes = [i * self.trace.gap_s for i in range(1, len(up)) if up[i] != up[i - 1]]

    def _pos(self, t: float) -> float:
        return (self.offset * self.trace.gap_s + t) % self.trace.seconds

    def up(self, t: float) -> bool:
        return self.trace.up[int(self._pos(t) // self.trace.gap_s)]

    def next_change(self, t: float) -> float:
        """The first time after `t` where `up` changes (inf when it never does)."""
        if not self._changes:
            return math.inf
        pos = self._pos(t)
        i = bisect.bisect_right(self._changes, pos)
        if i < len(self._changes):
            return t + self._changes[i] - pos
        wrap = self.trace.seconds - pos  # to the trace's end, where it starts over
        first = self.trace.up[0] != self.trace.up[-1]
        return t + wrap if first else t + wrap + self._changes[0]

    def next_up(self, t: float) -> float:
        return t if self.up(t) else self.next_change(t)

    def next_down(self, t: float) -> float:
        return self.next_change(t) if self.up(t) else t

    def up_seconds(self, start: float, end: float) -> list[tuple[float, float]]:
        """The spells within [start, end) when the offer is up."""
        spells, t = [], start
        while t < end:
            nxt = min(self.next_change(t), end)
            if self.up(t):
                spells.append((t, nxt))
            t = nxt
        return spells


class Availability:
    """Every planned offer's availability in one replay (keys: `offer_key`)."""

    def __init__(self, series: dict[tuple, Series]) -> None:
        self.series = series

    def up(self, key: tuple, t: float) -> bool:
        s = self.series.get(key)
        return True if s is None else s.up(t)

    def next_up(self, key: tuple, t: float) -> float:
        s = self.series.get(key)
        return t if s is None else s.next_up(t)

    def next_down(self, key: tuple, t: float) -> float:
        s = self.series.get(key)
        return math.inf if s is None else s.next_down(t)


def preemption_overhead(traces: Sequence[Trace], startup_s: float, checkpoint_s: float) -> float:
    """The expected extra cost of spot as a fraction, from the traces: each up-spell ends in a preemption
    (mean spell = total up time / spells), and each preemption costs a start-up and half a checkpoint
    interval of work redone. What `preemption_overhead` in the preferences guesses at."""
    up_s = sum(sum(t.up) * t.gap_s for t in traces)
    spells = sum(sum(1 for i in range(len(t.up)) if t.up[i] and (i == 0 or not t.up[i - 1])) for t in traces)
    if not up_s or not spells:
        return 0.0
    return (startup_s + checkpoint_s / 2) / (up_s / spells)


def offer_key(o) -> tuple:
    return (o.provider, o.instance_type, o.region, bool(o.spot))


def replay(
    traces: Sequence[Trace], spot_offers: Sequence, seed: int, start: int | None = None
) -> Availability:
    """Map `traces` onto `spot_offers` (OfferRefs, any order) for replay `seed` (see the module doc);
    `start`: this tick of the traces instead of a seeded one."""
    rng = random.Random(seed)
    keys = sorted({offer_key(o) for o in spot_offers if o.spot}, key=str)
    order = list(range(len(traces)))
    rng.shuffle(order)
    ticks = min(len(t.up) for t in traces)
    start = rng.randrange(ticks) if start is None else start
    return Availability({k: Series(traces[order[i % len(order)]], start) for i, k in enumerate(keys)})
