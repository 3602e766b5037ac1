"""mitmproxy addon for meetara's tests: Lambda, RunPod and Vast's HTTPS APIs answered here, requests recorded.

It runs inside mitmproxy's own venv (`tests/harness/proxy.py` starts `mitmdump -s` on this file), so it
imports only the standard library and mitmproxy. Nothing is ever forwarded: each request gets an answer from
this file, and a server connection mitmproxy would open is refused and recorded with provider "forward".

Options, set by the harness with `--set`:
- `meetara_dir`: `scenario.json` (re-read on every request, so a test can change answers while the proxy
  runs), `requests.jsonl` (one JSON object per request, appended), `state.json` (instances, rewritten);
- `meetara_recorded`: `tests/recorded/sky`, the base answers (see its README.md for their origin).

API keys never reach a file: an Authorization header is recorded only as present/absent, and every key seen is
replaced by "<api-key>" wherever it appears (Vast's create body carries it in `onstart`).
"""

# No `from __future__ import annotations`: mitmproxy loads this file without registering it in sys.modules,
# and dataclasses then fail on string annotations.
import base64
import copy
import hashlib
import json
import os
import re

# tests/harness/node.py (standard library only): a created instance can be a real SSH node on this machine
import sys  # noqa: E402
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mitmproxy import ctx, http

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node as nodes  # noqa: E402

HOSTS = {
    "cloud.lambdalabs.com": "lambda",  # SkyPilot 0.14.1's lambda_utils.API_ENDPOINT
    "cloud.lambda.ai": "lambda",  # Lambda's current name for the same API
    "api.runpod.io": "runpod",  # GraphQL, runpod SDK 1.10.1
    "rest.runpod.io": "runpod",  # REST, SkyPilot's network volumes (sky/adaptors/runpod.py)
    "console.vast.ai": "vast",  # vastai 1.9.1's server_url_default
    "pypi.org": "pypi",  # SkyPilot's API server checks for a newer release
    "169.254.169.254": "aws-metadata",  # botocore probing for EC2 instance credentials
}
# The endpoints answered (method regex, path regex); anything else on these hosts is refused before the key is
# even checked, so a test sees "refused", not a misleading auth error.
ROUTES = {
    "lambda": [
        ("GET", r"/api/v1/instance-types"),
        ("GET", r"/api/v1/instances(/[^/]+)?"),
        ("POST", r"/api/v1/instance-operations/(launch|terminate)"),
        ("GET|POST", r"/api/v1/ssh-keys"),
        ("GET|PUT", r"/api/v1/firewall-rules"),
        ("GET", r"/api/v1/file-systems"),
    ],
    "runpod": [
        ("POST", r"/graphql"),  # api.runpod.io; which fields are answered: _runpod_queries, _runpod_mutations
        ("GET", r"/v1/networkvolumes/?"),  # rest.runpod.io
    ],
    "vast": [
        ("POST", r"/api/v0/bundles/?"),
        ("PUT", r"/api/v0/search/asks/?"),
        ("PUT", r"/api/v0/asks/\d+/?"),
        ("GET", r"/api/v[01]/instances/?"),
        ("GET|PUT|DELETE", r"/api/v0/instances/\d+/?"),
        ("GET", r"/api/v0/users/current/?"),
        ("GET|POST", r"/api/v0/ssh/?"),
    ],
}
REFUSED = 599  # not a status any provider sends, so a refusal cannot pass for a provider's answer
API_KEY_MARK = "<api-key>"
SECRET_MARK = "<secret>"


@dataclass
class Reply:
    status: int
    body: Any  # JSON-able, or str for a plain-text body
    outcome: str = "ok"  # ok | no-capacity | auth-error | not-found | bad-request | refused | fake-error
    instance_name: str | None = None


@dataclass
class Req:
    method: str
    scheme: str
    host: str
    port: int
    path: str
    query: dict[str, Any]
    text: str
    json: Any
    key: str | None  # the API key sent, if any: used to check it and to redact it, never recorded
    graphql: dict[str, Any] | None = None
    secrets: dict[str, str] = field(default_factory=dict)  # value -> what it is recorded as


def _unknown(req: Req, why: str = "no fake answer for this request") -> Reply:
    return Reply(
        REFUSED,
        f"meetara test proxy refused {req.method} {req.scheme}://{req.host}{req.path}: {why}\n",
        outcome="refused",
    )


# ---------------------------------------------------------------- GraphQL (the subset RunPod's SDK sends)


class GraphQLSyntaxError(ValueError):
    pass


@dataclass
class Field:
    name: str
    alias: str
    args: dict[str, Any]
    selections: list["Field"]


_GQL_TOKEN = re.compile(
    r"""(?P<skip>[\s,\ufeff]+|\#[^\n]*)
      | (?P<spread>\.\.\.)
      | (?P<punct>[!$&():=@\[\]{}|])
      | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
      | (?P<name>[_A-Za-z][_0-9A-Za-z]*)
      | (?P<string>"(?:[^"\\\n]|\\.)*")""",
    re.VERBOSE,
)


