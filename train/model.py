"""Base models: `tiny` (offline, built from a config), `random:NAME` (offline: a known GPT-2-family
architecture with seeded random weights and GPT-2's real tokenizer, for benchmarks, dry runs and tests
at the real shape), or a Hugging Face name such as `microsoft/DialoGPT-medium` (downloaded by
transformers where the network is, i.e. on the GPU box).

`tiny` is the GPT-2 architecture at toy size with a ByteLevel BPE tokenizer trained locally on the
generated corpus of every domain, then briefly pretrained on that mixed corpus so that it is a
language model a LoRA adapter can specialise. It is built once and cached on disk; nothing is
downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.domains import Registry

TINY = "tiny"
EOS = "<|endoftext|>"
# n_embd=256 keeps every matrix row a multiple of 256, so Q4_K_M applies k-quants to all of them;
# a 2x (not GPT-2's 4x) MLP halves the cost of a step, which on 2 CPU cores is compute-bound.
TINY_CONFIG = {
    "n_embd": 256,
    "n_inner": 512,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 256,
    "vocab_size": 2048,
}
TINY_PRETRAIN = {"steps": 120, "batch": 16, "lr": 3e-3, "samples_per_domain": 60, "seed": 1234}
TINY_VERSION = 1

RANDOM = "random:"
RANDOM_SEED = 0
# (n_layer, n_embd, n_head) of the GPT-2-family models `random:NAME` builds; all have GPT-2's 50,257
# tokens, 1,024 positions and a 4x MLP (the shapes of their Hugging Face configs)
GPT2_SHAPES: dict[str, tuple[int, int, int]] = {
    "gpt2": (12, 768, 12),
    "distilgpt2": (6, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
    "microsoft/DialoGPT-small": (12, 768, 12),
    "microsoft/DialoGPT-medium": (24, 1024, 16),
    "microsoft/DialoGPT-large": (36, 1280, 20),
}


@dataclass
class Base:
    """A loaded base model: transformers model and tokenizer, and where they came from."""

    name: str
    model: Any  # transformers GPT2LMHeadModel
    tokenizer: Any  # PreTrainedTokenizerFast
    source: str

    @property
    def config(self) -> Any:
        return self.model.config


def quiet_transformers() -> None:
    """Keep transformers' per-load progress bars and notices out of our progress output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cache_dir() -> Path:
    return Path(os.environ.get("MEETARA_CACHE", Path.home() / ".cache" / "meetara"))


