"""Provider preferences: what the ops team allows and prefers, in a YAML file it can keep in version
control, overridable by environment variables and flags.

Where the file is: `--config`, else `MEETARA_CONFIG`, else `./meetara.yaml` if present, else
`~/.config/meetara/config.yaml`. A missing file means the defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from train import BadInput

PROVIDERS = ("lambda", "runpod", "vast")
Provider = Literal["lambda", "runpod", "vast"]
SpotPolicy = Literal["spot", "on-demand", "auto"]


class ProviderPrefs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    weight: float = Field(1.0, gt=0, description="ranking multiplier on price: 1.2 = 20% less preferred")
    max_price_per_gpu_hour: float | None = Field(None, gt=0)
    regions: list[str] = Field(default_factory=list, description="allowed regions; empty = any")


class Preferences(BaseModel):
    model_config = ConfigDict(extra="forbid")

    providers: dict[Provider, ProviderPrefs] = Field(
        default_factory=lambda: {p: ProviderPrefs() for p in PROVIDERS}
    )
    allowed_gpus: list[str] = Field(default_factory=list, description="empty = any GPU")
    blocked_gpus: list[str] = Field(default_factory=list)
    min_gpu_mem_gb: float = Field(0, ge=0)
    max_price_per_gpu_hour: float | None = Field(None, gt=0)
    spot_policy: SpotPolicy = "auto"
    preemption_overhead: float = Field(
        0.15, ge=0, le=5, description="expected extra cost of spot from preemptions (lost work, restarts)"
    )
    max_recoveries: int = Field(3, ge=0, le=100)
    # how domains are packed into jobs (launcher/plan.py)
    max_domains_per_job: int = Field(32, ge=1, le=1000)
    max_hours_per_job: float = Field(4.0, gt=0, le=168)
    job_startup_minutes: float = Field(
        6.0, ge=0, description="a cloud job's fixed start-up: provisioning, setup, base model download"
    )
    fallbacks: int = Field(5, ge=0, le=50, description="ranked fallback offers kept per job")
    backend: Literal["auto", "local", "skypilot"] = Field(
        "auto", description="auto: skypilot when it is installed and a provider has credentials, else local"
    )
    local_price_hour: float = Field(0.0, ge=0, description="$/h charged for jobs on the local backend")

    @field_validator("providers")
    @classmethod
    def _all_providers(cls, v: dict) -> dict:
        return {p: v.get(p, ProviderPrefs()) for p in PROVIDERS}

    def provider(self, name: str) -> ProviderPrefs:
        return self.providers[name]


ENV = {
    "MEETARA_SPOT_POLICY": "spot_policy",
    "MEETARA_MAX_PRICE_PER_GPU_HOUR": "max_price_per_gpu_hour",
    "MEETARA_MIN_GPU_MEM_GB": "min_gpu_mem_gb",
    "MEETARA_MAX_RECOVERIES": "max_recoveries",
    "MEETARA_PREEMPTION_OVERHEAD": "preemption_overhead",
    "MEETARA_BACKEND": "backend",
    "MEETARA_LOCAL_PRICE_HOUR": "local_price_hour",
}


def config_path(explicit: Path | None = None) -> Path:
    if explicit:
        return explicit
    if os.environ.get("MEETARA_CONFIG"):
        return Path(os.environ["MEETARA_CONFIG"])
    local = Path("meetara.yaml")
    return local if local.exists() else Path.home() / ".config" / "meetara" / "config.yaml"


def load_preferences(path: Path | None = None, overrides: dict | None = None) -> Preferences:
    """File, then environment, then `overrides` (flags); raises `BadInput` with one line on bad input."""
    path = config_path(path)
    raw: dict = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise BadInput(f"{path}{where}: not valid YAML") from None
        if not isinstance(raw, dict):
            raise BadInput(f"{path}: expected a mapping of settings")
        # the same file may hold other sections (`budgets:`); preferences are under `preferences:`
        if "preferences" in raw:
            raw = raw["preferences"] or {}
        else:
            raw = {k: v for k, v in raw.items() if k != "budgets"}
        if not isinstance(raw, dict):
            raise BadInput(f"{path}: `preferences` must be a mapping of settings")
        raw = dict(raw)
    for var, field in ENV.items():
        if os.environ.get(var):
            raw[field] = os.environ[var]
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Preferences.model_validate(raw)
    except ValidationError as e:
        raise BadInput.from_validation(e, f"{path}: ") from None


def save_preferences(prefs: Preferences, path: Path | None = None) -> Path:
    """Write the preferences as YAML (stable key order, defaults included, so diffs stay readable)."""
    path = config_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {}
    if path.exists():  # keep the file's other sections (`budgets:`)
        old = yaml.safe_load(path.read_text())
        if isinstance(old, dict) and "preferences" in old:
            doc = {k: v for k, v in old.items() if k != "preferences"}
        elif isinstance(old, dict) and "budgets" in old:
            doc = {"budgets": old["budgets"]}
    doc["preferences"] = prefs.model_dump(mode="json")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)
    return path
