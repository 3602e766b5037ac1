"""Config and preferences files that are wrong in shape rather than in values: another encoding, bytes
that are not UTF-8, nesting deeper than a parser recurses, aliases that explode, a file of 36 MB. Each is
one line naming the file (exit code 2), quickly. And `providers set` edits a commented file kept in git
without losing a comment or changing its layout."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from budgets.caps import load_budget_config
from launcher.preferences import load_preferences
from train import BadInput
from train.configfile import MAX_CONFIG_BYTES, parse_json

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)

BAD_FILES = {
    "utf-16 with a BOM": ("spot_policy: spot\n".encode("utf-16"), "the file is UTF-16: save it as UTF-8"),
    "utf-16 without a BOM": ("spot_policy: spot\n".encode("utf-16-le"), "(UTF-16 without a BOM?)"),
    "latin-1": ("allowed_gpus: [A100]  # Zürich\n".encode("latin-1"), ":1: not UTF-8 (byte 0xfc at offset"),
    "deep YAML": (b"allowed_gpus: " + b"[" * 200_000, "nested too deeply"),
    "deep JSON": (b'{"preferences": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001, "nested too deeply"),
    "alias bomb": (ALIAS_BOMB.encode(), "expands to over"),
    "36 MB": (b"spot_policy: spot\n" + b"# padding padding padding\n" * 1_400_000, "too large (34.7 MiB"),
    "bad YAML": (b"spot_policy: [\n", ":2: not valid YAML"),
}


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_preferences_or_budgets_file_is_one_line(tmp_path, case):
    data, expected = BAD_FILES[case]
    path = tmp_path / "meetara.yaml"
    path.write_bytes(data)
    for load in (load_preferences, load_budget_config):
        started = time.monotonic()
        with pytest.raises(BadInput) as e:
            load(path)
        message = str(e.value)
        assert message.startswith(str(path)) and expected in message and "\n" not in message, message
        assert time.monotonic() - started < 5, f"{case}: {load.__name__} took too long"


@pytest.mark.parametrize("case", ["utf-16 with a BOM", "latin-1", "deep YAML", "36 MB", "alias bomb"])
def test_the_commands_say_it_in_one_line(tmp_path, case):
    data, expected = BAD_FILES[case]
    path = tmp_path / "meetara.yaml"
    path.write_bytes(data)
    shown = run_cli("providers", "--config", str(path), module="launcher", cwd=tmp_path, timeout=60)
    assert one_line(shown) == f"error: {path}{one_line(shown).split(str(path), 1)[1]}"
    assert expected in one_line(shown)
    budget = run_cli("budget", module="launcher", cwd=tmp_path, env={"MEETARA_CONFIG": str(path)}, timeout=60)
    assert expected in one_line(budget)
    changed = run_cli(
        "providers", "set", "vast", "--disable", "--config", str(path), module="launcher", cwd=tmp_path
    )
    assert expected in one_line(changed)
    assert path.read_bytes() == data  # a file it cannot read is never rewritten


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max_price_per_gpu_hour: off\n", None),  # None means no limit: off is none, as for the caps
        ("providers:\n  vast:\n    max_price_per_gpu_hour: no\n", None),
        ("local_price_hour: on\n", "invalid local_price_hour: Value error, on/yes/true is not a number"),
        ("min_gpu_mem_gb: off\n", "invalid min_gpu_mem_gb: Value error, off/no/false is not a number"),
        ("max_recoveries: yes\n", "invalid max_recoveries: Value error, on/yes/true is not a number"),
        ("providers:\n  vast:\n    weight: yes\n", "invalid providers.vast.weight: Value error, on/yes/true"),
        ("local_price_hour: .inf\n", "invalid local_price_hour: Input should be a finite number"),
    ],
)
def test_yaml_booleans_in_number_settings_are_not_0_and_1(tmp_path, text, expected):
    path = tmp_path / "meetara.yaml"
    path.write_text(text)
    if expected is None:
        prefs = load_preferences(path, env=False)
        assert prefs.max_price_per_gpu_hour is None and prefs.provider("vast").max_price_per_gpu_hour is None
        return
    with pytest.raises(BadInput) as e:
        load_preferences(path, env=False)
    assert str(e.value).startswith(f"{path}: {expected}") and "\n" not in str(e.value), str(e.value)


def test_a_utf8_bom_and_crlf_line_ends_are_fine(tmp_path):
    path = tmp_path / "meetara.yaml"
    path.write_bytes("\ufeffpreferences:\r\n  spot_policy: spot\r\n".encode())
    assert load_preferences(path).spot_policy == "spot"
    r = run_cli("providers", "set", "--max-recoveries", "7", "--config", str(path), module="launcher")
    assert r.returncode == 0, r.stderr
    assert path.read_bytes().count(b"\r\n") == path.read_bytes().count(b"\n")  # still CRLF throughout
    assert load_preferences(path).max_recoveries == 7


def test_a_directory_or_an_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(BadInput, match="is a directory, not a config file"):
        load_preferences(tmp_path)


def test_the_size_limit_is_a_mebibyte():
    assert MAX_CONFIG_BYTES == 1 << 20


def test_json_from_users_is_one_line():
    for text, expected in (
        ("[" * 100_000, "nested too deeply"),
        ('{"a": 1,}', "x.json:1: not valid JSON"),
        (b"\xff\xfe{}", "not"),
    ):
        with pytest.raises(BadInput) as e:
            parse_json(text, "x.json")
        assert expected in str(e.value) and "\n" not in str(e.value)
    assert parse_json(json.dumps({"a": [1]}), "x.json") == {"a": [1]}


# ---- `providers set` keeps comments and layout --------------------------------------------------------

COMMENTED = """\
# Provider preferences of the ops team. Reviewed in PR #12; ask #gpu-ops before changing.
preferences:
  spot_policy: spot        # interruptions are fine for LoRA jobs
  allowed_gpus: [A100, H100]   # what the image is tested on
  max_recoveries: 3
  providers:
    lambda:
      weight: 1.0          # on-demand only, but reliable
    vast:
      enabled: true        # re-enabled after the March outage
      regions:
        - US-Texas         # closest to the bucket
        - US-California

