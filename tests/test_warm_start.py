"""Warm starts: domain similarity, the similarity chain, and `python -m train --warm-start`, which starts a
domain's LoRA from the most similar domain already done in the run and says so in the manifest."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import run_cli
from test_train import FAST, adapter_tensors

from train.domains import load_registry
from train.similarity import most_similar, profile, similarity, similarity_chain

REG = load_registry()


def sim(a: str, b: str) -> float:
    return similarity(REG.get(a), REG.get(b), REG)


def test_similarity_is_symmetric_bounded_and_one_with_itself():
    for a in REG.domains:
        assert similarity(a, a, REG) == pytest.approx(1.0)
        for b in REG.domains:
            s = similarity(a, b, REG)
            assert 0.0 <= s <= 1.0 + 1e-9
            assert s == similarity(b, a, REG)


@pytest.mark.parametrize(
    "domain, closer, farther",
    [
        ("nutrition", "fitness", "programming"),
        ("nutrition", "general_health", "programming"),
        ("nutrition", "general_health", "storytelling"),
        ("programming", "software_development", "nutrition"),
        ("mental_health", "stress_management", "cybersecurity"),
        ("legal", "legal_business", "music"),
    ],
)
def test_related_domains_rank_above_unrelated(domain, closer, farther):
    assert sim(domain, closer) > sim(domain, farther)


@pytest.mark.parametrize(
    "domain, nearest",
    [
        ("cybersecurity", "tech_support"),
        ("programming", "software_development"),
        ("mental_health", "stress_management"),
        ("hr_management", "career_guidance"),  # across categories (business -> education)
        ("content_creation", "social_media"),
    ],
)
def test_most_similar(domain, nearest):
    assert most_similar(REG.get(domain), REG.domains, REG)[0] == nearest
    assert most_similar(REG.get(domain), [REG.get(domain)], REG) is None  # never itself


def test_data_profiles_can_outweigh_the_registry():
    """Your own data counts: nutrition's data here is about code, so its nearest done domain is
    programming, not fitness as the registry alone says."""
    code = ["refactor the function and add a unit test", "the compiler rejects this generic type"]
    sport = ["squats and deadlifts build strength", "warm up before a run, then stretch"]
    profiles = {"nutrition": profile(code * 3), "programming": profile(code * 2), "fitness": profile(sport)}
    cands = [REG.get("programming"), REG.get("fitness")]
    assert most_similar(REG.get("nutrition"), cands, REG)[0] == "fitness"
    assert most_similar(REG.get("nutrition"), cands, REG, profiles)[0] == "programming"
    # without a profile of its own a domain is scored on the registry alone
    assert (
        most_similar(REG.get("nutrition"), cands, REG, {"programming": profiles["programming"]})[0]
        == "fitness"
    )
    # a profile: the most frequent terms, plural-folded, stopwords dropped, ties alphabetical
    assert profile(["the betas and alpha alpha", "gamma beta alpha"], top=2) == {"alpha": 3, "beta": 2}
    assert profile(["gamma beta", "beta gamma"], top=1) == {"beta": 2}


def test_similarity_chain_is_a_permutation_starting_at_the_first_name():
    names = REG.names[::-1]
    chain = similarity_chain(names, REG)
    assert chain[0] == names[0] and sorted(chain) == sorted(names)
    assert similarity_chain(names, REG) == chain  # deterministic
    assert similarity_chain(["legal"], REG) == ["legal"] and similarity_chain([], REG) == []
    # greedy: each next domain is the remaining one most similar to any domain placed before it
    for i in range(1, len(chain)):
        best = max(max(sim(p, x) for p in chain[:i]) for x in chain[i:])
        assert max(sim(p, chain[i]) for p in chain[:i]) == best


def manifest(root, domain: str, run: str = "default") -> dict:
    return json.loads((root / f"runs/{run}/domains/{domain}/manifest.json").read_text())


def test_train_with_warm_start_records_the_source_and_validates(tmp_path):
    # legal first; fitness next, so fitness warm-starts from legal, the only domain done before it.
    # Warm through the environment, as a launched task turns it on (MEETARA_WARM_START); cold by flag,
    # which wins over the environment
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    for root, flags in ((warm, []), (cold, ["--no-warm-start"])):
        out = run_cli(
            "-d", "legal,fitness", "--store", f"file://{root}", "--no-merged", *FAST, *flags,
            env={"MEETARA_WARM_START": "1"},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout)["counts"] == {"done": 2, "failed": 0, "skipped": 0}

    first, second = manifest(warm, "legal"), manifest(warm, "fitness")
    assert first["warm_start"] is None  # nothing was done before it
    # scored on the registry and on both domains' data profiles (kept in their manifests)
    profiles = {m["domain"]: m["data"]["profile"] for m in (first, second)}
    assert len(profiles["legal"]) == 100 and profiles["legal"] != profiles["fitness"]
    score = most_similar(REG.get("fitness"), [REG.get("legal")], REG, profiles)[1]
    assert second["warm_start"] == {"from": "legal", "similarity": score}
    assert score != sim("fitness", "legal")
    assert second["status"] == "done" and second["validation"]["passed"]
    assert second["metrics"]["heldout_loss_after"] < second["metrics"]["heldout_loss_before"]
    assert manifest(cold, "fitness")["warm_start"] is None

    # the final LoRA weights are in the store under their own key (pulls fetch only `files`)
    for m in (first, second):
        entry = m["warm_start_weights"]
        assert entry["key"] == f"runs/default/domains/{m['domain']}/adapter.safetensors"
        assert hashlib.sha256((warm / entry["key"]).read_bytes()).hexdigest() == entry["sha256"]
        assert set(m["files"]) == {"adapter"}

    # the first domain trains the same either way; the warm-started one ends elsewhere
    def adapter(root, domain):
        return adapter_tensors(root / f"runs/default/domains/{domain}/adapter.gguf")

    a, b = adapter(warm, "legal"), adapter(cold, "legal")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    a, b = adapter(warm, "fitness"), adapter(cold, "fitness")
    assert any(not np.array_equal(a[k], b[k]) for k in a)

    # a domain that resumes from a checkpoint keeps the record of how its training started,
    # even when the rerun has warm starts off: its weights did come from legal
    (warm / "runs/default/domains/fitness/manifest.json").unlink()
    again = run_cli(
        "-d", "legal,fitness", "--store", f"file://{warm}", "--no-merged", *FAST, "--no-warm-start"
    )
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = manifest(warm, "fitness")
    assert resumed["metrics"]["resumed_from_step"] > 0
    assert resumed["warm_start"] == second["warm_start"]


def test_launcher_plans_a_similarity_chain_and_turns_warm_starts_on_in_the_task():
    from launcher.plan import Workload, plan_local
    from launcher.preferences import Preferences
    from launcher.task import render_task

    names = ["programming", "nutrition", "software_development", "fitness", "cybersecurity"]
    prefs = Preferences(max_domains_per_job=3)
    for warm in (False, True):
        plan = plan_local(names, prefs, Workload(warm_start=warm), "ws")
        planned = [d for j in plan.jobs for d in j.domains]
        assert planned == (similarity_chain(names, REG) if warm else names)
        assert [len(j.domains) for j in plan.jobs] == [3, 2]
        task = render_task(
            plan, plan.jobs[0], store="file:///s", endpoint_url=None, prefs=prefs, backend="local"
        )
        assert task["envs"]["MEETARA_WARM_START"] == ("1" if warm else "0")
    # the chain keeps neighbours together: the programming domains share the first job
    assert plan.jobs[0].domains[:2] == ["programming", "software_development"]
