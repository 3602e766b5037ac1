"""The rate a provider reports billing for a rented machine, beside the planned one.

Each provider's own instance listing (recorded answers served on 127.0.0.1), found by the name SkyPilot
gives a node, read by the SkyPilot backend once per machine from SkyPilot's own job record type; the
money follows the billed rate (a real ledger file), and `meetara status`, `report` and the dashboard show
the difference. The end to end run on a real node (the fake provider billing more than planned) is in
tests/test_cloud_nodes.py.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from test_offers import KEYS, RECORDED, recorded, server  # noqa: F401  (the 127.0.0.1 server fixture)

from budgets import clock, usd_rate
from budgets.caps import BudgetConfig
from budgets.ledger import BILLED_RATE, Ledger
from budgets.report import render_table, report
from launcher import providers
from launcher.offer import ProviderError
from launcher.providers.runpod import container_disk_hour

NODE = "nutrition-7-2ea485ea-head"  # SkyPilot's name for the head node of cluster nutrition-7-2ea485ea
LISTINGS = {
    "vast": (("GET", "/api/v0/instances/"), "vast_instances.json"),
    "runpod": (("POST", "/graphql"), "runpod_pods.json"),
    "lambda": (("GET", "/api/v1/instances"), "lambda_instances.json"),
}


@pytest.fixture
def listed(server, monkeypatch: pytest.MonkeyPatch, tmp_path):  # noqa: F811
    """The three providers' instance listings answered from their recorded bodies, keys set."""
    for provider, (route, name) in LISTINGS.items():
        monkeypatch.setenv(f"MEETARA_{provider.upper()}_API_URL", server.url)
        server.routes[route] = [recorded(name)]
    for var, key in KEYS.items():
        monkeypatch.setenv(var, key)
    # (HOME stays the session's: SkyPilot, imported by the backend test, anchors its paths at HOME then)
    monkeypatch.setenv("MEETARA_HTTP_RETRIES", "0")
    return server


def _row(provider: str) -> dict:
    body = json.loads((RECORDED / LISTINGS[provider][1]).read_text())
    rows = {"vast": lambda: body["instances"], "runpod": lambda: body["data"]["myself"]["pods"]}
    found = rows.get(provider, lambda: body["data"])()
    return next(r for r in found if r.get("label", r.get("name")) == NODE)


def test_each_provider_reports_what_it_bills_for_the_node_skypilot_named(listed) -> None:
    """Vast: the instance's dph_total (GPU bid and disk); RunPod: the pod's costPerHr and its container disk
    as the plan prices it; Lambda: the type's price in cents. Found by name among the user's other
    machines; the key goes in the Authorization header, never in the URL."""
    assert providers.billed_hour("vast", NODE) == pytest.approx(_row("vast")["dph_total"])
    assert providers.billed_hour("runpod", NODE) == pytest.approx(
        _row("runpod")["costPerHr"] + container_disk_hour()
    )
    assert providers.billed_hour("lambda", NODE) == pytest.approx(
        _row("lambda")["instance_type"]["price_cents_per_hour"] / 100
    )
    for provider in LISTINGS:
        assert providers.billed_hour(provider, "someone-else-head") is None
    for req in listed.requests:
        assert req["headers"]["Authorization"].startswith("Bearer ") and "api_key" not in req["query"]
    vast = [r for r in listed.requests if r["path"] == "/api/v0/instances/"]
    assert vast and all(r["query"] == "owner=me" for r in vast)


def test_a_refused_listing_is_a_provider_error_without_the_key(listed) -> None:
    listed.routes[LISTINGS["vast"][0]] = [recorded("vast_401.json", 401)]
    with pytest.raises(ProviderError) as err:
        providers.billed_hour("vast", NODE)
    assert "HTTP 401" in str(err.value) and KEYS["VAST_API_KEY"] not in str(err.value)


def _sky_record(**fields):
    from sky.schemas.api.responses import ManagedJobRecord

    return ManagedJobRecord(job_id=7, job_name="nutrition", **fields)


def test_the_skypilot_backend_asks_once_per_machine_and_again_after_a_failure(listed) -> None:
    """The backend reads the provider and the cluster's name on the cloud from SkyPilot's own job record;
    one listing per machine once listed (a recovery is another machine under the same name); a machine
    not listed yet is asked about again 10 s later, a failed listing a minute later, never a failed
    status."""
    from launcher.backends import skypilot

    backend = skypilot.SkyPilotBackend()
    rec = _sky_record(cloud="Vast", cluster_name_on_cloud=NODE.removesuffix("-head"), recovery_count=0)
    hits = lambda: len([r for r in listed.requests if r["path"] == "/api/v0/instances/"])  # noqa: E731
    assert backend._billed_hour(rec) == pytest.approx(_row("vast")["dph_total"])
    assert backend._billed_hour(rec) == pytest.approx(_row("vast")["dph_total"]) and hits() == 1
    assert (
        backend._billed_hour(_sky_record(cloud="Vast", cluster_name_on_cloud=None)) is None
    )  # no cluster yet
    assert backend._billed_hour(_sky_record(cloud="AWS", cluster_name_on_cloud="x")) is None and hits() == 1

    booting = _sky_record(cloud="Vast", cluster_name_on_cloud="legal-8-2ea485ea", recovery_count=0)
    assert backend._billed_hour(booting) is None and hits() == 2  # not listed (yet)
    assert backend._billed_hour(booting) is None and hits() == 2  # not asked again at once
    _age(backend, booting, skypilot.LISTING_RECHECK_S)
    assert backend._billed_hour(booting) is None and hits() == 3

    listed.routes[LISTINGS["vast"][0]] = [recorded("vast_500.json", 500)]
    recovered = rec.model_copy(update={"recovery_count": 1})
    assert backend._billed_hour(recovered) is None and hits() == 4
    _age(backend, recovered, skypilot.LISTING_RECHECK_S)
    assert backend._billed_hour(recovered) is None and hits() == 4  # a failure waits longer
    _age(backend, recovered, skypilot.BILLED_RETRY_S)
    listed.routes[LISTINGS["vast"][0]] = [recorded("vast_instances.json")]
    assert backend._billed_hour(recovered) == pytest.approx(_row("vast")["dph_total"]) and hits() == 5


