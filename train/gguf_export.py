"""Export a merged GPT-2 and its LoRA adapters to GGUF files that llama.cpp loads, and inspect them.

Written with `gguf.GGUFWriter` directly rather than llama.cpp's converters: those live only in
llama.cpp's source tree and fail on this project's models (they reject a tokenizer whose pre-tokenizer
hash they do not know, e.g. the tiny model's own BPE, and hard-code GPT-2's 4x MLP width), and their
LoRA converter writes GPT-2's Conv1D adapters transposed and swapped, which segfaults llama.cpp.

For a model both can convert, `write_model_gguf` writes what `convert_hf_to_gguf.py` writes: the same
tensors (names, types, shapes, bits) and metadata keys; `tests/test_gguf_parity.py` checks it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

if TYPE_CHECKING:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

ARCH = "gpt2"
_log = logging.getLogger("meetara.export")
# ggml's k-quant block types (256 elements per block).
_K_QUANTS = {t.name for t in gguf.GGMLQuantizationType if re.fullmatch(r"Q\d_K", t.name)}
_FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}

# HF module (inside transformer.h.N) -> llama.cpp's gpt2 tensor name (blk.N.<name>).
_BLOCK_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
_TOP_NAMES = {
    "transformer.wte.weight": "token_embd.weight",
    "transformer.wpe.weight": "position_embd.weight",
    "transformer.ln_f.weight": "output_norm.weight",
    "transformer.ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}
# Kept F32 in an f16 file, as llama.cpp's converter and quantizer do: a small table added to activations.
_KEEP_F32 = {"position_embd.weight"}
# Special tokens whose ids go into the GGUF when the tokenizer (or the config) has them; llama.cpp's
# converter writes the same ones (it has no GGUF key for cls).
_SPECIAL = ("bos", "eos", "unk", "sep", "pad", "mask")
# GPT-2's Conv1D stores weights as [in, out]; ggml wants nn.Linear's [out, in].
_CONV1D = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
_BLOCK_RE = re.compile(r"^transformer\.h\.(\d+)\.(.+)\.(weight|bias)$")
# Causal-mask buffers that older transformers versions put in the state dict.
_BUFFER_RE = re.compile(r"^transformer\.h\.\d+\.attn\.(masked_)?bias$")
_LORA_RE = re.compile(
    r"^(?:base_model\.model\.)?transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
    r"\.lora_([AB])(?:\.[^.]+)?\.weight$"
)


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; move it into place only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Only a unique name, not mkstemp: the writer (or llama.cpp) creates the file with normal permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _check_config(config: GPT2Config) -> None:
    # llama.cpp's gpt2 graph implements only the plain GPT-2 block.
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ValueError(f"llama.cpp gpt2 uses tanh-GELU; config has {config.activation_function!r}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(config, flag, False):
            raise ValueError(f"llama.cpp gpt2 does not support {flag}=True")
    if not getattr(config, "scale_attn_weights", True):
        raise ValueError("llama.cpp gpt2 always scales attention by 1/sqrt(head_dim)")


def _tokenizer_arrays(
    tokenizer: PreTrainedTokenizerFast, n_vocab: int
) -> tuple[list[str], list[int], list[str]]:
    """Tokens (by id, padded to the model's vocab), token types and merges from the fast tokenizer."""
    backend = tokenizer.backend_tokenizer
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"need a BPE tokenizer, got {model.get('type')!r}")
    pre = spec.get("pre_tokenizer") or {}
    pre_types = json.dumps(pre)
    # llama.cpp's "gpt-2" pre-tokenizer is ByteLevel with GPT-2's regex and no prefix space;
    # anything else would tokenize differently there than in transformers.
    if '"ByteLevel"' not in pre_types or '"add_prefix_space": true' in pre_types:
        raise ValueError("need a GPT-2 style ByteLevel pre-tokenizer without add_prefix_space")

    vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"tokenizer has ids up to {max(vocab.values())} but the model vocab is {n_vocab}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = int(gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        types[added["id"]] = int(kind)
    # tokenizers >= 0.20 stores merges as pairs, older versions as "a b" strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _head_is_tied(model: GPT2LMHeadModel) -> bool:
    """True when the output head is the token embedding matrix (shared, or equal bit for bit)."""
    import torch

    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if out is emb:
        return True
    return out.shape == emb.shape and bool(torch.equal(out.detach().cpu(), emb.detach().cpu()))


