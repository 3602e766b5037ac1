"""The provider proxy harness (tests/harness/proxy.py) proven with SkyPilot 0.14.1's own provisioner code.

Each SkyPilot call runs in its own process of this venv's Python (forked from one that has imported SkyPilot)
whose environment is `proxy.env()` plus a throwaway HOME holding fake credentials, as SkyPilot's API server
and its children will have. The requests are
asserted as the fake recorded them. Where SkyPilot sends something surprising, the test pins what it sends
today, so that a fix in meetara can be checked against it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from harness.proxy import RECORDED, ProviderProxy, provider_proxy

LAMBDA_KEY = "lambda-test-key-7Qm2xVr9"
RUNPOD_KEY = "runpod-test-key-4Nf8kLp2"
VAST_KEY = "vast-test-key-9Hs3dWq6"
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMeetaraTestKeyOnlyForTheProxyTests meetara-tests"

# What sky.provision.provisioner.bulk_provision does around one attempt, minus its state bookkeeping: the
# provider's run_instances, and on an error a teardown (an error *there* becomes StopFailoverError and ends
# the failover) before the error goes to the failover handler. Both outcomes are returned.
ATTEMPT = """
def attempt(cloud, region, cluster, config):
    from sky import provision
    from sky.provision import provisioner
    from sky.utils import resources_utils
    out = {}
    try:
        out["record"] = str(provision.run_instances(cloud, region, cluster, cluster, config=config))
    except Exception as e:
        out["error"] = f"{type(e).__module__}.{type(e).__qualname__}: {e}"
        try:
            provisioner.teardown_cluster(cloud, resources_utils.ClusterName(cluster, cluster), terminate=True,
                                         provider_config=config.provider_config)
            out["teardown"] = "ok"
        except Exception as e:
            out["teardown"] = f"{type(e).__qualname__}: {e}"
    return out


def config(node_config, provider_config=None, auth=None):
    from sky.provision import common
    return common.ProvisionConfig(provider_config=provider_config or {}, authentication_config=auth or {},
                                  docker_config={}, node_config=node_config, count=1, tags={},
                                  resume_stopped_nodes=True, ports_to_open_on_launch=None)
"""

VAST_LAUNCH = """
def launch(name, preemptible, instance_type="1x-RTX_3090-32768"):
    from sky.provision.vast import utils
    return utils.launch(name=name, instance_type=instance_type, region="US", disk_size=256, ports=None,
                        image_name="vastai/base:0.0.2", preemptible=preemptible, secure_only=False)
"""


# A long-lived interpreter that has imported SkyPilot's provisioners (the slow part of every SkyPilot
# process: 2-3 s, of which the runpod SDK spends 1.2 s in cpuinfo at import) and forks a fresh child for each
# call: every call is its own process, with nothing cached, started in well under a second.
ZYGOTE = """
import json, os, sys
{prelude}
import sky.provision.lambda_cloud.instance, sky.provision.runpod.instance, sky.provision.vast.instance
import sky.provision.provisioner
for line in sys.stdin:
    code = json.loads(line)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            namespace = {{}}
            exec(code, namespace)
            out = {{"result": namespace["main"]()}}
        except BaseException as e:
            out = {{"raised": f"{{type(e).__module__}}.{{type(e).__qualname__}}", "message": str(e)}}
        sys.stdout.flush()
        with os.fdopen(write_end, "w") as f:
            f.write(json.dumps(out, default=str))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        result = f.read()
    os.waitpid(pid, 0)
    print("@@RESULT@@" + (result or '{{"raised": "died", "message": ""}}'), flush=True)
