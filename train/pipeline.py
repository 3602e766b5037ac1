"""One training job: for each domain in order, data -> LoRA -> GGUF -> validation -> manifest.

Store layout under the store's root:
    runs/<run>/base/<base>-Q4_K_M.gguf                   the base model the adapters apply to, once per run
    runs/<run>/base/<base>-f16.gguf                      only with `JobSpec.base_f16` (--base-f16)
    runs/<run>/domains/<domain>/checkpoints/step-N/      training checkpoints (see checkpoint.py)
    runs/<run>/domains/<domain>/checkpoints/metrics.jsonl
                                                         training curve: step losses, held-out losses
                                                         (train/metrics.py; `read_metrics` reads it)
    runs/<run>/domains/<domain>/adapter.gguf             LoRA adapter, f16 (llama.cpp `--lora`)
    runs/<run>/domains/<domain>/model-Q4_K_M.gguf        merged model, quantized: only with `JobSpec.merged`
    runs/<run>/domains/<domain>/adapter.safetensors      final LoRA weights: what warm starts load
    runs/<run>/domains/<domain>/warm_start.json          which adapter training started from (resumes)
    runs/<run>/domains/<domain>/manifest.json            written last: the domain is done

Warm starts (`JobSpec.warm_start`, off by default: bench/RESULTS.md measured no reliable gain on the
tiny model): a domain that starts training (no checkpoint yet) takes the final LoRA weights of the
most similar domain already done in this run (train/similarity.py) instead of a fresh LoRA. The
manifest says which (`warm_start`); the weights are under `warm_start_weights`, not `files`, so pulls
fetch only the GGUF files.

Interruptions: SIGTERM/SIGINT during training checkpoints and raises `lora.Interrupted`. One that comes
after training (export, validation: a Ctrl-C reaches llama.cpp's validation child too and kills it)
raises `Interrupted` as well, before anything of the domain is published: no GGUF, no manifest, no
failed.json (a killed check says nothing about the file). Its checkpoints stay; a rerun resumes from
them, exports and validates again.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import platform
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from train import BadInput, checkpoint
from train.bounds import Samples
from train.data import domain_data
from train.domains import Domain, load_registry, select_domains
from train.lora import Interrupted, LoraParams, StopFlag, attach_lora, heldout_loss, resume_params
from train.lora import train as train_lora
from train.metrics import Metrics, metrics_key
from train.names import RunId
from train.similarity import profile
from train.store import ObjectStore, open_store

log = logging.getLogger("meetara.train")
MANIFEST = "manifest.json"
WARM_START = "warm_start.json"
WARM_WEIGHTS = "adapter.safetensors"


class Tolerance(BaseModel):
    """How close llama.cpp's logits must be to the transformers model's (fp32, same token ids).

    Measured on the tiny model: f16 base + f32 adapter ~0.002-0.007 max |diff| (llama.cpp's f16 KV cache
    is most of it), top-1 100%; the same base without its adapter is 0.6-3.4 away, so the adapter bound
    fails an adapter that is not applied. Q4_K_M's error grows with the logits' scale, so its bound is
    relative to their standard deviation (measured 0.55-0.6 of it), with top-1 agreement 81-99%.

    What ships is the Q4_K_M base + an f16 adapter (issue 14). Measured (2026-12-01, `python -m train`
    manifests; bench/RESULTS.md, "Outputs users load"), tiny: 62 domains of default training (adapter
    effects, the max |logit change| an adapter makes in transformers, 1.1-4.5) and 8 of a short one
    (effects 0.06-0.13); DialoGPT-medium's shape with random weights (`random:`): 13 domains, effects
    0.75-1.0:
    - f16 base + f16 adapter: 0.0016-0.0042 (tiny), 0.0031-0.0039 (real shape): `adapter_max_abs` holds;
    - Q4_K_M base + adapter vs the reference: 0.065-0.19 of the logits' std (tiny), 0.84-0.99 (real
      shape: random weights' logits are small, std 0.64, against a Q4_K_M error of ~0.6):
      `adapter_q4_max_rel` 1.25. Not applied (the base alone vs the adapted reference): 0.10-0.17 (tiny,
      small effects: no different), 0.5-2.4 (tiny, default training), 1.06-1.49 (real shape): so this
      bound alone cannot tell an ignored adapter at the real shape, nor where effects are small;
    - the adapter's effect as llama.cpp applies it on the Q4_K_M base (with minus without) vs
      transformers' effect: off by 0.026-0.10 of the effect (tiny, default training), 0.11-0.17 (real
      shape), and by 0.38-0.91 of tiny's small effects, whose error is the quantization's noise instead:
      0.16-0.37 of the base's own Q4_K_M error (0.13-0.36 max |diff| on tiny, 0.57-0.61 at the real
      shape). An ignored adapter is off by its whole effect (1.0). Bound: max(`adapter_delta_max_rel`
      0.35 x the effect, `adapter_delta_floor_rel` 0.75 x the base's error); an adapter whose effect is
      below the floor is told from an ignored one by the f16 check (less than half the effect away),
      which runs in every job (the f16 base is written to make the Q4_K_M; shipped only with --base-f16).
    - top-1 on the Q4_K_M base, a position agreeing within the base's own Q4_K_M error: 100% everywhere
      (strict: 92-100% tiny, 73-78% real shape, random weights' near-ties): `quantized_top1` 0.75."""

    adapter_max_abs: float = 0.05
    adapter_top1: float = 0.95
    quantized_max_rel: float = 1.0
    quantized_top1: float = 0.75
    adapter_q4_max_rel: float = 1.25
    adapter_delta_max_rel: float = 0.35
    adapter_delta_floor_rel: float = 0.75


class JobSpec(BaseModel):
    """Everything `python -m train` needs; the launcher renders the same fields into a task."""

    domains: list[str] = Field(min_length=1)
    store: str = "file://./store"
    run_id: RunId = "default"
    base_model: str = "tiny"
    samples: Samples = Field(200, description="generated conversations per domain")
    noise: float = Field(0.1, ge=0, le=1)
    data_dir: Path | None = None
    params: LoraParams = LoraParams()
    merged: bool = Field(False, description="also ship each domain's merged model, quantized to Q4_K_M")
    base_f16: bool = Field(False, description="also ship the base model's f16 GGUF (Q4_K_M always)")
    adapter_dtype: Literal["f16", "f32"] = "f16"
    endpoint_url: str | None = None
    tolerance: Tolerance = Tolerance()
    warm_start: bool = Field(
        False, description="start each domain's LoRA from the most similar domain already done in the run"
    )
    overlap: bool | None = Field(
        None,
        description="check, upload and record each domain in a worker thread while the next one trains; "
        "default: on when training on a GPU (the CPU is free then), off on a CPU (both would share its "
        "cores: bench/RESULTS.md measured the job 1.7x slower); never with warm starts",
    )
    restart_if_changed: bool = Field(
        False,
        description="a domain whose checkpoint was trained with other parameters starts over from step 0 "
        "(its checkpoints are deleted); without it, such a run is refused before anything is done",
    )


@dataclass
class Events:
    """Progress hooks (the CLI draws rich progress bars with them)."""

    domain_start: Callable[[str, int, int], None] = lambda name, i, n: None
    step: Callable[[int, int, float], None] = lambda step, total, loss: None
    domain_end: Callable[[str, dict], None] = lambda name, result: None


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def domain_prefix(run_id: str, domain: str) -> str:
    return f"runs/{run_id}/domains/{domain}"


def is_done(store: ObjectStore, run_id: str, domain: str) -> bool:
    return store.exists(f"{domain_prefix(run_id, domain)}/{MANIFEST}")


# the parameters a checkpoint records (`resume_key`) as the command line names them
_FLAGS = {
    "r": "--lora-r",
    "alpha": "--lora-alpha",
    "lr": "--lr",
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "seed": "--seed",
    "base_model": "--base-model",
    "data": "training data",
}


def data_fingerprint(samples: list) -> str:
    """A short hash of the training samples (`--data-dir`, `--samples`, `--seed` change them)."""
    blob = json.dumps([[s.prompt, s.response] for s in samples], ensure_ascii=False).encode()
    return "sha256:" + checkpoint.sha256(blob)[:16]


def resume_key(spec: JobSpec, train_samples: list) -> dict:
    """What a domain's checkpoints record and a resume must match (`lora.resume_params`): the training
    parameters, the base model and the training data. Not the store, run id, the other domains of the
    job, the checkpoint interval or anything else that does not change the training state."""
    return resume_params(spec.params, base_model=spec.base_model, data=data_fingerprint(train_samples))


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "auto" if value is None else str(value)


def changed_message(found: list[tuple[str, int, list]]) -> str:
    """One line for checkpoints trained with other parameters: (domain, step, [(name, old, new)])."""

    def diff(changes: list) -> str:
        return ", ".join(f"{_FLAGS.get(k, k)} {_show(old)} -> {_show(new)}" for k, old, new in changes)

    if len(found) == 1:
        (name, step, changes), them, their = found[0], "it", "its"
        what = f"{name}: the checkpoint at step {step} was trained with other parameters ({diff(changes)})"
    else:
        them, their = "them", "their"
        what = "checkpoints trained with other parameters: " + ", ".join(
            f"{name} at step {step} ({diff(changes)})" for name, step, changes in found
        )
    return (
        f"{what}; rerun with the original values to resume {them}, or add --restart-if-changed to start "
        f"{them} over from step 0 with the new ones (deletes {their} checkpoints)"
    )


def check_resumes(store: ObjectStore, spec: JobSpec, todo: list[tuple[Domain, tuple]]) -> None:
    """Refuse (BadInput) when a domain's newest checkpoint was trained with other parameters than this
    run's, before anything is loaded or written; with `spec.restart_if_changed`, delete such a
    domain's checkpoints instead, so that it starts over (checkpoints with the same parameters are
    still resumed: the same command can be rerun after a preemption)."""
    found = []
    for d, data in todo:
        prefix = f"{domain_prefix(spec.run_id, d.name)}/checkpoints"
        ckpt = checkpoint.latest(store, prefix)
        if ckpt is not None and (changes := checkpoint.changed_params(ckpt, resume_key(spec, data[0]))):
            found.append((d.name, ckpt.step, changes, prefix))
    if found and not spec.restart_if_changed:
        raise BadInput(changed_message([f[:3] for f in found]))
    for name, step, changes, prefix in found:
        log.warning("%s; starting over from step 0", changed_message([(name, step, changes)]).split(";")[0])
        checkpoint.discard_after(store, prefix, 0)


def run_job(spec: JobSpec, *, events: Events | None = None, stop: StopFlag | None = None) -> dict:
    """Train every domain of `spec` in order; domains whose manifest is in the store are skipped.
    Returns a summary; raises `BadInput` on bad input and `lora.Interrupted` on SIGTERM/SIGINT.

    Everything a user can get wrong (domains, store, data files) is checked before the base model
    loads, so a typo costs seconds, not a model download."""
    events = events or Events()
    registry = load_registry()
    domains = select_domains(spec.domains, registry)
    if spec.data_dir is not None and not spec.data_dir.is_dir():
        raise BadInput(f"--data-dir {spec.data_dir} is not a directory")
    store = open_store(spec.store, endpoint_url=spec.endpoint_url)
    store.list(f"runs/{spec.run_id}/base")  # fail fast on a store we cannot reach

    summary: dict[str, Any] = {
        "run_id": spec.run_id,
        "store": store.url,
        "base_model": spec.base_model,
        "domains": {},
    }
    todo = []
    for d in domains:
        if is_done(store, spec.run_id, d.name):
            summary["domains"][d.name] = {"status": "skipped", "reason": "manifest already in store"}
        else:
            todo.append(
                (
                    d,
                    domain_data(
                        d, n=spec.samples, seed=spec.params.seed, data_dir=spec.data_dir, noise=spec.noise
                    ),
                )
            )
    if not todo:
        return summary
    check_resumes(store, spec, todo)

    from train.cpu import job_threads, passive_wait

    passive_wait()
    import torch

    from train.model import load_base

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads, finish_threads = torch.get_num_threads(), None
    try:
        # on a CPU, the cores the machine's load leaves free (train.cpu: oversubscribed, it crawls),
        # from the base model's load on (the tiny model is trained when it is not cached)
        free = job_threads() if device == "cpu" else None
        if free is not None:
            finish_threads = free
            torch.set_num_threads(free)
        base = load_base(
            spec.base_model,
            registry,
            device=device,
            dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        )
        summary["base_load_seconds"] = round(time.perf_counter() - t0, 3)
        from train.llama_check import LlamaWorker

        # a warm start reads the domains done so far, so it waits for them
        overlap = (device == "cuda" if spec.overlap is None else spec.overlap) and not spec.warm_start
        if overlap and device == "cpu":  # asked for on a CPU: training and finishing get cores of their own
            import os

            cores = free or len(os.sched_getaffinity(0))
            finish_threads = max(1, cores // 4)
            torch.set_num_threads(max(1, cores - finish_threads))
        with (
            tempfile.TemporaryDirectory(prefix="meetara-") as tmp,
            LlamaWorker(threads=finish_threads) as worker,
        ):
            bases = _ensure_base_gguf(store, spec, base, Path(tmp))
            summary["timings"] = {"load": summary["base_load_seconds"], **bases.timings}
            _train_all(todo, spec, base, store, bases, Path(tmp), events, stop, worker, overlap, summary)
            summary["llama_worker_starts"] = worker.starts
    finally:
        torch.set_num_threads(threads)
    return summary


def _train_all(
    todo: list, spec: JobSpec, base: Any, store: ObjectStore, bases: Any, tmp: Path, events: Events,
    stop: StopFlag | None, worker: Any, overlap: bool, summary: dict,
) -> None:  # fmt: skip
    """Train the domains in order; finish each (`finish_domain`) beside the next one's training when
    `overlap`. Fills summary["domains"], and "schedule": when each domain trained and was finished."""
    t_job = time.perf_counter()
    schedule: list[dict] = []

    def timed(phase: str, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter() - t_job
        try:
            return fn()
        finally:
            end = time.perf_counter() - t_job
            schedule.append({"domain": name, "phase": phase, "start": round(start, 3), "end": round(end, 3)})

    def finish(t: Trained) -> dict:
        return timed("finish", t.d.name, lambda: finish_domain(t, spec, base, store, bases, stop, worker))

    def record(finished: list[tuple[str, dict]]) -> None:
        for name, result in finished:
            summary["domains"][name] = result
            events.domain_end(name, result)

    with Finisher(overlap, finish) as fin:
        for i, (d, data) in enumerate(todo):
            if stop is not None and stop.signum is not None:
                raise Interrupted(f"stopped by signal {stop.signum} before {d.name}")
            events.domain_start(d.name, i, len(todo))
            trained = timed(
                "train",
                d.name,
                lambda d=d, data=data: train_and_export(d, data, spec, base, store, tmp, events, stop),
            )
            record(fin.submit(trained))  # the previous domain's, when overlapping
        record(fin.drain())
    summary["overlap"] = overlap
    summary["domains_seconds"] = round(time.perf_counter() - t_job, 3)
    summary["schedule"] = sorted(schedule, key=lambda e: e["start"])


@dataclass
class BaseFiles:
    """The run's base GGUFs: `entries` {"q4_k_m", and "f16" with `JobSpec.base_f16`} as manifests record
    them ({key, sha256, size}); `local` the job's copies by the same names ("f16" always: the Q4_K_M is
    made from it, and the adapter's tight check runs on it)."""

    entries: dict[str, dict]
    local: dict[str, Path]
    timings: dict[str, float]


def base_key(run_id: str, base_model: str, kind: str) -> str:
    """Where a run's base GGUF lives: kind "Q4_K_M" (shipped) or "f16" (with --base-f16)."""
    return f"runs/{run_id}/base/{safe_name(base_model)}-{kind}.gguf"


def _ensure_base_gguf(store: ObjectStore, spec: JobSpec, base: Any, tmp: Path) -> BaseFiles:
    """The run's base GGUFs, written to the store once per run (a later job of the run downloads the
    Q4_K_M instead): the f16 file is always written here (the Q4_K_M is quantized from it, and it is
    the adapter's tight check), uploaded only with `spec.base_f16`."""
    from train.gguf_export import quantize, write_model_gguf

    timings: dict[str, float] = {}
    keys = {"q4_k_m": base_key(spec.run_id, spec.base_model, "Q4_K_M")}
    if spec.base_f16:
        keys["f16"] = base_key(spec.run_id, spec.base_model, "f16")
    local = {"f16": tmp / "base-f16.gguf", "q4_k_m": tmp / "base-Q4_K_M.gguf"}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t, 3)
        return out

    f16_key = base_key(spec.run_id, spec.base_model, "f16")
    if store.exists(f16_key):  # asked for, or a run begun before the Q4_K_M base was what ships
        timed("base_download", lambda: store.get_file(f16_key, local["f16"]))
    else:
        timed(
            "base_export_f16",
            lambda: write_model_gguf(
                _fp32_cpu(base.model), base.tokenizer, local["f16"], name=spec.base_model, dtype="f16"
            ),
        )
    if store.exists(keys["q4_k_m"]):
        timed("base_download", lambda: store.get_file(keys["q4_k_m"], local["q4_k_m"]))
    else:
        timed("base_quantize", lambda: quantize(local["f16"], local["q4_k_m"], "Q4_K_M"))
        timed("base_upload", lambda: store.put_file(keys["q4_k_m"], local["q4_k_m"]))
    if "f16" in keys and not store.exists(keys["f16"]):
        timed("base_upload", lambda: store.put_file(keys["f16"], local["f16"]))
    entries = {name: _file_entry(key, local[name]) for name, key in keys.items()}
    return BaseFiles(entries, local, timings)


def _fp32_cpu(model: Any) -> Any:
    import torch

    p = next(model.parameters())
    return (
        model if (p.device.type == "cpu" and p.dtype == torch.float32) else copy.deepcopy(model).float().cpu()
    )


def _file_entry(key: str, path: Path) -> dict:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"key": key, "sha256": h.hexdigest(), "size": path.stat().st_size}


def warm_start(
    d: Domain, spec: JobSpec, store: ObjectStore, model: Any, prefix: str, terms: dict[str, int]
) -> dict | None:
    """With `spec.warm_start`, load into `model`'s fresh LoRA the final weights of the most similar
    domain done in this run (same base model and LoRA shape; similarity from the registry and the data
    profiles, `terms` being this domain's) and return {"from", "similarity"}; None when off or there is
    none. A domain resuming from a checkpoint keeps the record it started with."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load as st_load

    from train.similarity import most_similar

    record_key = f"{prefix}/{WARM_START}"
    if checkpoint.latest(store, f"{prefix}/checkpoints") is not None:
        return json.loads(store.get(record_key)) if store.exists(record_key) else None
    record = None
    if spec.warm_start:
        registry = load_registry()
        shape = ("r", "alpha", "target_modules")
        done, profiles = {}, {d.name: terms}
        for key in store.list(f"runs/{spec.run_id}/domains"):
            name = key.split("/")[-2]
            if key == f"{domain_prefix(spec.run_id, name)}/{MANIFEST}" and name in registry.names:
                m = json.loads(store.get(key))
                if (
                    m.get("warm_start_weights")
                    and m["base_model"] == spec.base_model
                    and all(m["params"][k] == getattr(spec.params, k) for k in shape)
                ):
                    done[name] = m["warm_start_weights"]
                    if m["data"].get("profile"):
                        profiles[name] = m["data"]["profile"]
        best = most_similar(d, [registry.get(n) for n in done], registry, profiles)
        if best is not None:
            entry = done[best[0]]
            data = store.get(entry["key"])
            if checkpoint.sha256(data) == entry["sha256"]:
                set_peft_model_state_dict(model, st_load(data))
                record = {"from": best[0], "similarity": best[1]}
            else:
                log.warning("warm start: %s does not match its manifest; starting cold", entry["key"])
    if record is not None or store.exists(record_key):
        store.put(record_key, json.dumps(record).encode())
    return record


def _stop_if_asked(stop: StopFlag | None, what: str) -> None:
    """Raise `Interrupted` if SIGTERM/SIGINT came (`stop`): an export or validation cut short has no
    verdict, so the domain is neither published nor recorded as failed; a rerun resumes it."""
    if stop is not None and stop.signum is not None:
        raise Interrupted(
            f"stopped by signal {stop.signum} {what}; nothing recorded for it, rerun resumes it"
        )


class Finisher:
    """Finishes trained domains (`finish_domain`: check, upload, record) in order, beside the training
    of the next one when `overlap`: one worker thread, at most one domain waiting (`submit` first
    collects the one before), so memory stays bounded and the manifests are the same as one after the
    other. Without `overlap`, each is finished at once. Leaving the block waits for the worker; its
    error (or an interrupt) is raised there unless another one is already on its way out."""

    def __init__(self, overlap: bool, finish: Callable[[Any], dict]) -> None:
        self.overlap, self.finish = overlap, finish
        self.pool: Any = None
        self.pending: tuple[str, Any] | None = None

    def __enter__(self) -> Finisher:
        if self.overlap:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meetara-finish")
        return self

    def submit(self, trained: Any) -> list[tuple[str, dict]]:
        """Finish `trained` (now, or in the worker); returns the domains finished meanwhile."""
        if self.pool is None:
            return [(trained.d.name, self.finish(trained))]
        done = self.drain()
        self.pending = (trained.d.name, self.pool.submit(self.finish, trained))
        return done

    def drain(self) -> list[tuple[str, dict]]:
        """Wait for the domain in the worker, if any."""
        if self.pending is None:
            return []
        name, future = self.pending
        self.pending = None
        return [(name, future.result())]

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        if self.pool is None:
            return
        try:
            if self.pending is not None:  # leaving with an error: the worker's domain still ends cleanly
                if error is None:
                    self.drain()
                else:
                    with contextlib.suppress(BaseException):
                        self.drain()
        finally:
            self.pool.shutdown(wait=True)


@dataclass
class Trained:
    """A domain trained and exported, with its reference logits taken while its adapter was in the
    model: what `finish_domain` checks, uploads and records (in the job's worker while the next domain
    trains)."""

    d: Domain
    params: LoraParams
    data: tuple
    terms: dict
    warm: dict | None
    loss_before: float
    loss_after: float
    result: Any  # lora.TrainResult
    curve: Metrics
    out: Path
    files: dict[str, Path]
    probe: Any  # validate.Reference
    timings: dict[str, float]
    detail: dict[str, float]
    merged_f16: Path | None = None  # to quantize when finishing (--merged)


def train_domain(
    d: Domain,
    data: tuple,
    spec: JobSpec,
    base: Any,
    store: ObjectStore,
    bases: BaseFiles,
    tmp: Path,
    events: Events,
    stop: StopFlag | None,
    worker: Any = None,
) -> dict:
    """Train, export, validate one domain and commit its manifest. Returns the manifest.

    `timings` (seconds): data, train, export, validate, upload (the outputs; the manifest follows);
    `timings_detail` the parts: adapter_export, merge, merged_export_f16, merged_quantize, and the
    validation's (reference logits, GGUF reads, each llama.cpp check)."""
    trained = train_and_export(d, data, spec, base, store, tmp, events, stop)
    return finish_domain(trained, spec, base, store, bases, stop, worker)


def train_and_export(
    d: Domain,
    data: tuple,
    spec: JobSpec,
    base: Any,
    store: ObjectStore,
    tmp: Path,
    events: Events,
    stop: StopFlag | None,
) -> Trained:
    """The part of a domain that needs the model: train, export the adapter (and the merged f16 with
    --merged), take the reference logits; then take the adapter out of the shared base."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from train.gguf_export import write_adapter_gguf, write_model_gguf
    from train.model import encode
    from train.validate import reference

    timings: dict[str, float] = {}
    detail: dict[str, float] = {}
    prefix = domain_prefix(spec.run_id, d.name)
    # GPT-2's positions are learned: no sample (nor a padded row) may be longer than the model's
    params = spec.params.model_copy(update={"max_len": min(spec.params.max_len, base.config.n_positions)})
    t = time.perf_counter()
    train_s, held_s, quality, source = data
    sep = base.tokenizer.eos_token or "\0"  # a turn separator in the text is not a term of the domain
    terms = profile(x.replace(sep, " ") for s in train_s for x in (s.prompt, s.response))
    train_ids = encode(train_s, base.tokenizer, params.max_len)
    held_ids = encode(held_s, base.tokenizer, params.max_len)
    timings["data"] = time.perf_counter() - t

    t = time.perf_counter()
    model = attach_lora(base.model, params)
    try:
        warm = warm_start(d, spec, store, model, prefix, terms)
        with model.disable_adapter():
            loss_before = heldout_loss(model, held_ids, base.tokenizer.pad_token_id)
        curve = Metrics(store, metrics_key(spec.run_id, d.name))
        curve.heldout("before", 0, loss_before)
        if stop is not None:
            stop.training = True  # a deadline now means: checkpoint at the next step, then stop
        try:
            result = train_lora(
                model,
                train_ids,
                params,
                pad_id=base.tokenizer.pad_token_id,
                store=store,
                prefix=f"{prefix}/checkpoints",
                stop=stop,
                on_step=events.step,
                resume_key=resume_key(spec, train_s),
                metrics=curve,
            )
        except checkpoint.ParamsChanged as e:  # written since `check_resumes` looked (another job)
            raise BadInput(changed_message([(d.name, e.step, e.changes)])) from None
        if stop is not None:
            stop.training = False
        # a signal during the last step (which saves no checkpoint): stop now, as during any other step
        _stop_if_asked(stop, f"after training {d.name}, before its export")
        loss_after = heldout_loss(model, held_ids, base.tokenizer.pad_token_id)
        curve.heldout("after", result.steps, loss_after)
        timings["train"] = time.perf_counter() - t

        t = time.perf_counter()
        out = tmp / d.name
        out.mkdir(exist_ok=True)
        lora_state = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()}
        adapter = write_adapter_gguf(
            lora_state,
            out / "adapter.gguf",
            alpha=spec.params.alpha,
            base_name=spec.base_model,
            dtype=spec.adapter_dtype,
        )
        files = {"adapter": adapter}
        save_file(lora_state, out / WARM_WEIGHTS)
        detail["adapter_export"] = time.perf_counter() - t
        # export and validation use an fp32 CPU copy (on the GPU the model is bf16); on CPU, the model itself
        ref = _fp32_cpu(model)
        merged_f16 = None
        if spec.merged:
            t1 = time.perf_counter()
            merged = copy.deepcopy(ref).merge_and_unload()
            t2 = time.perf_counter()
            merged_f16 = write_model_gguf(
                merged, base.tokenizer, out / "merged-f16.gguf", name=f"{spec.base_model}-{d.name}"
            )
            del merged
            detail |= {"merge": t2 - t1, "merged_export_f16": time.perf_counter() - t2}
        timings["export"] = time.perf_counter() - t
        _stop_if_asked(stop, f"while exporting {d.name}")
        probe = reference(ref, base, held_s[0].prompt)
    finally:
        base.model = model.unload()  # peft injected layers into the shared base: take them out again
    return Trained(
        d, params, data, terms, warm, loss_before, loss_after, result, curve, out, files, probe,
        timings, detail, merged_f16,
    )  # fmt: skip


def finish_domain(
    t: Trained,
    spec: JobSpec,
    base: Any,
    store: ObjectStore,
    bases: BaseFiles,
    stop: StopFlag | None,
    worker: Any = None,
) -> dict:
    """The part of a domain that does not need the model: quantize a merged model (--merged), run the
    llama.cpp checks against the reference logits, upload the outputs, write the manifest (or
    failed.json). Returns the manifest."""
    from train.gguf_export import quantize
    from train.llama_check import LlamaCheckInterrupted
    from train.validate import validate_files

    d, files, timings, detail = t.d, t.files, t.timings, t.detail
    prefix = domain_prefix(spec.run_id, d.name)
    train_s, held_s, quality, source = t.data
    if t.merged_f16 is not None:
        t0 = time.perf_counter()
        files["merged_q4_k_m"] = quantize(t.merged_f16, t.out / "model-Q4_K_M.gguf", "Q4_K_M")
        t.merged_f16.unlink()
        detail["merged_quantize"] = time.perf_counter() - t0
        timings["export"] += detail["merged_quantize"]
        _stop_if_asked(stop, f"while exporting {d.name}")

    t0 = time.perf_counter()
    stopped = None if stop is None else (lambda: stop.signum is not None)
    try:
        validation = validate_files(
            t.probe, base.config, files, bases.local, spec, stop=stopped, worker=worker
        )
    except LlamaCheckInterrupted as e:  # the job was stopped, or llama.cpp's child got a stop signal
        _stop_if_asked(stop, f"while validating {d.name}")
        raise Interrupted(f"validating {d.name}: {e}; nothing recorded for it, rerun resumes it") from None
    # whatever the checks said, one that ran while the job was being stopped may have been cut short
    _stop_if_asked(stop, f"while validating {d.name}")
    timings["validate"] = time.perf_counter() - t0 + t.probe.seconds
    detail |= {f"validate_{k}": v for k, v in validation["timings"].items()}

    validation["heldout_loss_improved"] = t.loss_after < t.loss_before
    validation["passed"] = validation["passed"] and validation["heldout_loss_improved"]
    t0 = time.perf_counter()
    entries = {}
    for name, path in files.items():
        key = f"{prefix}/{path.name}"
        store.put_file(key, path)
        entries[name] = _file_entry(key, path) | {"gguf": validation["files"][name].get("summary")}
    store.put_file(f"{prefix}/{WARM_WEIGHTS}", t.out / WARM_WEIGHTS)
    timings["upload"] = time.perf_counter() - t0
    result = t.result
    manifest = {
        "domain": d.name,
        "category": d.category,
        "run_id": spec.run_id,
        "status": "done" if validation["passed"] else "failed",
        "base_model": spec.base_model,
        # what the adapter applies to, as users load it (llama.cpp -m <base> --lora adapter.gguf)
        "base_gguf": bases.entries["q4_k_m"],
        "base_files": bases.entries,  # every base GGUF the run ships: q4_k_m, and f16 with --base-f16
        "files": entries,
        "warm_start_weights": _file_entry(f"{prefix}/{WARM_WEIGHTS}", t.out / WARM_WEIGHTS),
        "warm_start": t.warm,
        "params": t.params.model_dump(),  # as trained (max_len within the model's positions)
        "data": {
            "source": source,
            "quality": quality.as_dict(),
            "train": len(train_s),
            "heldout": len(held_s),
            "profile": t.terms,  # the most frequent terms: warm starts compare domains by them too
        },
        "metrics": {
            "heldout_loss_before": round(t.loss_before, 5),
            "heldout_loss_after": round(t.loss_after, 5),
            "steps": result.steps,
            "resumed_from_step": result.resumed_from,
            "checkpoints": len(result.checkpoint_steps),
            "checkpoint_interval": result.checkpoint_intervals[-1] if result.checkpoint_intervals else None,
            "batch_size": result.batch_size,
            "final_train_loss": round(result.losses[-1], 5) if result.losses else None,
            "tokens_per_second": round(result.tokens / result.seconds, 1) if result.seconds else None,
            "curve": t.curve.key,  # every step's loss, lr, tokens/s and the held-out losses (JSON Lines)
        },
        "validation": validation,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "timings_detail": {k: round(v, 3) for k, v in detail.items()},
        "created": time.time(),
        "host": platform.node(),
    }
    # the complete curve (the steps after the last checkpoint too), just before the domain is done
    t.curve.write()
    # a failed domain keeps its checkpoints and gets no manifest, so a rerun retries it
    name = MANIFEST if validation["passed"] else "failed.json"
    store.put(f"{prefix}/{name}", json.dumps(manifest, indent=1).encode())
    if validation["passed"]:
        store.delete(f"{prefix}/failed.json")
    return manifest
