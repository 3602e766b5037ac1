"""`meetara notebook`: the generated Colab notebook, executed headless (nbclient, this venv's kernel),
trains a domain into a local store and validates it; no secret is ever in the notebook file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
import typer
from conftest import ROOT
from nbclient import NotebookClient
from typer.testing import CliRunner

from launcher.notebook import build_notebook, notebook_command, write_notebook

SENTINEL = "sentinel-Vq7xK2pL9mZ4"
FAST = ["--samples", "80", "--epochs", "2", "--no-merged"]  # the adapter GGUF only: ~30% faster
# a credential with a value in code or a mapping: NAME=value, environ["NAME"] = "value", "NAME": "value",
# setdefault("NAME", "value"), raw or JSON-escaped; not a tuple of names ("AWS_SECRET_ACCESS_KEY", "AWS_...")
ASSIGNED = re.compile(
    r"AWS_SECRET_ACCESS_KEY\\?['\"]?\]?\s*[=:,]\s*\\?['\"]?(?!AWS_|MEETARA_)[A-Za-z0-9/+_-]"
)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A kernelspec for this interpreter (absolute path), found first through JUPYTER_PATH: whatever
    `python3` kernelspecs the machine has, the notebook runs in this venv, where `train` is installed."""
    from ipykernel.kernelspec import write_kernel_spec

    jupyter_path = tmp_path_factory.mktemp("jupyter")
    spec = write_kernel_spec(jupyter_path / "kernels" / "meetara-test")
    assert json.loads((Path(spec) / "kernel.json").read_text())["argv"][0] == sys.executable
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(jupyter_path))
        yield "meetara-test"


