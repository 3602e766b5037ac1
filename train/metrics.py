"""Training curves that survive preemption: each domain's step losses in one small store object.

Key: `runs/<run>/domains/<domain>/checkpoints/metrics.jsonl` (`metrics_key`), JSON Lines, one record
per line, in order (step, then held-out "before" < train < held-out "after"):

    {"kind": "heldout", "when": "before", "step": 0, "loss": 5.1, "time": 1712345678.1}
    {"kind": "train", "step": 2, "epoch": 0.0741, "loss": 4.27, "lr": 0.0004, "tokens": 812,
     "s_per_step": 0.059, "tokens_per_s": 13762.7, "time": 1712345678.2}
    ...
    {"kind": "heldout", "when": "after", "step": 27, "loss": 2.3, "time": 1712345699.9}

- train: one per optimizer step, `step` 1..total exactly once. `loss` is the step's training loss
  (the float the log prints as `<domain>: step 3/27 loss 4.2700`), `epoch` the epochs done after the
  step (fractional), `lr` the learning rate the step used, `tokens` its real (unpadded) tokens,
  `s_per_step` its wall seconds (checkpoint writes excluded), `tokens_per_s` their ratio, `time` Unix
  seconds when it ended (a gap in `time` is a preemption).
- heldout: the token-weighted held-out loss, `before` training (step 0: the base model, adapter
  off) and `after` it (step = total: the trained adapter).

When it is written. Object stores have no append, so the object is rewritten whole (a record is
~150 bytes: a few KB per domain, ~150 KB for a 1000-step run), always by one writer, and a reader
gets one whole version with a single GET. One object per checkpoint segment would save rewriting but
make a reader list and merge segments, and leave segments beyond the resume point to delete; the
checkpoint itself already costs megabytes per write. The curve is:
- a part of every checkpoint (`PART`, hashed in its manifest like the weights): a checkpoint carries
  exactly the curve up to its step, and a resume continues from that, so a job killed at any moment
  (even between a checkpoint and the copy below) loses no step of the curve and repeats none;
- copied to `metrics_key` once that checkpoint is committed (on the upload thread, before pruning):
  the copy never claims a step beyond a committed checkpoint. Training that starts or resumes first
  rewrites the copy to the curve of the checkpoint it resumes (none: just the held-out loss before),
  dropping what a killed run recorded after it (e.g. above a corrupt newest checkpoint): the steps
  it redoes are recorded once, with their redone values;
- written whole once more, with the steps after the last checkpoint and the held-out loss after
  training, just before the domain's manifest.json (or failed.json): once a domain is done its curve
  is complete. (A job stopped between the two leaves a curve ahead of the checkpoints; a rerun
  resumes the checkpoint and trims it.)

It sits beside the checkpoints, not beside the domain's outputs: it is training state, and a domain
that was interrupted publishes nothing outside `checkpoints/`.

`read_metrics(store, run_id, domain)` is what the launcher and a dashboard call.
"""

from __future__ import annotations

import json
import logging
import time

from train.store import ObjectStore

log = logging.getLogger("meetara.train")
FILE = "metrics.jsonl"
PART = FILE  # its name inside a checkpoint folder

_RANK = {"before": 0, "after": 2}  # train records (no "when") rank 1


def metrics_key(run_id: str, domain: str) -> str:
    return f"runs/{run_id}/domains/{domain}/checkpoints/{FILE}"


def parse(data: bytes, where: str = FILE) -> list[dict]:
    """The records of a metrics file; a line that is not a JSON object with a step is skipped (logged)."""
    out = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            log.warning("%s:%d: not a metrics record; skipped", where, n)
            continue
        out.append(rec)
    return out


def dump(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()


def _identity(rec: dict) -> tuple:
    return rec.get("kind"), rec.get("when"), rec["step"]


def _order(rec: dict) -> tuple[int, int]:
    return rec["step"], _RANK.get(rec.get("when"), 1)


def read_metrics(
    store: ObjectStore | str, run_id: str, domain: str, *, endpoint_url: str | None = None
) -> list[dict]:
    """A domain's curve as the store holds it now (module doc): [] before anything was recorded; up
    to the newest committed checkpoint while it trains; complete once its manifest is written.
    `store` is an open store or its URL (opened read-only)."""
    if isinstance(store, str):
        from train.store import open_store

        store = open_store(store, endpoint_url=endpoint_url, writable=False)
    key = metrics_key(run_id, domain)
    try:
        return parse(store.get(key), key)
    except KeyError:
        return []


class Metrics:
    """A domain's curve being recorded: the pipeline adds the held-out losses, `lora.train` the steps,
    resumes it (`resume`) and puts `dump()` into each checkpoint; `write` stores it whole."""

    PART = PART

    def __init__(self, store: ObjectStore, key: str) -> None:
        self.store, self.key = store, key
        self.records: list[dict] = []

    def heldout(self, when: str, step: int, loss: float) -> None:
        """Record a held-out loss (`when`: "before" or "after" training)."""
        rec = {"kind": "heldout", "when": when, "step": step, "loss": loss, "time": round(time.time(), 3)}
        self._add(rec)

    def train_step(
        self, step: int, *, epoch: float, loss: float, lr: float, tokens: int, seconds: float
    ) -> None:
        self._add(
            {
                "kind": "train",
                "step": step,
                "epoch": round(epoch, 4),
                "loss": loss,
                "lr": lr,
                "tokens": tokens,
                "s_per_step": round(seconds, 6),
                "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
                "time": round(time.time(), 3),
            }
        )

    def _add(self, rec: dict) -> None:
        """Append `rec` (steps come in order); one out of order replaces any for the same moment."""
        if self.records and _order(rec) <= _order(self.records[-1]):
            self.records = sorted(
                [r for r in self.records if _identity(r) != _identity(rec)] + [rec], key=_order
            )
        else:
            self.records.append(rec)

    def dump(self) -> bytes:
        return dump(self.records)

    def resume(self, step: int, saved: bytes | None) -> None:
        """Continue the curve of the checkpoint training resumes at `step` (0: none, training starts
        over: nothing stored is kept): `saved` is its `PART` (None for a checkpoint written before
        checkpoints held it: then the stored copy, up to `step`). A record this object already holds
        for the same moment (the held-out loss before training, measured again by a resumed domain)
        is dropped: the curve keeps the first. The stored copy is rewritten now if it differs: it
        never runs ahead of the resumed checkpoint, and the steps redone from here are not in it twice."""
        stored = self._get()
        if saved is not None:
            base = parse(saved, f"checkpoint {step} {PART}")
        elif step > 0:  # a checkpoint written before checkpoints held the curve
            base = parse(stored or b"", self.key)
        else:  # training starts over: what is stored belongs to checkpoints that are gone
            base = []
        base = [r for r in base if r["step"] <= step]
        known = {_identity(r) for r in base}
        self.records = sorted(base + [r for r in self.records if _identity(r) not in known], key=_order)
        if self.dump() != stored:
            self.write()

    def _get(self) -> bytes | None:
        try:
            return self.store.get(self.key)
        except KeyError:
            return None

    def write(self) -> None:
        self.store.put(self.key, self.dump())
