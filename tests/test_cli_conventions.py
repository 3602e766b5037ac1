"""The CLI as an ML engineer used to SkyPilot and dstack expects it (issue 17): the verbs (`cancel`,
`logs`), the conventions (`--version`, `-h`, plain flags in help, documented exit codes), text printed
verbatim (rich markup never eats brackets), and money shown with the precision that decides.

Every command runs for real: `python -m launcher` subprocesses, the SQLite ledger file, local jobs as
process groups."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import local_env, run_cli

from budgets import usd
from budgets.ledger import Ledger

RATE_H = 10.0  # $/h of the local machine in these tests


def _env(tmp_path: Path, **extra: str) -> dict:
    return local_env(tmp_path, RATE_H, **extra)


def meetara(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return run_cli(*args, env=_env(tmp_path, **env), cwd=tmp_path, module="launcher", timeout=300)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


# -- verbs and conventions ---------------------------------------------------------------------------------


def test_no_arguments_prints_the_help_and_exits_0(tmp_path):
    r = meetara(tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Usage: meetara" in r.stdout and "cancel" in r.stdout and "logs" in r.stdout
    assert r.stderr == ""
    group = meetara("sky", tmp_path=tmp_path)  # a command group named alone: its help
    assert (group.returncode, group.stderr) == (0, "") and "Usage: meetara sky" in group.stdout


def test_version(tmp_path):
    from importlib.metadata import version

    r = meetara("--version", tmp_path=tmp_path)
    assert (r.returncode, r.stdout.strip()) == (0, f"meetara {version('meetara')}")


def _commands() -> list[list[str]]:
    """Every command path of the app (`["providers", "set"]`, ...), from the app itself."""
    import typer

    from launcher.cli import app

    out: list[list[str]] = []

    def walk(cmd, path: list[str]) -> None:
        out.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return out


def test_h_is_help_on_every_command_and_flags_show_no_type(tmp_path):
    paths = _commands()
    assert ["cancel"] in paths and ["logs"] in paths and ["sky", "stop"] in paths
    for path in paths:
        r = meetara(*path, "-h", tmp_path=tmp_path)
        assert r.returncode == 0, (path, r.stderr)
        assert f"Usage: meetara {' '.join(path)}".rstrip() in r.stdout, path
        assert "<bool>" not in r.stdout, (path, r.stdout)  # a flag takes no value
    launch = meetara("launch", "--help", tmp_path=tmp_path).stdout
    assert re.search(r"--yes\s+-y\s+do not ask", launch), launch


def test_recover_with_nothing_to_do_says_so_in_one_line(tmp_path):
    r = meetara("recover", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "nothing to recover: no run was launched from this machine"
    assert r.stdout == ""


def test_notebook_refuses_to_overwrite_without_force(tmp_path):
    args = ("notebook", "-d", "nutrition", "--store", "s3://bucket/meetara", "-o", "nb.ipynb")
    first = meetara(*args, tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr
    (tmp_path / "nb.ipynb").write_text("mine")
    again = meetara(*args, tmp_path=tmp_path)
    assert again.returncode == 2 and "nb.ipynb exists: pass --force" in one_error_line(again)
    assert (tmp_path / "nb.ipynb").read_text() == "mine"
    forced = meetara(*args, "--force", tmp_path=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert json.loads((tmp_path / "nb.ipynb").read_text())["cells"]


def test_declining_the_launch_prompt_exits_0_and_reserves_nothing(tmp_path):
    """On a terminal, `launch` without --yes asks; "n" is not a failure: exit 0, nothing spent."""
    main, child = pty.openpty()
    try:
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launcher",
                "launch",
                "-d",
                "nutrition",
                "--budget",
                "5",
                "--run-id",
                "ask",
            ],
            stdin=child,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
            env={**os.environ, **_env(tmp_path)},
            text=True,
        )
        os.write(main, b"n\n")  # the terminal's line buffer holds it until the prompt reads it
        out, err = p.communicate(timeout=120)
    finally:
        os.close(main)
        os.close(child)
    assert p.returncode == 0, err
    assert "launch for about $" in out and "not launched: nothing was reserved or started" in err
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.reservations("ask") == [] and ledger.lease("ask") is None
    ledger.close()


# -- text printed verbatim -----------------------------------------------------------------------------------

HIDE = """
import importlib.metadata as m, sys
sys.modules["peft"] = None  # find_spec says: not installed
_version = m.version
def version(name):
    if name == "skypilot":
        raise m.PackageNotFoundError(name)
    return _version(name)
