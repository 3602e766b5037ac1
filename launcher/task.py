"""The task a job runs: tasks/train.yaml filled in from the plan, for SkyPilot or the local backend.

For SkyPilot, `resources.ordered` lists the job's planned offer and then its fallbacks, each pinned to
a cloud, region, instance type and market in SkyPilot's own naming (launcher/skycatalog.py), so SkyPilot
launches exactly what meetara priced and falls back in meetara's order. For the local backend the same
task runs as a subprocess (launcher/backends/local_runner.py): no resources, and a setup that only
checks that `train` imports, since this machine is installed already.

`resources.job_recovery` lets SkyPilot recover preemptions (it has no cap for them) but never rerun
the job after a non-zero exit: meetara's conductor relaunches an interrupted job (exit 75) and caps
all recoveries, SkyPilot's and its own, at `max_recoveries` (launcher/backends/skypilot.py).

Secrets travel by name only: the mapping and its YAML carry `AWS_SECRET_ACCESS_KEY: null`, and
`secret_values()` reads the values at launch time, in memory, for the SkyPilot backend to attach.

Importing this module is cheap: no SkyPilot, no torch. `launcher.backends.skypilot.validate_task`
builds the real `sky.Task` from what it renders.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from launcher.plan import JobPlan, OfferRef, Plan
from launcher.preferences import Preferences
from launcher.skycatalog import SKY_CLOUD, sky_accelerator, sky_instance_type, sky_location

TASK_FILE = "train.yaml"
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_SECRET_NAMES = ("AWS_SESSION_TOKEN",)  # temporary credentials carry a token as well
_LOCAL_SETUP = 'python -c "import train"  # this machine is installed already'


def load_template() -> dict[str, Any]:
    """tasks/train.yaml as a mapping (a fresh copy each call)."""
    text = (resources.files("tasks") / TASK_FILE).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def source_root() -> Path | None:
    """The meetara checkout this code runs from (what `workdir` sends to the box), or None when meetara
    is installed without its source tree (then the image must carry it: images/Dockerfile)."""
    import tasks

    root = Path(tasks.__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "train").is_dir() else None


def sky_name(name: str) -> str:
    """`name` as SkyPilot accepts it: letters, digits and single `.`, `_`, `-` between them."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    s = re.sub(r"([._-]){3,}", r"\1", s).strip("._-")
    return s or "meetara"


def sky_resource(ref: OfferRef) -> dict[str, Any]:
    """One entry of `resources.ordered`: the offer pinned to its cloud, region, instance type, market."""
    region, zone = sky_location(ref.provider, ref.region)
    infra = "/".join([SKY_CLOUD[ref.provider], region, *([zone] if zone else [])])
    acc = sky_accelerator(ref.provider, ref.instance_type, ref.gpu)
    return {
        "infra": infra,
        "instance_type": sky_instance_type(
            ref.provider, ref.instance_type, ref.gpu, ref.gpu_count, ref.gpu_name
        ),
        "accelerators": f"{acc}:{ref.gpu_count}",
        "use_spot": ref.spot,
    }


