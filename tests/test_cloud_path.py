"""The cloud path run for real up to each provider's API: `meetara launch --backend skypilot` as a user
types it, meetara's own SkyPilot API server and managed jobs (controller in consolidation mode, meetara's
plugin loaded), SkyPilot's real provisioners for Vast, RunPod and Lambda, and the providers' HTTPS APIs
answered by the recorded fakes behind a real intercepting proxy (tests/harness). Nothing leaves this
machine: the proxy answers everything itself and the tests check it refused nothing.

What is asserted is what the providers were asked (the planned offer, market, bid, disk, region), how
meetara's run ends (exit code, one line) and that the ledger holds nothing reserved afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import closed_port, run_cli
from harness.proxy import ProviderProxy, fake_credentials, provider_proxy
from test_local_backend import wait_for

from budgets.ledger import Ledger

START_TIMEOUT_MIN = 0.75  # cancel a job with no machine after 45 s (SkyPilot retries after 60 s)
DISK_GB = 50  # what tasks/train.yaml asks and meetara's Vast prices include


@dataclass
class Cloud:
    proxy: ProviderProxy
    env: dict[str, str]
    work: Path
    s3: str

    def run(self, *args: str, timeout: float = 300, extra: dict | None = None) -> subprocess.CompletedProcess:
        env = {**self.env, **(extra or {})}
        return run_cli(*args, env=env, cwd=self.work, module="launcher", timeout=timeout)

    def start(self, *args: str, extra: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "launcher", *args],
            cwd=self.work,
            env={**self.env, **(extra or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def plan(self, provider: str | None, extra: dict | None = None) -> list[dict]:
        """The planned offer and its fallbacks, in order, as `meetara plan --json` gives them (one
        provider, or all that the default preferences allow)."""
        only = ("-p", provider) if provider else ()
        r = self.run("plan", "-d", "nutrition", "--backend", "skypilot", *only, "--json", extra=extra)
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout)["jobs"][0]
        return [job["offer"], *job["fallbacks"]]

    def launch(self, provider: str | None, run_id: str) -> list[str]:
        only = ["-p", provider] if provider else []
        return [
            "launch", "-d", "nutrition", "--budget", "1", "-y", "--backend", "skypilot", *only,
            "--store", f"s3://cloud/{run_id}", "--endpoint-url", self.s3, "--run-id", run_id, "--poll", "1",
        ]  # fmt: skip

    def sky_state(self, run_id: str, until: str = "CANCELLED", timeout: float = 120) -> str:
        """SkyPilot's own state of the run's (one) managed job, through meetara's SkyPilot backend,
        polled until it is `until` (a cancel is asynchronous in SkyPilot: CANCELLING, then CANCELLED)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self._sky_state(run_id)
            if state == until or time.monotonic() > deadline:
                return state
            time.sleep(1)

    def _sky_state(self, run_id: str) -> str:
        rec = json.loads((self.work / "state" / "runs" / f"{run_id}.json").read_text())
        (job,) = rec["jobs"].values()
        code = (
            "import sys; from launcher.backends.skypilot import SkyPilotBackend; "
            "print(SkyPilotBackend().status(sys.argv[1]).detail.split(',')[0].split(':')[0])"
        )
        argv = [sys.executable, "-c", code, job["handle"]]
        r = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.strip()

    def interrupt_and_check(self, p: subprocess.Popen, run_id: str, provider: str, mark: int) -> None:
        """Ctrl-C (SIGTERM) the launcher: it exits 75 having cancelled the job, nothing stays reserved,
        the cancel reached SkyPilot (its managed job CANCELLED) and the provider (no instance left), and
        nothing went anywhere the fakes do not answer."""
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=180)
        assert p.returncode == 75, err[-3000:]
        assert "interrupted: cancelled 1 job(s)" in err
        assert self.open_reservations() == []
        assert self.sky_state(run_id) == "CANCELLED"
        deadline = time.monotonic() + 120
        while self.proxy.instances(provider) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert self.proxy.instances(provider) == []
        assert self.proxy.unexpected(mark) == []

    def open_reservations(self) -> list:
        return Ledger(self.work / "state" / "ledger.sqlite").open_reservations()


