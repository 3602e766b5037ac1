"""Evaluate a GGUF model (and optional LoRA adapter) with llama.cpp in a child process.

A malformed GGUF (e.g. a wrong-shaped LoRA tensor) segfaults llama.cpp instead of raising, so the
parent only ever talks to it through `python -m train.llama_check`: one evaluation that prints one JSON
object (`run_llama_check`), or, for a whole job, a worker that answers one JSON line per request,
loading each model once and attaching and detaching LoRA adapters with llama.cpp's adapter API
(`LlamaWorker`, `--serve`). A crash takes only the child down.

A child that dies because the job is being stopped (Ctrl-C reaches the whole process group; SIGTERM
from a spot VM's shutdown, systemd or `kill`) says nothing about the file: that is
`LlamaCheckInterrupted`, never a failed check (`LlamaCheckError`).

Test hook: with MEETARA_TEST_HOLD_LLAMA_CHECK=<file> the child (a worker: when it starts) writes its
pid to <file> (atomically) and waits 60 s before it loads anything, so a test can signal a job exactly
while it validates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def _load(model: str, n_ctx: int, threads: int | None) -> Any:
    """llama.cpp's model with a context of `n_ctx` (0: the model's trained length), one batch wide."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=model,
        logits_all=True,  # 0.3.x keeps only the last row in `scores` without it
        n_ctx=n_ctx,
        n_batch=n_ctx or 1 << 16,  # llama-cpp-python cuts it to the context
        n_threads=threads,
        seed=0,
        verbose=False,
    )


@contextmanager
def _adapter(llm: Any, lora: str | None) -> Iterator[None]:
    """Attach the LoRA adapter `lora` to `llm`'s context for the block, then detach and free it
    (llama.cpp's adapter API: the base model stays loaded; a malformed adapter may crash the process)."""
    if lora is None:
        yield
        return
    import ctypes

    import llama_cpp

    _stage(f"attaching LoRA {lora}")
    adapter = llama_cpp.llama_adapter_lora_init(llm.model, lora.encode())
    if not adapter:
        raise ValueError(f"llama.cpp could not load the LoRA adapter {lora}")
    try:
        if llama_cpp.llama_set_adapters_lora(
            llm.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter), 1, (ctypes.c_float * 1)(1.0)
        ):
            raise ValueError(f"llama.cpp could not apply the LoRA adapter {lora}")
        yield
    finally:
        llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)
        llama_cpp.llama_adapter_lora_free(adapter)


def _run(llm: Any, tokens: list[int], generate: int, text: str | None, given: int) -> dict[str, Any]:
    """Evaluate `tokens` from an empty context, then generate greedily; the JSON-able result."""
    import llama_cpp

    n_vocab = llm.n_vocab()
    if bad := [t for t in tokens if not 0 <= t < n_vocab]:
        raise ValueError(f"token ids out of range [0, {n_vocab}): {bad[:5]}")
    llm.reset()  # the next eval drops whatever the context held
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
        "n_ctx_train": llama_cpp.llama_model_n_ctx_train(llm.model),
        "n_tokens": len(tokens),
        "truncated_from": given if given > len(tokens) else None,
        "logits": logits.tolist(),
        "generated": generated,
        "text": llm.detokenize(generated).decode("utf-8", errors="replace"),
    }
    if text is not None:
        out["tokenize_check"] = tokenize_turns(llm, text)
    return out


def _fit(tokens: list[int], room: int, n_ctx_train: int, generate: int) -> list[int]:
    """GPT-2 has learned positions: past n_ctx_train llama.cpp would index past position_embd. Keep the
    first tokens that leave room for the generated ones, as the transformers side cuts its ids
    (`train.model.fit_positions`); the result's `n_tokens` says how many were evaluated."""
    if len(tokens) + room <= n_ctx_train:
        return tokens
    if n_ctx_train - room < 1:
        raise ValueError(f"{generate} generated tokens leave no room in the model context {n_ctx_train}")
    return tokens[: n_ctx_train - room]


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
    given = len(tokens)
    _stage(f"loading {model}")
    llm = _load(model, given + room, threads)
    fitted = _fit(tokens, room, llama_cpp.llama_model_n_ctx_train(llm.model), generate)
    if len(fitted) < given:
        llm.close()
        _stage(f"loading {model}")
        llm = _load(model, len(fitted) + room, threads)  # a context no larger than the tokens need
    with _adapter(llm, lora):
        return _run(llm, fitted, room, text, given)


