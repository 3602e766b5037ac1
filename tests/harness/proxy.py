"""Lambda, RunPod and Vast's HTTPS APIs answered on this machine, through a real intercepting proxy.

`provider_proxy(tmp_path)` starts `mitmdump` (mitmproxy from PyPI) with `providers_addon.py`, which answers
every request itself, never forwards one, and records each in a JSONL file. A client process gets
`proxy.env()` (proxy variables, a CA bundle that trusts mitmproxy's CA) and talks to the providers as usual;
a test chooses the answers with `proxy.scenario(...)` and reads what was asked with `proxy.requests(...)`.

mitmproxy lives in its own venv, `<repo>/.cache/mitmproxy-venv` (pinned below), built once by the first test
that needs it: installing it into the project's venv would downgrade cryptography, h11 and others.

Scenario file (`scenario.json`, re-read by the addon on every request)::

    {"providers": {"lambda": {"mode": "ok", "no_capacity": ["gpu_1x_a10@us-east-1"]},
                   "runpod": {"mode": "no-capacity"},
                   "vast": {"mode": "auth-error", "status": 403}}}

A provider not named answers in mode "ok". Modes: "ok" (creates succeed; the instance is listed but never
becomes reachable), "no-capacity" (every create fails as that provider says so), "auth-error" (every request
fails as with a bad key). With the option `node` ({dir, registry, user_env, uv, image, env}: see
`providers_addon._start_node` and tests/harness/node.py) a create starts a real SSH node on this machine
and the provider's API answers with its address; killing the node is a preemption. Options (`OPTIONS`):
`no_capacity` (matchers: these creates fail, the rest follow the mode; "*", a dict of fields that must all
match, or a shorthand: Lambda "type" or "type@region", RunPod a gpuTypeId, Vast an offer id or a gpu_name),
`api_key` (the only key accepted; any other gets the auth error), `status` (auth-error's status: Lambda/Vast
401|403, RunPod 401|200), `instance_status` (what a created instance shows), Lambda `instance_types` and
`stale_listing`, RunPod `gpu_types`, Vast `offers`; RunPod and Vast `price_factor` (the GPU price an
instance is billed at, and listed with, is the one asked for x this: a price that moved since the search).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

MITMPROXY_VERSION = "11.0.2"  # the newest that pip resolves for Python 3.11 (mitmproxy 12 needs 3.12)
REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".cache" / "mitmproxy-venv"
ADDON = Path(__file__).with_name("providers_addon.py")
RECORDED = REPO / "tests" / "recorded" / "sky"

PROVIDERS = ("lambda", "runpod", "vast")
MODES = ("ok", "no-capacity", "auth-error")
_COMMON_OPTIONS = {"no_capacity", "api_key", "status", "instance_status", "node"}
OPTIONS = {
    "lambda": _COMMON_OPTIONS | {"instance_types", "stale_listing"},
    "runpod": _COMMON_OPTIONS | {"gpu_types", "price_factor"},
    "vast": _COMMON_OPTIONS | {"offers", "price_factor"},
}
# Provider tags a record can carry besides PROVIDERS: "pypi", "aws-metadata", "unknown" (refused, HTTP 599)
# and "forward" (a connection mitmproxy tried to open to the outside, refused).
UNEXPECTED = ("unknown", "forward")


def ensure_mitmproxy(venv: Path = VENV, version: str = MITMPROXY_VERSION) -> Path:
    """Path of `mitmdump` in `venv`, creating that venv with mitmproxy==`version` if it is missing.

    An exclusive file lock makes parallel test processes build it once; a marker written last makes an
    interrupted build start over.
    """
    mitmdump, marker = venv / "bin" / "mitmdump", venv / ".meetara-mitmproxy"

    def ready() -> bool:
        return mitmdump.exists() and marker.exists() and marker.read_text().strip() == version

    if ready():
        return mitmdump
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready():  # built by another process while this one waited
            return mitmdump
        shutil.rmtree(venv, ignore_errors=True)
        for cmd in (
            [sys.executable, "-m", "venv", str(venv)],
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
                f"mitmproxy=={version}",
            ],
        ):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                tail = (done.stdout + done.stderr)[-3000:]
                raise RuntimeError(f"building the mitmproxy venv failed: {' '.join(cmd)}\n{tail}")
        marker.write_text(version)
    return mitmdump


class ProviderProxy:
    """A running fake of the three providers' APIs; made by `provider_proxy`."""

    def __init__(self, work: Path, port: int, ca_bundle: Path, process: subprocess.Popen[bytes]) -> None:
        self.work, self.port, self.ca_bundle, self.process = work, port, ca_bundle, process
        self._scenario: dict[str, dict[str, Any]] = {}

    @property
    def url(self) -> str:
        """The proxy's URL, http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Variables for a client process (and SkyPilot's API server and its children, which inherit them)."""
        local = "127.0.0.1,localhost"  # the SkyPilot client reaches its API server directly
        return {
            "HTTPS_PROXY": self.url,
            "HTTP_PROXY": self.url,
            "https_proxy": self.url,
            "http_proxy": self.url,
            "NO_PROXY": local,
            "no_proxy": local,
            "REQUESTS_CA_BUNDLE": str(self.ca_bundle),
            "SSL_CERT_FILE": str(self.ca_bundle),
            "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
        }

    def scenario(self, provider: str, mode: str = "ok", **opts: Any) -> None:
        """Set how `provider` answers from the next request on (replacing its earlier mode and options)."""
        self.set_scenario({**self._scenario, provider: {"mode": mode, **opts}})

    def set_scenario(self, scenario: Mapping[str, Mapping[str, Any]]) -> None:
        """Set every provider's mode and options at once: {provider: {"mode": ..., option: ...}}."""
        for provider, cfg in scenario.items():
            if provider not in PROVIDERS:
                raise ValueError(f"unknown provider {provider!r}; one of {PROVIDERS}")
            if cfg.get("mode", "ok") not in MODES:
                raise ValueError(f"unknown mode {cfg.get('mode')!r} for {provider}; one of {MODES}")
            extra = set(cfg) - OPTIONS[provider] - {"mode"}
            if extra:
                raise ValueError(
                    f"unknown options for {provider}: {sorted(extra)}; known: {sorted(OPTIONS[provider])}"
                )
        self._scenario = {p: dict(c) for p, c in scenario.items()}
        tmp = self.work / "scenario.json.tmp"
        tmp.write_text(json.dumps({"providers": self._scenario}, indent=1))
        os.replace(tmp, self.work / "scenario.json")  # the addon never reads half a file

    def requests(self, provider: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        """Recorded requests (optionally one provider's, and only those after mark `since`), oldest first.

        Each: seq, time, provider, method, scheme, host, port, path, query, json (parsed body), text (a body
        that is not JSON), graphql (RunPod: operation, name, fields, args, query, variables), auth
        ("present"/"absent"), status, outcome (ok, no-capacity, auth-error, not-found, bad-request, refused,
        fake-error), instance_name (the name a create asked for).
        """
        path = self.work / "requests.jsonl"
        if not path.exists():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n"):  # being written right now
                break
            record = json.loads(line)
            if record["seq"] > since and (provider is None or record["provider"] == provider):
                records.append(record)
        return records

    def mark(self) -> int:
        """The seq of the latest record: pass it as `since` to see only what comes after."""
        records = self.requests()
        return records[-1]["seq"] if records else 0

    def unexpected(self, since: int = 0) -> list[dict[str, Any]]:
        """Requests the fake refused, connections it would have had to forward, and its own crashes."""
        return [
            r
            for r in self.requests(since=since)
            if r["provider"] in UNEXPECTED or r["outcome"] == "fake-error"
        ]

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        provider: str | None = None,
        since: int = 0,
        timeout: float = 15.0,
    ) -> dict[str, Any]:
        """The first recorded request that satisfies `predicate`, polling for up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.requests(provider, since)
            for record in seen:
                if predicate(record):
                    return record
            if time.monotonic() > deadline:
                summary = "\n".join(
                    f"  {r['method']} {r['host']}{r['path']} -> {r['status']} {r['outcome']}"
                    for r in seen
                    if "method" in r
                )
                raise AssertionError(
                    f"no matching request within {timeout}s; seen:\n{summary or '  nothing'}"
                )
            time.sleep(0.05)

    def instances(self, provider: str) -> list[dict[str, Any]]:
        """The instances the fake `provider` holds now (created and not terminated)."""
        path = self.work / "state.json"
        return json.loads(path.read_text())[provider] if path.exists() else []

    def nodes(self, provider: str | None = None) -> list[dict[str, Any]]:
        """The SSH nodes running for instances now (tests/harness/node.py's Node fields, with provider and
        instance), in creation order."""
        path = self.work / "state.json"
        rows = json.loads(path.read_text()).get("nodes", []) if path.exists() else []
        return [r for r in rows if provider is None or r["provider"] == provider]

    def billed(self, provider: str | None = None) -> list[dict[str, Any]]:
        """What the fake providers bill for terminated instances: created_at, ended_at, price_hour, usd."""
        path = self.work / "state.json"
        rows = json.loads(path.read_text()).get("billed", []) if path.exists() else []
        return [r for r in rows if provider is None or r["provider"] == provider]

    def log(self) -> str:
        """mitmdump's own output, for a failure message."""
        path = self.work / "mitmdump.log"
        return path.read_text(errors="replace") if path.exists() else ""