def _stop_sky(env: dict[str, str], runtime: Path) -> None:
    """Stop meetara's SkyPilot API server, then kill, by PID, whatever still runs from its runtime dir
    (jobs controllers, request workers) until nothing does."""
    from conftest import stop_skypilot_under

    stop = [sys.executable, "-m", "launcher", "sky", "stop"]
    with contextlib.suppress(subprocess.TimeoutExpired):  # what is left is killed below
        subprocess.run(stop, env=env, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while stop_skypilot_under(runtime) and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory, s3_server: str):
    import boto3

    work = tmp_path_factory.mktemp("cloud")
    home = work / "home"
    fake_credentials(home)
    (work / "prefs.yaml").write_text(f"start_timeout_minutes: {START_TIMEOUT_MIN}\n")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="cloud")
    with provider_proxy(work) as proxy:
        env = {
            **os.environ,
            **proxy.env(),
            "HOME": str(home),
            "MEETARA_STATE_DIR": str(work / "state"),
            "MEETARA_SKY_PORT": str(closed_port()),
            "MEETARA_CONFIG": str(work / "prefs.yaml"),
            "COLUMNS": "200",
        }
        try:
            yield Cloud(proxy, env, work, s3_server)
        finally:
            _stop_sky(env, work / "state" / "sky")


def _vast_offers(planned: list[dict], template: dict) -> list[dict]:
    """Vast search rows for the planned offers (their ids, GPU, prices), shaped like a recorded row: one row
    per machine, its on-demand price and its minimum bid as meetara priced them (less the disk, which Vast
    bills on top at storage_cost)."""
    from launcher.skycatalog import VAST_GPU_NAMES, _vast_name

    disk_hour = DISK_GB * 0.15 / 720
    rows: dict[int, dict] = {}
    for o in planned:
        vid = int(o["instance_type"])
        row = rows.get(vid)
        if row is None:
            row = rows[vid] = copy.deepcopy(template)
            row.update(
                id=vid,
                ask_contract_id=vid,
                gpu_name=VAST_GPU_NAMES.get(o["gpu"]) or _vast_name(o["gpu"]),
                num_gpus=o["gpu_count"],
                storage_cost=0.15,
                min_bid=0.05,
                dph_base=o["price_hour"],
                dph_total=o["price_hour"],
            )
        if o["spot"]:
            row["min_bid"] = round(o["price_hour"] - disk_hour, 4)
        else:
            row["dph_base"] = row["dph_total"] = round(o["price_hour"] - disk_hour, 6)
    return list(rows.values())


def _template() -> dict:
    from harness.proxy import RECORDED

    return json.loads((RECORDED / "vast_bundles.json").read_text())["offers"][0]


def _creates(proxy: ProviderProxy, since: int) -> list[dict]:
    return [
        r
        for r in proxy.requests("vast", since)
        if r["method"] == "PUT" and r["path"].rstrip("/").split("/")[-2] == "asks"
    ]


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


