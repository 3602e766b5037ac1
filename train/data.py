"""Conversation data per domain: a seeded generator, user-supplied JSONL, a quality filter, a split.

User data may hold earlier turns of a conversation in a prompt, joined with a literal `<|endoftext|>`
(DialoGPT's convention, `TURN_SEPARATOR`): training and validation read it as the turn separator, the
model's end-of-text token (`model.text_ids`), not as text; the quality filter does not count it as a word.

The generator composes conversations from the registry's topics, advice and vocabulary. Like a real
synthetic-data generator it sometimes fails (repetition loops, truncation, off-topic drift, repeats);
it does so at a fixed, seeded rate (`noise`) so the quality filter's acceptance rate is a real
measurement of a real filter, reported per domain.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from train import BadInput
from train.domains import Domain

QUESTIONS = [
    "how can i get better at {topic}?",
    "what should i know about {topic}?",
    "i keep struggling with {topic}. any tips?",
    "can you explain {topic} in simple terms?",
    "what is a good first step with {topic}?",
    "what are common mistakes people make with {topic}?",
    "how do i make a plan for {topic}?",
    "is there a simple routine for {topic}?",
    "my friend asked me about {topic}. what would you tell them?",
    "where do i start if i am new to {topic}?",
    "what matters most when it comes to {topic}?",
    "could you give me practical advice on {topic}?",
]
OPENERS = [
    "good question.",
    "here is a practical way to think about it.",
    "happy to help with that.",
    "a few things make the biggest difference.",
    "let us keep it simple.",
    "this comes up a lot.",
]
CLOSINGS = [
    "keep an eye on {a} and {b} as you go.",
    "it helps to understand {a} before you worry about {b}.",
    "write down what you learn about {a} and {b} each week.",
    "start small with {a}, then add {b} once it feels natural.",
    "if you are unsure, ask someone you trust about {a} and {b}.",
    "small steady changes in {a} usually beat big changes in {b}.",
]
OFF_TOPIC = [
    "that is an interesting thought. many people wonder about things like that from time to time.",
    "it depends on a lot of things, and everyone is different, so there is no single answer here.",
    "thanks for asking. let me know if there is anything else on your mind today.",
]

NOISE_KINDS = ("repetition", "truncated", "off_topic", "empty")
TURN_SEPARATOR = "<|endoftext|>"  # GPT-2's end-of-text token, as text: DialoGPT's turn separator


@dataclass(frozen=True)
class Sample:
    prompt: str
    response: str


@dataclass
class QualityReport:
    total: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {
            "total": self.total,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "rejected": dict(sorted(self.rejected.items())),
        }


def domain_seed(name: str, seed: int) -> int:
    """A stable per-domain seed (Python's `hash` is salted per process, so it cannot be used)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big")


def generate(domain: Domain, n: int, seed: int = 0, noise: float = 0.1) -> list[Sample]:
    """Generate `n` conversations for `domain`, deterministically for a given seed."""
    rng = random.Random(domain_seed(domain.name, seed))
    out: list[Sample] = []
    for _ in range(n):
        topic = rng.choice(domain.topics)
        prompt = rng.choice(QUESTIONS).format(topic=topic)
        advice = rng.sample(domain.advice, 2)
        a, b = rng.sample(domain.vocabulary, 2)
        response = " ".join(
            [rng.choice(OPENERS), advice[0] + ".", advice[1] + ".", rng.choice(CLOSINGS).format(a=a, b=b)]
        )
        if rng.random() < noise:
            kind = rng.choice(NOISE_KINDS)
            if kind == "repetition":
                response = " ".join([advice[0]] * 4)
            elif kind == "truncated":
                response = " ".join(response.split()[:4])
            elif kind == "off_topic":
                response = rng.choice(OFF_TOPIC)
            else:
                response = "  "
        out.append(Sample(prompt, response))
    return out


def load_jsonl(path: Path) -> list[Sample]:
    """Read user data: one JSON object per line, `{"prompt", "response"}` or chat `{"messages": [...]}`
    (each user turn followed by an assistant turn becomes a sample). Errors name the file and line."""
    samples: list[Sample] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read: {e}") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{where}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise BadInput(f"{where}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise BadInput(f"{where}: expected a JSON object")
        if "messages" in obj:
            samples.extend(_from_messages(obj["messages"], where))
        elif "prompt" in obj and "response" in obj:
            if not isinstance(obj["prompt"], str) or not isinstance(obj["response"], str):
                raise BadInput(f"{where}: 'prompt' and 'response' must be strings")
            samples.append(Sample(obj["prompt"], obj["response"]))
        else:
            raise BadInput(f"{where}: expected keys 'prompt' and 'response', or 'messages'")
    if not samples:
        raise BadInput(f"{path}: no samples")
    return samples


def _from_messages(messages: object, where: str) -> list[Sample]:
    if not isinstance(messages, list) or not messages:
        raise BadInput(f"{where}: 'messages' must be a non-empty list")
    turns = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadInput(f"{where}: message {i} needs string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise BadInput(f"{where}: message {i} has unknown role {m['role']!r}")
        turns.append((m["role"], m["content"]))
    pairs = [
        Sample(u[1], a[1])
        for u, a in zip(turns, turns[1:], strict=False)
        if u[0] == "user" and a[0] == "assistant"
    ]
    if not pairs:
        raise BadInput(f"{where}: no user turn followed by an assistant turn")
    return pairs


_WORD = re.compile(r"[a-z0-9']+")


def reject_reason(s: Sample, vocabulary: set[str], min_words: int = 6, max_words: int = 200) -> str | None:
    """Why a sample fails the quality filter, or None if it passes (duplicates are checked by `filter`).
    Turn separators (`TURN_SEPARATOR`) are neither text nor words."""
    prompt, response = (x.replace(TURN_SEPARATOR, " ") for x in (s.prompt, s.response))
    if not prompt.strip() or not response.strip():
        return "empty"
    words = _WORD.findall(response.lower())
    if len(words) < min_words:
        return "too_short"
    if len(words) > max_words or len(_WORD.findall(prompt.lower())) > max_words:
        return "too_long"
    trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
    if trigrams and max(trigrams.values()) > 2 or len(set(words)) < 0.4 * len(words):
        return "repetition"
    if vocabulary and not vocabulary.intersection(words):
        return "off_topic"  # the answer itself must be about the domain, not only the question
    return None


def quality_filter(samples: list[Sample], domain: Domain) -> tuple[list[Sample], QualityReport]:
    """Keep samples that pass every check; report counts per rejection reason."""
    vocab = set(domain.vocabulary) | {w for t in domain.topics for w in _WORD.findall(t) if len(w) > 3}
    seen: set[str] = set()
    kept: list[Sample] = []
    report = QualityReport(total=len(samples))
    for s in samples:
        reason = reject_reason(s, vocab)
        key = " ".join(f"{s.prompt}\n{s.response}".lower().split())
        if reason is None and key in seen:
            reason = "duplicate"
        if reason:
            report.rejected[reason] += 1
            continue
        seen.add(key)
        kept.append(s)
    report.accepted = len(kept)
    return kept, report


def split(
    samples: list[Sample], heldout: float = 0.1, seed: int = 0, min_heldout: int = 4
) -> tuple[list, list]:
    """Deterministic train / held-out split."""
    if len(samples) < 2 * min_heldout:
        raise BadInput(f"too few usable samples ({len(samples)}) to split into train and held-out sets")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    k = max(min_heldout, round(len(samples) * heldout))
    held = [samples[i] for i in sorted(order[:k])]
    train = [samples[i] for i in sorted(order[k:])]
    return train, held


def domain_data(
    domain: Domain, *, n: int, seed: int, data_dir: Path | None = None, noise: float = 0.1
) -> tuple[list[Sample], list[Sample], QualityReport, str]:
    """Samples for one domain (user JSONL if `data_dir/<name>.jsonl` exists, else generated), filtered and
    split. Returns (train, held-out, report, source)."""
    path = data_dir / f"{domain.name}.jsonl" if data_dir else None
    if path is not None and path.exists():
        raw, source = load_jsonl(path), str(path)
    else:
        raw, source = generate(domain, n, seed, noise), "generated"
    kept, report = quality_filter(raw, domain)
    train, held = split(kept, seed=domain_seed(domain.name, seed))
    return train, held, report, source
