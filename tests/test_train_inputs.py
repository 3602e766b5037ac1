"""Issue 13: inputs users really give `python -m train`, run as they run it.

- DialoGPT-style data, earlier turns joined with a literal `<|endoftext|>`: the separator is the eos
  id on the transformers side and on the llama.cpp side, so the domain trains and validates.
- Prompts longer than the model's positions: training, held-out loss and the validation probe all
  cut to the positions, on both sides.
- A resume whose training parameters changed is refused in one line (exit 2) and loses nothing;
  `--restart-if-changed` is the way out; options that do not change the training state resume.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
from conftest import ROOT, run_cli

from train.data import Sample
from train.domains import load_registry
from train.llama_check import run_llama_check
from train.model import encode, load_base, text_ids

SEP = "<|endoftext|>"
TOPICS = [
    "iron",
    "fiber",
    "protein",
    "calcium",
    "sugar",
    "sodium",
    "breakfast",
    "snacks",
    "grains",
    "legumes",
]
ADVICE = [
    "check labels for hidden sugar and sodium",
    "add legumes to soups and salads for extra fiber",
    "choose whole grains over refined carbohydrates",
    "pair iron rich foods with vitamin c at meals",
    "keep healthy snacks within reach during the day",
]


def _write(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nutrition.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _manifest(store: Path, domain: str = "nutrition") -> dict:
    return json.loads((store / f"runs/default/domains/{domain}/manifest.json").read_text())


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    return lines[0]


# ------------------------------------------------------------------ 1. <|endoftext|> as turn separator
def test_dialogpt_turns_joined_with_endoftext_train_and_validate(tmp_path):
    # the line first, then 39 more of the same shape (identical lines would be duplicates)
    rows = [
        {
            "prompt": f"hi{SEP}hello, how can i help?{SEP}tell me about {TOPICS[i % 10]}"
            + (f" for week {i}" if i else ""),
            "response": ADVICE[i % 5] + (f" in week {i}" if i else ""),
        }
        for i in range(40)
    ]
    assert rows[0]["prompt"] == "hi<|endoftext|>hello, how can i help?<|endoftext|>tell me about iron"
    data = _write(tmp_path / "D", rows)
    store = tmp_path / "st"
    r = run_cli("--domains", "nutrition", "--data-dir", str(data), "--store", f"file://{store}", "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    m = _manifest(store)
    v = m["validation"]
    assert m["status"] == "done" and v["passed"], v
    assert v["files"]["adapter"]["llama_cpp"]["tokenizer_matches"] is True

    # what the separator means: the eos id, between the turns' own tokens, in transformers ...
    tok = load_base("tiny", load_registry()).tokenizer
    plain = {t: tok(t, add_special_tokens=False)["input_ids"] for t in ("hi", "hello, how can i help?")}
    eos = tok.eos_token_id
    first, second = len(plain["hi"]), len(plain["hi"]) + 1 + len(plain["hello, how can i help?"])
    assert v["probe_separators"] == [first, second]  # every prompt opens with the same two turns
    ids = text_ids(tok, [rows[0]["prompt"]])[0]
    assert ids[:first] == plain["hi"] and ids[first] == eos and ids[second] == eos
    assert ids.count(eos) == 2  # the literal's text ("<|", "endoftext", "|>") is nowhere
    # ... in the training ids (prompt <eos> response <eos>) ...
    train_ids = encode([Sample(rows[0]["prompt"], rows[0]["response"])], tok, 128)[0]
    assert train_ids[: len(ids)] == ids and train_ids[len(ids)] == eos and train_ids[-1] == eos
    # ... and in llama.cpp, whose GGUF names the same eos id
    base = store / "runs/default/base/tiny-Q4_K_M.gguf"
    reader = gguf.GGUFReader(base)
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == eos
    assert run_llama_check(base, ids, generate=1, text=rows[0]["prompt"])["tokenize_check"] == ids


# ---------------------------------------------------------- 2. samples longer than the model's positions
def test_prompts_longer_than_the_positions_train_and_validate(tmp_path):
    rng = random.Random(1)
    filler = ["my doctor said that meals should have more balance", "what would you suggest for lunch"]
    words = " ".join(ADVICE + TOPICS + filler).split()
    rows = [
        {
            "prompt": " ".join(rng.choice(words) for _ in range(185)),
            "response": f"{ADVICE[i % 5]} and plan portions for week {i}",
        }
        for i in range(40)
    ]
    data = _write(tmp_path / "D", rows)
    store = tmp_path / "st"
    r = run_cli(
        "--domains", "nutrition", "--data-dir", str(data), "--store", f"file://{store}",
        "--checkpoint-every", "100", "--merged", "-q",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    m = _manifest(store)
    v = m["validation"]
    assert m["status"] == "done" and v["passed"], v
    # the probe was cut to the 256 positions less the 8 generated tokens, on both sides alike
    assert v["probe_prompt_tokens"] > 256 and v["probe_tokens"] == 256 - 8
    for f in ("adapter", "merged_q4_k_m"):
        assert "error" not in v["files"][f]["llama_cpp"] and v["files"][f]["passed"], v["files"][f]
    assert v["files"]["adapter"]["llama_cpp"]["tokenizer_matches"] is True  # on the whole prompt
    assert (
        m["params"]["max_len"] == 128
        and m["metrics"]["heldout_loss_after"] < m["metrics"]["heldout_loss_before"]
    )


# ------------------------------------------------------------------- 3. a resume whose arguments changed
FAST = ["--samples", "80", "--epochs", "3", "--checkpoint-every", "3", "--no-merged"]


def _interrupted(store: str) -> int:
    """Train fitness until step 5, SIGTERM it (exit 75); returns the step of its checkpoint."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", "--domains", "fitness", "--store", store, *FAST],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "MEETARA_LOG_EVERY": "1"},
    )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if ": step 5/" in line:
            break
    else:
        raise AssertionError("".join(seen)[-2000:])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    step = int(err.rsplit(" at step ", 1)[1].split("/")[0])
    assert step >= 5
    return step


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_resume_with_changed_parameters_is_refused_in_one_line_and_loses_nothing(tmp_path):
    url = f"file://{tmp_path}/st"
    step = _interrupted(url)
    ckpts = tmp_path / "st/runs/default/domains/fitness/checkpoints"
    before = _files(ckpts)
    assert before
    cases = {
        "--lora-r 4": "--lora-r 8 -> 4",
        "--lr 1e-4": "--lr 0.002 -> 0.0001",
        "--epochs 4": "--epochs 3 -> 4",
        "--samples 90": "training data sha256:",  # other data: a resume would mix two data sets
    }
    for change, expected in cases.items():
        r = run_cli("--domains", "fitness", "--store", url, *FAST, *change.split())
        line = _one_line_error(r)
        assert f"fitness: the checkpoint at step {step} was trained with other parameters" in line, line
        assert expected in line and "--restart-if-changed" in line, (change, line)
        assert _files(ckpts) == before, change  # nothing deleted, nothing written
        assert not (tmp_path / "st/runs/default/domains/fitness/manifest.json").exists()

    # the way out: start over with the new values; the manifest records the values used
    r = run_cli("--domains", "fitness", "--store", url, *FAST, "--lora-r", "4", "--restart-if-changed")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["domains"]["fitness"]["resumed_from_step"] == 0
    m = json.loads((tmp_path / "st/runs/default/domains/fitness/manifest.json").read_text())
    assert m["params"]["r"] == 4 and m["metrics"]["resumed_from_step"] == 0
    newest = max(p for p in ckpts.iterdir() if (p / "MANIFEST.json").exists())
    assert json.loads((newest / "MANIFEST.json").read_text())["meta"]["params"]["r"] == 4


def test_a_resume_ignores_options_that_do_not_change_the_training(tmp_path):
    clean = run_cli("--domains", "fitness", "--store", f"file://{tmp_path}/clean", *FAST)
    assert clean.returncode == 0, clean.stderr[-2000:]
    url = f"file://{tmp_path}/st"
    step = _interrupted(url)
    # another checkpoint interval and retention, another domain in the job, the restart flag (a no-op
    # when nothing changed, so a preempted job may be rerun with it): the checkpoint is resumed
    r = run_cli(
        "--domains", "legal,fitness", "--store", url, *FAST, "--checkpoint-every", "4",
        "--keep-checkpoints", "3", "--restart-if-changed",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)["domains"]
    assert out["fitness"]["resumed_from_step"] == step and out["legal"]["status"] == "done"
    # and ends with the same tensors as the uninterrupted run
    key = "runs/default/domains/fitness/adapter.gguf"
    a, b = (
        {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / s / key).tensors}
        for s in ("clean", "st")
    )
    assert a.keys() == b.keys() and len(a) == 4
    assert all(np.array_equal(a[k], b[k]) for k in a)
