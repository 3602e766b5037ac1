"""Validation of a domain's GGUF outputs.

1. Read each file back with `gguf`: architecture, type, file type, tensor types and counts.
2. Size: the adapter's tensor bytes must equal what the config implies (r, layers, width, f16 or f32);
   the quantized model's must equal what its tensor types imply. Only alignment padding may differ.
3. llama.cpp (in a child process: a malformed GGUF can crash it; by default the job's one
   `LlamaWorker`, which loads each base once and attaches and detaches the adapters) runs what ships,
   the run's Q4_K_M base + the adapter, and the f16 base + the adapter (the tight check), and a
   `--merged` model; it evaluates a held-out prompt and generates; its logits are compared with the
   transformers model's on the same token ids (tolerances in `pipeline.Tolerance`, with the measurements
   they come from), and its tokenizer must reproduce the transformers tokenizer's ids.

The probe is a held-out prompt as training reads it (`model.text_ids`: a literal `<|endoftext|>` is
the turn separator, the eos id, on both sides), cut to the model's positions less the generated
tokens (`model.fit_positions`), so both models evaluate exactly the same ids however long the prompt.
The transformers reference is the model already in memory, with and without its adapter.

A check stopped from outside (`stop`, or a llama.cpp child killed by a stop signal) is no verdict:
`LlamaCheckInterrupted` propagates out of `validate_domain` instead of failing the file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from train.gguf_export import expected_quantized_bytes, expected_tensor_bytes, read_gguf_summary
from train.llama_check import LlamaCheckError, LlamaWorker, run_llama_check
from train.model import fit_positions, text_ids

GENERATE = 8  # tokens llama.cpp generates after the probe


def _compare(ref: np.ndarray, got: np.ndarray, tie: float = 0.0) -> dict:
    """Max |logit diff| and top-1 agreement. A position agrees when llama.cpp's top token is also the
    reference's, or is within `tie` of the reference's best logit: a near-tie may flip under a
    rounding difference far below the tolerance without the models disagreeing."""
    picked = np.take_along_axis(ref, got.argmax(-1)[:, None], axis=-1)[:, 0]
    return {
        "max_abs_diff": float(np.max(np.abs(ref - got))),
        "top1_agreement": float(np.mean(picked >= ref.max(-1) - tie)),
        "top1_strict": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
    }


def _size_check(summary: dict, expected: int) -> dict:
    actual = summary["tensor_data_bytes"]
    slack = summary["alignment"] * summary["tensor_count"]  # each tensor may be padded to the alignment
    return {
        "expected_tensor_bytes": expected,
        "actual_tensor_bytes": actual,
        "ok": expected <= actual <= expected + slack,
    }


def _llama(
    check: Callable[..., dict],
    model: Path,
    ids: list[int],
    ref: np.ndarray,
    *,
    lora: Path | None = None,
    text: str | None = None,
    want_ids: list[int] | None = None,
    tie: float = 0.0,
    generate: int = GENERATE,
    stop: Callable[[], bool] | None = None,
) -> tuple[dict, np.ndarray | None]:
    """llama.cpp (`check`: the job's `LlamaWorker.evaluate`, or `run_llama_check`) on `ids` compared
    with `ref`, and its logits; with `text`, whether llama.cpp tokenizes it into `want_ids` (the whole
    text's ids: `ids` may be cut to the model's positions; default `ids`)."""
    try:
        out = check(model, ids, lora=lora, generate=generate, text=text, stop=stop)
    except LlamaCheckError as e:
        return {"loaded": False, "error": str(e)}, None
    res = {"loaded": True, "generated_tokens": len(out["generated"]), "generated_text": out["text"]}
    got = np.asarray(out["logits"])[:, : ref.shape[-1]]
    if got.shape[0] != ref.shape[0]:  # not the same positions: nothing to compare (a failed check)
        return res | {
            "error": f"llama.cpp evaluated {got.shape[0]} positions, transformers {ref.shape[0]}"
        }, None
    res |= _compare(ref, got, tie)
    if text is not None:
        res["tokenizer_matches"] = out.get("tokenize_check") == (ids if want_ids is None else want_ids)
    return res, got


def reference_logits(model: Any, ids: list[int], adapter: bool = True) -> np.ndarray:
    """Logits of the transformers model (eval mode, fp32 output) for `ids`, cut to the model's
    positions (`model.fit_positions`): one row per position evaluated."""
    import contextlib

    import torch

    ids = fit_positions(ids, model.config.n_positions)
    dev = next(model.parameters()).device
    ctx = contextlib.nullcontext() if adapter else model.disable_adapter()
    was = model.training
    model.eval()
    with torch.no_grad(), ctx:
        logits = model(input_ids=torch.tensor([ids], device=dev)).logits[0].float().cpu().numpy()
    model.train(was)
    return logits


@dataclass
class Reference:
    """The transformers side of a domain's checks, computed while its adapter is in the model (so the
    job can go on training the next domain while llama.cpp checks this one, `validate_files`)."""

    prompt: str
    full: list[int]  # the prompt's ids
    ids: list[int]  # ... cut to the model's positions less the generated tokens: what both evaluate
    ref: np.ndarray  # logits with the adapter
    ref0: np.ndarray  # ... without it
    separators: list[int]  # where the prompt's turn separators (the eos id) are
    seconds: float

    @property
    def effect(self) -> float:
        return float(np.max(np.abs(self.ref - self.ref0)))


def reference(model: Any, base: Any, prompt: str) -> Reference:
    """The probe's ids and the model's logits on them with and without its adapter."""
    t = time.perf_counter()
    full = text_ids(base.tokenizer, [prompt])[0]
    ids = fit_positions(full, base.config.n_positions, reserve=GENERATE)
    ref = reference_logits(model, ids)
    ref0 = reference_logits(model, ids, adapter=False)
    seps = [i for i, t in enumerate(full) if t == base.tokenizer.eos_token_id]
    return Reference(prompt, full, ids, ref, ref0, seps, time.perf_counter() - t)


def validate_domain(
    model: Any,
    base: Any,
    files: dict[str, Path],
    base_files: dict[str, Path],
    prompt: str,
    spec: Any,
    *,
    stop: Callable[[], bool] | None = None,
    worker: LlamaWorker | None = None,
) -> dict:
    """Run every check on a domain's files; `passed` is True only if all of them pass. `base_files`:
    the base GGUFs the adapter is checked on, "q4_k_m" (what is shipped) and "f16" (optional: the
    tighter check of the adapter's arithmetic). `worker`: the job's llama.cpp worker (one child process
    per job, the base loaded once); without it each check runs in a child of its own. Raises
    `LlamaCheckInterrupted` when `stop()` turns true during a llama.cpp check, or a check's child is
    killed by a stop signal: an interrupted validation has no verdict."""
    probe = reference(model, base, prompt)
    return validate_files(probe, base.config, files, base_files, spec, stop=stop, worker=worker)


def validate_files(
    probe: Reference,
    config: Any,
    files: dict[str, Path],
    base_files: dict[str, Path],
    spec: Any,
    *,
    stop: Callable[[], bool] | None = None,
    worker: LlamaWorker | None = None,
) -> dict:
    """`validate_domain`'s checks against a `reference` taken earlier (`config`: the model's)."""
    tol = spec.tolerance
    check = worker.evaluate if worker is not None else run_llama_check
    timings: dict[str, float] = {"reference": probe.seconds}
    effect = probe.effect
    report: dict[str, Any] = {
        "probe_tokens": len(probe.ids),
        "probe_prompt_tokens": len(probe.full),  # more than probe_tokens when cut to the model's positions
        # where the prompt's turn separators (a literal <|endoftext|>) are: the eos id on both sides
        "probe_separators": probe.separators,
        "adapter_effect_max_abs": effect,
        "tolerance": tol.model_dump(),
        "files": {},
        "timings": timings,
    }
    adapter = files["adapter"]
    ctx = _Probe(check, probe.ids, probe.full, probe.prompt, probe.ref, probe.ref0, effect, tol, stop)
    report["files"]["adapter"] = _check(
        adapter,
        lambda summary: _adapter_ok(summary, config, spec),
        lambda: _llama_adapter(ctx, base_files, adapter, timings),
        timings,
        "adapter",
    )
    if "merged_q4_k_m" in files:
        path = files["merged_q4_k_m"]
        report["files"]["merged_q4_k_m"] = _check(
            path, _quantized_ok, lambda: _llama_quantized(ctx, path, timings), timings, "merged"
        )
    report["passed"] = all(f["passed"] for f in report["files"].values())
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return report


@dataclass
class _Probe:
    """What every llama.cpp check of a domain compares against."""

    check: Callable[..., dict]
    ids: list[int]
    full: list[int]
    prompt: str
    ref: np.ndarray  # transformers, with the adapter
    ref0: np.ndarray  # transformers, without it
    effect: float
    tol: Any
    stop: Callable[[], bool] | None


def _check(
    path: Path,
    header: Callable[[dict], tuple[bool, dict]],
    run: Callable[[], tuple[dict, bool]],
    timings: dict[str, float],
    name: str,
) -> dict:
    """Read a GGUF back (header and size), then run it in llama.cpp; an unreadable file fails, no crash."""
    t = time.perf_counter()
    try:
        summary = read_gguf_summary(path)
        header_ok, size = header(summary)
    except Exception as e:  # a truncated or foreign file makes the gguf reader raise anything
        return {"readable": False, "error": f"{type(e).__name__}: {e}", "passed": False}
    finally:
        timings[f"read_{name}"] = time.perf_counter() - t
    checks, run_ok = run()
    return {
        "summary": _brief(summary),
        "header_ok": header_ok,
        "size": size,
        **checks,
        "passed": bool(header_ok and size["ok"] and run_ok),
    }


def _adapter_ok(summary: dict, config: Any, spec: Any) -> tuple[bool, dict]:
    dtype = spec.adapter_dtype
    header_ok = (
        summary["architecture"] == "gpt2"
        and summary["type"] == "adapter"
        and summary.get("adapter_type") == "lora"
        and summary["tensor_count"] == 2 * config.n_layer
        and set(summary["tensor_types"]) == {dtype.upper()}
    )
    expected = expected_tensor_bytes(config, kind="adapter", r=spec.params.r, dtype=dtype)
    return header_ok, _size_check(summary, expected)


def _quantized_ok(summary: dict) -> tuple[bool, dict]:
    header_ok = summary["architecture"] == "gpt2" and summary["file_type_name"] == "MOSTLY_Q4_K_M"
    return header_ok, _size_check(summary, expected_quantized_bytes(summary["tensors"]))


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    t = time.perf_counter()
    try:
        return fn()
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


def _llama_adapter(
    p: _Probe, base_files: dict[str, Path], adapter: Path, timings: dict[str, float]
) -> tuple[dict, bool]:
    """The adapter on the shipped Q4_K_M base, and on the f16 base when given, against transformers
    (bounds in `pipeline.Tolerance`, which says where they come from).

    Q4_K_M base + adapter: the logits within `adapter_q4_max_rel` of the reference's spread; top-1
    agreement `quantized_top1`, a position agreeing when llama.cpp's pick is within the base's own Q4_K_M
    error of the reference's best; the tokenizer's ids. Then the adapter's own effect (logits with it
    minus without it, in llama.cpp on the Q4_K_M base and in transformers: the base's quantization error
    cancels) must match within `adapter_delta_max_rel` of the effect, or within the quantization noise
    (`adapter_delta_floor_rel` x the base's own Q4_K_M error) where that is larger: an adapter llama.cpp
    ignores misses by the whole effect. f16 base + adapter: within `adapter_max_abs` (its noise is
    ~0.004), and less than half the effect away, so that an ignored adapter fails there too."""
    tol, out = p.tol, {}
    spread = float(p.ref.std())
    q4 = base_files["q4_k_m"]
    run0, got0 = _timed(
        timings,
        "llama_q4_k_m_base",
        lambda: _llama(p.check, q4, p.ids, p.ref0, generate=0, stop=p.stop),
    )
    base_err = run0.get("max_abs_diff", 0.0)
    run, got = _timed(
        timings,
        "llama_q4_k_m_adapter",
        lambda: _llama(
            p.check, q4, p.ids, p.ref, lora=adapter, text=p.prompt, want_ids=p.full, tie=base_err,
            stop=p.stop,
        ),
    )  # fmt: skip
    out["llama_cpp"] = run
    if got is None or got0 is None:
        return out, False
    run["max_rel_diff"] = run["max_abs_diff"] / spread
    run["base_q4_k_m_max_abs_diff"] = base_err  # the base alone against transformers' base
    # what an adapter that is not applied would score: the base alone against the adapted reference
    run["base_alone_max_rel_diff"] = float(np.max(np.abs(got0 - p.ref))) / spread
    delta_err = float(np.max(np.abs((got - got0) - (p.ref - p.ref0))))
    allowed = max(tol.adapter_delta_max_rel * p.effect, tol.adapter_delta_floor_rel * base_err)
    run |= {
        "adapter_delta_max_abs_diff": delta_err,
        "adapter_delta_max_rel_diff": delta_err / p.effect if p.effect else 0.0,
        "adapter_delta_allowed": allowed,
    }
    ok = (
        "error" not in run
        and run["generated_tokens"] > 0
        and run["tokenizer_matches"]
        and run["max_rel_diff"] <= tol.adapter_q4_max_rel
        and run["top1_agreement"] >= tol.quantized_top1
        and delta_err <= allowed
    )
    if base_files.get("f16") is not None:
        f16, _ = _timed(
            timings,
            "llama_f16_adapter",
            lambda: _llama(
                p.check, base_files["f16"], p.ids, p.ref, lora=adapter, tie=tol.adapter_max_abs,
                generate=0, stop=p.stop,
            ),
        )  # fmt: skip
        out["llama_cpp_f16_base"] = f16
        ok = ok and (
            f16["loaded"]
            and "error" not in f16
            and f16["max_abs_diff"] <= tol.adapter_max_abs
            and f16["top1_agreement"] >= tol.adapter_top1
            # if llama.cpp ignored the adapter its logits would sit `effect` away from ours
            and (p.effect == 0 or f16["max_abs_diff"] < 0.5 * p.effect)
        )
    return out, bool(ok)


def _llama_quantized(p: _Probe, path: Path, timings: dict[str, float]) -> tuple[dict, bool]:
    run, _ = _timed(
        timings, "llama_merged", lambda: _llama(p.check, path, p.ids, p.ref, stop=p.stop)
    )  # strict top-1: its logit bound is loose already
    if not run["loaded"] or "error" in run:
        return {"llama_cpp": run}, False
    run["max_rel_diff"] = run["max_abs_diff"] / float(p.ref.std())
    ok = (
        run["generated_tokens"] > 0
        and run["max_rel_diff"] <= p.tol.quantized_max_rel
        and run["top1_agreement"] >= p.tol.quantized_top1
    )
    return {"llama_cpp": run}, ok


def _brief(summary: dict) -> dict:
    """The parts of a GGUF summary worth keeping in a manifest (no per-tensor listing, no local path)."""
    keep = (
        "architecture",
        "type",
        "file_type",
        "file_type_name",
        "tensor_count",
        "tensor_types",
        "file_size",
        "lora_alpha",
        "warnings",  # a k-quant file that holds other types (train.gguf_export.quantize)
    )
    return {k: summary[k] for k in keep if k in summary}
