"""Shared fixtures: a real S3-compatible server (moto's server mode) on 127.0.0.1, an isolated cache."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Set before any test module is imported (SkyPilot writes ~/.sky on import): the developer's HOME,
# credentials, config and state never leak into the tests, and the tests never touch them.
_SANDBOX = Path(tempfile.mkdtemp(prefix="meetara-tests-"))
atexit.register(shutil.rmtree, _SANDBOX, ignore_errors=True)
os.environ.update(
    HOME=str(_SANDBOX / "home"),
    MEETARA_STATE_DIR=str(_SANDBOX / "state"),
    MEETARA_CONFIG=str(_SANDBOX / "no-config.yaml"),
    SKYPILOT_DISABLE_USAGE_COLLECTION="1",
)
(_SANDBOX / "home").mkdir()
with socket.socket() as _s:  # meetara's SkyPilot API server, if a test starts one: never the user's port
    _s.bind(("127.0.0.1", 0))
    os.environ["MEETARA_SKY_PORT"] = str(_s.getsockname()[1])


def stop_skypilot_under(*roots: Path) -> int:
    """Kill, by PID, every process whose SKY_RUNTIME_DIR is under one of `roots` (meetara's SkyPilot
    API server and its helpers): a test that starts one stops it; this catches one that could not.
    Returns how many were found."""
    import psutil

    found = 0
    for proc in psutil.process_iter(["pid"]):
        try:
            runtime = proc.environ().get("SKY_RUNTIME_DIR", "")
            if not runtime:  # SkyPilot's executors blank their environment: the files they hold open say
                runtime = next((f.path for f in proc.open_files() if "/.sky/" in f.path), "")
        except psutil.Error:
            continue
        if runtime and proc.pid != os.getpid() and any(runtime.startswith(str(r)) for r in roots):
            found += 1
            with contextlib.suppress(psutil.Error):
                helpers = proc.children(recursive=True)  # its executors, which outlive it otherwise
                proc.kill()
                for child in helpers:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
    return found


@pytest.fixture(scope="session", autouse=True)
def no_skypilot_left(tmp_path_factory: pytest.TempPathFactory):
    yield
    stop_skypilot_under(_SANDBOX, tmp_path_factory.getbasetemp())


for _var in ("MEETARA_BACKEND", "RUNPOD_API_KEY", "VAST_API_KEY", "LAMBDA_API_KEY", "XDG_STATE_HOME"):
    os.environ.pop(_var, None)


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No cloud credentials of the developer's, no network, one tiny-model cache for the whole session."""
    os.environ["MEETARA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MEETARA_STORE_RETRIES="3",
    )
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "MEETARA_STORE"):
        os.environ.pop(var, None)


@pytest.fixture(scope="session")
def s3_server() -> str:
    """A moto S3 server on a free port of 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket on the test server; returns its name."""
    import boto3

    name = "t-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolving anything but this machine fails (SkyPilot must not fetch catalogs or check clouds);
    a module opts in with `pytestmark = pytest.mark.usefixtures("no_network")`."""
    real = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host in ("localhost", "127.0.0.1", "::1", None):
            return real(host, *args, **kwargs)
        raise OSError(f"network disabled in tests (tried {host})")

    monkeypatch.setattr(socket, "getaddrinfo", local_only)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: an unreachable endpoint."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_env(tmp_path: Path, rate_h: float, **extra: str) -> dict[str, str]:
    """Env for a launcher with everything under `tmp_path` (store, ledger file, state) and the local
    machine billed at `rate_h` $/h, with a generous start-up allowance (the first job of a test session
    builds the tiny model, and a loaded machine must not run out of its reservation) and caps that make
    room for it."""
    return {
        "MEETARA_STORE": f"file://{tmp_path}/store",
        "MEETARA_LEDGER_URL": str(tmp_path / "ledger.sqlite"),
        "MEETARA_STATE_DIR": str(tmp_path / "state"),
        "MEETARA_LOCAL_PRICE_HOUR": str(rate_h),
        "MEETARA_LOCAL_STARTUP_S": "600",
        "MEETARA_DAILY_CAP": "100",
        "MEETARA_WEEKLY_CAP": "100",
        "MEETARA_MONTHLY_CAP": "100",
        **extra,
    }


def run_cli(
    *args: str, env: dict | None = None, cwd: Path | None = None, module: str = "train", timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `python -m <module> ...` as a user would; returns the completed process (text)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd or ROOT,
    )