def execute(nb: nbformat.NotebookNode, kernel: str, cwd: Path) -> nbformat.NotebookNode:
    client = NotebookClient(
        nb, kernel_name=kernel, timeout=600, startup_timeout=120, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


def text_of(cell) -> str:
    """A code cell's printed output (streams and results)."""
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", "") or "".join(out.get("data", {}).get("text/plain", "")))
    return "".join(parts)


def assert_no_secret(path: Path, *values: str) -> None:
    raw = path.read_text(encoding="utf-8")
    for value in (SENTINEL, *values):
        assert value not in raw
    assert not ASSIGNED.search(raw)
    nb = nbformat.read(path, as_version=4)
    everything = "\n".join(c.source + "\n" + text_of(c) for c in nb.cells)
    assert not ASSIGNED.search(everything)


def test_notebook_runs_headless_and_leaves_a_validated_gguf(tmp_path, kernel, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-sentinel-id-123")
    store = tmp_path / "store"
    nb = build_notebook(
        ["nutrition"],
        f"file://{store}",
        run_id="nb1",
        base_model="tiny",
        install=f"{ROOT}[train]",
        extra_args=FAST,
    )
    assert [c.id for c in nb.cells if c.cell_type == "code"] == [
        "parameters",
        "install",
        "secrets",
        "train",
        "validate",
    ]
    assert nb.cells[1].metadata["tags"] == ["parameters"]
    path = write_notebook(nb, tmp_path / "meetara-nb1.ipynb")
    assert_no_secret(path, "AKIA-sentinel-id-123")

    t0 = time.perf_counter()
    done = execute(nbformat.read(path, as_version=4), kernel, tmp_path)
    seconds = time.perf_counter() - t0
    executed = tmp_path / "executed.ipynb"
    nbformat.write(done, executed)
    assert_no_secret(executed, "AKIA-sentinel-id-123")

    assert not [o for c in done.cells for o in c.get("outputs", []) if o.output_type == "error"]
    cells = {c.id: c for c in done.cells}
    assert "installed already" in text_of(cells["install"])
    assert "credentials found: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in text_of(cells["secrets"])
    progress = text_of(cells["train"])
    assert "nutrition: step 10/" in progress and "nutrition: done loss" in progress, progress
    report = text_of(cells["validate"])
    assert re.search(r"^nutrition\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+\s+-\s+ok", report, re.M), report
    assert "1 domain(s) validated" in report

    # the validated GGUF is in the store, as the manifest says
    domain = store / "runs" / "nb1" / "domains" / "nutrition"
    m = json.loads((domain / "manifest.json").read_text())
    assert m["status"] == "done" and m["validation"]["passed"]
    adapter = (domain / "adapter.gguf").read_bytes()
    assert adapter[:4] == b"GGUF"
    assert hashlib.sha256(adapter).hexdigest() == m["files"]["adapter"]["sha256"]
    print(f"notebook executed in {seconds:.1f}s")

    # running it again (a new session) skips the finished domain and validates again
    again = execute(nbformat.read(path, as_version=4), kernel, tmp_path)
    cells = {c.id: c for c in again.cells}
    assert "nutrition: step" not in text_of(cells["train"])
    assert "1 domain(s) validated" in text_of(cells["validate"])


COLAB_FAKE = """
import sys, types
colab = types.ModuleType("google.colab")
colab.userdata = types.ModuleType("google.colab.userdata")
colab.drive = types.ModuleType("google.colab.drive")
class SecretNotFoundError(Exception):
    pass
SECRETS = {"AWS_ACCESS_KEY_ID": "colab-" + "id-value-1", "AWS_SECRET_ACCESS_KEY": "colab-" + "secret-value-2"}
def get(name):
    if name not in SECRETS:
        raise SecretNotFoundError(name)
    return SECRETS[name]
colab.userdata.get = get
MOUNTED = []
colab.drive.mount = MOUNTED.append
sys.modules.update({"google.colab": colab, "google.colab.userdata": colab.userdata,
                    "google.colab.drive": colab.drive})
"""

COLAB_CHECK = """
import os
assert os.environ["AWS_ACCESS_KEY_ID"] == "colab-" + "id-value-1"
assert os.environ["AWS_SECRET_ACCESS_KEY"] == "colab-" + "secret-value-2"
assert os.environ["MEETARA_S3_ENDPOINT_URL"] == "http://minio.example:9000"
assert MOUNTED == ["/content/drive"], MOUNTED
"""


def test_colab_secrets_are_read_set_and_never_shown(tmp_path, kernel, monkeypatch):
    """The secrets cell in Colab (a stand-in google.colab module): values from userdata go into the
    kernel's environment, missing ones fall back to the environment, nothing is printed; Drive is
    mounted for a Drive store."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)  # Colab's secret wins over the environment
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("MEETARA_S3_ENDPOINT_URL", raising=False)
    nb = build_notebook(
        "nutrition",
        "/content/drive/MyDrive/meetara",
        endpoint_url="http://minio.example:9000",
    )
    cells = {c.id: c for c in nb.cells}
    nb.cells = [
        nbformat.v4.new_code_cell(COLAB_FAKE, id="fake"),
        cells["parameters"],
        cells["secrets"],
        nbformat.v4.new_code_cell(COLAB_CHECK, id="check"),
    ]
    done = execute(nb, kernel, tmp_path)
    shown = "".join(text_of(c) for c in done.cells)
    assert "credentials found: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY |" in shown
    assert "not set: AWS_SESSION_TOKEN, MEETARA_S3_ENDPOINT_URL" in shown
    for value in ("id-value-1", "secret-value-2", SENTINEL):
        assert value not in shown


def cli(*args: str) -> object:
    app = typer.Typer(add_completion=False)
    app.command()(notebook_command)
    return CliRunner().invoke(app, list(args))


def test_cli_writes_the_notebook_and_refuses_bad_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    r = cli("--domains", "nutrition,legal", "--store", "s3://bucket/team", "--run-id", "colab1")
    assert r.exit_code == 0, r.output
    path = tmp_path / "meetara-colab1.ipynb"
    assert_no_secret(path)
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    params = nb.cells[1].source
    assert "DOMAINS = 'nutrition,legal'" in params and "STORE = 's3://bucket/team'" in params
    assert "RUN_ID = 'colab1'" in params

    r = cli(
        "--domains", "nutrition", "--store", "file://x", "-o", "nb.ipynb", "--train-args", "--samples 400"
    )
    assert r.exit_code == 0, r.output
    assert (
        "EXTRA_ARGS = ['--samples', '400']"
        in nbformat.read(tmp_path / "nb.ipynb", as_version=4).cells[1].source
    )

    for args, expected in (
        (["--domains", "nutrtion", "--store", "s3://b/p"], "unknown domain 'nutrtion'"),
        (["--domains", "nutrition", "--store", "gs://b/p"], "bad store URL"),
        (["--domains", "nutrition", "--store", "s3://b/p", "--run-id", "a b"], "invalid run id"),
        (["--domains", "nutrition", "--store", "s3://b/p", "--train-args", "--store s3://c"], "--store"),
        # a credential passed by mistake is never written into the file
        (
            ["--domains", "nutrition", "--store", "s3://b/p", "--train-args", SENTINEL, "-o", "bad.ipynb"],
            "contains the value of AWS_SECRET_ACCESS_KEY",
        ),
    ):
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert expected in r.output and SENTINEL not in r.output, r.output
    assert not (tmp_path / "bad.ipynb").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