"""


class SkyProcess:
    """Runs snippets of SkyPilot calls, each in its own process whose environment is proxy.env() + HOME."""

    def __init__(self, proxy: ProviderProxy, home: Path, vast: bool, log: Path) -> None:
        prelude = ""
        if vast:
            # vastai 1.9.1 sends through Session.send(), which ignores REQUESTS_CA_BUNDLE and verifies against
            # certifi.where(), read by requests when it is imported. Only this test driver points it at the
            # proxy's bundle; meetara's SkyPilot plugin makes the product itself trust it.
            prelude = f"import certifi\ncertifi.where = lambda: {str(proxy.ca_bundle)!r}"
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("XDG_CONFIG_HOME", "VAST_API_KEY", "RUNPOD_API_KEY")
        }
        env.update(proxy.env(), HOME=str(home))
        with open(log, "ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-c", ZYGOTE.format(prelude=prelude)], env=env, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
            )  # fmt: skip
        self.log = log
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.process.stdout], daemon=True).start()

    def run(self, body: str, timeout: float = 60) -> dict[str, Any]:
        """{"result": main()}, or {"raised": "module.Type", "message": ...}, for `body` (defines main())."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(ATTEMPT + VAST_LAUNCH + textwrap.dedent(body)) + "\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    state = "exited" if self.process.poll() is not None else f"no answer within {timeout}s"
                    raise AssertionError(
                        f"SkyPilot driver {state}:\n{self.log.read_text()[-5000:]}"
                    ) from None
                continue
            if line.startswith("@@RESULT@@"):
                return json.loads(line[len("@@RESULT@@") :])

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()  # ends its loop
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own group: it and the children it forked
            self.process.wait()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProviderProxy]:
    with provider_proxy(tmp_path_factory.mktemp("proxy")) as p:
        yield p


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME with the fake credentials where SkyPilot and the providers' SDKs read them."""
    home = tmp_path_factory.mktemp("home")
    (home / ".config" / "vastai").mkdir(parents=True)
    (home / ".config" / "vastai" / "vast_api_key").write_text(VAST_KEY + "\n")
    (home / ".lambda_cloud").mkdir()
    (home / ".lambda_cloud" / "lambda_keys").write_text(f"api_key = {LAMBDA_KEY}\n")
    (home / ".runpod").mkdir()
    (home / ".runpod" / "config.toml").write_text(f'[default]\napi_key = "{RUNPOD_KEY}"\n')
    return home


@pytest.fixture(scope="module")
def sky(proxy: ProviderProxy, home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SkyProcess]:
    """SkyPilot calls as Lambda's and RunPod's code runs them: only proxy.env() to reach the proxy."""
    process = SkyProcess(proxy, home, vast=False, log=tmp_path_factory.mktemp("sky") / "stderr.log")
    yield process
    process.close()


@pytest.fixture(scope="module")
def sky_vast(
    proxy: ProviderProxy, home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SkyProcess]:
    """SkyPilot calls for Vast: certifi trusts the proxy too (see SkyProcess)."""
    process = SkyProcess(proxy, home, vast=True, log=tmp_path_factory.mktemp("sky-vast") / "stderr.log")
    yield process
    process.close()


def assert_clean(proxy: ProviderProxy, since: int) -> None:
    """Nothing refused, nothing forwarded, no fake crash; no API key in any file the proxy wrote."""
    assert proxy.unexpected(since) == []
    for name in ("requests.jsonl", "state.json"):
        text = (proxy.work / name).read_text() if (proxy.work / name).exists() else ""
        assert not any(key in text for key in (LAMBDA_KEY, RUNPOD_KEY, VAST_KEY)), name


# ---------------------------------------------------------------- Lambda


def test_lambda_launch_reaches_launch_endpoint_with_type_and_region(
    proxy: ProviderProxy, sky: SkyProcess
) -> None:
    since = proxy.mark()
    # api_key: the fake accepts only this key, so success proves which key was sent without recording it
    proxy.scenario("lambda", "ok", api_key=LAMBDA_KEY, no_capacity=["gpu_1x_a10"])
    out = sky.run("""
        def main():
            from sky.provision.lambda_cloud import instance, lambda_utils
            client = lambda_utils.LambdaCloudClient()
            catalog = client.list_catalog()
            ids = client.create_instances(instance_type="gpu_1x_h100_pcie", region="us-west-3",
                                          name="mt-lam-ok-head", ssh_key_name="sky-key-0a1b")
            statuses = instance.query_instances("mt-lam-ok", "mt-lam-ok", {"region": "us-west-3"})
            return {"regions": {t: [r["name"] for r in v["regions_with_capacity_available"]]
                                for t, v in catalog.items()},
                    "ids": ids, "statuses": {k: str(v[0]) for k, v in statuses.items()}}
        """)["result"]
    assert out["regions"]["gpu_1x_a10"] == []  # the listing follows the scenario, as SkyPilot checks it first
    assert "us-west-3" in out["regions"]["gpu_1x_h100_pcie"]
    launch = proxy.wait_for(lambda r: r["path"] == "/api/v1/instance-operations/launch", "lambda", since)
    assert (
        launch["method"] == "POST"
        and launch["host"] == "cloud.lambdalabs.com"
        and launch["auth"] == "present"
    )
    assert launch["json"] == {
        "region_name": "us-west-3",
        "instance_type_name": "gpu_1x_h100_pcie",
        "ssh_key_names": ["sky-key-0a1b"],
        "quantity": 1,
        "name": "mt-lam-ok-head",
    }
    # created, listed, never reachable: "booting" is SkyPilot's INIT, and there is no IP to SSH to
    assert out["statuses"] == {out["ids"][0]: "ClusterStatus.INIT"}
    [created] = [i for i in proxy.instances("lambda") if i["id"] == out["ids"][0]]
    assert created["status"] == "booting" and created["ip"] is None
    assert_clean(proxy, since)


