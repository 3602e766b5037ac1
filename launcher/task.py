"""Render a job of the plan into a SkyPilot task mapping (tasks/train.yaml filled in).

Interim version (local backend only); the full SkyPilot rendering replaces it.
"""

from __future__ import annotations

from typing import Literal

from launcher.plan import JobPlan, Plan
from launcher.preferences import Preferences


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
) -> dict:
    w = plan.workload
    envs = {
        "MEETARA_RUN_ID": plan.run_id,
        "MEETARA_DOMAINS": ",".join(job.domains),
        "MEETARA_STORE": store,
        "MEETARA_BASE_MODEL": w.base_model,
        "MEETARA_SAMPLES": str(w.samples),
        "MEETARA_EPOCHS": str(w.epochs),
        **({"MEETARA_S3_ENDPOINT_URL": endpoint_url} if endpoint_url else {}),
        **(extra_envs or {}),
    }
    return {
        "name": job.name,
        "envs": envs,
        "setup": 'python -c "import train.pipeline"',
        "run": 'python -m train --domains "$MEETARA_DOMAINS" --base-model "$MEETARA_BASE_MODEL" '
        '--samples "$MEETARA_SAMPLES" --epochs "$MEETARA_EPOCHS"',
    }