def load_base(name: str, registry: Registry, *, dtype: Any = None, device: str = "cpu") -> Base:
    """Load `tiny` (built and cached on first use) or a transformers model by name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    quiet_transformers()
    if name.startswith(RANDOM):
        model, tok = random_base(name)
        model = model.to(dtype or torch.float32)
        source = f"{name} (seed {RANDOM_SEED}, GPT-2's tokenizer)"
    elif name == TINY:
        path = ensure_tiny(registry)
        tok = PreTrainedTokenizerFast(
            tokenizer_file=str(path / "tokenizer.json"),
            eos_token=EOS,
            bos_token=EOS,
            unk_token=EOS,
            pad_token=EOS,
        )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        source = str(path)
    else:
        tok = AutoTokenizer.from_pretrained(name)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32)
        source = f"hf:{name}"
    if model.config.model_type != "gpt2":
        raise ValueError(
            f"base model {name!r} is {model.config.model_type}, but only GPT-2 models are supported"
        )
    model.to(device)
    return Base(name, model, tok, source)


def random_config(name: str) -> Any:
    """The GPT2Config of `random:NAME`; `BadInput` names the known architectures otherwise."""
    from transformers import GPT2Config

    from train import BadInput
    from train.gpt2_vocab import VOCAB_SIZE

    arch = name.removeprefix(RANDOM)
    if arch not in GPT2_SHAPES:
        known = ", ".join(RANDOM + k for k in GPT2_SHAPES)
        raise BadInput(f"unknown architecture in base model {name!r}; known: {known}")
    n_layer, n_embd, n_head = GPT2_SHAPES[arch]
    eos = VOCAB_SIZE - 1  # <|endoftext|>, as in GPT-2's config
    return GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=1024,
        n_ctx=1024,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos,
        eos_token_id=eos,
    )


def random_base(name: str) -> tuple[Any, Any]:
    """(model, tokenizer) of `random:NAME`: that architecture with weights drawn from transformers' own
    initialisation under a fixed seed (the same on every machine), and GPT-2's real byte-level BPE
    tokenizer (train/gpt2_vocab.py). Nothing is downloaded. Its outputs are noise: it exists to measure
    and test every stage at the real shape."""
    import torch
    from transformers import GPT2LMHeadModel

    from train.gpt2_vocab import gpt2_tokenizer

    config = random_config(name)
    tok = gpt2_tokenizer()
    tok.pad_token = tok.eos_token  # as load_base does for Hugging Face GPT-2 tokenizers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = GPT2LMHeadModel(config)
    model.eval()
    return model, tok


def tiny_key(registry: Registry) -> str:
    """The cache key of the tiny base model built for this registry."""
    blob = json.dumps(
        {
            "config": TINY_CONFIG,
            "pretrain": TINY_PRETRAIN,
            "v": TINY_VERSION,
            "domains": [d.model_dump() for d in registry.domains],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_tiny(registry: Registry) -> Path:
    """Build the tiny base model into the cache unless it is there; returns its folder."""
    final = cache_dir() / f"tiny-{tiny_key(registry)}"
    if (final / "model.safetensors").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tiny-build-"))
    try:
        _build_tiny(registry, tmp)
        try:
            os.rename(tmp, final)  # atomic; another process may have won the race, which is fine
        except OSError:
            if not (final / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_tiny(registry: Registry, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from train.data import generate, quality_filter

    p = TINY_PRETRAIN
    texts = []
    for d in registry.domains:
        kept, _ = quality_filter(generate(d, p["samples_per_domain"], seed=p["seed"]), d)
        texts += [f"{s.prompt}{EOS}{s.response}{EOS}" for s in kept]
    # the tokenizer also sees the registry's own text, so every domain's vocabulary gets merges
    corpus = texts + [
        " ".join(d.vocabulary + d.topics + d.advice + [d.description]) for d in registry.domains
    ]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_CONFIG["vocab_size"],
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(out / "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )

    cfg = GPT2Config(
        **{**TINY_CONFIG, "vocab_size": tok.get_vocab_size()},
        bos_token_id=0,
        eos_token_id=0,
        n_ctx=TINY_CONFIG["n_positions"],
    )
    torch.manual_seed(p["seed"])
    model = GPT2LMHeadModel(cfg)
    ids = [hf_tok(t)["input_ids"][: cfg.n_positions] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"])
    g = torch.Generator().manual_seed(p["seed"])
    model.train()
    for _ in range(p["steps"]):
        batch = [ids[i] for i in torch.randint(len(ids), (p["batch"],), generator=g).tolist()]
        loss = lm_loss(model, batch, pad_id=hf_tok.pad_token_id)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)


def collate(batch: list[list[int]], pad_id: int) -> dict:
    """Right-pad a batch; padded positions are masked out of attention and loss."""
    import torch

    n = max(len(x) for x in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_loss(model: Any, batch: list[list[int]], pad_id: int) -> Any:
    """Mean next-token loss of a batch of token-id lists (no KV cache: nothing is generated)."""
    dev = next(model.parameters()).device
    return model(**{k: v.to(dev) for k, v in collate(batch, pad_id).items()}, use_cache=False).loss


def pack(lengths: list[int], max_len: int, seed: int) -> list[list[int]]:
    """Group samples (by index) into rows of at most `max_len` tokens: best fit, samples taken in a
    seeded random order, so the same lengths and seed always give the same rows. Every index lands in
    exactly one row, in no particular order; a sample longer than `max_len` gets a row of its own
    (`encode` already cut samples to `max_len`). O(n * max_len): rows are bucketed by the room left."""
    import random

    order = list(range(len(lengths)))
    random.Random(seed * 7_919 + 17).shuffle(order)
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> rows with exactly that room (a stack)
    for i in order:
        n = lengths[i]
        fit = next((r for r in range(n, max_len + 1) if by_room.get(r)), None)
        if fit is None:
            rows.append([i])
            room = max_len - n
            row = len(rows) - 1
        else:
            row = by_room[fit].pop()
            rows[row].append(i)
            room = fit - n
        if room > 0:
            by_room.setdefault(room, []).append(row)
    return rows


def collate_rows(rows: list[list[list[int]]], pad_id: int, pad_to: int | None = None) -> dict:
    """Tensors for rows that each hold one or more whole samples back to back (packing), then padding.

    `position_ids` restart at 0 with every sample, and the padding tail counts from 0 as well. Given
    `position_ids` and no `attention_mask` (and no KV cache: `use_cache=False`), transformers' GPT-2
    builds a block-diagonal causal mask from the restarts (`masking_utils.find_packed_sequence_indices`),
    so no token attends across a sample boundary. `labels` are -100 at each sample's first token, so
    no token is predicted from the sample before it, and on padding; the loss therefore covers each
    sample's `len - 1` predictions exactly as one sample per padded row would.
    Rows are padded to the longest row, or to `pad_to` (fixed shapes, for torch.compile)."""
    import torch

    width = max([sum(len(s) for s in row) for row in rows] + [pad_to or 0])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s)
            t = torch.tensor(s, dtype=torch.long)
            ids[r, at : at + n] = t
            pos[r, at : at + n] = torch.arange(n)
            labels[r, at + 1 : at + n] = t[1:]
            at += n
        pos[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def text_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, in DialoGPT's turn format: the literal text of the eos token
    (`<|endoftext|>` for GPT-2 models) separates turns and becomes the eos id; every other part is
    plain text (special-token text inside it is not parsed). `llama_check` tokenizes a text for the
    tokenizer check by the same rule on the llama.cpp side (its eos token's text, its eos id), so both
    sides agree on what the separator means however each parses special tokens."""
    sep, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    split = [t.split(sep) if sep else [t] for t in texts]
    pieces = [p for parts in split for p in parts if p]
    encoded = iter(
        tokenizer(pieces, add_special_tokens=False, split_special_tokens=True)["input_ids"] if pieces else []
    )
    out = []
    for parts in split:
        ids: list[int] = []
        for i, p in enumerate(parts):
            if i:
                ids.append(eos_id)
            if p:
                ids += next(encoded)
        out.append(ids)
    return out


def fit_positions(ids: list[int], n_positions: int, reserve: int = 0) -> list[int]:
    """The first `n_positions - reserve` ids (`reserve`: room for tokens generated after them). GPT-2's
    positions are learned: a longer sequence has no position embedding past the end (an IndexError in
    transformers, a read past `position_embd` in llama.cpp). Cut at the end, as `encode` cuts samples."""
    return ids[: max(0, n_positions - reserve)]


def encode(samples: list, tokenizer: Any, max_len: int) -> list[list[int]]:
    """Token ids of `prompt<eos>response<eos>` per sample (DialoGPT's turn format, `text_ids`: a literal
    `<|endoftext|>` inside a prompt or response is a turn separator too), cut to `max_len`."""
    eos = tokenizer.eos_token
    texts = [f"{s.prompt}{eos}{s.response}{eos}" for s in samples]
    return [x[:max_len] for x in text_ids(tokenizer, texts)]