def _age(backend, rec, seconds: float) -> None:
    """Make the backend's last listing of `rec`'s machine `seconds` older (instead of waiting that long)."""
    key = (rec.cluster_name_on_cloud, rec.recovery_count)
    at, failed = backend._billed_asked[key]
    backend._billed_asked[key] = (at - seconds, failed)


def test_status_and_the_report_show_billed_beside_planned(tmp_path) -> None:
    """A reservation accrues at the billed rate once reported; the report's `over_plan` is what of the cost
    the provider billed over the planned rate, and status's $/h names both rates."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    t0 = clock.now() - timedelta(hours=2)
    rid = ledger.reserve(
        "r1", "j1", 5.0, provider="vast", gpu="RTX3090", rate_per_hour=1.0, rate_source="live", now=t0
    )
    ledger.start(rid, t0)
    ledger.set_rate(rid, 1.2)
    ledger.record_event("r1", BILLED_RATE, job="j1", reservation_id=rid,
                        detail=json.dumps({"planned_hour": 1.0, "billed_hour": 1.2}))  # fmt: skip
    ledger.accrue_until(rid, t0 + timedelta(hours=1))
    ledger.settle(rid, ended_at=t0 + timedelta(hours=1))
    planned = ledger.reserve(
        "r1", "j2", 1.0, provider="lambda", gpu="A10", rate_per_hour=0.5, rate_source="live", now=t0
    )
    ledger.start(planned, t0)
    ledger.accrue_until(planned, t0 + timedelta(hours=1))
    ledger.settle(planned, ended_at=t0 + timedelta(hours=1))

    rows = {r.key: r for r in report(ledger, "provider")}
    assert rows["vast"].cost == pytest.approx(1.2) and rows["vast"].over_plan == pytest.approx(0.2)
    assert rows["lambda"].cost == pytest.approx(0.5) and rows["lambda"].over_plan == 0
    table = render_table(list(rows.values()), by="provider")
    assert [c.header for c in table.columns][-1] == "over plan"
    assert usd_rate(1.0, 1.2) == "$1.20 billed (+20% on $1.00)" and usd_rate(0.5, None) == "$0.50"
    assert usd_rate(0.5, 0.5) == "$0.50"


def test_a_rate_learnt_after_the_machine_started_reprices_what_was_accrued_since(tmp_path) -> None:
    """The backend tells which machine a job runs on (and the provider what it bills) a poll or more after
    the machine was created: the seconds already accrued since its creation are repriced, once, by one
    correcting accrual dated at that creation; the same rate again changes nothing."""
    ledger = Ledger(tmp_path / "ledger.sqlite", config=BudgetConfig(daily=None, weekly=None, monthly=None))
    t0 = clock.now() - timedelta(hours=3)
    rid = ledger.reserve(
        "r", "j", 10.0, provider="vast", gpu="A10", rate_per_hour=1.0, rate_source="live", now=t0
    )
    ledger.start(rid, t0)
    ledger.accrue_until(rid, t0 + timedelta(hours=1))
    ledger.set_rate(rid, 2.0, since=t0 + timedelta(minutes=30))  # a recovery's machine, from 30 min in
    assert ledger.reservation(rid).accrued == pytest.approx(1.0 + 0.5)
    ledger.set_rate(rid, 2.0, since=t0 + timedelta(minutes=30))
    assert ledger.reservation(rid).accrued == pytest.approx(1.5)
    ledger.accrue_until(rid, t0 + timedelta(hours=2))
    assert ledger.reservation(rid).accrued == pytest.approx(3.5)
    ledger.set_rate(rid, 1.5, since=t0 + timedelta(hours=3))  # a machine newer than what was accrued
    ledger.set_rate(rid, 1.0)  # no `since`: from now on only
    assert ledger.reservation(rid).accrued == pytest.approx(3.5)
    ledger.accrue_until(rid, t0 + timedelta(hours=3))
    assert ledger.reservation(rid).accrued == pytest.approx(4.5)


def test_the_vast_key_is_read_where_vastai_and_skypilot_keep_it(listed, monkeypatch, tmp_path) -> None:
    """vastai 1.9.1 (and so SkyPilot) keeps the key in ~/.config/vastai/vast_api_key: the listing sends it
    from there, as from the older ~/.vast_api_key."""
    monkeypatch.delenv("VAST_API_KEY")
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    (home / ".config" / "vastai").mkdir(parents=True)
    (home / ".config" / "vastai" / "vast_api_key").write_text("vast-from-vastai\n")
    (home / ".vast_api_key").write_text("vast-older-file\n")
    assert providers.api_key("vast") == "vast-from-vastai"
    assert providers.billed_hour("vast", NODE) is not None
    assert listed.requests[-1]["headers"]["Authorization"] == "Bearer vast-from-vastai"
    (home / ".config" / "vastai" / "vast_api_key").unlink()
    assert providers.api_key("vast") == "vast-older-file"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "vastai").mkdir(parents=True)
    (tmp_path / "xdg" / "vastai" / "vast_api_key").write_text("vast-from-xdg\n")
    assert providers.api_key("vast") == "vast-from-xdg"
