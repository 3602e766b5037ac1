"""Warm starts, measured: does a LoRA that starts from a similar domain's adapter reach the cold start's
final held-out loss in fewer steps?

    MEETARA_CACHE=/tmp/mcache_ws python bench/warm_start.py     # all 62 domains, ~18 min on 2 quiet cores

For every domain, on the tiny base model with the pipeline's defaults (200 generated samples, noise 0.1,
seed 0, `LoraParams()`: r 8, lr 2e-3, 2 epochs, batch 8, warmup 5, linear decay):

    cold     a fresh LoRA (what `python -m train` does without a warm start). Its final held-out loss
             is the domain's target; its steps-to-target is the first step whose held-out loss is at
             or below that final loss (the full schedule, unless the loss bottoms out earlier).
    similar  the same training, but the LoRA starts from the cold-trained adapter of the most similar
             OTHER domain (train/similarity.py: registry text and data profiles, as the pipeline
             scores them; all 61 others to choose from).
    random   the control: the same, starting from a seeded random other domain's cold adapter. If
             `similar` is no better than `random`, the similarity is not what helps.
    chain    what the pipeline does in one job of all the domains with warm starts on: the domains in
             `similarity_chain` order, each starting from the most similar domain EARLIER in the chain,
             from that domain's adapter as the chain trained it (itself warm-started); the first
             domain of the chain is cold.
    chain_random  the control for `chain`: the domains in a seeded random order, each starting from
             the adapter of the domain trained just before it (a sequential fine-tune, no similarity).
             If `chain` is no better than `chain_random`, what helps is the adapter having been
             trained on many domains in turn, not their similarity.

Warm runs keep the whole schedule (same warmup, learning rate and step count), as the pipeline does;
steps-to-target counts from the warm start (0 = already at the target before training). Held-out
loss is `train.lora.heldout_loss` (the pipeline's measure) on the domain's held-out split, evaluated
before training and after every `--eval-every` steps (and always after the last one); evaluation
runs under no_grad in eval mode and draws no random numbers, so it does not change the training.
Checkpointing is off (`checkpoint_every` beyond the run): it does not change the arithmetic either.

Reported per domain: target (cold final loss), cold steps-to-target, per warm variant its source,
similarity, steps-to-target (null: not reached) and final loss; summary per variant: median, IQR,
min and max of warm steps / cold steps (not reached counts as infinity), how many domains reached
the target in fewer steps than cold, and the median final-loss change. The JSON goes to `--json`;
`--results` appends a section to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("similar", "random", "chain", "chain_random")


def run_one(base, params, train_ids, held_ids, store, prefix, init, eval_every, stop_at=None):
    """Train one LoRA (from `init`, a peft state dict, or fresh); returns the held-out loss curve
    {step: loss} and the adapter's final state. With `stop_at`, evaluation stops once the loss is at
    or below it (the final step is evaluated anyway)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from train.lora import attach_lora, heldout_loss
    from train.lora import train as train_lora

    pad = base.tokenizer.pad_token_id
    model = attach_lora(base.model, params)
    try:
        if init is not None:
            set_peft_model_state_dict(model, init)
        curve = {0: heldout_loss(model, held_ids, pad)}
        reached = [stop_at is not None and curve[0] <= stop_at]

        def on_step(done: int, total: int, loss: float) -> None:
            if done == total or (not reached[0] and done % eval_every == 0):
                curve[done] = heldout_loss(model, held_ids, pad)
                reached[0] = reached[0] or (stop_at is not None and curve[done] <= stop_at)

        train_lora(model, train_ids, params, pad_id=pad, store=store, prefix=prefix, on_step=on_step)
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    finally:
        base.model = model.unload()
    return curve, state


def steps_to(curve: dict[int, float], target: float) -> int | None:
    hit = [s for s, loss in sorted(curve.items()) if loss <= target]
    return hit[0] if hit else None


def progress(row: dict, variants: list[str]) -> str:
    return f"target {row['target']:.4f}, cold steps {row['cold_steps_to_target']}; " + "; ".join(
        f"{v} from {row[v]['source']}: steps {row[v]['steps_to_target']}" for v in variants if v in row
    )


