"""meetara's own SkyPilot: its own API server, state, config and catalogs, apart from the user's.

SkyPilot 0.14 runs one API server per (runtime dir, port) (`SKY_RUNTIME_DIR`,
`SKYPILOT_API_SERVER_LOCAL_PORT`, sky/server/common.py). meetara uses a runtime dir under its state
directory and a port of its own (46590 unless `MEETARA_SKY_PORT`), so:
- the catalogs meetara writes for its offers never replace the user's `~/.sky/catalogs`, and the user's
  own SkyPilot runs, API server (46580) and config are untouched;
- its config can say what meetara needs: managed jobs with the controller in consolidation mode (it
  runs inside this API server, on this machine, as meetara's conductor does: no controller VM to pay
  for), only Lambda, RunPod and Vast allowed, and meetara's SkyPilot plugin loaded
  (`launcher/skyplugin.py`: Vast rented as planned).
Credentials are still read where SkyPilot always reads them (`~/.lambda_cloud`, `~/.runpod`,
`~/.config/vastai`): those are the user's, not state.

`activate()` must run before `import sky` in a process (SkyPilot anchors some paths at import): the
SkyPilot backend calls it first. Importing this module is cheap; `state()` does not import SkyPilot.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 46590  # SkyPilot's own local server is on 46580
PORT_ENV = "MEETARA_SKY_PORT"
PLUGIN_CLASS = "launcher.skyplugin.MeetaraPlugin"
SKY_CONFIG = {
    "jobs": {"controller": {"consolidation_mode": True}},
    "allowed_clouds": ["lambda", "runpod", "vast"],
}


class SkyServerError(Exception):
    """meetara's SkyPilot API server cannot be used; the message is one line with the fix."""


def port() -> int:
    raw = os.environ.get(PORT_ENV) or str(DEFAULT_PORT)
    if not raw.isdigit() or not 1024 <= int(raw) < 65536:
        raise SkyServerError(f"{PORT_ENV}={raw!r} is not a port number (1024-65535)")
    return int(raw)


def runtime_dir() -> Path:
    """SkyPilot's "home" for meetara: state, logs, catalogs, config (`<state dir>/sky`)."""
    from budgets import state_dir

    return state_dir() / "sky"


def queue_port(p: int) -> int:
    """The request-queue port SkyPilot derives from the API server port (sky/server/requests/queues/
    mp_queue.py, `get_queue_manager_port`): a leftover process there blocks a new server too."""
    return 50011 if p == 46580 else 50000 + (11 + p - 46580) % 10000


def environ() -> dict[str, str]:
    """The variables that point SkyPilot (client, API server, jobs controller) at meetara's instance."""
    home = runtime_dir()
    p = port()
    return {
        "SKY_RUNTIME_DIR": str(home),
        "SKYPILOT_API_SERVER_LOCAL_PORT": str(p),
        "SKYPILOT_API_SERVER_ENDPOINT": f"http://127.0.0.1:{p}",
        "SKYPILOT_GLOBAL_CONFIG": str(home / ".sky" / "config.yaml"),
        "SKYPILOT_SERVER_PLUGINS_CONFIG": str(home / ".sky" / "plugins.yaml"),
        "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
    }


def activate() -> dict[str, str]:
    """Write meetara's SkyPilot config and plugin list, and set the variables in this process (the API
    server SkyPilot starts from here inherits them). Idempotent; returns the variables."""
    from budgets import private_dir, write_private

    env = environ()
    private_dir(Path(env["SKY_RUNTIME_DIR"]))
    private_dir(Path(env["SKY_RUNTIME_DIR"]) / ".sky")
    # JSON is YAML: no YAML writer needed here
    write_private(Path(env["SKYPILOT_GLOBAL_CONFIG"]), json.dumps(SKY_CONFIG, indent=2) + "\n")
    plugins = {"plugins": [{"class": PLUGIN_CLASS}]}
    write_private(Path(env["SKYPILOT_SERVER_PLUGINS_CONFIG"]), json.dumps(plugins, indent=2) + "\n")
    os.environ.update(env)
    return env


@dataclass(frozen=True)
class ServerState:
    """What listens on meetara's SkyPilot port, found without importing SkyPilot."""

    port: int
    healthy: bool  # answers SkyPilot's /api/health
    listening: bool  # something accepts connections on the port (healthy or not)
    version: str | None = None  # the skypilot version the server runs
    pid: int | None = None  # the process holding the port, if it can be seen
    command: str = ""  # its command line, shortened
    runtime_dir: str | None = None  # its SKY_RUNTIME_DIR, if readable
    queue_holder: str = ""  # a process holding SkyPilot's request-queue port for this server

    @property
    def ours(self) -> bool:
        return self.runtime_dir is not None and Path(self.runtime_dir) == runtime_dir()


def _health(p: int, timeout: float = 2.0) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{p}/api/health", timeout=timeout) as r:
            body = json.loads(r.read(65536) or b"null")
    except (OSError, ValueError, urllib.error.URLError, http.client.HTTPException):
        return None  # nothing, or not SkyPilot (an SSH server answers "SSH-2.0-...": BadStatusLine)
    return body if isinstance(body, dict) else None


