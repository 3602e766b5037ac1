"""The cloud path on machines meetara really rents: each fake provider's instance is a real SSH node on this
machine (tests/harness/node.py), so SkyPilot's own provisioner reaches it over SSH, sets up its runtime (uv,
ray, the skylet), runs meetara's task, and its jobs controller follows, recovers and tears it down.

`meetara launch --backend skypilot` runs as a user types it, against meetara's own SkyPilot API server with
managed jobs (consolidation mode, meetara's plugin), the providers' APIs answered by the fakes behind the
intercepting proxy, and a real S3 server (moto) that the job on the node writes its checkpoints, GGUF files
and manifests to. Nothing is mocked on SkyPilot's side.

The first node sets up SkyPilot's runtime from PyPI (as a fresh rented machine does); it is then kept as a
provider image (a snapshot of its runtime venv) that later nodes start from, as SkyPilot's own images do.
Nodes share ray's fixed ports, so these tests run one node at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import closed_port
from harness import node as nodes
from harness.proxy import fake_credentials, provider_proxy
from test_cloud_path import Cloud, _stop_sky, _template, _vast_offers

from budgets.ledger import Ledger

REPO = Path(__file__).resolve().parents[1]
UV_CACHE = REPO / ".cache" / "uv"  # SkyPilot's runtime wheels: kept between runs on a developer's machine
PREFS = {"start_timeout_minutes": 15, "job_startup_minutes": 10}
TRAIN = ("--base-model", "tiny", "--samples", "16", "--epochs", "1")


def _launch(cloud: Cloud, provider: str, run: str, *train: str) -> list[str]:
    """`meetara launch` of one tiny domain on `provider`, pulled into models-<run> (runs do not share it)."""
    return [*cloud.launch(provider, run), "--models-dir", f"models-{run}", *(train or TRAIN)]


def _manifest(cloud: Cloud, run: str) -> dict:
    return json.loads((cloud.work / f"models-{run}" / "nutrition" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory, s3_server: str):
    import boto3

    work = tmp_path_factory.mktemp("nodes")
    home = work / "home"
    fake_credentials(home)
    (work / "prefs.yaml").write_text("".join(f"{k}: {v}\n" for k, v in PREFS.items()))
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="cloud")
    registry = work / "nodes.jsonl"
    UV_CACHE.mkdir(parents=True, exist_ok=True)
    with provider_proxy(work) as proxy:
        env = {
            **os.environ,
            **proxy.env(),
            "HOME": str(home),
            "MEETARA_STATE_DIR": str(work / "state"),
            "MEETARA_SKY_PORT": str(_port()),
            "MEETARA_CONFIG": str(work / "prefs.yaml"),
            "COLUMNS": "200",
        }
        c = Cloud(proxy, env, work, s3_server)
        c.node_opts = {
            "dir": str(work / "machines"),
            "registry": str(registry),
            "user_env": sys.prefix,  # ~/sky-user-env: the task's setup finds the training deps installed
            "uv": str(Path(sys.prefix) / "bin" / "uv"),
            "image": str(work / "image"),
            "env": {
                "UV_CACHE_DIR": str(UV_CACHE),
                "SSL_CERT_FILE": os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
            },
        }
        try:
            yield c
        finally:
            try:
                _stop_sky(env, work / "state" / "sky")
            finally:
                nodes.stop_all(registry)


def _port() -> int:
    port = closed_port()
    while port in nodes.RESERVED_PORTS:
        port = closed_port()
    return port


def _ledger(cloud: Cloud) -> Ledger:
    return Ledger(cloud.work / "state" / "ledger.sqlite")


def _settled(cloud: Cloud, run_id: str) -> float:
    return sum(r.settled_amount or 0.0 for r in _ledger(cloud).reservations(run_id))


def _creates(cloud: Cloud, mark: int) -> list[dict]:
    return [x for x in cloud.proxy.requests("vast", mark) if x["method"] == "PUT" and "/asks/" in x["path"]]


def test_vast_end_to_end_on_rented_nodes_with_a_real_preemption(cloud: Cloud) -> None:
    """Vast end to end, preempted for real. The planned offer is rented; SkyPilot reaches the node over
    SSH and sets its runtime up; the task's setup finds the training dependencies; `python -m train`
    checkpoints to S3 from the node. Then the node is killed mid-training (every process at once):
    SkyPilot's controller sees the machine gone and relaunches on the plan's next offer (not the one
    preempted), the job resumes from its newest checkpoint, SUCCEEDS, meetara pulls and verifies the
    domain, `meetara status` counts the preemption, nothing is left running or reserved, and the ledger
    paid for every minute the provider billed, from each machine's creation to its teardown."""
    from train import checkpoint
    from train.pipeline import domain_prefix
    from train.store import open_store

    run = "vast-node"
    planned = cloud.plan("vast")
    market = [(o["instance_type"], o["spot"]) for o in planned[:2]]
    assert planned[0]["spot"] and market[0] != market[1], planned[:2]
    cloud.proxy.scenario("vast", "ok", offers=_vast_offers(planned, _template()), node=cloud.node_opts)
    mark = cloud.proxy.mark()
    t0 = time.monotonic()
    p = cloud.start(*_launch(cloud, "vast", run, "--base-model", "tiny", "--samples", "96", "--epochs", "3"))
    store = open_store(f"s3://cloud/{run}", endpoint_url=cloud.s3)
    prefix = f"{domain_prefix(run, 'nutrition')}/checkpoints"
    deadline = time.monotonic() + 1200
    while checkpoint.latest(store, prefix) is None:  # training on the node, its first checkpoint in S3
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 20 min"
        time.sleep(1)
    t_first = time.monotonic() - t0
    (first,) = cloud.proxy.nodes("vast")
    assert int(_creates(cloud, mark)[0]["path"].rstrip("/").split("/")[-1]) == int(
        planned[0]["instance_type"]
    )
    node = nodes.Node.from_json(json.dumps({k: first[k] for k in nodes.Node.__dataclass_fields__}))
    assert nodes.stop(node) > 0  # the machine is gone
    newest = checkpoint.latest(store, prefix)
    t_kill = time.time()
    out, err = p.communicate(timeout=1500)
    assert p.returncode == 0, (out[-3000:], err[-5000:])
    print(f"vast: launch -> first checkpoint {t_first:.0f} s, -> pulled {time.monotonic() - t0:.0f} s")

    creates = _creates(cloud, mark)
    assert len(creates) == 2, [c["path"] for c in creates]
    searches = [
        x for x in cloud.proxy.requests("vast", mark) if x["method"] == "POST" and "bundles" in x["path"]
    ]
    second_search = [s for s in searches if s["seq"] < creates[1]["seq"]][-1]
    # the relaunch went to the plan's next offer (its machine and its market), not the preempted one
    assert int(creates[1]["path"].rstrip("/").split("/")[-1]) == int(planned[1]["instance_type"])
    assert second_search["json"]["type"] == ("bid" if planned[1]["spot"] else "on-demand")

    manifest = _manifest(cloud, run)
    assert manifest["validation"]["passed"]
    m = manifest["metrics"]
    # resumed from the newest checkpoint the killed node had written: checkpoints come every
    # `checkpoint_interval` steps, so fewer steps than that were redone
    assert m["resumed_from_step"] == newest.step > 0 and m["checkpoint_interval"] >= 1, m
    (job,) = json.loads(cloud.run("status", run, "--json").stdout)
    assert (job["state"], job["preemptions"]) == ("SUCCEEDED", 1), job
    assert _ledger(cloud).open_reservations() == []
    assert cloud.proxy.instances("vast") == [] and cloud.proxy.nodes("vast") == []  # torn down
    billed = cloud.proxy.billed("vast")
    assert len(billed) == 2 and billed[1]["created_at"] > t_kill - 1
    assert [b["price_hour"] for b in billed] == pytest.approx(
        [o["price_hour"] for o in planned[:2]], abs=1e-6
    )
    # the ledger paid for the machine time the provider billed (SkyPilot's record of each machine starts
    # just before its create and ends just after its delete), at each machine's price: meetara follows
    # the relaunch to its offer's rate at its next poll, so a few seconds may be at the old rate
    res = _ledger(cloud).reservations(run)[0]
    paid_s = res.ended_at.timestamp() - res.started_at.timestamp()
    billed_s = billed[-1]["ended_at"] - billed[0]["created_at"]
    assert billed_s <= paid_s + 1 <= billed_s + 61, (billed, res)
    settled, owed = _settled(cloud, run), sum(b["usd"] for b in billed)
    assert settled == pytest.approx(owed, abs=0.0005), (billed, settled)
    assert cloud.proxy.unexpected(mark) == []


