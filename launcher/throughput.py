"""How fast a GPU trains a LoRA adapter: the numbers the planner turns into hours and dollars.

Training throughput (tokens/s) for a base model of N parameters on a GPU is estimated as

    tokens/s = REFERENCE_TOKENS_S x (tflops(gpu) / tflops(reference GPU)) x (REFERENCE_PARAMS / N)

because a LoRA step with a frozen base costs ~4 N FLOPs per token (forward 2N + activation gradients
2N; no weight gradients for the base), so at equal MFU throughput scales with tensor TFLOPS / N.

Where the figures come from (update them from `bench/` when measured, with GPU and date):
- reference: DialoGPT-medium-shaped GPT-2 (355M, LoRA r=8 on c_attn, sequence 128), bf16 weights +
  torch.compile, batch 64-128: ~210k tokens/s on one H100 SXM (~30 % MFU). Reported in the GPU
  throughput issue from an earlier H100 run; not yet re-measured by meetara's own harness.
- other GPUs: scaled by their spec-sheet dense bf16/fp16 tensor TFLOPS with fp32 accumulation
  (GeForce cards run that at half their fp16-accumulate rate). These are estimates.
- `cpu`: measured here (bench/RESULTS.md, 2-core EPYC VM, tiny model: ~10,000 tokens/s).
"""

from __future__ import annotations

from dataclasses import dataclass

REFERENCE_GPU = "H100"
REFERENCE_TOKENS_S = 210_000.0
REFERENCE_PARAMS = 355e6

# dense tensor TFLOPS (bf16, or fp16 where the card has no bf16), fp32 accumulate, from spec sheets
GPU_TFLOPS: dict[str, float] = {
    "B200": 2250,
    "H200": 989,
    "GH200": 989,
    "H100": 989,
    "H100-NVL": 835,  # dense BF16 (the NVL boards run at a lower clock than SXM)
    "H200-NVL": 835,
    "A100-80GB": 312,
    "A100-40GB": 312,
    "A100": 312,
    "L40S": 362,
    "L40": 181,
    "RTX6000-Ada": 182,
    "A6000": 155,
    "A40": 150,
    "A5000": 111,
    "A4000": 77,
    "A10": 125,
    "A10G": 70,
    "L4": 121,
    "V100": 125,
    "T4": 65,
    "RTX5090": 209,
    "RTX4090": 165,
    "RTX4080": 97,
    "RTX3090": 71,
    "RTX3080": 60,
}
UNKNOWN_GPU_TFLOPS = 60.0  # a GPU the table does not know is assumed to be slow: plans err on the dear side

# parameters of the base models meetara knows by name (GPT-2 family)
MODEL_PARAMS: dict[str, float] = {
    "tiny": 1.3e6,
    "gpt2": 124e6,
    "distilgpt2": 82e6,
    "gpt2-medium": 355e6,
    "gpt2-large": 774e6,
    "gpt2-xl": 1.56e9,
    "microsoft/DialoGPT-small": 124e6,
    "microsoft/DialoGPT-medium": 355e6,
    "microsoft/DialoGPT-large": 774e6,
}

# measured on this project's CPU machine (bench/RESULTS.md): tiny model, 2 cores
CPU_TOKENS_S = {"tiny": 10_000.0}


@dataclass(frozen=True)
class Speed:
    tokens_per_s: float
    source: str  # "measured" | "reported" | "scaled" | "unknown-gpu"


def model_params(base_model: str) -> float:
    """Parameters of a known base model (`random:NAME` has NAME's); `ValueError` names the known ones
    otherwise."""
    arch = base_model.removeprefix("random:")
    if arch in MODEL_PARAMS:
        return MODEL_PARAMS[arch]
    short = arch.rsplit("/", 1)[-1]
    for name, n in MODEL_PARAMS.items():
        if name.rsplit("/", 1)[-1].lower() == short.lower():
            return n
    raise ValueError(f"unknown base model {base_model!r} for planning; known: {', '.join(MODEL_PARAMS)}")


def speed(gpu: str, base_model: str) -> Speed:
    """Estimated LoRA training tokens/s of one `gpu` ("cpu" for this machine) on `base_model`."""
    n = model_params(base_model)
    if gpu == "cpu":
        if base_model in CPU_TOKENS_S:
            return Speed(CPU_TOKENS_S[base_model], "measured")
        return Speed(CPU_TOKENS_S["tiny"] * MODEL_PARAMS["tiny"] / n, "scaled")
    tflops = GPU_TFLOPS.get(gpu)
    source = "reported" if gpu == REFERENCE_GPU and n == REFERENCE_PARAMS else "scaled"
    if tflops is None:
        tflops, source = UNKNOWN_GPU_TFLOPS, "unknown-gpu"
    # a tiny model on a big GPU is bound by per-step overheads, not FLOPs: cap at 20x the reference rate
    rate = REFERENCE_TOKENS_S * (tflops / GPU_TFLOPS[REFERENCE_GPU]) * (REFERENCE_PARAMS / n)
    return Speed(min(rate, 20 * REFERENCE_TOKENS_S), source)
