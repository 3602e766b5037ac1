"""SkyPilot recovery against meetara's exit codes and recovery cap, and the catalog rows SkyPilot reads.

Everything here runs SkyPilot's own code, offline: its restart rule
(`StrategyExecutor.should_restart_on_failure`, on an executor built by `StrategyExecutor.make` from a
rendered task sent through the same YAML round trip as `sky jobs launch`), its managed-job state
functions (what `recovery_count` counts), and its resource validation over the catalog rows meetara
writes. SkyPilot's catalogs are written to a temporary home and bound with `offline_sky`.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from launcher.backends.base import BackendError, JobState
from launcher.offers import load_snapshot
from launcher.plan import OfferRef, Plan, Workload, plan_cloud
from launcher.preferences import Preferences
from launcher.skycatalog import (
    build_catalog,
    check_catalog_rows,
    machine_shape,
    offers_from_refs,
    offline_sky,
    write_catalogs,
)
from launcher.task import render_task
from train import BadInput

WORK = Workload(base_model="microsoft/DialoGPT-medium")
STORE = "s3://meetara-test/runs"
SECRETS = {"AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "not-a-secret"}
PROVIDERS = ["vast", "runpod", "lambda"]
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_BUDGET = 1, 2, 75, 77


pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def offers():
    return load_snapshot()


def _plan(offers, prefs: Preferences, domains=("nutrition",)) -> Plan:
    return plan_cloud(list(domains), offers, prefs, WORK, "default")


def _refs(plan: Plan) -> list[OfferRef]:
    return [r for j in plan.jobs for r in (j.offer, *j.fallbacks)]


def _render(plan: Plan, prefs: Preferences) -> dict:
    return render_task(
        plan, plan.jobs[0], store=STORE, endpoint_url="http://127.0.0.1:9", prefs=prefs, backend="skypilot"
    )


def _as_launched(task: dict, name: str):
    """The sky.Task SkyPilot's jobs controller would run: meetara's backend builds the Task, then what
    `sky jobs launch` does to it (the client dumps the DAG to YAML, the server loads it and fills in the
    job-recovery defaults, the controller parses it again)."""
    from sky.utils import dag_utils

    from launcher.backends.skypilot import SkyPilotBackend

    sky_task = SkyPilotBackend().sky_task({**task, "name": name}, SECRETS)
    dag = dag_utils.convert_entrypoint_to_dag(sky_task)
    dag.name = name  # sky.jobs.launch(task, name=name)
    dag = dag_utils.load_dag_from_yaml_str(dag_utils.dump_dag_to_yaml_str(dag))  # client -> server
    dag_utils.fill_default_config_in_dag_for_job_launch(dag)  # sky/jobs/server/core.py, launch
    dag = dag_utils.load_dag_from_yaml_str(dag_utils.dump_dag_to_yaml_str(dag))  # controller's _get_dag
    (task_,) = dag.tasks
    return task_


def _executor(task_):
    """A recovery executor made as SkyPilot's JobController makes it (sky/jobs/controller.py)."""
    from sky.backends import CloudVmRayBackend
    from sky.jobs.recovery_strategy import StrategyExecutor

    lock = asyncio.Lock()
    return StrategyExecutor.make(
        "meetara-cluster", CloudVmRayBackend(), task_, 1, 0, None, set(), lock, asyncio.Condition(lock)
    )


# (1) SkyPilot's own restart rule, fed a rendered task's job recovery


