"""meetara's own SkyPilot (launcher/skyserver.py): its port and runtime dir apart from the user's, and one
line naming cause and fix for what users meet: a foreign process on the port, an API server of another
skypilot version or of another runtime dir, a leftover process on SkyPilot's request-queue port, a
server that does not start. Each case is a real process holding the real port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, closed_port, run_cli


def _meetara(tmp_path: Path, port: int, *args: str, extra: dict | None = None) -> subprocess.CompletedProcess:
    (tmp_path / "home").mkdir(exist_ok=True)
    env = {
        "HOME": str(tmp_path / "home"),
        "MEETARA_STATE_DIR": str(tmp_path / "state"),
        "MEETARA_SKY_PORT": str(port),
        **(extra or {}),
    }
    return run_cli(*args, env=env, cwd=tmp_path, module="launcher", timeout=120)


class Holder:
    """A process listening on a port: plain TCP, or an HTTP server answering SkyPilot's /api/health."""

    def __init__(self, port: int, health: dict | None = None, env: dict | None = None) -> None:
        code = textwrap.dedent(
            f"""
            import http.server, json, sys
            BODY = {json.dumps(json.dumps(health))}.encode()
            class H(http.server.BaseHTTPRequestHandler):
                def do_GET(self):
                    if BODY == b"null":
                        self.send_response(404); self.end_headers(); return
                    self.send_response(200); self.send_header("Content-Type", "application/json")
                    self.end_headers(); self.wfile.write(BODY)
                def log_message(self, *a): pass
            srv = http.server.HTTPServer(("127.0.0.1", {port}), H)
            print("ready", flush=True)
            srv.serve_forever()
            """
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def holder():
    made: list[Holder] = []

    def make(port: int, health: dict | None = None, env: dict | None = None) -> Holder:
        h = Holder(port, health, env)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


def test_meetara_uses_its_own_port_runtime_dir_and_config(tmp_path: Path) -> None:
    port = closed_port()
    code = (
        "from launcher import skyserver; import json, os; env = skyserver.activate(); "
        "print(json.dumps({'env': env, 'q': skyserver.queue_port(46580)}))"
    )
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "MEETARA_STATE_DIR": str(tmp_path / "state"),
        "MEETARA_SKY_PORT": str(port),
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    e = got["env"]
    assert e["SKY_RUNTIME_DIR"] == str(tmp_path / "state" / "sky")
    assert e["SKYPILOT_API_SERVER_LOCAL_PORT"] == str(port)
    assert got["q"] == 50011  # SkyPilot's own default pairing, as its mp_queue computes it
    config = json.loads(Path(e["SKYPILOT_GLOBAL_CONFIG"]).read_text())
    assert config["jobs"]["controller"]["consolidation_mode"] is True
    assert sorted(config["allowed_clouds"]) == ["lambda", "runpod", "vast"]
    plugins = json.loads(Path(e["SKYPILOT_SERVER_PLUGINS_CONFIG"]).read_text())
    assert plugins == {"plugins": [{"class": "launcher.skyplugin.MeetaraPlugin"}]}
    # SkyPilot's own schema accepts both files (it would refuse to start otherwise)
    check = (
        "from sky.utils import common_utils, schemas, yaml_utils; from sky.server import plugins; "
        "import sys; "
        "common_utils.validate_schema(yaml_utils.read_yaml(sys.argv[1]), schemas.get_config_schema(), 'x'); "
        "common_utils.validate_schema(yaml_utils.read_yaml(sys.argv[2]), plugins._config_schema(), 'x'); "
        "print('valid')"
    )
    ok = subprocess.run(
        [sys.executable, "-c", check, e["SKYPILOT_GLOBAL_CONFIG"], e["SKYPILOT_SERVER_PLUGINS_CONFIG"]],
        capture_output=True,
        text=True,
    )
    assert ok.stdout.strip() == "valid", ok.stderr[-2000:]
    # the user's own SkyPilot home is not touched
    assert not (tmp_path / "home" / ".sky").exists()


def test_a_foreign_process_on_the_port_is_one_line(tmp_path: Path, holder) -> None:
    port = closed_port()
    h = holder(port)  # answers 404 to /api/health: not a SkyPilot server
    r = _meetara(tmp_path, port, "sky", "status")
    assert r.returncode == 1, r.stderr
    line = r.stdout.strip()
    assert len(line.splitlines()) == 1 and f"port {port}" in line and f"pid {h.proc.pid}" in line
    assert "MEETARA_SKY_PORT" in line


def test_a_server_of_another_version_or_runtime_dir_is_named(tmp_path: Path, holder) -> None:
    port = closed_port()
    h = holder(port, {"status": "healthy", "version": "0.13.0", "api_version": 20})
    r = _meetara(tmp_path, port, "sky", "status")
    assert r.returncode == 1
    assert "runs skypilot 0.13.0" in r.stdout and "meetara sky stop" in r.stdout
    h.stop()

    from importlib.metadata import version

    other = tmp_path / "someone-elses-sky"
    holder(port, {"status": "healthy", "version": version("skypilot")}, env={"SKY_RUNTIME_DIR": str(other)})
    r = _meetara(tmp_path, port, "sky", "status")
    assert r.returncode == 1
    assert "another SkyPilot API server" in r.stdout and str(other) in r.stdout


def test_a_leftover_on_the_request_queue_port_is_named(tmp_path: Path, holder) -> None:
    from launcher.skyserver import queue_port

    for _ in range(20):  # a server port whose queue port is free too
        port = closed_port()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", queue_port(port))) != 0:
                break
    h = holder(queue_port(port))
    r = _meetara(tmp_path, port, "sky", "status")
    assert r.returncode == 1
    assert f"request-queue port {queue_port(port)}" in r.stdout and f"pid {h.proc.pid}" in r.stdout


def test_a_launch_refused_by_the_server_state_reserves_nothing(tmp_path: Path, holder, s3_server) -> None:
    """The reproduction of issue 19's stale-server report: a launch meets a foreign process on the port.
    One line naming the port and the fix; nothing stays reserved."""
    port = closed_port()
    holder(port)
    home = tmp_path / "home"
    (home / ".config" / "vastai").mkdir(parents=True)
    (home / ".config" / "vastai" / "vast_api_key").write_text("fake-key\n")
    r = _meetara(
        tmp_path,
        port,
        "launch", "-d", "nutrition", "--budget", "1", "-y", "--backend", "skypilot", "-p", "vast",
        "--store", "s3://bkt/p", "--endpoint-url", s3_server, "--poll", "0.2",
    )  # fmt: skip
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert errors and f"port {port}" in r.stderr and "MEETARA_SKY_PORT" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    from budgets.ledger import Ledger

    assert r.returncode == 2  # refused before anything was reserved or launched
    assert Ledger(tmp_path / "state" / "ledger.sqlite").reservations() == []


def test_doctor_reports_the_server_and_the_catalogs(tmp_path: Path) -> None:
    port = closed_port()
    r = _meetara(tmp_path, port, "doctor", extra={"COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    assert f"not running (the first cloud launch starts it on 127.0.0.1:{port})" in r.stdout
    assert str(tmp_path / "state" / "sky" / ".sky" / "catalogs" / "v8") in r.stdout
    # an older meetara's rows in the user's own SkyPilot catalogs are pointed out
    old = tmp_path / "home" / ".sky" / "catalogs" / "v8" / "vast" / "vms.csv"
    old.parent.mkdir(parents=True)
    old.write_text("InstanceType\n1x-RTX_3090-123-0\n")
    r = _meetara(tmp_path, port, "doctor", extra={"COLUMNS": "250"})
    assert "your SkyPilot catalogs" in r.stdout and "delete those vms.csv files" in r.stdout


def test_common_catalogs_let_skypilot_canonicalise_offline(tmp_path: Path, offers=None) -> None:
    """SkyPilot reads accelerator names from common/accelerators.csv, which it would download; meetara
    writes it beside its catalogs (merging what is there), and SkyPilot's own registry reads it."""
    from launcher.offers import load_snapshot
    from launcher.skycatalog import catalog_dir, write_catalogs

    write_catalogs([o for o in load_snapshot() if o.provider in ("vast", "runpod", "lambda")][:80], tmp_path)
    common = catalog_dir(tmp_path) / "common"
    code = (
        "from sky.utils import accelerator_registry as a; "
        "print(a.canonicalize_accelerator_name('rtx3090', None), sorted(a.get_devices_by_memory(24))[:3])"
    )
    env = {**os.environ, "SKY_RUNTIME_DIR": str(tmp_path), "HOME": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0] == "RTX3090"
    assert "RTX3090" in r.stdout
    rows = (common / "accelerators.csv").read_text().splitlines()
    assert rows[0] == "AcceleratorName,Clouds" and len(rows) > 2


def test_the_skypilot_version_meetara_needs_is_the_one_pyproject_pins() -> None:
    import tomllib

    from launcher.backends.skypilot import SKYPILOT_VERSION, sky_version, version_problem

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = [d for deps in extras.values() for d in deps if d.startswith("skypilot")]
    assert pins and all(p.endswith(f"=={SKYPILOT_VERSION}") for p in pins), pins
    assert sky_version() == SKYPILOT_VERSION and version_problem(sky_version()) is None
    other = version_problem("0.13.0")
    assert other is not None and "found 0.13.0" in other and f"=={SKYPILOT_VERSION}" in other
    assert "\n" not in other


def test_why_a_server_did_not_start_comes_from_its_log(tmp_path: Path, monkeypatch) -> None:
    """SkyPilot itself says only "API server process exited unexpectedly"; meetara reads the server's
    log for the reason (the last error line), in one line."""
    from launcher import skyserver

    monkeypatch.setenv("MEETARA_STATE_DIR", str(tmp_path / "state"))
    log = tmp_path / "state" / "sky" / ".sky" / "api_server" / "server.log"
    assert skyserver.why_not_started() == "no log written"
    log.parent.mkdir(parents=True)
    log.write_text(
        "I 12-01 00:07:01 server.py:123] Starting SkyPilot API server\n"
        "Traceback (most recent call last):\n"
        '  File "sky/server/server.py", line 4300, in <module>\n'
        "OSError: [Errno 98] error while attempting to bind on address ('127.0.0.1', 46590): "
        "address already in use\n"
        "\n"
    )
    why = skyserver.why_not_started()
    assert why.startswith("OSError: [Errno 98]") and "address already in use" in why and "\n" not in why


@pytest.fixture
def http_500():
    """A real HTTP server on 127.0.0.1 that answers every request with 500 (an answer is an answer)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 (http.server's name)
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_controllers_network_check_is_meetaras_and_counts_any_answer(http_500, monkeypatch) -> None:
    """SkyPilot's jobs controller calls `backend_utils.async_check_network_connection()` before each status
    check (8.8.8.8 and 1.1.1.1 only, no proxy) and skips the check while it fails: offline or behind a
    proxy a finished job stays RUNNING. meetara's plugin puts its own check there: any HTTP answer from
    a provider's API or a probe means the network is up; nothing answering still means down."""
    import asyncio

    from sky import exceptions
    from sky.backends import backend_utils

    from launcher import skyplugin

    dead = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(backend_utils, "check_network_connection", backend_utils.check_network_connection)
    monkeypatch.setattr(
        backend_utils, "async_check_network_connection", backend_utils.async_check_network_connection
    )
    skyplugin.install_network_check_fix()
    assert getattr(backend_utils.async_check_network_connection, "__meetara__", False)
    for probes, up in (((dead, http_500), True), ((dead,), False)):
        monkeypatch.setattr(skyplugin, "NETWORK_PROBES", probes)
        monkeypatch.setattr(skyplugin, "PROBE_TIMEOUT_S", 2.0)
        assert skyplugin.network_available() is up
        if up:
            backend_utils.check_network_connection()
            asyncio.run(backend_utils.async_check_network_connection())
        else:
            with pytest.raises(exceptions.NetworkError, match="no provider API or probe answered"):
                asyncio.run(backend_utils.async_check_network_connection())
            with pytest.raises(exceptions.NetworkError):
                backend_utils.check_network_connection()


def test_sky_stop_leaves_none_of_the_servers_processes(tmp_path: Path) -> None:
    """`meetara sky stop` stops SkyPilot's API server and every process it started: its request
    executors (which rename themselves and blank their environment once they run a request) outlived
    `sky.api_stop()` before, orphans of init found after every test session."""
    import psutil

    port = closed_port()
    env = {
        "HOME": str(tmp_path / "home"),
        "MEETARA_STATE_DIR": str(tmp_path / "state"),
        "MEETARA_SKY_PORT": str(port),
    }
    (tmp_path / "home").mkdir()
    start = (  # the server, and requests its executors run (they rename themselves then)
        "from launcher import skyserver; skyserver.activate(); skyserver.ensure_running(); import sky; "
        "sky.get(sky.status()); sky.get(sky.jobs.queue_v2(refresh=False))"
    )
    r = subprocess.run(
        [sys.executable, "-c", start], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    from launcher import skyserver

    os.environ["MEETARA_SKY_PORT"], before = str(port), os.environ["MEETARA_SKY_PORT"]
    try:
        tree = skyserver._server_processes()
    finally:
        os.environ["MEETARA_SKY_PORT"] = before
    assert len(tree) > 2, [p.cmdline() for p in tree]  # the server, its queue manager, its executors
    stop = _meetara(tmp_path, port, "sky", "stop")
    assert stop.returncode == 0, stop.stderr
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert alive == [], [(p.pid, p.name()) for p in alive]