def test_no_capacity_anywhere_ends_in_one_line_and_reserves_nothing(cloud: Cloud) -> None:
    """Issue 19's reproduction, as typed there (default preferences, every provider): the launch reaches
    Vast's API for exactly the planned Vast offers, in plan order, spot as bids; every provider refuses
    for lack of capacity; meetara cancels the job after start_timeout_minutes, releases the money and
    exits 4 with one line."""
    everything = cloud.plan(None)
    assert everything[0]["provider"] == "vast" and everything[0]["spot"]  # the cheapest: a Vast bid
    planned = [o for o in everything if o["provider"] == "vast"]
    cloud.proxy.set_scenario(
        {
            "vast": {"mode": "no-capacity", "offers": _vast_offers(planned, _template())},
            "runpod": {"mode": "no-capacity"},
            "lambda": {"mode": "no-capacity"},
        }
    )
    mark = cloud.proxy.mark()
    r = cloud.run(*cloud.launch(None, "nocap"), timeout=400)
    line = _one_error_line(r.stderr)
    assert r.returncode == 4, r.stderr[-3000:]
    assert "no machine" in line and "no job ran and their money is released" in line
    assert cloud.open_reservations() == []

    searches = [
        r for r in cloud.proxy.requests("vast", mark) if r["method"] == "POST" and "bundles" in r["path"]
    ]
    searched = [s["json"]["id"]["eq"] for s in searches if "id" in (s["json"] or {})]
    ids = [int(o["instance_type"]) for o in planned]
    # the planned offer first, then the fallbacks, in order (a machine planned spot and on-demand is asked
    # for twice); a loaded machine's controller may not reach the last ones within the 45 s
    reached = searched[: len(ids)]
    assert len(reached) >= 4 and reached == ids[: len(reached)], searched
    for s, o in zip(searches, planned, strict=False):
        assert s["json"]["type"] == ("bid" if o["spot"] else "on-demand")
        assert s["json"]["allocated_storage"] == DISK_GB
    created = [int(c["path"].rstrip("/").split("/")[-1]) for c in _creates(cloud.proxy, mark)]
    assert created[: len(reached)] == reached, created
    assert all(c["outcome"] == "no-capacity" for c in _creates(cloud.proxy, mark))
    assert all(c["outcome"] == "no-capacity" for c in _runpod_creates(cloud.proxy, mark))
    assert cloud.proxy.unexpected(mark) == []
    cloud.proxy.set_scenario({})  # the next tests choose their own answers


def test_vast_rents_the_planned_offer_at_the_planned_bid_and_a_cancel_settles(cloud: Cloud) -> None:
    """The create names the planned offer id with the planned bid and disk, and no API key in its start
    script; Ctrl-C (SIGTERM) then cancels the managed job in SkyPilot and nothing stays reserved."""
    planned = cloud.plan("vast")
    first = planned[0]
    assert first["spot"], first  # the default plan rents Vast interruptible
    cloud.proxy.scenario("vast", "ok", offers=_vast_offers(planned, _template()))
    mark = cloud.proxy.mark()
    p = cloud.start(*cloud.launch("vast", "vast-ok"))
    try:
        create = cloud.proxy.wait_for(
            lambda r: r["method"] == "PUT" and "/asks/" in r["path"], provider="vast", since=mark, timeout=120
        )
    except AssertionError:
        p.kill()
        raise AssertionError(p.communicate()[1][-3000:]) from None
    body = create["json"]
    assert int(create["path"].rstrip("/").split("/")[-1]) == int(first["instance_type"])
    bid = round(first["price_hour"] - DISK_GB * 0.15 / 720, 4)
    assert body["price"] == pytest.approx(bid, abs=1e-4)  # a bid, at the planned price, not 0 or null
    assert body["disk"] == DISK_GB
    assert "fake-vast-key" not in json.dumps(body) and "vast_api_key" not in body.get("onstart", "")
    assert create["outcome"] == "ok"
    record = cloud.work / "state" / "runs" / "vast-ok.json"

    def machine_seen() -> bool:  # the launcher found the instance in Vast's listing: billing started
        assert p.poll() is None, p.communicate()[1][-3000:]
        jobs = json.loads(record.read_text())["jobs"].values() if record.exists() else []
        return any(j.get("started_at") for j in jobs)

    wait_for(machine_seen, timeout=60, what="the launcher to see the instance Vast created")
    cloud.interrupt_and_check(p, "vast-ok", "vast", mark)
    assert any(r["method"] == "DELETE" for r in cloud.proxy.requests("vast", mark))
    # Vast created the instance and billed it until its delete, though it never booted: meetara saw it in
    # Vast's instance listing and paid, at the rate Vast bills (the planned one), from SkyPilot's record of
    # the cluster (just before the create) to its teardown after the cancel (the launcher waits for it)
    bill = cloud.proxy.billed("vast")[-1]
    (res,) = Ledger(cloud.work / "state" / "ledger.sqlite").reservations("vast-ok")
    _paid_as_billed(res, bill)