def _special_id(
    tokenizer: PreTrainedTokenizerFast, config: GPT2Config, which: str, n_vocab: int
) -> int | None:
    for candidate in (
        getattr(tokenizer, f"{which}_token_id", None),
        getattr(config, f"{which}_token_id", None),
    ):
        if isinstance(candidate, int) and 0 <= candidate < n_vocab:
            return candidate
    return None


def write_model_gguf(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    path: str | os.PathLike[str],
    *,
    name: str,
    dtype: str = "f16",
) -> Path:
    """Write a merged fp32 GPT-2 and its tokenizer as a llama.cpp `gpt2` GGUF; returns the path.

    dtype "f16" stores 2-D weights as F16, and norms, biases and the position embeddings as F32 (as
    llama.cpp's converter does); "f32" stores everything as F32.

    An output head tied to the token embeddings (GPT-2's `tie_word_embeddings`, the default) is not
    written: llama.cpp then uses `token_embd.weight` for the output too, as it does for the
    converter's files. A separate copy would add a vocab x n_embd matrix and, in Q4_K_M, move the
    embeddings from Q6_K (the type llama.cpp gives the output head) to Q4_K.
    """
    if dtype not in _FILE_TYPES:
        raise ValueError(f"dtype must be one of {sorted(_FILE_TYPES)}, got {dtype!r}")
    config = model.config
    _check_config(config)
    n_vocab = config.vocab_size
    tokens, types, merges = _tokenizer_arrays(tokenizer, n_vocab)
    state = dict(model.state_dict())
    if _head_is_tied(model):
        state.pop("lm_head.weight", None)
    elif "lm_head.weight" not in state:
        state["lm_head.weight"] = model.get_output_embeddings().weight

    tensors: list[tuple[str, np.ndarray]] = []
    for key, value in state.items():
        if _BUFFER_RE.match(key):
            continue
        arr = value.detach().to("cpu").float().numpy()
        if key in _TOP_NAMES:
            gguf_name = _TOP_NAMES[key]
        elif (m := _BLOCK_RE.match(key)) and m.group(2) in _BLOCK_NAMES:
            layer, module, kind = m.groups()
            gguf_name = f"blk.{layer}.{_BLOCK_NAMES[module]}.{kind}"
            if module in _CONV1D and kind == "weight":
                arr = arr.T
        else:
            raise ValueError(f"unexpected GPT-2 tensor {key!r}")
        half = dtype == "f16" and arr.ndim == 2 and gguf_name not in _KEEP_F32
        tensors.append((gguf_name, np.ascontiguousarray(arr, dtype=np.float16 if half else np.float32)))
    n_params = sum(arr.size for _, arr in tensors)

    path = Path(path)
    with _atomic_target(path) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_size_label(gguf.size_label(n_params, n_params, 0, 0))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(config.n_positions)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        w.add_block_count(config.n_layer)
        w.add_head_count(config.n_head)
        w.add_layer_norm_eps(config.layer_norm_epsilon)
        w.add_file_type(int(_FILE_TYPES[dtype]))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        for which in _SPECIAL:
            if (tid := _special_id(tokenizer, config, which, n_vocab)) is not None:
                getattr(w, f"add_{which}_token_id")(tid)
        # transformers' GPT-2 tokenizer adds neither; say so explicitly so llama.cpp matches it.
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        for gguf_name, arr in tensors:
            w.add_tensor(gguf_name, arr)
        _finish(w)
    return path


