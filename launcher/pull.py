"""Bring a run's validated GGUF files from the store into a local folder, safely.

    models/base/<base>-Q4_K_M.gguf         the run's base, once (llama.cpp -m it --lora <domain>/adapter.gguf)
    models/base/<base>-f16.gguf            only if the run shipped it (--base-f16, or a run from before
                                           the Q4_K_M base, whose manifests name the f16 as their base)
    models/<domain>/adapter.gguf, manifest.json          (manifest written last)
    models/<domain>/model-Q4_K_M.gguf      only if the run shipped merged models (--merged)

A domain's manifest lists what to fetch: its `files`, and its base (`base_files`, or `base_gguf` in
manifests written before it); whatever a manifest names is pulled, so old runs pull as they did. The
base is fetched and verified once per pull, however many domains share it.

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


# local files this process has checked: path -> (size, mtime_ns, sha256), so that the run's base (hundreds
# of MB) is hashed once, not once per domain pulled (the conductor pulls each domain as it finishes)
_CHECKED: dict[Path, tuple[int, int, str]] = {}


def _matches(dest: Path, entry: dict) -> bool:
    try:
        st = dest.stat()
    except FileNotFoundError:
        return False
    if st.st_size != entry["size"]:
        return False
    stamp = (st.st_size, st.st_mtime_ns)
    known = _CHECKED.get(dest.resolve())
    if known is not None and known[:2] == stamp:
        return known[2] == entry["sha256"]
    sha = sha256_file(dest)
    _CHECKED[dest.resolve()] = (*stamp, sha)
    return sha == entry["sha256"]


def fetch_verified(store: ObjectStore, entry: dict, dest: Path) -> int:
    """Make `dest` hold the object `entry` describes ({key, sha256, size}); returns bytes downloaded."""
    if _matches(dest, entry):
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
    st = dest.stat()
    _CHECKED[dest.resolve()] = (st.st_size, st.st_mtime_ns, got_sha)
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


def _base_entries(manifest: dict) -> dict[str, dict]:
    """The base GGUFs a manifest names: {"q4_k_m", "f16"} (`base_files`), or its one `base_gguf`."""
    if "base_files" in manifest:
        return {f"base_{k}": v for k, v in manifest["base_files"].items()}
    return {"base": manifest["base_gguf"]}


def pull_domain(
    store: ObjectStore, run_id: str, domain: str, dest: Path, verified: set[str] | None = None
) -> PullResult:
    """Pull one domain's files (and the base GGUFs they need) if its manifest says done and validated.
    `verified`: base keys this pull has already fetched and checked (skipped here; keys added)."""
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
        wanted = {
            name: (entry, dest / "base" / Path(entry["key"]).name)
            for name, entry in _base_entries(manifest).items()
        }
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
            key = f"{entry['key']}@{entry['sha256']}"
            if name.startswith("base") and verified is not None and key in verified:
                result.files[name] = str(path)
                continue
            got = fetch_verified(store, entry, path)
            result.bytes += got
            result.files[name] = str(path)
            if name.startswith("base") and verified is not None:
                verified.add(key)
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
    out: list[PullResult] = []
    verified: set[str] = set()  # the run's base: fetched and checked once
    for d in domains:
        r = pull_domain(store, run_id, d, dest, verified)
        on_domain(r)
        out.append(r)
    return out