def test_a_machine_billed_past_its_reservations_margin_is_stopped(cloud: Cloud) -> None:
    """The Vast host's price rose by half since the search (past the quarter a reservation adds to the
    plan): Vast lists the instance it created at that rate (it bills from the create, while the machine
    boots); meetara reads it, stops the launch at once with one line naming the provider and both rates,
    pays the instance's minutes at the billed rate and leaves nothing running or reserved."""
    planned = cloud.plan("vast")
    earlier = len(cloud.proxy.billed("vast"))
    cloud.proxy.scenario("vast", "ok", offers=_vast_offers(planned, _template()), price_factor=1.5)
    mark = cloud.proxy.mark()
    r = cloud.run(*cloud.launch("vast", "vast-dear"), timeout=400)
    line = _one_error_line(r.stderr)
    assert r.returncode == 1, r.stderr[-3000:]
    assert line.startswith("error: stopped: budget: vast bills $") and "over the planned" in line, line
    (job,) = json.loads(cloud.run("status", "vast-dear", "--json").stdout)
    assert job["state"] == "STOPPED-BUDGET" and job["planned_hour"] == pytest.approx(planned[0]["price_hour"])
    assert job["billed_hour"] > job["planned_hour"] * 1.25, job
    assert cloud.open_reservations() == []
    assert cloud.sky_state("vast-dear") == "CANCELLED"
    deadline = time.monotonic() + 120
    while cloud.proxy.instances("vast") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cloud.proxy.instances("vast") == []
    (bill,) = cloud.proxy.billed("vast")[earlier:]
    assert bill["price_hour"] == pytest.approx(job["billed_hour"], abs=1e-6)
    ledger = Ledger(cloud.work / "state" / "ledger.sqlite")
    (res,) = ledger.reservations("vast-dear")
    _paid_as_billed(res, bill)
    kinds = [e.kind for e in ledger.events() if e.run_id == "vast-dear"]
    assert "billed-rate" in kinds and "stopped-budget" in kinds
    assert cloud.proxy.unexpected(mark) == []


def _paid_as_billed(res, bill: dict) -> None:
    """The reservation settled what the fake billed for the instance, from its create to its delete, at
    its rate: SkyPilot's cluster record starts just before the create and ends just after the delete, in
    whole seconds (so up to 2 s more)."""
    assert res.state == "settled" and res.rate_per_hour == pytest.approx(bill["price_hour"]), (res, bill)
    assert res.started_at.timestamp() <= bill["created_at"] + 1, (res, bill)
    assert bill["ended_at"] - 1 <= res.ended_at.timestamp() <= bill["ended_at"] + 3, (res, bill)
    assert res.settled_amount == pytest.approx(bill["usd"], abs=bill["price_hour"] * 3 / 3600 + 1e-6), (
        res,
        bill,
    )


RUNPOD_CREATES = ("podRentInterruptable", "podFindAndDeployOnDemand")


def _runpod_creates(proxy: ProviderProxy, since: int) -> list[dict]:
    """RunPod's create mutations since `since`, each with `input`: the mutation's arguments."""
    out = []
    for r in proxy.requests("runpod", since):
        args = (r.get("graphql") or {}).get("args") or {}
        for name in RUNPOD_CREATES:
            if name in args:
                out.append({**r, "mutation": name, "input": args[name]["input"]})
    return out