def render_task(
    plan: Plan,
    job: JobPlan,
    *,
    store: str,
    endpoint_url: str | None,
    prefs: Preferences,
    backend: Literal["local", "skypilot"],
    image: str | None = None,
    extra_envs: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The task mapping for one job of `plan` (see the module docstring). No secret values in it.

    `image` (default: the MEETARA_IMAGE environment variable) is a Docker image for the cloud box, such
    as the one images/Dockerfile builds; `extra_envs` are added to the task's envs (MEETARA_STOP_AT).
    `prefs.max_recoveries` is not in the task: the conductor holds that cap (see the module docstring).
    """
    task = load_template()
    work = plan.workload
    envs = {k: "" if v is None else str(v) for k, v in (task.get("envs") or {}).items()}
    envs.update(
        MEETARA_RUN_ID=plan.run_id,
        MEETARA_DOMAINS=",".join(job.domains),
        MEETARA_STORE=store,
        MEETARA_S3_ENDPOINT_URL=endpoint_url or "",
        MEETARA_BASE_MODEL=work.base_model,
        MEETARA_SAMPLES=str(work.samples),
        MEETARA_EPOCHS=f"{work.epochs:g}",
        MEETARA_WARM_START="1" if work.warm_start else "0",
        MEETARA_MERGED="1" if work.merged else "0",
    )
    if store.startswith("s3://"):
        from train.store import checksum_envs

        envs.update(checksum_envs())  # the box asks S3 for the checksums this machine does
    secret_names = [*(task.get("secrets") or {}), *OPTIONAL_SECRET_NAMES]
    for key, value in (extra_envs or {}).items():
        if key in secret_names:
            raise ValueError(f"{key} is a secret: it is supplied at launch, never as an env")
        envs[key] = str(value)
    task["name"] = sky_name(job.name)
    task["envs"] = envs
    root = source_root()
    if root is not None:
        task["workdir"] = str(root)
    else:
        task.pop("workdir", None)

    if backend == "local":
        # a subprocess of this machine: it inherits the environment (credentials included) and the
        # interpreter meetara runs in, so no resources, no secrets, no venv
        task.pop("resources", None)
        task.pop("secrets", None)
        task["setup"] = _LOCAL_SETUP
        envs["MEETARA_VENV"] = ""
        return task
    if backend != "skypilot":
        raise ValueError(f"unknown backend {backend!r}")

    task["secrets"] = dict.fromkeys(task.get("secrets") or {})  # names only, whatever the file said
    res = task.get("resources") or {}
    ordered: list[dict[str, Any]] = []
    for ref in [job.offer, *job.fallbacks]:
        entry = sky_resource(ref)
        if entry not in ordered:
            ordered.append(entry)
    recovery = dict(res.get("job_recovery") or {"strategy": "EAGER_NEXT_REGION"})
    # SkyPilot reruns nothing after a non-zero exit, whatever the file says (see `job_recovery` in
    # tasks/train.yaml): 1, 2 and 77 end the job, and 75 too, which the conductor then relaunches within
    # prefs.max_recoveries, the one count that SkyPilot's own preemption recoveries also go into
    recovery["max_restarts_on_errors"] = 0
    recovery["recover_on_exit_codes"] = []
    from launcher.providers.vast import DISK_GB

    # the disk meetara priced (Vast's offers include DISK_GB of storage) and its plugin bids for,
    # whatever the template says
    rendered: dict[str, Any] = {"disk_size": DISK_GB}
    image = image or os.environ.get("MEETARA_IMAGE") or None
    if image:
        rendered["image_id"] = image if image.startswith("docker:") else f"docker:{image}"
    rendered["job_recovery"] = recovery
    rendered["ordered"] = ordered  # tried in this order; `any_of` would lose it (it is a set)
    task["resources"] = rendered
    return task


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (setup, run) as `|` blocks, so the YAML reads like the template."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def task_yaml(task: dict[str, Any]) -> str:
    """The task as SkyPilot YAML text (what `sky jobs launch FILE` takes)."""
    head = f"# rendered by meetara from tasks/{TASK_FILE}; secrets are supplied at launch\n"
    return head + yaml.dump(task, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)


def secret_values() -> dict[str, str]:
    """The store credentials, from the environment or ~/.aws (boto3's own lookup), for launch time only.

    Kept in memory: the SkyPilot backend hands them to SkyPilot with the task object, never through a
    file meetara writes. Empty when there are none.
    """
    import boto3

    creds = boto3.Session().get_credentials()
    if creds is None:
        return {}
    frozen = creds.get_frozen_credentials()
    out = {
        "AWS_ACCESS_KEY_ID": frozen.access_key,
        "AWS_SECRET_ACCESS_KEY": frozen.secret_key,
        "AWS_SESSION_TOKEN": frozen.token,
    }
    return {k: v for k, v in out.items() if v}
