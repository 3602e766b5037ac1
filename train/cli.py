"""`python -m train`: train domains in order and print a final JSON summary.

Exit codes: 0 done, 1 a domain failed validation, 2 bad input (unknown domain, malformed JSONL, bad
store URL, unreachable store, a checkpoint trained with other parameters: `--restart-if-changed`),
75 interrupted by SIGTERM/SIGINT (rerun resumes: during training after a checkpoint; during export or
validation before anything of the domain is recorded, failed.json included), 77 stopped at
MEETARA_STOP_AT (the job's budget reservation runs out then; rerun resumes).

The in-job budget guard: the launcher gives each cloud job the time its reservation pays for
(`MEETARA_STOP_AT`, Unix seconds). Training checkpoints and stops by itself when that time comes, so a
cap holds even when the launcher's machine sleeps or crashes and nobody cancels the job.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console

from train import BadInput
from train.bounds import MAX_EPOCHS, MAX_SAMPLES, MIN_EPOCHS, MIN_SAMPLES

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_BUDGET = 1, 2, 75, 77
err = Console(stderr=True)


def fail(message: object, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    """Print `error: <message>` on stderr, verbatim (rich would eat brackets such as `meetara[cloud]` or
    a user's `[bold]`), and return the exit to raise."""
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(str(message))}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def train_command(
    domain_args: list[str] = typer.Option(
        ...,
        "--domains",
        "-d",
        metavar="<str>",
        help="'all', a category, or comma-separated domain names (repeatable: -d a -d b is -d a,b)",
    ),
    store: str = typer.Option(
        "file://./store", envvar="MEETARA_STORE", help="file://DIR or s3://BUCKET/PREFIX"
    ),
    run_id: str = typer.Option(
        "default", "--run-id", envvar="MEETARA_RUN_ID", help="names the run in the store"
    ),
    base_model: str = typer.Option(
        "tiny",
        help="'tiny' (offline), a GPT-2 model name such as microsoft/DialoGPT-medium, or random:NAME "
        "(offline: that architecture with seeded random weights and GPT-2's real tokenizer, for "
        "benchmarks, dry runs and tests at the real shape; its outputs are noise)",
    ),
    endpoint_url: str = typer.Option(
        None,
        "--endpoint-url",
        envvar="MEETARA_S3_ENDPOINT_URL",
        help="S3-compatible endpoint (AWS_ENDPOINT_URL also works)",
    ),
    data_dir: Path = typer.Option(None, help="folder of <domain>.jsonl files that replace generated data"),
    samples: int = typer.Option(
        200, min=MIN_SAMPLES, max=MAX_SAMPLES, help="generated conversations per domain"
    ),
    epochs: float = typer.Option(2.0, min=MIN_EPOCHS, max=MAX_EPOCHS),
    lr: float = typer.Option(2e-3),
    r: int = typer.Option(8, "--lora-r"),
    alpha: float = typer.Option(16.0, "--lora-alpha"),
    batch_size: int = typer.Option(8, help="0: the largest that fits (GPU)"),
    checkpoint_every: int = typer.Option(
        None,
        min=1,
        envvar="MEETARA_CHECKPOINT_EVERY",
        help="steps between checkpoints [default: auto, the fewest steps for which a checkpoint "
        "costs at most 2 % of training (measured as it runs)]",
        show_default=False,
    ),
    keep_checkpoints: int = typer.Option(2),
    seed: int = typer.Option(0),
    merged: bool = typer.Option(
        False,
        "--merged/--no-merged",
        envvar="MEETARA_MERGED",
        help="also ship each domain's merged model quantized to Q4_K_M (~0.68 bytes per base parameter "
        "each) [default: the adapter only, applied to the run's one Q4_K_M base]",
        show_default=False,
    ),
    base_f16: bool = typer.Option(
        False,
        "--base-f16",
        envvar="MEETARA_BASE_F16",
        help="also ship the base model as f16 GGUF (the Q4_K_M base always ships)",
    ),
    adapter_f32: bool = typer.Option(
        False,
        "--adapter-f32",
        envvar="MEETARA_ADAPTER_F32",
        help="write adapters in f32 [default: f16, half the bytes]",
        show_default=False,
    ),
    warm_start: bool = typer.Option(
        None,
        "--warm-start/--no-warm-start",
        envvar="MEETARA_WARM_START",
        help="start each domain's LoRA from the most similar domain already done in the run "
        "[default: off; bench/RESULTS.md has the measurement]",
        show_default=False,
    ),
    overlap: bool = typer.Option(
        None,
        "--overlap/--no-overlap",
        envvar="MEETARA_OVERLAP",
        help="check, upload and record each domain while the next one trains [default: on when training "
        "on a GPU, off on a CPU, where both share the cores; never with --warm-start]",
        show_default=False,
    ),
    restart_if_changed: bool = typer.Option(
        False,
        "--restart-if-changed",
        help="a domain whose checkpoint was trained with other parameters (--lora-r, --lr, --epochs, "
        "data, ...) starts over from step 0 and its checkpoints are deleted [default: such a run is "
        "refused; checkpoints with the same parameters are always resumed]",
        show_default=False,
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Train one LoRA adapter per domain and export validated GGUF files to the store."""
    domains = ",".join(domain_args)  # -d a -d b adds up
    from train.lora import Interrupted, LoraParams, StopFlag
    from train.pipeline import JobSpec
    from train.store import StoreError

    try:
        spec = JobSpec(
            domains=[d for d in domains.split(",") if d.strip()] or [""],
            store=store,
            run_id=run_id,
            base_model=base_model,
            samples=samples,
            data_dir=data_dir,
            endpoint_url=endpoint_url,
            merged=merged,
            base_f16=base_f16,
            adapter_dtype="f32" if adapter_f32 else "f16",
            restart_if_changed=restart_if_changed,
            overlap=overlap,
            **({} if warm_start is None else {"warm_start": warm_start}),  # None: JobSpec's default
            params=LoraParams(
                lr=lr,
                epochs=epochs,
                r=r,
                alpha=alpha,
                batch_size=batch_size or None,
                checkpoint_every=checkpoint_every,
                keep_checkpoints=keep_checkpoints,
                seed=seed,
            ),
        )
    except ValidationError as e:
        raise fail(str(BadInput.from_validation(e))) from None
    stop = StopFlag()
    stop.install()
    try:
        guard_deadline(stop)
        summary = run_with_progress(spec, stop, quiet)
    except (BadInput, StoreError) as e:
        raise fail(str(e)) from None
    except Interrupted as e:
        if stop.signum == signal.SIGALRM:
            raise fail(f"stopped: budget (the job's reservation ends now): {e}", EXIT_BUDGET) from None
        raise fail(f"interrupted: {e}", EXIT_INTERRUPTED) from None
    typer.echo(json.dumps(summary_view(summary), indent=1))
    failed = [n for n, d in summary["domains"].items() if d.get("status") == "failed"]
    if failed:
        raise fail(f"validation failed for {', '.join(failed)} (see failed.json in the store)", EXIT_FAILED)


def guard_deadline(stop) -> None:
    """Arm SIGALRM for MEETARA_STOP_AT (Unix seconds): at that time the job checkpoints and stops; at
    MEETARA_STOP_HARD_AT (the reservation's very end), if it is still going, it exits at once."""
    raw = os.environ.get("MEETARA_STOP_AT")
    if not raw:
        return
    hard_raw = os.environ.get("MEETARA_STOP_HARD_AT")
    try:
        left = float(raw) - time.time()
        hard = float(hard_raw) if hard_raw else None
    except ValueError:
        what = f"MEETARA_STOP_AT={raw!r} / MEETARA_STOP_HARD_AT={hard_raw!r}"
        raise BadInput(f"{what}: not Unix times") from None
    if left <= 0:
        raise fail("stopped: budget (MEETARA_STOP_AT has passed before training started)", EXIT_BUDGET)

    def now_out() -> None:
        err.print("stopped: budget (the job's reservation ends now); rerun to resume", highlight=False)
        os._exit(EXIT_BUDGET)

    def deadline(signum: int, frame: object) -> None:
        if getattr(stop, "training", False) and stop.signum is None:
            stop._handle(signum, frame)  # mid-training: checkpoint at the next step, then exit 77
            if hard is not None:  # ... unless that takes past the reservation's end
                signal.setitimer(signal.ITIMER_REAL, max(hard - time.time(), 0.001))
            return
        # loading, exporting, uploading (or the checkpoint ran into the hard stop): store writes are
        # atomic (a domain cut off here has no manifest and is redone), so stop at once rather than
        # spend on
        now_out()

    signal.signal(signal.SIGALRM, deadline)
    signal.setitimer(signal.ITIMER_REAL, left)


def summary_view(summary: dict) -> dict:
    """The final JSON: per domain its status, files, losses and timings (manifests hold the rest)."""
    out = {k: v for k, v in summary.items() if k != "domains"}
    out["domains"] = {}
    for name, m in summary["domains"].items():
        if m.get("status") == "skipped":
            out["domains"][name] = m
            continue
        out["domains"][name] = {
            "status": m["status"],
            "files": {
                k: {"key": f["key"], "size": f["size"], "sha256": f["sha256"]} for k, f in m["files"].items()
            },
            "heldout_loss": [m["metrics"]["heldout_loss_before"], m["metrics"]["heldout_loss_after"]],
            "acceptance_rate": m["data"]["quality"]["acceptance_rate"],
            "resumed_from_step": m["metrics"]["resumed_from_step"],
            "seconds": round(sum(m["timings"].values()), 2),
        }
    done = [d for d in out["domains"].values() if d["status"] == "done"]
    out["counts"] = {
        s: sum(d["status"] == s for d in out["domains"].values()) for s in ("done", "failed", "skipped")
    }
    if done:
        out["mean_acceptance_rate"] = round(sum(d["acceptance_rate"] for d in done) / len(done), 4)
    return out


def run_with_progress(spec, stop, quiet: bool) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from train.pipeline import Events, run_job

    if quiet or not err.is_terminal and os.environ.get("MEETARA_PROGRESS") != "1":
        # not a terminal (a log file on the GPU box): one line per domain instead of redrawn bars
        def end(name: str, m: dict) -> None:
            met = m["metrics"]
            err.print(
                f"{name}: {m['status']} loss {met['heldout_loss_before']:.3f} -> "
                f"{met['heldout_loss_after']:.3f} in {sum(m['timings'].values()):.1f}s",
                highlight=False,
            )

        every = int(os.environ.get("MEETARA_LOG_EVERY", "25"))
        current: dict = {"name": "", "t": 0.0, "step": 0}

        def start(name: str, i: int, n: int) -> None:
            current.update(name=name, t=time.perf_counter(), step=None)
            err.print(f"{name}: domain {i + 1}/{n}", highlight=False)

        def step(done: int, total: int, loss: float) -> None:
            # the launcher reads these lines to count the work a preemption cost (launcher/conductor.py)
            if every and (done % every == 0 or done == total):
                now, last = time.perf_counter(), current["step"]
                rate = f" ({(now - current['t']) / (done - last):.3f} s/step)" if last is not None else ""
                err.print(f"{current['name']}: step {done}/{total} loss {loss:.4f}{rate}", highlight=False)
                current.update(t=now, step=done)

        return run_job(spec, events=Events(start, step, end), stop=stop)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        overall = progress.add_task("domains", total=None, info="")
        steps = progress.add_task("", total=None, info="")

        def start(name: str, i: int, n: int) -> None:
            progress.update(overall, total=n, completed=i)
            progress.update(steps, description=name, completed=0, total=None, info="")

        def step(done: int, total: int, loss: float) -> None:
            progress.update(steps, completed=done, total=total, info=f"loss {loss:.3f}")

        def end(name: str, m: dict) -> None:
            progress.advance(overall)
            progress.update(
                steps, info=f"{m['status']}, held-out loss {m['metrics']['heldout_loss_after']:.3f}"
            )

        return run_job(spec, events=Events(start, step, end), stop=stop)


def log_level() -> int:
    """MEETARA_LOG as a logging level (default WARNING): a level's name in any case (WARN and FATAL
    too) or a number from 0 to 50; anything else is BadInput naming the variable."""
    raw = os.environ.get("MEETARA_LOG", "").strip().upper() or "WARNING"
    level = int(raw) if raw.isdigit() else logging.getLevelNamesMapping().get(raw)
    if level is None or not 0 <= level <= logging.CRITICAL:
        raise BadInput(f"MEETARA_LOG={raw!r}: use DEBUG, INFO, WARNING, ERROR, CRITICAL or a number 0-50")
    return level


def setup_logging() -> None:
    """Log to stderr at MEETARA_LOG (default WARNING) through handlers that redact credentials
    (`train.redact`): botocore, boto3 and urllib3 log through the root logger, so DEBUG holds no secret."""
    from train.redact import install

    try:
        level = log_level()
    except BadInput as e:
        err.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(EXIT_BAD_INPUT)
    logging.basicConfig(level=level, stream=sys.stderr)
    logging.getLogger().setLevel(level)
    install()


def tidy_help(command: Any, help_names: list[str]) -> None:
    """Boolean flags take no value: show them (and --help) without the `<bool>` type typer otherwise
    shows in help, on `command` and every subcommand."""
    ctx = typer.Context(command, help_option_names=help_names)
    helper = command.get_help_option(ctx)  # made once per command and cached: the one help shows
    for param in [*getattr(command, "params", []), *([helper] if helper is not None else [])]:
        if getattr(param, "is_flag", False) and getattr(param, "metavar", None) is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        tidy_help(sub, help_names)


def refuse_non_finite(command: Any) -> None:
    """Every float option of `command` and its subcommands refuses inf and nan in one line naming the
    option (pydantic, which parses typer's options, takes "inf" and "nan" for numbers)."""

    def process_value(ctx: Any, value: Any, *, param: Any, parse: Callable[..., Any]) -> Any:
        for v in value if isinstance(value, list | tuple) else [value]:
            with contextlib.suppress(TypeError, ValueError):  # not a number: the parser says so
                if not math.isfinite(float(v)):  # before the range check, which would call nan too big
                    raise typer.BadParameter(f"{v} is not a finite number", ctx=ctx, param=param)
        return parse(ctx, value)

    for param in getattr(command, "params", []):
        desc = getattr(param, "type_descriptor", None)
        if desc is not None and desc.annotation is float:
            param.process_value = functools.partial(process_value, param=param, parse=param.process_value)
    for sub in getattr(command, "commands", {}).values():
        refuse_non_finite(sub)


def run_app(app: typer.Typer, prog_name: str, argv: list[str] | None = None) -> None:
    """Run a typer app: usage errors are one line on stderr with exit code 2 (click draws a box), printed
    verbatim; a group named alone prints its help (exit 0); a bug is one line too (exit 1)."""
    from rich.markup import escape

    setup_logging()
    command = typer.main.get_command(app)
    tidy_help(command, (app.info.context_settings or {}).get("help_option_names") or ["--help"])
    refuse_non_finite(command)
    try:
        rc = command.main(argv, prog_name=prog_name, standalone_mode=False)
    except typer.Exit as e:
        rc = e.exit_code
    except typer.Abort:
        err.print("aborted")
        rc = 130
    except typer.TyperException as e:  # click's usage errors (typer vendors click)
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        if type(e).__name__ == "NoArgsIsHelpError":  # `meetara` or `meetara sky` alone: its help
            if message.strip():  # rich help is printed while the error is made; plain help is its text
                typer.echo(message)
            rc = 0
        else:
            fail(f"{message} (see {prog_name} --help)")
            rc = EXIT_BAD_INPUT
    except Exception as e:  # a bug, not bad input: say so in one line; MEETARA_LOG=DEBUG shows where
        from train.redact import redact

        logging.getLogger("meetara").debug("internal error", exc_info=True)
        err.print(
            f"[bold red]internal error:[/] {type(e).__name__}: {escape(redact(str(e)))} "
            "(MEETARA_LOG=DEBUG for the traceback)",
            soft_wrap=True,
            highlight=False,
        )
        rc = EXIT_FAILED
    sys.exit(rc if isinstance(rc, int) else 0)


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(train_command)
    run_app(app, "python -m train")
