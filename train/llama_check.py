"""Evaluate a GGUF model (and optional LoRA adapter) with llama.cpp in a child process.

A malformed GGUF (e.g. a wrong-shaped LoRA tensor) segfaults llama.cpp instead of raising, so the
parent only ever talks to it through `python -m train.llama_check`, which prints one JSON object.

A child that dies because the job is being stopped (Ctrl-C reaches the whole process group; SIGTERM
from a spot VM's shutdown, systemd or `kill`) says nothing about the file: that is
`LlamaCheckInterrupted`, never a failed check (`LlamaCheckError`).

Test hook: with MEETARA_TEST_HOLD_LLAMA_CHECK=<file> the child writes its pid to <file> (atomically)
and waits 60 s before it loads anything, so a test can signal a job exactly while it validates.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_REPO_ROOT = Path(__file__).resolve().parents[1]


class LlamaCheckError(RuntimeError):
    """llama.cpp crashed, failed or timed out on a GGUF file."""


class LlamaCheckInterrupted(Exception):
    """The check was stopped from outside (the job was asked to stop, or the child was sent a stop
    signal): no verdict on the file. Deliberately not a `LlamaCheckError`."""


# Signals that ask a process to stop: a child that dies of one was interrupted, not failed by its file
# (a malformed GGUF kills it with SIGSEGV, SIGABRT, SIGBUS, SIGFPE or SIGILL).
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
HOLD_ENV = "MEETARA_TEST_HOLD_LLAMA_CHECK"
POLL_S = 0.1  # how often a check that can be stopped looks at its `stop`


_STAGE = "llama_check stage: "


def _stage(what: str) -> None:
    # Marks progress on stderr so a parent can tell where a crashed child died.
    print(_STAGE + what, file=sys.stderr, flush=True)


def evaluate(
    model: str,
    tokens: list[int],
    *,
    lora: str | None = None,
    generate: int = 0,
    text: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run llama.cpp in THIS process: per-position logits, greedy continuation, tokenization."""
    import llama_cpp

    if not tokens:
        raise ValueError("need at least one token")
    room = max(generate, 0)

    def load(n_ctx: int) -> Any:
        _stage(f"loading {model}" + (f" with LoRA {lora}" if lora else ""))
        return llama_cpp.Llama(
            model_path=model,
            lora_path=lora,
            logits_all=True,  # 0.3.x keeps only the last row in `scores` without it
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=threads,
            seed=0,
            verbose=False,
        )

    given = len(tokens)
    llm = load(given + room)
    n_vocab = llm.n_vocab()
    n_ctx_train = llama_cpp.llama_model_n_ctx_train(llm.model)
    # GPT-2 has learned positions: past n_ctx_train llama.cpp would index past position_embd. Keep the
    # first tokens that leave room for the generated ones, as the transformers side cuts its ids
    # (`train.model.fit_positions`); `n_tokens` says how many were evaluated.
    if given + room > n_ctx_train:
        if n_ctx_train - room < 1:
            raise ValueError(f"{generate} generated tokens leave no room in the model context {n_ctx_train}")
        tokens = tokens[: n_ctx_train - room]
        llm.close()
        llm = load(len(tokens) + room)  # a context no larger than the tokens need, as for any other input
    if bad := [t for t in tokens if not 0 <= t < n_vocab]:
        raise ValueError(f"token ids out of range [0, {n_vocab}): {bad[:5]}")

    _stage(f"evaluating {len(tokens)} tokens")
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    # Plain argmax over llama.cpp's own logits: exactly comparable with transformers' greedy decode.
    generated: list[int] = []
    nxt = int(np.argmax(logits[-1]))
    for i in range(generate):
        generated.append(nxt)
        if i + 1 < generate:
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    out: dict[str, Any] = {
        "n_vocab": n_vocab,
        "n_ctx_train": n_ctx_train,
        "n_tokens": len(tokens),
        "truncated_from": given if given > len(tokens) else None,
        "logits": logits.tolist(),
        "generated": generated,
        "text": llm.detokenize(generated).decode("utf-8", errors="replace"),
    }
    if text is not None:
        out["tokenize_check"] = tokenize_turns(llm, text)
    return out


