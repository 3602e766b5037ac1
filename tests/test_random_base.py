"""`--base-model random:NAME`: a known GPT-2-family architecture with seeded random weights and GPT-2's
real tokenizer, built offline (no hub, no network) for benchmarks, dry runs and tests at the real shape."""

from __future__ import annotations

import pytest
from conftest import run_cli

from launcher.throughput import MODEL_PARAMS, model_params
from train import BadInput
from train.domains import load_registry
from train.model import GPT2_SHAPES, load_base, random_config

pytestmark = pytest.mark.usefixtures("no_network")


def test_dialogpt_medium_shape_offline_with_gpt2s_tokenizer():
    base = load_base("random:microsoft/DialoGPT-medium", load_registry())
    cfg = base.config
    shape = (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.vocab_size)
    assert shape == (24, 1024, 16, 1024, 50257)
    n = sum(p.numel() for p in base.model.parameters())
    assert n == pytest.approx(MODEL_PARAMS["microsoft/DialoGPT-medium"], rel=0.01)  # the planner's figure
    assert base.tokenizer("Hello world, how are you?")["input_ids"] == [15496, 995, 11, 703, 389, 345, 30]
    assert base.tokenizer.eos_token_id == cfg.eos_token_id == base.tokenizer.pad_token_id == 50256
    assert model_params("random:microsoft/DialoGPT-medium") == MODEL_PARAMS["microsoft/DialoGPT-medium"]


def test_the_weights_are_the_same_on_every_build():
    a = load_base("random:distilgpt2", load_registry()).model.state_dict()
    b = load_base("random:distilgpt2", load_registry()).model.state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert a["transformer.h.0.attn.c_attn.weight"].std() > 0  # drawn, not zeros


@pytest.mark.parametrize("name", sorted(GPT2_SHAPES))
def test_every_known_architecture_has_a_config_the_planner_prices(name):
    cfg = random_config("random:" + name)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == GPT2_SHAPES[name]
    assert model_params("random:" + name) > 0


def test_an_unknown_architecture_is_one_line_naming_the_known_ones(tmp_path):
    with pytest.raises(BadInput, match="known: random:gpt2, "):
        random_config("random:llama-7b")
    r = run_cli("-d", "nutrition", "--base-model", "random:llama-7b", "--store", str(tmp_path / "s"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "unknown architecture in base model 'random:llama-7b'" in lines[0]