def _listening(p: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", p)) == 0


def _holder(p: int) -> tuple[int | None, str, str | None]:
    """(pid, command line, SKY_RUNTIME_DIR) of the process listening on port `p`, where visible."""
    try:
        import psutil
    except ImportError:
        return None, "", None
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None, "", None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == p and c.pid:
            try:
                proc = psutil.Process(c.pid)
                cmd = " ".join(" ".join(proc.cmdline()).split())  # one line, whatever the argv holds
                try:
                    rt = proc.environ().get("SKY_RUNTIME_DIR")
                except psutil.Error:
                    rt = None
            except psutil.Error:
                return c.pid, "", None
            return c.pid, (cmd[:117] + "...") if len(cmd) > 120 else cmd, rt
    return None, "", None


def state() -> ServerState:
    """What holds meetara's SkyPilot port now: nothing, meetara's server, another SkyPilot server, or
    something else; and whether SkyPilot's request-queue port for it is held."""
    p = port()
    body = _health(p)
    listening = body is not None or _listening(p)
    pid, cmd, rt = _holder(p) if listening else (None, "", None)
    q = queue_port(p)
    queue_holder = ""
    if body is None and _listening(q):
        qpid, qcmd, _ = _holder(q)
        queue_holder = f"pid {qpid} ({qcmd})" if qpid else "an unknown process"
    return ServerState(
        port=p,
        healthy=body is not None,
        listening=listening,
        version=str(body.get("version")) if body else None,
        pid=pid,
        command=cmd,
        runtime_dir=rt,
        queue_holder=queue_holder,
    )


def check(st: ServerState, installed: str | None) -> None:
    """Raise SkyServerError (one line: cause and fix) unless meetara can use what holds its port:
    nothing (SkyPilot starts a server there), or its own server running the installed skypilot."""
    p = st.port
    if st.healthy:
        if installed and st.version and st.version != installed:
            raise SkyServerError(
                f"the SkyPilot API server on port {p} runs skypilot {st.version}, this install has "
                f"{installed}: stop it with `meetara sky stop` (the next launch starts the right one)"
            )
        if st.runtime_dir is not None and not st.ours:
            raise SkyServerError(
                f"port {p} is held by another SkyPilot API server (pid {st.pid}, runtime dir "
                f"{st.runtime_dir}), not meetara's: stop it, or set {PORT_ENV} to a free port"
            )
        return
    if st.listening:
        who = f"pid {st.pid} ({st.command})" if st.pid else "a process that does not answer as SkyPilot"
        raise SkyServerError(
            f"port {p} (meetara's SkyPilot API server) is held by {who}: stop it, or set {PORT_ENV} "
            "to a free port"
        )
    if st.queue_holder:
        raise SkyServerError(
            f"SkyPilot's request-queue port {queue_port(p)} is held by {st.queue_holder}, left over from "
            f"an earlier API server: stop it (kill the pid), or set {PORT_ENV} to another port"
        )


def log_path() -> Path:
    """meetara's SkyPilot API server log (where SkyPilot writes why it did not start)."""
    return runtime_dir() / ".sky" / "api_server" / "server.log"


def last_log_lines(n: int = 40) -> list[str]:
    """The last non-empty lines of the server log, among its last `n`."""
    try:
        lines = log_path().read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [ln for ln in lines[-n:] if ln.strip()]


def why_not_started() -> str:
    """One line from the server log saying why it exited: the last error line, else the last line."""
    from train import first_line

    lines = last_log_lines()
    for ln in reversed(lines):
        if any(k in ln for k in ("Error", "error:", "Exception", "Address already in use", "denied")):
            return first_line(Exception(ln.strip()))
    return first_line(Exception(lines[-1].strip())) if lines else "no log written"


def describe(st: ServerState) -> tuple[bool, str]:
    """(ok, detail) for `meetara doctor`."""
    try:
        check(st, _installed())
    except SkyServerError as e:
        return False, str(e)
    if st.healthy:
        who = f", pid {st.pid}" if st.pid else ""
        return True, f"running on 127.0.0.1:{st.port} (skypilot {st.version}{who}); state in {runtime_dir()}"
    return True, f"not running (the first cloud launch starts it on 127.0.0.1:{st.port})"


def _installed() -> str | None:
    """The installed skypilot's version (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("skypilot")
    except PackageNotFoundError:
        return None


def ensure_running() -> None:
    """Make sure meetara's SkyPilot API server is up (starting it if nothing holds the port); raise
    SkyServerError in one line otherwise. Call after `activate()`."""
    st = state()
    check(st, _installed())
    if st.healthy:
        return
    import sky
    from sky import sky_logging

    try:
        with sky_logging.silent():  # its banner would tell the user to export SkyPilot variables
            sky.api_start(host="127.0.0.1")
    except Exception as e:  # SkyPilot says only "exited unexpectedly": its log says why
        from train import first_line

        raise SkyServerError(
            f"meetara's SkyPilot API server did not start on port {st.port} ({first_line(e)}): "
            f"{why_not_started()} [log: {log_path()}]"
        ) from None
    st = state()
    check(st, _installed())


def stop() -> bool:
    """Stop meetara's SkyPilot API server (and the jobs controller it runs); True if one was running.
    Managed jobs' machines keep running; their state stays in the runtime dir for the next server."""
    activate()
    was = state().healthy
    import sky
    from sky import sky_logging

    helpers = _server_processes()  # before the stop: SkyPilot's executors outlive their server
    with sky_logging.silent():
        sky.api_stop()
    _kill(helpers)
    return was


def _server_processes() -> list:
    """The processes of meetara's API server on `port()`: the server and all it started (request
    executors, queue managers). Found by the server's command line and its process tree: the executors
    rename themselves and blank their environment (setproctitle), so nothing else tells them apart."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "sky.server.server" in cmd and f"--port={port()}" in cmd:
            try:
                found += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
    return found


def _kill(procs: list) -> None:
    """Kill those of `procs` still running (the same processes: psutil checks each one's start time)."""
    import psutil

    for proc in procs:
        try:
            if proc.is_running():
                proc.kill()
        except psutil.Error:
            continue
