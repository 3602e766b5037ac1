"""The SkyPilot backend: each job is a SkyPilot managed job (spot recovery, ordered fallbacks).

Written against skypilot 0.14's client SDK, where every call returns a request id that `sky.get`
resolves through SkyPilot's API server (started locally on first use). The handle is the managed job
id; the job is launched under exactly the name the conductor gives, so that `find(name)` gets the
handle back after a launcher crash. Store credentials are read at launch, attached to the in-memory
`sky.Task` the way `sky jobs launch --secret NAME` does it, and never written by meetara; SkyPilot
redacts them from its own records.

Recovery: one count, `max_recoveries`, for every relaunch of a job, whoever does it.
- SkyPilot never reruns a job after a non-zero exit (`max_restarts_on_errors: 0`,
  `recover_on_exit_codes: []`, tasks/train.yaml). Its rule cannot say "75 up to N times, never 1, 2,
  77": `StrategyExecutor.should_restart_on_failure` (sky/jobs/recovery_strategy.py) returns True for a
  code in `recover_on_exit_codes` before it looks at any counter, and counts every other non-zero exit
  against `max_restarts_on_errors`. So 1, 2 and 77 end the job FAILED; so does 75 (SIGTERM after a
  checkpoint), which `job_status` reports as PREEMPTED, like the local backend: the conductor relaunches
  it on the next offer, counted with its other relaunches.
- Preemptions (the machine gone, the cluster no longer UP) SkyPilot recovers itself, with no cap: the
  controller (sky/jobs/controller.py, `_monitor_one_task_impl`) goes to RECOVERING and calls
  `executor.recover()`, which for EAGER_NEXT_REGION retries until a machine is up. Each completed
  recovery of a preemption adds one to the managed job's `recovery_count` (sky/jobs/state.py,
  `set_recovered_async`). `job_status` reports them as `SkyJobStatus.recoveries`: `recovery_count`,
  plus one while the job is RECOVERING (an episode under way is not in `recovery_count` yet). The
  conductor adds them to its own relaunches and cancels the job once the sum passes `max_recoveries`.

Credentials: SkyPilot's checks read files, not environment variables: Lambda `~/.lambda_cloud/
lambda_keys` (`api_key = ...`), RunPod `~/.runpod/config.toml` (`[default] api_key`), Vast
`~/.config/vastai/vast_api_key` (sky/clouds/*.py). `doctor()` reports them offline.
"""

from __future__ import annotations

import configparser
import copy
import importlib.util
import io
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import skyserver
from launcher.backends.base import BackendError, JobState, JobStatus
from train import first_line

if TYPE_CHECKING:
    from launcher.offers import Offer
    from launcher.plan import OfferRef

INSTALL_HINT = 'SkyPilot is not installed: pip install "meetara[cloud]"'
RSYNC_HINT = "rsync is missing: SkyPilot copies job files with it (apt install rsync)"
# the one SkyPilot meetara's catalogs, plugin and recovery rules are written and tested against
# (pyproject's cloud extra pins it; tests/test_skyserver.py checks the two agree)
SKYPILOT_VERSION = "0.14.1"
# the files SkyPilot's own credential checks read, and the variable meetara's fetchers also accept
SKY_CREDENTIALS = {
    "lambda": ("~/.lambda_cloud/lambda_keys", "LAMBDA_API_KEY"),
    "runpod": ("~/.runpod/config.toml", "RUNPOD_API_KEY"),
    "vast": ("~/.config/vastai/vast_api_key", "VAST_API_KEY"),
}
STORE_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

