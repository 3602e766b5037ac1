"""Validation catches bad GGUF files without crashing the process that validates them."""

from __future__ import annotations

import gguf
import pytest
import torch

from train.domains import load_registry
from train.gguf_export import write_adapter_gguf, write_model_gguf
from train.llama_check import LlamaCheckError, run_llama_check
from train.lora import LoraParams, attach_lora
from train.model import load_base
from train.pipeline import JobSpec
from train.validate import validate_domain

PROMPT = "how do i plan healthy meals for the week?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny base, its f16 GGUF, and a LoRA model with non-zero (random) adapter weights."""
    out = tmp_path_factory.mktemp("gguf")
    base = load_base("tiny", load_registry())
    base_file = write_model_gguf(base.model, base.tokenizer, out / "base.gguf", name="tiny")
    model = attach_lora(base.model, LoraParams())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    adapter = write_adapter_gguf(state, out / "adapter.gguf", alpha=16, base_name="tiny")
    yield base, model, base_file, adapter, state, out
    base.model = model.unload()


def test_a_good_adapter_passes(tiny):
    base, model, base_file, adapter, _, _ = tiny
    report = validate_domain(model, base, {"adapter": adapter}, base_file, PROMPT, JobSpec(domains=["x"]))
    entry = report["files"]["adapter"]
    assert report["passed"], report
    assert entry["size"]["ok"] and entry["header_ok"] and entry["llama_cpp"]["tokenizer_matches"]
    assert entry["llama_cpp"]["max_abs_diff"] < 0.05 < report["adapter_effect_max_abs"]


def _write_swapped(state: dict, path, n_layer: int) -> None:
    """An adapter whose A and B have each other's shapes, as llama.cpp's own converter writes GPT-2 LoRAs."""
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
    for i in range(n_layer):
        a = next(v for k, v in state.items() if f"h.{i}." in k and "lora_A" in k)
        b = next(v for k, v in state.items() if f"h.{i}." in k and "lora_B" in k)
        w.add_tensor(f"blk.{i}.attn_qkv.weight.lora_a", b.T.contiguous().numpy())
        w.add_tensor(f"blk.{i}.attn_qkv.weight.lora_b", a.T.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_wrong_shaped_adapter_fails_in_the_subprocess_not_here(tiny):
    base, model, base_file, _, state, out = tiny
    bad = out / "swapped.gguf"
    _write_swapped(state, bad, base.config.n_layer)
    with pytest.raises(LlamaCheckError) as e:
        run_llama_check(base_file, [1, 2, 3], lora=bad)
    assert "\n" not in str(e.value)
    report = validate_domain(model, base, {"adapter": bad}, base_file, PROMPT, JobSpec(domains=["x"]))
    assert not report["passed"] and report["files"]["adapter"]["llama_cpp"]["loaded"] is False


def test_a_truncated_file_fails_validation(tiny):
    base, model, base_file, adapter, _, out = tiny
    cut = out / "cut.gguf"
    cut.write_bytes(adapter.read_bytes()[:-4000])
    report = validate_domain(model, base, {"adapter": cut}, base_file, PROMPT, JobSpec(domains=["x"]))
    assert not report["passed"]
    entry = report["files"]["adapter"]
    assert entry.get("readable") is False or not entry["size"]["ok"] or not entry["llama_cpp"]["loaded"]


def test_ids_longer_than_the_positions_are_cut_alike_on_both_sides(tiny):
    """Issue 13: a probe, a reference or a held-out sample past the model's 256 positions does not
    raise; transformers and llama.cpp evaluate the same first positions and agree on them."""
    import numpy as np

    from train.lora import heldout_loss
    from train.validate import GENERATE, reference_logits

    base, model, base_file, adapter, _, _ = tiny
    n_pos = base.config.n_positions
    ids = [(7 * i) % 2000 + 1 for i in range(n_pos + 60)]
    ref = reference_logits(model, ids)
    assert ref.shape[0] == n_pos and np.isfinite(ref).all()
    assert np.isfinite(heldout_loss(model, [ids, ids[:20]], base.tokenizer.pad_token_id))
    out = run_llama_check(base_file, ids, lora=adapter, generate=GENERATE)
    assert out["n_tokens"] == n_pos - GENERATE and out["truncated_from"] == len(ids)
    assert np.abs(out["logits"][:, : ref.shape[1]] - ref[: n_pos - GENERATE]).max() < 0.05

    long_prompt = " ".join([PROMPT] * 40)  # ~400 tokens
    report = validate_domain(
        model, base, {"adapter": adapter}, base_file, long_prompt, JobSpec(domains=["x"])
    )
    assert report["probe_prompt_tokens"] > n_pos and report["probe_tokens"] == n_pos - GENERATE
    assert report["passed"], report["files"]["adapter"]["llama_cpp"]