def write_adapter_gguf(
    lora_state: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    alpha: float,
    base_name: str,
    dtype: str = "f32",
) -> Path:
    """Write peft LoRA weights (`get_peft_model_state_dict` of a GPT-2) as a llama.cpp LoRA GGUF, its
    tensors as `dtype` ("f16": half the bytes; llama.cpp applies either on any base, quantized ones too).

    peft keeps lora_A [r, in] and lora_B [out, r] as nn.Linear weights even with fan_in_fan_out=True
    (Conv1D): the flag only transposes the merged delta B @ A when it is added to Conv1D's [in, out]
    weight. Our base GGUF already holds the transposed [out, in] weight, so A and B are written as-is
    (ggml ne {in, r} and {r, out}).

    This is why meetara writes its own adapters: llama.cpp's `convert_lora_to_gguf.py` applies GPT-2's
    Conv1D transpose to the adapter too (B @ A transposed is A^T @ B^T), writing lora_B^T as lora_a and
    lora_A^T as lora_b: transposed and swapped, wrong for a base whose weights are already transposed,
    and llama.cpp segfaults (exit 139) loading such an adapter instead of raising.
    """
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in lora_state.items():
        m = _LORA_RE.match(key)
        if not m:
            raise ValueError(f"unsupported LoRA tensor {key!r} (only lora_A/lora_B on GPT-2 Conv1D layers)")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        arr = np.ascontiguousarray(value.detach().to("cpu").float().numpy(), dtype=np.float32)
        if arr.ndim != 2:
            raise ValueError(f"{key}: expected a 2-D tensor, got shape {tuple(arr.shape)}")
        pairs.setdefault((layer, module), {})[ab] = arr
    if not pairs:
        raise ValueError("lora_state holds no LoRA tensors")
    if dtype not in _FILE_TYPES:
        raise ValueError(f"dtype must be one of {sorted(_FILE_TYPES)}, got {dtype!r}")
    np_type = np.float16 if dtype == "f16" else np.float32

    tensors: list[tuple[str, np.ndarray]] = []
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"layer {layer} {module}: need both lora_A and lora_B, got {sorted(ab)}")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"layer {layer} {module}: rank mismatch, lora_A {a.shape} vs lora_B {b.shape}")
        base = f"blk.{layer}.{_BLOCK_NAMES[module]}.weight"
        tensors += [(f"{base}.lora_a", a.astype(np_type)), (f"{base}.lora_b", b.astype(np_type))]

    path = Path(path)
    with _atomic_target(path) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(f"{base_name} LoRA")
        w.add_base_model_count(1)
        w.add_base_model_name(0, base_name)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for gguf_name, arr in tensors:
            w.add_tensor(gguf_name, arr)
        _finish(w)
    return path


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype: str = "Q4_K_M") -> Path:
    """Quantize a GGUF model with llama.cpp (in-process: only feed it files this module wrote).

    A k-quant needs rows that are multiples of 256 elements; llama.cpp quantizes other matrices to
    Q5_0, Q8_0 etc. and still labels the file with the requested type. The file keeps its requested
    name (as llama.cpp names such files), but every such fallback is logged as a warning here and
    listed in `read_gguf_summary(dst)["warnings"]`, loudest when no tensor has the named type at all.
    """
    import llama_cpp  # heavy native import; only the quantize step needs it

    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}", None)
    if code is None:
        raise ValueError(f"unknown llama.cpp ftype {ftype!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(src)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    # llama.cpp logs one line per tensor through llama-cpp-python's logger; keep only errors.
    log = logging.getLogger("llama-cpp-python")
    old_level = log.level
    log.setLevel(logging.ERROR)
    try:
        with _atomic_target(dst) as tmp:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize {src} -> {dst} ({ftype}) failed with code {rc}")
    finally:
        log.setLevel(old_level)
    for warning in read_gguf_summary(dst)["warnings"]:
        _log.warning("%s", warning)
    return dst


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    return f.contents() if f is not None else None


def read_gguf_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata and tensor inventory of a GGUF file. Tensor shapes are in ggml order (ne0 first)."""
    path = Path(path)
    reader = gguf.GGUFReader(path)
    file_type = _field(reader, gguf.Keys.General.FILE_TYPE)
    try:
        file_type_name = gguf.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        file_type_name = None
    tensors = {t.name: [t.tensor_type.name, [int(d) for d in t.shape]] for t in reader.tensors}
    size = path.stat().st_size
    summary: dict[str, Any] = {
        "path": str(path),
        "architecture": _field(reader, gguf.Keys.General.ARCHITECTURE),
        "type": _field(reader, gguf.Keys.General.TYPE) or "model",
        "name": _field(reader, gguf.Keys.General.NAME),
        "file_type": file_type,
        "file_type_name": file_type_name,
        "tensor_count": len(tensors),
        "tensor_types": dict(Counter(t for t, _ in tensors.values())),
        "tensors": tensors,
        "alignment": reader.alignment,
        "data_offset": reader.data_offset,
        "file_size": size,
        "tensor_data_bytes": size - reader.data_offset,
    }
    if summary["type"] == gguf.GGUFType.ADAPTER:
        summary["adapter_type"] = _field(reader, gguf.Keys.Adapter.TYPE)
        summary["lora_alpha"] = _field(reader, gguf.Keys.Adapter.LORA_ALPHA)
    summary["warnings"] = _k_quant_warnings(path.name, file_type_name, tensors)
    return summary


def _k_quant_warnings(name: str, file_type_name: str | None, tensors: Mapping[str, list]) -> list[str]:
    """What a k-quant file type's name promises but its tensors do not hold (empty for other files)."""
    m = re.match(r"MOSTLY_(Q\d_K)", file_type_name or "")
    if not m:
        return []
    main = m.group(1)
    matrices = {n: (t, shape) for n, (t, shape) in tensors.items() if len(shape) >= 2 and n not in _KEEP_F32}
    fallbacks = {n: t for n, (t, _) in matrices.items() if t not in _K_QUANTS}
    if not fallbacks and any(t == main for t, _ in matrices.values()):
        return []
    rows = sorted({shape[0] for n, (_, shape) in matrices.items() if n in fallbacks})
    held = ", ".join(f"{t} x{c}" for t, c in Counter(t for t, _ in matrices.values()).most_common())
    why = f"rows of {', '.join(map(str, rows))} elements are not multiples of 256" if rows else ""
    warnings = []
    if not any(t == main for t, _ in matrices.values()):
        warnings.append(
            f"{name} is labelled {file_type_name} but holds no {main} tensor ({held}): llama.cpp fell back "
            f"to other types{': ' + why if why else ''}; its name and file type do not say what it holds"
        )
    if fallbacks:
        listed = ", ".join(f"{n} {t}" for n, t in fallbacks.items())
        warnings.append(
            f"{name}: {len(fallbacks)} of {len(matrices)} matrices are not k-quants ({why}): {listed}"
        )
    return warnings


def expected_tensor_bytes(config: GPT2Config, *, kind: str, r: int | None = None, dtype: str = "f16") -> int:
    """Tensor-data bytes (before alignment padding) implied by the config for our writers' output.

    kind "model": everything `write_model_gguf` writes (output.weight only when the config unties it,
    position_embd.weight F32 in an f16 file);
    kind "adapter": lora_a/lora_b on c_attn of every layer at rank `r`, F16 or F32 as `dtype`.
    """
    e, n_layer = config.n_embd, config.n_layer
    if kind == "adapter":
        if not r:
            raise ValueError("kind='adapter' needs the LoRA rank r")
        return (2 if dtype == "f16" else 4) * n_layer * (r * e + 3 * e * r)
    if kind != "model":
        raise ValueError(f"kind must be 'model' or 'adapter', got {kind!r}")
    if dtype not in _FILE_TYPES:
        raise ValueError(f"dtype must be one of {sorted(_FILE_TYPES)}, got {dtype!r}")
    ff = config.n_inner or 4 * e
    heads = 1 if getattr(config, "tie_word_embeddings", True) else 2
    matrices = heads * config.vocab_size * e + n_layer * (3 * e * e + e * e + 2 * ff * e)
    f32 = config.n_positions * e + 2 * e + n_layer * (2 * e + 3 * e + e + 2 * e + ff + e)
    return (2 if dtype == "f16" else 4) * matrices + 4 * f32


def expected_quantized_bytes(tensor_types: Mapping[str, tuple[str, list[int] | tuple[int, ...]]]) -> int:
    """Tensor-data bytes for {name: (ggml type name, shape)}, e.g. `read_gguf_summary(p)["tensors"]`."""
    total = 0
    for name, (type_name, shape) in tensor_types.items():
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
        n = math.prod(shape)
        if n % block:
            raise ValueError(f"{name}: {n} elements is not a multiple of {type_name}'s block of {block}")
        total += n // block * type_size
    return total
