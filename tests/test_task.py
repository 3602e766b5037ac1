"""SkyPilot-facing code: the rendered task, its secrets, SkyPilot's optimizer vs the plan, the backend.

All offline. SkyPilot binds its catalog files and state to $HOME when it is first imported: conftest.py
points HOME at a throw-away sandbox before any test module is imported, and the `catalogs` fixture
writes the offers snapshot there as SkyPilot's catalogs, so SkyPilot never needs to download one. The
`no_network` fixture makes any attempt to resolve a non-local host fail the test.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from launcher.backends.base import BackendError, JobState
from launcher.backends.skypilot import validate_task
from launcher.offers import load_snapshot
from launcher.plan import Plan, Workload, domain_hours, needs_for, plan_cloud, plan_local
from launcher.preferences import Preferences, ProviderPrefs
from launcher.select import rank
from launcher.skycatalog import SKY_CLOUD, sky_choice, sky_instance_type, sky_location, write_catalogs
from launcher.task import render_task, secret_values, task_yaml

DOMAINS = ["nutrition", "legal", "finance", "education", "fitness", "parenting", "cooking", "travel"]
WORK = Workload(base_model="microsoft/DialoGPT-medium")
STORE = "s3://meetara-test/runs"
SENTINEL = "sentinel-Zq8v3Xw-never-written"


pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def offers():
    return load_snapshot()


@pytest.fixture(scope="module")
def catalogs(offers) -> Path:
    """The snapshot as SkyPilot's catalogs under the sandbox HOME SkyPilot was (or will be) bound to."""
    home = Path.home()
    assert str(home).startswith(tempfile.gettempdir()), f"HOME is not a sandbox: {home}"
    write_catalogs(offers, home)
    import sky.catalog.common as common

    assert common.get_catalog_path("vast/vms.csv").startswith(str(home))
    return home


def _plan(offers, prefs: Preferences, domains=DOMAINS) -> Plan:
    return plan_cloud(domains, offers, prefs, WORK, "run-42")


def _render(plan: Plan, prefs: Preferences, backend: str = "skypilot", **kw) -> dict:
    return render_task(
        plan, plan.jobs[0], store=STORE, endpoint_url="http://127.0.0.1:9", prefs=prefs, backend=backend, **kw
    )


# (1) the rendered YAML is a real SkyPilot task


