"""The domain registry (`tasks/domains.yaml`), validated by pydantic, and domain selection."""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tasks import DOMAINS_YAML
from train import BadInput
from train.configfile import load_yaml


class Category(BaseModel):
    description: str = Field(min_length=1)


class Domain(BaseModel):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    category: str
    description: str = Field(min_length=1)
    style: str = Field(min_length=1)
    vocabulary: list[str] = Field(min_length=5)
    topics: list[str] = Field(min_length=3)
    advice: list[str] = Field(min_length=3)

    @field_validator("vocabulary")
    @classmethod
    def _distinct(cls, words: list[str]) -> list[str]:
        if len(set(words)) != len(words):
            raise ValueError("vocabulary words must be distinct")
        return words


class Registry(BaseModel):
    version: int
    categories: dict[str, Category]
    domains: list[Domain]

    @model_validator(mode="after")
    def _consistent(self) -> Registry:
        names = [d.name for d in self.domains]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate domain names: {', '.join(dupes)}")
        for d in self.domains:
            if d.category not in self.categories:
                raise ValueError(f"domain {d.name!r} has unknown category {d.category!r}")
        return self

    def get(self, name: str) -> Domain:
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]


def load_registry(path: Path | str | None = None) -> Registry:
    """Load and validate a domain registry (the bundled `tasks/domains.yaml` by default)."""
    path = Path(path) if path else DOMAINS_YAML
    return _load(str(path))


@lru_cache(maxsize=4)
def _load(path: str) -> Registry:
    try:
        raw = load_yaml(Path(path))  # size, encoding and nesting refused in one line
        return Registry.model_validate(raw)
    except FileNotFoundError as e:
        raise BadInput(f"domain registry not found: {path}") from e
    except (yaml.YAMLError, ValidationError) as e:
        first = str(e).splitlines()
        raise BadInput(f"invalid domain registry {path}: {' '.join(first[:3])}") from e


def select_domains(spec: str | list[str], registry: Registry | None = None) -> list[Domain]:
    """Resolve `all`, a category name, or a comma-separated list of domain names, in registry order
    for `all`/categories and in the given order otherwise. Unknown names raise `BadInput` naming the
    closest matches."""
    registry = registry or load_registry()
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise BadInput("no domains given: use --domains all, a category, or names such as healthcare,legal")
    chosen: list[Domain] = []
    for item in items:
        if item == "all":
            picked = registry.domains
        elif item in registry.categories:
            picked = [d for d in registry.domains if d.category == item]
        else:
            try:
                picked = [registry.get(item)]
            except KeyError:
                close = difflib.get_close_matches(
                    item, registry.names + list(registry.categories), n=3, cutoff=0.5
                )
                hint = f"; closest: {', '.join(close)}" if close else "; see `meetara domains`"
                raise BadInput(f"unknown domain {item!r}{hint}") from None
        chosen.extend(d for d in picked if d not in chosen)
    return chosen