# SkyPilot's ManagedJobStatus values -> meetara's JobState, with why where the mapping is a choice
_STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "SUBMITTED": JobState.PENDING,  # DEPRECATED_SUBMITTED, still in old job tables
    "STARTING": JobState.PENDING,  # the controller is provisioning the machine
    "RUNNING": JobState.RUNNING,  # setting up or running
    "WINDING_DOWN": JobState.RUNNING,
    "RECOVERING": JobState.RECOVERING,  # preempted; SkyPilot is relaunching it
    "CANCELLING": JobState.RUNNING,  # the machine is still up (and billed) until CANCELLED
    "SUCCEEDED": JobState.SUCCEEDED,
    "CANCELLED": JobState.CANCELLED,
    "FAILED": JobState.FAILED,  # `run` exited non-zero (SkyPilot reruns nothing); 75: PREEMPTED, below
    "FAILED_SETUP": JobState.FAILED,
    "FAILED_PRECHECKS": JobState.FAILED,  # the task or the credentials are wrong: relaunching won't help
    # no listed offer had capacity, or the controller died under the job: the work is safe in the
    # store and a relaunch (on the next offer) resumes it, which is what PREEMPTED asks the conductor for
    "FAILED_NO_RESOURCE": JobState.PREEMPTED,
    "FAILED_CONTROLLER": JobState.PREEMPTED,
}
_EXIT_CODE = re.compile(r"exit codes?\D{0,3}(\d+)", re.I)
BILLED_RETRY_S = 60.0  # a provider's instance listing that failed is asked again this much later
LISTING_RECHECK_S = 10.0  # ... one that did not list the machine yet (provisioning), this much later
log = logging.getLogger("meetara.skypilot")
EXIT_INTERRUPTED = 75  # `python -m train` got SIGTERM and checkpointed: relaunching resumes it


@dataclass(frozen=True)
class SkyJobStatus(JobStatus):
    """A JobStatus with the recoveries SkyPilot made of this managed job itself (see the module
    docstring): `recovery_count`, plus one while it is RECOVERING. A recovery SkyPilot starts for its
    own sake (its controller restarted) shows here while under way and is then not counted by SkyPilot,
    so the figure can drop by one: the conductor keeps the highest it has seen per launch."""

    recoveries: int = 0


def available() -> bool:
    """SkyPilot is installed (found, not imported: `import sky` takes seconds)."""
    return importlib.util.find_spec("sky") is not None


def sky_version() -> str | None:
    return skyserver._installed()


def version_problem(found: str | None) -> str | None:
    """Why the installed SkyPilot cannot be used by meetara (one line with the fix), or None."""
    if found is None:
        return INSTALL_HINT
    if found != SKYPILOT_VERSION:
        return (
            f"meetara needs skypilot {SKYPILOT_VERSION} (its catalogs, provisioner fixes and recovery "
            f"rules are written for it), found {found}: "
            f'pip install "skypilot[lambda,runpod,vast]=={SKYPILOT_VERSION}"'
        )
    return None


def _credential_file(provider: str) -> Path | None:
    """The provider's credential file if SkyPilot's check would find a key in it."""
    path = Path(SKY_CREDENTIALS[provider][0]).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    if provider == "lambda":
        ok = any(line.split(" = ")[0].strip() == "api_key" for line in text.splitlines() if " = " in line)
    elif provider == "runpod":
        import tomllib

        try:
            ok = "api_key" in (tomllib.loads(text).get("default") or {})
        except tomllib.TOMLDecodeError:
            ok = False
    else:
        ok = bool(text.strip())
    return path if ok else None


def configured_clouds() -> list[str]:
    """Providers whose credential file SkyPilot's own check accepts (offline: files only, no API call)."""
    return [p for p in SKY_CREDENTIALS if _credential_file(p) is not None]


def store_credentials() -> tuple[list[str], str]:
    """(names of the store credentials found, where), offline: the environment, then ~/.aws/credentials."""
    names = [n for n in (*STORE_SECRETS, "AWS_SESSION_TOKEN") if os.environ.get(n)]
    if all(n in names for n in STORE_SECRETS):
        return names, "environment"
    path = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials").expanduser()
    profile = os.environ.get("AWS_PROFILE") or "default"
    cp = configparser.ConfigParser()
    try:
        cp.read(path, encoding="utf-8")
    except configparser.Error:
        return names, "environment"
    if cp.has_option(profile, "aws_access_key_id") and cp.has_option(profile, "aws_secret_access_key"):
        return list(STORE_SECRETS), f"{path} [{profile}]"
    return names, "environment"


