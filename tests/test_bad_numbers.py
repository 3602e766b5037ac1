"""Bad numbers, dates, durations and traces (issue 27): each is one line on stderr and exit code 2,
never an internal error, on every command that takes them. Infinite and NaN numbers, values past a
stated maximum, dates past the calendar, traces whose ticks are strings or whose gap is NaN. (The MCP
tools and the dashboard, which call the same validation, are checked in test_mcp.py and
test_dashboard.py.)

Every command runs for real: `python -m launcher` (and `python -m train`) subprocesses, a SQLite ledger
file under the test's folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import local_env, run_cli

from train.bounds import MAX_EPOCHS, MAX_SAMPLES


def traces(tmp_path: Path) -> dict[str, Path]:
    """Trace files that are wrong in their values, each in its own folder."""
    bad = {
        "nan-gap": '{"metadata": {"gap_seconds": NaN}, "data": [1, 0]}',
        "string-ticks": '{"metadata": {"gap_seconds": 60}, "data": ["0", 1]}',
        "dict-ticks": '{"metadata": {"gap_seconds": 60}, "data": [{"up": 1}]}',
        "boolean-ticks": '{"metadata": {"gap_seconds": 60}, "data": [true, false]}',
        "infinite-ticks": '{"metadata": {"gap_seconds": 60}, "data": [1e999]}',
        "tiny-gap": '{"metadata": {"gap_seconds": 1e-9}, "data": [1, 0]}',
    }
    out = {}
    for name, text in bad.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "zone.json").write_text(text)
        out[name] = tmp_path / name / "zone.json"
    return out


SIM = ["simulate", "-d", "legal", "--replays", "1"]
CASES = [  # (argv, what the one line says)
    (["report", "--since", "99999999d"], "--since: '99999999d' is out of range"),
    (["report", "--since", "9999999999999999d"], "--since: '9999999999999999d' is out of range"),
    (["report", "--until", "9999-12-31"], "--until: '9999-12-31' is out of range"),
    (["report", "--since", "0001-01-01"], "--since: '0001-01-01' is out of range"),
    (["report", "--until", "9999-12-31T23:00:00-05:00"], "--until: '9999-12-31T23:00:00-05:00' is out of"),
    ([*SIM, "--market", "synthetic:inf"], "synthetic:HOURS needs a finite mean up-time"),
    ([*SIM, "--market", "synthetic:nan"], "synthetic:HOURS needs a finite mean up-time"),
    ([*SIM, "--market", "synthetic:2", "--deadline", "99999999999d"], "--deadline '99999999999d': at most"),
    ([*SIM, "--market", "synthetic:2", "--checkpoint-minutes", "nan"], "'--checkpoint-minutes': nan is not"),
    (["plan", "-d", "legal", "--backend", "local", "--epochs", "inf"], "'--epochs': inf is not a finite"),
    (["plan", "-d", "legal", "--backend", "local", "--epochs", "NaN"], "'--epochs': NaN is not a finite"),
    (["plan", "-d", "legal", "--backend", "local", "--epochs", "1e999"], "'--epochs': 1e999 is not a fin"),
    (["plan", "-d", "legal", "--backend", "local", "--epochs", "101"], "less than or equal to 100"),
    (["plan", "-d", "legal", "--backend", "local", "--samples", str(10**12)], "or equal to 100000"),
    (["plan", "-d", "legal", "--backend", "local", "--deadline", "400d"], "--deadline '400d': at most 365d"),
    (["launch", "-d", "legal", "--backend", "local", "--budget", "nan"], "'--budget': nan is not a finite"),
    (["launch", "-d", "legal", "--backend", "local", "--budget", "1", "--poll", "inf"], "'--poll': inf"),
    (["providers", "set", "vast", "--weight", "inf"], "'--weight': inf is not a finite number"),
    (["offers", "--limit", "0"], "'--limit'"),
]


@pytest.mark.parametrize(("argv", "says"), CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_a_bad_number_date_or_duration_is_one_line_and_exit_2(tmp_path, argv, says):
    r = run_cli(*argv, env=local_env(tmp_path, 0.0), cwd=tmp_path, module="launcher", timeout=120)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "config.yaml").exists()  # providers set wrote nothing


@pytest.mark.parametrize("name", ["nan-gap", "string-ticks", "dict-ticks", "boolean-ticks", "infinite-ticks"])
def test_a_trace_with_values_that_are_not_ticks_is_one_line(tmp_path, name):
    trace = traces(tmp_path)[name]
    r = run_cli(
        *SIM, "--market", str(trace.parent), env=local_env(tmp_path, 0.0), cwd=tmp_path, module="launcher"
    )
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"error: --market {trace}: not a spot trace: invalid "), lines[0]


def test_a_trace_of_whole_numbers_still_replays(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "zone.json").write_text(
        json.dumps({"metadata": {"gap_seconds": 60}, "data": [2, 0, 1] * 50})
    )
    r = run_cli(
        *SIM,
        "--market",
        str(tmp_path / "ok"),
        "--json",
        env=local_env(tmp_path, 0.0),
        cwd=tmp_path,
        module="launcher",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(json.loads(r.stdout)["policies"]) == {"on-demand", "greedy", "uniform-progress", "meetara"}


def test_a_huge_synthetic_up_time_is_a_market_that_never_goes_down(tmp_path):
    from launcher.market import market_from

    # a spell longer than the trace ends with it (before: a list of 1e300 / 300 ticks)
    assert all(all(t.up) for t in market_from("synthetic:1e300"))


def test_the_job_refuses_the_same_numbers(tmp_path):
    for argv, says in (
        (["--epochs", "inf"], "'--epochs': inf is not a finite number"),
        (["--epochs", str(MAX_EPOCHS * 2)], f"less than or equal to {MAX_EPOCHS:g}"),
        (["--samples", str(MAX_SAMPLES + 1)], f"less than or equal to {MAX_SAMPLES}"),
        (["--lr", "nan"], "'--lr': nan is not a finite number"),
    ):
        r = run_cli("-d", "legal", "--store", f"file://{tmp_path}/store", *argv, cwd=tmp_path)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("value", "says"),
    [("loud", "MEETARA_LOG='LOUD': use DEBUG, INFO"), ("99", "MEETARA_LOG='99'"), ("-1", "MEETARA_LOG='-1'")],
)
def test_a_bad_log_level_is_one_line(tmp_path, value, says):
    r = run_cli("status", env=local_env(tmp_path, 0.0, MEETARA_LOG=value), cwd=tmp_path, module="launcher")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and lines == [f"error: {lines[0].removeprefix('error: ')}"], r.stderr
    assert says in lines[0], lines


@pytest.mark.parametrize("value", ["WARN", "warning", "10", "25", "fatal"])
def test_a_log_level_by_name_or_number_is_taken(tmp_path, value):
    r = run_cli(
        "status", "--json", env=local_env(tmp_path, 0.0, MEETARA_LOG=value), cwd=tmp_path, module="launcher"
    )
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("MEETARA_LOCAL_PRICE_HOUR", "abc", "error: MEETARA_LOCAL_PRICE_HOUR: invalid local_price_hour:"),
        (
            "MEETARA_LOCAL_PRICE_HOUR",
            "inf",
            "error: MEETARA_LOCAL_PRICE_HOUR: invalid local_price_hour: Input",
        ),
        ("MEETARA_MAX_RECOVERIES", "-1", "error: MEETARA_MAX_RECOVERIES: invalid max_recoveries:"),
        ("MEETARA_DAILY_CAP", "lots", "error: MEETARA_DAILY_CAP: invalid daily:"),
    ],
)
def test_a_bad_environment_override_names_the_variable_not_a_file(tmp_path, var, value, says):
    env = local_env(tmp_path, 0.0, **{var: value})
    argv = ["budget"] if "CAP" in var else ["plan", "-d", "legal", "--backend", "local"]
    r = run_cli(*argv, env=env, cwd=tmp_path, module="launcher")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(says), r.stderr[-2000:]
    assert "config.yaml" not in lines[0]


def test_a_bad_setting_in_the_file_still_names_the_file(tmp_path):
    config = tmp_path / "meetara.yaml"
    config.write_text("min_gpu_mem_gb: .nan\n")
    argv = ["plan", "-d", "legal", "--backend", "local", "--config", str(config)]
    r = run_cli(*argv, env=local_env(tmp_path, 0.0), cwd=tmp_path, module="launcher")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and lines == [
        f"error: {config}: invalid min_gpu_mem_gb: Input should be a finite number"
    ]
