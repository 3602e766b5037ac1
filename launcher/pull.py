"""Bring a run's validated GGUF files from the store into a local folder, safely.

    models/<domain>/adapter.gguf, model-Q4_K_M.gguf, manifest.json    (manifest written last)
    models/base/<base>-f16.gguf                                          (what the adapters apply to)

A file is downloaded into a hidden `.part` beside its target (resumed if a previous pull stopped
part-way), checked against the size and sha256 the domain's manifest recorded, and only then renamed
over the target. A local file that already matches is left alone; a download that does not match is
refused and the previous local file kept. Domains whose manifest says validation failed are not pulled.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from train.pipeline import MANIFEST, domain_prefix
from train.store import ObjectStore


class PullError(RuntimeError):
    """A downloaded file does not match its manifest (the previous local file is kept)."""


@dataclass
class PullResult:
    domain: str
    status: str  # pulled | up-to-date | not-finished | failed-validation | error
    files: dict[str, str] = field(default_factory=dict)  # name -> local path
    bytes: int = 0
    detail: str = ""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_verified(store: ObjectStore, entry: dict, dest: Path) -> int:
    """Make `dest` hold the object `entry` describes ({key, sha256, size}); returns bytes downloaded."""
    if dest.exists() and dest.stat().st_size == entry["size"] and sha256_file(dest) == entry["sha256"]:
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part")
    resumed = part.exists() and 0 < part.stat().st_size < entry["size"]
    if not resumed:
        part.unlink(missing_ok=True)
    before = part.stat().st_size if resumed else 0
    store.resume_file(entry["key"], part)
    got_size, got_sha = part.stat().st_size, sha256_file(part)
    if resumed and (got_size, got_sha) != (entry["size"], entry["sha256"]):
        # the kept prefix may have come from an older object: one clean download before giving up
        part.unlink()
        before = 0
        store.resume_file(entry["key"], part)
        got_size, got_sha = part.stat().st_size, sha256_file(part)
    if (got_size, got_sha) != (entry["size"], entry["sha256"]):
        part.unlink()
        kept = "; the previous local file is kept" if dest.exists() else ""
        raise PullError(
            f"{entry['key']}: downloaded {got_size} bytes with sha256 {got_sha[:12]}..., the manifest says "
            f"{entry['size']} bytes, {entry['sha256'][:12]}...{kept}"
        )
    os.replace(part, dest)
    return got_size - before


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def pull_domain(store: ObjectStore, run_id: str, domain: str, dest: Path) -> PullResult:
    """Pull one domain's files (and the base GGUF they need) if its manifest says done and validated."""
    prefix = domain_prefix(run_id, domain)
    try:
        manifest = json.loads(store.get(f"{prefix}/{MANIFEST}"))
    except KeyError:
        failed = store.exists(f"{prefix}/failed.json")
        return PullResult(domain, "failed-validation" if failed else "not-finished")
    if manifest.get("status") != "done" or not manifest.get("validation", {}).get("passed"):
        return PullResult(domain, "failed-validation", detail="manifest says validation did not pass")
    result = PullResult(domain, "up-to-date")
    base = manifest["base_gguf"]
    wanted = {"base": (base, dest / "base" / Path(base["key"]).name)}
    for name, entry in manifest["files"].items():
        wanted[name] = (entry, dest / domain / Path(entry["key"]).name)
    try:
        for name, (entry, path) in wanted.items():
            got = fetch_verified(store, entry, path)
            result.bytes += got
            result.files[name] = str(path)
    except PullError as e:
        result.status, result.detail = "error", str(e)
        return result
    local_manifest = dest / domain / MANIFEST
    if result.bytes or not local_manifest.exists():
        _write_json(local_manifest, manifest)
        result.status = "pulled" if result.bytes else result.status
    return result


def pull(
    store: ObjectStore,
    run_id: str,
    domains: Iterable[str],
    dest: Path,
    on_domain: Callable[[PullResult], None] = lambda r: None,
) -> list[PullResult]:
    """Pull every listed domain; one domain's error does not stop the others."""
    out = []
    for d in domains:
        r = pull_domain(store, run_id, d, dest)
        on_domain(r)
        out.append(r)
    return out