def doctor() -> list[tuple[str, bool, str]]:
    """(check, ok, detail) rows about SkyPilot, provider credentials and store credentials. Offline:
    only the presence of packages and files is looked at, never a value, never the network."""
    version = sky_version()
    problem = version_problem(version) if version is not None else None
    rows: list[tuple[str, bool, str]] = [
        (
            "skypilot",
            version is not None and problem is None,
            problem or version or f"missing: {INSTALL_HINT.split(': ', 1)[1]} (cloud jobs)",
        )
    ]
    for provider, (file, var) in SKY_CREDENTIALS.items():
        found = _credential_file(provider)
        if found is not None:
            rows.append((f"{provider} for SkyPilot", True, f"enabled ({file})"))
        elif os.environ.get(var):
            rows.append((f"{provider} for SkyPilot", False, f"{var} is set, but SkyPilot reads {file}"))
        else:
            rows.append((f"{provider} for SkyPilot", False, f"no credentials ({file})"))
    if version is not None:
        rsync = shutil.which("rsync")
        rows.append(("rsync", rsync is not None, rsync or RSYNC_HINT))
    rows.extend(server_rows())
    names, where = store_credentials()
    if all(n in names for n in STORE_SECRETS):
        rows.append(("store credentials", True, f"{', '.join(names)} from {where}"))
    else:
        rows.append(
            (
                "store credentials",
                False,
                "none for s3:// stores: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
            )
        )
    return rows


def server_rows() -> list[tuple[str, bool, str]]:
    """doctor rows for meetara's own SkyPilot: its API server, the catalogs meetara wrote for it, and
    whether the user's own SkyPilot catalogs hold rows an older meetara wrote there."""
    try:
        ok, detail = skyserver.describe(skyserver.state())
    except skyserver.SkyServerError as e:
        return [("SkyPilot API server", False, str(e))]
    rows = [("SkyPilot API server", ok, detail)]
    from launcher.skycatalog import CATALOG_COLUMNS, catalog_dir

    home = skyserver.runtime_dir()
    counts = []
    for cloud in CATALOG_COLUMNS:
        path = catalog_dir(home) / cloud / "vms.csv"
        if path.exists():
            with path.open(encoding="utf-8", errors="replace") as f:
                n = max(sum(1 for _ in f) - 1, 0)
            when = datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y-%m-%d %H:%M UTC")
            counts.append(f"{cloud} {n} rows ({when})")
    written = "; ".join(counts) if counts else "none yet (written at each cloud launch)"
    rows.append(("SkyPilot catalogs", True, f"meetara's, in {catalog_dir(home)}: {written}"))
    user = catalog_dir(Path.home())
    edited = [
        c
        for c in CATALOG_COLUMNS
        if (user / c / "vms.csv").exists() and not (user / ".meta" / c / "vms.csv.md5").exists()
    ]
    if edited and user != catalog_dir(home):
        rows.append(
            (
                "your SkyPilot catalogs",
                False,
                f"{', '.join(edited)} in {user} were edited (an older meetara wrote its offers there); "
                "SkyPilot will not refresh them: delete those vms.csv files",
            )
        )
    return rows


def _import_sky():
    try:
        import sky
    except ImportError:
        raise BackendError(INSTALL_HINT) from None
    return sky


def validate_task(task: dict[str, Any]):
    """A real `sky.Task` built from a rendered task mapping (launcher/task.py): SkyPilot's schema,
    names, instance types and regions (against its catalogs) are checked. Secret names stay
    unresolved references."""
    return _import_sky().Task.from_yaml_config(copy.deepcopy(task))