@pytest.mark.parametrize("policy", ["spot", "on-demand"])
def test_rendered_yaml_parses_with_skypilot(catalogs, offers, tmp_path, policy) -> None:
    import sky

    prefs = Preferences(spot_policy=policy, max_recoveries=5, fallbacks=8)
    plan = _plan(offers, prefs)
    job = plan.jobs[0]
    task = _render(plan, prefs, extra_envs={"MEETARA_STOP_AT": "1900000000"})
    path = tmp_path / "task.yaml"
    path.write_text(task_yaml(task))
    parsed = sky.Task.from_yaml(str(path))

    resources = parsed.resources
    assert isinstance(resources, list), "ordered resources keep their order (any_of would be a set)"
    refs = [job.offer, *job.fallbacks]
    assert len(resources) == len(refs)
    for r, ref in zip(resources, refs, strict=True):
        region, zone = sky_location(ref.provider, ref.region)
        assert str(r.cloud).lower() == SKY_CLOUD[ref.provider]
        assert (r.region, r.zone) == (region, zone)
        assert r.instance_type == sky_instance_type(
            ref.provider, ref.instance_type, ref.gpu, ref.gpu_count, ref.gpu_name
        )
        assert r.use_spot is ref.spot
        assert r.use_spot is (policy == "spot")
        # SkyPilot reruns nothing after a non-zero exit; the conductor holds prefs.max_recoveries
        # (tests/test_sky_recovery.py runs SkyPilot's own restart rule on this)
        assert r.job_recovery["max_restarts_on_errors"] == 0
        assert r.job_recovery["recover_on_exit_codes"] == []
        assert r.job_recovery["strategy"] == "EAGER_NEXT_REGION"
    assert parsed.envs["MEETARA_RUN_ID"] == "run-42"
    assert parsed.envs["MEETARA_DOMAINS"] == ",".join(job.domains)
    assert parsed.envs["MEETARA_STORE"] == STORE
    assert parsed.envs["MEETARA_S3_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert parsed.envs["MEETARA_BASE_MODEL"] == "microsoft/DialoGPT-medium"
    assert parsed.envs["MEETARA_STOP_AT"] == "1900000000"
    assert parsed.name == job.name
    assert Path(parsed.workdir, "pyproject.toml").is_file()
    # the secrets are references to be supplied at launch, not values
    assert sorted(r.name for r in parsed.managed_secret_refs) == [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ]
    assert not parsed.secrets
    # and the mapping itself builds the same task
    assert [str(r.cloud) for r in validate_task(task).resources] == [str(r.cloud) for r in resources]


def test_ordered_offers_span_providers(catalogs, offers) -> None:
    """On-demand with Vast disabled: RunPod first (country + data-centre zone), Lambda among the fallbacks."""
    prefs = Preferences(
        spot_policy="on-demand", fallbacks=12, providers={"vast": ProviderPrefs(enabled=False)}
    )
    task = _render(_plan(offers, prefs), prefs)
    infra = [e["infra"] for e in task["resources"]["ordered"]]
    assert infra[0].startswith("runpod/") and infra[0].count("/") == 2, infra
    assert any(i.startswith("lambda/") for i in infra), infra
    resources = validate_task(task).resources
    assert {str(r.cloud) for r in resources} == {"RunPod", "Lambda"}
    assert all(r.use_spot is False for r in resources)


def test_standalone_template_parses(catalogs) -> None:
    """tasks/train.yaml as shipped, for `sky jobs launch tasks/train.yaml --env ... --secret ...`."""
    import sky

    import tasks

    text = (Path(tasks.__file__).parent / "train.yaml").read_text()
    raw = yaml.safe_load(text)
    assert raw["envs"]["MEETARA_BASE_MODEL"] == "microsoft/DialoGPT-medium"
    assert set(raw["secrets"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v is None for v in raw["secrets"].values())
    task = sky.Task.from_yaml_str(text)
    assert {r.use_spot for r in task.resources} == {True, False}
    assert all(r.job_recovery["max_restarts_on_errors"] == 0 for r in task.resources)
    assert all(r.job_recovery["recover_on_exit_codes"] == [] for r in task.resources)


def test_local_render_drops_cloud_parts(offers) -> None:
    prefs = Preferences()
    plan = plan_local(["nutrition", "legal"], prefs, Workload(), "run-7")
    task = render_task(
        plan, plan.jobs[0], store="file:///tmp/s", endpoint_url=None, prefs=prefs, backend="local"
    )
    assert "resources" not in task and "secrets" not in task
    assert task["setup"].startswith('python -c "import train"')
    assert task["envs"]["MEETARA_BASE_MODEL"] == "tiny"
    assert task["envs"]["MEETARA_VENV"] == ""
    assert "python -m train" in task["run"]


def test_extra_envs_cannot_carry_secrets(offers) -> None:
    prefs = Preferences()
    with pytest.raises(ValueError, match="secret"):
        _render(_plan(offers, prefs), prefs, extra_envs={"AWS_SECRET_ACCESS_KEY": "x"})


def test_the_box_asks_s3_for_the_checksums_this_machine_does(offers, monkeypatch) -> None:
    """The trainer on the box opens the same S3 store: it gets this machine's checksum settings
    (`when_required` unless the user asked for more), so a server that refuses checksum headers works
    there too."""
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    monkeypatch.delenv("AWS_RESPONSE_CHECKSUM_VALIDATION", raising=False)
    prefs = Preferences()
    envs = _render(_plan(offers, prefs), prefs)["envs"]
    assert envs["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"
    assert envs["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "when_required"
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    envs = _render(_plan(offers, prefs), prefs)["envs"]
    assert envs["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_supported"


def test_image_sets_docker_image(offers) -> None:
    prefs = Preferences()
    task = _render(_plan(offers, prefs), prefs, image="ghcr.io/example/meetara-train:0.1")
    assert task["resources"]["image_id"] == "docker:ghcr.io/example/meetara-train:0.1"


def test_catalog_from_run_refs_knows_every_candidate(offers, tmp_path) -> None:
    """What the backend writes before a launch (from a run record's OfferRefs) lets SkyPilot resolve
    every instance type, region and zone the task names; `merge` keeps other instance types' rows."""
    from launcher.skycatalog import offers_from_refs, offline_sky

    prefs = Preferences(
        spot_policy="on-demand", fallbacks=10, providers={"vast": ProviderPrefs(enabled=False)}
    )
    plan = _plan(offers, prefs)
    refs = [r for j in plan.jobs for r in (j.offer, *j.fallbacks)]
    lam = tmp_path / ".sky/catalogs/v8/lambda/vms.csv"
    lam.parent.mkdir(parents=True)
    lam.write_text(
        "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice\n"
        "gpu_1x_gh200,GH200,1.0,64.0,432.0,1.49,us-east-3,,\n"
        "gpu_1x_a6000,A6000,1.0,1.0,1.0,9.99,asia-south-1,,\n"
    )
    write_catalogs(offers_from_refs(refs), tmp_path, merge=True)
    text = lam.read_text()
    assert "gpu_1x_gh200" in text and "9.99" not in text  # kept, and replaced

    task = _render(plan, prefs)
    with offline_sky(tmp_path, ["lambda", "runpod"]):
        resources = validate_task(task).resources
    assert len(resources) == len(task["resources"]["ordered"]) > 1


# (2) secret values never reach the mapping, the YAML or a file


def test_secret_values_stay_in_memory(catalogs, offers, tmp_path, monkeypatch) -> None:
    from launcher.backends.skypilot import SkyPilotBackend

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAMEETARATEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    prefs = Preferences()
    plan = _plan(offers, prefs)
    task = _render(plan, prefs)
    text = task_yaml(task)
    (tmp_path / "task.yaml").write_text(text)
    local = render_task(plan, plan.jobs[0], store=STORE, endpoint_url=None, prefs=prefs, backend="local")
    assert SENTINEL not in repr(task) and SENTINEL not in text and SENTINEL not in repr(local)

    values = secret_values()
    assert values["AWS_SECRET_ACCESS_KEY"] == SENTINEL  # read for launch time...
    sky_task = SkyPilotBackend().sky_task(task, values)
    assert sky_task.secrets["AWS_SECRET_ACCESS_KEY"].get_secret_value() == SENTINEL  # ...held by the Task
    assert not sky_task.managed_secret_refs  # every reference resolved, as `--secret NAME` does
    assert SENTINEL not in sky_task._user_specified_yaml  # the YAML SkyPilot records as the user's
    assert SENTINEL not in repr(sky_task.to_yaml_config(use_user_specified_yaml=True))
    assert SENTINEL not in repr(task)  # building the Task did not write into the mapping

    for root in (Path.home(), tmp_path):
        for f in root.rglob("*"):
            if f.is_file() and f.stat().st_size < 50_000_000:
                assert SENTINEL.encode() not in f.read_bytes(), f


def test_s3_store_without_credentials_is_refused(offers) -> None:
    from launcher.backends.skypilot import SkyPilotBackend

    prefs = Preferences()
    task = _render(_plan(offers, prefs), prefs)
    with pytest.raises(BackendError, match="store credentials") as e:
        SkyPilotBackend().sky_task(task, {})
    assert "\n" not in str(e.value)


# (3) SkyPilot's optimizer, offline over the same offers, picks what meetara's plan picks

# Both sides minimise (start-up + domains x hours per domain on the GPU) x $/h over the same offers.
# meetara prices spot at the bid x (1 + preemption_overhead) and multiplies by provider weights;
# SkyPilot knows neither, so where spot and on-demand compete (`auto`) the overhead is 0 and weights
# stay 1: then both minimise the same quantity and must agree. Under `spot` or `on-demand` alone every
# candidate shares the market, so the overhead scales all spot prices alike and cannot change the pick.
CASES = {
    "default auto": Preferences(preemption_overhead=0),
    "spot only": Preferences(spot_policy="spot"),
    "on-demand only": Preferences(spot_policy="on-demand"),
    "vast disabled, on-demand": Preferences(
        spot_policy="on-demand", providers={"vast": ProviderPrefs(enabled=False)}
    ),
    "runpod disabled": Preferences(
        spot_policy="on-demand",
        providers={"vast": ProviderPrefs(enabled=False), "runpod": ProviderPrefs(enabled=False)},
    ),
    "max price cap": Preferences(preemption_overhead=0, max_price_per_gpu_hour=0.2),
    "provider price cap": Preferences(
        spot_policy="on-demand",
        providers={"vast": ProviderPrefs(max_price_per_gpu_hour=0.4)},
    ),
    "allowed GPUs": Preferences(preemption_overhead=0, allowed_gpus=["A100-80GB", "H100"]),
    "min GPU memory": Preferences(spot_policy="on-demand", min_gpu_mem_gb=48),
    "allowed regions": Preferences(
        spot_policy="on-demand",
        providers={"vast": ProviderPrefs(enabled=False), "runpod": ProviderPrefs(regions=["EU-SE-1"])},
    ),
}


def _job_cost(choice, n_domains: int, prefs: Preferences) -> float:
    hours = prefs.job_startup_minutes / 60 + n_domains * domain_hours(choice.offer.gpu, WORK)[0]
    return hours * choice.price_hour


@pytest.mark.parametrize("case", list(CASES))
def test_skypilot_optimizer_agrees_with_plan(catalogs, offers, tmp_path, case) -> None:
    prefs = CASES[case]
    plan = _plan(offers, prefs)
    job = plan.jobs[0]
    picked = sky_choice(job, offers, prefs, WORK, tmp_path / "skyhome")
    assert picked.seconds > 0

    # where several offers cost exactly the same, either side may take any of them
    costs = {
        (c.offer.provider, c.offer.instance_type, c.offer.region, c.spot): _job_cost(
            c, len(job.domains), prefs
        )
        for c in rank(offers, prefs, needs_for(WORK))
    }
    best = min(costs.values())
    tied = {k for k, v in costs.items() if abs(v - best) <= 1e-9 * best}
    ours = (job.offer.provider, job.offer.instance_type, job.offer.region, job.offer.spot)
    theirs = (picked.provider, picked.instance_type, picked.region, picked.spot)
    assert ours in tied
    assert theirs in tied, f"SkyPilot picked {theirs} at {costs.get(theirs)}, meetara {ours} at {best}"
    if len(tied) == 1:
        assert theirs == ours


# (4) the backend: no credentials, doctor rows, job states


def test_backend_without_credentials_is_one_line(offers) -> None:
    from launcher.backends.skypilot import SkyPilotBackend

    prefs = Preferences()
    task = _render(_plan(offers, prefs), prefs)
    with pytest.raises(BackendError) as e:
        SkyPilotBackend().launch(task, "run-42-j1")
    msg = str(e.value)
    assert "\n" not in msg and "credentials" in msg and "~/.lambda_cloud/lambda_keys" in msg


def test_backend_without_skypilot(monkeypatch, offers) -> None:
    from launcher.backends import skypilot

    monkeypatch.setattr(skypilot, "available", lambda: False)
    with pytest.raises(BackendError, match=r'pip install "meetara\[cloud\]"'):
        skypilot.SkyPilotBackend().check()


def test_doctor_rows(tmp_path, monkeypatch) -> None:
    from launcher.backends import skypilot

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    monkeypatch.setenv("VAST_API_KEY", "vast-key-from-env")
    (tmp_path / ".lambda_cloud").mkdir()
    (tmp_path / ".lambda_cloud" / "lambda_keys").write_text("api_key = lambda-secret\n")
    (tmp_path / ".runpod").mkdir()
    (tmp_path / ".runpod" / "config.toml").write_text('[other]\napi_key = "x"\n')  # no [default]: not enough

    rows = {name: (ok, detail) for name, ok, detail in skypilot.doctor()}
    assert rows["skypilot"] == (True, "0.14.1")
    assert rows["lambda for SkyPilot"][0] is True
    assert rows["runpod for SkyPilot"][0] is False
    assert rows["vast for SkyPilot"] == (
        False,
        "VAST_API_KEY is set, but SkyPilot reads ~/.config/vastai/vast_api_key",
    )
    assert rows["store credentials"][0] is True
    text = repr(rows)
    for secret in (SENTINEL, "lambda-secret", "vast-key-from-env", "testing"):
        assert secret not in text
    assert skypilot.configured_clouds() == ["lambda"]
    assert skypilot.SkyPilotBackend().max_parallel >= 16


def _record(status: str, **kw) -> SimpleNamespace:
    base = dict(
        job_id=7, status=SimpleNamespace(value=status), start_at=None, end_at=None,
        recovery_count=0, failure_reason=None, details=None,
    )  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("PENDING", JobState.PENDING),
        ("STARTING", JobState.PENDING),
        ("RUNNING", JobState.RUNNING),
        ("RECOVERING", JobState.RECOVERING),
        ("CANCELLING", JobState.RUNNING),
        ("SUCCEEDED", JobState.SUCCEEDED),
        ("CANCELLED", JobState.CANCELLED),
        ("FAILED", JobState.FAILED),
        ("FAILED_SETUP", JobState.FAILED),
        ("FAILED_PRECHECKS", JobState.FAILED),
        ("FAILED_NO_RESOURCE", JobState.PREEMPTED),
        ("FAILED_CONTROLLER", JobState.PREEMPTED),
    ],
)
def test_job_states(status, state) -> None:
    from launcher.backends.skypilot import job_status

    st = job_status([_record(status, start_at=1_800_000_000.0, end_at=1_800_003_600.0)])
    assert st.state is state
    assert st.started_at is not None and st.started_at.timestamp() == 1_800_000_000.0
    assert (st.ended_at is not None) is state.finished


def test_every_skypilot_status_is_mapped() -> None:
    import sky

    from launcher.backends.skypilot import _STATES

    assert {s.value for s in sky.jobs.ManagedJobStatus} <= set(_STATES)


def test_failed_job_exit_code_and_recoveries() -> None:
    from launcher.backends.skypilot import job_status

    st = job_status([_record("FAILED", failure_reason="Job exited with exit code 77", recovery_count=2)])
    assert st.exit_code == 77 and "recovered 2x" in st.detail
    assert job_status([_record("SUCCEEDED")]).exit_code == 0


def test_runpod_names_match_skypilot() -> None:
    from sky.provision.runpod.utils import GPU_NAME_MAP

    from launcher.skycatalog import RUNPOD_GPU_KEYS

    for gpu_id, key in RUNPOD_GPU_KEYS.items():
        assert GPU_NAME_MAP.get(key) == gpu_id, (key, gpu_id)
