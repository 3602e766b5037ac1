"""Training throughput of meetara's real LoRA training step, naive vs optimized, in one run.

    python bench/train_throughput.py                       # CPU, the tiny base model
    python bench/train_throughput.py --device cuda --model dialogpt-medium-shape --json $OUT/tp.json

Every variant runs `train.lora.train` itself (the function `python -m train` calls: the same rows,
padding or packing, precision, compile, optimizer and checkpoint code) in a fresh Python process, so
peak memory, thread pools and compile caches of one variant never colour another. `--repeats` runs
the variants in turn that many times and reports each variant's median: on a shared machine a
neighbour's load shows up as a spread between repeats (the JSON keeps every repeat and the load
average before and after).

Variants (`--variants`, comma-separated):
    naive      fp32 weights, batch 2, one sample per row padded to max_len, no compile, torch's
               default threads: the baseline the GPU issue names.
    optimized  what `python -m train` does by default on that device: LoraParams() defaults
               (packing decided per run, threads = physical cores, compile on CUDA), bf16 base
               weights on CUDA and fp32 on CPU (as train.pipeline loads them), batch 8 on CPU
               (the CLI's default) and the automatic batch size on CUDA.
    packed     optimized with packing forced on.    unpacked   optimized with packing forced off.
    batch6     optimized at batch 6 (the original project's DialoGPT-medium batch size).
    bf16       optimized with bf16 base weights (autocast) also on CPU.
    compiled   optimized with torch.compile also on CPU (rows padded to max_len: fixed shapes).

Models (`--model`): `tiny` (the project's default base, built offline and cached) or
`dialogpt-medium-shape` (GPT-2 24 layers x 1024 wide, 16 heads, vocab 50257, n_positions 1024,
i.e. microsoft/DialoGPT-medium's shape, random init from the config: nothing is downloaded).
Data: the generated conversations of every domain (train split, as the pipeline makes them),
tokenized with the tiny model's tokenizer (its ids are valid in any GPT-2 vocabulary; GPT-2's own
tokenizer would need a download and gives somewhat shorter samples), cut to max_len.

What is reported, per variant:
    tokens/s     real tokens per second: the tokens of the samples trained on, padding NOT counted
                 (packing or padding only changes how many positions are computed for them),
                 summed over the measured steps / their wall time. The first `--warmup` steps
                 (compilation, allocator warm-up) are not measured.
    s/step       wall time per measured step (the step ends when its loss reaches the host).
    peak memory  CUDA: torch.cuda.max_memory_allocated (weights included); CPU: peak RSS of the
                 variant's process (Python, torch and the model included).
    MFU          model FLOPs per second / peak FLOP/s of the device, with the model FLOPs of LoRA
                 training on a frozen base, per real token:

                     F = 4 * N_mm + 6 * N_lora + 12 * n_layer * d_model * T_eff

                 N_mm: weights that multiply activations (per block 3d^2 + d^2 + 2 d d_ff, plus the
                 d x vocab LM head; embeddings are lookups). Forward costs 2 N_mm, backward 2 N_mm
                 for the activation gradients; the frozen base has no weight gradients. LoRA
                 weights (N_lora) cost 2 forward + 4 backward (weight and activation gradients).
                 Attention (QK^T and AV): 4 d T per layer forward, twice that backward, where T is
                 the context of the token's own sample: T_eff = sum(len^2) / sum(len) over the
                 samples (work spent on padding or across packed samples is not model FLOPs).
                 Peak: CUDA, the dense bf16 tensor-core rate of the GPU (launcher/throughput.py's
                 spec-sheet table; H100 PCIe 756 TFLOPS), also for the fp32 baseline; CPU, an
                 ESTIMATE: physical cores x clock (/proc/cpuinfo) x 32 fp32 FLOPs/cycle (two
                 256-bit FMA pipes; 16 without FMA). `--peak-tflops` overrides both.

Output: the JSON (`--json`, default ./train_throughput.json) and one row per variant appended to
the table at the end of bench/RESULTS.md (`--results`, `--no-results` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("tiny", "dialogpt-medium-shape")
DIALOGPT_MEDIUM_SHAPE = {
    "n_layer": 24,
    "n_embd": 1024,
    "n_head": 16,
    "n_positions": 1024,
    "vocab_size": 50257,
}
# variant -> overrides of the optimized default (dtype "auto": bf16 on CUDA, fp32 on CPU)
VARIANTS: dict[str, dict] = {
    "naive": {
        "dtype": "fp32",
        "batch_size": 2,
        "pack": False,
        "pad_to_max_len": True,
        "torch_compile": False,
        "threads": 0,
    },
    "optimized": {},
    "packed": {"pack": True},
    "unpacked": {"pack": False},
    "batch6": {"batch_size": 6},
    "bf16": {"dtype": "bf16"},
    "compiled": {"torch_compile": True},
}
ROWS_MARKER = "<!-- rows appended by bench/train_throughput.py -->"
TABLE_HEAD = (
    "| date (UTC) | device | torch | model | variant | batch (rows) | packed | real / computed tokens "
    "| dtype | compile | threads | tokens/s (real) | s/step | vs naive | peak mem | MFU |\n"
    "| --- | --- | --- | --- | --- | ---: | --- | ---: | --- | --- | ---: "
    "| ---: | ---: | ---: | ---: | ---: |"
)


# ---------------------------------------------------------------------------------------- child
def build_model(name: str, device: str, dtype) -> object:
    import torch

    if name == "tiny":
        from train.domains import load_registry
        from train.model import load_base

        return load_base("tiny", load_registry(), dtype=dtype, device=device).model
    from transformers import GPT2Config, GPT2LMHeadModel

    from train.model import quiet_transformers

    quiet_transformers()
    cfg = GPT2Config(**DIALOGPT_MEDIUM_SHAPE, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype)


def flops_per_token(model, t_eff: float) -> dict:
    """Model FLOPs per real token of LoRA training on a frozen base (formula in the module doc)."""
    cfg = model.config
    d, n_layer = cfg.n_embd, cfg.n_layer
    d_ff = cfg.n_inner or 4 * d
    n_mm = n_layer * (4 * d * d + 2 * d * d_ff) + cfg.vocab_size * d
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attn = 12 * n_layer * d * t_eff
    return {"n_mm": n_mm, "n_lora": n_lora, "attention": attn, "total": 4 * n_mm + 6 * n_lora + attn}


def child(cfg: dict) -> dict:
    """Run one variant: build the model, train `warmup + steps` real steps, measure."""
    import torch

    from train.lora import LoraParams, attach_lora, train
    from train.store import open_store

    device = cfg["device"]
    data = json.loads(Path(cfg["data"]).read_text())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg["dtype"]]
    from train.bounds import MAX_EPOCHS

    params = LoraParams(
        epochs=MAX_EPOCHS,  # the run ends at max_steps; as many epochs as allowed so it never ends before
        checkpoint_every=10**9,
        batch_size=cfg["batch_size"],
        pack=cfg["pack"],
        pad_to_max_len=cfg["pad_to_max_len"],
        torch_compile=cfg["torch_compile"],
        threads=cfg["threads"],
    )
    t = time.perf_counter()
    model = attach_lora(build_model(cfg["model"], device, dtype), params)
    build_s = time.perf_counter() - t
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm, steps = cfg["warmup"], cfg["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        result = train(
            model,
            data,
            params,
            pad_id=cfg["pad_id"],
            store=open_store(f"file://{tmp}"),
            prefix="bench",
            max_steps=warm + steps,
        )
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        device_name = torch.cuda.get_device_name()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        device_name = cpu_name()
    if len(result.step_seconds) < warm + steps:
        raise SystemExit(f"the data gave {len(result.step_seconds)} steps, fewer than {warm + steps}")
    sec = result.step_seconds[warm:]
    tok = result.step_tokens[warm:]
    lengths = [len(x) for x in data]
    flops = flops_per_token(model, sum(n * n for n in lengths) / sum(lengths))
    tps = sum(tok) / sum(sec)
    return {
        "device_name": device_name,
        "tokens_per_s": tps,
        "s_per_step": sum(sec) / len(sec),
        "s_per_step_median": statistics.median(sec),
        "step_seconds": [round(x, 5) for x in result.step_seconds],
        "measured_steps": len(sec),
        "batch_size": result.batch_size,
        "packed": result.packed,
        "rows_per_epoch": result.rows,
        "samples_per_row": len(data) / result.rows,
        "padding_efficiency": result.tokens / result.positions,
        "compiled": result.compiled,
        "threads": result.threads if result.threads is not None else torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "peak_memory_bytes": peak,
        "model_flops_per_token": flops,
        "model_flops_per_s": flops["total"] * tps,
        "build_seconds": build_s,
        "final_loss": result.losses[-1],
    }


# --------------------------------------------------------------------------------------- parent
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def cpu_peak_flops(cores: int) -> tuple[float | None, str]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, "unknown (no /proc/cpuinfo)"
    mhz = next((float(x.split(":")[1]) for x in info.splitlines() if x.startswith("cpu MHz")), None)
    if mhz is None:
        return None, "unknown (no clock in /proc/cpuinfo)"
    flags = next((x for x in info.splitlines() if x.startswith("flags")), "").split()
    per_cycle = 32 if "fma" in flags else 16
    return (
        cores * mhz * 1e6 * per_cycle,
        f"ESTIMATE: {cores} physical cores x {mhz:.0f} MHz x {per_cycle} fp32 FLOPs/cycle",
    )


def gpu_peak_flops(name: str) -> tuple[float | None, str]:
    if "H100" in name and "PCIe" in name:
        return 756e12, "H100 PCIe dense bf16 spec sheet"
    try:
        from launcher.throughput import GPU_TFLOPS
    except ImportError:
        return None, "unknown"
    squashed = name.replace(" ", "").replace("-", "").upper()
    keys = [k for k in GPU_TFLOPS if k.replace("-", "").upper() in squashed]
    if not keys:
        return None, f"unknown GPU {name!r}"
    key = max(keys, key=len)
    return GPU_TFLOPS[key] * 1e12, f"{key} dense bf16 spec sheet (launcher/throughput.py)"


def make_data(path: Path, max_len: int, domains: int | None = None) -> dict:
    """Train splits of the domains' generated conversations (the first `domains` of the registry, or
    all), tokenized as the pipeline does."""
    from train.data import domain_data
    from train.domains import load_registry
    from train.model import encode, load_base

    registry = load_registry()
    base = load_base("tiny", registry)  # builds and caches the tiny model on first use
    data: list[list[int]] = []
    used = registry.domains[:domains] if domains else registry.domains
    for d in used:
        train_s, _, _, _ = domain_data(d, n=200, seed=0)
        data += encode(train_s, base.tokenizer, max_len)
    path.write_text(json.dumps(data))
    lengths = [len(x) for x in data]
    return {
        "samples": len(data),
        "domains": len(used),
        "tokens": sum(lengths),
        "mean_len": sum(lengths) / len(lengths),
        "min_len": min(lengths),
        "max_len": max(lengths),
        "t_eff": sum(n * n for n in lengths) / sum(lengths),
        "max_len_cut": max_len,
        "pad_id": base.tokenizer.pad_token_id,
    }


def variant_config(name: str, args: argparse.Namespace) -> dict:
    cuda = args.device == "cuda"
    cfg = {
        "dtype": "bf16" if cuda else "fp32",
        "batch_size": None if cuda else 8,
        "pack": None,
        "pad_to_max_len": None,
        "torch_compile": None,
        "threads": None,
    }
    cfg.update(VARIANTS[name])
    if args.batch_size is not None and name not in ("naive", "batch6"):
        cfg["batch_size"] = args.batch_size or None
    return cfg


def run_child(cfg: dict, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"variant {cfg['variant']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def append_rows(path: Path, report: dict) -> None:
    """Append one row per variant to the table after ROWS_MARKER (made at the end if missing)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if ROWS_MARKER not in text:
        text = text.rstrip("\n") + "\n\n## Training throughput harness: runs\n\n" + ROWS_MARKER + "\n\n"
        text += TABLE_HEAD + "\n"
    rows = []
    naive = report["variants"].get("naive")
    for name, v in report["variants"].items():
        ratio = f"{v['tokens_per_s'] / naive['tokens_per_s']:.2f}x" if naive else "-"
        mfu = f"{100 * v['mfu']:.2f} %" if v.get("mfu") is not None else "-"
        rows.append(
            f"| {report['date'][:16].replace('T', ' ')} | {report['device']} | {report['torch']} "
            f"| {report['model']} | {name} | {v['batch_size']} | {'yes' if v['packed'] else 'no'} "
            f"| {100 * v['padding_efficiency']:.0f} % | {v['dtype']} | {v['compiled']} | {v['threads']} "
            f"| {v['tokens_per_s']:,.0f} | {v['s_per_step']:.4f} | {ratio} "
            f"| {fmt_bytes(v['peak_memory_bytes'])} | {mfu} |"
        )
    # rows go after the last table line that follows the marker
    head, tail = text.split(ROWS_MARKER, 1)
    lines = tail.split("\n")
    last = max((i for i, line in enumerate(lines) if line.startswith("|")), default=len(lines) - 1)
    lines[last + 1 : last + 1] = rows
    path.write_text(head + ROWS_MARKER + "\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", choices=MODELS, default="tiny")
    ap.add_argument("--variants", default="naive,optimized")
    ap.add_argument("--steps", type=int, default=20, help="measured steps per variant and repeat")
    ap.add_argument("--warmup", type=int, default=3, help="steps before measuring (compilation etc.)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the variants; medians reported")
    ap.add_argument("--batch-size", type=int, help="override the optimized variants' batch (0: automatic)")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--domains", type=int, help="data from the first N domains (default: all)")
    ap.add_argument("--peak-tflops", type=float, help="override the device's peak for MFU")
    ap.add_argument("--json", type=Path, default=Path("train_throughput.json"))
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--no-results", action="store_true", help="do not append rows to --results")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}

    import peft
    import torch
    import transformers

    from train.lora import physical_cores

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU")

    with tempfile.TemporaryDirectory(prefix="meetara-bench-") as tmp:
        data_file = Path(tmp) / "data.json"
        data = make_data(data_file, args.max_len, args.domains)
        load_before = os.getloadavg()
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for _ in range(args.repeats):
            for name in names:
                cfg = variant_config(name, args) | {
                    "variant": name,
                    "device": args.device,
                    "model": args.model,
                    "data": str(data_file),
                    "pad_id": data["pad_id"],
                    "steps": args.steps,
                    "warmup": args.warmup,
                }
                runs[name].append(run_child(cfg, args.timeout) | {"config": cfg})
        load_after = os.getloadavg()

    device_name = runs[names[0]][0]["device_name"]
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops * 1e12, "--peak-tflops"
    elif args.device == "cuda":
        peak, peak_source = gpu_peak_flops(device_name)
    else:
        peak, peak_source = cpu_peak_flops(physical_cores())
    variants = {}
    for name, rs in runs.items():
        best = sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]  # the median repeat
        v = {
            k: best[k]
            for k in (
                "batch_size",
                "packed",
                "rows_per_epoch",
                "samples_per_row",
                "padding_efficiency",
                "compiled",
                "threads",
                "attn_implementation",
                "model_flops_per_token",
            )
        }
        cfg = rs[0]["config"]
        v |= {
            "dtype": cfg["dtype"],
            "config": {k: cfg[k] for k in ("dtype", "batch_size", "pack", "pad_to_max_len", "torch_compile")}
            | {"threads": cfg["threads"]},
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "s_per_step": statistics.median(r["s_per_step"] for r in rs),
            "tokens_per_s_repeats": [round(r["tokens_per_s"], 1) for r in rs],
            "s_per_step_repeats": [round(r["s_per_step"], 5) for r in rs],
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rs),
            "final_loss": best["final_loss"],
            "step_seconds": best["step_seconds"],
        }
        v["model_flops_per_s"] = v["model_flops_per_token"]["total"] * v["tokens_per_s"]
        v["mfu"] = v["model_flops_per_s"] / peak if peak else None
        variants[name] = v
    report = {
        "harness": "bench/train_throughput.py",
        "command": "python bench/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device_name if args.device == "cuda" else f"{device_name} ({physical_cores()} cores)",
        "device_kind": args.device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "model": args.model,
        "data": data,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "peak_flops": peak,
        "peak_source": peak_source,
        "mfu_formula": "(4*N_mm + 6*N_lora + 12*n_layer*d_model*T_eff) * real tokens/s / peak",
        "tokens": "real tokens only (padding not counted)",
        "loadavg_before_after": [list(load_before), list(load_after)],
        "variants": variants,
    }
    if "naive" in variants and "optimized" in variants:
        report["ratio_optimized_vs_naive"] = (
            variants["optimized"]["tokens_per_s"] / variants["naive"]["tokens_per_s"]
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    if not args.no_results:
        append_rows(args.results, report)
    for name, v in variants.items():
        print(
            f"{name:10s} {v['tokens_per_s']:>10,.0f} tok/s  {v['s_per_step']:.4f} s/step"
            f"  batch {v['batch_size']}  packed {v['packed']}  compile {v['compiled']}"
            f"  peak {fmt_bytes(v['peak_memory_bytes'])}"
            + (f"  MFU {100 * v['mfu']:.2f} %" if v["mfu"] is not None else ""),
            file=sys.stderr,
        )
    if "ratio_optimized_vs_naive" in report:
        print(f"optimized / naive: {report['ratio_optimized_vs_naive']:.2f}x", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
