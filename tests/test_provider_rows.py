"""Provider rows as they really come, and meetara's offers through SkyPilot 0.14.1's own code (issue 13).

Part 1 (no SkyPilot): rows with CPU or RAM missing keep their offer, GPU memory is the model's nominal
size, host memory is GiB for every provider, GPU variants stay apart, and the disk a Vast price includes
is the disk the task asks for.

Part 2: every offer parsed from the recorded responses (tests/recorded/{vast_bundles,runpod_gpu_types,
lambda_instance_types}.json) goes the way a launch goes: OfferRefs of a plan -> the catalogs
`launcher/backends/skypilot.py` writes (`offers_from_refs`) and the task `launcher/task.py` renders ->
SkyPilot's own task parser, catalog readers, failover zone loop, deploy variables and provisioner
(`sky/provision/{vast,runpod,lambda_cloud}`), down to the request each would send, answered by fakes at
the SDK's HTTP layer. For Vast that is the path with meetara's plugin (launcher/skyplugin.py), which
replaces SkyPilot's offer search by a search for the planned offer id; SkyPilot's own reading of the
instance type and region (GPU name, count, country) is checked as well, from the query SkyPilot builds.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from launcher.offers import Offer, load_snapshot, nominal_gpu_mem_gb, normalize_gpu
from launcher.plan import JobPlan, OfferRef, Plan, Workload
from launcher.preferences import Preferences
from launcher.providers import lambda_cloud, runpod, vast
from launcher.select import Choice, Needs, rank, why_excluded
from launcher.skycatalog import (
    build_catalog,
    machine_shape,
    offers_from_refs,
    offline_sky,
    sky_accelerator,
    vast_gpu_name,
    write_catalogs,
)

RECORDED = Path(__file__).parent / "recorded"
pytestmark = pytest.mark.usefixtures("no_network")


def body(name: str) -> dict:
    return json.loads((RECORDED / name).read_text(encoding="utf-8"))


VAST_ROWS = {str(r["id"]): r for r in body("vast_bundles.json")["offers"]}
# The country of each recorded Vast host, read by hand from its `geolocation` ("ZZ": none given)
VAST_COUNTRY = {
    "31245871": "US",  # "Texas, US"
    "31019577": "US",
    "31188725": "US",
    "30455018": "US",
    "31350882": "NO",  # "Norway, NO"
    "30566120": "ZZ",  # null
    "30688413": "SE",  # "Sweden"
    "31402291": "CA",
    "30914476": "DE",
    "31077310": "BG",  # "Sofia-Capital, BG"
    "30871529": "JP",  # "Yutakachō, Shinagawa District, Tokyo, JP"
    "30790104": "US",
    "31120458": "US",  # "United States, US"
}


@pytest.fixture(scope="module")
def recorded() -> dict[str, list[Offer]]:
    return {
        "vast": vast.parse_response(body("vast_bundles.json")).offers,
        "runpod": runpod.parse_response(body("runpod_gpu_types.json")).offers,
        "lambda": lambda_cloud.parse_response(body("lambda_instance_types.json")).offers,
    }


def by_id(offers: list[Offer]) -> dict[str, Offer]:
    return {o.instance_type: o for o in offers}


# --- Part 1: provider rows as they come ----------------------------------------------------------


def test_vast_rows_without_cores_or_ram_keep_their_offer() -> None:
    fetched = vast.parse_response(body("vast_bad_rows.json"))
    offers = by_id(fetched.offers)
    # skipped: a price that is not a number, no GPU memory, a null row; kept: no core count (null or 0)
    assert sorted(offers) == ["30111111", "30222222", "31188725", "31245871"]
    assert fetched.bad_rows == 3
    null_cores, zero_cores = offers["30111111"], offers["30222222"]
    # the rental's 8 effective cores are known; its share of the host's RAM is not: 0, unknown
    assert (null_cores.vcpus, null_cores.mem_gib) == (8, 0.0)
    assert (zero_cores.vcpus, zero_cores.mem_gib) == (0, 0.0)
    for o in (null_cores, zero_cores):
        assert (o.gpu, o.gpu_mem_gb, o.price_hour, o.spot_price_hour) == ("RTX4090", 24, 0.35, 0.18)
        assert o.disk_price_hour == pytest.approx(vast.DISK_GB * 0.1 / 720, abs=1e-6)
        # where SkyPilot needs positive figures, the catalog row gets derived ones
        assert all(x > 0 for x in machine_shape(o))


def test_a_vast_host_without_ram_figure_keeps_its_offer(recorded) -> None:
    offers = by_id(recorded["vast"])
    no_ram, zero_cores = offers["30790104"], offers["31120458"]
    assert VAST_ROWS["30790104"]["cpu_ram"] is None and VAST_ROWS["31120458"]["cpu_cores"] == 0
    assert (no_ram.vcpus, no_ram.mem_gib, no_ram.price_hour) == (8, 0.0, 0.41)
    assert (zero_cores.vcpus, zero_cores.mem_gib, zero_cores.price_hour) == (16, 0.0, 0.58)


def test_runpod_and_lambda_rows_without_cpu_figures_keep_their_offer() -> None:
    rp = runpod.parse_response(body("runpod_bad_rows.json"))
    assert rp.bad_rows == 3  # no lowestPrice, memory "eighty", not an object
    l40s = by_id(rp.offers)["NVIDIA L40S"]
    assert (l40s.vcpus, l40s.mem_gib, l40s.price_hour) == (0, 62.0, 0.86)
    lam = lambda_cloud.parse_response(body("lambda_bad_rows.json"))
    assert lam.bad_rows == 3  # no price, no GPU in the description, regions not objects
    a100 = by_id(lam.offers)["gpu_1x_string_vcpus"]
    assert (a100.gpu, a100.vcpus, a100.mem_gib, a100.price_hour) == ("A100-40GB", 0, 200.0, 1.99)


@pytest.mark.parametrize(
    ("gpu", "reported_mib", "nominal"),
    [
        ("RTX4090", 23028, 24),  # issue 13: a host that leaves 23,028 MiB usable
        ("RTX4090", 24564, 24),
        ("RTX4090", 49140, 48),  # the 48 GB boards some hosts run
        ("L40S", 46068, 48),  # ECC on
        ("A6000", 49140, 48),
        ("H100", 81559, 80),
        ("H100-NVL", 95830, 94),
        ("H200", 143771, 141),
        ("A100-40GB", 40960, 40),
        ("RTX5090", 32607, 32),
        ("RTX3080", 10240, 10),
        ("RTX3080", 12288, 12),
        ("Mystery9000", 23028, 22),  # a model the table does not know: rounded
        ("RTX3090", 16384, 16),  # a size the model is not sold with: rounded, not forced up
    ],
)
def test_gpu_memory_is_the_models_nominal_size(gpu: str, reported_mib: int, nominal: int) -> None:
    assert nominal_gpu_mem_gb(gpu, reported_mib / 1024) == nominal


def test_a_24gb_card_reported_short_passes_a_24gb_minimum(recorded) -> None:
    short = by_id(recorded["vast"])["31402291"]
    assert VAST_ROWS["31402291"]["gpu_ram"] == 23028
    assert short.gpu_mem_gb == 24
    prefs = Preferences(min_gpu_mem_gb=24)
    assert why_excluded(short, prefs, Needs()) is None
    assert short in {c.offer for c in rank(recorded["vast"], prefs)}


def test_host_memory_is_gib_for_every_provider(recorded) -> None:
    v = by_id(recorded["vast"])["31245871"]
    # Vast's cpu_ram is the host's MiB; the rental gets 16 of its 64 cores' share
    assert v.mem_gib == round(257586 * 16 / 64 / 1024, 1) == 62.9
    lam = by_id(recorded["lambda"])["gpu_8x_a100_80gb_sxm4"]
    assert lam.mem_gib == 1800.0  # specs.memory_gib
    assert by_id(recorded["runpod"])["NVIDIA GeForce RTX 4090"].mem_gib == 41.0
    # the snapshot holds the same host in GB (64.4): it loads as the same GiB as the live answer
    (snap,) = [o for o in load_snapshot() if (o.provider, o.instance_type) == ("vast", "31245871")]
    assert snap.mem_gib == pytest.approx(v.mem_gib, abs=0.05)
    # SkyPilot's catalog column is MemoryGiB: the figure goes in as it is
    assert build_catalog([v]).rows["vast"][0]["MemoryGiB"] == 62.9
    # the field is mem_gib; a cache or run record written as mem_gb still loads
    dumped = v.model_dump(mode="json")
    assert "mem_gib" in dumped and "mem_gb" not in dumped
    legacy = {k: val for k, val in dumped.items() if k != "mem_gib"} | {"mem_gb": 12.5}
    assert Offer.model_validate(legacy).mem_gib == 12.5


def test_gpu_variants_stay_distinct(recorded) -> None:
    rp, va = by_id(recorded["runpod"]), by_id(recorded["vast"])
    nvl, sxm = rp["NVIDIA H100 NVL"], rp["NVIDIA H100 80GB HBM3"]
    assert (nvl.gpu, nvl.gpu_mem_gb, sxm.gpu, sxm.gpu_mem_gb) == ("H100-NVL", 94, "H100", 80)
    assert (va["31077310"].gpu, va["31077310"].gpu_mem_gb, va["30871529"].gpu) == ("H100-NVL", 94, "H100")
    # and SkyPilot's names for them differ too
    assert sky_accelerator("runpod", nvl.instance_type, nvl.gpu) == "H100-NVL"
    assert sky_accelerator("runpod", sxm.instance_type, sxm.gpu) == "H100-SXM"
    assert sky_accelerator("vast", "31077310", "H100-NVL") == "H100-NVL"
    assert {o.gpu for o in recorded["vast"]} >= {"RTX3090Ti", "RTX8000", "H100-NVL", "H100"}


def _refs(offers: list[Offer]) -> list[OfferRef]:
    """Each offer in each market it is priced in, as a plan keeps it."""
    out = []
    for o in offers:
        for spot in (False, True):
            price = o.effective_price(spot)
            if price is not None:
                out.append(OfferRef.of(Choice(o, spot, price, price, price)))
    return out


def _render(refs: list[OfferRef]) -> dict:
    from launcher.task import render_task

    job = JobPlan(
        name="rows-1", domains=["nutrition"], hours=1.0, cost=1.0, offer=refs[0], fallbacks=refs[1:]
    )
    plan = Plan(
        run_id="rows",
        backend="skypilot",
        workload=Workload(),
        jobs=[job],
        total_hours=1.0,
        total_cost=1.0,
        offers_source="live",
        throughput_source="test",
    )
    return render_task(
        plan, job, store="file:///unused", endpoint_url=None, prefs=Preferences(), backend="skypilot"
    )


def test_the_task_asks_for_the_disk_vast_was_priced_with(recorded) -> None:
    from launcher import skyplugin

    for o in recorded["vast"]:
        row = VAST_ROWS[o.instance_type]
        assert o.disk_price_hour == round(vast.DISK_GB * row["storage_cost"] / 720, 6)
    task = _render(_refs(recorded["vast"]))
    assert task["resources"]["disk_size"] == vast.DISK_GB
    # the plugin bids the catalog price less that same disk
    assert skyplugin.PRICED_DISK_GB == vast.DISK_GB


# --- Part 2: through SkyPilot's own code ---------------------------------------------------------


@pytest.fixture(scope="module")
def launch_path(recorded, tmp_path_factory):
    """The plan's refs, the rendered task parsed by SkyPilot, with the catalogs written from those refs
    (as the SkyPilot backend writes them) read by SkyPilot's catalog modules."""
    import sky

    refs = _refs([o for offers in recorded.values() for o in offers])
    task = _render(refs)
    home = tmp_path_factory.mktemp("skyhome")
    catalog_offers = offers_from_refs(refs)
    write_catalogs(catalog_offers, home)
    with offline_sky(home, ["vast", "runpod", "lambda"]):
        parsed = sky.Task.from_yaml_config(copy.deepcopy(task))  # it consumes the mapping
        resources = list(parsed.resources)
        assert len(resources) == len(refs)  # one entry per (offer, market), in order
        yield list(zip(refs, resources, strict=True)), build_catalog(catalog_offers), task


