"""Domain registry, data generator, quality filter, user JSONL, split."""

from __future__ import annotations

import json

import pytest

from train import BadInput
from train.data import Sample, domain_data, generate, load_jsonl, quality_filter, split
from train.domains import load_registry, select_domains


def test_registry_has_the_62_domains_in_7_categories():
    reg = load_registry()
    assert len(reg.domains) == 62
    counts = {c: sum(d.category == c for d in reg.domains) for c in reg.categories}
    assert counts == {
        "healthcare": 12,
        "daily_life": 12,
        "business": 12,
        "education": 8,
        "creative": 8,
        "technology": 6,
        "specialized": 4,
    }


def test_selection():
    assert [d.name for d in select_domains("all")] == load_registry().names
    assert len(select_domains("technology")) == 6
    names = [d.name for d in select_domains("legal, healthcare,nutrition")]
    assert names[0] == "legal" and len(names) == 13 and names.count("nutrition") == 1


@pytest.mark.parametrize(
    ("bad", "hint"), [("helthcare", "healthcare"), ("legl", "legal"), ("zzzzzz", "meetara domains")]
)
def test_unknown_domain_names_the_closest(bad, hint):
    with pytest.raises(BadInput) as e:
        select_domains(f"legal,{bad}")
    assert f"unknown domain {bad!r}" in str(e.value) and hint in str(e.value)
    assert "\n" not in str(e.value)


def test_invalid_registry_is_a_one_line_error(tmp_path):
    bad = tmp_path / "domains.yaml"
    bad.write_text("version: 1\ncategories: {a: {description: x}}\ndomains:\n  - name: x\n    category: b\n")
    with pytest.raises(BadInput, match="invalid domain registry"):
        load_registry(bad)


def test_generator_is_deterministic_and_seeded():
    d = load_registry().get("nutrition")
    assert generate(d, 50, seed=1) == generate(d, 50, seed=1)
    assert generate(d, 50, seed=1) != generate(d, 50, seed=2)


def test_every_domain_meets_the_acceptance_target():
    for d in load_registry().domains:
        _, _, report, source = domain_data(d, n=200, seed=0)
        assert source == "generated"
        assert report.total == 200 and report.acceptance_rate >= 0.8, (d.name, report.as_dict())


def test_quality_filter_rejects_each_defect():
    d = load_registry().get("nutrition")
    good = Sample(
        "how much protein do i need?", "spread your protein across meals and add fiber from vegetables daily."
    )
    samples = [
        good,
        good,  # duplicate
        Sample("", "protein matters"),
        Sample("question?", "too short"),
        Sample("question?", " ".join(["eat more protein now"] * 5)),
        Sample(
            "what about protein?", "that is an interesting thought and many people wonder about it every day."
        ),
        Sample("long?", "protein " + "word " * 300),
    ]
    kept, report = quality_filter(samples, d)
    assert kept == [good]
    assert report.rejected == {
        "duplicate": 1,
        "empty": 1,
        "too_short": 1,
        "repetition": 1,
        "off_topic": 1,
        "too_long": 1,
    }


def test_user_jsonl_both_formats(tmp_path):
    f = tmp_path / "nutrition.jsonl"
    f.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "p1", "response": "r1"}),
                "",
                json.dumps(
                    {
                        "messages": [
                            {"role": "system", "content": "s"},
                            {"role": "user", "content": "u1"},
                            {"role": "assistant", "content": "a1"},
                            {"role": "user", "content": "u2"},
                            {"role": "assistant", "content": "a2"},
                        ]
                    }
                ),
            ]
        )
    )
    assert load_jsonl(f) == [Sample("p1", "r1"), Sample("u1", "a1"), Sample("u2", "a2")]


@pytest.mark.parametrize(
    ("line", "msg"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "x"}', "expected keys"),
        ('{"prompt": 1, "response": "x"}', "must be strings"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no user turn followed"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, msg):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + line + "\n")
    with pytest.raises(BadInput) as e:
        load_jsonl(f)
    assert str(e.value).startswith(f"{f}:2: ") and msg in str(e.value)


def test_split_is_deterministic_and_disjoint():
    samples = [Sample(f"p{i}", f"r{i}") for i in range(100)]
    train, held = split(samples, heldout=0.1, seed=3)
    assert (train, held) == split(samples, heldout=0.1, seed=3)
    assert len(held) == 10 and not set(train) & set(held) and len(train) + len(held) == 100
    with pytest.raises(BadInput, match="too few"):
        split(samples[:5])


def test_deeply_nested_jsonl_is_one_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "response": "x"}\n')
    with pytest.raises(BadInput, match=r"deep.jsonl:1: JSON nested too deeply"):
        load_jsonl(path)
