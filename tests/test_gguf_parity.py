"""meetara's GGUF export against llama.cpp's own converter and quantizer, on a model both can convert.

The reference is llama.cpp's `convert_hf_to_gguf.py` (with the `gguf-py` it ships), run in a
subprocess on a GPT-2 folder written by `save_pretrained`: random seeded weights, GPT-2's real
50,257-token tokenizer (`train.gpt2_vocab`), a 4x MLP (the converter hard-codes it) and a width of
256, so that every matrix row suits the k-quants. meetara's f16 file must hold the same tensors (name,
type, shape, bits) and metadata; quantized to Q4_K_M by llama.cpp, both must give the same tensors.
The order of tensors and keys in the file is not compared: llama.cpp looks both up by name.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from train.gguf_export import expected_tensor_bytes, quantize, read_gguf_summary, write_model_gguf
from train.gpt2_vocab import EOS, gpt2_tokenizer

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference-tools" / "llama.cpp"
CONFIG = {"n_embd": 256, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": 50257}

# Metadata both files hold with different values, on purpose.
DELIBERATE = {
    # meetara names a model after its run and domain; the converter after the model's folder.
    gguf.Keys.General.NAME: "meetara's run/domain name vs the converter's folder name",
}


def _gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(**(CONFIG | overrides), bos_token_id=50256, eos_token_id=50256)
    return GPT2LMHeadModel(config).eval()


def _tokenizer():
    tok = gpt2_tokenizer()
    tok.pad_token = tok.eos_token  # as train.model.load_base sets it for Hugging Face models
    return tok


def _convert(folder: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REFERENCE / "gguf-py"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(REFERENCE / "convert_hf_to_gguf.py"), str(folder)]
    cmd += ["--outtype", "f16", "--outfile", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"ours": f16, "ref": f16, "ours_q": Q4_K_M, "ref_q": Q4_K_M} for the same model."""
    if not (REFERENCE / "convert_hf_to_gguf.py").is_file():
        pytest.fail(
            f"llama.cpp's reference converter is missing: expected {REFERENCE}/convert_hf_to_gguf.py "
            "(llama-cpp-python 0.3.36's vendor/llama.cpp converters and gguf-py)"
        )
    tmp = tmp_path_factory.mktemp("parity")
    model, tok = _gpt2(), _tokenizer()
    folder = tmp / "hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_ctx"] = config["n_positions"]  # the converter reads n_ctx; transformers 5 omits it
    (folder / "config.json").write_text(json.dumps(config))
    proc = _convert(folder, tmp / "ref-f16.gguf")
    assert proc.returncode == 0, f"llama.cpp's converter failed:\n{proc.stderr[-3000:]}"
    out = {"ref": tmp / "ref-f16.gguf", "ours": write_model_gguf(model, tok, tmp / "ours-f16.gguf", name="p")}
    for k in ("ref", "ours"):
        out[f"{k}_q"] = quantize(out[k], tmp / f"{k}-Q4_K_M.gguf", "Q4_K_M")
    return out


@functools.cache
def _read(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)  # parsing 50k tokens and merges takes seconds: once per file


def _metadata(reader: gguf.GGUFReader) -> dict[str, tuple]:
    """key -> (GGUF value types, value) for every key-value pair (the GGUF.* header fields left out)."""
    return {
        k: (tuple(t.name for t in f.types), f.contents())
        for k, f in reader.fields.items()
        if not k.startswith("GGUF.")
    }


def _tensors(reader: gguf.GGUFReader) -> dict[str, tuple[str, list[int], np.ndarray]]:
    return {
        t.name: (t.tensor_type.name, [int(d) for d in t.shape], np.asarray(t.data).view(np.uint8).ravel())
        for t in reader.tensors
    }


def _assert_same_tensors(ours: Path, ref: Path) -> dict:
    a, b = _tensors(_read(ours)), _tensors(_read(ref))
    assert sorted(a) == sorted(b)
    for name, (qtype, shape, data) in b.items():
        assert (a[name][0], a[name][1]) == (qtype, shape), name
        assert np.array_equal(a[name][2], data), f"{name}: data differs"
    return {name: qtype for name, (qtype, _, _) in b.items()}