m.version = version
"""


def test_doctor_install_hints_keep_their_extras(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(HIDE)
    r = meetara("doctor", tmp_path=tmp_path, PYTHONPATH=str(tmp_path / "site"))
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # a table may fold a long cell
    assert 'missing: pip install -e ".[train]" (training)' in text, r.stdout
    assert 'pip install "meetara[cloud]"' in text, r.stdout


def test_user_text_with_markup_prints_verbatim(tmp_path):
    bad = meetara("plan", "-d", "[bold]cooking", tmp_path=tmp_path)
    assert bad.returncode == 2 and "'[bold]cooking'" in one_error_line(bad)
    usage = meetara("[red]launch", tmp_path=tmp_path)  # click's own usage errors too
    assert usage.returncode == 2 and "No such command '[red]launch'" in one_error_line(usage)
    unknown = meetara("cancel", "[bold]j1", tmp_path=tmp_path)
    assert unknown.returncode == 2
    assert one_error_line(unknown) == "error: no run or job '[bold]j1' on this machine (see meetara status)"
    trained = run_cli("-d", "[bold]cooking", env=_env(tmp_path), cwd=tmp_path)  # `python -m train`
    assert trained.returncode == 2 and "'[bold]cooking'" in one_error_line(trained)


# -- money ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, text",
    [(0, "$0.00"), (0.045, "$0.045"), (0.001, "$0.001"), (1234.5, "$1,234.50"), (2.32575, "$2.32575"),
     (0.05 + 0.04, "$0.09"), (-1.5, "-$1.50"), (1e-9, "$0.00"), (0.0123456789, "$0.012346")],
)  # fmt: skip
def test_usd_shows_the_ledgers_figure(x, text):
    assert usd(x) == text
    assert float(text.replace("$", "").replace(",", "")) == round(x, 6)


def _dollars(text: str, label: str) -> float:
    m = re.search(rf"{re.escape(label)} -?\$([\d,]+\.\d+)", text)
    assert m, (label, text)
    return float(m.group(1).replace(",", ""))


def test_money_in_a_refusal_and_in_budget_round_trips_to_the_ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    rid = ledger.reserve(
        "earlier", "j1", 0.1, provider="local", gpu="cpu", rate_per_hour=1, rate_source="local"
    )
    ledger.settle(rid, 0.045)
    ledger.close()

    budget = meetara("budget", "--json", tmp_path=tmp_path, MEETARA_DAILY_CAP="0.05")
    daily = json.loads(budget.stdout)["windows"][0]
    assert daily["spent"] == 0.045 and daily["remaining"] == 0.005
    table = meetara("budget", tmp_path=tmp_path, MEETARA_DAILY_CAP="0.05")
    row = next(line for line in table.stdout.splitlines() if "daily" in line)
    assert re.findall(r"\$[\d.]+", row) == ["$0.05", "$0.045", "$0.00", "$0.005"], row

    # a local plan scales its hours by the load now: a fixed speed makes `plan` and `launch` price alike
    fixed = {"MEETARA_LOCAL_TOKENS_S": "1e4"}
    plan = json.loads(meetara("plan", "-d", "nutrition", "--json", tmp_path=tmp_path, **fixed).stdout)
    capped = {**fixed, "MEETARA_DAILY_CAP": "0.05"}
    asked = round(plan["jobs"][0]["cost"] * 1.25, 6)  # what the job reserves (launcher/money.py)
    r = meetara("launch", "-d", "nutrition", "--budget", "5", "-y", tmp_path=tmp_path, **capped)
    line = r.stderr.strip().splitlines()[-1]  # after the plan's table
    assert r.returncode == 2 and line.startswith("error: refused: daily cap $0.05 would be passed"), line
    assert _dollars(line, "spent") == daily["spent"]
    assert _dollars(line, "reserved") == daily["reserved"]
    assert _dollars(line, "asked") == asked
    assert _dollars(line, "spent") + _dollars(line, "asked") > 0.05  # the figures shown decide it

    tiny = meetara("launch", "-d", "nutrition", "--budget", "0.001", "-y", tmp_path=tmp_path, **fixed)
    assert tiny.returncode == 2 and "over --budget $0.001:" in one_error_line(tiny)
    assert _dollars(one_error_line(tiny), "the plan costs") == round(plan["total_cost"], 6)


# -- cancel and logs --------------------------------------------------------------------------------


def test_cancel_stops_an_unfollowed_local_job_and_settles_its_money(tmp_path):
    """A launcher dies while its job trains (nobody follows the run): `logs -f` follows the job's log,
    `cancel JOB` stops it (it checkpoints), settles what it ran and releases the rest of its reservation;
    `logs` shows the log verbatim."""
    run = ("--run-id", "cx", "--poll", "0.2", "--epochs", "40")
    died = meetara(
        "launch",
        "-d",
        "nutrition",
        "--budget",
        "5",
        "-y",
        *run,
        tmp_path=tmp_path,
        MEETARA_CRASH_AT="running",
    )
    assert died.returncode == -9, died.stderr[-2000:]
    follow = _follow_log("cx-j1", tmp_path)
    try:
        seen = []
        # training has begun once a step line is in the log (SIGTERM then checkpoints and exits 75)
        while not re.search(r"^nutrition: step \d+/", "".join(seen), re.M):
            line = follow.stdout.readline()
            assert line, f"logs --follow ended early: {''.join(seen)} {follow.stderr.read()}"
            seen.append(line)
        # nobody follows the run: `status` asks the backend, and counts the running launch's time
        (running,) = json.loads(meetara("status", "cx", "--json", tmp_path=tmp_path).stdout)
        assert running["state"] == "RUNNING" and running["started_at"] is not None
        assert 0 < running["machine_seconds"] <= running["elapsed_seconds"]
        # machine_seconds is shown to 0.1 s, cost_so_far comes from the unrounded seconds
        per_s = RATE_H / 3600
        assert running["cost_so_far"] == pytest.approx(
            running["machine_seconds"] * per_s, abs=0.05 * per_s + 1e-6
        )
        table = meetara("status", tmp_path=tmp_path).stdout
        assert all(h in table for h in ("started", "elapsed", "cost so far"))
        cancel = meetara("cancel", "cx-j1", tmp_path=tmp_path)
        assert cancel.returncode == 0, cancel.stderr
        # the job ended: --follow ends too. Read on through the same buffered stream the lines above came
        # from (communicate() would read the pipe beneath it and lose what that stream holds already)
        watchdog = threading.Timer(120, follow.kill)
        watchdog.start()
        rest, err = follow.stdout.read(), follow.stderr.read()
        follow.wait()
        watchdog.cancel()
    finally:
        follow.kill()
    assert follow.returncode == 0, err

    ledger = Ledger(tmp_path / "ledger.sqlite")
    (res,) = ledger.reservations("cx")
    assert res.state == "settled" and res.note == "stopped: cancelled while no launcher watched"
    assert 0 < res.settled_amount < res.amount and ledger.outstanding() == 0
    ran = (res.ended_at - res.started_at).total_seconds() * RATE_H / 3600
    assert res.settled_amount == pytest.approx(ran)
    assert ledger.lease("cx") is None
    ledger.close()
    assert cancel.stdout.splitlines() == [
        "cancelled cx-j1 (checkpoints are kept: `meetara recover` resumes)",
        f"cx-j1: settled {usd(res.settled_amount)} spent, released {usd(res.amount - res.settled_amount)}",
    ]

    status = json.loads(meetara("status", "cx", "--json", tmp_path=tmp_path).stdout)
    assert [(j["job"], j["state"]) for j in status] == [("cx-j1", "CANCELLED")]
    # the machine time and cost status shows are the ledger's, once settled
    assert status[0]["machine_seconds"] == pytest.approx(
        (res.ended_at - res.started_at).total_seconds(), abs=0.1
    )
    assert status[0]["cost_so_far"] == pytest.approx(res.settled_amount, abs=1e-5)
    again = meetara("cancel", "cx", tmp_path=tmp_path)
    assert (again.returncode, again.stdout.strip()) == (0, "nothing to cancel: no job of run cx is running")

    log = meetara("logs", "cx", tmp_path=tmp_path)
    assert log.returncode == 0 and log.stdout.startswith("[meetara local] setup\n")  # brackets kept
    assert "".join(seen) + rest == log.stdout  # --follow showed all of it
    last = meetara("logs", "cx-j1", "--tail", "1", tmp_path=tmp_path)
    assert last.stdout == log.stdout.splitlines(keepends=True)[-1]


def _follow_log(job: str, tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", "logs", job, "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env={**os.environ, **_env(tmp_path)},
        text=True,
    )


def test_cancel_while_a_launcher_follows_leaves_the_money_to_it(tmp_path):
    """The launcher that follows the run holds its lease: `cancel` stops the job through the backend and
    moves no money; the launcher sees the job end, settles what it ran and releases the rest."""
    env = {**os.environ, **_env(tmp_path), "MEETARA_PROGRESS_EVERY_S": "0"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launcher", "launch", "-d", "nutrition", "--budget", "5", "-y"]
        + ["--run-id", "live", "--poll", "0.2", "--epochs", "40"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
        text=True,
    )
    try:
        follow = _follow_log("live-j1", tmp_path)
        # `logs` refuses until the launcher has recorded the launch: ask again until it follows the log
        while True:
            line = follow.stdout.readline()
            if line:
                break
            assert follow.wait(60) == 2 and launcher.poll() is None, follow.stderr.read()
            follow = _follow_log("live-j1", tmp_path)
        while not re.match(r"nutrition: step \d+/", line):
            line = follow.stdout.readline()
            assert line, follow.stderr.read()
        # not a terminal: the launcher's progress says what the job does before a domain is done
        said = [launcher.stderr.readline()]
        while not re.match(r"live-j1: nutrition: step \d+/\d+ loss", said[-1]):
            assert said[-1], "".join(said)
            said.append(launcher.stderr.readline())
        cancel = meetara("cancel", "live", tmp_path=tmp_path)
        assert cancel.returncode == 0, cancel.stderr
        watchdog = threading.Timer(180, launcher.kill)
        watchdog.start()
        err = "".join(said) + launcher.stderr.read()  # the same buffered stream the lines came from
        launcher.wait()
        watchdog.cancel()
        follow.communicate(timeout=60)
    finally:
        launcher.kill()
        follow.kill()
    lines = cancel.stdout.splitlines()
    assert lines[0] == "cancelled live-j1 (checkpoints are kept: `meetara recover` resumes)"
    assert re.fullmatch(r"the launcher following run live \(pid \d+ on .+\) settles the money", lines[1])
    assert len(lines) == 2
    assert launcher.returncode == 1 and "live-j1 cancelled" in err, err[-2000:]
    ledger = Ledger(tmp_path / "ledger.sqlite")
    (res,) = ledger.reservations("live")
    assert res.state == "settled" and res.note == "stopped: cancelled"
    assert 0 < res.settled_amount < res.amount and ledger.outstanding() == 0
    assert ledger.lease("live") is None
    ledger.close()


class _Backend:
    """A backend whose job runs until cancelled; `stops_at_once=False`: it is still stopping after the
    cancel call returns (SkyPilot cancels asynchronously)."""

    name = "skypilot"
    teardown_s = 0.0

    def __init__(self, started, ended, stops_at_once: bool) -> None:
        self.started, self.ended, self.stops_at_once = started, ended, stops_at_once
        self.cancelled: list[str] = []

    def status(self, handle: str):
        from launcher.backends.base import JobState, JobStatus

        if handle in self.cancelled and self.stops_at_once:
            return JobStatus(JobState.CANCELLED, self.started, self.ended)
        return JobStatus(JobState.RUNNING, self.started)

    def cancel(self, handle: str) -> None:
        self.cancelled.append(handle)

    def find(self, name: str) -> None:
        return None


def _sky_run(tmp_path: Path, monkeypatch, run_id: str):
    """A SkyPilot run of one job with $1.00 reserved at $3.60/h, recorded on disk: (record, job, ledger)."""
    from launcher.launch import new_run
    from launcher.plan import Workload, plan_local
    from launcher.preferences import Preferences

    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    plan = plan_local(["nutrition"], Preferences(), Workload(base_model="tiny"), run_id)
    rec = new_run(plan, store="s3://b/p", endpoint_url=None, models_dir=tmp_path / "models", budget=5)
    rec.backend = "skypilot"
    ledger = Ledger(tmp_path / "ledger.sqlite")
    (job,) = rec.jobs.values()
    job.reservation_id = ledger.reserve(
        run_id, job.name, 1.0, provider="vast", gpu="A100", rate_per_hour=3.6, rate_source="live"
    )
    return rec, job, ledger


@pytest.mark.parametrize("stops_at_once", [True, False])
def test_cancel_settles_through_the_backend_interface(tmp_path, monkeypatch, stops_at_once):
    """`cancel` asks the run's backend (SkyPilot here, through the same interface) and settles what ran
    at the job's rate from the backend's start and end times; a job still stopping keeps its money open."""
    from datetime import UTC, datetime, timedelta

    from launcher.jobs import cancel, cancel_lines

    rec, job, ledger = _sky_run(tmp_path, monkeypatch, "sk")
    job.state, job.handle = "RUNNING", "7"
    rec.save()
    started = datetime.now(UTC) - timedelta(seconds=100)
    backend = _Backend(started, started + timedelta(seconds=90), stops_at_once)

    report = cancel("sk-j1", backend=backend)
    assert backend.cancelled == ["7"] and report.cancelled == ["sk-j1"] and report.followed_by is None
    res = ledger.reservation(job.reservation_id)
    if stops_at_once:  # 90 s at $3.60/h: $0.09 spent, $0.91 released
        assert res.state == "settled" and res.settled_amount == pytest.approx(0.09)
        assert cancel_lines(report)[1] == "sk-j1: settled $0.09 spent, released $0.91"
    else:
        assert res.state == "open" and report.open == ["sk-j1"]
        assert cancel_lines(report)[1] == "sk-j1: still stopping; `meetara recover sk` settles its money"
    assert ledger.lease("sk") is None
    ledger.close()


class _EndedBackend(_Backend):
    """The launch a dead launcher started (and never recorded) ran and ended before `cancel`."""

    def status(self, handle: str):
        from launcher.backends.base import JobState, JobStatus

        return JobStatus(JobState.SUCCEEDED, self.started, self.ended)

    def find(self, name: str) -> str:
        return "7"


def test_cancel_settles_a_launch_its_dead_launcher_never_recorded(tmp_path, monkeypatch):
    """The launcher died between starting a launch and recording it (LAUNCHING, no handle): `cancel`
    finds it by name as `recover` would, and bills what it ran; the money is not released as if it had
    never launched."""
    from datetime import UTC, datetime, timedelta

    from launcher.jobs import cancel
    from launcher.runs import LAUNCHING, load_run

    rec, job, ledger = _sky_run(tmp_path, monkeypatch, "lx")
    job.state, job.handle, job.launch_name = LAUNCHING, None, "meetara-lx-j1-1"
    rec.save()
    started = datetime.now(UTC) - timedelta(seconds=100)
    backend = _EndedBackend(started, started + timedelta(seconds=90), True)

    report = cancel("lx-j1", backend=backend)
    assert report.not_running == ["lx-j1"] and backend.cancelled == []
    res = ledger.reservation(job.reservation_id)
    assert res.state == "settled" and res.settled_amount == pytest.approx(0.09)  # 90 s at $3.60/h
    assert load_run("lx").jobs["lx-j1"].handle == "7"
    ledger.close()


# -- commands agree about the same facts ------------------------------------------------------------------


def test_plan_and_launch_agree_on_domains_already_done(tmp_path):
    """Work done in the run's store is skipped by `plan` exactly as by `launch`: neither prices it."""
    trained = meetara(
        "train", "-d", "nutrition", "--samples", "16", "--epochs", "0.1", "--run-id", "r1", tmp_path=tmp_path
    )
    assert trained.returncode == 0, trained.stderr
    both = meetara("plan", "-d", "nutrition,fitness", "--run-id", "r1", "--json", tmp_path=tmp_path)
    assert both.returncode == 0, both.stderr
    plan = json.loads(both.stdout)
    assert plan["done"] == ["nutrition"] and plan["store"] == f"file://{tmp_path}/store"
    assert [d for j in plan["jobs"] for d in j["domains"]] == ["fitness"]
    shown = meetara("plan", "-d", "nutrition,fitness", "--run-id", "r1", tmp_path=tmp_path)
    assert f"1 of 2 domains already done in file://{tmp_path}/store: skipped" in shown.stderr
    assert "fitness" in shown.stdout and "nutrition" not in shown.stdout

    done = meetara("plan", "-d", "nutrition", "--run-id", "r1", tmp_path=tmp_path)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    assert "nothing to plan: run r1 has every domain asked for" in done.stderr
    launched = meetara("launch", "-d", "nutrition", "--run-id", "r1", "--budget", "1", tmp_path=tmp_path)
    assert launched.returncode == 0, launched.stderr
    assert "1 of 1 domains already done" in launched.stderr
    assert (tmp_path / "models" / "nutrition" / "adapter.gguf").is_file()
    ledger = Ledger(tmp_path / "ledger.sqlite")  # nothing was reserved for done work
    assert ledger.open_reservations() == [] and ledger.spent("monthly") == 0