@pytest.mark.parametrize(("policy", "max_recoveries"), [("spot", 3), ("on-demand", 5), ("auto", 1)])
def test_skypilot_never_restarts_1_2_77_and_75_within_cap(offers, tmp_path, policy, max_recoveries) -> None:
    from sky.jobs.recovery_strategy import EagerFailoverStrategyExecutor

    prefs = Preferences(spot_policy=policy, max_recoveries=max_recoveries, fallbacks=4)
    plan = _plan(offers, prefs)
    write_catalogs(offers_from_refs(_refs(plan)), tmp_path)
    task = _render(plan, prefs)
    with offline_sky(tmp_path, PROVIDERS):
        launched = [_as_launched(task, "default-j1") for _ in range(5)]

    executors = [_executor(t) for t in launched]
    assert all(type(e) is EagerFailoverStrategyExecutor for e in executors)
    attempts = max_recoveries + 10
    for code, ex in zip((EXIT_FAILED, EXIT_BAD_INPUT, EXIT_BUDGET), executors, strict=False):
        assert not any(ex.should_restart_on_failure(exit_codes=[code]) for _ in range(attempts)), code
    restarts_75 = sum(
        executors[3].should_restart_on_failure(exit_codes=[EXIT_INTERRUPTED]) for _ in range(attempts)
    )
    assert restarts_75 <= max_recoveries
    assert restarts_75 == 0  # the conductor relaunches 75 (one count with the preemptions), not SkyPilot
    mixed = [EXIT_INTERRUPTED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_BUDGET, EXIT_BAD_INPUT, EXIT_INTERRUPTED]
    assert not any(executors[4].should_restart_on_failure(exit_codes=[c]) for c in mixed)


def test_the_rule_would_rerun_with_the_old_job_recovery(offers, tmp_path) -> None:
    """The same SkyPilot function on the job recovery meetara rendered before (max_restarts_on_errors
    = max_recoveries, recover_on_exit_codes [75]): 77 is rerun, and 75 without any limit. This is what
    the test above would catch."""
    prefs = Preferences(spot_policy="spot", max_recoveries=3)
    plan = _plan(offers, prefs)
    write_catalogs(offers_from_refs(_refs(plan)), tmp_path)
    task = _render(plan, prefs)
    task["resources"]["job_recovery"].update(max_restarts_on_errors=3, recover_on_exit_codes=[75])
    with offline_sky(tmp_path, PROVIDERS):
        a, b = (_executor(_as_launched(task, "default-j1")) for _ in range(2))
    assert [a.should_restart_on_failure(exit_codes=[EXIT_BUDGET]) for _ in range(4)] == [True] * 3 + [False]
    assert all(b.should_restart_on_failure(exit_codes=[EXIT_INTERRUPTED]) for _ in range(50))


# (2) what SkyPilot counts, as the backend reports it to the conductor


async def _noop(*_args) -> None:
    return None


def _records(job_id: int):
    """The managed job's queue records, as `sky.jobs.queue_v2` returns them."""
    from sky.jobs import state
    from sky.schemas.api.responses import ManagedJobRecord

    rows, _ = state.get_managed_jobs_with_filters(job_ids=[job_id])
    return [ManagedJobRecord(**row) for row in rows]


def _new_job(name: str) -> int:
    from sky.jobs import state

    job_id = state.set_job_info_without_job_id(name, "default", "meetara", None, None, None)
    state.set_pending(job_id, 0, name, "resources", "{}")
    return job_id


def test_recoveries_follow_skypilots_recovery_count() -> None:
    """SkyPilot's own state transitions (sky/jobs/state.py): each preemption recovery it completes adds
    one to `recovery_count`; `recoveries` also counts the episode under way while RECOVERING."""
    from sky.jobs import state

    from launcher.backends.skypilot import job_status

    async def scenario() -> list[tuple[JobState, int]]:
        seen = []
        job_id = _new_job("default-j1")
        seen.append(job_status(_records(job_id)))
        await state.set_starting_async(job_id, 0, "ts", time.time(), "resources", {}, _noop)
        await state.set_started_async(job_id, 0, time.time(), _noop)
        seen.append(job_status(_records(job_id)))
        for _ in range(2):  # two preemptions, each recovered by SkyPilot itself
            await state.set_recovering_async(job_id, 0, False, _noop)
            seen.append(job_status(_records(job_id)))
            await state.set_recovered_async(job_id, 0, time.time(), _noop)
            seen.append(job_status(_records(job_id)))
        # SkyPilot's controller restarted: an episode of its own, which it does not count when done
        await state.set_recovering_async(job_id, 0, True, _noop, recovery_source=state.RecoverySource.RESTART)
        seen.append(job_status(_records(job_id)))
        await state.set_recovered_async(job_id, 0, time.time(), _noop)
        seen.append(job_status(_records(job_id)))
        return [(s.state, s.recoveries) for s in seen]

    assert asyncio.run(scenario()) == [
        (JobState.PENDING, 0),
        (JobState.RUNNING, 0),
        (JobState.RECOVERING, 1),
        (JobState.RUNNING, 1),
        (JobState.RECOVERING, 2),
        (JobState.RUNNING, 2),
        (JobState.RECOVERING, 3),  # under way: counted (the conductor keeps the highest seen)
        (JobState.RUNNING, 2),
    ]