def summarize(rows: list[dict], variant: str) -> dict:
    rows = [r for r in rows if r[variant]["source"] is not None]  # a chain's first domain is cold
    steps = [r[variant]["steps_to_target"] for r in rows]
    ratios = [
        math.inf if s is None else s / r["cold_steps_to_target"] for s, r in zip(steps, rows, strict=True)
    ]
    deltas = [r[variant]["final_loss"] - r["target"] for r in rows]
    earlier = [s is not None and s < r["cold_steps_to_target"] for s, r in zip(steps, rows, strict=True)]
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3

    def num(x: float) -> float | None:
        return None if math.isinf(x) else round(x, 4)

    out = {
        "domains": len(rows),
        "reached_target": sum(s is not None for s in steps),
        "reached_in_fewer_steps_than_cold": sum(earlier),
        "ratio_median": num(statistics.median(ratios)),
        "ratio_q1": num(q[0]),
        "ratio_q3": num(q[2]),
        "ratio_min": num(min(ratios)),
        "ratio_max": num(max(ratios)),
        "final_loss_minus_target_median": round(statistics.median(deltas), 5),
        "final_loss_below_target": sum(d < 0 for d in deltas),
        "warm_loss_at_start_minus_cold_median": round(
            statistics.median(r[variant]["loss_at_start"] - r["loss_before"] for r in rows), 5
        ),
        "mean_similarity": round(statistics.mean(r[variant]["similarity"] for r in rows), 4),
    }
    if "position" in rows[0][variant]:
        # chains: does the gain grow with the number of domains the starting adapter has been through?
        n = len(rows) + 1
        first = [e for e, r in zip(earlier, rows, strict=True) if r[variant]["position"] < n / 2]
        second = [e for e, r in zip(earlier, rows, strict=True) if r[variant]["position"] >= n / 2]
        out["fewer_steps_first_half_of_chain"] = f"{sum(first)}/{len(first)}"
        out["fewer_steps_second_half_of_chain"] = f"{sum(second)}/{len(second)}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="all", help="'all', a category or names (as python -m train)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="warm variants (comma-separated)")
    ap.add_argument("--eval-every", type=int, default=2, help="steps between held-out evaluations")
    ap.add_argument("--seed", type=int, default=2026, help="seed of the random control's source choice")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "warm_start.json")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if not set(variants) <= set(VARIANTS):
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")

    import peft
    import torch
    import transformers

    from train.data import domain_data
    from train.domains import load_registry, select_domains
    from train.lora import LoraParams
    from train.model import encode, load_base
    from train.pipeline import JobSpec
    from train.similarity import most_similar, profile, similarity, similarity_chain
    from train.store import open_store

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    registry = load_registry()
    domains = select_domains(args.domains, registry)
    spec = JobSpec(domains=[d.name for d in domains])
    params = spec.params.model_copy(update={"checkpoint_every": 10**9})
    assert params.model_dump(exclude={"checkpoint_every"}) == LoraParams().model_dump(
        exclude={"checkpoint_every"}
    )
    base = load_base(spec.base_model, registry, device="cpu", dtype=torch.float32)
    data, profiles = {}, {}
    for d in domains:
        train_s, held_s, _, _ = domain_data(d, n=spec.samples, seed=params.seed, noise=spec.noise)
        profiles[d.name] = profile(x for s in train_s for x in (s.prompt, s.response))  # as the pipeline
        data[d.name] = (
            encode(train_s, base.tokenizer, params.max_len),
            encode(held_s, base.tokenizer, params.max_len),
        )

    rng = random.Random(args.seed)
    rows: dict[str, dict] = {}
    cold_state = {}
    with tempfile.TemporaryDirectory(prefix="warm-bench-") as tmp:
        store = open_store(f"file://{tmp}")

        def warm_run(row: dict, src: str, sim: float, init: dict, prefix: str) -> tuple[dict, dict]:
            t = time.perf_counter()
            curve, state = run_one(
                base, params, *data[row["domain"]], store, prefix, init, args.eval_every, row["target"]
            )
            return {
                "source": src,
                "similarity": sim,
                "loss_at_start": round(curve[0], 5),
                "steps_to_target": steps_to(curve, row["target"]),
                "final_loss": round(curve[max(curve)], 5),
                "seconds": round(time.perf_counter() - t, 2),
            }, state

        for i, d in enumerate(domains):
            t = time.perf_counter()
            curve, cold_state[d.name] = run_one(
                base, params, *data[d.name], store, f"cold/{d.name}", None, args.eval_every
            )
            target = curve[max(curve)]
            rows[d.name] = {
                "domain": d.name,
                "category": d.category,
                "steps": max(curve),
                "loss_before": round(curve[0], 5),
                "target": round(target, 5),
                "cold_steps_to_target": steps_to(curve, target),
                "cold_seconds": round(time.perf_counter() - t, 2),
            }
            print(f"[{i + 1}/{len(domains)}] cold {d.name}: {curve[0]:.4f} -> {target:.4f}", flush=True)

        for i, d in enumerate(domains):
            others = [o for o in domains if o.name != d.name]
            for v in {"similar", "random"}.intersection(variants):
                if v == "similar":
                    src, sim = most_similar(d, others, registry, profiles)
                else:
                    src = rng.choice(others).name
                    sim = similarity(d, registry.get(src), registry)
                rows[d.name][v] = warm_run(rows[d.name], src, sim, cold_state[src], f"{v}/{d.name}")[0]
            print(f"[{i + 1}/{len(domains)}] warm {d.name}: {progress(rows[d.name], variants)}", flush=True)

        names = [d.name for d in domains]
        orders = {
            "chain": similarity_chain(names, registry),
            "chain_random": random.Random(args.seed + 1).sample(names, len(names)),
        }
        for v in ("chain", "chain_random"):
            if v not in variants:
                continue
            order, state = orders[v], {}
            for i, name in enumerate(order):
                row = rows[name]
                if i == 0:  # the first domain of a job has nothing to start from: it is the cold run
                    row[v] = {"source": None, "similarity": None, "loss_at_start": row["loss_before"]}
                    row[v] |= {"steps_to_target": row["cold_steps_to_target"], "final_loss": row["target"]}
                    row[v] |= {"seconds": row["cold_seconds"], "position": 0}
                    state[name] = cold_state[name]
                    continue
                d = registry.get(name)
                if v == "chain":
                    done = {x: profiles[x] for x in [*order[:i], name]}  # profiles of trained ones
                    src, sim = most_similar(d, [registry.get(x) for x in order[:i]], registry, done)
                else:
                    src = order[i - 1]
                    sim = similarity(d, registry.get(src), registry)
                row[v], state[name] = warm_run(row, src, sim, state[src], f"{v}/{name}")
                row[v]["position"] = i
                print(f"[{i + 1}/{len(order)}] {v} {name}: {progress(row, [v])}", flush=True)

    out = {
        "command": "python bench/warm_start.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.date.today().isoformat(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "params": params.model_dump(),
        "samples": spec.samples,
        "noise": spec.noise,
        "eval_every": args.eval_every,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "summary": {v: summarize(list(rows.values()), v) for v in variants},
        "domains": rows,
    }
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["summary"], indent=1))
    if not args.no_results:
        with args.results.open("a") as f:
            f.write(results_section(out))
    return 0


