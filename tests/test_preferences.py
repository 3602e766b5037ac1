"""Provider preferences: file, env and flag layering; bad files give one-line errors."""

from __future__ import annotations

import pytest

from launcher.preferences import Preferences, load_preferences, save_preferences
from train import BadInput


def test_defaults_without_a_file(tmp_path):
    prefs = load_preferences(tmp_path / "absent.yaml")
    assert prefs == Preferences()
    assert set(prefs.providers) == {"lambda", "runpod", "vast"} and prefs.spot_policy == "auto"


def test_file_then_env_then_flags(tmp_path, monkeypatch):
    path = tmp_path / "meetara.yaml"
    path.write_text(
        "preferences:\n  spot_policy: spot\n  max_recoveries: 5\n  providers:\n    vast: {enabled: false}\n"
    )
    prefs = load_preferences(path)
    assert prefs.spot_policy == "spot" and prefs.max_recoveries == 5
    assert not prefs.provider("vast").enabled and prefs.provider("lambda").enabled  # others keep defaults
    monkeypatch.setenv("MEETARA_SPOT_POLICY", "on-demand")
    assert load_preferences(path).spot_policy == "on-demand"
    assert load_preferences(path, {"spot_policy": "auto", "max_recoveries": None}).spot_policy == "auto"


def test_round_trip_through_the_file(tmp_path):
    prefs = Preferences(blocked_gpus=["V100"], min_gpu_mem_gb=24)
    prefs.providers["runpod"].weight = 1.3
    path = save_preferences(prefs, tmp_path / "c.yaml")
    assert load_preferences(path) == prefs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("spot_policy: sometimes\n", "invalid spot_policy"),
        ("providers:\n  aws: {enabled: true}\n", "invalid providers.aws"),
        ("providers:\n  vast: {weight: -1}\n", "invalid providers.vast.weight"),
        ("max_recoveries: lots\n", "invalid max_recoveries"),
        ("unknown_key: 1\n", "invalid unknown_key"),
        ("spot_policy: [\n", "not valid YAML"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_malformed_config_is_one_line(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(BadInput) as e:
        load_preferences(path)
    assert expected in str(e.value) and str(e.value).startswith(str(path)) and "\n" not in str(e.value)