def test_lambda_no_capacity_mode_fails_before_any_launch_request(
    proxy: ProviderProxy, sky: SkyProcess
) -> None:
    since = proxy.mark()
    proxy.scenario("lambda", "no-capacity")
    out = sky.run("""
        def main():
            from sky.provision.lambda_cloud import lambda_utils
            lambda_utils.LambdaCloudClient().create_instances(instance_type="gpu_1x_a10", region="us-east-1",
                                                              name="mt-lam-none-head", ssh_key_name="k")
        """)
    assert out["raised"] == "sky.provision.lambda_cloud.lambda_utils.LambdaCloudError"
    # SkyPilot's own wording: the failover handler blocks every Lambda region this message does not name
    assert out["message"] == (
        "instance-operations/launch/insufficient-capacity: Not enough capacity to fulfill launch request. "
        "Regions with capacity available: None"
    )
    assert [r["path"] for r in proxy.requests("lambda", since)] == ["/api/v1/instance-types"]
    assert_clean(proxy, since)


def test_lambda_capacity_gone_at_launch_then_other_region_launches(
    proxy: ProviderProxy, sky: SkyProcess
) -> None:
    since = proxy.mark()
    # The listing still shows capacity (it was read a moment earlier); the launch itself is refused.
    proxy.scenario("lambda", "ok", stale_listing=True, no_capacity=["gpu_1x_a10@us-east-1"])
    out = sky.run("""
        def main():
            node = {"InstanceType": "gpu_1x_a10"}
            first = attempt("lambda", "us-east-1", "mt-lam-nc", config(node, auth={"remote_key_name": "k"}))
            from sky.provision.lambda_cloud import lambda_utils
            ids = lambda_utils.LambdaCloudClient().create_instances(
                instance_type="gpu_1x_a10", region="us-west-1", name="mt-lam-nc2-head", ssh_key_name="k")
            return {"first": first, "ids": ids}
        """)["result"]
    assert out["first"] == {
        "error": "sky.provision.lambda_cloud.lambda_utils.LambdaCloudError: "
        "instance-operations/launch/insufficient-capacity: Not enough capacity to fulfill launch request.",
        "teardown": "ok",
    }
    calls = [(r["method"], r["path"], r["status"], r["outcome"]) for r in proxy.requests("lambda", since)]
    assert ("POST", "/api/v1/instance-operations/launch", 400, "no-capacity") in calls
    # SkyPilot's teardown after the failure terminates an empty list of instances
    terminate = proxy.wait_for(lambda r: r["path"].endswith("/terminate"), "lambda", since)
    assert terminate["json"] == {"instance_ids": []} and terminate["status"] == 200
    assert len(out["ids"]) == 1 and calls[-1] == ("POST", "/api/v1/instance-operations/launch", 200, "ok")
    assert_clean(proxy, since)


def test_lambda_bad_key_gets_401_message(proxy: ProviderProxy, sky: SkyProcess) -> None:
    since = proxy.mark()
    proxy.scenario("lambda", "auth-error")
    out = sky.run("""
        def main():
            from sky.provision.lambda_cloud import lambda_utils
            return lambda_utils.LambdaCloudClient().list_instances()
        """)
    assert out == {
        "raised": "sky.provision.lambda_cloud.lambda_utils.LambdaCloudError",
        "message": "global/invalid-api-key: API key was invalid, expired, or deleted.",
    }
    assert [(r["status"], r["outcome"]) for r in proxy.requests("lambda", since)] == [(401, "auth-error")]
    assert_clean(proxy, since)


# ---------------------------------------------------------------- RunPod