def test_repeated_domains_add_up(tmp_path):
    """`-d nutrition -d legal` is `-d nutrition,legal` (before: only the last, legal, was planned)."""
    for argv, domains in (
        (["-d", "nutrition", "-d", "legal"], ["nutrition", "legal"]),
        (["-d", "nutrition,legal", "-d", "legal", "-d", "fitness"], ["nutrition", "legal", "fitness"]),
    ):
        r = meetara("plan", *argv, "--backend", "local", "--json", tmp_path=tmp_path)
        assert r.returncode == 0, r.stderr
        assert [d for j in json.loads(r.stdout)["jobs"] for d in j["domains"]] == domains
    argv = ["-d", "nutrition", "-d", "legal", "--store", "s3://b/p", "-o", "nb.ipynb"]
    r = meetara("notebook", *argv, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    cells = json.loads((tmp_path / "nb.ipynb").read_text())["cells"]
    assert "DOMAINS = 'nutrition,legal'" in "".join(cells[1]["source"])


RUN_ID_COMMANDS = [
    ("status", "nosuch"),
    ("recover", "nosuch"),
    ("cancel", "nosuch"),
    ("logs", "nosuch"),
    ("pull", "--run-id", "nosuch"),
]


@pytest.mark.parametrize("args", RUN_ID_COMMANDS, ids=lambda a: a[0])
def test_every_run_id_command_refuses_an_unknown_run_in_one_line(tmp_path, args):
    other = tmp_path / "store" / "runs" / "other" / "domains" / "legal"
    other.mkdir(parents=True)  # a store that holds another run only
    (other / "failed.json").write_text("{}")
    r = meetara(*args, tmp_path=tmp_path)
    assert r.returncode == 2 and "'nosuch'" in one_error_line(r), r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "models").exists()


