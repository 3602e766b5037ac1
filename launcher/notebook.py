"""`meetara notebook`: a Colab notebook that trains domains with `python -m train` and checks the results.

The notebook installs meetara's `train` extra, takes the store's credentials from Colab's Secrets panel
(or the kernel's environment), runs `python -m train` with its progress lines shown live, then reads
each domain's manifest from the store and re-checks it. Checkpoints and manifests live in the store,
so a session that dies (Colab's time limit, a lost connection) resumes in the next one: run the same
notebook again with the same STORE and RUN_ID.

No secret is ever written into the notebook: credentials are read when it runs, set in the kernel's
environment only, never printed, and `write_notebook` refuses a notebook that contains the value of
one of the credential variables set here.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import typer

from train import BadInput

if TYPE_CHECKING:  # nbformat is imported when a notebook is built
    import nbformat

DEFAULT_INSTALL = "meetara[train] @ git+https://github.com/meetara/meetara"
DEFAULT_BASE_MODEL = "tiny"
DEFAULT_LOG_EVERY = 10
# credentials: read from Colab's secrets or the environment when the notebook runs, never written into it
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
ENDPOINT_NAME = "MEETARA_S3_ENDPOINT_URL"
# options the notebook sets from its parameters cell; extra args must not repeat them
_OWN_OPTIONS = ("--domains", "-d", "--store", "--run-id", "--base-model", "--endpoint-url")

_ABOUT = """\
# meetara: train LoRA adapters for {what}

This notebook runs meetara's `python -m train` for **{domains}**: per domain it generates and filters
the data, trains a LoRA adapter, exports it as `adapter.gguf` (and the merged model as
`model-Q4_K_M.gguf` with `--merged`), validates it with llama.cpp on the run's Q4_K_M base and writes a
`manifest.json`, all into the store `{store}` under `runs/<RUN_ID>/domains/<domain>/` (the base, once
per run, under `runs/<RUN_ID>/base/`).

**Run all** (a GPU runtime is faster; the CPU works for the `tiny` model). Checkpoints go to the store
every few steps, so if this session dies, open the notebook again and run it again with the same
`STORE` and `RUN_ID`: finished domains are skipped and the one in progress resumes from its newest
checkpoint. The store must outlive the session for that: an `s3://` bucket, or a folder on Google
Drive (`/content/drive/MyDrive/...`, mounted below).

