"""`meetara mcp` driven through the MCP SDK's own client over stdio, as an MCP client (Claude Desktop,
an IDE) starts it: tools and resources listed, a plan, a local launch that returns at once and ends
in validated GGUFs pulled by its background follower, and refusals whose text is what the CLI prints
after "error: "."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from conftest import run_cli

TOOLS = {"offers", "plan", "launch", "status", "report", "recover", "pull", "wait"}


def sandbox(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "MEETARA_STORE": f"file://{tmp_path}/store",
        "MEETARA_STATE_DIR": str(tmp_path / "state"),
        "MEETARA_LEDGER_URL": str(tmp_path / "ledger.sqlite"),
        **extra,
    }


@asynccontextmanager
async def server(tmp_path: Path, env: dict[str, str], *options: str):
    """A `meetara mcp [OPTIONS]` subprocess in tmp_path and an initialized client session on its stdio."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=sys.executable, args=["-m", "launcher", "mcp", *options], env=env, cwd=str(tmp_path)
    )
    with open(tmp_path / "mcp-server.log", "w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as s:
            s.initialized = await s.initialize()  # what the server said it is and can do
            yield s


def text(result) -> str:
    return "".join(c.text for c in result.content if c.type == "text")


async def call(s, tool: str, **args) -> dict:
    result = await s.call_tool(tool, args, read_timeout_seconds=600)
    assert not result.is_error, text(result)
    return result.structured_content


async def refused(s, tool: str, **args) -> str:
    result = await s.call_tool(tool, args, read_timeout_seconds=60)
    assert result.is_error, text(result)
    return text(result)


async def resource(s, uri: str) -> dict:
    return json.loads((await s.read_resource(uri)).contents[0].text)


def cli_error(tmp_path: Path, env: dict[str, str], *args: str) -> str:
    """What `meetara ARGS` prints after "error: " (its last stderr line), run in the same place."""
    r = run_cli(*args, module="launcher", cwd=tmp_path, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    last = [x for x in r.stderr.splitlines() if x.strip()][-1]
    assert last.startswith("error: "), r.stderr
    return last.removeprefix("error: ").removesuffix(" (see meetara --help)")


def test_mcp_lists_plans_launches_and_reports(tmp_path):
    env = sandbox(tmp_path)

    async def main() -> dict:
        seen: dict = {}
        async with server(tmp_path, env) as s:
            seen["initialized"] = s.initialized
            seen["tools"] = {t.name for t in (await s.list_tools()).tools}
            seen["resources"] = {str(r.uri) for r in (await s.list_resources()).resources}
            templates = (await s.list_resource_templates()).resource_templates
            seen["templates"] = {t.uri_template for t in templates}
            seen["plan"] = await call(s, "plan", domains="nutrition,legal", backend="local")
            notes: list = []

            async def heard(progress, total, message) -> None:
                notes.append((progress, total, message))

            t0 = time.monotonic()
            result = await s.call_tool(
                "launch",
                dict(domains="nutrition", budget=1, backend="local", samples=80),
                read_timeout_seconds=60,
                progress_callback=heard,
            )
            seen["launch took"] = time.monotonic() - t0
            assert not result.is_error, text(result)
            seen["launch"], seen["launch notes"] = result.structured_content, list(notes)
            # no further call: the background follower trains, validates and pulls on its own
            seen["pulled"] = await until_pulled(tmp_path, "default", "nutrition", timeout_s=300)
            notes.clear()
            result = await s.call_tool(
                "wait", dict(run_id="default", wait_s=30), read_timeout_seconds=60, progress_callback=heard
            )
            seen["wait"], seen["wait notes"] = result.structured_content, list(notes)
            for name in ("runs/default", "runs", "quality", "budget"):
                seen[name] = await resource(s, f"meetara://{name}")
            seen["pull"] = await call(s, "pull", domains="nutrition")
            seen["status"] = await call(s, "status")
            seen["recover"] = await call(s, "recover")
        return seen

    seen = anyio.run(main)  # assertions out here: inside, a failure comes wrapped in task-group noise
    from importlib.metadata import version

    info, caps = seen["initialized"].server_info, seen["initialized"].capabilities
    assert (info.name, info.version) == ("meetara", version("meetara"))
    assert caps.prompts is None and caps.tools is not None and caps.resources is not None
    assert seen["tools"] == TOOLS
    assert {"meetara://budget", "meetara://runs", "meetara://quality"} <= seen["resources"]
    assert "meetara://runs/{run_id}" in seen["templates"]

    plan = seen["plan"]
    assert plan["backend"] == "local" and plan["workload"]["base_model"] == "tiny"
    assert sorted(d for j in plan["jobs"] for d in j["domains"]) == ["legal", "nutrition"]

    started = seen["launch"]
    assert seen["launch took"] < 2.0, seen["launch took"]
    assert (started["run_id"], started["state"], started["domains"]) == (
        "default",
        "following",
        ["nutrition"],
    )
    assert started["pid"] and started["planned_cost"] >= 0
    said = [m for _, _, m in seen["launch notes"]]
    assert said[0].startswith("planned 1 domains in 1 job(s) for $"), said
    assert said[1].startswith("reserved $") and said[1].endswith(
        "in the ledger (the plan's cost and its margin)"
    ), said
    assert said[-1] == f"following in the background (pid {started['pid']})", said
    assert seen["pulled"]["state"] == "ended" and seen["pulled"]["exit_code"] == 0, seen["pulled"]
    assert seen["pulled"]["domains_here"] == 1
    assert seen["wait"]["ended"] and seen["wait"]["domains_done"] == 1 == seen["wait"]["domains_total"]
    assert seen["wait notes"] and seen["wait notes"][-1][:2] == (1, 1), seen["wait notes"]
    manifest = json.loads((tmp_path / "models" / "nutrition" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["validation"]["passed"]
    assert (tmp_path / "models" / "nutrition" / "adapter.gguf").stat().st_size > 0

    run = seen["runs/default"]
    [nutrition] = run["domains"]
    assert (run["done"], run["pending"], run["domains_total"]) == (1, 0, 1)
    assert nutrition["state"] == "done" and nutrition["validation_passed"] and nutrition["pulled"]
    assert nutrition["heldout_loss_after"] < nutrition["heldout_loss_before"]
    assert run["jobs"][0]["state"] == "SUCCEEDED"
    runs = seen["runs"]["runs"]
    assert [(r["run_id"], r["domains_done"], r["domains_total"]) for r in runs] == [("default", 1, 1)]

    [q] = seen["quality"]["domains"]
    assert (q["domain"], q["validation_passed"], q["status"]) == ("nutrition", True, "done")
    # one file ships per domain by default (the adapter, on the run's Q4_K_M base), and its check passed
    assert 0 < q["acceptance_rate"] <= 1 and q["checks_passed"] == len(q["checks"]) == 1
    assert list(q["checks"]) == ["adapter"]
    assert q["heldout_loss_after"] == manifest["metrics"]["heldout_loss_after"]

    budget = seen["budget"]
    assert [w["window"] for w in budget["windows"]] == ["daily", "weekly", "monthly"]
    assert budget["open_reservations"] == []  # the run's reservation is settled

    assert seen["pull"]["domains"]["nutrition"]["status"] == "up-to-date"
    jobs = seen["status"]["jobs"]
    assert [(j["state"], j["domains_done"], j["launches"]) for j in jobs] == [("SUCCEEDED", 1, 1)]
    assert seen["recover"]["runs"] == []  # nothing unfinished


async def until_pulled(tmp_path: Path, run_id: str, domain: str, timeout_s: float) -> dict:
    """Watch the files (no MCP call) until the run's follower recorded its end, with the domain pulled;
    returns the follower's record."""
    record = tmp_path / "state" / "runs" / f"{run_id}.json"
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        follower = json.loads(record.read_text()).get("follower") or {} if record.exists() else {}
        if follower.get("state") == "ended":
            assert (tmp_path / "models" / domain / "manifest.json").exists(), follower
            return follower
        await anyio.sleep(0.5)  # polling another process's files
    log = (tmp_path / "state" / "runs" / f"{run_id}.follower.log").read_text()
    raise AssertionError(f"the follower did not end in {timeout_s} s:\n{log[-3000:]}")


def test_mcp_refusals_are_the_cli_messages(tmp_path):
    # at $1000/h the local plan for one domain costs ~$10: over a $0.50 budget, and over the $5 daily cap;
    # its start-up and speed given, so that the machine's load (which local plans are priced by) cannot
    # change the figure between the MCP's launch and the CLI's
    env = sandbox(
        tmp_path, MEETARA_LOCAL_PRICE_HOUR="1000", MEETARA_LOCAL_STARTUP_S="30", MEETARA_LOCAL_TOKENS_S="1e4"
    )
    cases = [
        (dict(domains="legal", budget=0.5), ["-d", "legal", "--budget", "0.5"]),
        (dict(domains="legal", budget=50), ["-d", "legal", "--budget", "50"]),
        (dict(domains="legall", budget=5), ["-d", "legall", "--budget", "5"]),
        (dict(domains="legal", budget=-1), ["-d", "legal", "--budget", "-1"]),
        (dict(domains="legal", budget=5, samples=8), ["-d", "legal", "--budget", "5", "--samples", "8"]),
        (
            dict(domains="legal", budget=5, store="ftp://x"),
            ["-d", "legal", "--budget", "5", "--store", "ftp://x"],
        ),
    ]

    async def main():
        async with server(tmp_path, env) as s:
            return [await refused(s, "launch", backend="local", **args) for args, _ in cases]

    got = anyio.run(main)
    want = [cli_error(tmp_path, env, "launch", "--backend", "local", "--yes", *argv) for _, argv in cases]
    assert got == want
    assert "over --budget $0.50" in got[0] and got[1].startswith("refused: daily cap $5.00")
    assert not (tmp_path / "store" / "runs").exists()  # nothing was launched


def run_id_rule(run_id: object) -> str:
    """The one line the job's run-id type (train.names) refuses `run_id` with."""
    import pytest

    from train import BadInput
    from train.names import check_run_id

    with pytest.raises(BadInput) as e:
        check_run_id(run_id)
    return str(e.value)


def test_mcp_arguments_are_strict_one_line_and_checked_before_money_moves(tmp_path):
    # at $1000/h a local launch of one domain costs ~$10: refused by a $0.50 budget inside the launch lock
    env = sandbox(tmp_path, MEETARA_LOCAL_PRICE_HOUR="1000")
    strict = [  # (tool, arguments, the CLI's words)
        (
            "launch",
            dict(domains="legal", budget="5"),
            "Invalid value for '--budget': Input should be a valid number",
        ),
        (
            "launch",
            dict(domains="legal", budget=True),
            "Invalid value for '--budget': Input should be a valid number",
        ),
        (
            "launch",
            dict(domains="legal", budget=5, samples="80"),
            "Invalid value for '--samples': Input should be a valid integer",
        ),
        (
            "plan",
            dict(domains="legal", epochs="2"),
            "Invalid value for '--epochs': Input should be a valid number",
        ),
        ("plan", dict(domains=["legal"]), "Invalid value for '--domains': Input should be a valid string"),
        ("offers", dict(live="true"), "Invalid value for '--live': Input should be a valid boolean"),
        ("offers", dict(spot=1), "Invalid value for '--spot/--on-demand': Input should be a valid boolean"),
        ("offers", dict(limit="3"), "Invalid value for '--limit': Input should be a valid integer"),
        ("offers", dict(limit=0), "Invalid value for '--limit': Input should be greater than or equal to 1"),
        (
            "recover",
            dict(run_id="r", budget="1"),
            "Invalid value for '--budget': Input should be a valid number",
        ),
        ("launch", dict(budget=5), "Missing option '--domains'."),
        # the bounds every face shares (train.bounds): a plan of 10**12 samples is refused even at $0/h
        (
            "plan",
            dict(domains="legal", backend="local", samples=10**12),
            "Invalid value for '--samples': Input should be less than or equal to 100000",
        ),
        (
            "launch",
            dict(domains="legal", budget=5, backend="local", samples=10**12),
            "Invalid value for '--samples': Input should be less than or equal to 100000",
        ),
        (
            "plan",
            dict(domains="legal", epochs=1e300),
            "Invalid value for '--epochs': Input should be less than or equal to 100",
        ),
        (
            "report",
            dict(since="99999999d"),
            "--since: '99999999d' is out of range (0002-01-01 to 9998-12-31); omit --since for no bound",
        ),
        (
            "report",
            dict(until="9999-12-31"),
            "--until: '9999-12-31' is out of range (0002-01-01 to 9998-12-31); omit --until for no bound",
        ),
        ("pull", dict(models="x"), "No such option: models (pull takes run_id, domains, store, models_dir)"),
    ]
    bad_ids = ["a/b", "a b", "caf\u00e9", "x" * 300, "../x", "", 7]
    id_calls = [("launch", dict(domains="legal", budget=5, backend="local", run_id=r)) for r in bad_ids]
    id_calls += [
        ("plan", dict(domains="legal", run_id="a/b")),
        ("pull", dict(run_id="a/b")),
        ("status", dict(run_id="a/b")),
        ("recover", dict(run_id="a/b", budget=5)),
    ]

    async def main() -> dict:
        seen: dict = {}
        async with server(tmp_path, env) as s:
            seen["strict"] = [await refused(s, tool, **args) for tool, args, _ in strict]
            seen["ids"] = [await refused(s, tool, **args) for tool, args in id_calls]
            # refused inside the launch lock, twice: the lock is released after a refusal
            seen["budget"] = [
                await refused(s, "launch", domains="legal", budget=0.5, backend="local") for _ in range(2)
            ]
            seen["runs"] = await resource(s, "meetara://runs")
            seen["ledger"] = await resource(s, "meetara://budget")
        return seen

    seen = anyio.run(main)
    assert seen["strict"] == [want for _, _, want in strict]
    assert seen["ids"] == [run_id_rule(r) for r in bad_ids] + [run_id_rule("a/b")] * 4
    for message in seen["strict"] + seen["ids"] + seen["budget"]:
        assert "\n" not in message and "validation error" not in message, message
    assert all("over --budget $0.50" in m for m in seen["budget"]), seen["budget"]
    # nothing reserved, spent, recorded or launched
    assert seen["ledger"]["open_reservations"] == []
    assert all(w["spent"] == 0 and w["reserved"] == 0 for w in seen["ledger"]["windows"]), seen["ledger"]
    assert seen["runs"]["runs"] == []
    assert not (tmp_path / "store" / "runs").exists()


def test_mcp_starts_at_every_log_level_the_cli_takes(tmp_path):
    async def main(level: str) -> dict:
        async with server(tmp_path, sandbox(tmp_path, MEETARA_LOG=level)) as s:
            return await call(s, "status")

    for level in ("WARN", "10", "25", "info", "fatal"):  # the SDK takes only DEBUG ... CRITICAL
        assert anyio.run(main, level) == {"jobs": []}, level


def test_mcp_pull_outside_the_workdir_is_refused(tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "link").symlink_to(elsewhere)  # inside by name, outside once resolved
    step = work / "store" / "runs" / "default" / "domains" / "legal" / "checkpoints" / "step-8"
    step.mkdir(parents=True)  # a run in the store, not finished
    (step / "meta.json").write_text("{}")
    env = sandbox(tmp_path, MEETARA_STORE=f"file://{work}/store")
    outside = [
        ("pull", dict(models_dir=str(elsewhere))),
        ("pull", dict(models_dir="../elsewhere/models")),
        ("pull", dict(models_dir="link/models")),
        ("pull", dict(models_dir="models/../../elsewhere")),
        ("pull", dict(store=f"file://{elsewhere}/store")),
        ("pull", dict(store=str(elsewhere / "store"))),
        ("pull", dict(store="file://link/store")),
        ("launch", dict(domains="legal", budget=5, backend="local", models_dir="../elsewhere")),
        ("launch", dict(domains="legal", budget=5, backend="local", store=f"file://{elsewhere}")),
        # the scheme in any case, and file:DIR, name the same directory to the store's opener
        ("launch", dict(domains="legal", budget=5, backend="local", store=f"FILE://{elsewhere}/up")),
        ("pull", dict(store=f"File://{elsewhere}/store")),
        ("pull", dict(store=f"file:{elsewhere}/store")),
        ("plan", dict(domains="legal", backend="local", store=f"fIlE://{elsewhere}/planned")),
        ("plan", dict(domains="legal", backend="local", store="../elsewhere/planned")),
    ]

    async def main() -> dict:
        seen: dict = {}
        async with server(tmp_path, env, "--workdir", "work") as s:
            seen["refused"] = [await refused(s, tool, **args) for tool, args in outside]
            seen["inside"] = await call(s, "pull", domains="legal", models_dir="models", store="file://store")
        seen["written outside"] = sorted(elsewhere.rglob("*"))
        async with server(tmp_path, env, "--workdir", "work", "--allow-outside-workdir") as s:
            seen["allowed"] = await call(s, "pull", domains="legal", models_dir=str(elsewhere / "models"))
        return seen

    seen = anyio.run(main)
    for (_, args), message in zip(outside, seen["refused"], strict=True):
        value = args.get("models_dir") or args["store"]
        arg = "models_dir" if "models_dir" in args else "store"
        assert message.startswith(f"{arg} {value!r}"), message
        assert f"outside the server's workdir {work.resolve()}" in message, message
        assert message.endswith("`meetara mcp --allow-outside-workdir`") and "\n" not in message, message
    assert seen["written outside"] == []
    assert not (tmp_path / "models").exists()  # relative paths are relative to --workdir
    assert seen["inside"]["domains"]["legal"]["status"] == "not-finished"
    assert seen["allowed"]["domains"]["legal"]["status"] == "not-finished"
