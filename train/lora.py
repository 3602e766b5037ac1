"""LoRA training with checkpoint/resume, read top to bottom.

Determinism on CPU: the batch order of each epoch is a seeded permutation, so the step number alone
says which samples come next; the checkpoint carries adapter, optimizer, scheduler and torch RNG
state. A run killed at any step and resumed from its last checkpoint ends with the same tensors as
an uninterrupted run.

Throughput (bench/train_throughput.py measures it; bench/RESULTS.md has the numbers):
- rows: a training step takes `batch_size` rows. A row is one sample padded to the longest row of
  the step, or, with packing, several whole samples back to back (`model.pack`), attention and
  labels confined to each sample (`model.collate_rows`). `pack=None` packs when the packed rows
  need fewer token positions per epoch than padded ones; rows are fixed before training, so the step
  number alone still says which rows come next.
- the rows are tensors built once and kept on the training device: a step only gathers its rows
  there, so no host-side loader has to keep up with the GPU.
- precision follows the frozen base weights: a bf16 base (the pipeline loads one on CUDA) trains
  under bf16 autocast while the LoRA weights, their gradients and AdamW's state stay fp32 (peft
  keeps adapters fp32); an fp32 base trains in fp32.
- CUDA: fused AdamW, torch.compile of the forward (falls back to eager, once, if compiling fails),
  rows padded to `max_len` so shapes stay fixed, and an automatic batch size (`batch_size=None`).
- CPU: `threads` (default: physical cores) for torch's intra-op pool.

Checkpoints: training takes the state as bytes at the step (so what is saved is that step's state
exactly) and, for a remote store, goes on while a background thread uploads it (`checkpoint.Uploader`,
one upload in flight). The interval is `checkpoint_every` steps, or by default the fewest steps for
which a checkpoint blocks at most `checkpoint_overhead` (2 %) of training and an upload is done
before the next (`auto_interval`, re-derived after each checkpoint from this run's measured costs).
A preemption redoes at most one interval, plus the steps trained while the newest upload was in flight.
Given a `metrics.Metrics`, each step's loss, lr, tokens and time go into it, and each checkpoint holds
the curve up to its step (train/metrics.py): a resumed curve shows every step once.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from train import checkpoint
from train.bounds import Epochs
from train.store import ObjectStore

if TYPE_CHECKING:
    from train.metrics import Metrics


class LoraParams(BaseModel):
    """Training parameters. Defaults: LoRA r=8 / alpha=16 / dropout 0.05 on GPT-2's `c_attn`, the
    original project's DialoGPT-medium settings; lr and epochs are tuned for the tiny model (the original
    used lr 1e-4 and 846 steps at batch 6 for DialoGPT-medium: pass them with --lr / --epochs)."""

    r: int = Field(8, ge=1, le=256)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["c_attn"]
    lr: float = Field(2e-3, gt=0)
    epochs: Epochs = 2
    batch_size: int | None = Field(8, ge=1, description="None: automatic on GPU (largest that fits)")
    max_len: int = Field(128, ge=8)
    warmup_steps: int = Field(5, ge=0)
    checkpoint_every: int | None = Field(
        None, ge=1, description="steps between checkpoints; None: derived from the measured checkpoint cost"
    )
    checkpoint_overhead: float = Field(
        0.02, gt=0, lt=1, description="auto interval: most of the training time a checkpoint may block"
    )
    checkpoint_max_seconds: float = Field(
        300, gt=0, description="auto interval: most seconds of training between two checkpoints"
    )
    keep_checkpoints: int = Field(2, ge=1)
    background_upload: bool | None = Field(
        None,
        description="upload checkpoints on a background thread; None: when the store is remote (s3://)",
    )
    seed: int = 0
    pack: bool | None = Field(
        None, description="pack whole samples into rows of max_len; None: when that computes fewer positions"
    )
    torch_compile: bool | None = Field(None, description="torch.compile the forward; None: on CUDA only")
    pad_to_max_len: bool | None = Field(
        None, description="pad every row to max_len (fixed shapes); None: when compiling"
    )
    threads: int | None = Field(
        None, ge=0, description="CPU intra-op threads; None: physical cores, 0: leave torch's setting"
    )


# What a checkpoint's training state depends on: resuming it under other values would mix two runs
# (AdamW's state carries the old lr, the scheduler the old total, the adapter the old shape). Not in it:
# where and how often checkpoints go (checkpoint_*, keep_checkpoints, background_upload) and how the
# same steps are computed (threads, torch_compile, pad_to_max_len, pack: a resume keeps the
# checkpoint's row layout).
RESUME_KEYS = (
    "r",
    "alpha",
    "dropout",
    "target_modules",
    "lr",
    "epochs",
    "batch_size",
    "max_len",
    "warmup_steps",
    "seed",
)


def resume_params(params: LoraParams, **context: Any) -> dict:
    """The values a checkpoint records and a resume must match: `RESUME_KEYS` of `params`, plus what
    the caller adds (the pipeline: the base model and a fingerprint of the training data)."""
    return {k: getattr(params, k) for k in RESUME_KEYS} | context


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written first."""