class _Server:
    """The worker's side of `LlamaWorker`: models loaded once (a context of the model's whole
    trained length), adapters attached and detached per request."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.models: dict[str, Any] = {}

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        import llama_cpp

        tokens = [int(t) for t in req["tokens"]]
        if not tokens:
            raise ValueError("need at least one token")
        generate = max(int(req.get("generate", 0)), 0)
        model = req["model"]
        if model not in self.models:
            _stage(f"loading {model}")
            self.models[model] = _load(model, 0, self.threads)
        llm = self.models[model]
        fitted = _fit(tokens, generate, llama_cpp.llama_model_n_ctx_train(llm.model), generate)
        with _adapter(llm, req.get("lora")):
            return _run(llm, fitted, generate, req.get("text"), len(tokens))


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


def _hold() -> None:
    if hold := os.environ.get(HOLD_ENV):  # test hook (module docstring): "validating now"; wait
        Path(f"{hold}.tmp").write_text(str(os.getpid()))
        os.replace(f"{hold}.tmp", hold)
        time.sleep(60)


def _private_stdout() -> Any:
    """Anything native code or Python prints while llama.cpp runs must not corrupt the JSON on stdout:
    point fd 1 (and sys.stdout) at stderr and return a private writer on the real stdout."""
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(real_stdout, "w")


def main(argv: list[str] | None = None) -> None:
    """CLI: print one JSON object with the evaluation on stdout; logs and errors go to stderr. With
    `--serve`: read one JSON request a line on stdin, answer one JSON line each (`LlamaWorker`)."""
    p = argparse.ArgumentParser(prog="python -m train.llama_check", description=__doc__)
    p.add_argument("--serve", action="store_true", help="answer requests on stdin (LlamaWorker)")
    p.add_argument("--model")
    p.add_argument("--lora")
    p.add_argument("--tokens", help="comma-separated token ids")
    p.add_argument("--generate", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--text", help="also report llama.cpp's tokenization of this text")
    args = p.parse_args(argv)
    if args.serve:
        _hold()
        server, out = _Server(args.threads), _private_stdout()
        for line in sys.stdin:
            try:
                reply = server.handle(json.loads(line))
            except Exception as e:  # a refused file or request: the worker stays up for the next one
                reply = {"error": f"{type(e).__name__}: {e}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
        return
    if not args.model or args.tokens is None:
        p.error("--model and --tokens are required")
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    _hold()
    out = _private_stdout()
    result = evaluate(
        args.model, tokens, lora=args.lora, generate=args.generate, text=args.text, threads=args.threads
    )
    with out:
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


class LlamaWorker:
    """One llama.cpp child process (`python -m train.llama_check --serve`) for a whole job: each model
    is loaded once, at its first request, and each request attaches its LoRA adapter, evaluates and
    detaches it (llama.cpp's adapter API), so a job loads its base once instead of once per domain.

    The isolation is `run_llama_check`'s: a malformed GGUF kills the child, not the job. Its errors are
    the same too: `LlamaCheckError` when the child crashes, fails, times out or answers an error (a
    crashed child is started afresh at the next request); `LlamaCheckInterrupted` when `stop()` turns
    true while it works (it is killed at once) or it dies of a stop signal. `close()` ends it; the
    child never outlives the `with` block."""

    def __init__(self, *, threads: int | None = None, timeout: float = 120) -> None:
        self.threads, self.timeout = threads, timeout
        self.proc: subprocess.Popen | None = None
        self.starts = 0  # child processes started (a crash restarts it)

    def __enter__(self) -> LlamaWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "train.llama_check", "--serve"]
        if self.threads is not None:
            cmd += ["--threads", str(self.threads)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: deque[str] = deque(maxlen=200)
        lines, err = self._lines, self._stderr

        def read_out() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.put(line)
            lines.put(None)

        def read_err() -> None:
            for line in proc.stderr:  # type: ignore[union-attr]
                err.append(line)

        self._readers = [threading.Thread(target=f, daemon=True) for f in (read_out, read_err)]
        for t in self._readers:
            t.start()
        self.starts += 1
        return proc

    def evaluate(
        self,
        model: Path,
        token_ids: list[int],
        *,
        lora: Path | None = None,
        generate: int = 8,
        text: str | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """As `run_llama_check`, in the job's one worker: `logits` comes back as a numpy array."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        target = f"{model}" + (f" with LoRA {lora}" if lora is not None else "")
        req = {"model": str(model), "tokens": [int(t) for t in token_ids], "generate": generate}
        if lora is not None:
            req["lora"] = str(lora)
        if text is not None:
            req["text"] = text
        try:
            proc.stdin.write(json.dumps(req) + "\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        except OSError:
            pass  # the child is gone: its end of stdout says so below
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self._lines.get(timeout=max(min(deadline - time.monotonic(), POLL_S), 0.001))
                break
            except queue.Empty:
                if stop is not None and stop():
                    self.close(kill=True)
                    raise LlamaCheckInterrupted(f"llama.cpp check of {target} stopped") from None
                if time.monotonic() >= deadline:
                    self.close(kill=True)
                    raise LlamaCheckError(
                        f"llama.cpp check of {target} timed out after {self.timeout:g}s"
                    ) from None
        if line is None:  # the child died
            rc = proc.wait()
            for t in self._readers:
                t.join(5)
            self.proc = None
            how = f"killed by {_signal_name(-rc)}" if rc < 0 else f"exit code {rc}"
            if (stop is not None and stop()) or -rc in STOP_SIGNALS:
                raise LlamaCheckInterrupted(f"llama.cpp check of {target} interrupted ({how})")
            stderr = "".join(self._stderr)
            raise LlamaCheckError(f"llama.cpp check of {target} failed ({how}){_describe_failure(stderr)}")
        try:
            result = json.loads(line)
        except json.JSONDecodeError as exc:
            self.close(kill=True)
            raise LlamaCheckError(f"llama.cpp check of {target} printed no JSON: {line[:200]!r}") from exc
        if "error" in result:
            raise LlamaCheckError(f"llama.cpp check of {target} failed: {result['error']}")
        result["logits"] = np.asarray(result["logits"], dtype=np.float32)
        return result

    def close(self, kill: bool = False) -> None:
        """End the child: EOF on its stdin, then a kill if it has not gone within 5 s (at once: `kill`)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
            try:
                proc.wait(0 if kill else 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for t in self._readers:
            t.join(5)


if __name__ == "__main__":
    main()
