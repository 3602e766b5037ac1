"""A throwaway PostgreSQL server for the tests: `initdb` + `pg_ctl` on a temp dir, 127.0.0.1, a free port.

Use it with `from pg import postgres_url  # noqa: F401` and a `postgres_url` argument. Without
PostgreSQL's server programs the tests that need it FAIL (CI installs Debian's `postgresql`).

PostgreSQL refuses to run as root. As root, the cluster is run as the unprivileged `postgres` user
(else `nobody`): its directory is handed to that user and the programs are started with
`subprocess.run(user=..., group=...)`, so the server runs as a normal user as it does in production.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, else in Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> dict:
    """subprocess keyword arguments that drop root to an unprivileged user (none when not root)."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    pytest.fail("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


@contextmanager
def pg_server(fail: Callable[[str], None] = pytest.fail) -> Iterator[str]:
    """Start a fresh PostgreSQL cluster; yields postgresql://postgres@127.0.0.1:PORT/postgres and stops
    it at the end. `fail` reports a missing or broken server (the benchmarks raise instead)."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        fail(
            "PostgreSQL server programs (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin:"
            " install Debian's `postgresql` package to run the shared-ledger tests"
        )
    as_user = _run_as()
    root = Path(tempfile.mkdtemp(prefix="meetara-pg-"))
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir()
    if as_user:
        for p in (root, sock):
            os.chown(p, as_user["user"], as_user["group"])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(root)}

    def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=120, **as_user)
        if check and done.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            fail(f"{' '.join(cmd[:2])} failed ({done.returncode}): {done.stderr.strip()}\n{tail}")
        return done

    # --no-sync and fsync=off: a test server that is thrown away needs no durability, only speed
    run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C")
    port = 0
    try:
        for _attempt in range(3):  # a free port can be taken between choosing and binding: try another
            port = _free_port()
            opts = f"-k {sock} -h 127.0.0.1 -p {port} -c fsync=off -c max_connections=200"
            started = run(
                pg_ctl, "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start", check=False
            )
            if started.returncode == 0:
                break
        else:
            fail(f"pg_ctl start failed: {started.stderr.strip()}\n{log.read_text()[-2000:]}")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL cluster for the session (see pg_server)."""
    with pg_server() as url:
        yield url