def _first_zones(r):
    """The first attempt of SkyPilot's failover loop in the resource's region (zones or None)."""
    accs = r.cloud.get_accelerators_from_instance_type(r.instance_type)
    loop = r.cloud.zones_provision_loop(
        region=r.region, num_nodes=1, instance_type=r.instance_type, accelerators=accs, use_spot=r.use_spot
    )
    return next(iter(loop))


def _deploy_vars(r, zones) -> dict:
    from sky import clouds
    from sky.utils import resources_utils

    name = resources_utils.ClusterName(display_name="rows", name_on_cloud="rows-c0ffee")
    return r.cloud.make_deploy_resources_variables(r, name, clouds.Region(r.region), zones, 1)


def _check_catalog(ref: OfferRef, r, cat) -> None:
    """SkyPilot's catalog reader gives the offer's GPU model, count, region and price back."""
    cloud = str(r.cloud).lower()
    assert cloud == ref.provider
    ((acc, count),) = r.cloud.get_accelerators_from_instance_type(r.instance_type).items()
    assert int(count) == ref.gpu_count
    assert cat.gpu_of[(cloud, acc)] == ref.gpu
    regions = r.cloud.regions_with_offering(r.instance_type, None, r.use_spot, r.region, r.zone)
    assert [reg.name for reg in regions] == [r.region]
    price = r.cloud.instance_type_to_hourly_cost(r.instance_type, r.use_spot, r.region, r.zone)
    assert price == pytest.approx(ref.price_hour, abs=1e-6)