Credentials for an `s3://` store come from Colab's **Secrets** panel (the key icon on the left):
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`, `{endpoint}` where needed),
with notebook access switched on. Outside Colab they come from the kernel's environment. They are
never written into this notebook and never printed.
"""

_INSTALL = """\
# Install meetara's train extra (Colab has torch already). Skipped when it is installed: a rerun, or a
# kernel that has it. llama-cpp-python compiles llama.cpp here: allow a few minutes.
import importlib
import importlib.util
import os
import subprocess
import sys

if all(importlib.util.find_spec(m) for m in ("train", "peft", "gguf", "llama_cpp")):
    print("meetara's train package is installed already")
else:
    print(f"installing {INSTALL} ...")
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF")}
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", INSTALL], env=env,
                         capture_output=True, text=True)
    if pip.returncode:
        print(pip.stdout[-3000:], pip.stderr[-3000:])
        raise RuntimeError(f"pip install failed (exit code {pip.returncode})")
    importlib.invalidate_caches()
    print("installed")
"""

_SECRETS = """\
# Credentials: from Colab's Secrets panel in Colab, else from this kernel's environment. They are set in
# this kernel's environment only (python -m train inherits it) and never printed.
import os
import sys

IN_COLAB = "google.colab" in sys.modules


def secret(name):
    if IN_COLAB:
        from google.colab import userdata
        try:
            return userdata.get(name)
        except Exception:  # not in the Secrets panel, or this notebook has no access to it
            pass
    return os.environ.get(name)


found, missing = [], []
for name in {names!r}:
    value = secret(name)
    if value:
        os.environ[name] = value
    (found if value else missing).append(name)
print("credentials found:", ", ".join(found) or "none", "| not set:", ", ".join(missing) or "none")
if ENDPOINT_URL:
    os.environ["{endpoint}"] = ENDPOINT_URL
if STORE.startswith("s3://") and "AWS_SECRET_ACCESS_KEY" in missing:
    print("warning: an s3:// store needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the Secrets panel")
if IN_COLAB and STORE.removeprefix("file://").startswith("/content/drive"):
    from google.colab import drive
    drive.mount("/content/drive")
"""

_TRAIN = """\
# Train. Interrupting this cell stops training after a checkpoint; running it again resumes from there.
import os
import signal
import subprocess
import sys

# --quiet: a line per domain and every LOG_EVERY steps (the kernel's FORCE_COLOR would draw progress bars)
cmd = [sys.executable, "-m", "train", "--domains", DOMAINS, "--store", STORE, "--run-id", RUN_ID,
       "--base-model", BASE_MODEL, "--quiet", *EXTRA_ARGS]
env = {**os.environ, "MEETARA_LOG_EVERY": str(LOG_EVERY), "PYTHONUNBUFFERED": "1"}
print("python -m train", *cmd[3:], flush=True)
proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
try:
    for line in proc.stderr:  # the JSON summary (stdout) is not needed: the next cell reads the manifests
        print(line, end="", flush=True)
except KeyboardInterrupt:
    proc.send_signal(signal.SIGINT)  # python -m train writes a checkpoint, then exits with 75
    print(proc.stderr.read(), end="")
rc = proc.wait()
if rc == 75:
    raise RuntimeError("interrupted after a checkpoint: run this cell again to resume")
if rc:
    raise RuntimeError(f"python -m train exited with {rc} (see above); running this cell again resumes")
"""

_VALIDATE = """\
# Check the results in the store: every domain done and validated, adapter.gguf matching its manifest.
import hashlib
import json
import os

from train.domains import load_registry, select_domains
from train.pipeline import MANIFEST, domain_prefix
from train.store import open_store

store = open_store(STORE, endpoint_url=os.environ.get("{endpoint}") or None)
rows = []
for d in select_domains(DOMAINS, load_registry()):
    prefix = domain_prefix(RUN_ID, d.name)
    if not store.exists(f"{{prefix}}/{{MANIFEST}}"):
        why = "failed validation (see failed.json)" if store.exists(f"{{prefix}}/failed.json") else "not done"
        raise AssertionError(f"{{d.name}}: {{why}} in {{store.url}}/{{prefix}}")
    m = json.loads(store.get(f"{{prefix}}/{{MANIFEST}}"))
    assert m["status"] == "done" and m["validation"]["passed"], f"{{d.name}}: not validated"
    entry = m["files"]["adapter"]
    data = store.get(entry["key"])
    assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"]), (
        f"{{d.name}}: {{entry['key']}} does not match its manifest"
    )
    sizes = {{k: f"{{f['size'] / 1e6:.2f}}" for k, f in m["files"].items()}}
    loss = m["metrics"]
    rows.append((d.name, f"{{loss['heldout_loss_before']:.3f}}", f"{{loss['heldout_loss_after']:.3f}}",
                 sizes.get("adapter", "-"), sizes.get("merged_q4_k_m", "-"), "ok"))

head = ("domain", "held-out before", "after", "adapter MB", "Q4_K_M MB", "adapter sha256")
widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
for r in [head, *rows]:
    print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
print(f"{{len(rows)}} domain(s) validated in {{store.url}}/runs/{{RUN_ID}}/domains/")
"""


def build_notebook(
    domains: list[str] | str,
    store: str,
    *,
    run_id: str = "default",
    base_model: str = DEFAULT_BASE_MODEL,
    endpoint_url: str | None = None,
    install: str = DEFAULT_INSTALL,
    extra_args: list[str] | tuple[str, ...] = (),
    log_every: int = DEFAULT_LOG_EVERY,
) -> nbformat.NotebookNode:
    """The notebook for these domains and store (see the module docstring). Raises `BadInput` for
    unknown domains, a bad store URL or run id, or extra args that repeat the notebook's own options."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    from train.domains import load_registry, select_domains
    from train.names import check_run_id

    spec = ",".join(d.strip() for d in ([domains] if isinstance(domains, str) else domains) if d.strip())
    chosen = select_domains(spec, load_registry())
    check_store(store)
    check_run_id(run_id)
    extra = [str(a) for a in extra_args]
    repeated = [a for a in extra if a.split("=", 1)[0] in _OWN_OPTIONS]
    if repeated:
        raise BadInput(f"{repeated[0]} is a parameter of the notebook, not an extra argument")
    if log_every < 1:
        raise BadInput("log_every must be at least 1")

    what = chosen[0].name if len(chosen) == 1 else f"{len(chosen)} domains"
    params = "\n".join(
        [
            "# Parameters: edit, then Run all. The same STORE and RUN_ID resume where a session stopped.",
            f"DOMAINS = {spec!r}  # 'all', a category, or names separated by commas",
            f"STORE = {store!r}  # s3://BUCKET/PREFIX or a folder on Google Drive",
            f"RUN_ID = {run_id!r}",
            f"BASE_MODEL = {base_model!r}  # 'tiny' or a GPT-2 model such as microsoft/DialoGPT-medium",
            f"ENDPOINT_URL = {endpoint_url or ''!r}  # S3-compatible endpoint; '' = AWS or {ENDPOINT_NAME}",
            f"EXTRA_ARGS = {extra!r}  # more options for python -m train, e.g. ['--samples', '400']",
            f"LOG_EVERY = {log_every!r}  # a progress line every this many training steps",
            "# pip requirement for meetara's train extra (skipped when it is installed)",
            f"INSTALL = {install!r}",
        ]
    )
    cells = [
        new_markdown_cell(
            _ABOUT.format(what=what, domains=spec, store=store, endpoint=ENDPOINT_NAME), id="about"
        ),
        new_code_cell(params, id="parameters", metadata={"tags": ["parameters"]}),
        new_code_cell(_INSTALL.rstrip(), id="install"),
        new_code_cell(
            _SECRETS.format(names=SECRET_NAMES + (ENDPOINT_NAME,), endpoint=ENDPOINT_NAME).rstrip(),
            id="secrets",
        ),
        new_markdown_cell(
            "## Train\nRunning this again skips finished domains and resumes the one in "
            "progress from its newest checkpoint in the store.",
            id="train-about",
        ),
        new_code_cell(_TRAIN.rstrip(), id="train"),
        new_markdown_cell(
            "## Validate\nEach domain's manifest says done and validated; the adapter GGUF "
            "is read back and its sha256 checked against the manifest. `meetara pull "
            "--store STORE --run-id RUN_ID` brings the files to your machine.",
            id="validate-about",
        ),
        new_code_cell(_VALIDATE.format(endpoint=ENDPOINT_NAME).rstrip(), id="validate"),
    ]
    nb = new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
            "accelerator": "GPU",
            "colab": {"provenance": []},
        },
    )
    nbformat.validate(nb)
    return nb