def cluster_name_problem(job_name: str) -> str | None:
    """Why SkyPilot's jobs controller would refuse the cluster it names after a launch of `job_name` (the
    conductor launches `<job>-<8 hex>`; the controller makes `<name cut to 30>-<job id>` and checks it with
    `check_cluster_name_is_valid`, after the money is reserved), in one line; None if it takes it. Uses
    SkyPilot's own two functions."""
    from sky.jobs import utils as managed_job_utils
    from sky.utils import common_utils

    cluster = managed_job_utils.generate_managed_job_cluster_name(f"{job_name}-0123abcd", 1)
    try:
        common_utils.check_cluster_name_is_valid(cluster)
    except Exception:  # InvalidClusterNameError: its text names SkyPilot's regex, not the fix
        return (
            f"SkyPilot cannot name a cluster after job {job_name!r} (it would be {cluster!r}): "
            "a cloud run id must start with a letter, e.g. --run-id run-" + job_name.rsplit("-j", 1)[0]
        )
    return None


def _when(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts else None


class SkyPilotBackend:
    """Managed jobs on Lambda / RunPod / Vast through SkyPilot. Stateless: the handle is the job id."""

    name = "skypilot"

    def __init__(
        self,
        offers: Sequence[Offer | OfferRef] | None = None,
        sky_home: Path | None = None,
        max_parallel: int | None = None,
    ) -> None:
        # the offers the plan was made from (or the run's OfferRefs): merged into SkyPilot's catalogs
        # before a launch, so that it knows and prices every machine a task names (Vast's instance
        # types are per offer, so SkyPilot's stock catalog never has them)
        self.offers = list(offers or [])
        self.sky_home = sky_home
        self.max_parallel = max_parallel or int(os.environ.get("MEETARA_CLOUD_PARALLEL", "64"))
        self.log_poll_s = 30.0  # each read is an API call to the jobs controller
        # SkyPilot's controller tears a cancelled job's machine down after the cancel (5-10 s measured):
        # its status says RUNNING until the cluster is gone (`job_status`), the provider bills until then
        self.teardown_s = 90.0
        # job id -> (recoveries, its machines' usage intervals) read once while it runs on that machine
        self._machines: dict[int, tuple[int, list[tuple[float, float | None]]]] = {}
        # (cluster name on the cloud, recoveries) -> the $/h its provider bills; and when its provider's
        # listing was last asked, and whether that failed
        self._billed: dict[tuple[str, int], float] = {}
        self._billed_asked: dict[tuple[str, int], tuple[float, bool]] = {}
        self._server_ok = False

    def check(self) -> None:
        """Raise a one-line BackendError unless SkyPilot is installed and some provider has credentials."""
        problem = version_problem(sky_version()) if available() else INSTALL_HINT
        if problem:
            raise BackendError(problem)
        if shutil.which("rsync") is None:
            raise BackendError(RSYNC_HINT)
        if not configured_clouds():
            files = ", ".join(f for f, _ in SKY_CREDENTIALS.values())
            raise BackendError(f"no cloud credentials for SkyPilot: put an API key in one of {files}")

    def sky_task(self, task: dict[str, Any], secrets: dict[str, str] | None = None):
        """The `sky.Task` for a rendered task, its secret names filled from `secrets` (in memory)."""
        sky = _import_sky()
        config = copy.deepcopy(task)
        names = list((config.get("secrets") or {}).keys())
        values = {k: v for k, v in (secrets or {}).items() if v}
        missing = [n for n in names if n not in values]
        if missing and str((config.get("envs") or {}).get("MEETARA_STORE", "")).startswith("s3://"):
            raise BackendError(
                f"no value for {', '.join(missing)}: the job needs store credentials "
                "(environment or ~/.aws/credentials)"
            )
        for n in missing:  # an unneeded, unset name would be an unresolved secret reference
            config["secrets"].pop(n)
        if not config.get("secrets"):
            config.pop("secrets", None)
        # as `sky jobs launch --secret NAME`: the overrides turn the null references into values on
        # the Task object; the YAML SkyPilot keeps as the user's is dumped before they are applied
        overrides = [(k, v) for k, v in values.items() if k in names or k == "AWS_SESSION_TOKEN"]
        try:
            return sky.Task.from_yaml_config(config, secrets_overrides=overrides or None)
        except (ValueError, KeyError) as e:
            raise BackendError(f"invalid task: {first_line(e)}") from None

    def _write_catalogs(self) -> None:
        if not self.offers:
            return
        from launcher.skycatalog import offers_from_refs, write_catalogs

        write_catalogs(offers_from_refs(self.offers), self.sky_home or skyserver.runtime_dir(), merge=True)

    def _server(self):
        """SkyPilot, talking to meetara's own API server (launcher/skyserver.py), started if need be."""
        if not self._server_ok:
            try:
                skyserver.activate()  # before SkyPilot is imported
                _import_sky()
                skyserver.ensure_running()
            except skyserver.SkyServerError as e:
                raise BackendError(str(e)) from None
            self._server_ok = True
        return _import_sky()

    def ready(self) -> None:
        """Raise a one-line BackendError unless a launch could go ahead: SkyPilot installed, a provider's
        credentials, meetara's SkyPilot API server up (started here if nothing holds its port)."""
        self.check()
        self._server()

    def launch(self, task: dict, name: str) -> str:
        """Launch the task as managed job `name`, exactly (BackendError if SkyPilot refuses the name)."""
        from launcher.task import secret_values

        self.check()
        sky = self._server()
        self._write_catalogs()
        sky_task = self.sky_task({**task, "name": name}, secret_values())
        try:
            sky_task.validate_name()  # SkyPilot's own rule, which `sky jobs launch` applies to the job
        except ValueError as e:
            raise BackendError(f"invalid SkyPilot job name {name!r}: {first_line(e)}") from None
        try:
            request_id = sky.jobs.launch(sky_task, name=name)
            job_ids, _controller = sky.get(request_id)
        except BackendError:
            raise
        except Exception as e:  # NoCloudAccessError, ResourcesUnavailableError, API server errors
            raise BackendError(f"SkyPilot could not launch {name}: {first_line(e)}") from None
        if not job_ids:
            raise BackendError(f"SkyPilot launched {name} but returned no job id")
        return str(job_ids[0])

    def find(self, name: str) -> str | None:
        """The handle of the managed job launched under `name` (the newest, if several), or None.

        A launch whose request SkyPilot's API server is still running (the launcher died while it waited)
        is waited for, so that a job is never launched twice under one name."""
        sky = self._server()
        try:
            requests = sky.api_status(all_status=False)  # the requests not finished yet
        except Exception as e:
            raise BackendError(f"SkyPilot requests: {first_line(e)}") from None
        for request_id in launch_requests(requests, name):
            try:
                job_ids, _controller = sky.get(request_id)
            except Exception:  # that launch failed: whatever it left is in the queue below
                continue
            if job_ids:
                return str(job_ids[0])
        try:
            records, *_ = sky.get(
                sky.jobs.queue_v2(refresh=False, name_match=name, fields=["job_id", "job_name", "status"])
            )
        except Exception as e:
            raise BackendError(f"SkyPilot job queue: {first_line(e)}") from None
        return job_named(records, name)

    def _job_id(self, handle: str) -> int:
        if not str(handle).isdigit():
            raise BackendError(f"not a SkyPilot managed job id: {handle!r}")
        return int(handle)

    def status(self, handle: str) -> JobStatus:
        sky = self._server()
        job_id = self._job_id(handle)
        fields = [
            "job_id", "task_id", "job_name", "status", "submitted_at", "start_at", "end_at",
            "recovery_count", "failure_reason", "details", "last_recovered_at",
            # where SkyPilot placed it (`placement`): read from the cluster's handle
            "cloud", "region", "zone", "cluster_resources_full",
            # the name its provider lists the machine under (`billed_hour`)
            "cluster_name_on_cloud",
        ]  # fmt: skip
        try:
            records, *_ = sky.get(sky.jobs.queue_v2(refresh=False, job_ids=[job_id], fields=fields))
        except Exception as e:
            raise BackendError(f"SkyPilot job queue: {first_line(e)}") from None
        mine = [r for r in records if r.job_id == job_id]
        if not mine:
            raise BackendError(f"no SkyPilot managed job {job_id}")
        rec = mine[-1]
        status = str(getattr(rec.status, "value", rec.status))
        state = _STATES.get(status)
        # SkyPilot's cluster records, asked for only where they change the answer (each is an API call, at
        # every poll): a machine being provisioned, the first poll of a running job, a finished job
        machine_up, machine = None, None
        cached = self._machines.get(job_id)
        if status == "STARTING":
            # the provider created a machine: SkyPilot's handle knows its address, or the provider lists it
            # (billed from its creation, while SkyPilot still waits for it to boot)
            machine_up = self._machine_up(rec) or self._billed_hour(rec) is not None
            machine = self._machine_time(rec) if machine_up else None
        elif state is JobState.RUNNING and cached is not None and cached[0] == rec.recovery_count:
            machine = cached[1]
        elif state is not JobState.PENDING:
            machine = self._machine_time(rec)
            if machine and state is JobState.RUNNING:  # until a recovery gives it another machine
                self._machines[job_id] = (rec.recovery_count, machine)
        st = job_status(mine, machine=machine, machine_up=machine_up)
        if st.started_at is not None and (state is JobState.RUNNING or machine_up):
            st = replace(st, billed_hour=self._billed_hour(rec))
        return st

    def _billed_hour(self, rec: Any) -> float | None:
        """What the job's machine costs an hour as its provider bills it, from the provider's own
        instance listing (SkyPilot names a node `<cluster name on the cloud>-head`): asked once per
        machine once listed; None where the provider or the name is not known yet or the provider lists
        no such machine (asked again `LISTING_RECHECK_S` later). A failed listing never fails the status:
        it is logged and asked again `BILLED_RETRY_S` later."""
        from launcher import providers
        from launcher.skycatalog import PROVIDER_OF

        provider = PROVIDER_OF.get(str(getattr(rec, "cloud", None) or "").lower())
        name = getattr(rec, "cluster_name_on_cloud", None)
        if provider is None or not name or name == "-":
            return None
        key = (str(name), int(getattr(rec, "recovery_count", 0) or 0))
        if key in self._billed:
            return self._billed[key]
        asked, failed = self._billed_asked.get(key, (-math.inf, False))
        if time.monotonic() - asked < (BILLED_RETRY_S if failed else LISTING_RECHECK_S):
            return None
        try:
            billed = providers.billed_hour(provider, f"{name}-head")
        except Exception as e:  # the provider's listing is bookkeeping: the job goes on
            log.warning("%s: its billed rate is unknown for now (%s)", provider, first_line(e))
            self._billed_asked[key] = (time.monotonic(), True)
            return None
        self._billed_asked[key] = (time.monotonic(), False)
        if billed is not None:
            self._billed[key] = billed
        return billed

    def _cluster_name(self, rec: Any) -> str:
        from sky.jobs import utils as managed_job_utils

        return managed_job_utils.generate_managed_job_cluster_name(str(rec.job_name), int(rec.job_id))

    def _machine_up(self, rec: Any) -> bool:
        """Whether the job's cluster has a machine now (its handle knows the head's address: the provider
        created it), while SkyPilot is still provisioning or setting it up."""
        sky = self._server()
        try:
            clusters = sky.get(sky.status(cluster_names=[self._cluster_name(rec)], all_users=True))
        except Exception:
            return False
        return any(getattr(getattr(c, "handle", None), "head_ip", None) for c in clusters or [])

    def _machine_time(self, rec: Any) -> list[tuple[float, float | None]] | None:
        """When the job's cluster was up, from SkyPilot's own cluster history (its usage intervals: from the
        cluster's creation, before provisioning, to its teardown; None end: still up), which is what the
        provider bills; None where the history cannot be read (the job's own times then stand)."""
        from sky.server import common as server_common
        from sky.server.requests import payloads

        sky = self._server()
        name = self._cluster_name(rec)
        try:
            body = payloads.CostReportBody(days=30, cluster_names=[name])
            response = server_common.make_authenticated_request(
                "POST", "/cost_report", json=json.loads(body.model_dump_json())
            )
            reports = sky.get(server_common.get_request_id(response))
        except Exception:  # an older server without the filter, or a hiccup: the job's times stand
            return None
        out: list[tuple[float, float | None]] = []
        for report in reports or []:
            if report.get("name") != name:
                continue
            for start, end in report.get("usage_intervals") or []:
                if start is not None:
                    # whole seconds, truncated: the machine was up until the end of the recorded second
                    out.append((float(start), None if end is None else float(end) + 1.0))
        return sorted(out, key=lambda iv: iv[0])

    def cancel(self, handle: str) -> None:
        sky = self._server()
        try:
            sky.get(sky.jobs.cancel(job_ids=[self._job_id(handle)]))
        except Exception as e:
            raise BackendError(f"SkyPilot cancel {handle}: {first_line(e)}") from None

    def stream_logs(
        self, handle: str, write: Callable[[str], object], *, tail: int | None = None, follow: bool = True
    ) -> None:
        """Write the job's log (its last `tail` lines; all when None) to `write`; with `follow`, until
        the job ends (`meetara logs --follow`)."""
        sky = self._server()

        class _Out(io.TextIOBase):
            def write(self, text: str) -> int:
                write(text)
                return len(text)

        try:
            sky.jobs.tail_logs(job_id=self._job_id(handle), follow=follow, tail=tail, output_stream=_Out())
        except Exception as e:
            raise BackendError(f"SkyPilot logs {handle}: {first_line(e)}") from None

    def logs(self, handle: str, tail: int = 50) -> str:
        sky = self._server()
        out = io.StringIO()
        try:
            sky.jobs.tail_logs(job_id=self._job_id(handle), follow=False, tail=tail, output_stream=out)
        except Exception as e:
            raise BackendError(f"SkyPilot logs {handle}: {first_line(e)}") from None
        return out.getvalue()


def launch_requests(requests: Sequence[Any], name: str) -> list[str]:
    """The ids of the `sky.jobs.launch` requests among `requests` (SkyPilot's request list) that launch
    a managed job called `name`, read from each request's body (JSON, shown to the request's owner).
    Only the name is looked at: the body also carries the task."""
    from sky.server.constants import REQUEST_NAME_PREFIX
    from sky.server.requests.request_names import RequestName

    launch = REQUEST_NAME_PREFIX + RequestName.JOBS_LAUNCH.value  # "sky.jobs.launch"
    out = []
    for req in requests:
        if req.name != launch:
            continue
        try:
            body = json.loads(req.request_body or "null")
        except ValueError:
            continue
        if isinstance(body, dict) and body.get("name") == name:
            out.append(req.request_id)
    return out


def job_named(records: Sequence[Any], name: str) -> str | None:
    """The newest managed job called exactly `name` among queue records (SkyPilot's `name_match` is a
    substring match: "run-j1" also finds "run-j10"), as a handle; None if there is none."""
    ids = [int(r.job_id) for r in records if getattr(r, "job_name", None) == name]
    return str(max(ids)) if ids else None


_NOT_ENABLED = re.compile(r"requires (\w+) which is not enabled", re.I)


def _explain(reason: str) -> str:
    """SkyPilot's reason in meetara's terms where it names a fix meetara's user cannot run as written:
    a provider "not enabled" means SkyPilot's credential check for it failed (its API refused the key);
    `sky check` would look at the user's own SkyPilot, not meetara's."""
    m = _NOT_ENABLED.search(reason)
    if m and m.group(1).lower() in SKY_CREDENTIALS:
        provider = m.group(1).lower()
        return (
            f"{provider} refused the credentials (SkyPilot's check of {provider} failed): check the API key "
            f"in {SKY_CREDENTIALS[provider][0]}"
        )
    return reason


def job_status(
    records: Sequence[Any],
    machine: Sequence[tuple[float, float | None]] | None = None,
    machine_up: bool | None = None,
) -> SkyJobStatus:
    """One status from a managed job's queue records (one per task; meetara's jobs have one).

    FAILED with exit code 75 is PREEMPTED: the job checkpointed on SIGTERM and SkyPilot (told to rerun
    nothing) ended it; the conductor relaunches it within its recovery cap. `recoveries` counts
    SkyPilot's own preemption recoveries (see the module docstring).

    `machine`: the job's cluster's usage intervals (SkyPilot's cluster history). Providers bill from the
    machine's creation to its teardown, so the job starts when its first cluster was created (provisioning
    and runtime set-up are paid for), and a job SkyPilot has finished is still running, for the money,
    until its cluster is torn down (the controller does that after it records the end). While SkyPilot
    has not started the job, its cluster's record counts only once `machine_up` (the provider created a
    machine): failing over between offers that refuse the create also keeps a record open."""
    rec = records[-1]
    status = str(getattr(rec.status, "value", rec.status))
    state = _STATES.get(status)
    if state is None:
        raise BackendError(f"unknown SkyPilot job status {status!r}")
    reason = rec.failure_reason or rec.details or ""
    exit_code = None
    if state is JobState.SUCCEEDED:
        exit_code = 0
    elif status == "FAILED":
        m = _EXIT_CODE.search(reason)
        exit_code = int(m.group(1)) if m else None
        if exit_code == EXIT_INTERRUPTED:
            state = JobState.PREEMPTED
    recoveries = int(rec.recovery_count or 0) + (status == "RECOVERING")
    detail = status
    if recoveries:
        detail += f", recovered {recoveries}x" if status != "RECOVERING" else f", recovery {recoveries}"
    if reason:
        detail += f": {_explain(first_line(Exception(reason)))}"
    started = min((r.start_at for r in records if r.start_at), default=None)
    ended = rec.end_at if state.finished else None
    # the machines that count: up while the job ran, or up now with a machine the provider created (a job
    # that never got one must not look started: its money is released when it ends without one)
    billed = [
        (b, e)
        for b, e in machine or ()
        if (started is not None and (e is None or e >= started)) or (e is None and machine_up)
    ]
    if billed:
        started = min(b for b, _e in billed) if started is None else min(started, *(b for b, _e in billed))
        if state.finished:
            if any(e is None for _b, e in billed):
                # finished for SkyPilot, but its machine is still up (and billed) until the teardown
                detail += "; its machine is being torn down"
                state, exit_code, ended = JobState.RUNNING, None, None
            else:
                ended = max([e for _b, e in billed if e is not None] + ([ended] if ended else []))
    placed = placement(rec)
    return SkyJobStatus(
        state=state,
        started_at=_when(started),
        ended_at=_when(ended),
        exit_code=exit_code,
        detail=detail,
        recoveries=recoveries,
        placed=placed,
        # the newest machine's creation (a recovery's; SkyPilot keeps one cluster name per job)
        machine_since=_when(max(b for b, _e in billed)) if billed else None,
    )


# SkyPilot's `cluster_resources_full` (sky/utils/resources_utils.py, format_resource), e.g.
# "1x[spot](gpus=RTX3090:1, cpus=8, mem=32.1, 1x-RTX_3090-m30566120-0, disk=50)": the instance type is
# the first element that is not `key=value`
_LAUNCHED = re.compile(r"^\d+x(\[spot\])?\((.*)\)$", re.S)


def placement(rec: Any) -> tuple[str, str, str, str | None, bool] | None:
    """Where SkyPilot launched a managed job, from its queue record (the fields SkyPilot fills from the
    cluster's handle once it is up: cloud, region, zone, `cluster_resources_full`), in meetara's
    `skycatalog.sky_key` terms; None while nothing is launched."""
    from launcher.skycatalog import PROVIDER_OF

    cloud = str(getattr(rec, "cloud", None) or "").lower()
    region = getattr(rec, "region", None)
    m = _LAUNCHED.match(str(getattr(rec, "cluster_resources_full", None) or "").strip())
    if cloud not in PROVIDER_OF or region in (None, "-") or m is None:
        return None
    itype = next((e for e in (x.strip() for x in m.group(2).split(",")) if e and "=" not in e), None)
    if itype is None:
        return None
    zone = getattr(rec, "zone", None)
    zone = None if zone in (None, "-") else str(zone)
    return PROVIDER_OF[cloud], itype, str(region), zone, m.group(1) is not None