@dataclass
class TrainResult:
    """`tokens` counts real tokens (no padding); `positions` counts every position computed, padding
    included; `step_seconds` and `step_tokens` are per step of this run (after any resume)."""

    steps: int
    resumed_from: int
    batch_size: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    positions: int = 0
    packed: bool = False
    rows: int = 0
    compiled: str = "off"
    threads: int | None = None
    step_seconds: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    # seconds training waited per periodic checkpoint (serializing, and uploading unless in background)
    checkpoint_seconds: list[float] = field(default_factory=list)
    serialize_seconds: list[float] = field(default_factory=list)  # of which: taking the state as bytes
    upload_seconds: list[float] = field(default_factory=list)  # per background upload
    checkpoint_steps: list[int] = field(default_factory=list)  # where periodic checkpoints were taken
    checkpoint_intervals: list[int] = field(default_factory=list)  # steps to the next, chosen after each


log = logging.getLogger("meetara.train")


class StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (spot VMs get SIGTERM)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum


def auto_interval(
    step_s: float, blocking_s: float, upload_s: float | None, overhead: float, max_s: float
) -> int:
    """The fewest steps between checkpoints such that one checkpoint blocks training for at most
    `overhead` of the time between two, and a background upload is done before the next one starts
    (else training would wait for it); but never more than `max_s` seconds of training, the most a
    preemption may cost. Fewer steps between checkpoints: less work redone after a preemption.
    bench/checkpoint_cost.py measures the inputs."""
    if step_s <= 0:
        return 1
    need = min(max(blocking_s / overhead, upload_s or 0.0), max_s)
    return max(1, math.ceil(need / step_s))