# money: finance owns this section
budgets:
  daily: 5     # do not change without asking
  monthly: 50
"""


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def changed_lines(repo: Path) -> tuple[list[str], list[str]]:
    diff = git(repo, "diff", "--unified=0", "--no-color", "meetara.yaml").splitlines()
    removed = [x[1:] for x in diff if x.startswith("-") and not x.startswith("---")]
    added = [x[1:] for x in diff if x.startswith("+") and not x.startswith("+++")]
    return removed, added


@pytest.mark.skipif(not shutil.which("git"), reason="needs git")
def test_providers_set_on_a_commented_file_in_git_keeps_every_comment(tmp_path):
    repo = tmp_path / "ops"
    repo.mkdir()
    cfg = repo / "meetara.yaml"
    cfg.write_text(COMMENTED)
    git(repo, "init", "-q")
    git(repo, "add", "meetara.yaml")
    git(repo, "commit", "-qm", "preferences")

    def meetara(*args: str, env: dict | None = None) -> None:
        r = run_cli("providers", "set", *args, "--config", str(cfg), module="launcher", cwd=repo, env=env)
        assert r.returncode == 0, r.stderr

    # a MEETARA_* variable in force while editing is not written into the file
    meetara("vast", "--disable", env={"MEETARA_BACKEND": "local", "MEETARA_SPOT_POLICY": "on-demand"})
    removed, added = changed_lines(repo)
    assert removed == ["      enabled: true        # re-enabled after the March outage"]
    assert len(added) == 1 and added[0].startswith("      enabled: false ")
    assert added[0].endswith("# re-enabled after the March outage")

    meetara("--spot-policy", "on-demand", "--allowed-gpus", "A100,H100,H200")
    meetara("vast", "--regions", "US-Texas,US-Oregon")
    text = cfg.read_text()
    for line in COMMENTED.splitlines():  # every comment is still there, on its line
        if "#" in line and "enabled:" not in line and "US-California" not in line:
            comment = line[line.index("#") :]
            assert comment in text, comment
    # flow style kept, and the comment on its line (one space before it when the longer value passes
    # the comment's old column)
    assert re.search(r"\n  allowed_gpus: \[A100, H100, H200\] +# what the image is tested on\n", text)
    block = "        - US-Texas         # closest to the bucket\n        - US-Oregon\n"
    assert block in text  # block style and the item's comment kept
    removed, added = changed_lines(repo)
    assert len(removed) == len(added) == 4  # four settings changed: four lines, nothing else moved
    doc = yaml.safe_load(text)
    assert doc["budgets"] == {"daily": 5, "monthly": 50}
    assert "backend" not in doc["preferences"]  # not baked in from the environment
    prefs = load_preferences(cfg, env=False)
    assert prefs.spot_policy == "on-demand" and not prefs.provider("vast").enabled
    assert prefs.provider("vast").regions == ["US-Texas", "US-Oregon"] and prefs.allowed_gpus[-1] == "H200"


def test_providers_set_writes_through_a_symlink_and_keeps_the_mode(tmp_path):
    real = tmp_path / "dotfiles" / "meetara.yaml"
    real.parent.mkdir()
    real.write_text("spot_policy: spot  # keep\n")
    real.chmod(0o640)
    link = tmp_path / "meetara.yaml"
    link.symlink_to(real)
    r = run_cli("providers", "set", "--max-recoveries", "9", "--config", str(link), module="launcher")
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and real.read_text() == "spot_policy: spot  # keep\nmax_recoveries: 9\n"
    assert real.stat().st_mode & 0o777 == 0o640