def test_pull_finds_a_run_trained_elsewhere_in_the_store(tmp_path):
    """A run this machine never launched (the notebook's, another laptop's) is known by its store."""
    trained = meetara(
        "train",
        "-d",
        "nutrition",
        "--samples",
        "16",
        "--epochs",
        "0.1",
        "--run-id",
        "colab",
        tmp_path=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    r = meetara("pull", "--run-id", "colab", "-d", "nutrition", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "models" / "nutrition" / "manifest.json").is_file()


# -- preferences that empty a provider, tables that hide ---------------------------------------------------


def _snapshot_regions() -> dict[str, set[str]]:
    from launcher.offers import load_snapshot

    out: dict[str, set[str]] = {}
    for o in load_snapshot():
        out.setdefault(o.provider, set()).add(o.region)
    return out


@pytest.mark.parametrize(
    "wanted, kept",
    [
        # a country code: every region in that country, however the provider writes it
        ("US", lambda p, r: r.lower().startswith("us-")),
        ("de", lambda p, r: r in ("europe-central-1", "DE-Germany")),
        ("SE", lambda p, r: r in ("EU-SE-1", "SE-Sweden")),
        ("JP", lambda p, r: r in ("asia-northeast-1", "JP-Tokyo")),
        ("CA", lambda p, r: r in ("CA-MTL-1", "CA-Ontario", "CA-Quebec")),
        # a prefix of a provider's own names, at a '-' boundary
        ("us-east", lambda p, r: r in ("us-east-1", "us-east-3")),
        ("EU", lambda p, r: r.startswith("EU-")),
        # a region exactly, in any case
        ("us-west-2", lambda p, r: r == "us-west-2"),
        ("us-texas", lambda p, r: r == "US-Texas"),
        ("U", lambda p, r: False),
    ],
)
def test_a_region_preference_matches_as_users_write_it(wanted, kept):
    from launcher.regions import matches

    for provider, regions in _snapshot_regions().items():
        for region in regions:
            assert matches(wanted, provider, region) == kept(provider, region), (wanted, provider, region)


def test_readme_region_example_keeps_vast_offers_in_those_countries(tmp_path):
    """`providers set vast --weight 1.2 --regions US,CA` (the README's example) keeps the US and Canadian
    Vast offers; it once dropped every one of them and the plan cost 5x, silently."""
    from launcher.offers import load_snapshot

    env = {"MEETARA_CONFIG": str(tmp_path / "prefs.yaml")}
    r = meetara("providers", "set", "vast", "--weight", "1.2", "--regions", "US,CA", tmp_path=tmp_path, **env)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    shown = json.loads(
        meetara("offers", "-p", "vast", "--json", "--limit", "500", tmp_path=tmp_path, **env).stdout
    )
    expected = {
        (o.instance_type, o.region)
        for o in load_snapshot()
        if o.provider == "vast" and o.region[:3] in ("US-", "CA-")
    }
    assert expected and {(o["instance_type"], o["region"]) for o in shown} == expected
    # the countries plan exactly as their regions listed one by one would
    listed = {"MEETARA_CONFIG": str(tmp_path / "listed.yaml")}
    regions = ",".join(sorted({region for _, region in expected}))
    meetara("providers", "set", "vast", "--weight", "1.2", "--regions", regions, tmp_path=tmp_path, **listed)
    plans = [
        json.loads(
            meetara("plan", "-d", "all", "--backend", "skypilot", "--json", tmp_path=tmp_path, **e).stdout
        )
        for e in (env, listed)
    ]
    assert plans[0]["excluded"] == {} and plans[0]["jobs"] == plans[1]["jobs"]
    assert any(j["offer"]["provider"] == "vast" for j in plans[0]["jobs"])


def test_a_preference_that_excludes_all_of_a_provider_is_reported_everywhere(tmp_path):
    env = {"MEETARA_CONFIG": str(tmp_path / "prefs.yaml")}
    why = "vast: your preferences exclude all 22 of its offers (no region matches --regions us-east)"
    r = meetara("providers", "set", "vast", "--regions", "us-east", tmp_path=tmp_path, **env)
    assert r.returncode == 0 and f"warning: {why}" in r.stderr, r.stderr
    offers = meetara("offers", "-p", "vast", tmp_path=tmp_path, **env)
    assert offers.returncode == 0 and why in offers.stderr, offers.stderr
    assert "0 offers" in offers.stdout
    plan = meetara("plan", "-d", "nutrition", "--backend", "skypilot", tmp_path=tmp_path, **env)
    assert plan.returncode == 0 and f"warning: {why}" in plan.stderr, plan.stderr
    as_json = meetara("plan", "-d", "nutrition", "--backend", "skypilot", "--json", tmp_path=tmp_path, **env)
    assert json.loads(as_json.stdout)["excluded"] == {"vast": why.split(": ", 1)[1]}
    # the same provider with --all (preferences ignored) is whole again, with no warning
    everything = meetara("offers", "-p", "vast", "--all", "--limit", "500", tmp_path=tmp_path, **env)
    assert "warning" not in everything.stderr and "exclude" not in everything.stderr
    assert "44 offers" in everything.stdout  # 22 machines x spot and on-demand


def test_a_flag_that_excludes_all_of_a_provider_is_named_not_the_preferences(tmp_path):
    r = meetara("offers", "--spot", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    # the snapshot has no spot prices for lambda and runpod: it is --spot that leaves them out
    assert "lambda: --spot excludes all 19 of its offers (no spot price)" in r.stderr, r.stderr
    assert "preferences" not in r.stderr
    (tmp_path / "prefs.yaml").write_text("providers:\n  lambda:\n    regions: [us-east-1]\n")
    mixed = meetara("offers", "--spot", tmp_path=tmp_path, MEETARA_CONFIG=str(tmp_path / "prefs.yaml"))
    assert "lambda: your preferences and --spot exclude all 19 of its offers (" in mixed.stderr, mixed.stderr


def test_offers_order_and_columns_agree_on_the_provider_weights(tmp_path):
    """The table is ranked by expected $/h x the provider's weight; with a weight that is not 1 it
    shows that product (before: "exp. $/h" ignored the weight its order used)."""
    (tmp_path / "prefs.yaml").write_text("providers:\n  vast:\n    weight: 3\n")
    env = {"MEETARA_CONFIG": str(tmp_path / "prefs.yaml")}
    doc = json.loads(meetara("offers", "--json", "--limit", "500", tmp_path=tmp_path, **env).stdout)
    weights = {"vast": 3.0, "lambda": 1.0, "runpod": 1.0}
    for o in doc:
        assert o["weighted_hour"] == pytest.approx(o["expected_hour"] * weights[o["provider"]])
    assert [o["weighted_hour"] for o in doc] == sorted(o["weighted_hour"] for o in doc)
    assert [o["expected_hour"] for o in doc] != sorted(o["expected_hour"] for o in doc)  # the weight counts
    table = meetara("offers", "--limit", "500", tmp_path=tmp_path, **env).stdout
    header = next(line for line in table.splitlines() if "provider" in line)
    assert [h.strip() for h in header.split("┃")[-3:-1]] == ["exp. $/h", "weighted $/h"], header
    plain = meetara("offers", tmp_path=tmp_path).stdout  # every weight 1: the two columns would agree
    assert "weighted" not in plain


def test_status_with_no_runs_is_one_line(tmp_path):
    r = meetara("status", tmp_path=tmp_path)
    assert r.returncode == 0 and r.stdout == "", r.stdout
    assert r.stderr.strip() == "no runs yet on this machine: `meetara launch` starts one"
    assert json.loads(meetara("status", "--json", tmp_path=tmp_path).stdout) == []


def test_the_readme_simulate_example_runs_from_a_clone(tmp_path):
    """Its --market is a synthetic market or a path inside the repository (it pointed at a folder that
    exists only beside this checkout); the example runs as written, with fewer replays."""
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Replaying a spot market", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    argv = block.replace("\\\n", " ").split()
    assert argv[:2] == ["meetara", "simulate"], argv
    market = argv[argv.index("--market") + 1]
    assert market.startswith("synthetic:") or (ROOT / market).resolve().is_relative_to(ROOT), market
    argv[argv.index("--replays") + 1] = "2"
    r = meetara(*argv[1:], tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(json.loads(r.stdout)["policies"]) == {"on-demand", "greedy", "uniform-progress", "meetara"}


def test_notebook_takes_the_output_option_the_readme_and_its_refusal_name(tmp_path):
    from conftest import ROOT

    assert "`--out FILE` / `-o FILE`" in (ROOT / "README.md").read_text()
    args = ("notebook", "-d", "nutrition", "--store", "s3://bucket/meetara")
    assert meetara(*args, "--out", "a.ipynb", tmp_path=tmp_path).returncode == 0
    again = meetara(*args, "-o", "a.ipynb", tmp_path=tmp_path)
    assert "a.ipynb exists: pass --force to overwrite it, or --out/-o another file" in one_error_line(again)


def test_offers_title_says_how_many_are_hidden_and_how_to_see_them(tmp_path):
    from launcher.offers import load_snapshot
    from launcher.preferences import Preferences
    from launcher.select import rank

    total = len(rank(load_snapshot(), Preferences()))
    r = meetara("offers", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"25 of {total} offers" in r.stdout and f"--limit {total} shows all" in r.stdout
    shown = {line.split("│")[1].strip() for line in r.stdout.splitlines() if line.startswith("│")}
    hidden = sorted({"lambda", "runpod", "vast"} - shown)
    assert hidden and f"(not shown: {', '.join(hidden)})" in r.stdout
    everything = meetara("offers", "--limit", str(total), tmp_path=tmp_path)
    assert f" {total} offers (snapshot" in everything.stdout and "shows all" not in everything.stdout


def test_offers_live_with_no_provider_answering_says_each_error_once_and_fails(tmp_path):
    from conftest import closed_port

    dead = f"http://127.0.0.1:{closed_port()}"
    env = {
        "MEETARA_CACHE": str(tmp_path / "cache"),
        "MEETARA_HTTP_RETRIES": "0",
        **{f"MEETARA_{p}_API_URL": dead for p in ("LAMBDA", "RUNPOD", "VAST")},
        **{f"{p}_API_KEY": "k-test" for p in ("LAMBDA", "RUNPOD", "VAST")},
    }
    r = meetara("offers", "--live", tmp_path=tmp_path, **env)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    lines = r.stderr.strip().splitlines()
    for provider in ("lambda", "runpod", "vast"):
        assert sum(line.startswith(f"{provider}:") for line in lines) == 1, r.stderr
    assert lines[-1].startswith("error: no live offers: lambda, runpod, vast gave none")
    assert "k-test" not in r.stderr and "Traceback" not in r.stderr


# -- progress that says what happened ---------------------------------------------------------------------


def _on_a_terminal(args: list[str], tmp_path: Path, timeout: float = 600) -> tuple[int, str]:
    """Run `meetara ARGS` with a pseudo-terminal for stdin, stdout and stderr (rich draws its live
    progress bars, as for a user); returns the exit code and everything the screen was sent."""
    main, child = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "launcher", *args],
        stdin=child,
        stdout=child,
        stderr=child,
        cwd=tmp_path,
        env={**os.environ, **_env(tmp_path), "COLUMNS": "160", "LINES": "50", "TERM": "xterm"},
    )
    os.close(child)
    watchdog = threading.Timer(timeout, p.kill)
    watchdog.start()
    screen = bytearray()
    try:
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: every holder of the terminal's other end has closed it
                break
            if not chunk:
                break
            screen += chunk
    finally:
        watchdog.cancel()
        os.close(main)
    return p.wait(), screen.decode(errors="replace")


def test_a_preemption_on_a_terminal_says_preempted_and_relaunching(tmp_path):
    code, screen = _on_a_terminal(
        ["launch", "-d", "nutrition", "--budget", "5", "-y", "--run-id", "pt", "--poll", "0.2"]
        + ["--preempt-every", "1", "--preempt-max", "1"],
        tmp_path,
    )
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)  # the terminal's control sequences
    assert code == 0, text[-3000:]
    assert "pt-j1: preempted, relaunching (1 of 3)" in text, text[-3000:]
    assert "running on local" in text  # the bar says where the job runs, and what it does there
    assert re.search(r"nutrition: step \d+/\d+ loss", text), text[-3000:]
    status = json.loads(meetara("status", "pt", "--json", tmp_path=tmp_path).stdout)
    assert [(j["state"], j["preemptions"]) for j in status] == [("SUCCEEDED", 1)]


def test_doctor_with_something_else_on_the_skypilot_port_says_so(tmp_path):
    """A process that is not an HTTP server on meetara's SkyPilot port (an SSH server answers
    "SSH-2.0-..."): doctor's row says what holds the port (before: an internal error, BadStatusLine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)

        def serve() -> None:
            while True:
                try:
                    conn, _ = s.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

        threading.Thread(target=serve, daemon=True).start()
        r = meetara("doctor", tmp_path=tmp_path, MEETARA_SKY_PORT=str(s.getsockname()[1]))
    assert r.returncode == 0 and "internal error" not in r.stderr, r.stderr
    row = next(line for line in r.stdout.splitlines() if "SkyPilot API server" in line)
    assert "no" in row, row
