"""Atomic checkpoints in an object store.

A checkpoint is a folder `<prefix>/step-NNNNNNNN/` holding its parts and, written last, `MANIFEST.json`
with each part's sha256 and size. A checkpoint without a manifest, or whose parts do not match it,
does not exist: resume takes the newest valid one. Pruning deletes the manifest first, so a
half-deleted checkpoint is never mistaken for a valid one. `commit` writes objects that must not run
ahead of the checkpoints (the training curve, train/metrics.py) after the manifest, before pruning.

`Uploader` moves the upload off the training thread: training serializes the checkpoint to bytes (so
what is saved is exactly the state at that step) and goes on while one background thread uploads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from train import BadInput
from train.store import ObjectStore

log = logging.getLogger(__name__)
MANIFEST = "MANIFEST.json"
_STEP = re.compile(r"step-(\d{8})$")


@dataclass
class Checkpoint:
    step: int
    parts: dict[str, bytes]
    meta: dict


class ParamsChanged(BadInput):
    """The newest checkpoint was trained with other parameters than those of the run that would resume
    it. `changes` lists (name, old, new)."""

    def __init__(self, step: int, changes: list[tuple[str, Any, Any]]) -> None:
        self.step, self.changes = step, changes
        diff = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)
        super().__init__(f"the checkpoint at step {step} was trained with other parameters: {diff}")


def changed_params(ckpt: Checkpoint, params: dict) -> list[tuple[str, Any, Any]]:
    """(name, recorded, given) for each parameter `ckpt` recorded (meta `params`) with another value
    than `params` has; a name only one side has is not compared (older checkpoints record none)."""
    old = ckpt.meta.get("params")
    if not isinstance(old, dict):
        return []
    new = json.loads(json.dumps(params))  # as the manifest stores it: tuples are lists, and so on
    return [(k, old[k], new[k]) for k in old if k in new and old[k] != new[k]]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _folder(prefix: str, step: int) -> str:
    return f"{prefix}/step-{step:08d}"


def save(
    store: ObjectStore, prefix: str, step: int, parts: dict[str, bytes], meta: dict | None = None
) -> None:
    """Upload the parts, then commit the checkpoint by writing its manifest."""
    folder = _folder(prefix, step)
    for name, data in parts.items():
        store.put(f"{folder}/{name}", data)
    manifest = {
        "step": step,
        "created": time.time(),
        "parts": {name: {"sha256": sha256(data), "size": len(data)} for name, data in parts.items()},
        "meta": meta or {},
    }
    store.put(f"{folder}/{MANIFEST}", json.dumps(manifest, indent=1).encode())


def commit(
    store: ObjectStore,
    prefix: str,
    step: int,
    parts: dict[str, bytes],
    meta: dict | None = None,
    *,
    keep: int,
    after: dict[str, bytes] | None = None,
) -> None:
    """`save` the checkpoint, then put `after` (key -> bytes: objects that describe the state at this
    step, such as the training curve, so written only once the checkpoint that holds it is
    committed), then `prune` to the newest `keep`."""
    save(store, prefix, step, parts, meta)
    for key, data in (after or {}).items():
        store.put(key, data)
    prune(store, prefix, keep)


def steps(store: ObjectStore, prefix: str) -> list[int]:
    """Steps that have a checkpoint folder (valid or not), newest first."""
    found = set()
    for key in store.list(prefix):
        m = _STEP.search(key.rsplit("/", 1)[0])
        if m:
            found.add(int(m.group(1)))
    return sorted(found, reverse=True)


def load(store: ObjectStore, prefix: str, step: int) -> Checkpoint | None:
    """The checkpoint at `step` if its manifest exists and every part matches it, else None."""
    folder = _folder(prefix, step)
    try:
        manifest = json.loads(store.get(f"{folder}/{MANIFEST}"))
        parts = {}
        for name, want in manifest["parts"].items():
            data = store.get(f"{folder}/{name}")
            if len(data) != want["size"] or sha256(data) != want["sha256"]:
                log.warning("checkpoint %s: part %s does not match its manifest; skipped", folder, name)
                return None
            parts[name] = data
        if manifest["step"] != step:
            return None
        return Checkpoint(step, parts, manifest.get("meta", {}))
    except KeyError:
        log.info("checkpoint %s has no manifest or a missing part; skipped", folder)
        return None
    except (ValueError, TypeError):
        log.warning("checkpoint %s has a malformed manifest; skipped", folder)
        return None


def latest(store: ObjectStore, prefix: str) -> Checkpoint | None:
    """The newest valid checkpoint under `prefix`, skipping partial or corrupt ones."""
    for step in steps(store, prefix):
        ckpt = load(store, prefix, step)
        if ckpt is not None:
            return ckpt
    return None


def _delete(store: ObjectStore, prefix: str, doomed: list[int]) -> list[int]:
    for step in doomed:
        folder = _folder(prefix, step)
        store.delete(f"{folder}/{MANIFEST}")
        for key in store.list(folder):
            store.delete(key)
    return doomed


def prune(store: ObjectStore, prefix: str, keep: int) -> list[int]:
    """Delete every checkpoint folder but the newest `keep` committed ones (those with a manifest):
    a partial folder left by a killed upload never takes a good checkpoint's place. Returns the
    deleted steps."""
    found = steps(store, prefix)
    kept = [s for s in found if store.exists(f"{_folder(prefix, s)}/{MANIFEST}")][:keep]
    return _delete(store, prefix, [s for s in found if s not in kept])


def discard_after(store: ObjectStore, prefix: str, step: int) -> list[int]:
    """Delete the checkpoint folders after `step`, the one training resumes from (0: none): what a
    killed run left there is invalid, or training would not resume before it. Returns their steps."""
    return _delete(store, prefix, [s for s in steps(store, prefix) if s > step])


@dataclass
class Uploader:
    """Uploads checkpoints (then prunes) on one background thread, one at a time: `submit` returns as
    soon as the previous upload is done, so training waits on the store only when uploads are slower
    than the checkpoint interval. An upload's error is raised by the next `submit`, `wait` or `close`.

    `waited` is the seconds training spent waiting for a previous upload; `uploads` the seconds each
    upload took (store retries included)."""

    store: ObjectStore
    prefix: str
    keep: int
    waited: float = 0.0
    uploads: list[float] = field(default_factory=list)
    _pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
    )
    _pending: Future | None = None

    def submit(
        self,
        step: int,
        parts: dict[str, bytes],
        meta: dict | None = None,
        after: dict[str, bytes] | None = None,
    ) -> None:
        """Upload as `commit` does (`after` once the checkpoint is committed)."""
        self.wait()
        self._pending = self._pool.submit(self._upload, step, parts, meta, after)

    def _upload(
        self, step: int, parts: dict[str, bytes], meta: dict | None, after: dict[str, bytes] | None
    ) -> None:
        t = time.perf_counter()
        commit(self.store, self.prefix, step, parts, meta, keep=self.keep, after=after)
        self.uploads.append(time.perf_counter() - t)

    def wait(self) -> None:
        """Block until the upload in flight (if any) is committed; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            t = time.perf_counter()
            try:
                pending.result()
            finally:
                self.waited += time.perf_counter() - t

    def close(self, *, raise_errors: bool = True) -> None:
        """Finish the upload in flight and stop the thread. With `raise_errors=False` (training is
        already failing) an upload error is logged, not raised, so it cannot hide the first error."""
        try:
            self.wait()
        except Exception as e:
            if raise_errors:
                raise
            log.warning("checkpoint upload failed while training stopped: %s", e)
        finally:
            self._pool.shutdown(wait=True)