def test_runpod_spot_and_on_demand_mutations(proxy: ProviderProxy, sky: SkyProcess) -> None:
    since = proxy.mark()
    proxy.scenario("runpod", "ok", api_key=RUNPOD_KEY)
    out = sky.run(f"""
        def main():
            from sky.provision.runpod import instance, utils
            common = dict(node_type="head", region="US", zone="US-TX-3", image_name="runpod/base:0.0.2",
                          ports=None, public_key={PUBLIC_KEY!r}, docker_login_config=None)
            spot = utils.launch(cluster_name="mt-rp-spot", instance_type="1x_RTX3090_SECURE",
                                disk_size=256, preemptible=True, bid_per_gpu=0.22, **common)
            on_demand = utils.launch(cluster_name="mt-rp-od", instance_type="2x_RTX4090_COMMUNITY",
                                     disk_size=100, preemptible=False, bid_per_gpu=0.0, **common)
            return {{"spot": spot, "on_demand": on_demand, "listed": utils.list_instances()}}
        """)["result"]
    mutations = {
        f: r["graphql"]["args"][f]["input"]
        for r in proxy.requests("runpod", since)
        for f in r["graphql"]["fields"]
        if r["graphql"]["operation"] == "mutation"
    }
    spot = mutations["podRentInterruptable"]
    expected = {
        "name": "mt-rp-spot-head", "gpuTypeId": "NVIDIA GeForce RTX 3090", "bidPerGpu": 0.22, "gpuCount": 1,
        "containerDiskInGb": 256, "cloudType": "SECURE", "countryCode": "US", "dataCenterId": "US-TX-3",
        "minMemoryInGb": 24, "minVcpuCount": 4,
    }  # fmt: skip
    assert {k: spot.get(k) for k in expected} == expected
    on_demand = mutations["podFindAndDeployOnDemand"]
    assert "bidPerGpu" not in on_demand
    assert (
        on_demand["gpuTypeId"],
        on_demand["gpuCount"],
        on_demand["containerDiskInGb"],
        on_demand["cloudType"],
    ) == ("NVIDIA GeForce RTX 4090", 2, 100, "COMMUNITY")
    # listed as RUNNING (SkyPilot's query_instances says UP) but with no public port 22: never reachable
    for pod_id in (out["spot"], out["on_demand"]):
        assert out["listed"][pod_id]["status"] == "RUNNING" and "ssh_port" not in out["listed"][pod_id]
    assert all(r["auth"] == "present" and r["status"] == 200 for r in proxy.requests("runpod", since))
    assert_clean(proxy, since)


def test_runpod_no_spot_capacity_then_teardown_lets_failover_go_on(
    proxy: ProviderProxy, sky: SkyProcess
) -> None:
    since = proxy.mark()
    # per-offer: spot RTX 3090 has no capacity, on-demand RTX 3090 has
    proxy.scenario("runpod", "ok", no_capacity=[{"gpuTypeId": "NVIDIA GeForce RTX 3090", "spot": True}])
    out = sky.run(f"""
        def main():
            node = {{"InstanceType": "1x_RTX3090_SECURE", "DiskSize": 256, "ImageId": "runpod/base:0.0.2",
                    "PublicKey": {PUBLIC_KEY!r}, "Preemptible": True, "BidPerGPU": 0.22}}
            first = attempt("runpod", "US", "mt-rp-nc", config(node, {{"availability_zone": "US-TX-3"}}))
            from sky.provision.runpod import utils
            second = utils.launch(cluster_name="mt-rp-nc2", node_type="head", region="US", zone="US-TX-3",
                                  instance_type="1x_RTX3090_SECURE", disk_size=256, ports=None,
                                  image_name="runpod/base:0.0.2", public_key={PUBLIC_KEY!r},
                                  preemptible=False, bid_per_gpu=0.0, docker_login_config=None)
            return {{"first": first, "second": second}}
        """)["result"]
    # runpod's SDK turns the GraphQL error into QueryError; SkyPilot's default failover handler blocks the
    # zone and goes on
    assert out["first"] == {
        "error": "runpod.error.QueryError: There are no longer any instances available with the requested "
        "specifications. Please refresh and try again.",
        "teardown": "ok",  # with a fake that answered `myself` without pods/podTemplates: StopFailoverError
    }
    records = proxy.requests("runpod", since)
    [refused] = [r for r in records if r["outcome"] == "no-capacity"]
    assert refused["graphql"]["fields"] == ["podRentInterruptable"] and refused["status"] == 200
    teardown_queries = [r["graphql"]["query"] for r in records if r["seq"] > refused["seq"]][:2]
    assert "pods" in teardown_queries[0] and "podTemplates" in teardown_queries[1]
    created = [r for r in records if r["graphql"]["fields"] == ["podFindAndDeployOnDemand"]]
    assert [r["outcome"] for r in created] == ["ok"] and out["second"]
    assert_clean(proxy, since)