def results_section(out: dict) -> str:
    m = out["machine"]
    rows = list(out["domains"].values())
    cold = [r["cold_steps_to_target"] for r in rows]
    lines = [
        "",
        f"## Warm starts vs cold starts: steps to the cold start's final held-out loss ({len(rows)} domains)",
        "",
        f"{out['date']} · {m['cpus']}-core CPU ({m['platform']}) · Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, peft {m['peft']} · load average "
        f"{m['load_avg_before'][0]} before, {m['load_avg_after'][0]} after · "
        f"wall time {out['wall_seconds']:.0f} s. Step counts do not depend "
        "on the load (the training is deterministic); only the wall time does.",
        "",
        "```bash",
        f"MEETARA_CACHE=/tmp/mcache_ws {out['command'].strip()}",
        "```",
        "",
        f"Tiny base model, pipeline defaults (200 samples, {out['params']['epochs']:g} epochs, batch "
        f"{out['params']['batch_size']}, lr {out['params']['lr']:g}, r {out['params']['r']}); "
        f"{min(r['steps'] for r in rows)}-{max(r['steps'] for r in rows)} steps per domain; held-out loss "
        f"every {out['eval_every']} steps and after the last. Target = the cold run's final held-out loss; "
        f"cold reaches it at step {min(cold)}-{max(cold)} (median {statistics.median(cold):g}). Warm runs "
        "keep the full schedule. `similar`: the LoRA starts from the cold adapter of the most similar "
        "other domain; `random`: from a seeded random other domain's (its control); `chain`: what "
        "`--warm-start` does in one job of all the domains in `similarity_chain` order (each from the "
        "most similar domain earlier in the chain, as the chain trained it; the first is cold and not "
        "counted); `chain_random`: a seeded random order, each from the domain just before it (its "
        "control). Ratio = warm steps / cold steps to the target (not reached = infinity).",
        "",
        "| variant | reached target | in fewer steps than cold | ratio median | IQR | min | max "
        "| final loss - target, median | final below target | mean similarity of source |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    def f(x):
        return "not reached" if x is None else f"{x:.3f}"

    for v, s in out["summary"].items():
        lines.append(
            f"| {v} | {s['reached_target']}/{s['domains']} | {s['reached_in_fewer_steps_than_cold']} "
            f"| {f(s['ratio_median'])} | {f(s['ratio_q1'])}-{f(s['ratio_q3'])} | {f(s['ratio_min'])} "
            f"| {f(s['ratio_max'])} | {s['final_loss_minus_target_median']:+.4f} "
            f"| {s['final_loss_below_target']}/{s['domains']} | {s['mean_similarity']:.3f} |"
        )
    for v, s in out["summary"].items():
        if "fewer_steps_first_half_of_chain" in s:
            lines.append(
                f"\n`{v}`: fewer steps than cold in the first half of the chain "
                f"{s['fewer_steps_first_half_of_chain']}, in the second half "
                f"{s['fewer_steps_second_half_of_chain']}."
            )
    variants = list(out["summary"])
    lines += [
        "",
        "Per domain: target (cold final held-out loss), cold steps to it, and per variant the source "
        "domain and its steps to the target (-: not reached).",
        "",
        "| domain | target | cold | " + " | ".join(f"{v}: source | {v}: steps" for v in variants) + " |",
        "| --- | ---: | ---: |" + " --- | ---: |" * len(variants),
    ]
    for r in rows:
        cells = []
        for v in variants:
            w = r[v]
            steps = "-" if w["steps_to_target"] is None else str(w["steps_to_target"])
            cells += [w["source"] or "(first, cold)", steps]
        lines.append(
            f"| {r['domain']} | {r['target']:.4f} | {r['cold_steps_to_target']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
