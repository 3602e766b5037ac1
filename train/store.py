"""Object stores for checkpoints and outputs: `file://` (the embedded default) and `s3://` (boto3).

Keys are '/'-separated paths relative to the store's root. Writes are atomic: a reader sees a whole
object or none. S3 calls retry transient errors with tenacity (a dropped connection, a body cut off
mid-read, a 5xx other than 501); an endpoint that stays unreachable becomes a `StoreError` (a
one-line, user-facing error). A 501 NotImplemented is never retried: the server will not do that request.

Checksums: boto3 >= 1.36 sends CRC32 checksum headers on every put and part by default, which several
S3-compatible servers answer with 501. meetara asks for checksums only where S3 requires them
(`when_required`) unless the user asks for more with boto3's own settings
(`AWS_REQUEST_CHECKSUM_CALCULATION` / `AWS_RESPONSE_CHECKSUM_VALIDATION`, or
`request_checksum_calculation` / `response_checksum_validation` in ~/.aws/config); `checksum_envs()`
carries the choice into a cloud task so the box uses the same.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from train import BadInput


class StoreError(RuntimeError):
    """The store failed after retries (unreachable endpoint, denied access, missing bucket)."""


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def resume_file(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def local_path(self, key: str) -> Path | None: ...


def open_store(url: str, *, endpoint_url: str | None = None, writable: bool = True) -> ObjectStore:
    """Open `file:///abs/dir`, `file://./rel/dir`, a plain directory path, or `s3://bucket/prefix`.

    A `file://` root that is not a directory, lies in a kernel pseudo-filesystem (/proc, /sys, /dev)
    or, with `writable` (the default; pass False to only read, as a pull does), cannot be written is a
    one-line `StoreError` here, before any work is done."""
    path = file_root(url)
    if path is not None:
        if not path:
            raise BadInput(f"bad store URL {url!r}: no directory")
        return FileStore(Path(path).expanduser(), writable=writable)
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise BadInput(f"bad store URL {url!r}: expected s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url)
    raise BadInput(f"bad store URL {url!r}: use file://DIR or s3://BUCKET/PREFIX")


def file_root(url: str) -> str | None:
    """The directory a file store names, as written (not resolved): `file://DIR` and `file:DIR` in any
    case of the scheme (`FILE:///x` is /x), or a bare path; None for another scheme (s3://). Every
    reader of a store URL asks here, so what is checked (the MCP server's workdir) is what is opened."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    if parsed.scheme == "file":  # urlparse lower-cases the scheme
        return parsed.netloc + parsed.path
    return None


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad store key {key!r}")
    return key


class FileStore:
    """A directory; atomic writes via a temp file and `os.replace`."""

    def __init__(self, root: Path, *, writable: bool = True) -> None:
        self.root = root.resolve()
        self.url = f"file://{self.root}"
        fstype = _pseudo_fs(self.root)
        if fstype:  # named as given: /proc/self resolves to /proc/<pid>
            raise StoreError(f"file://{root}: a {fstype} kernel filesystem cannot hold a store; use a folder")
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"file://{root}: not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {self.root}: {e.strerror}") from None
        if writable and not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"{self.url}: the store directory is not writable")

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def put(self, key: str, data: bytes) -> None:
        with self._atomic(key) as f:
            f.write(data)

    def put_file(self, key: str, path: Path) -> None:
        with self._atomic(key) as f, open(path, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)

    @contextmanager
    def _atomic(self, key: str) -> Iterator[BinaryIO]:
        """Write to a temp file beside the target, fsync, then `os.replace`: readers see all or nothing.
        A failed write (disk full, read-only, denied) leaves no temp file and is one `StoreError` line."""
        path = self._path(key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; stored outputs are meant to be shared
            os.replace(tmp, path)
        except OSError as e:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            raise self._write_error(key, e) from None
        except BaseException:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            raise

    def _write_error(self, key: str, e: OSError) -> StoreError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = f" ({shutil.disk_usage(self.root).free // 1024} KiB free)"
            except OSError:
                free = ""
            return StoreError(f"{self.url}: the store is full writing {key}{free}: free some space and rerun")
        return StoreError(f"{self.url}: cannot write {key}: {e.strerror or type(e).__name__}")

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as e:
            raise StoreError(f"{self.url}: cannot read {key}: {e.strerror or type(e).__name__}") from None

    def get_file(self, key: str, path: Path) -> None:
        Path(path).write_bytes(self.get(key))

    def resume_file(self, key: str, path: Path) -> None:
        """Download the rest of the object into `path`, which holds a prefix of it (or nothing)."""
        if not self.exists(key):
            raise KeyError(key)
        with open(self._path(key), "rb") as src, open(path, "ab") as out:
            src.seek(out.tell())
            shutil.copyfileobj(src, out, 1 << 20)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


PSEUDO_FS = frozenset(
    {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs"}
    | {"configfs", "fusectl", "pstore", "bpf", "mqueue", "efivarfs", "binfmt_misc", "autofs", "nsfs"}
)


def _pseudo_fs(path: Path) -> str | None:
    """The type of the kernel pseudo-filesystem (proc, sysfs, ...) `path` lies in, else None (also when
    the mount table cannot be read: not Linux)."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    for line in mounts:
        fields = line.split()
        try:
            point, kind = fields[4], fields[fields.index("-") + 1]
        except (IndexError, ValueError):
            continue
        point = point.replace("\\040", " ")
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, kind
    return fstype if fstype in PSEUDO_FS else None


def _cause(exc: BaseException) -> BaseException:
    """What a transfer (upload_file, download_file) failed of: boto3 wraps a failed upload's ClientError
    in S3UploadFailedError (raised while handling it) and a download's last streaming error in
    RetriesExceededError."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError

    if isinstance(exc, RetriesExceededError):
        return exc.last_exception or exc
    if isinstance(exc, S3UploadFailedError):
        return exc.__cause__ or exc.__context__ or exc
    return exc


def _transient(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    exc = _cause(exc)

    # HTTPClientError covers ResponseStreamingError (a body cut off mid-read) and read timeouts;
    # IncompleteReadError is a body shorter than its Content-Length
    if isinstance(exc, ConnectionError | HTTPClientError | IncompleteReadError):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        if status == 501 or code == "NotImplemented":
            return False  # the server does not implement the request: asking again cannot help
        return status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling")
    return False


CHECKSUM_SETTINGS = {
    "request_checksum_calculation": "AWS_REQUEST_CHECKSUM_CALCULATION",
    "response_checksum_validation": "AWS_RESPONSE_CHECKSUM_VALIDATION",
}


def checksum_envs() -> dict[str, str]:
    """boto3's checksum settings as env vars: what the user set (env, then ~/.aws/config), else
    `when_required` (see the module docstring)."""
    import botocore.session

    try:
        scoped = botocore.session.Session().get_scoped_config()
    except Exception:  # a profile that does not exist: boto3 reports it on first use
        scoped = {}
    return {
        env: os.environ.get(env) or str(scoped.get(name) or "when_required")
        for name, env in CHECKSUM_SETTINGS.items()
    }


def _attempts() -> int:
    """How many times an S3 request is sent at most, the first included (tenacity's is the only retry
    layer: botocore's and s3transfer's own are set to one attempt)."""
    return int(os.environ.get("MEETARA_STORE_RETRIES", "5"))


_retry = retry(
    retry=retry_if_exception(_transient),
    stop=lambda rs: stop_after_attempt(_attempts())(rs),
    wait=wait_exponential(multiplier=0.2, max=5),
    reraise=True,
)


class S3Store:
    """`s3://bucket/prefix` on AWS or any S3-compatible server (`endpoint_url`, or `AWS_ENDPOINT_URL`).

    Credentials come from boto3's usual chain (env, ~/.aws/credentials); they are never logged."""

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        from boto3.s3.transfer import TransferConfig

        # botocore's own retries are off so that tenacity alone decides (one policy, one place):
        # one attempt in all (botocore's `max_attempts` counts retries, 1 would send each request twice)
        checksums = checksum_envs()
        cfg = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=float(os.environ.get("MEETARA_STORE_TIMEOUT", "5")),
            read_timeout=60,
            s3={"addressing_style": "path"},
            **{name: checksums[env] for name, env in CHECKSUM_SETTINGS.items()},
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url or None, config=cfg)
        # ... and s3transfer's: a download reads a cut-off body again up to 5 times by default
        self._transfer = TransferConfig(num_download_attempts=1)

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def local_path(self, key: str) -> Path | None:
        return None

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return _retry(fn)(*args, **kwargs)
        except Exception as exc:
            from botocore.exceptions import BotoCoreError, ClientError

            e = _cause(exc)
            if isinstance(e, ClientError):
                code = e.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404"):
                    raise KeyError(what) from None
                if code in ("NotImplemented", "501"):
                    raise StoreError(
                        f"{self.url}: {what} failed: the server does not implement this request (501"
                        " NotImplemented); if it refuses checksum headers, unset"
                        " AWS_REQUEST_CHECKSUM_CALCULATION (meetara's default asks only where S3 requires)"
                    ) from None
                raise StoreError(f"{self.url}: {what} failed: {code or e}") from None
            if isinstance(e, BotoCoreError):
                raise StoreError(f"{self.url}: {what} failed: {e}") from None
            raise

    def put(self, key: str, data: bytes) -> None:
        self._call(key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: Path) -> None:
        # upload_file does multipart for big files; a multipart upload is invisible until completed.
        self._call(
            key, self.client.upload_file, str(path), self.bucket, self._key(key), Config=self._transfer
        )

    def get(self, key: str) -> bytes:
        def fetch() -> bytes:  # the body is read inside the retry: a cut-off read is fetched again
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        return self._call(key, fetch)

    def get_file(self, key: str, path: Path) -> None:
        self._call(
            key, self.client.download_file, self.bucket, self._key(key), str(path), Config=self._transfer
        )

    def resume_file(self, key: str, path: Path) -> None:
        """Download the rest of the object into `path`, which holds a prefix of it (HTTP range requests;
        a retry after a dropped connection goes on from where the last one stopped)."""

        def fetch() -> None:
            with open(path, "ab") as out:
                start = out.tell()
                if start:
                    resp = self.client.get_object(
                        Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-"
                    )
                else:
                    resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
                for chunk in resp["Body"].iter_chunks(1 << 20):
                    out.write(chunk)

        self._call(key, fetch)

    def exists(self, key: str) -> bool:
        try:
            self._call(key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except KeyError:
            return False

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix.rstrip("/")) + "/" if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0

        def keys() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            return [o["Key"][strip:] for page in pages for o in page.get("Contents", [])]

        return sorted(self._call(prefix or "list", keys))

    def delete(self, key: str) -> None:
        self._call(key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))
