"""GPT-2's real tokenizer (50,257 tokens, 50,000 merges), built offline from a packaged vocab GGUF.

`data/ggml-vocab-gpt-2.gguf` is the vocabulary-only GGUF that llama.cpp ships in its `models/` folder
(MIT licence, Copyright (c) 2023 Georgi Gerganov). Its `tokenizer.ggml.tokens` are GPT-2's byte-level
token strings by id and its `tokenizer.ggml.merges` GPT-2's BPE merges in rank order, so a `tokenizers`
BPE with a ByteLevel pre-tokenizer (no prefix space) rebuilt from them tokenizes exactly as GPT-2 (and
DialoGPT) does, and llama.cpp's converter recognises its pre-tokenizer as `gpt-2`.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
VOCAB_SIZE = 50257
_VOCAB_FILE = "ggml-vocab-gpt-2.gguf"


@functools.cache
def _vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges) read once per process from the packaged GGUF."""
    import gguf

    with resources.as_file(resources.files("train") / "data" / _VOCAB_FILE) as path:
        reader = gguf.GGUFReader(path)
        tokens = reader.fields[gguf.Keys.Tokenizer.LIST].contents()
        merges = reader.fields[gguf.Keys.Tokenizer.MERGES].contents()
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(tokens) != VOCAB_SIZE or len(vocab) != VOCAB_SIZE or vocab.get(EOS) != VOCAB_SIZE - 1:
        raise ValueError(f"{_VOCAB_FILE} is not GPT-2's vocabulary ({len(tokens)} tokens)")
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise ValueError(f"{_VOCAB_FILE}: malformed merge {merge!r}")
        pairs.append((left, right))
    return vocab, pairs


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh transformers fast tokenizer equal to GPT-2's: byte-level BPE, no prefix space, and
    `<|endoftext|>` (id 50256) as its special bos/eos/unk token. No padding token is set.

    The vocabulary is parsed once per process (about 2 s); each call then builds a new tokenizer
    (a fraction of a second), so callers may change theirs (e.g. set a pad token) without sharing it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _vocab()
    bpe = models.BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
    )