def tokenize_turns(llm: Any, text: str) -> list[int]:
    """llama.cpp's token ids for `text` by the rule of `train.model.text_ids`: the text of the model's
    eos token (`<|endoftext|>` for GPT-2) separates turns and becomes its eos id; the rest is plain text
    (special=False: no special-token text inside it is parsed)."""
    eos = llm.token_eos()
    sep = llm.detokenize([eos], special=True).decode("utf-8", errors="replace") if eos >= 0 else ""
    ids: list[int] = []
    for i, piece in enumerate(text.split(sep) if sep else [text]):
        if i:
            ids.append(eos)
        if piece:
            ids += llm.tokenize(piece.encode("utf-8"), add_bos=False, special=False)
    return ids


def main(argv: list[str] | None = None) -> None:
    """CLI: print one JSON object with the evaluation on stdout; logs and errors go to stderr."""
    p = argparse.ArgumentParser(prog="python -m train.llama_check", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--lora")
    p.add_argument("--tokens", required=True, help="comma-separated token ids")
    p.add_argument("--generate", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--text", help="also report llama.cpp's tokenization of this text")
    args = p.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    if hold := os.environ.get(HOLD_ENV):  # test hook (module docstring): "validating now"; wait
        Path(f"{hold}.tmp").write_text(str(os.getpid()))
        os.replace(f"{hold}.tmp", hold)
        time.sleep(60)

    # Anything native code or Python prints while llama.cpp runs must not corrupt the JSON on stdout:
    # point fd 1 (and sys.stdout) at stderr and keep a private copy of the real stdout.
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    result = evaluate(
        args.model, tokens, lora=args.lora, generate=args.generate, text=args.text, threads=args.threads
    )
    with os.fdopen(real_stdout, "w") as out:
        json.dump(result, out)
        out.write("\n")


def _describe_failure(stderr: str) -> str:
    """'while <last stage>: <last stderr line>' for a one-line error message."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    stages = [ln.removeprefix(_STAGE) for ln in lines if ln.startswith(_STAGE)]
    where = f" while {stages[-1]}" if stages else ""
    if not lines or lines[-1].startswith(_STAGE):  # died silently: the stage says it all
        return where or ": (no stderr)"
    return f"{where}: {lines[-1]}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def run_llama_check(
    model: Path,
    token_ids: list[int],
    *,
    lora: Path | None = None,
    generate: int = 8,
    text: str | None = None,
    timeout: float = 120,
    threads: int | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Evaluate `model` (+ `lora`) with llama.cpp in a subprocess; `logits` comes back as a numpy array.

    Raises LlamaCheckError if the child crashes (e.g. SIGSEGV on a bad adapter), exits non-zero, times
    out or prints something that is not the expected JSON. Raises LlamaCheckInterrupted, not
    LlamaCheckError, when `stop()` turns true while the child runs (the child is killed at once) or
    the child fails once it is, or when the child dies of a stop signal (`STOP_SIGNALS`). The child
    never outlives this call.
    """
    cmd = [
        sys.executable, "-m", "train.llama_check",
        "--model", str(model),
        "--tokens", ",".join(str(int(t)) for t in token_ids),
        "--generate", str(generate),
    ]  # fmt: skip
    if lora is not None:
        cmd += ["--lora", str(lora)]
    if text is not None:
        cmd += ["--text", text]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    # The child must import this package whatever the caller's working directory is.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
    target = f"{model}" + (f" with LoRA {lora}" if lora is not None else "")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = max(deadline - time.monotonic(), 0)
            try:
                stdout, stderr = proc.communicate(timeout=min(left, POLL_S) if stop is not None else left)
                break
            except subprocess.TimeoutExpired:  # retrying communicate() loses no output
                if stop is not None and stop():
                    raise LlamaCheckInterrupted(f"llama.cpp check of {target} stopped") from None
                if time.monotonic() >= deadline:
                    raise LlamaCheckError(
                        f"llama.cpp check of {target} timed out after {timeout:g}s"
                    ) from None
    finally:
        if proc.poll() is None:  # timed out, stopped, or this process was interrupted: no orphan
            proc.kill()
            proc.communicate()
    rc = proc.returncode
    if rc != 0:
        how = f"killed by {_signal_name(-rc)}" if rc < 0 else f"exit code {rc}"
        if (stop is not None and stop()) or -rc in STOP_SIGNALS:
            raise LlamaCheckInterrupted(f"llama.cpp check of {target} interrupted ({how})")
        raise LlamaCheckError(f"llama.cpp check of {target} failed ({how}){_describe_failure(stderr)}")
    try:
        result = json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise LlamaCheckError(f"llama.cpp check of {target} printed no JSON: {stdout[:200]!r}") from exc
    result["logits"] = np.asarray(result["logits"], dtype=np.float32)
    return result


if __name__ == "__main__":
    main()
