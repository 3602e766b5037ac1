"""Validation catches bad GGUF files without crashing the process that validates them."""

from __future__ import annotations

import gguf
import pytest
import torch

from train.domains import load_registry
from train.gguf_export import quantize, write_adapter_gguf, write_model_gguf
from train.llama_check import LlamaCheckError, run_llama_check
from train.lora import LoraParams, attach_lora
from train.model import load_base
from train.pipeline import JobSpec
from train.validate import validate_domain

PROMPT = "how do i plan healthy meals for the week?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny base, its f16 and Q4_K_M GGUFs, and a LoRA model with non-zero (random) adapter weights."""
    out = tmp_path_factory.mktemp("gguf")
    base = load_base("tiny", load_registry())
    f16 = write_model_gguf(base.model, base.tokenizer, out / "base.gguf", name="tiny")
    base_file = {"f16": f16, "q4_k_m": quantize(f16, out / "base-Q4_K_M.gguf")}
    model = attach_lora(base.model, LoraParams())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    adapter = write_adapter_gguf(state, out / "adapter.gguf", alpha=16, base_name="tiny", dtype="f16")
    yield base, model, base_file, adapter, state, out
    base.model = model.unload()


def test_a_good_adapter_passes(tiny):
    base, model, base_file, adapter, _, _ = tiny
    report = validate_domain(model, base, {"adapter": adapter}, base_file, PROMPT, JobSpec(domains=["x"]))
    entry = report["files"]["adapter"]
    assert report["passed"], report
    assert entry["size"]["ok"] and entry["header_ok"] and entry["llama_cpp"]["tokenizer_matches"]
    assert entry["summary"]["tensor_types"] == {"F16": 2 * base.config.n_layer}
    # the shipped pair (Q4_K_M base + adapter), and the adapter on the f16 base within the tight bound
    assert entry["llama_cpp"]["adapter_delta_max_rel_diff"] < 0.35
    assert entry["llama_cpp_f16_base"]["max_abs_diff"] < 0.05 < report["adapter_effect_max_abs"]


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
        run_llama_check(base_file["q4_k_m"], [1, 2, 3], lora=bad)
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
    out = run_llama_check(base_file["f16"], ids, lora=adapter, generate=GENERATE)
    assert out["n_tokens"] == n_pos - GENERATE and out["truncated_from"] == len(ids)
    assert np.abs(out["logits"][:, : ref.shape[1]] - ref[: n_pos - GENERATE]).max() < 0.05

    long_prompt = " ".join([PROMPT] * 40)  # ~400 tokens
    report = validate_domain(
        model, base, {"adapter": adapter}, base_file, long_prompt, JobSpec(domains=["x"])
    )
    assert report["probe_prompt_tokens"] > n_pos and report["probe_tokens"] == n_pos - GENERATE
    assert report["passed"], report["files"]["adapter"]["llama_cpp"]


def test_an_adapter_llama_cpp_does_not_apply_fails_on_the_shipped_base(tiny):
    """Issue 14: validation checks the pair users load, the Q4_K_M base + the adapter. An adapter whose
    effect is lost (here: its B zeroed, so llama.cpp adds nothing) fails that check alone, with no f16
    base to catch it: its effect there misses by exactly 1 (the bound is 0.35)."""
    base, model, base_file, _, state, out = tiny
    zero = {k: (v * 0 if "lora_B" in k else v) for k, v in state.items()}
    lost = write_adapter_gguf(zero, out / "lost.gguf", alpha=16, base_name="tiny", dtype="f16")
    only_q4 = {"q4_k_m": base_file["q4_k_m"]}
    report = validate_domain(model, base, {"adapter": lost}, only_q4, PROMPT, JobSpec(domains=["x"]))
    run = report["files"]["adapter"]["llama_cpp"]
    assert not report["passed"] and "llama_cpp_f16_base" not in report["files"]["adapter"]
    assert abs(run["adapter_delta_max_rel_diff"] - 1.0) < 1e-3 and run["base_alone_max_rel_diff"] > 0


def test_one_worker_serves_a_job_and_survives_a_crashing_adapter(tiny):
    """Issue 14 item 4: one llama.cpp child per job loads each base once; adapters are attached and
    detached per request, with the logits of a fresh process; a malformed adapter is refused
    (LlamaCheckError) and the child stays up; a child that crashes (SIGSEGV, as a malformed GGUF can
    make llama.cpp do) takes nothing else down, and the next request starts a new one."""
    import os
    import signal

    import numpy as np

    from train.llama_check import LlamaWorker

    base, model, base_file, adapter, state, out = tiny
    bad = out / "swapped-w.gguf"
    _write_swapped(state, bad, base.config.n_layer)
    ids = [5, 17, 42, 99, 7]
    with LlamaWorker() as w:
        with_lora = w.evaluate(base_file["q4_k_m"], ids, lora=adapter)
        without = w.evaluate(base_file["q4_k_m"], ids)
        again = w.evaluate(base_file["q4_k_m"], ids, lora=adapter)
        fresh = run_llama_check(base_file["q4_k_m"], ids, lora=adapter)
        assert w.starts == 1
        assert np.abs(with_lora["logits"] - without["logits"]).max() > 0.05  # attached, then detached
        assert np.abs(with_lora["logits"] - again["logits"]).max() < 1e-4
        assert np.abs(with_lora["logits"] - fresh["logits"]).max() < 0.01
        assert with_lora["generated"] == fresh["generated"]
        with pytest.raises(LlamaCheckError) as e:
            w.evaluate(base_file["q4_k_m"], ids, lora=bad)
        assert "\n" not in str(e.value) and w.starts == 1
        os.kill(w.proc.pid, signal.SIGSEGV)
        w.proc.wait()
        report = validate_domain(
            model, base, {"adapter": adapter}, base_file, PROMPT, JobSpec(domains=["x"]), worker=w
        )
        assert report["passed"] and w.starts == 2
    assert w.proc is None
