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
weigh little.

Once a domain is trained, its manifest keeps a profile of its training data (the most frequent terms,
`profile`), and a warm start compares profiles too (`most_similar(profiles=...)`): the score becomes
the mean of the registry score and the profiles' cosine, IDF taken over the profiles compared, so
words every domain's data uses (the generator's shared templates) weigh little. That matters for
your own data (`--data-dir`); generated data is drawn from the same registry fields, so for it the
profiles mostly agree with the registry. Deterministic, offline, no model.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

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


def _terms(text: str) -> list[str]:
    return [_stem(w) for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in STOPWORDS]


def profile(texts: Iterable[str], top: int = 100) -> dict[str, int]:
    """A domain's data as its `top` most frequent terms and their counts (ties: alphabetical)."""
    counts = Counter(t for text in texts for t in _terms(text))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top])


def profile_similarity(a: Mapping[str, int], b: Mapping[str, int], idf: Mapping[str, float]) -> float:
    """Cosine in [0, 1] of two profiles, each term weighted by log(1 + count) x its IDF."""

    def vec(p: Mapping[str, int]) -> dict[str, float]:
        v = {w: math.log1p(c) * idf.get(w, 1.0) for w, c in p.items()}
        n = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / n for w, x in v.items()}

    va, vb = vec(a), vec(b)
    return round(sum(x * vb.get(w, 0.0) for w, x in va.items()), 6)


def profile_idf(profiles: Iterable[Mapping[str, int]]) -> dict[str, float]:
    """Smoothed IDF of each term over `profiles`: a term in every profile weighs 1, rarer ones more."""
    ps = list(profiles)
    df = Counter(w for p in ps for w in p)
    return {w: math.log((1 + len(ps)) / (1 + c)) + 1 for w, c in df.items()}


def words(d: Domain, registry: Registry) -> Counter:
    """Term counts of a domain's text: description, topics, advice, vocabulary x2, category x2."""
    cat = registry.categories[d.category].description if d.category in registry.categories else d.category
    text = " ".join([d.description, *d.topics, *d.advice, *d.vocabulary, *d.vocabulary, cat, cat])
    return Counter(_terms(text))


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
    domain: Domain,
    candidates: Iterable[Domain],
    registry: Registry | None = None,
    profiles: Mapping[str, Mapping[str, int]] | None = None,
) -> tuple[str, float] | None:
    """The candidate most like `domain` (never `domain` itself) and its score; None if there is none.
    With `profiles` (domain name -> `profile` of its data), a candidate whose profile is there, as is
    `domain`'s, scores the mean of the registry similarity and the profiles'. Ties go to the candidate
    named first."""
    profiles = profiles or {}
    idf = profile_idf(profiles.values())
    best: tuple[str, float] | None = None
    for c in candidates:
        if c.name == domain.name:
            continue
        s = similarity(domain, c, registry)
        if domain.name in profiles and c.name in profiles:
            s = round((s + profile_similarity(profiles[domain.name], profiles[c.name], idf)) / 2, 6)
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
