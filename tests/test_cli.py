"""The `meetara` console script as a user meets it."""

from __future__ import annotations

import shutil
import subprocess

import yaml
from conftest import ROOT


def meetara(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("meetara")
    assert exe, "the meetara console script is installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_help_lists_the_commands():
    r = meetara("--help")
    assert r.returncode == 0
    assert "train" in r.stdout and "domains" in r.stdout


def test_domains_lists_the_registry():
    r = meetara("domains", "--category", "technology")
    assert r.returncode == 0
    for name in (
        "programming",
        "ai_ml",
        "cybersecurity",
        "data_analysis",
        "tech_support",
        "software_development",
    ):
        assert name in r.stdout
    assert "nutrition" not in r.stdout


def test_bad_input_is_one_line_and_exit_2():
    for args, expected in (
        (["domains", "--category", "cooking"], "unknown category"),
        (["train", "--domains", "legall", "--store", "ftp://x"], "closest: legal"),
        (["nonsense"], "No such command"),
    ):
        r = meetara(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, r.stderr)


def test_offers_from_the_snapshot_honour_filters(tmp_path):
    import json

    r = meetara("offers", "--gpu", "A100", "--spot", "--json", "--all")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows and all(x["gpu"].startswith("A100") and x["spot"] for x in rows)
    assert [x["expected_hour"] for x in rows] == sorted(x["expected_hour"] for x in rows)
    table = meetara("offers", "--on-demand", "--provider", "lambda")
    assert table.returncode == 0 and "lambda" in table.stdout and "vast" not in table.stdout


def test_providers_set_and_show_round_trip(tmp_path):
    cfg = str(tmp_path / "meetara.yaml")
    assert meetara("providers", "set", "vast", "--disable", "--config", cfg).returncode == 0
    assert meetara("providers", "set", "--spot-policy", "on-demand", "--config", cfg).returncode == 0
    shown = meetara("providers", "--config", cfg)
    assert shown.returncode == 0 and "spot_policy: on-demand" in shown.stdout
    saved = yaml.safe_load((tmp_path / "meetara.yaml").read_text())["preferences"]
    assert saved["providers"]["vast"]["enabled"] is False and saved["providers"]["lambda"]["enabled"] is True
    for args, expected in (
        (["providers", "set", "aws", "--enable"], "unknown provider"),
        (["providers", "set", "vast", "--weight", "-1"], "providers.vast.weight"),
        (["providers", "set", "--spot-policy", "maybe"], "spot_policy"),
    ):
        r = meetara(*args, "--config", cfg)
        assert r.returncode == 2 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, (
            r.stderr
        )
    assert yaml.safe_load((tmp_path / "meetara.yaml").read_text())["preferences"] == saved  # nothing lost