def test_runpod_no_capacity_on_the_first_offer_moves_to_the_second(cloud: Cloud) -> None:
    """RunPod (the bundled offers are on-demand): the planned pod is asked for first (GPU type, data
    centre, secure cloud, disk, one GPU); RunPod says no capacity; SkyPilot goes on to meetara's next
    ordered offer. A cancel then ends it in SkyPilot and at RunPod, and nothing stays reserved."""
    planned = cloud.plan("runpod")
    first, second = planned[0], planned[1]
    assert not first["spot"] and not second["spot"]
    cloud.proxy.scenario(
        "runpod", "ok", no_capacity=[{"gpuTypeId": first["instance_type"], "dataCenterId": first["region"]}]
    )
    mark = cloud.proxy.mark()
    p = cloud.start(*cloud.launch("runpod", "runpod-fallback"))
    try:
        cloud.proxy.wait_for(
            lambda r: (
                r.get("outcome") == "ok"
                and any(x["seq"] == r["seq"] for x in _runpod_creates(cloud.proxy, mark))
            ),
            provider="runpod",
            since=mark,
            timeout=120,
        )
    except AssertionError:
        p.kill()
        raise AssertionError(p.communicate()[1][-3000:]) from None
    creates = _runpod_creates(cloud.proxy, mark)
    asked = [c["input"] for c in creates]
    assert [c["mutation"] for c in creates[:2]] == ["podFindAndDeployOnDemand"] * 2
    assert [(a["gpuTypeId"], a["dataCenterId"]) for a in asked[:2]] == [
        (first["instance_type"], first["region"]),
        (second["instance_type"], second["region"]),
    ]
    assert [c["outcome"] for c in creates[:2]] == ["no-capacity", "ok"]
    for a, o in zip(asked[:2], (first, second), strict=True):
        assert "bidPerGpu" not in a
        assert a["gpuCount"] == o["gpu_count"] and a["containerDiskInGb"] == DISK_GB
        assert a["cloudType"] == "SECURE"

    cloud.interrupt_and_check(p, "runpod-fallback", "runpod", mark)


def test_lambda_auth_error_is_one_line_naming_the_provider_and_reserves_nothing(cloud: Cloud) -> None:
    cloud.proxy.scenario("lambda", "auth-error")
    mark = cloud.proxy.mark()
    r = cloud.run(*cloud.launch("lambda", "lambda-auth"), timeout=400)
    line = _one_error_line(r.stderr)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "lambda refused the credentials" in line and "~/.lambda_cloud/lambda_keys" in line, line
    assert cloud.open_reservations() == []
    assert cloud.proxy.requests("lambda", mark), "SkyPilot never asked Lambda"
    assert all(x["outcome"] == "auth-error" for x in cloud.proxy.requests("lambda", mark))
    assert cloud.proxy.unexpected(mark) == []


def test_lambda_launches_the_planned_type_and_region_after_a_capacity_refusal(cloud: Cloud) -> None:
    """Lambda (on-demand): no capacity for the planned type in the planned region moves SkyPilot to
    meetara's next ordered offer, launched with exactly its type and region; a cancel ends it and
    terminates the instance, and nothing stays reserved."""
    planned = cloud.plan("lambda")
    first, second = planned[0], planned[1]
    cloud.proxy.scenario("lambda", "ok", no_capacity=[f"{first['instance_type']}@{first['region']}"])
    mark = cloud.proxy.mark()
    p = cloud.start(*cloud.launch("lambda", "lambda-fallback"))

    def launched(r: dict) -> bool:
        return (
            r["method"] == "POST"
            and r["path"].endswith("/instance-operations/launch")
            and r["outcome"] == "ok"
        )

    try:
        cloud.proxy.wait_for(launched, provider="lambda", since=mark, timeout=120)
    except AssertionError:
        p.kill()
        raise AssertionError(p.communicate()[1][-3000:]) from None
    launches = [
        r
        for r in cloud.proxy.requests("lambda", mark)
        if r["method"] == "POST" and r["path"].endswith("/instance-operations/launch")
    ]
    asked = [(x["json"]["instance_type_name"], x["json"]["region_name"]) for x in launches]
    # Lambda lists where each type has capacity; SkyPilot launches only there, so the planned offer's
    # refusal is its absence from that listing (asked for first), and the launch goes to the next offer
    listings = [r for r in cloud.proxy.requests("lambda", mark) if r["path"].endswith("/instance-types")]
    assert listings and listings[0]["seq"] < launches[0]["seq"]
    assert asked[0] == (second["instance_type"], second["region"]), asked
    assert (first["instance_type"], first["region"]) not in asked
    assert launches[0]["outcome"] == "ok"
    assert all(x["json"]["quantity"] == 1 for x in launches)

    cloud.interrupt_and_check(p, "lambda-fallback", "lambda", mark)