class _GraphQLParser:
    """Recursive descent over one operation: fields, aliases, arguments, literals and variables.

    Enough for the queries the runpod SDK and SkyPilot build by string formatting; fragments are refused.
    """

    def __init__(self, text: str, variables: dict[str, Any]) -> None:
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            m = _GQL_TOKEN.match(text, pos)
            if m is None:
                raise GraphQLSyntaxError(f"Unexpected character {text[pos]!r} at offset {pos}")
            pos = m.end()
            if m.lastgroup != "skip":
                self.tokens.append((m.lastgroup or "", m.group()))
        self.i = 0
        self.variables = variables

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("eof", "")

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        k, v = self.peek()
        if (value is not None and v != value) or (kind is not None and k != kind) or k == "eof":
            raise GraphQLSyntaxError(f"Expected {value or kind}, found {v or 'end of document'!r}")
        self.i += 1
        return v

    def operation(self) -> tuple[str, str | None, list[Field]]:
        kind, name = "query", None
        if self.peek()[1] in ("query", "mutation", "subscription"):
            kind = self.take()
            if self.peek()[0] == "name":
                name = self.take()
            if self.peek()[1] == "(":  # variable definitions: their values come from "variables"
                depth = 0
                while True:
                    v = self.take()
                    depth += {"(": 1, ")": -1}.get(v, 0)
                    if depth == 0:
                        break
            self.directives()
        return kind, name, self.selection_set()

    def selection_set(self) -> list[Field]:
        self.take("{")
        fields = []
        while self.peek()[1] != "}":
            if self.peek()[0] == "spread":
                raise GraphQLSyntaxError("fragments are not supported by the test proxy")
            fields.append(self.field())
        self.take("}")
        return fields

    def field(self) -> Field:
        alias = name = self.take(kind="name")
        if self.peek()[1] == ":":
            self.take(":")
            name = self.take(kind="name")
        args = self.arguments()
        self.directives()
        selections = self.selection_set() if self.peek()[1] == "{" else []
        return Field(name, alias, args, selections)

    def arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.peek()[1] == "(":
            self.take("(")
            while self.peek()[1] != ")":
                key = self.take(kind="name")
                self.take(":")
                args[key] = self.value()
            self.take(")")
        return args

    def directives(self) -> None:
        while self.peek()[1] == "@":
            self.take("@")
            self.take(kind="name")
            self.arguments()

    def value(self) -> Any:
        kind, v = self.peek()
        if v == "$":
            self.take("$")
            return self.variables.get(self.take(kind="name"))
        if v == "[":
            self.take("[")
            items = []
            while self.peek()[1] != "]":
                items.append(self.value())
            self.take("]")
            return items
        if v == "{":
            self.take("{")
            obj = {}
            while self.peek()[1] != "}":
                key = self.take(kind="name")
                self.take(":")
                obj[key] = self.value()
            self.take("}")
            return obj
        self.take()
        if kind == "string":
            return json.loads(v, strict=False)  # GraphQL's string escapes are JSON's
        if kind == "number":
            return float(v) if any(c in v for c in ".eE") else int(v)
        if kind == "name":
            return {"true": True, "false": False, "null": None}.get(v, v)  # anything else is an enum value
        raise GraphQLSyntaxError(f"Unexpected {v!r}")


def parse_graphql(text: str, variables: dict[str, Any] | None = None) -> tuple[str, str | None, list[Field]]:
    """(operation type, operation name, top-level fields) of the first operation in `text`."""
    return _GraphQLParser(text, variables or {}).operation()


def project(value: Any, selections: list[Field]) -> Any:
    """Keep only the selected fields, as a GraphQL server answers (absent ones come back null)."""
    if not selections or value is None:
        return value
    if isinstance(value, list):
        return [project(v, selections) for v in value]
    if isinstance(value, dict):
        return {f.alias: project(value.get(f.name), f.selections) for f in selections}
    return value


class GraphQLFieldError(Exception):
    def __init__(self, message: str, outcome: str, code: str = "INTERNAL_SERVER_ERROR") -> None:
        super().__init__(message)
        self.message, self.outcome, self.code = message, outcome, code


# ---------------------------------------------------------------- the addon