def fake_credentials(home: Path) -> None:
    """The three providers' credential files, where SkyPilot's checks read them, under `home` (fake keys:
    the fakes accept any key unless a scenario names one)."""
    (home / ".config" / "vastai").mkdir(parents=True)
    (home / ".config" / "vastai" / "vast_api_key").write_text("fake-vast-key\n")
    (home / ".lambda_cloud").mkdir()
    (home / ".lambda_cloud" / "lambda_keys").write_text("api_key = fake-lambda-key\n")
    (home / ".runpod").mkdir()
    (home / ".runpod" / "config.toml").write_text('[default]\napi_key = "fake-runpod-key"\n')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop mitmdump by its PID: SIGTERM, then SIGKILL if it has not exited within 5 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _ca_bundle(confdir: Path, dest: Path) -> Path:
    import certifi  # the project venv's bundle, which requests uses by default

    dest.write_text(
        Path(certifi.where()).read_text() + "\n" + (confdir / "mitmproxy-ca-cert.pem").read_text()
    )
    return dest


@contextlib.contextmanager
def provider_proxy(
    tmp_path: Path, scenario: Mapping[str, Mapping[str, Any]] | None = None, startup_timeout: float = 30.0
) -> Iterator[ProviderProxy]:
    """Start the fake providers behind mitmdump on a free port of 127.0.0.1; always stop it on leaving."""
    mitmdump = ensure_mitmproxy()
    work = tmp_path / "provider-proxy"
    work.mkdir(parents=True, exist_ok=True)
    confdir = work / "confdir"
    (work / "addon-ready").unlink(missing_ok=True)
    for attempt in range(3):  # another process may take the free port between choosing and binding it
        port = _free_port()
        with open(work / "mitmdump.log", "ab") as log:
            process = subprocess.Popen(
                [str(mitmdump), "--listen-host", "127.0.0.1", "--listen-port", str(port), "-s", str(ADDON),
                 "--set", f"confdir={confdir}",
                 # Without these two, mitmproxy resolves and connects to the real host for every CONNECT
                 # (502 offline); the addon answers everything, so no upstream is ever needed.
                 "--set", "connection_strategy=lazy", "--set", "upstream_cert=false",
                 "--set", f"meetara_dir={work}", "--set", f"meetara_recorded={RECORDED}",
                 "--set", f"meetara_parent_pid={os.getpid()}", "--set", "termlog_verbosity=warn",
                 "--set", "flow_detail=0"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            proxy = ProviderProxy(work, port, work / "ca-bundle.pem", process)
            proxy.set_scenario(scenario or {})
            deadline = time.monotonic() + startup_timeout
            while process.poll() is None and not (
                (work / "addon-ready").exists()
                and (confdir / "mitmproxy-ca-cert.pem").exists()
                and _listening(port)
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mitmdump did not listen on {port} within {startup_timeout}s:\n{proxy.log()}"
                    )
                time.sleep(0.05)
            if process.poll() is not None:
                if "address already in use" in proxy.log().lower() and attempt < 2:
                    continue
                raise RuntimeError(f"mitmdump exited with {process.returncode}:\n{proxy.log()}")
            _ca_bundle(confdir, proxy.ca_bundle)
            yield proxy
            return
        finally:
            _stop(process)