DASHBOARD_RUN_PAGE = (
    "import sys; from launcher import api; from launcher.dashboard import views; "
    "print(views.run_page(api.run_detail(sys.argv[1]).model_dump(mode='json')))"
)
# RunPod's price went up a tenth since the offers were fetched: within the reservation's margin
PRICE_FACTOR = {"runpod": 1.1, "lambda": 1.0}


@pytest.mark.parametrize("provider", ["runpod", "lambda"])
def test_runpod_and_lambda_run_the_task_on_a_rented_node(cloud: Cloud, provider: str) -> None:
    """RunPod (its pod's public port 22, as root) and Lambda (port 22 of its instance's address, as
    `ubuntu`) rent a node too: SkyPilot reaches it, sets its runtime up (from the provider image made by the
    first node), runs the task, and meetara pulls the domain and settles what the provider billed. RunPod
    bills a tenth more than planned (its price rose since the offers were fetched): meetara reads the rate
    from RunPod's pod listing, pays at it, and status and the report show the difference."""
    run = f"{provider}-node"
    planned = cloud.plan(provider)
    factor = PRICE_FACTOR[provider]
    moved = {"price_factor": factor} if factor != 1 else {}
    cloud.proxy.scenario(provider, "ok", node=cloud.node_opts, **moved)
    mark = cloud.proxy.mark()
    t0 = time.monotonic()
    r = cloud.run(*_launch(cloud, provider, run), timeout=1500)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    print(f"{provider} launch -> pulled: {time.monotonic() - t0:.0f} s")
    manifest = _manifest(cloud, run)
    assert manifest["run_id"] == run and manifest["validation"]["passed"]
    assert _ledger(cloud).open_reservations() == []
    assert cloud.proxy.instances(provider) == [] and cloud.proxy.nodes(provider) == []
    (bill,) = cloud.proxy.billed(provider)
    planned_hour = planned[0]["price_hour"]
    if factor == 1:
        assert bill["price_hour"] == pytest.approx(planned_hour, abs=1e-6)
    else:  # the GPUs' price rose by the factor; the disk's did not
        assert planned_hour < bill["price_hour"] < planned_hour * factor, (bill, planned_hour)
    (job,) = json.loads(cloud.run("status", run, "--json").stdout)
    assert job["planned_hour"] == pytest.approx(planned_hour) and job["billed_hour"] == pytest.approx(
        bill["price_hour"]
    )
    # the machine time the ledger paid for, at the billed rate, covers what the provider billed, from
    # creation to teardown
    paid_s = _settled(cloud, run) / bill["price_hour"] * 3600
    billed_s = bill["ended_at"] - bill["created_at"]
    assert billed_s <= paid_s + 1 <= billed_s + 121, (bill, paid_s)
    table = cloud.run("status", run).stdout
    (rep,) = [
        r for r in json.loads(cloud.run("report", "--by", "run", "--json").stdout)["rows"] if r["run"] == run
    ]
    # the dashboard's run page, from the same run record and ledger
    page = subprocess.run(
        [sys.executable, "-c", DASHBOARD_RUN_PAGE, run],
        env=cloud.env,
        cwd=cloud.work,
        capture_output=True,
        text=True,
    )
    assert page.returncode == 0, page.stderr[-2000:]
    if factor == 1:
        assert "billed (" not in table and rep["over_plan"] == 0 and "billed (" not in page.stdout
    else:
        shown = f"billed ({(bill['price_hour'] - planned_hour) / planned_hour:+.0%} on"
        assert shown in table and shown in page.stdout, table
        over = _settled(cloud, run) * (1 - planned_hour / bill["price_hour"])
        assert rep["over_plan"] == pytest.approx(over, abs=1e-5), rep
    assert cloud.proxy.unexpected(mark) == []