def _response(status: int, payload: object):
    import requests

    resp = requests.Response()
    resp.status_code = status
    resp._content = json.dumps(payload).encode()
    resp.headers["Content-Type"] = "application/json"
    return resp


class FakeVastHTTP:
    """Vast's API at vastai's HTTP layer (`VastClient._request`): the recorded bundles, a create, a show."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, object]] = []

    def __call__(self, client, method, url, headers, json_data=None, timeout=None):
        path = urlsplit(url).path
        self.requests.append((method, path, json_data))
        if (method, path) == ("POST", "/api/v0/bundles/"):
            wanted = (json_data.get("id") or {}).get("eq")
            return _response(200, {"offers": [r for r in VAST_ROWS.values() if wanted in (None, r["id"])]})
        if method == "PUT" and path.startswith("/api/v0/asks/"):
            return _response(200, {"success": True, "new_contract": 7001})
        if (method, path) == ("GET", "/api/v0/instances/7001/"):
            row = {"id": 7001, "start_date": time.time(), "extra_env": [], "actual_status": "loading"}
            return _response(200, {"instances": row})
        return _response(404, {"success": False, "error": "no_route"})


@pytest.fixture
def vast_plugin(monkeypatch: pytest.MonkeyPatch) -> FakeVastHTTP:
    """meetara's plugin installed over SkyPilot's and vastai's own functions (restored after), vastai
    answered by `FakeVastHTTP`."""
    from sky.adaptors import vast as vast_adaptor
    from sky.clouds.vast import Vast
    from sky.provision.vast import utils
    from vastai.api import client
    from vastai.sdk import VastAI

    from launcher.skyplugin import install_vast_fix

    monkeypatch.setattr(utils, "launch", inspect.unwrap(utils.launch))
    monkeypatch.setattr(
        Vast, "make_deploy_resources_variables", inspect.unwrap(Vast.make_deploy_resources_variables)
    )
    monkeypatch.setattr(VastAI, "search_offers", inspect.unwrap(VastAI.search_offers))
    monkeypatch.setattr(VastAI, "create_instance", inspect.unwrap(VastAI.create_instance))
    monkeypatch.setattr(client.VastSession, "__init__", inspect.unwrap(client.VastSession.__init__))
    monkeypatch.setattr(client.VastSession, "__meetara__", False, raising=False)
    fake = FakeVastHTTP()
    monkeypatch.setattr(client.VastClient, "_request", lambda self, *a, **k: fake(self, *a, **k))
    monkeypatch.setattr(vast_adaptor, "_vast_sdk", VastAI(api_key="vast-test-key"))
    install_vast_fix()
    return fake


def skypilot_vast_query(monkeypatch: pytest.MonkeyPatch, instance_type: str, region: str) -> dict[str, str]:
    """What SkyPilot's own Vast provisioner (no plugin) reads from an instance type and region: the
    filters of the offer search it builds (`sky/provision/vast/utils.py`, `launch`)."""
    from sky.adaptors import vast as vast_adaptor
    from sky.provision.vast import utils

    queries: list[str] = []

    class Sdk:
        def search_offers(self, query=None, **kwargs):
            queries.append(query)
            return []

    with monkeypatch.context() as m:
        m.setattr(vast_adaptor, "_vast_sdk", Sdk())
        with pytest.raises(RuntimeError, match="could not find an offer"):
            inspect.unwrap(utils.launch)(
                "rows", instance_type, region, vast.DISK_GB, "img", None, False, False
            )
    (query,) = queries
    return dict(re.findall(r'(\w+)(?:=|>=)"?([^"]*?)"?(?= \w+(?:=|>=)|$)', query))


def test_vast_offers_launch_as_planned(launch_path, vast_plugin, monkeypatch) -> None:
    from sky.provision.vast import utils

    from launcher.skyplugin import VAST_TYPE

    pairs, cat, task = launch_path
    vast_pairs = [(ref, r) for ref, r in pairs if ref.provider == "vast"]
    assert {ref.instance_type for ref, _ in vast_pairs} == set(VAST_COUNTRY)
    table_names = set()
    for ref, r in vast_pairs:
        row = VAST_ROWS[ref.instance_type]
        _check_catalog(ref, r, cat)
        assert r.disk_size == task["resources"]["disk_size"] == vast.DISK_GB
        zones = _first_zones(r)
        variables = _deploy_vars(r, zones)
        assert variables["use_spot"] is ref.spot  # the plugin's addition: SkyPilot 0.14.1 sends none
        # the plugin's reading: the planned offer
        m = VAST_TYPE.match(variables["instance_type"])
        assert m and m.group(3) == ref.instance_type and int(m.group(1)) == ref.gpu_count
        # SkyPilot's own reading of the same instance type and region
        q = skypilot_vast_query(monkeypatch, variables["instance_type"], variables["region"])
        assert (int(q["num_gpus"]), q["geolocation"]) == (ref.gpu_count, VAST_COUNTRY[ref.instance_type])
        assert normalize_gpu(q["gpu_name"], ref.gpu_mem_gb) == ref.gpu
        if q["gpu_name"] != row["gpu_name"]:
            table_names.add(ref.instance_type)
        # the launch (the plugin in SkyPilot's provisioner): the planned offer, market, disk and bid
        del vast_plugin.requests[:]
        instance = utils.launch(
            name="rows-c0ffee-head",
            instance_type=variables["instance_type"],
            region=variables["region"],
            disk_size=r.disk_size,
            image_name=variables["image_id"],
            ports=None,
            preemptible=variables["use_spot"],
            secure_only=variables["secure_only"],
        )
        assert instance == 7001
        (search, create, _show) = vast_plugin.requests
        assert search[0:2] == ("POST", "/api/v0/bundles/")
        assert search[2]["id"] == {"eq": int(ref.instance_type)}
        assert search[2]["type"] == ("bid" if ref.spot else "on-demand")
        assert search[2]["allocated_storage"] == vast.DISK_GB
        assert create[0:2] == ("PUT", f"/api/v0/asks/{ref.instance_type}/")
        assert create[2]["disk"] == vast.DISK_GB
        if ref.spot:
            assert create[2]["price"] == pytest.approx(row["min_bid"], abs=1e-6)
        else:
            assert create[2]["price"] is None
        assert "vast-test-key" not in create[2]["onstart"]
    # a plan's OfferRefs carry Vast's own GPU name: SkyPilot reads back exactly the host's GPU, even
    # where meetara's GPU merges Vast variants (H100 PCIE and SXM are both "H100")
    assert table_names == set()


def test_live_vast_offers_carry_vasts_own_names_through_skypilot(recorded, tmp_path, monkeypatch) -> None:
    """Catalogs written from live offers (what the optimizer check and the plan's catalog see): every
    name, count and country SkyPilot reads back is the Vast host's own."""
    import sky

    offers = recorded["vast"]
    cat = build_catalog(offers)
    write_catalogs(offers, tmp_path)
    with offline_sky(tmp_path, ["vast"]):
        seen = set()
        for row in cat.rows["vast"]:
            itype, region = row["InstanceType"], row["Region"]
            ((_, o),) = cat.offers[("vast", itype, region)]
            seen.add(o.instance_type)
            raw = VAST_ROWS[o.instance_type]
            ((acc, count),) = sky.Vast.get_accelerators_from_instance_type(itype).items()
            assert (cat.gpu_of[("vast", acc)], int(count)) == (o.gpu, raw["num_gpus"])
            assert [reg.name for reg in sky.Vast.regions_with_offering(itype, None, False, region, None)] == [
                region
            ]
            q = skypilot_vast_query(monkeypatch, itype, region)
            assert q["gpu_name"] == raw["gpu_name"]
            assert int(q["num_gpus"]) == raw["num_gpus"]
            assert q["geolocation"] == VAST_COUNTRY[o.instance_type]
            assert vast_gpu_name(o.gpu, o.gpu_name) == raw["gpu_name"]
        assert seen == set(VAST_COUNTRY)


def test_offers_without_cpu_figures_pass_skypilots_validation(recorded) -> None:
    """The kept rows become catalog rows SkyPilot accepts (positive vCPUs and MemoryGiB, derived where
    the provider gave none), in every market they are priced in."""
    from launcher.skycatalog import check_catalog_rows

    unknown = [
        *vast.parse_response(body("vast_bad_rows.json")).offers,
        *runpod.parse_response(body("runpod_bad_rows.json")).offers,
        *lambda_cloud.parse_response(body("lambda_bad_rows.json")).offers,
        *(o for o in recorded["vast"] if o.mem_gib == 0),
    ]
    assert sum(1 for o in unknown if o.vcpus == 0 or o.mem_gib == 0) == 6
    # one check per catalog row (a RunPod offer priced per country is a row per data centre) and market;
    # a row SkyPilot refuses raises BadInput
    rows = [row for rows in build_catalog(unknown).rows.values() for row in rows]
    assert check_catalog_rows(unknown) == sum(
        row[m] is not None for row in rows for m in ("Price", "SpotPrice")
    )


def test_a_bigger_disk_than_priced_still_bids_the_planned_min_bid(launch_path, vast_plugin) -> None:
    from sky.provision.vast import utils

    pairs, _, _ = launch_path
    ref, r = next((ref, r) for ref, r in pairs if ref.provider == "vast" and ref.spot)
    utils.launch(
        name="rows-c0ffee-head",
        instance_type=r.instance_type,
        region=r.region,
        disk_size=100,
        image_name="img",
        ports=None,
        preemptible=True,
        secure_only=False,
    )
    (_, create, _) = vast_plugin.requests
    assert create[2]["disk"] == 100
    # the catalog price includes 50 GB, not 100: the bid is still the host's min_bid
    assert create[2]["price"] == pytest.approx(VAST_ROWS[ref.instance_type]["min_bid"], abs=1e-6)


def test_runpod_offers_launch_as_planned(launch_path, monkeypatch) -> None:
    import runpod as runpod_sdk
    from sky.catalog.data_fetchers.fetch_runpod import REGION_ZONES
    from sky.provision.runpod import utils

    gpu_types = {g["id"]: g for g in body("runpod_gpu_types.json")["data"]["gpuTypes"]}
    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(runpod_sdk, "get_gpu", lambda gpu_id, *a, **k: gpu_types[gpu_id])
    monkeypatch.setattr(
        runpod_sdk, "create_pod", lambda **kw: sent.append(("on-demand", kw)) or {"id": "pod-1"}
    )
    monkeypatch.setattr(
        utils.runpod_commands, "create_spot_pod", lambda **kw: sent.append(("spot", kw)) or {"id": "pod-1"}
    )
    pairs, cat, task = launch_path
    runpod_pairs = [(ref, r) for ref, r in pairs if ref.provider == "runpod"]
    assert {ref.instance_type for ref, _ in runpod_pairs} == {
        o for o in gpu_types if o.startswith("NVIDIA")
    } - {
        "NVIDIA A100-SXM4-80GB",  # out of stock
        "NVIDIA RTX 6000 Ada Generation",  # out of stock
    }
    for ref, r in runpod_pairs:
        _check_catalog(ref, r, cat)
        zones = _first_zones(r)
        variables = _deploy_vars(r, zones)
        del sent[:]
        pod = utils.launch(
            cluster_name="rows-c0ffee",
            node_type="head",
            instance_type=variables["instance_type"],
            region=variables["region"],
            zone=variables["availability_zone"],
            disk_size=r.disk_size,
            image_name=variables["image_id"],
            ports=None,
            public_key="ssh-ed25519 AAAAtest",
            preemptible=variables["use_spot"],
            bid_per_gpu=float(variables["bid_per_gpu"]),
            docker_login_config=None,
        )
        assert pod == "pod-1"
        ((market, params),) = sent
        assert market == ("spot" if ref.spot else "on-demand")
        assert params["gpu_type_id"] == ref.instance_type  # RunPod's GPU id: the same GPU
        assert params["gpu_count"] == ref.gpu_count
        assert params["country_code"] == ref.region  # RunPod's API prices per country
        # SkyPilot tries a country's data centres in one request (its failover loop yields them together)
        assert set(params["data_center_id"].split(",")) <= set(REGION_ZONES[ref.region])
        if ref.spot:
            assert params["bid_per_gpu"] == pytest.approx(ref.price_hour / ref.gpu_count)


def test_lambda_offers_launch_as_planned(launch_path, monkeypatch, tmp_path) -> None:
    from sky.provision.lambda_cloud import lambda_utils

    (tmp_path / ".lambda_cloud").mkdir()
    (tmp_path / ".lambda_cloud" / "lambda_keys").write_text("api_key = lam-test-key\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    posted: list[dict] = []

    def fake_request(method, url, headers, data=None):
        if method == "get" and url.endswith("/instance-types"):
            return _response(200, body("lambda_instance_types.json"))
        if method == "post" and url.endswith("/instance-operations/launch"):
            posted.append(json.loads(data))
            return _response(200, {"data": {"instance_ids": ["i-0001"]}})
        raise AssertionError(f"unexpected Lambda request {method} {url}")

    monkeypatch.setattr(lambda_utils, "_try_request_with_backoff", fake_request)
    pairs, cat, _ = launch_path
    lambda_pairs = [(ref, r) for ref, r in pairs if ref.provider == "lambda"]
    assert len(lambda_pairs) == 7
    for ref, r in lambda_pairs:
        _check_catalog(ref, r, cat)
        zones = _first_zones(r)
        variables = _deploy_vars(r, zones)
        del posted[:]
        ids = lambda_utils.LambdaCloudClient().create_instances(
            instance_type=variables["instance_type"], region=variables["region"], name="rows-c0ffee"
        )
        assert ids == ["i-0001"]
        ((sent),) = posted
        assert (sent["instance_type_name"], sent["region_name"]) == (ref.instance_type, ref.region)


def test_runpod_spot_is_never_offered_while_retired_and_its_container_disk_is_priced() -> None:
    """RunPod retired interruptible pods (and `podRentInterruptable`, which SkyPilot 0.14.1 would send): a
    spot price the API still sends is dropped, so no plan rents one; every pod carries its container disk
    ($0.10/GB-month for the task's 50 GB) as Vast's offers carry their storage."""
    raw = body("runpod_gpu_types.json")
    with_spot = copy.deepcopy(raw)
    for g in with_spot["data"]["gpuTypes"]:
        g["secureSpotPrice"] = 0.31
        if g.get("lowestPrice"):
            g["lowestPrice"]["minimumBidPrice"] = 0.29
    offers = runpod.parse_response(with_spot).offers
    assert offers and all(o.spot_price_hour is None for o in offers)
    assert all(o.disk_price_hour == pytest.approx(50 * 0.10 / 720, abs=1e-6) for o in offers)
    assert [o.price_hour for o in offers] == [o.price_hour for o in runpod.parse_response(raw).offers]
