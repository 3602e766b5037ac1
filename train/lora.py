"""LoRA training with checkpoint/resume, read top to bottom.

Determinism on CPU: the batch order of each epoch is a seeded permutation, so the step number alone
says which samples come next; the checkpoint carries adapter, optimizer, scheduler and torch RNG
state. A run killed at any step and resumed from its last checkpoint ends with the same tensors as
an uninterrupted run.
"""

from __future__ import annotations

import io
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from train import checkpoint
from train.store import ObjectStore


class LoraParams(BaseModel):
    """Training parameters. Defaults: LoRA r=8 / alpha=16 / dropout 0.05 on GPT-2's `c_attn`, the
    original project's DialoGPT-medium settings; lr and epochs are tuned for the tiny model (the original
    used lr 1e-4 and 846 steps at batch 6 for DialoGPT-medium: pass them with --lr / --epochs)."""

    r: int = Field(8, ge=1, le=256)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["c_attn"]
    lr: float = Field(2e-3, gt=0)
    epochs: float = Field(2, gt=0)
    batch_size: int | None = Field(8, ge=1, description="None: automatic on GPU (largest that fits)")
    max_len: int = Field(128, ge=8)
    warmup_steps: int = Field(5, ge=0)
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written first."""


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    batch_size: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


class StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (spot VMs get SIGTERM)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum


def batches_for(n: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def attach_lora(model: Any, params: LoraParams) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(params.seed)
    cfg = LoraConfig(
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=params.target_modules,
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def pick_batch_size(model: Any, params: LoraParams, pad_id: int) -> int:
    """Largest power-of-two batch that fits on the GPU at `max_len` (8 on CPU unless set)."""
    import torch

    if params.batch_size:
        return params.batch_size
    if next(model.parameters()).device.type != "cuda":
        return 8
    from accelerate.utils import find_executable_batch_size

    from train.model import lm_loss

    @find_executable_batch_size(starting_batch_size=256)
    def probe(batch_size: int) -> int:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lm_loss(model, [[pad_id] * params.max_len] * batch_size, pad_id).backward()
        model.zero_grad(set_to_none=True)
        return batch_size

    # leave headroom: activations vary with real data and the optimizer state comes on top
    return max(1, probe() // 2)


def heldout_loss(model: Any, data: list[list[int]], pad_id: int, batch_size: int = 16) -> float:
    """Token-weighted mean loss over held-out samples."""
    import torch

    from train.model import lm_loss

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), _autocast(model):
        for i in range(0, len(data), batch_size):
            chunk = data[i : i + batch_size]
            n = sum(len(x) - 1 for x in chunk)
            total += float(lm_loss(model, chunk, pad_id)) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def _autocast(model: Any) -> Any:
    import contextlib

    import torch

    if next(model.parameters()).device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    model: Any,
    data: list[list[int]],
    params: LoraParams,
    *,
    pad_id: int,
    store: ObjectStore,
    prefix: str,
    stop: StopFlag | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Train the LoRA weights of `model` (a peft model) on `data`, checkpointing to `store` under
    `prefix`, resuming from the newest valid checkpoint there. Raises `Interrupted` after saving
    when `stop` is set."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save
    from transformers import get_linear_schedule_with_warmup

    from train.model import lm_loss

    ckpt = checkpoint.latest(store, prefix)
    batch_size = ckpt.meta["batch_size"] if ckpt else pick_batch_size(model, params, pad_id)
    per_epoch = math.ceil(len(data) / batch_size)
    total = max(1, round(params.epochs * per_epoch))
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = next(model.parameters()).device.type == "cuda"
    opt = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=0.0, fused=fused)
    sched = get_linear_schedule_with_warmup(opt, min(params.warmup_steps, total // 4), total)

    start = 0
    if ckpt:
        set_peft_model_state_dict(model, st_load(ckpt.parts["adapter.safetensors"]))
        state = torch.load(io.BytesIO(ckpt.parts["state.pt"]), weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start = ckpt.step

    def save(step: int) -> None:
        buf = io.BytesIO()
        torch.save(
            {
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(),
                "step": step,
            },
            buf,
        )
        adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        checkpoint.save(
            store,
            prefix,
            step,
            {"adapter.safetensors": st_save(adapter), "state.pt": buf.getvalue()},
            meta={
                "batch_size": batch_size,
                "total_steps": total,
                "epoch": step // per_epoch,
                "position": step % per_epoch,
            },
        )
        checkpoint.prune(store, prefix, params.keep_checkpoints)

    result = TrainResult(steps=total, resumed_from=start, batch_size=batch_size)
    t0 = time.perf_counter()
    model.train()
    for step in range(start, total):
        epoch, pos = divmod(step, per_epoch)
        idx = batches_for(len(data), batch_size, epoch, params.seed)[pos]
        batch = [data[i] for i in idx]
        with _autocast(model):
            loss = lm_loss(model, batch, pad_id)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        result.tokens += sum(len(x) for x in batch)
        done = step + 1
        if on_step:
            on_step(done, total, result.losses[-1])
        if stop is not None and stop.signum is not None and done < total:
            save(done)
            raise Interrupted(f"stopped by signal {stop.signum} at step {done}/{total}; checkpoint saved")
        if done % params.checkpoint_every == 0 and done < total:
            save(done)
    result.seconds = time.perf_counter() - t0
    return result
