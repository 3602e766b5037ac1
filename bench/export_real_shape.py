"""Base-model GGUF export at DialoGPT-medium's real shape, offline (`random:microsoft/DialoGPT-medium`):
seconds and bytes of the f16 file and its Q4_K_M quantization, and llama.cpp's logits beside the
transformers model's on a short prompt. Run: `python bench/export_real_shape.py [OUT_DIR]`."""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from train.domains import load_registry
from train.gguf_export import quantize, read_gguf_summary, write_model_gguf
from train.llama_check import run_llama_check
from train.model import load_base
from train.validate import reference_logits


def timed(what: str, fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    print(f"{what}: {time.perf_counter() - t:.1f} s")
    return out


def main(out: Path) -> None:
    base = timed("build", load_base, "random:microsoft/DialoGPT-medium", load_registry())
    f16, q4 = out / "base-f16.gguf", out / "base-Q4_K_M.gguf"
    timed("write f16", write_model_gguf, base.model, base.tokenizer, f16, name="bench", dtype="f16")
    timed("quantize Q4_K_M", quantize, f16, q4)
    ids = base.tokenizer("hello, how can i help you with iron and nutrition today?")["input_ids"]
    ref = reference_logits(base.model, ids)
    for path in (f16, q4):
        s = read_gguf_summary(path)
        got = np.asarray(timed(f"llama.cpp {path.name}", run_llama_check, path, ids, generate=0)["logits"])
        diff = np.abs(got[:, : ref.shape[-1]] - ref)
        print(
            f"{path.name}: {s['file_size']:,} B, {s['tensor_count']} tensors {s['tensor_types']}, "
            f"|logit diff| mean {diff.mean():.4f} max {diff.max():.4f} (logit std {ref.std():.3f})"
        )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
