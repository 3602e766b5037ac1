"""The `meetara` console script as a user meets it."""

from __future__ import annotations

import shutil
import subprocess

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