@pytest.mark.parametrize(
    ("status", "raised", "message"),
    [
        (401, "runpod.error.AuthenticationError", "Unauthorized request, please check your API key."),
        # a key without the permission: HTTP 200 + GraphQL error, which SkyPilot's retry() does not retry
        (200, "runpod.error.QueryError", "Unauthorized"),
    ],
)
def test_runpod_bad_key(
    proxy: ProviderProxy, sky: SkyProcess, status: int, raised: str, message: str
) -> None:
    since = proxy.mark()
    proxy.scenario("runpod", "auth-error", status=status)
    out = sky.run("""
        def main():
            from sky.provision.runpod import utils
            return utils.list_instances()
        """)
    assert out == {"raised": raised, "message": message}
    assert [(r["status"], r["outcome"]) for r in proxy.requests("runpod", since)] == [(status, "auth-error")]
    assert_clean(proxy, since)


# ---------------------------------------------------------------- Vast


def test_vast_launch_sends_what_vastai_1_9_1_makes_of_skypilots_query(
    proxy: ProviderProxy, sky_vast: SkyProcess
) -> None:
    """Pins an upstream bug: SkyPilot's query never reaches Vast with vastai 1.9.1.

    SkyPilot searches with `chunked=true georegion=true geolocation="US" disk_space>=256 num_gpus=1
    gpu_name="RTX 3090" cpu_ram>="32.0"`; vastai's preprocess_search_query cannot parse the quoted value and
    keeps nothing but the defaults, so the search has no GPU filter and asks for on-demand even for spot. The
    best-"score" offer is rented, here an RTX 4090 for an RTX 3090 plan. Its chunked post-filter also sets
    every offer's min_bid to 0, so a spot create bids $0/h. meetara's SkyPilot plugin is checked against this.
    """
    since = proxy.mark()
    proxy.scenario("vast", "ok", api_key=VAST_KEY)
    out = sky_vast.run("""
        def main():
            return {"spot": launch("mt-vast-spot-head", True), "on_demand": launch("mt-vast-od-head", False)}
        """)["result"]
    records = proxy.requests("vast", since)
    searches = [r["json"] for r in records if r["path"] == "/api/v0/bundles/"]
    defaults_only = {
        "verified": {"eq": True}, "external": {"eq": False}, "rentable": {"eq": True},
        "order": [["score", "desc"]], "type": "on-demand", "allocated_storage": 5.0,
    }  # fmt: skip
    assert searches == [defaults_only, defaults_only]  # no gpu_name, num_gpus, geolocation, disk_space
    creates = {
        r["json"]["label"]: r
        for r in records
        if r["method"] == "PUT" and r["path"].startswith("/api/v0/asks/")
    }
    spot, on_demand = creates["mt-vast-spot-head"], creates["mt-vast-od-head"]
    assert spot["path"] == on_demand["path"] == "/api/v0/asks/31245871/"  # the top score, an RTX 4090
    assert spot["json"]["price"] == 0 and on_demand["json"]["price"] is None
    assert spot["json"]["disk"] == 256 and spot["json"]["image"] == "vastai/base:0.0.2"
    # the API key is written to the instance in plain text; the record shows only where
    assert spot["json"]["onstart"] == 'touch ~/.no_auto_tmux;echo "<api-key>" > ~/.vast_api_key'
    rented = {i["label"]: i for i in proxy.instances("vast")}
    assert rented["mt-vast-spot-head"]["gpu_name"] == "RTX 4090"
    assert rented["mt-vast-spot-head"]["id"] == int(out["spot"])
    assert rented["mt-vast-od-head"]["actual_status"] == "loading"  # never RUNNING: never reachable
    assert_clean(proxy, since)