@pytest.mark.parametrize(
    ("code", "state"),
    [
        (EXIT_FAILED, JobState.FAILED),
        (EXIT_BAD_INPUT, JobState.FAILED),
        (EXIT_BUDGET, JobState.FAILED),
        (EXIT_INTERRUPTED, JobState.PREEMPTED),  # checkpointed on SIGTERM: the conductor relaunches it
    ],
)
def test_exit_codes_as_skypilot_records_them(code, state) -> None:
    """A FAILED job with the failure reason SkyPilot's controller writes (controller.py: 'Job exited with
    exit code N (user program failure). ...')."""
    from sky.jobs import state as sky_state

    from launcher.backends.skypilot import job_status

    job_id = _new_job(f"exit-{code}")
    sky_state.set_failed(
        job_id,
        0,
        sky_state.ManagedJobStatus.FAILED,
        f"Job exited with exit code {code} (user program failure). To see the details, run: "
        f"sky jobs logs --controller {job_id}",
    )
    st = job_status(_records(job_id))
    assert (st.state, st.exit_code, st.recoveries) == (state, code, 0)
    assert st.ended_at is not None and "\n" not in st.detail


# (3) the catalog rows: real figures, SkyPilot's validation, a one-line refusal


def test_snapshot_rows_of_all_three_providers_pass_skypilot(offers) -> None:
    cat = build_catalog(offers)
    assert set(cat.rows) == set(PROVIDERS)
    for rows in cat.rows.values():
        assert all(r["vCPUs"] > 0 and r["MemoryGiB"] > 0 for r in rows)
    markets = sum(
        (r["Price"] is not None) + (r["SpotPrice"] is not None) for rs in cat.rows.values() for r in rs
    )
    assert check_catalog_rows(offers) == markets > 0


def test_refs_carry_the_offers_figures_and_old_records_still_load(offers) -> None:
    prefs = Preferences(fallbacks=8)
    refs = _refs(_plan(offers, prefs, domains=("nutrition", "legal", "finance")))
    by_key = {(o.provider, o.instance_type, o.region, o.gpu_count): o for o in offers}
    for r in refs:
        o = by_key[(r.provider, r.instance_type, r.region, r.gpu_count)]
        assert (r.vcpus, r.mem_gib) == (o.vcpus, o.mem_gib) and r.vcpus > 0 and r.mem_gib > 0

    # a run record saved before OfferRefs kept vCPUs and memory
    old = [OfferRef.model_validate(json.loads(r.model_dump_json(exclude={"vcpus", "mem_gib"}))) for r in refs]
    assert all(r.vcpus == 0 and r.mem_gib == 0 for r in old)
    for o in offers_from_refs(old):
        vcpus, mem = machine_shape(o)
        assert vcpus > 0 and mem > 0
    assert check_catalog_rows(old) == len({(r.provider, r.instance_type, r.region, r.spot) for r in old})

    # a machine the snapshot does not know: the smallest per-GPU figures of its provider and GPU
    (unknown,) = offers_from_refs([old[0].model_copy(update={"instance_type": "99999999", "gpu_count": 2})])
    vcpus, mem = machine_shape(unknown)
    same = [o for o in offers if o.provider == unknown.provider and o.gpu == unknown.gpu]
    assert vcpus == pytest.approx(2 * min(o.vcpus / o.gpu_count for o in same), abs=0.05)
    assert mem == pytest.approx(2 * min(o.mem_gib / o.gpu_count for o in same), abs=0.05)