def check_store(store: str) -> None:
    """A store URL the notebook can use: file://DIR, a plain folder, or s3://BUCKET/PREFIX."""
    parsed = urlparse(store)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise BadInput(f"bad store URL {store!r}: expected s3://bucket/prefix")
    elif parsed.scheme not in ("", "file") or not (parsed.netloc + parsed.path):
        raise BadInput(f"bad store URL {store!r}: use s3://BUCKET/PREFIX or a folder (file://DIR)")


def secret_values() -> dict[str, str]:
    """The credential variables set in this environment, by name (values long enough to search for)."""
    return {n: v for n in SECRET_NAMES if len(v := os.environ.get(n, "")) >= 8}


def write_notebook(nb: nbformat.NotebookNode, path: Path) -> Path:
    """Write `nb` to `path` atomically (a temp file beside it, then rename); returns the path.
    Refuses (ValueError, naming the variable, not the value) a notebook that contains a credential's
    value from this environment, in its cells or outputs."""
    import nbformat

    text = nbformat.writes(nb)
    for name, value in secret_values().items():
        if value in text:
            raise ValueError(f"the notebook contains the value of {name}: not written")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def notebook_command(
    domain_args: list[str] = typer.Option(
        ...,
        "--domains",
        "-d",
        metavar="<str>",
        help="'all', a category, or comma-separated domain names (repeatable: -d a -d b is -d a,b)",
    ),
    store: str = typer.Option(
        ...,
        help="s3://BUCKET/PREFIX, or a Google Drive folder (/content/drive/MyDrive/...), so a new "
        "session resumes",
    ),
    run_id: str = typer.Option("default", "--run-id", help="names the run in the store"),
    base_model: str = typer.Option(
        DEFAULT_BASE_MODEL, help="'tiny' or a GPT-2 model name such as microsoft/DialoGPT-medium"
    ),
    endpoint_url: str = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (default: AWS)"),
    out: Path = typer.Option(None, "--out", "-o", help="default: meetara-<run-id>.ipynb"),
    install: str = typer.Option(DEFAULT_INSTALL, help="pip requirement the notebook installs"),
    train_args: str = typer.Option(
        "", "--train-args", help="more options for python -m train, e.g. '--samples 400 --epochs 3'"
    ),
    force: bool = typer.Option(False, "--force", "-f", help="overwrite the notebook file if it exists"),
) -> None:
    """Write a Colab notebook that trains these domains into the store and validates the GGUF files."""
    domains = ",".join(domain_args)  # -d a -d b adds up
    from launcher.console import fail

    try:
        extra = shlex.split(train_args)
    except ValueError as e:
        raise fail(f"--train-args: {e}") from None
    try:
        nb = build_notebook(
            domains.split(","),
            store,
            run_id=run_id,
            base_model=base_model,
            endpoint_url=endpoint_url,
            install=install,
            extra_args=extra,
        )
        target = out or Path(f"meetara-{run_id}.ipynb")
        if target.exists() and not force:
            raise BadInput(f"{target} exists: pass --force to overwrite it, or --out/-o another file")
        path = write_notebook(nb, target)
    except (BadInput, ValueError, OSError) as e:
        raise fail(str(e)) from None
    typer.echo(str(path))
    local = not store.startswith("s3://") and not store.removeprefix("file://").startswith("/content/drive")
    note = (
        "; note: a folder outside /content/drive is lost with the Colab session (no resume in the next)"
        if local
        else ""
    )
    print(
        f"wrote {path}: open it in Colab (File > Upload notebook); credentials go in Colab's Secrets "
        f"panel{note}",
        file=sys.stderr,
    )