def test_gpt2_tokenizer_is_gpt2s():
    tok = gpt2_tokenizer()
    assert tok("Hello world, how are you?")["input_ids"] == [15496, 995, 11, 703, 389, 345, 30]
    assert len(tok) == 50257 and tok.eos_token == tok.bos_token == tok.unk_token == EOS
    assert tok.eos_token_id == 50256 and tok.pad_token is None
    assert tok(f"Hello{EOS}")["input_ids"] == [15496, 50256]
    assert tok.decode(tok("  two spaces\nand a line")["input_ids"]) == "  two spaces\nand a line"
    assert gpt2_tokenizer() is not tok  # each caller gets its own


def test_converter_recognises_the_tokenizer_as_gpt2(files):
    # the converter hashes its tokenization of a probe text and refuses a hash it does not know
    reader = _read(files["ref"])
    assert reader.fields[gguf.Keys.Tokenizer.PRE].contents() == "gpt-2"


def test_f16_export_equals_the_converters(files):
    types = _assert_same_tensors(files["ours"], files["ref"])
    assert "output.weight" not in types  # GPT-2 ties its head to token_embd
    assert types["position_embd.weight"] == "F32" and types["token_embd.weight"] == "F16"
    data_bytes = sum(int(t.n_bytes) for t in _read(files["ours"]).tensors)
    assert data_bytes == expected_tensor_bytes(GPT2Config(**CONFIG), kind="model")

    ours, ref = _metadata(_read(files["ours"])), _metadata(_read(files["ref"]))
    assert sorted(ours) == sorted(ref)
    differ = sorted(k for k in ref if ours[k] != ref[k])
    assert differ == sorted(DELIBERATE), {k: (ours[k], ref[k]) for k in differ if k not in DELIBERATE}
    for key in ("tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id"):
        assert ours[key][1] == 50256
    assert ours[gguf.Keys.General.QUANTIZATION_VERSION][1] == gguf.GGML_QUANT_VERSION


def test_q4_k_m_equals_llama_cpps_quantization_of_the_converters_file(files):
    types = _assert_same_tensors(files["ours_q"], files["ref_q"])
    # the embeddings double as the output head, which llama.cpp keeps at Q6_K
    assert types["token_embd.weight"] == "Q6_K"
    assert {t for n, t in types.items() if n.endswith(".weight") and "norm" not in n} >= {"Q4_K", "Q6_K"}
    summary = read_gguf_summary(files["ours_q"])
    assert summary["file_type_name"] == "MOSTLY_Q4_K_M" and summary["warnings"] == []


def test_an_untied_head_is_written_as_output_weight(tmp_path):
    model = _gpt2(n_embd=64, tie_word_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    path = write_model_gguf(model, _tokenizer(), tmp_path / "untied.gguf", name="u")
    t = {x.name: x for x in gguf.GGUFReader(path).tensors}
    assert t["output.weight"].tensor_type.name == "F16"
    assert sum(int(x.n_bytes) for x in t.values()) == expected_tensor_bytes(model.config, kind="model")
    assert np.array_equal(np.asarray(t["output.weight"].data), model.lm_head.weight.detach().half().numpy())


def test_a_q4_k_m_file_without_k_quants_says_so(tmp_path, caplog):
    # width 64: only ffn_down's rows (4 x 64) suit a k-quant (it gets Q6_K); no matrix can get Q4_K
    path = write_model_gguf(_gpt2(n_embd=64, n_layer=1), _tokenizer(), tmp_path / "narrow.gguf", name="n")
    with caplog.at_level("WARNING", logger="meetara.export"):
        q = quantize(path, tmp_path / "model-Q4_K_M.gguf")
    summary = read_gguf_summary(q)
    assert summary["file_type_name"] == "MOSTLY_Q4_K_M" and "Q4_K" not in summary["tensor_types"]
    assert "holds no Q4_K tensor" in summary["warnings"][0]
    logged = [r.getMessage() for r in caplog.records if r.name == "meetara.export"]
    assert logged == summary["warnings"]