def test_a_row_with_no_memory_is_one_line_bad_input(offers, monkeypatch) -> None:
    from launcher import skycatalog

    refs = _refs(_plan(offers, Preferences(spot_policy="spot")))
    monkeypatch.setattr(skycatalog, "machine_shape", lambda o: (8.0, 0.0))  # what meetara used to write
    with pytest.raises(BadInput) as e:
        check_catalog_rows(refs)
    msg = str(e.value)
    assert "\n" not in msg and "\x1b" not in msg
    assert 'The "memory" field should be positive' in msg and "memory 0.0 GiB" in msg, msg


def test_the_launch_round_trip_that_failed(offers, tmp_path, monkeypatch) -> None:
    """The issue's launch: nutrition, spot, planned on Vast. The rows the backend writes from the run's
    refs now survive the YAML round trip of `sky jobs launch`; the old all-zero rows fail it with the
    error the issue saw, and check_catalog_rows says so before any launch."""
    from launcher import skycatalog

    prefs = Preferences(spot_policy="spot")
    plan = _plan(offers, prefs)
    assert plan.jobs[0].offer.provider == "vast"
    refs = _refs(plan)
    task = _render(plan, prefs)

    write_catalogs(offers_from_refs(refs), tmp_path / "fixed", merge=True)
    with offline_sky(tmp_path / "fixed", PROVIDERS):
        launched = _as_launched(task, "default-j1")
        # the figures SkyPilot reads from the catalog for the planned machine are the offer's
        first = launched.resources[0]
        assert (float(first.cpus), float(first.memory)) == machine_shape(offers_from_refs(refs)[0])
        assert all(float(r.memory) > 0 and float(r.cpus) > 0 for r in launched.resources)

    monkeypatch.setattr(skycatalog, "machine_shape", lambda o: (0.0, 0.0))
    write_catalogs(offers_from_refs(refs), tmp_path / "zeros", merge=True)
    with offline_sky(tmp_path / "zeros", PROVIDERS), pytest.raises(ValueError, match="should be positive"):
        _as_launched(task, "default-j1")
    with pytest.raises(BadInput, match="should be positive"):
        check_catalog_rows(refs)


# (4) one name per launch: launched under it, found again by it


def _request(name: str, job_name: str | None, request_id: str):
    from sky.server.requests import payloads

    body = payloads.JobsLaunchBody(task="name: x\nrun: 'true'\n", name=job_name).model_dump_json()
    return payloads.RequestPayload(
        request_id=request_id,
        name=name,
        entrypoint="launch",
        request_body=body,
        status="RUNNING",
        created_at=0.0,
        user_id="u",
        return_value="null",
        error="null",
        pid=None,
        schedule_type="long",
    )


def test_find_waits_for_a_launch_in_flight_then_reads_the_queue(monkeypatch) -> None:
    import sky

    from launcher.backends.skypilot import SkyPilotBackend, job_named, launch_requests

    requests = [
        _request("sky.jobs.launch", "default-j10", "r-other"),
        _request("sky.jobs.queue", None, "r-queue"),
        _request("sky.jobs.launch", "default-j1", "r-mine"),
    ]
    assert launch_requests(requests, "default-j1") == ["r-mine"]
    assert launch_requests(requests, "default-j") == []

    class Rec:
        def __init__(self, job_id: int, job_name: str) -> None:
            self.job_id, self.job_name = job_id, job_name

    queue = [Rec(3, "default-j1"), Rec(4, "default-j10"), Rec(7, "default-j1"), Rec(8, "xdefault-j1")]
    assert job_named(queue, "default-j1") == "7"  # the newest of that exact name
    assert job_named(queue, "default-j2") is None

    answers = {"r-mine": ([12], None), "queue": (queue, 4, {}, 4)}
    monkeypatch.setattr(sky, "api_status", lambda all_status=False: requests)
    monkeypatch.setattr(sky, "get", lambda request_id: answers[request_id])
    seen = {}

    def queue_v2(**kw):
        seen.update(kw)
        return "queue"

    monkeypatch.setattr(sky.jobs, "queue_v2", queue_v2)
    # SkyPilot's API answers are the ones above: no API server is started for them
    monkeypatch.setattr(SkyPilotBackend, "_server", lambda self: sky)
    backend = SkyPilotBackend()
    assert backend.find("default-j1") == "12"  # the launch under way, waited for
    # a launch request that failed (sky.get raises): what it left, if anything, is in the queue
    assert backend.find("default-j10") == "4"
    monkeypatch.setattr(sky, "api_status", lambda all_status=False: [])
    assert backend.find("default-j1") == "7"
    assert seen["name_match"] == "default-j1"
    assert backend.find("default-j5") is None


