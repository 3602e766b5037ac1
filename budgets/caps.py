"""Budget configuration (caps, time zone, ledger location) and the calendar windows caps apply to.

Layering: the config file's top-level `budgets:` mapping, then environment variables, then overrides
(flags). A cap of None means no cap: YAML `null` or `off` / `no` / `false` in the file, `none`, `off`,
`no`, `false` or `unlimited` in the environment; YAML's `on` / `yes` / `true` is refused (not $1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from train import BadInput

WINDOWS = ("daily", "weekly", "monthly")

ENV = {
    "MEETARA_DAILY_CAP": "daily",
    "MEETARA_WEEKLY_CAP": "weekly",
    "MEETARA_MONTHLY_CAP": "monthly",
    "MEETARA_BUDGET_TZ": "timezone",
    "MEETARA_LEDGER_URL": "ledger_url",
}
NO_CAP = {"none", "off", "no", "false", "null", "unlimited"}  # as YAML's null and off/no/false


class BudgetConfig(BaseModel):
    """Caps in USD per calendar window (None = no cap), the windows' time zone, where the ledger is."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    daily: float | None = Field(5.0, ge=0)
    weekly: float | None = Field(25.0, ge=0)
    monthly: float | None = Field(50.0, ge=0)
    timezone: str = "UTC"
    ledger_url: str | None = Field(
        None, description="None: SQLite in the state dir; sqlite:///ABS/PATH, a path, or postgresql://..."
    )

    @field_validator("daily", "weekly", "monthly", mode="before")
    @classmethod
    def _no_cap(cls, v: object) -> object:
        from train.configfile import yaml_number

        if isinstance(v, str) and v.strip().lower() in NO_CAP:
            return None
        return yaml_number(v, none_means="no cap")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (use an IANA name such as Europe/Berlin)") from None
        return v

    @field_validator("ledger_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        scheme = v.split("://", 1)[0] if "://" in v else ""
        if scheme not in ("", "sqlite", "postgresql", "postgres"):
            raise ValueError(
                f"unsupported ledger URL scheme {scheme!r} (sqlite:///PATH, a path, postgresql://)"
            )
        return v

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def cap(self, window: str) -> float | None:
        return getattr(self, window)


def load_budget_config(path: Path | None = None, overrides: dict | None = None) -> BudgetConfig:
    """File (`budgets:` section; other sections are someone else's), then env, then `overrides`
    (None values ignored). Raises `BadInput` with one line naming where the bad value came from."""
    raw: dict = {}
    origin: dict[str, str] = {}
    if path is not None and path.exists():
        from train.configfile import load_yaml  # size, encoding, YAML, nesting: one-line BadInput

        doc = load_yaml(path)
        if doc is not None and not isinstance(doc, dict):
            raise BadInput(f"{path}: expected a mapping of settings")
        section = (doc or {}).get("budgets") or {}
        if not isinstance(section, dict):
            raise BadInput(
                f"{path}: `budgets` must be a mapping (daily, weekly, monthly, timezone, ledger_url)"
            )
        raw.update(section)
        origin.update(dict.fromkeys(section, f"{path}: "))
    for var, field in ENV.items():
        if os.environ.get(var, "").strip():
            raw[field] = os.environ[var].strip()
            origin[field] = f"{var}: "
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
            origin[key] = ""
    try:
        return BudgetConfig.model_validate(raw)
    except ValidationError as e:
        loc = e.errors()[0]["loc"]
        raise BadInput.from_validation(e, origin.get(str(loc[0]) if loc else "", "budgets: ")) from None


@dataclass(frozen=True)
class Window:
    name: str  # daily | weekly | monthly
    start: datetime  # aware, in the config's time zone
    end: datetime  # exclusive


def window(name: str, now: datetime, zone: ZoneInfo) -> Window:
    """The calendar day, ISO week (from Monday) or month holding `now`, in `zone`.

    Bounds are local midnights built from dates (not start + 24 h), so days across DST changes are
    23 or 25 hours long, as the user's calendar says."""
    local = _aware(now).astimezone(zone)
    day = local.date()
    if name == "daily":
        first, last = day, day + timedelta(days=1)
    elif name == "weekly":
        first = day - timedelta(days=day.weekday())
        last = first + timedelta(days=7)
    elif name == "monthly":
        first = day.replace(day=1)
        last = (first + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown window {name!r} (one of {', '.join(WINDOWS)})")
    return Window(name, midnight(first, zone), midnight(last, zone))


def midnight(d: date, zone: ZoneInfo) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=zone)


def _aware(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise ValueError(f"naive datetime {t.isoformat()}: budgets need time-zone-aware times")
    return t


def utcnow() -> datetime:
    from budgets import clock

    return clock.now()