def test_vast_offer_taken_then_next_offer_rented(proxy: ProviderProxy, sky_vast: SkyProcess) -> None:
    since = proxy.mark()
    proxy.scenario("vast", "ok", no_capacity=[31245871])
    out = sky_vast.run("""
        def main():
            node = {"InstanceType": "1x-RTX_3090-32768", "DiskSize": 256, "ImageId": "vastai/base:0.0.2",
                    "Preemptible": False}
            return attempt("vast", "US", "mt-vast-nc", config(node))
        """)["result"]
    assert out["error"].startswith(
        "requests.exceptions.HTTPError: 400 Client Error: Bad Request for url: "
        "https://console.vast.ai/api/v0/asks/31245871/"
    )
    assert out["teardown"] == "ok"
    [refused] = [r for r in proxy.requests("vast", since) if r["outcome"] == "no-capacity"]
    assert refused["instance_name"] == "mt-vast-nc-head"
    # Every retry would search again and get the same top offer; here it is gone from the market meanwhile.
    offers = json.loads((RECORDED / "vast_bundles.json").read_text())["offers"]
    proxy.scenario("vast", "ok", offers=[o for o in offers if o["id"] != 31245871])
    mid = proxy.mark()
    out = sky_vast.run("""
        def main():
            return launch("mt-vast-nc-head", False)
        """)
    assert "result" in out, out
    [create] = [r for r in proxy.requests("vast", mid) if r["method"] == "PUT"]
    assert create["path"] == "/api/v0/asks/30566120/" and create["outcome"] == "ok"
    assert_clean(proxy, since)


def test_vast_empty_market_and_bad_key(proxy: ProviderProxy, sky_vast: SkyProcess) -> None:
    since = proxy.mark()
    proxy.scenario("vast", "ok", offers=[])
    out = sky_vast.run("""
        def main():
            return launch("mt-vast-empty-head", True)
        """)
    assert out["raised"] == "builtins.RuntimeError"
    assert out["message"].startswith("Failed to create instances, could not find an offer that satisfies")
    proxy.scenario("vast", "auth-error")
    mid = proxy.mark()
    out = sky_vast.run("""
        def main():
            from sky.provision.vast import utils
            return utils.list_instances()
        """)
    assert out["raised"] == "requests.exceptions.HTTPError"
    assert out["message"].startswith(
        "401 Client Error: Unauthorized for url: https://console.vast.ai/api/v1/instances/"
    )
    assert [(r["status"], r["outcome"]) for r in proxy.requests("vast", mid)] == [(401, "auth-error")]
    assert_clean(proxy, since)


# ---------------------------------------------------------------- what is not a provider


def test_unknown_host_is_refused_and_recorded(proxy: ProviderProxy) -> None:
    since = proxy.mark()
    session = requests.Session()
    session.trust_env = False  # only the proxy given here, whatever this test process's environment says
    kwargs: dict[str, Any] = {
        "proxies": {"https": proxy.url, "http": proxy.url},
        "verify": str(proxy.ca_bundle),
        "timeout": 10,
    }
    unknown = session.get("https://api.example.com/v1/anything?x=1", **kwargs)
    assert unknown.status_code == 599 and "refused" in unknown.text
    unknown_path = session.get("https://console.vast.ai/api/v0/not-a-route/", **kwargs)
    assert unknown_path.status_code == 599
    pypi = session.get("https://pypi.org/pypi/skypilot/json", **kwargs)
    assert pypi.status_code == 200 and pypi.json()["info"]["version"] == "0.14.1"
    metadata = session.put("http://169.254.169.254/latest/api/token", **kwargs)
    assert metadata.status_code == 502
    records = proxy.requests(since=since)
    assert [(r["provider"], r["host"], r["path"], r["query"]) for r in records] == [
        ("unknown", "api.example.com", "/v1/anything", {"x": "1"}),
        ("unknown", "console.vast.ai", "/api/v0/not-a-route/", {}),
        ("pypi", "pypi.org", "/pypi/skypilot/json", {}),
        ("aws-metadata", "169.254.169.254", "/latest/api/token", {}),
    ]
    assert len(proxy.unexpected(since)) == 2


def test_nothing_is_forwarded(proxy: ProviderProxy) -> None:
    """A tunnel carrying neither TLS nor HTTP is the one thing the addon cannot answer: mitmproxy would open a
    connection to the real host. It is refused at that point and recorded."""
    since = proxy.mark()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"CONNECT db.example.com:5432 HTTP/1.1\r\nHost: db.example.com:5432\r\n\r\n")
        assert s.recv(1024).startswith(b"HTTP/1.1 200")
        s.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # PostgreSQL's SSLRequest
        assert s.recv(1024) == b""  # closed: nothing came back from anywhere
    record = proxy.wait_for(lambda r: r["provider"] == "forward", since=since)
    assert (record["host"], record["port"], record["outcome"]) == ("db.example.com", 5432, "refused")
    # everything the other tests sent was answered by the addon itself
    assert [r for r in proxy.requests("forward") if r["seq"] <= since] == []