def test_launch_uses_the_name_as_given(offers, tmp_path, monkeypatch) -> None:
    import sky

    from launcher.backends.skypilot import SkyPilotBackend

    prefs = Preferences(spot_policy="spot")
    plan = _plan(offers, prefs)
    task = _render(plan, prefs)
    backend = SkyPilotBackend(offers=_refs(plan), sky_home=tmp_path)
    write_catalogs(offers_from_refs(_refs(plan)), tmp_path)  # the backend merges into them at launch
    launched = {}

    def launch(t, name=None):
        launched.update(task_name=t.name, name=name)
        return "req"

    monkeypatch.setattr(SkyPilotBackend, "check", lambda self: None)
    monkeypatch.setattr(sky.jobs, "launch", launch)
    monkeypatch.setattr(sky, "get", lambda request_id: ([42], None))
    with offline_sky(tmp_path, PROVIDERS):
        assert backend.launch(task, "default-j1.l2") == "42"
        assert launched == {"task_name": "default-j1.l2", "name": "default-j1.l2"}
        with pytest.raises(BackendError, match="invalid SkyPilot job name") as e:
            backend.launch(task, "default---j1")
    assert "\n" not in str(e.value)


# (5) where SkyPilot placed a job, and meetara's record and ledger following it


def _launched_record(ref: OfferRef, tmp_path, job_id: int = 7):
    """The queue record SkyPilot's jobs controller gives a managed job launched on `ref`: a real
    CloudVmRayResourceHandle of those resources, turned into the record's fields by SkyPilot's own
    `_populate_job_record_from_handle`."""
    import sky
    from sky.backends.cloud_vm_ray_backend import CloudVmRayResourceHandle
    from sky.jobs import utils as job_utils
    from sky.schemas.api.responses import ManagedJobRecord

    from launcher.skycatalog import sky_key

    _provider, itype, region, zone, spot = sky_key(ref)
    cloud = {"vast": sky.Vast, "runpod": sky.RunPod, "lambda": sky.Lambda}[ref.provider]()
    resources = sky.Resources(cloud=cloud, instance_type=itype, region=region, zone=zone, use_spot=spot)
    handle = CloudVmRayResourceHandle(
        cluster_name=f"default-j1-{job_id}",
        cluster_name_on_cloud=f"default-j1-{job_id}-abcd",
        cluster_yaml=None,
        launched_nodes=1,
        launched_resources=resources,
    )
    job = {"job_id": job_id, "task_id": 0, "job_name": "default-j1", "status": "RUNNING", "start_at": 1.0}
    job_utils._populate_job_record_from_handle(job=job, cluster_name=handle.cluster_name, handle=handle)
    return ManagedJobRecord(**{k: v for k, v in job.items() if k in ManagedJobRecord.model_fields})


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_offer_skypilot_placed_a_job_on_is_read_back(offers, tmp_path, provider) -> None:
    from launcher.backends.skypilot import job_status
    from launcher.skycatalog import placed_index

    prefs = Preferences(providers={p: {"enabled": p == provider} for p in PROVIDERS}, fallbacks=4)
    refs = _refs(_plan(offers, prefs))
    assert len(refs) >= 2, refs
    write_catalogs(offers_from_refs(refs), tmp_path)
    with offline_sky(tmp_path, PROVIDERS):
        for i, ref in enumerate(refs):
            st = job_status([_launched_record(ref, tmp_path)])
            assert st.placed is not None, ref
            found = placed_index(refs, st.placed)
            # the same machine may be planned twice (spot, on-demand): the first of them is the one
            assert found is not None and refs[found].label == ref.label, (ref, st.placed)
            assert found <= i


