"""Bring a run's validated GGUF files from the store into a local folder, safely.

    models/<domain>/adapter.gguf, model-Q4_K_M.gguf, manifest.json    (manifest written last)
    models/base/<base>-f16.gguf                                          (what the adapters apply to)

A file is downloaded into a hidden `.part` beside its target (resumed if a previous pull stopped
part-way), checked against the size and sha256 the domain's manifest recorded, and only then renamed
over the target. A local file that already matches is left alone; a download that does not match is
refused and the previous local file kept. Domains whose manifest says validation failed are not pulled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from train import BadInput, first_line
from train.pipeline import MANIFEST, domain_prefix
from train.store import ObjectStore, StoreError

FULL = (errno.ENOSPC, errno.EDQUOT)


class PullError(RuntimeError):
    """A downloaded file does not match its manifest (the previous local file is kept), or it cannot be
    written here (disk full: nothing partial is kept)."""


def check_models_dir(dest: Path) -> Path:
    """`dest` if it can be (or become) the models folder; `BadInput` (one line) when it or a folder
    above it is a file, or it cannot be written. Call it before paying for anything."""
    dest = Path(dest)
    for p in (dest, *dest.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == dest else f"is under {p}, which is a file"
                raise BadInput(f"--models-dir {dest} {what}, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise BadInput(f"--models-dir {dest}: {p} is not writable")
            break
    return dest


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _free(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


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
    free = _free(dest.parent)
    if free is not None and free < entry["size"] - before:
        part.unlink(missing_ok=True)
        need = _mib(entry["size"] - before)
        raise PullError(f"{dest}: disk full: {need} needed, {_mib(free)} free; nothing was written")
    _download(store, entry, part)
    got_size, got_sha = part.stat().st_size, sha256_file(part)
    if resumed and (got_size, got_sha) != (entry["size"], entry["sha256"]):
        # the kept prefix may have come from an older object: one clean download before giving up
        part.unlink()
        before = 0
        _download(store, entry, part)
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


def _download(store: ObjectStore, entry: dict, part: Path) -> None:
    """Append the rest of the object to `part`; a full disk removes `part` (it would only hold space)
    and is a one-line PullError. Other failures keep `part`, so that the next pull resumes it."""
    try:
        store.resume_file(entry["key"], part)
    except OSError as e:
        if e.errno not in FULL:
            raise
        part.unlink(missing_ok=True)
        raise PullError(
            f"{part.parent / part.name[1:].removesuffix('.part')}: disk full while downloading "
            f"{_mib(entry['size'])}; nothing partial was kept"
        ) from None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pull_domain(store: ObjectStore, run_id: str, domain: str, dest: Path) -> PullResult:
    """Pull one domain's files (and the base GGUF they need) if its manifest says done and validated."""
    prefix = domain_prefix(run_id, domain)
    key = f"{prefix}/{MANIFEST}"
    try:
        raw = store.get(key)
    except KeyError:
        try:
            failed = store.exists(f"{prefix}/failed.json")
        except StoreError as e:
            return PullResult(domain, "error", detail=first_line(e))
        return PullResult(domain, "failed-validation" if failed else "not-finished")
    except StoreError as e:  # the store is down: this domain is not pulled now; `meetara pull` retries
        return PullResult(domain, "error", detail=first_line(e))
    try:
        manifest = json.loads(raw)
        if manifest.get("status") != "done" or not manifest.get("validation", {}).get("passed"):
            return PullResult(domain, "failed-validation", detail="manifest says validation did not pass")
        base = manifest["base_gguf"]
        wanted = {"base": (base, dest / "base" / Path(base["key"]).name)}
        for name, entry in manifest["files"].items():
            wanted[name] = (entry, dest / domain / Path(entry["key"]).name)
        for entry, _ in wanted.values():
            if not (isinstance(entry["size"], int) and isinstance(entry["sha256"], str)):
                raise TypeError("size or sha256 of the wrong type")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        return PullResult(
            domain, "error", detail=f"{store.url}/{key}: unreadable manifest ({type(e).__name__}); not pulled"
        )
    result = PullResult(domain, "up-to-date")
    try:
        for name, (entry, path) in wanted.items():
            got = fetch_verified(store, entry, path)
            result.bytes += got
            result.files[name] = str(path)
        local_manifest = dest / domain / MANIFEST
        if result.bytes or not local_manifest.exists():
            _write_json(local_manifest, manifest)
            result.status = "pulled" if result.bytes else result.status
    except (PullError, StoreError) as e:
        result.status, result.detail = "error", first_line(e)
    except OSError as e:  # the models folder: a file in the way, no permission, disk full
        where = e.filename or dest
        full = "disk full" if e.errno in FULL else (e.strerror or type(e).__name__)
        result.status, result.detail = "error", f"{where}: {full}"
    return result


def open_run_store(run_id: str, store: str | None = None, endpoint_url: str | None = None) -> ObjectStore:
    """The store a run's GGUFs are pulled from: `store`, else the run's own, else MEETARA_STORE or ./store
    (read-only). A run neither launched from this machine nor found in that store is a one-line
    `BadInput`, as `meetara status` gives for an unknown run (a run trained elsewhere into the store, e.g.
    by the notebook, is found there)."""
    from launcher.runs import load_run
    from launcher.stores import absolute_store, default_store
    from train.store import open_store

    rec = load_run(run_id)
    url = absolute_store(store or (rec.store if rec else None) or default_store("local"))
    endpoint_url = endpoint_url or (rec.endpoint_url if rec else None)
    if rec is None and url.startswith("file://") and not os.path.isdir(url[7:]):
        raise BadInput(f"no run {run_id!r} on this machine or in {url} (see meetara status)")
    st = open_store(url, endpoint_url=endpoint_url, writable=False)
    if rec is None and not st.list(f"runs/{run_id}"):
        raise BadInput(f"no run {run_id!r} on this machine or in {st.url} (see meetara status)")
    return st


def pull(
    store: ObjectStore,
    run_id: str,
    domains: Iterable[str],
    dest: Path,
    on_domain: Callable[[PullResult], None] = lambda r: None,
) -> list[PullResult]:
    """Pull every listed domain; one domain's error does not stop the others. `BadInput` when `dest`
    cannot be the models folder (see `check_models_dir`)."""
    check_models_dir(dest)
    out = []
    for d in domains:
        r = pull_domain(store, run_id, d, dest)
        on_domain(r)
        out.append(r)
    return out
