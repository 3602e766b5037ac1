"""How alike two domains are, for warm starts: a new domain's LoRA can start from the adapter of the
most similar domain already trained (train/pipeline.py), and a job can order its domains so that
each one has a similar domain trained before it (`similarity_chain`).

The measure is the cosine between TF-IDF vectors of each domain's registry text: description,
topics, advice and vocabulary (counted twice: a domain's defining words), plus its category's
description (also twice). The registry keeps vocabularies mostly distinct across domains, so the
domain's own words alone leave most pairs near 0 and neighbours by chance (fitness's nearest was
team_leadership, by "strength"); the category is the registry's curated grouping and pulls a
domain's own category together, while strong cross-category overlaps still win (hr_management's
nearest is career_guidance, in education). IDF is over the registry, so words every domain uses
weigh little. The generated training data is drawn from these same fields plus templates shared by
all domains (train/data.py), so its word distribution would add nothing but the shared template
words, which raise every pair alike. Deterministic, offline, no model.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from train.domains import Domain, Registry, load_registry

_WORD = re.compile(r"[a-z]+")
_STOP = (
    "a about after all also an and any are as at be before by can each every for from get gets how if in "
    "into is it its keep make more most not of on once one or out over so than that the their them then "
    "they this through to up use what when where which while who with without you your"
)
STOPWORDS = frozenset(_STOP.split())


def _stem(word: str) -> str:
    """A light plural fold (habits -> habit, stories -> story) so forms of a word count once."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def words(d: Domain, registry: Registry) -> Counter:
    """Term counts of a domain's text: description, topics, advice, vocabulary x2, category x2."""
    cat = registry.categories[d.category].description if d.category in registry.categories else d.category
    text = " ".join([d.description, *d.topics, *d.advice, *d.vocabulary, *d.vocabulary, cat, cat])
    return Counter(_stem(w) for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in STOPWORDS)


_CACHE: dict[int, tuple[Registry, dict[str, float], dict[str, tuple[Domain, dict[str, float]]]]] = {}


def _vector(d: Domain, registry: Registry) -> dict[str, float]:
    """The domain's unit TF-IDF vector (cached per registry object and domain)."""
    if id(registry) not in _CACHE or _CACHE[id(registry)][0] is not registry:
        df: Counter = Counter()
        for x in registry.domains:
            df.update(set(words(x, registry)))
        n = len(registry.domains)
        _CACHE[id(registry)] = (registry, {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}, {})
    _, idf, vectors = _CACHE[id(registry)]
    hit = vectors.get(d.name)
    if hit is not None and (hit[0] is d or hit[0] == d):
        return hit[1]
    unseen = math.log(1 + len(registry.domains)) + 1  # a word no registry domain uses
    vec = {w: c * idf.get(w, unseen) for w, c in words(d, registry).items()}
    norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
    vec = {w: v / norm for w, v in vec.items()}
    vectors[d.name] = (d, vec)
    return vec


def similarity(a: Domain, b: Domain, registry: Registry | None = None) -> float:
    """Cosine similarity in [0, 1] of the two domains' TF-IDF vectors; symmetric, 1.0 for a domain
    with itself. IDF comes from `registry` (the bundled one by default)."""
    registry = registry or load_registry()
    va, vb = _vector(a, registry), _vector(b, registry)
    if len(vb) < len(va):
        va, vb = vb, va
    return round(sum(v * vb.get(w, 0.0) for w, v in va.items()), 6)


def most_similar(
    domain: Domain, candidates: Iterable[Domain], registry: Registry | None = None
) -> tuple[str, float] | None:
    """The candidate most like `domain` (never `domain` itself) and its score; None if there is none.
    Ties go to the candidate named first."""
    best: tuple[str, float] | None = None
    for c in candidates:
        if c.name == domain.name:
            continue
        s = similarity(domain, c, registry)
        if best is None or s > best[1]:
            best = (c.name, s)
    return best


def similarity_chain(names: Sequence[str], registry: Registry | None = None) -> list[str]:
    """`names` reordered greedily: start with the first, then each time the remaining domain most
    similar to any domain already placed (so every domain after the first has a similar domain
    trained before it in the same job). A permutation of `names`; deterministic."""
    registry = registry or load_registry()
    remaining = list(dict.fromkeys(names))
    if not remaining:
        return []
    chain = [remaining.pop(0)]
    # best[x]: the highest similarity of remaining x to any placed domain
    best = {x: similarity(registry.get(chain[0]), registry.get(x), registry) for x in remaining}
    while remaining:
        nxt = max(remaining, key=lambda x: (best[x], -remaining.index(x)))
        remaining.remove(nxt)
        chain.append(nxt)
        for x in remaining:
            best[x] = max(best[x], similarity(registry.get(nxt), registry.get(x), registry))
    return chain
