"""Provider preferences: what the ops team allows and prefers, in a YAML file it can keep in version
control, overridable by environment variables and flags.

Where the file is: `--config`, else `MEETARA_CONFIG`, else `./meetara.yaml` if present, else
`~/.config/meetara/config.yaml`. A missing file means the defaults.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from train import BadInput
from train.configfile import load_yaml, read_text, yaml_error, yaml_number

PROVIDERS = ("lambda", "runpod", "vast")
Provider = Literal["lambda", "runpod", "vast"]
SpotPolicy = Literal["spot", "on-demand", "auto"]


def _numbers(cls: type[BaseModel], v: object, info) -> object:
    """A number setting: YAML's on/off are not 1 and 0 (`max_price_per_gpu_hour: off` is no limit)."""
    field = cls.model_fields[info.field_name]
    return yaml_number(v, none_means="no limit" if field.default is None else None)


class ProviderPrefs(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = True
    weight: float = Field(1.0, gt=0, description="ranking multiplier on price: 1.2 = 20% less preferred")
    max_price_per_gpu_hour: float | None = Field(None, gt=0)
    regions: list[str] = Field(default_factory=list, description="allowed regions; empty = any")

    _numbers = field_validator("weight", "max_price_per_gpu_hour", mode="before")(classmethod(_numbers))


class Preferences(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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
    start_timeout_minutes: float = Field(
        30.0,
        gt=0,
        le=24 * 60,
        description="a cloud job that has no machine this long after its launch (no capacity on any of its "
        "offers) is cancelled and its money released",
    )
    fallbacks: int = Field(5, ge=0, le=50, description="ranked fallback offers kept per job")
    backend: Literal["auto", "local", "skypilot"] = Field(
        "auto", description="auto: skypilot when it is installed and a provider has credentials, else local"
    )
    local_price_hour: float = Field(0.0, ge=0, description="$/h charged for jobs on the local backend")

    _numbers = field_validator(
        "min_gpu_mem_gb",
        "max_price_per_gpu_hour",
        "preemption_overhead",
        "max_recoveries",
        "max_domains_per_job",
        "max_hours_per_job",
        "job_startup_minutes",
        "start_timeout_minutes",
        "fallbacks",
        "local_price_hour",
        mode="before",
    )(classmethod(_numbers))

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
    "MEETARA_START_TIMEOUT_MINUTES": "start_timeout_minutes",
}


def config_path(explicit: Path | None = None) -> Path:
    if explicit:
        return explicit
    if os.environ.get("MEETARA_CONFIG"):
        return Path(os.environ["MEETARA_CONFIG"])
    local = Path("meetara.yaml")
    return local if local.exists() else Path.home() / ".config" / "meetara" / "config.yaml"


def load_preferences(
    path: Path | None = None, overrides: dict | None = None, *, env: bool = True
) -> Preferences:
    """File, then environment (unless `env` is False), then `overrides` (flags); raises `BadInput` with
    one line on bad input (the file's size, encoding, YAML or values)."""
    path = config_path(path)
    raw = file_settings(path)
    origin = dict.fromkeys(raw, f"{path}: ")  # where each setting came from: a bad one names it
    if env:
        for var, field in ENV.items():
            if os.environ.get(var):
                raw[field], origin[field] = os.environ[var], f"{var}: "
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key], origin[key] = value, ""
    try:
        return Preferences.model_validate(raw)
    except ValidationError as e:
        loc = e.errors()[0]["loc"]
        raise BadInput.from_validation(e, origin.get(str(loc[0]) if loc else "", f"{path}: ")) from None


def file_settings(path: Path) -> dict:
    """The preferences the file at `path` sets ({} when there is no file): its `preferences:` mapping,
    else its top-level keys other than `budgets` (the same file may hold the budgets section)."""
    if not path.exists():
        return {}
    return _section(load_yaml(path), path)


def _section(doc: object, path: Path) -> dict:
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: expected a mapping of settings")
    if "preferences" in doc:
        raw = doc["preferences"] or {}
    else:
        raw = {k: v for k, v in doc.items() if k != "budgets"}
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: `preferences` must be a mapping of settings")
    return dict(raw)