class ProvidersAddon:
    def __init__(self) -> None:
        self.dir: Path | None = None
        self.recorded_dir: Path | None = None
        self._recorded: dict[str, Any] = {}
        self._seq = 0
        self._counter = 0
        self._keys_seen: set[str] = set()
        self.lambda_instances: dict[str, dict[str, Any]] = {}
        self.lambda_ssh_keys: list[dict[str, Any]] = []
        self.lambda_firewall_rules: list[dict[str, Any]] = []
        self.runpod_pods: dict[str, dict[str, Any]] = {}
        self.runpod_user: dict[str, Any] = {"id": "user_2fYq0meetara", "pubKey": None, "networkVolumes": []}
        self.runpod_templates: list[dict[str, Any]] = []
        self.runpod_registry_auths: list[dict[str, Any]] = []
        self.vast_instances: dict[int, dict[str, Any]] = {}
        self.vast_ssh_keys: list[dict[str, Any]] = []
        # (provider, instance id) -> the SSH node started for it (scenario option `node`)
        self.nodes: dict[tuple[str, str], nodes.Node] = {}
        self.billed: list[dict[str, Any]] = []  # one entry per terminated instance: what the provider bills

    # mitmproxy hooks

    def load(self, loader: Any) -> None:
        loader.add_option("meetara_dir", str, "", "folder of scenario.json, requests.jsonl and state.json")
        loader.add_option(
            "meetara_recorded", str, "", "folder of the recorded base answers (tests/recorded/sky)"
        )
        loader.add_option("meetara_parent_pid", int, 0, "exit when this process is gone")

    def running(self) -> None:
        if self.dir is not None:  # tells the harness that this addon loaded (mitmdump may listen without it)
            (self.dir / "addon-ready").write_text(str(os.getpid()))
        # The harness stops mitmdump by PID; this covers a harness that was itself killed (SIGKILL, OOM).
        pid = ctx.options.meetara_parent_pid
        if pid:
            threading.Thread(target=_exit_with_parent, args=(pid,), daemon=True).start()

    def configure(self, updated: set[str]) -> None:
        if "meetara_dir" in updated and ctx.options.meetara_dir:
            self.dir = Path(ctx.options.meetara_dir)
        if "meetara_recorded" in updated and ctx.options.meetara_recorded:
            self.recorded_dir = Path(ctx.options.meetara_recorded)
            self._recorded.clear()

    def request(self, flow: http.HTTPFlow) -> None:
        req = self._request_view(flow)
        provider = HOSTS.get(req.host)
        try:
            reply = self._dispatch(provider, req)
        except Exception:  # a bug here must show up in the test, not as a hang or a proxy error page
            reply = Reply(500, f"meetara test proxy crashed:\n{traceback.format_exc()}", outcome="fake-error")
        if reply.outcome == "refused":
            provider = "unknown" if provider != "aws-metadata" else provider
        body = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
        content_type = "text/plain; charset=utf-8" if isinstance(reply.body, str) else "application/json"
        flow.response = http.Response.make(reply.status, body.encode(), {"Content-Type": content_type})
        self._record(
            {
                "provider": provider or "unknown",
                "method": req.method,
                "scheme": req.scheme,
                "host": req.host,
                "port": req.port,
                "path": req.path,
                "query": req.query,
                "json": req.json,
                "text": None if req.json is not None or not req.text else req.text[:4000],
                "graphql": req.graphql,
                "auth": "present" if req.key else "absent",
                "status": reply.status,
                "outcome": reply.outcome,
                "instance_name": reply.instance_name,
                "error": reply.body if reply.outcome == "fake-error" else None,
            },
            req.secrets,
        )

    def server_connect(self, data: Any) -> None:
        # The addon answers every request itself; a connection reaching here would leave the machine.
        host, port = (data.server.address or ("?", 0))[:2]
        self._record({"provider": "forward", "host": host, "port": port, "outcome": "refused"}, {})
        data.server.error = "meetara test proxy never connects upstream"

    # plumbing

    def _request_view(self, flow: http.HTTPFlow) -> Req:
        r = flow.request
        split = urlsplit(r.path)
        query = {
            k: v[0] if len(v) == 1 else v for k, v in parse_qs(split.query, keep_blank_values=True).items()
        }
        text = r.get_text(strict=False) or ""
        try:
            body = json.loads(text) if text.strip()[:1] in ("{", "[") else None
        except ValueError:
            body = None
        key = None
        auth = r.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        elif auth.lower().startswith("basic "):  # Lambda also takes the key as the basic-auth user name
            try:
                key = base64.b64decode(auth[6:]).decode().split(":", 1)[0]
            except ValueError:
                key = auth[6:]
        elif auth:
            key = auth.strip()
        for name in ("api_key", "apikey", "api-key"):  # older SDKs put the key in the query string
            if not key and isinstance(query.get(name), str):
                key = query[name]
        if key and len(key) >= 4:  # shorter "keys" would redact ordinary text
            self._keys_seen.add(key)
        return Req(r.method, r.scheme, r.pretty_host.lower(), r.port, split.path, query, text, body, key)

    def _dispatch(self, provider: str | None, req: Req) -> Reply:
        if provider == "aws-metadata":
            return Reply(502, "meetara test proxy: no instance metadata service here\n", outcome="refused")
        if provider == "pypi":
            if req.method == "GET" and req.path == "/pypi/skypilot/json":
                return Reply(200, self.recorded("pypi_skypilot.json"))
            return _unknown(req)
        if provider is None:
            return _unknown(req, "host is not one of the faked providers")
        if req.method == "HEAD" and req.path in ("", "/"):  # a network check (meetara's SkyPilot plugin)
            return Reply(200, "", outcome="ok")
        if not any(re.fullmatch(m, req.method) and re.fullmatch(p, req.path) for m, p in ROUTES[provider]):
            return _unknown(req)
        cfg = self.scenario().get("providers", {}).get(provider) or {}
        handler = {"lambda": self._lambda, "runpod": self._runpod, "vast": self._vast}[provider]
        return handler(req, cfg)

    def recorded(self, name: str) -> Any:
        if name not in self._recorded:
            assert self.recorded_dir is not None, "meetara_recorded is not set"
            self._recorded[name] = json.loads((self.recorded_dir / name).read_text())
        return copy.deepcopy(self._recorded[name])

    def scenario(self) -> dict[str, Any]:
        if self.dir is None:
            return {}
        try:
            return json.loads((self.dir / "scenario.json").read_text())
        except FileNotFoundError:
            return {}

    def _marks(self, extra: dict[str, str]) -> dict[str, str]:
        return {**dict.fromkeys(self._keys_seen, API_KEY_MARK), **extra}

    def _record(self, record: dict[str, Any], secrets: dict[str, str]) -> None:
        if self.dir is None:
            return
        self._seq += 1
        record = {"seq": self._seq, "time": time.time(), **record}
        line = json.dumps(_redact(record, self._marks(secrets)), sort_keys=True)
        with open(self.dir / "requests.jsonl", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def _save_state(self) -> None:
        if self.dir is None:
            return
        state = {
            "lambda": list(self.lambda_instances.values()),
            "runpod": list(self.runpod_pods.values()),
            "vast": list(self.vast_instances.values()),
            "nodes": [
                {"provider": p, "instance": i, **json.loads(n.to_json())} for (p, i), n in self.nodes.items()
            ],
            "billed": self.billed,
        }
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(_redact(state, self._marks({})), sort_keys=True))
        os.replace(tmp, self.dir / "state.json")

    def _next(self) -> int:
        self._counter += 1
        return self._counter

    @staticmethod
    def _mode(cfg: dict[str, Any]) -> str:
        return cfg.get("mode", "ok")

    def _auth_failed(self, req: Req, cfg: dict[str, Any]) -> bool:
        expected = cfg.get("api_key")
        return (
            self._mode(cfg) == "auth-error" or not req.key or (expected is not None and req.key != expected)
        )

    @staticmethod
    def _no_capacity(cfg: dict[str, Any], attrs: dict[str, Any], shorthand: Any) -> bool:
        """Whether the scenario says this create fails for lack of capacity.

        A matcher is "*", a dict (all its keys equal in `attrs`), or the provider's shorthand (`shorthand`).
        """
        if cfg.get("mode", "ok") == "no-capacity":
            return True
        for m in cfg.get("no_capacity") or []:
            if m == "*":
                return True
            if isinstance(m, dict):
                if all(k in attrs and attrs[k] == v for k, v in m.items()):
                    return True
            elif shorthand(m, attrs):
                return True
        return False

    # ------------------------------------------------------------ real SSH nodes (scenario option `node`)

    def _start_node(
        self,
        provider: str,
        instance: str,
        cfg: dict[str, Any],
        onstart: str | None = None,
        key: str | None = None,
        user: str = "root",
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> "nodes.Node | None":
        """The node a create starts when the scenario gives `node` = {dir, registry, user_env, uv, image, env}
        (None without it: the instance then never becomes reachable, as before)."""
        opt = cfg.get("node")
        if not opt:
            return None
        image = Path(opt["image"]) if opt.get("image") else None
        started = nodes.start(
            Path(opt["dir"]) / f"{provider}-{instance}",
            f"{provider}-{instance}",
            onstart=onstart,
            authorized_key=key or None,
            user=user,
            host=host,
            port=port,
            user_env=Path(opt["user_env"]) if opt.get("user_env") else None,
            image=image if image is not None and (image / ".snapshot").exists() else None,
            env=opt.get("env") or {},
            uv=Path(opt["uv"]) if opt.get("uv") else None,
            registry=Path(opt["registry"]) if opt.get("registry") else None,
        )
        self.nodes[(provider, instance)] = started
        return started

    def _node_gone(self, provider: str, instance: str) -> bool:
        """Whether the instance had a node that is no longer running (killed: the machine was preempted)."""
        n = self.nodes.get((provider, instance))
        return n is not None and not nodes.alive(n)

    def _end_instance(self, provider: str, instance: str, row: dict[str, Any], price_hour: float) -> None:
        """Terminate: stop the instance's node (its SkyPilot runtime snapshotted first into the scenario's
        `node.image`, once) and bill it from its creation to now at its rented price."""
        n = self.nodes.pop((provider, instance), None)
        opt = (self.scenario().get("providers", {}).get(provider) or {}).get("node") or {}
        if n is not None:
            if opt.get("image") and nodes.alive(n):
                nodes.snapshot(n, Path(opt["image"]))
            nodes.stop(n)
        start = float(row.get("meetara_created_at") or row.get("start_date") or time.time())
        end = time.time()
        self.billed.append(
            {
                "provider": provider,
                "instance": instance,
                "created_at": start,
                "ended_at": end,
                "price_hour": price_hour,
                "usd": round((end - start) / 3600 * price_hour, 6),
            }
        )

    # ------------------------------------------------------------ Lambda (REST, /api/v1)

    def _lambda(self, req: Req, cfg: dict[str, Any]) -> Reply:
        if self._auth_failed(req, cfg):
            status = 403 if cfg.get("status") == 403 else 401
            return Reply(status, self.recorded(f"lambda_error_{status}.json"), outcome="auth-error")
        route = (req.method, req.path[len("/api/v1/") :].rstrip("/"))
        body = req.json if isinstance(req.json, dict) else {}
        if route == ("GET", "instance-types"):
            return Reply(200, {"data": self._lambda_catalog(cfg, listed=True)})
        if route == ("GET", "instances"):
            return Reply(200, {"data": list(self.lambda_instances.values())})
        if route[0] == "GET" and route[1].startswith("instances/"):
            inst = self.lambda_instances.get(route[1].split("/", 1)[1])
            if inst is None:
                return Reply(404, self.recorded("lambda_error_not_found.json"), outcome="not-found")
            return Reply(200, {"data": inst})
        if route == ("POST", "instance-operations/launch"):
            return self._lambda_launch(body, cfg)
        if route == ("POST", "instance-operations/terminate"):
            ids = body.get("instance_ids") or []
            if any(i not in self.lambda_instances for i in ids):
                return Reply(404, self.recorded("lambda_error_not_found.json"), outcome="not-found")
            gone = [dict(self.lambda_instances.pop(i), status="terminating") for i in ids]
            for row in gone:
                self._end_instance("lambda", row["id"], row, float(row.get("meetara_price_hour") or 0))
            self._save_state()
            return Reply(200, {"data": {"terminated_instances": gone}})
        if route == ("GET", "ssh-keys"):
            return Reply(200, {"data": self.lambda_ssh_keys})
        if route == ("POST", "ssh-keys"):
            key = {
                "id": hashlib.sha1(f"ssh-{self._next()}".encode()).hexdigest()[:32],
                "name": body.get("name"),
                "public_key": body.get("public_key"),
            }
            self.lambda_ssh_keys.append(key)
            return Reply(200, {"data": key})
        if route == ("GET", "firewall-rules"):
            return Reply(200, {"data": self.lambda_firewall_rules})
        if route == ("PUT", "firewall-rules"):
            self.lambda_firewall_rules = list(body.get("data") or [])
            return Reply(200, {"data": self.lambda_firewall_rules})
        if route == ("GET", "file-systems"):
            return Reply(200, {"data": []})
        return _unknown(req)

    def _lambda_catalog(self, cfg: dict[str, Any], listed: bool) -> dict[str, Any]:
        """The instance types; `listed`: as GET instance-types shows them (capacity follows the scenario)."""
        data = copy.deepcopy(cfg.get("instance_types") or self.recorded("lambda_instance_types.json")["data"])
        if listed and not cfg.get("stale_listing"):
            for name, entry in data.items():
                entry["regions_with_capacity_available"] = [
                    r
                    for r in entry.get("regions_with_capacity_available", [])
                    if not self._no_capacity(
                        cfg, {"instance_type": name, "region": r["name"]}, _lambda_shorthand
                    )
                ]
        return data

    def _lambda_launch(self, body: dict[str, Any], cfg: dict[str, Any]) -> Reply:
        name, region = body.get("instance_type_name"), body.get("region_name")
        catalog = self._lambda_catalog(cfg, listed=False)
        if name not in catalog or not region:
            return Reply(400, self.recorded("lambda_error_invalid_parameters.json"), outcome="bad-request")
        regions = {r["name"]: r for r in catalog[name].get("regions_with_capacity_available", [])}
        attrs = {"instance_type": name, "region": region}
        if region not in regions or self._no_capacity(cfg, attrs, _lambda_shorthand):
            return Reply(
                400,
                self.recorded("lambda_error_insufficient_capacity.json"),
                outcome="no-capacity",
                instance_name=body.get("name"),
            )
        status = cfg.get("instance_status", "booting")
        ids = []
        for _ in range(int(body.get("quantity") or 1)):
            n = self._next()
            iid = hashlib.sha1(f"lambda-instance-{n}".encode()).hexdigest()[:32]
            names = body.get("ssh_key_names") or []
            keys = [k["public_key"] for k in self.lambda_ssh_keys if k.get("name") in names]
            # Lambda's SSH is port 22 as `ubuntu`: the node gets a loopback address of its own
            node_ = self._start_node(
                "lambda", iid, cfg, key="\n".join(keys), user="ubuntu", host=f"127.0.0.{n % 200 + 2}", port=22
            )
            self.lambda_instances[iid] = {
                "id": iid,
                "name": body.get("name"),
                "ip": f"192.0.2.{n % 250 + 1}" if status == "active" else None,  # TEST-NET-1: never reachable
                "private_ip": None,
                "status": status,
                "ssh_key_names": body.get("ssh_key_names") or [],
                "file_system_names": body.get("file_system_names") or [],
                "region": regions[region],
                "instance_type": catalog[name]["instance_type"],
                "hostname": None,
                "jupyter_token": None,
                "jupyter_url": None,
                "is_reserved": False,
                "meetara_created_at": time.time(),
                "meetara_price_hour": catalog[name]["instance_type"].get("price_cents_per_hour", 0) / 100,
            }
            if node_ is not None:
                self.lambda_instances[iid].update(status="active", ip=node_.host, private_ip=node_.host)
            ids.append(iid)
        self._save_state()
        return Reply(200, {"data": {"instance_ids": ids}}, instance_name=body.get("name"))

    # ------------------------------------------------------------ RunPod (GraphQL at api.runpod.io/graphql)

    def _runpod(self, req: Req, cfg: dict[str, Any]) -> Reply:
        if req.host == "rest.runpod.io":
            if self._auth_failed(req, cfg):
                return Reply(401, {"error": "Unauthorized"}, outcome="auth-error")
            if (req.method, req.path.rstrip("/")) == ("GET", "/v1/networkvolumes"):
                return Reply(200, [])
            return _unknown(req)
        if (req.method, req.path) != ("POST", "/graphql") or not isinstance(req.json, dict):
            return _unknown(req)
        query, variables = req.json.get("query") or "", req.json.get("variables") or {}
        try:
            kind, op_name, fields = parse_graphql(query, variables)
        except GraphQLSyntaxError as e:
            req.graphql = {"query": query, "variables": variables, "syntax_error": str(e)}
            body = {
                "errors": [{"message": f"Syntax Error: {e}", "extensions": {"code": "GRAPHQL_PARSE_FAILED"}}]
            }
            return Reply(400, body, outcome="bad-request")
        args = {f.alias: f.args for f in fields}
        for f in fields:  # a docker registry password rides in saveRegistryAuth's input
            if isinstance(f.args.get("input"), dict) and isinstance(f.args["input"].get("password"), str):
                req.secrets[f.args["input"]["password"]] = SECRET_MARK
        req.graphql = {
            "operation": kind,
            "name": op_name,
            "fields": [f.name for f in fields],
            "args": args,
            "query": query,
            "variables": variables,
        }
        if self._auth_failed(req, cfg):
            # An invalid key gets HTTP 401 (the SDK raises AuthenticationError before reading the body); a
            # key without the needed permission gets HTTP 200 and a GraphQL "Unauthorized" (SkyPilot #8411).
            status = 200 if cfg.get("status") == 200 else 401
            return Reply(status, self.recorded("runpod_error_401.json"), outcome="auth-error")
        resolvers = self._runpod_queries() if kind == "query" else self._runpod_mutations()
        data: dict[str, Any] = {}
        errors: list[dict[str, Any]] = []
        outcome, instance_name = "ok", None
        for f in fields:
            resolver = resolvers.get(f.name)
            if resolver is None:
                return _unknown(req, f"no fake for the GraphQL {kind} field {f.name!r}")
            try:
                value = resolver(f.args, cfg)
            except GraphQLFieldError as e:
                errors.append(
                    {
                        "message": e.message,
                        "locations": [{"line": 3, "column": 7}],
                        "path": [f.alias],
                        "extensions": {"code": e.code},
                    }
                )
                data[f.alias], outcome = None, e.outcome
            else:
                data[f.alias] = project(value, f.selections)
            if isinstance(f.args.get("input"), dict) and "name" in f.args["input"]:
                instance_name = f.args["input"]["name"]
        body = {"errors": errors, "data": data} if errors else {"data": data}
        return Reply(200, body, outcome=outcome, instance_name=instance_name)

    def _runpod_queries(self) -> dict[str, Any]:
        def myself(args: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
            return {
                **self.runpod_user,
                "pods": list(self.runpod_pods.values()),
                "podTemplates": self.runpod_templates,
                "containerRegistryCreds": self.runpod_registry_auths,
                "endpoints": [],
                "clientBalance": 25.0,
                "currentSpendPerHr": sum(p["costPerHr"] for p in self.runpod_pods.values()),
            }

        def gpu_types(args: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
            wanted = (args.get("input") or {}).get("id")
            return [g for g in self._runpod_gpus(cfg) if wanted is None or g["id"] == wanted]

        def pod(args: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any] | None:
            return self.runpod_pods.get((args.get("input") or {}).get("podId"))

        return {"myself": myself, "gpuTypes": gpu_types, "pod": pod}

    def _runpod_gpus(self, cfg: dict[str, Any]) -> list[dict[str, Any]]:
        return copy.deepcopy(
            cfg.get("gpu_types") or self.recorded("runpod_gpu_types.json")["data"]["gpuTypes"]
        )

    def _runpod_mutations(self) -> dict[str, Any]:
        def deploy(mutation: str) -> Any:
            def create(args: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
                spec = dict(args.get("input") or {})
                gpu = next((g for g in self._runpod_gpus(cfg) if g["id"] == spec.get("gpuTypeId")), None)
                if mutation != "deployCpuPod" and gpu is None:
                    raise GraphQLFieldError("Invalid GPU type.", "bad-request")
                attrs = {**spec, "mutation": mutation, "spot": mutation == "podRentInterruptable"}
                if self._no_capacity(cfg, attrs, _runpod_shorthand):
                    message = self.recorded("runpod_error_no_instances.json")["errors"][0]["message"]
                    raise GraphQLFieldError(message, "no-capacity")
                return self._runpod_create(mutation, spec, gpu, cfg)

            return create

        def terminate(args: dict[str, Any], cfg: dict[str, Any]) -> None:
            pod_id = (args.get("input") or {}).get("podId")
            pod = self.runpod_pods.pop(pod_id, None)
            if pod is None:
                raise GraphQLFieldError("Pod not found.", "not-found")
            self._end_instance("runpod", pod_id, pod, float(pod.get("meetara_price_hour") or 0))
            self._save_state()

        def user_settings(args: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
            self.runpod_user["pubKey"] = (args.get("input") or {}).get("pubKey")
            return self.runpod_user

        def save_template(args: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
            template = {"id": f"tpl{self._next():06d}", **(args.get("input") or {})}
            self.runpod_templates.append(template)
            return template

        def delete_template(args: dict[str, Any], cfg: dict[str, Any]) -> None:
            self.runpod_templates = [
                t for t in self.runpod_templates if t.get("name") != args.get("templateName")
            ]

        def save_registry_auth(args: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
            auth = {"id": f"cra{self._next():06d}", "name": (args.get("input") or {}).get("name")}
            self.runpod_registry_auths.append(auth)
            return auth

        def delete_registry_auth(args: dict[str, Any], cfg: dict[str, Any]) -> None:
            wanted = args.get("registryAuthId")
            self.runpod_registry_auths = [a for a in self.runpod_registry_auths if a["id"] != wanted]

        return {
            "podRentInterruptable": deploy("podRentInterruptable"),
            "podFindAndDeployOnDemand": deploy("podFindAndDeployOnDemand"),
            "deployCpuPod": deploy("deployCpuPod"),
            "podTerminate": terminate,
            "updateUserSettings": user_settings,
            "saveTemplate": save_template,
            "deleteTemplate": delete_template,
            "saveRegistryAuth": save_registry_auth,
            "deleteRegistryAuth": delete_registry_auth,
        }

    def _runpod_create(
        self, mutation: str, spec: dict[str, Any], gpu: dict[str, Any] | None, cfg: dict[str, Any]
    ) -> dict[str, Any]:
        n = self._next()
        pod_id = hashlib.sha1(f"runpod-pod-{n}".encode()).hexdigest()[:14]
        count = int(spec.get("gpuCount") or 1)
        if mutation == "podRentInterruptable":
            price = float(spec.get("bidPerGpu") or 0) * count
        elif gpu is not None:
            price = float(gpu.get("securePrice") or gpu.get("communityPrice") or 0) * count
        else:
            price = 0.06
        # scenario `price_factor`: the GPUs' price moved since the offers were listed (the pod costs that)
        price *= float(cfg.get("price_factor", 1.0))
        # desiredStatus RUNNING with runtime null: what RunPod shows while the image is pulled. SkyPilot waits
        # for a public port 22 in runtime.ports, so such a pod is listed but never reachable.
        self.runpod_pods[pod_id] = {
            "id": pod_id,
            "name": spec.get("name"),
            "desiredStatus": cfg.get("instance_status", "RUNNING"),
            "imageName": spec.get("imageName"),
            "env": [f"{e.get('key')}={e.get('value')}" for e in spec.get("env") or [] if isinstance(e, dict)],
            "machineId": f"m{n:05d}x7k2",
            "machine": {
                "podHostId": f"{pod_id}-64411f3e",
                "gpuDisplayName": gpu["displayName"] if gpu else None,
            },
            "costPerHr": round(price, 4),
            "gpuCount": count if gpu else 0,
            "vcpuCount": spec.get("minVcpuCount") or 2,
            "memoryInGb": spec.get("minMemoryInGb") or 4,
            "containerDiskInGb": spec.get("containerDiskInGb"),
            "volumeInGb": spec.get("volumeInGb") or 0,
            "volumeMountPath": spec.get("volumeMountPath"),
            "containerRegistryAuthId": None,
            "dockerArgs": spec.get("dockerArgs"),
            "dockerId": None,
            "podType": "INTERRUPTABLE" if mutation == "podRentInterruptable" else "RESERVED",
            "port": None,
            "ports": spec.get("ports"),
            "uptimeSeconds": 0,
            "lastStatusChange": f"Rented by User: {time.strftime('%a %b %d %Y %H:%M:%S GMT+0000')}",
            "runtime": None,
            "meetara_created_at": time.time(),
            # RunPod bills the container disk on top of the pod's price
            "meetara_price_hour": round(
                price + float(spec.get("containerDiskInGb") or 0) * RUNPOD_DISK_USD_GB_MONTH / (30 * 24), 6
            ),
        }
        # the container runtime SkyPilot's docker args assume (sshd, its key): a node with the key installed
        node_ = self._start_node("runpod", pod_id, cfg, key=_runpod_key(spec.get("dockerArgs") or ""))
        if node_ is not None:
            ports = [
                {"ip": node_.host, "isIpPublic": public, "privatePort": 22, "publicPort": port, "type": "tcp"}
                for public, port in ((True, node_.port), (False, 22))
            ]
            self.runpod_pods[pod_id]["runtime"] = {"uptimeInSeconds": 0, "ports": ports, "gpus": []}
        self._save_state()
        return self.runpod_pods[pod_id]

    # ------------------------------------------------------------ Vast (REST, console.vast.ai/api/v0 and v1)

    def _vast(self, req: Req, cfg: dict[str, Any]) -> Reply:
        m = re.fullmatch(r"/api/v(\d)/(.*?)/?", req.path)
        if m is None:
            return _unknown(req)  # not reached: ROUTES only lets /api/vN/... through
        if self._auth_failed(req, cfg):
            status = 403 if cfg.get("status") == 403 else 401
            return Reply(status, self.recorded(f"vast_error_{status}.json"), outcome="auth-error")
        version, rest = m.group(1), m.group(2)
        body = req.json if isinstance(req.json, dict) else {}
        if (req.method, version, rest) == ("POST", "0", "bundles"):
            return Reply(200, {"offers": self._vast_search(body, cfg)})
        if (req.method, version, rest) == ("PUT", "0", "search/asks"):
            return Reply(200, {"offers": self._vast_search(body.get("q") or {}, cfg)})
        ask = re.fullmatch(r"asks/(\d+)", rest)
        if ask and (req.method, version) == ("PUT", "0"):
            return self._vast_create(int(ask.group(1)), body, cfg)
        for iid_, row_ in self.vast_instances.items():
            if self._node_gone("vast", str(iid_)) and row_["actual_status"] == "running":
                # an interruptible instance that was outbid (its node killed): Vast stops it
                row_.update(actual_status="exited", cur_state="stopped", status_msg="outbid")
                self._save_state()
        if (req.method, rest) == ("GET", "instances"):
            rows = list(self.vast_instances.values())
            if version == "1":
                return Reply(200, {"instances": rows, "next_token": None, "total_instances": len(rows)})
            return Reply(200, {"instances": rows})
        inst = re.fullmatch(r"instances/(\d+)", rest)
        if inst and version == "0":
            iid = int(inst.group(1))
            if req.method == "GET":
                return Reply(200, {"instances": self.vast_instances.get(iid)})
            if iid not in self.vast_instances:
                error = self.recorded("vast_error_no_such_instance.json")
                error["msg"] = error["msg"].format(id=iid)
                return Reply(404, error, outcome="not-found")
            if req.method == "DELETE":
                row = self.vast_instances.pop(iid)
                self._end_instance("vast", str(iid), row, float(row.get("meetara_price_hour") or 0))
                self._save_state()
                return Reply(200, {"success": True})
            if req.method == "PUT":
                row = self.vast_instances[iid]
                if "label" in body:
                    row["label"] = body["label"]
                if body.get("state") in ("running", "stopped"):
                    row["intended_status"] = row["next_state"] = body["state"]
                self._save_state()
                return Reply(200, {"success": True})
        if (req.method, version, rest) == ("GET", "0", "users/current"):
            return Reply(200, self.recorded("vast_user.json"))
        if (version, rest) == ("0", "ssh"):
            if req.method == "GET":
                return Reply(200, self.vast_ssh_keys)
            if req.method == "POST":
                key = {
                    "id": 80000 + self._next(),
                    "user_id": 412735,
                    "public_key": body.get("ssh_key"),
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "deleted_at": None,
                }
                self.vast_ssh_keys.append(key)
                return Reply(200, {"success": True, "key": key})
        return _unknown(req)

    def _vast_offers(self, cfg: dict[str, Any]) -> list[dict[str, Any]]:
        offers = cfg.get("offers")
        return copy.deepcopy(offers if offers is not None else self.recorded("vast_bundles.json")["offers"])

    def _vast_search(self, q: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
        """Vast's search semantics, as far as the fake needs them: per-field filters, order, limit.

        A filter on a field the recorded offers do not have is ignored rather than emptying the answer.
        """
        offers = self._vast_offers(cfg)
        for key, cond in q.items():
            if key in ("order", "type", "allocated_storage", "limit", "disable_bundling") or not isinstance(
                cond, dict
            ):
                continue
            offers = [o for o in offers if key not in o or _vast_condition(o[key], cond)]
        for col, direction in reversed(q.get("order") or []):
            present = [o for o in offers if o.get(col) is not None]
            absent = [o for o in offers if o.get(col) is None]
            offers = sorted(present, key=lambda o, c=col: o[c], reverse=direction == "desc") + absent
        if q.get("limit"):
            offers = offers[: int(q["limit"])]
        return offers

    def _vast_create(self, offer_id: int, body: dict[str, Any], cfg: dict[str, Any]) -> Reply:
        offer = next((o for o in self._vast_offers(cfg) if o.get("id") == offer_id), None)
        error = self.recorded("vast_error_no_such_ask.json")
        error["msg"] = error["msg"].format(id=offer_id)
        if offer is None:
            return Reply(400, error, outcome="not-found", instance_name=body.get("label"))
        if self._no_capacity(cfg, {**offer, "offer_id": offer_id}, _vast_shorthand):
            return Reply(400, error, outcome="no-capacity", instance_name=body.get("label"))
        n = self._next()
        iid = 9100000 + n
        env = body.get("env") if isinstance(body.get("env"), dict) else {}
        self.vast_instances[iid] = {
            "id": iid,
            "ask_contract_id": offer_id,
            "machine_id": offer.get("machine_id"),
            "host_id": offer.get("host_id"),
            "label": body.get("label"),
            "image_uuid": body.get("image"),
            "image_runtype": body.get("runtype", "ssh"),
            "template_hash_id": body.get("template_hash_id"),
            # "loading" while the image is pulled; SkyPilot waits for RUNNING, so this one is never reachable.
            "actual_status": cfg.get("instance_status", "loading"),
            "intended_status": "running",
            "cur_state": "running",
            "next_state": "running",
            "status_msg": "Pulling image",
            "start_date": time.time(),
            "extra_env": [[k, str(v)] for k, v in env.items()],
            "gpu_name": offer.get("gpu_name"),
            "num_gpus": offer.get("num_gpus"),
            "gpu_ram": offer.get("gpu_ram"),
            "gpu_totalram": offer.get("gpu_total_ram"),
            "cpu_name": offer.get("cpu_name"),
            "cpu_cores": offer.get("cpu_cores"),
            "cpu_cores_effective": offer.get("cpu_cores_effective"),
            "cpu_ram": offer.get("cpu_ram"),
            "disk_space": body.get("disk"),
            "dph_base": offer.get("dph_base"),
            "is_bid": body.get("price") is not None,
            "min_bid": offer.get("min_bid"),
            "geolocation": offer.get("geolocation"),
            "reliability2": offer.get("reliability2"),
            "public_ipaddr": None,
            "local_ipaddrs": "",
            "ssh_host": f"ssh{n % 9 + 1}.vast.ai",
            "ssh_idx": str(n % 9 + 1),
            "ssh_port": 20000 + n,
            "ports": {},
            "meetara_created_at": time.time(),
        }
        row = self.vast_instances[iid]
        # what Vast bills by the hour: the bid (interruptible) or the on-demand price (x the scenario's
        # `price_factor`: the host's price moved since the search), plus the disk; its listing's dph_total
        gpu_hour = body["price"] if body.get("price") is not None else float(offer.get("dph_base") or 0)
        disk_hour = float(body.get("disk") or 0) * float(offer.get("storage_cost") or 0) / (30 * 24)
        row["storage_cost"] = offer.get("storage_cost")
        row["storage_total_cost"] = round(disk_hour, 6)
        row["dph_total"] = row["meetara_price_hour"] = round(
            gpu_hour * float(cfg.get("price_factor", 1.0)) + disk_hour, 6
        )
        started = self._start_node("vast", str(iid), cfg, onstart=body.get("onstart"))
        if started is not None:  # the machine is up: SkyPilot finds it where Vast's API says
            row.update(
                actual_status="running", status_msg="success, running", public_ipaddr=started.host,
                ssh_host=started.host, ssh_port=started.port, local_ipaddrs=started.host,
                ports={"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(started.port)}]},
            )  # fmt: skip
        self._save_state()
        return Reply(200, {"success": True, "new_contract": iid}, instance_name=body.get("label"))


RUNPOD_DISK_USD_GB_MONTH = 0.10  # RunPod's container disk price


def _runpod_key(docker_args: str) -> str | None:
    """The public key SkyPilot's RunPod start script (base64 in the docker args) adds to authorized_keys."""
    m = re.search(r"echo ([A-Za-z0-9+/=]{40,}) \| base64 --decode", docker_args)
    if m is None:
        return None
    script = base64.b64decode(m.group(1)).decode(errors="replace")
    k = re.search(r'echo "([^"]+)" >> ~/\.ssh/authorized_keys', script)
    return k.group(1) if k else None


def _lambda_shorthand(m: Any, attrs: dict[str, Any]) -> bool:
    """ "gpu_1x_a10" (every region) or "gpu_1x_a10@us-east-1"."""
    return isinstance(m, str) and m in (
        attrs.get("instance_type"),
        f"{attrs.get('instance_type')}@{attrs.get('region')}",
    )


def _runpod_shorthand(m: Any, attrs: dict[str, Any]) -> bool:
    """A GPU type id, e.g. "NVIDIA GeForce RTX 3090"."""
    return m == attrs.get("gpuTypeId")


def _vast_shorthand(m: Any, attrs: dict[str, Any]) -> bool:
    """An offer id (int or digits), else a GPU name as Vast writes it ("RTX 3090")."""
    if isinstance(m, int) or (isinstance(m, str) and m.isdigit()):
        return int(m) == attrs.get("offer_id")
    return m == attrs.get("gpu_name")


def _vast_condition(value: Any, cond: dict[str, Any]) -> bool:
    checks = {
        "eq": lambda v, x: v == x,
        "neq": lambda v, x: v != x,
        "gt": lambda v, x: v is not None and v > x,
        "gte": lambda v, x: v is not None and v >= x,
        "lt": lambda v, x: v is not None and v < x,
        "lte": lambda v, x: v is not None and v <= x,
        "in": lambda v, x: v in x,
        "notin": lambda v, x: v not in x,
        "nin": lambda v, x: v not in x,
    }
    try:
        return all(checks[op](value, arg) for op, arg in cond.items() if op in checks)
    except TypeError:  # e.g. a string compared with a number: Vast would not match either
        return False


def _exit_with_parent(pid: int) -> None:
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:  # alive, owned by someone else
            pass
        time.sleep(1)


def _redact(obj: Any, marks: dict[str, str]) -> Any:
    """`obj` with every secret value (longest first) replaced by its mark, in keys and values alike."""
    if isinstance(obj, str):
        for secret in sorted(marks, key=len, reverse=True):
            obj = obj.replace(secret, marks[secret])
        return obj
    if isinstance(obj, list):
        return [_redact(v, marks) for v in obj]
    if isinstance(obj, dict):
        return {_redact(k, marks): _redact(v, marks) for k, v in obj.items()}
    return obj


addons = [ProvidersAddon()]
