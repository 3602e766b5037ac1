"""Validation of a domain's GGUF outputs.

1. Read each file back with `gguf`: architecture, type, file type, tensor types and counts.
2. Size: the adapter's tensor bytes must equal what the config implies (r, layers, width); the
   quantized model's must equal what its tensor types imply. Only alignment padding may differ.
3. llama.cpp (in a subprocess: a malformed GGUF can crash it) loads base + adapter and the merged
   quantized model, evaluates a held-out prompt and generates; its logits are compared with the
   transformers model's on the same token ids (tolerances in `pipeline.Tolerance`), and its
   tokenizer must reproduce the transformers tokenizer's ids.

The probe is a held-out prompt as training reads it (`model.text_ids`: a literal `<|endoftext|>` is
the turn separator, the eos id, on both sides), cut to the model's positions less the generated
tokens (`model.fit_positions`), so both models evaluate exactly the same ids however long the prompt.

A check stopped from outside (`stop`, or a llama.cpp child killed by a stop signal) is no verdict:
`LlamaCheckInterrupted` propagates out of `validate_domain` instead of failing the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from train.gguf_export import expected_quantized_bytes, expected_tensor_bytes, read_gguf_summary
from train.llama_check import LlamaCheckError, run_llama_check
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
    model: Path,
    ids: list[int],
    ref: np.ndarray,
    *,
    lora: Path | None = None,
    text: str | None = None,
    want_ids: list[int] | None = None,
    tie: float = 0.0,
    stop: Callable[[], bool] | None = None,
) -> dict:
    """llama.cpp on `ids` compared with `ref`; with `text`, whether llama.cpp tokenizes it into
    `want_ids` (the whole text's ids: `ids` may be cut to the model's positions; default `ids`)."""
    try:
        out = run_llama_check(model, ids, lora=lora, generate=GENERATE, text=text, stop=stop)
    except LlamaCheckError as e:
        return {"loaded": False, "error": str(e)}
    res = {"loaded": True, "generated_tokens": len(out["generated"]), "generated_text": out["text"]}
    got = np.asarray(out["logits"])[:, : ref.shape[-1]]
    if got.shape[0] != ref.shape[0]:  # not the same positions: nothing to compare (a failed check)
        return res | {"error": f"llama.cpp evaluated {got.shape[0]} positions, transformers {ref.shape[0]}"}
    res |= _compare(ref, got, tie)
    if text is not None:
        res["tokenizer_matches"] = out.get("tokenize_check") == (ids if want_ids is None else want_ids)
    return res


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


def validate_domain(
    model: Any,
    base: Any,
    files: dict[str, Path],
    base_file: Path,
    prompt: str,
    spec: Any,
    *,
    stop: Callable[[], bool] | None = None,
) -> dict:
    """Run every check on a domain's files; `passed` is True only if all of them pass. Raises
    `LlamaCheckInterrupted` when `stop()` turns true during a llama.cpp check, or a check's child is
    killed by a stop signal: an interrupted validation has no verdict."""
    tol = spec.tolerance
    full = text_ids(base.tokenizer, [prompt])[0]
    ids = fit_positions(full, base.config.n_positions, reserve=GENERATE)
    ref = reference_logits(model, ids)
    effect = float(np.max(np.abs(ref - reference_logits(model, ids, adapter=False))))
    report: dict[str, Any] = {
        "probe_tokens": len(ids),
        "probe_prompt_tokens": len(full),  # more than probe_tokens when cut to the model's positions
        # where the prompt's turn separators (a literal <|endoftext|>) are: the eos id on both sides
        "probe_separators": [i for i, t in enumerate(full) if t == base.tokenizer.eos_token_id],
        "adapter_effect_max_abs": effect,
        "files": {},
    }

    report["files"]["adapter"] = _check(
        files["adapter"],
        lambda summary: _adapter_ok(summary, base.config, spec),
        lambda: _llama_adapter(base_file, files["adapter"], ids, full, ref, prompt, effect, tol, stop),
    )
    if "merged_q4_k_m" in files:
        path = files["merged_q4_k_m"]
        report["files"]["merged_q4_k_m"] = _check(
            path, _quantized_ok, lambda: _llama_quantized(path, ids, ref, tol, stop)
        )
    report["passed"] = all(f["passed"] for f in report["files"].values())
    return report


def _check(
    path: Path, header: Callable[[dict], tuple[bool, dict]], run: Callable[[], tuple[dict, bool]]
) -> dict:
    """Read a GGUF back (header and size), then run it in llama.cpp; an unreadable file fails, no crash."""
    try:
        summary = read_gguf_summary(path)
        header_ok, size = header(summary)
    except Exception as e:  # a truncated or foreign file makes the gguf reader raise anything
        return {"readable": False, "error": f"{type(e).__name__}: {e}", "passed": False}
    llama, run_ok = run()
    return {
        "summary": _brief(summary),
        "header_ok": header_ok,
        "size": size,
        "llama_cpp": llama,
        "passed": bool(header_ok and size["ok"] and run_ok),
    }


def _adapter_ok(summary: dict, config: Any, spec: Any) -> tuple[bool, dict]:
    header_ok = (
        summary["architecture"] == "gpt2"
        and summary["type"] == "adapter"
        and summary.get("adapter_type") == "lora"
        and summary["tensor_count"] == 2 * config.n_layer
        and set(summary["tensor_types"]) == {"F32"}
    )
    return header_ok, _size_check(summary, expected_tensor_bytes(config, kind="adapter", r=spec.params.r))


def _quantized_ok(summary: dict) -> tuple[bool, dict]:
    header_ok = summary["architecture"] == "gpt2" and summary["file_type_name"] == "MOSTLY_Q4_K_M"
    return header_ok, _size_check(summary, expected_quantized_bytes(summary["tensors"]))


def _llama_adapter(
    base_file: Path,
    adapter: Path,
    ids: list[int],
    full: list[int],
    ref: np.ndarray,
    prompt: str,
    effect: float,
    tol: Any,
    stop: Callable[[], bool] | None = None,
) -> tuple[dict, bool]:
    run = _llama(
        base_file, ids, ref, lora=adapter, text=prompt, want_ids=full, tie=tol.adapter_max_abs, stop=stop
    )
    ok = (
        run["loaded"]
        and "error" not in run
        and run["generated_tokens"] > 0
        and run["max_abs_diff"] <= tol.adapter_max_abs
        and run["top1_agreement"] >= tol.adapter_top1
        and run["tokenizer_matches"]
        # if llama.cpp ignored the adapter its logits would sit `effect` away from ours
        and (effect == 0 or run["max_abs_diff"] < 0.5 * effect)
    )
    return run, ok


def _llama_quantized(
    path: Path, ids: list[int], ref: np.ndarray, tol: Any, stop: Callable[[], bool] | None = None
) -> tuple[dict, bool]:
    run = _llama(path, ids, ref, stop=stop)  # strict top-1: its logit bound is loose already
    if not run["loaded"] or "error" in run:
        return run, False
    run["max_rel_diff"] = run["max_abs_diff"] / float(ref.std())
    ok = (
        run["generated_tokens"] > 0
        and run["max_rel_diff"] <= tol.quantized_max_rel
        and run["top1_agreement"] >= tol.quantized_top1
    )
    return run, ok


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