def save_preferences(prefs: Preferences, path: Path | None = None) -> Path:
    """Write `prefs` to the file, keeping everything else in it: comments, key order, quoting, flow or
    block style, indentation, line endings, other sections (`budgets:`) and the file's mode. Only the
    settings whose value changes are written; a new (or empty) file gets every setting, defaults
    included, under `preferences:`, so that later diffs stay readable. A symlinked file is written
    through the link. Raises `BadInput` (one line) when the existing file cannot be read or parsed."""
    from ruamel.yaml.comments import CommentedMap

    path = config_path(path)
    target = path.resolve() if path.is_symlink() else path
    text = read_text(target) if target.exists() else ""
    rt, doc = _round_trip_load(text, path)
    new = prefs.model_dump(mode="json")
    if doc is None:
        doc = CommentedMap()
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: expected a mapping of settings")
    nested = "preferences" in doc or not any(k != "budgets" for k in doc)
    if nested and not isinstance(doc.get("preferences"), dict):
        if doc.get("preferences") not in (None, {}):
            raise BadInput(f"{path}: `preferences` must be a mapping of settings")
        doc["preferences"] = CommentedMap()
    section = doc["preferences"] if nested else doc
    if nested and not section:
        section.update(new)
    else:
        try:
            old = Preferences.model_validate(_section(_plain(doc), path)).model_dump(mode="json")
        except ValidationError as e:
            raise BadInput.from_validation(e, f"{path}: ") from None
        _update(section, new, old)
    out = io.StringIO()
    rt.dump(doc, out)
    body = out.getvalue()
    if "\r\n" in text:
        body = body.replace("\r\n", "\n").replace("\n", "\r\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    mode = target.stat().st_mode & 0o7777 if target.exists() else None
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(body)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, target)
    return path


def _round_trip_load(text: str, path: Path):
    """ruamel.yaml in round-trip mode set up like the file (indentation), and the file's document."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a long line
    rt.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    if not text.strip():
        return rt, None
    try:
        mapping, offset = _guess_indent(text)
        rt.indent(mapping=mapping, sequence=offset + 2, offset=offset)  # "- " after the offset
        return rt, rt.load(text)
    except YAMLError as e:
        raise yaml_error(e, str(path)) from None
    except RecursionError:
        raise BadInput(f"{path}: nested too deeply to be a config file") from None


def _guess_indent(text: str) -> tuple[int, int]:
    """How the file indents: a nested mapping's keys past their parent key, and a block sequence's
    dash past its key (the most common of each; 2 and 0 where the file has none)."""
    mapping: Counter[int] = Counter()
    offset: Counter[int] = Counter()
    prev: tuple[int, str] | None = None
    for line in text.splitlines():
        body = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not body.strip():
            continue
        indent = len(body) - len(body.lstrip(" "))
        content = body.strip()
        if prev is not None and prev[1].endswith(":"):
            if content == "-" or content.startswith("- "):
                if indent >= prev[0]:
                    offset[indent - prev[0]] += 1
            elif indent > prev[0]:
                mapping[indent - prev[0]] += 1
        prev = (indent, content)
    return (
        mapping.most_common(1)[0][0] if mapping else 2,
        offset.most_common(1)[0][0] if offset else 0,
    )


def _plain(x: object) -> object:
    """ruamel's commented containers as plain dicts and lists."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _update(node: dict, new: dict, old: dict) -> None:
    """Set in `node` (a round-trip mapping) the settings of `new` that differ from `old` (what the file
    meant before, defaults included): existing keys are changed in place, keeping their comments;
    missing ones are added at the end of their mapping, only as deep as needed."""
    from ruamel.yaml.comments import CommentedMap

    for key, value in new.items():
        before = old.get(key)
        if value == before:
            continue
        current = node.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            child = current if isinstance(current, dict) else CommentedMap()
            _update(child, value, before)
            if child is not current and child:
                node[key] = child
        elif isinstance(value, list) and isinstance(current, list):
            _update_list(current, value)
        else:
            node[key] = value


def _update_list(seq: list, value: list) -> None:
    """Make `seq` equal `value` in place, item by item: the sequence keeps its style (flow or block)
    and the items that stay keep their comments."""
    for i, item in enumerate(value):
        if i >= len(seq):
            seq.append(item)
        elif seq[i] != item:
            seq[i] = item
    del seq[len(value) :]
