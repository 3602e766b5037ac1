"""SkyPilot task YAMLs and the domain registry they draw on (data files shipped with the package)."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
DOMAINS_YAML = TASKS_DIR / "domains.yaml"