def test_a_job_placed_on_a_fallback_is_recorded_and_billed_at_that_offer(
    offers, tmp_path, monkeypatch
) -> None:
    """SkyPilot's ordered failover put the job on the second offer (the first had no capacity): the run
    record names that offer, and the ledger accrues at its price from then on."""
    from datetime import UTC, datetime, timedelta

    from budgets.ledger import Ledger
    from launcher.backends.base import JobStatus
    from launcher.conductor import Conductor, Hooks
    from launcher.launch import new_run
    from launcher.money import Money
    from launcher.skycatalog import sky_key

    monkeypatch.setenv("MEETARA_STATE_DIR", str(tmp_path / "state"))
    prefs = Preferences(providers={p: {"enabled": p == "lambda"} for p in PROVIDERS}, fallbacks=4)
    plan = _plan(offers, prefs)
    rec = new_run(plan, store=STORE, endpoint_url=None, models_dir=tmp_path / "models", budget=5.0)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    (job,) = rec.jobs.values()
    first = job.offers[0]
    k, second = next((i, o) for i, o in enumerate(job.offers) if o.price_hour != first.price_hour)
    money = Money(ledger, rec, backend=None, poll_s=1)
    money.reserve_plan()
    conductor = Conductor(
        rec, backend=None, store=None, task_for=lambda j: {}, hooks=Hooks(placed=money.placed)
    )
    start = datetime(2026, 11, 30, 12, tzinfo=UTC)
    ledger.start(job.reservation_id, start)

    conductor._follow_placement(job, sky_key(second))
    assert job.offer_index == k and job.offer.label == second.label
    assert f"placed on {second.label}" in job.history[-1]
    assert ledger.reservation(job.reservation_id).rate_per_hour == pytest.approx(second.price_hour)
    accrued = ledger.accrue_until(job.reservation_id, start + timedelta(hours=1))
    assert accrued == pytest.approx(second.price_hour)
    assert [e.job for e in ledger.events(kind="placed")] == [job.name]
    # the same placement again changes nothing; a machine outside the job's offers is noted, not billed
    conductor._follow_placement(job, sky_key(second))
    assert job.offer_index == k and len(ledger.events(kind="placed")) == 1
    conductor._follow_placement(job, ("lambda", "gpu_8x_h100_sxm5", "us-east-3", None, False))
    assert job.offer_index == k and "outside its offers" in job.history[-1]
    assert JobStatus.__dataclass_fields__["placed"].default is None


# (6) a user's cancel, and the machine time SkyPilot's cluster history shows


@pytest.mark.parametrize("cancelled_by_user", [True, False])
def test_failed_controller_after_a_users_cancel_is_never_relaunched(tmp_path, monkeypatch, cancelled_by_user):
    """SkyPilot ends a job FAILED_CONTROLLER when its controller dies, which meetara relaunches (the work is
    safe in the store); after `meetara cancel` (which notes the cancel before asking SkyPilot) the same
    status ends the job CANCELLED."""
    from sky.jobs import state as sky_state

    from launcher.backends.skypilot import job_status
    from launcher.conductor import Conductor
    from launcher.launch import new_run
    from launcher.runs import request_cancel

    monkeypatch.setenv("MEETARA_STATE_DIR", str(tmp_path / "state"))
    job_id = _new_job("cancelled-j1")
    sky_state.set_failed(job_id, 0, sky_state.ManagedJobStatus.FAILED_CONTROLLER, "controller process died")
    st = job_status(_records(job_id))
    assert st.state is JobState.PREEMPTED

    prefs = Preferences(fallbacks=2)
    plan = _plan(load_snapshot(), prefs)
    rec = new_run(plan, store=STORE, endpoint_url=None, models_dir=tmp_path / "models", budget=5.0)
    (job,) = rec.jobs.values()
    job.handle, job.state = str(job_id), "RUNNING"
    if cancelled_by_user:
        request_cancel(rec.run_id, job.handle)
    request_cancel(rec.run_id, "999")  # another launch's cancel changes nothing for this one
    Conductor(rec, backend=None, store=None, task_for=lambda j: {})._finish(job, st)
    if cancelled_by_user:
        assert job.state == "CANCELLED" and "not relaunched" in job.history[-1]
    else:
        assert job.state == "planned" and job.preemptions == 1