def batches_for(n: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        try:
            topo = f"/sys/devices/system/cpu/cpu{c}/topology"
            with open(f"{topo}/physical_package_id") as pkg, open(f"{topo}/core_id") as core:
                cores.add((pkg.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


@dataclass
class Layout:
    """The rows a run trains on: sample indices per row, fixed for the whole run."""

    rows: list[list[int]]
    packed: bool
    pad_to_max_len: bool


def plan_rows(lengths: list[int], params: LoraParams, batch_size: int, *, compiling: bool) -> Layout:
    """One sample per row, or packed rows (`params.pack`; None decides: pack when the packed rows
    compute fewer positions per epoch than one sample per row, epoch 0's batches as the measure)."""
    from train.model import pack

    static = compiling if params.pad_to_max_len is None else params.pad_to_max_len
    single = [[i] for i in range(len(lengths))]
    if params.pack is False:
        return Layout(single, False, static)
    packed = pack(lengths, params.max_len, params.seed)
    if params.pack is None:
        # positions computed per epoch: every row padded to max_len, or each batch to its longest row
        def cost(rows: list[list[int]]) -> int:
            if static:
                return len(rows) * params.max_len
            batches = batches_for(len(rows), batch_size, 0, params.seed)
            return sum(len(b) * max(sum(lengths[i] for i in rows[r]) for r in b) for b in batches)

        if cost(packed) >= cost(single):
            return Layout(single, False, static)
    return Layout(packed, True, static)


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
    """Token-weighted mean loss over held-out samples, each cut to the model's positions."""
    import torch

    from train.model import fit_positions, lm_loss

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), _autocast(model):
        for i in range(0, len(data), batch_size):
            chunk = [fit_positions(x, model.config.n_positions) for x in data[i : i + batch_size]]
            n = sum(len(x) - 1 for x in chunk)
            total += float(lm_loss(model, chunk, pad_id)) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def _autocast(model: Any) -> Any:
    """bf16 autocast when the base weights are bf16 (LoRA weights stay fp32), none for an fp32 base."""
    import contextlib

    import torch

    device = next(model.parameters()).device.type
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Forward:
    """The training forward, compiled where asked; the first failure of the compiled one (at any
    step: a new shape compiles anew) switches to eager for the rest of the run."""

    def __init__(self, model: Any, compile_it: bool) -> None:
        import torch

        self.eager = lambda batch: model(**batch, use_cache=False).loss
        self.fn = self.eager
        self.status = "off"
        if compile_it:
            try:
                self.fn = torch.compile(self.eager)
                self.status = "on"
            except Exception as e:  # e.g. torch without a working compiler on this platform
                self.status = f"unavailable: {type(e).__name__}: {str(e)[:200]}"
                log.warning("torch.compile %s; training eagerly", self.status)

    def fall_back(self, e: Exception) -> None:
        self.fn = self.eager
        first = str(e).splitlines()[0][:200] if str(e) else ""
        self.status = f"fell back to eager: {type(e).__name__}: {first}"
        log.warning("torch.compile failed, training eagerly: %s", self.status)


def _auto(result: TrainResult, uploader: checkpoint.Uploader | None, params: LoraParams) -> int:
    """The auto interval from this run's costs so far: recent steps (the first of a run, which may
    include compiling, only while it is the only one), the checkpoint's own cost (serializing, plus
    writing when uploads block; waiting for a previous upload is the upload rule's business, not
    counted here) and recent uploads."""
    steps = result.step_seconds[1:] or result.step_seconds
    own = result.serialize_seconds if uploader is not None else result.checkpoint_seconds
    uploads = uploader.uploads[-3:] if uploader is not None else []
    return auto_interval(
        statistics.median(steps[-20:]),
        statistics.median(own[-3:]),
        max(uploads) if uploads else None,
        params.checkpoint_overhead,
        params.checkpoint_max_seconds,
    )


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
    max_steps: int | None = None,
    resume_key: dict | None = None,
    metrics: Metrics | None = None,
) -> TrainResult:
    """Train the LoRA weights of `model` (a peft model) on `data`, checkpointing to `store` under
    `prefix`, resuming from the newest valid checkpoint there. Raises `Interrupted` after saving
    when `stop` is set. `max_steps` ends the run early (benchmarks); the schedule is unchanged.

    Every checkpoint records `resume_key` (default `resume_params(params)`); a checkpoint that recorded
    other values is not resumed: `checkpoint.ParamsChanged` is raised before anything in the store is
    touched (checkpoints written before they recorded it are resumed as before).

    `metrics` (train/metrics.py) records each step; it continues the curve of the checkpoint resumed,
    goes into every checkpoint as a part and is copied to its own key once that checkpoint is committed.
    The steps after the last checkpoint are in it on return; storing them is the caller's (the pipeline
    writes it with the domain's manifest)."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save
    from transformers import get_linear_schedule_with_warmup

    from train.model import collate_rows

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    threads = None
    if not cuda and params.threads != 0:
        threads = params.threads or physical_cores()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    compiling = params.torch_compile if params.torch_compile is not None else cuda

    key = resume_params(params) if resume_key is None else resume_key
    ckpt = checkpoint.latest(store, prefix)
    if ckpt is not None and (changes := checkpoint.changed_params(ckpt, key)):
        raise checkpoint.ParamsChanged(ckpt.step, changes)
    if metrics is not None:  # first: the stored curve must not run ahead of the checkpoint resumed
        metrics.resume(ckpt.step if ckpt else 0, ckpt.parts.get(metrics.PART) if ckpt else None)
    checkpoint.discard_after(store, prefix, ckpt.step if ckpt else 0)
    batch_size = ckpt.meta["batch_size"] if ckpt else pick_batch_size(model, params, pad_id)
    lengths = [len(x) for x in data]
    layout = plan_rows(lengths, params, batch_size, compiling=compiling)
    if ckpt and ckpt.meta.get("packed", False) != layout.packed:
        # the checkpoint's run decided otherwise (checkpoints without the key predate packing):
        # keep its rows, so the step number still names the same samples
        layout = plan_rows(
            lengths, params.model_copy(update={"pack": not layout.packed}), batch_size, compiling=compiling
        )
    rows = layout.rows
    per_epoch = math.ceil(len(rows) / batch_size)
    total = max(1, round(params.epochs * per_epoch))

    # every row as tensors on the training device, built once; a step gathers its rows there
    table = {
        k: v.to(device, non_blocking=True)
        for k, v in collate_rows([[data[i] for i in row] for row in rows], pad_id, params.max_len).items()
    }
    row_len = [sum(lengths[i] for i in row) for row in rows]
    full = table["input_ids"].shape[1]

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=0.0, fused=cuda)
    sched = get_linear_schedule_with_warmup(opt, min(params.warmup_steps, total // 4), total)

    start = 0
    if ckpt:
        set_peft_model_state_dict(model, st_load(ckpt.parts["adapter.safetensors"]))
        state = torch.load(io.BytesIO(ckpt.parts["state.pt"]), weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if cuda and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        start = ckpt.step

    background = params.background_upload
    if background is None:
        background = not store.url.startswith("file://")
    uploader = checkpoint.Uploader(store, prefix, params.keep_checkpoints) if background else None

    def save(step: int, *, blocking: bool = False) -> None:
        """Take the state at `step` as bytes now; upload it now, or on the uploader's thread."""
        t = time.perf_counter()
        buf = io.BytesIO()
        torch.save(
            {
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if cuda else None,
                "step": step,
            },
            buf,
        )
        adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        parts = {"adapter.safetensors": st_save(adapter), "state.pt": buf.getvalue()}
        meta = {
            "batch_size": batch_size,
            "total_steps": total,
            "epoch": step // per_epoch,
            "position": step % per_epoch,
            "packed": layout.packed,
            "rows": len(rows),
            "params": key,
        }
        after = None
        if metrics is not None:  # the curve up to this step: in the checkpoint, then beside it
            parts[metrics.PART] = metrics.dump()
            after = {metrics.key: parts[metrics.PART]}
        result.serialize_seconds.append(time.perf_counter() - t)
        if uploader is not None and not blocking:
            uploader.submit(step, parts, meta, after)
        else:
            checkpoint.commit(store, prefix, step, parts, meta, keep=params.keep_checkpoints, after=after)

    forward = _Forward(model, compiling)

    def step_loss(batch: dict) -> Any:
        with _autocast(model):
            loss = forward.fn(batch)
        loss.backward()
        return loss

    result = TrainResult(
        steps=total,
        resumed_from=start,
        batch_size=batch_size,
        packed=layout.packed,
        rows=len(rows),
        threads=threads,
    )
    end = total if max_steps is None else min(total, start + max_steps)
    next_auto = start + 1  # the auto interval measures its first checkpoint right away
    t0 = last = time.perf_counter()
    model.train()
    try:
        for step in range(start, end):
            epoch, pos = divmod(step, per_epoch)
            idx = batches_for(len(rows), batch_size, epoch, params.seed)[pos]
            width = full if layout.pad_to_max_len else max(row_len[i] for i in idx)
            sel = torch.tensor(idx, device=device)
            batch = {k: v[:, :width].index_select(0, sel) for k, v in table.items()}
            if forward.status == "on":
                rng = torch.get_rng_state(), (torch.cuda.get_rng_state() if cuda else None)
                try:
                    loss = step_loss(batch)
                except Exception as e:  # compiling failed: this step again, eagerly, from the same state
                    opt.zero_grad(set_to_none=True)
                    torch.set_rng_state(rng[0])
                    if cuda:
                        torch.cuda.set_rng_state(rng[1])
                    forward.fall_back(e)
                    loss = step_loss(batch)
            else:
                loss = step_loss(batch)
            lr = opt.param_groups[0]["lr"]  # this step's (the scheduler moves it on below)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            result.losses.append(loss.item())  # waits for the step: the times below are whole steps
            now = time.perf_counter()
            result.step_seconds.append(now - last)
            last = now
            result.step_tokens.append(sum(row_len[i] for i in idx))
            result.tokens += result.step_tokens[-1]
            result.positions += len(idx) * width
            done = step + 1
            if metrics is not None:
                metrics.train_step(
                    done,
                    epoch=done / per_epoch,
                    loss=result.losses[-1],
                    lr=float(lr),
                    tokens=result.step_tokens[-1],
                    seconds=result.step_seconds[-1],
                )
            if on_step:
                on_step(done, total, result.losses[-1])
            if stop is not None and stop.signum is not None and done < total:
                if uploader is not None:
                    try:
                        uploader.wait()
                    except Exception as e:  # the store may be back: this checkpoint still counts
                        log.warning("an earlier checkpoint upload failed: %s", e)
                save(done, blocking=True)  # written before "checkpoint saved": the one to resume from
                raise Interrupted(f"stopped by signal {stop.signum} at step {done}/{total}; checkpoint saved")
            if done < total and (
                done % params.checkpoint_every == 0 if params.checkpoint_every else done >= next_auto
            ):
                t = time.perf_counter()
                save(done)
                result.checkpoint_seconds.append(time.perf_counter() - t)
                result.checkpoint_steps.append(done)
                result.checkpoint_intervals.append(params.checkpoint_every or _auto(result, uploader, params))
                next_auto = done + result.checkpoint_intervals[-1]
            last = time.perf_counter()  # checkpoint writes and callbacks are not step time
    except BaseException:
        if uploader is not None:
            uploader.close(raise_errors=False)  # the checkpoint in flight still completes
        raise
    if uploader is not None:
        # training is done: a checkpoint that failed to upload is no longer needed to resume (and
        # a store that is still down fails the uploads that follow)
        uploader.close(raise_errors=False)
        result.upload_seconds = uploader.uploads
    result.seconds = time.perf_counter() - t0
    result.compiled = forward.status
    return result