def test_the_job_is_billed_for_its_machine_from_creation_to_teardown() -> None:
    """job_status with the cluster's usage intervals (SkyPilot's cluster history): a failed create's closed
    record, or an open one with no machine yet, does not start a job; a machine being set up does; a job
    SkyPilot finished keeps running, for the money, until its machine is torn down."""
    from sky.jobs import state

    from launcher.backends.skypilot import job_status

    async def scenario():
        job_id = _new_job("billed-j1")
        out = [job_status(_records(job_id), machine=[(100.0, 101.0)], machine_up=False)]  # refused
        # failing over, no machine yet; then the provider created one, which SkyPilot is setting up
        out.append(job_status(_records(job_id), machine=[(100.0, 101.0), (200.0, None)], machine_up=False))
        out.append(job_status(_records(job_id), machine=[(100.0, 101.0), (200.0, None)], machine_up=True))
        await state.set_starting_async(job_id, 0, "ts", time.time(), "resources", {}, _noop)
        await state.set_started_async(job_id, 0, 300.0, _noop)
        out.append(job_status(_records(job_id), machine=[(100.0, 101.0), (200.0, None)]))
        await state.set_succeeded_async(job_id, 0, 500.0, _noop)
        out.append(job_status(_records(job_id), machine=[(100.0, 101.0), (200.0, None)]))  # tearing down
        out.append(job_status(_records(job_id), machine=[(100.0, 101.0), (200.0, 530.0)]))
        return out

    pending, creating, setting_up, running, tearing_down, done = asyncio.run(scenario())
    assert pending.state is JobState.PENDING and pending.started_at is None
    assert creating.state is JobState.PENDING and creating.started_at is None
    assert setting_up.state is JobState.PENDING and setting_up.started_at.timestamp() == 200.0
    assert running.state is JobState.RUNNING and running.started_at.timestamp() == 200.0
    assert tearing_down.state is JobState.RUNNING and tearing_down.ended_at is None
    assert "torn down" in tearing_down.detail and tearing_down.exit_code is None
    assert done.state is JobState.SUCCEEDED and done.exit_code == 0
    assert (done.started_at.timestamp(), done.ended_at.timestamp()) == (200.0, 530.0)


def test_eager_next_region_relaunches_a_preempted_job_on_the_next_offer(offers, tmp_path) -> None:
    """SkyPilot's EAGER_NEXT_REGION, with meetara's plugin installed, on a rendered task: the first relaunch
    after a preemption is sent (the task the controller passes to `sdk.launch`) without the preempted
    offer, so the optimizer's first pick is the plan's next offer; the task is whole again afterwards.
    (The launch itself is replaced here by a recorder: tests/test_cloud_nodes.py runs it for real.)"""
    from launcher.skyplugin import install_recovery_fix

    install_recovery_fix()
    prefs = Preferences(providers={p: {"enabled": p == "vast"} for p in PROVIDERS}, fallbacks=4)
    plan = _plan(offers, prefs)
    write_catalogs(offers_from_refs(_refs(plan)), tmp_path)
    with offline_sky(tmp_path, PROVIDERS):
        ex = _executor(_as_launched(_render(plan, prefs), "default-j1"))
        task = ex.dag.tasks[0]
        ordered = list(task.resources)
        assert isinstance(task.resources, list) and len(ordered) >= 2
        ex._launched_resources = ordered[0].copy()  # launched where the plan put it first, then preempted
        sent: list[list] = []

        async def launch(**kwargs):
            sent.append(list(task.resources))
            return 123.0

        ex._launch = launch
        ex._cleanup_cluster = lambda: None
        assert asyncio.run(ex.recover()) == 123.0
    assert sent == [ordered[1:]]  # the preempted offer left out, the rest in the plan's order
    assert list(task.resources) == ordered
