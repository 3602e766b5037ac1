"""Stage costs of a training job: seconds, bytes and peak memory of every stage, at the real shape
(`random:microsoft/DialoGPT-medium`: DialoGPT-medium's 355M-parameter shape, seeded random weights,
GPT-2's real tokenizer, offline) and for the tiny default, for 1 and for N domains in one job.

Each configuration runs the real pipeline (`train.pipeline.run_job`, as `python -m train` does) in a
fresh process pinned with `taskset` to 1 or 2 cores, writing to an S3 store served by a local moto
server (a separate process pinned to the same cores, so its work is charged to the job's CPUs). The
child wraps the pipeline's own functions with timers, so the stages are the pipeline's, not a copy:

- per job: interpreter start + imports, base model load/build, base f16 GGUF export, its Q4_K_M
  quantization (`base_quantize`), the upload;
- per domain: data (generate + filter + split, then tokenize), LoRA attach, held-out loss (before
  and after), training steps, checkpoint uploads, adapter export, with `--merged` the merge (copy +
  merge_and_unload), merged f16 export and Q4_K_M quantize, validation parts (transformers reference
  logits, GGUF header reads, llama.cpp: the adapter on the Q4_K_M base, the Q4_K_M base alone, the
  adapter on the f16 base, a merged model; in the job's one worker process since issue 14, each a
  child of its own before), upload of the outputs and the manifest.

Seconds are exclusive (a stage's nested stages are counted under their own names). Peak memory is the
process's resident set high-water mark during the stage (reset at each stage's start through
/proc/self/clear_refs) and, for stages that run llama.cpp in a child process, the child's (sampled
every 20 ms). From the figures the planner's overheads are derived (the "planner" section of the
JSON; launcher/plan.py holds them): per domain = data + export + validation + upload, per job =
everything in the job's process that is not a domain's (imports, load, base GGUF export and upload).

The machine's sharing: each configuration first waits (at most --max-wait s) for a 1-minute load
average of --max-load, and records the load before and after it, and CPU seconds beside seconds.

The serial share of the overheads (how much more vCPUs shorten them, the planner's scaling rule) comes
from `--scaling`: the heavy stages alone, on 1 core and on 2, alternately, best of each (whole jobs on 1
and 2 cores are recorded too, but other work on the machine swamps that comparison).

Run (writes bench/stages.json; about 12 minutes of work on a 2-core VM, plus the waits):

    python bench/stages.py
    python bench/stages.py --scaling --reps 2
    python bench/stages.py --only tiny-1,tiny-3     # rerun some, keep the others' records
    python bench/stages.py --only real-3 --merged --out bench/stages-merged.json   # with merged models
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = "random:microsoft/DialoGPT-medium"
DOMAINS = ["nutrition", "legal", "financial"]
# (label, base model, domains, cores); the real shape on 1 core too: a whole-job view of what a second
# core buys (the planner's share comes from --scaling)
CONFIGS = [
    ("tiny-1", "tiny", DOMAINS[:1], "0,1"),
    ("tiny-3", "tiny", DOMAINS, "0,1"),
    ("real-1-1core", REAL, DOMAINS[:1], "0"),
    ("real-1", REAL, DOMAINS[:1], "0,1"),
    ("real-3", REAL, DOMAINS, "0,1"),
]
PER_DOMAIN = ("data", "export", "validate", "upload")  # what the planner's per-domain overhead sums


# ----------------------------------------------------------------------------------------------------
# child: one job, instrumented


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process's threads and its waited-for children so far."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Recorder:
    """Nested, timed stages of the main thread (exclusive seconds), with bytes and memory peaks."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.stack: list[dict] = []
        self.domain: str | None = None
        self.lock = threading.Lock()
        self.can_reset = True
        self.children = threading.Event()  # set while a stage runs a llama.cpp child process
        self._reset_hwm()

    def _reset_hwm(self) -> None:
        if not self.can_reset:
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the resident set high-water mark (VmHWM) to the current RSS
        except OSError:
            self.can_reset = False

    def _fold_hwm(self) -> None:
        hwm = _rss_kb("VmHWM")
        for r in self.stack:
            r["peak_kb"] = max(r["peak_kb"], hwm)

    @contextlib.contextmanager
    def stage(self, name: str, nbytes=None):
        if threading.current_thread() is not threading.main_thread():
            t = time.perf_counter()
            rec = {"stage": name + "_background", "domain": self.domain, "seconds": 0.0, "bytes": 0}
            try:
                yield rec
            finally:
                rec["seconds"] = time.perf_counter() - t
                rec["exclusive"] = rec["seconds"]
                rec["bytes"] = rec["bytes"] or (nbytes() if callable(nbytes) else nbytes or 0)
                with self.lock:
                    self.records.append(rec)
            return
        self._fold_hwm()
        self._reset_hwm()
        rec = {
            "stage": name,
            "domain": self.domain,
            "seconds": 0.0,
            "bytes": 0,
            "peak_kb": _rss_kb("VmRSS"),
            "child_peak_kb": 0,
            "nested": 0.0,
            "nested_cpu": 0.0,
        }
        with self.lock:
            self.stack.append(rec)
        t, cpu = time.perf_counter(), _cpu_s()
        try:
            yield rec
        finally:
            rec["seconds"] = time.perf_counter() - t
            rec["cpu"] = _cpu_s() - cpu
            self._fold_hwm()
            with self.lock:
                self.stack.pop()
                if self.stack:
                    self.stack[-1]["nested"] += rec["seconds"]
                    self.stack[-1]["nested_cpu"] += rec["cpu"]
                    self.stack[-1]["peak_kb"] = max(self.stack[-1]["peak_kb"], rec["peak_kb"])
                    self.stack[-1]["child_peak_kb"] = max(
                        self.stack[-1]["child_peak_kb"], rec["child_peak_kb"]
                    )
                rec["exclusive"] = rec["seconds"] - rec.pop("nested")
                rec["exclusive_cpu"] = rec["cpu"] - rec.pop("nested_cpu")
                if not rec["bytes"]:
                    rec["bytes"] = nbytes() if callable(nbytes) else nbytes or 0
                self.records.append(rec)

    def parent(self) -> str | None:
        return self.stack[-1]["stage"] if self.stack else None

    def sample_children(self, stop: threading.Event) -> None:
        """While a stage runs a child process (`children`), its resident set every 20 ms (sampling only
        then: listing processes costs CPU the job would otherwise have)."""
        import psutil

        me = psutil.Process()
        while not stop.wait(0.02):
            if not self.children.is_set():
                self.children.wait(0.5)
                continue
            rss = 0
            for c in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    rss += c.memory_info().rss
            if rss:
                with self.lock:
                    for r in self.stack:
                        r["child_peak_kb"] = max(r["child_peak_kb"], rss // 1024)


def _size(p) -> int:
    try:
        return Path(p).stat().st_size
    except (OSError, TypeError):
        return 0


def instrument(rec: Recorder) -> None:
    """Wrap the pipeline's own functions (module attributes, looked up at call time) with timers."""
    import copy
    import types

    from peft.tuners.lora import LoraModel

    import train.gguf_export as gx
    import train.model as tm
    import train.pipeline as tp
    import train.store as ts
    import train.validate as tv

    def wrap(obj, attr, name, nbytes=None):
        fn = getattr(obj, attr)

        @functools.wraps(fn)
        def wrapper(*a, **kw):
            label = name(a, kw) if callable(name) else name
            with rec.stage(label) as r:
                out = fn(*a, **kw)
                if nbytes is not None:
                    r["bytes"] = nbytes(a, kw, out)
                return out

        setattr(obj, attr, wrapper)

    def run_domain(fn):
        @functools.wraps(fn)
        def wrapper(d, *a, **kw):
            rec.domain = getattr(d, "d", d).name  # finish_domain takes the Trained domain
            try:
                with rec.stage("domain"):
                    return fn(d, *a, **kw)
            finally:
                rec.domain = None

        return wrapper

    wrap(tm, "load_base", "load")
    wrap(tp, "_ensure_base_gguf", "base_gguf")
    # a domain's two halves (the job calls them one after the other: `overlap` is off here)
    tp.train_and_export = run_domain(tp.train_and_export)
    tp.finish_domain = run_domain(tp.finish_domain)

    def data_generate(fn):
        @functools.wraps(fn)
        def wrapper(d, *a, **kw):
            rec.domain = d.name
            try:
                with rec.stage("data_generate"):
                    return fn(d, *a, **kw)
            finally:
                rec.domain = None

        return wrapper

    tp.domain_data = data_generate(tp.domain_data)
    wrap(tp, "attach_lora", "attach_lora")
    wrap(tp, "warm_start", "warm_start")
    wrap(tp, "heldout_loss", "heldout_loss")
    wrap(tp, "train_lora", "train_steps")
    wrap(gx, "write_adapter_gguf", "adapter_export", lambda a, kw, out: _size(out))
    wrap(
        gx,
        "write_model_gguf",
        lambda a, kw: "base_export_f16" if rec.parent() == "base_gguf" else "merged_export_f16",
        lambda a, kw, out: _size(out),
    )
    wrap(
        gx,
        "quantize",
        lambda a, kw: "base_quantize" if rec.parent() == "base_gguf" else "quantize",
        lambda a, kw, out: _size(out),
    )
    tp.copy = types.SimpleNamespace(deepcopy=copy.deepcopy)
    wrap(tp.copy, "deepcopy", "merge_copy")
    wrap(LoraModel, "merge_and_unload", "merge")
    wrap(tv, "reference_logits", "val_reference_logits")
    wrap(tv, "read_gguf_summary", "val_gguf_read", lambda a, kw, out: out.get("file_size", 0))

    def llama_label(a, kw) -> str:
        name = Path(str(a[0] if a else kw.get("model"))).name
        if name.startswith("model-"):
            return "val_llama_quantized"  # a merged model (--merged)
        kind = "q4" if "Q4_K_M" in name else "f16"
        return f"val_llama_{kind}_" + ("adapter" if kw.get("lora") else "base")

    def llama_bytes(a, kw, out) -> int:
        return _size(a[0] if a else kw.get("model")) + _size(kw.get("lora"))

    wrap(tv, "run_llama_check", llama_label, llama_bytes)
    timed_check = tv.run_llama_check

    def run_llama_check(*a, **kw):
        rec.children.set()
        try:
            return timed_check(*a, **kw)
        finally:
            rec.children.clear()

    tv.run_llama_check = run_llama_check
    # the job's one llama.cpp worker (issue 14 item 4): `self` first, then the model
    from train.llama_check import LlamaWorker

    worker_eval = LlamaWorker.evaluate

    def evaluate(self, *a, **kw):
        with rec.stage(llama_label(a, kw)) as r:
            rec.children.set()
            try:
                out = worker_eval(self, *a, **kw)
            finally:
                rec.children.clear()
            r["bytes"] = llama_bytes(a, kw, out)
            return out

    LlamaWorker.evaluate = evaluate

    def put_label(a, kw) -> str:
        return {"base_gguf": "base_upload", "train_steps": "checkpoint_upload", "domain": "upload"}.get(
            rec.parent() or "", "store_put"
        )

    for cls in (ts.FileStore, ts.S3Store):
        wrap(cls, "put_file", put_label, lambda a, kw, out: _size(a[2]))
        wrap(cls, "put", put_label, lambda a, kw, out: len(a[2]))
        wrap(cls, "get_file", "store_get", lambda a, kw, out: _size(a[2]))


def child(args: argparse.Namespace) -> None:
    import psutil

    created = psutil.Process().create_time()
    rec = Recorder()
    with rec.stage("imports"):
        import boto3  # noqa: F401
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401

        import train.pipeline as tp
        from train.lora import LoraParams
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    instrument(rec)
    stop = threading.Event()
    sampler = threading.Thread(target=rec.sample_children, args=(stop,), daemon=True)
    sampler.start()
    spec = tp.JobSpec(
        domains=args.domains.split(","),
        store=args.store,
        run_id="stages",
        base_model=args.base_model,
        samples=args.samples,
        endpoint_url=args.endpoint_url,
        params=LoraParams(epochs=args.epochs, batch_size=args.batch_size),
        **({"merged": True} if args.merged else {}),
        overlap=False,  # stage by stage: each one timed alone (the overlap is measured as a whole job)
    )
    t = time.perf_counter()
    summary = tp.run_job(spec)
    job_s = time.perf_counter() - t
    stop.set()
    sampler.join()
    out = {
        "process_s": time.time() - created,
        "process_cpu_s": _cpu_s(),
        "run_job_s": job_s,
        "threads": torch.get_num_threads(),
        "cores": sorted(os.sched_getaffinity(0)),
        "hwm_reset": rec.can_reset,
        "records": rec.records,
        "base_load_seconds": summary.get("base_load_seconds"),
        "domains": {
            name: {
                "status": m.get("status"),
                "timings": m.get("timings"),
                "steps": m.get("metrics", {}).get("steps"),
                "tokens_per_second": m.get("metrics", {}).get("tokens_per_second"),
                "checkpoints": m.get("metrics", {}).get("checkpoints"),
                "train_samples": m.get("data", {}).get("train"),
                "heldout_samples": m.get("data", {}).get("heldout"),
                "files": {k: f["size"] for k, f in m.get("files", {}).items()},
                "validation_passed": m.get("validation", {}).get("passed"),
            }
            for name, m in summary["domains"].items()
        },
    }
    # process start -> run_job: interpreter, imports, instrumenting (the "imports" stage is part of it)
    out["startup_s"] = out["process_s"] - job_s
    Path(args.result).write_text(json.dumps(out, indent=1))


# ----------------------------------------------------------------------------------------------------
# parent: moto server, one child per configuration, aggregation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(cores: str):
    port = _free_port()
    code = f"from moto.server import main; main(['-H', '127.0.0.1', '-p', '{port}'])"
    proc = subprocess.Popen(
        ["taskset", "-c", cores, sys.executable, "-c", code],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("moto server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()  # the server this run started, by its own handle
        proc.wait(10)


def wait_for_quiet(max_load: float, max_wait: float) -> float:
    """Wait until the machine's 1-minute load average is at most `max_load` (others' work shares these
    cores), at most `max_wait` seconds; returns the seconds waited."""
    t = time.perf_counter()
    while os.getloadavg()[0] > max_load and time.perf_counter() - t < max_wait:
        time.sleep(10)
    return round(time.perf_counter() - t, 1)


def run_config(label: str, model: str, domains: list[str], cores: str, args) -> dict:
    import boto3

    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        PYTHONPATH=str(ROOT),
    )
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "MEETARA_STORE"):
        env.pop(var, None)
    result = Path(args.tmp) / f"{label}.json"
    with moto_server(cores) as url:
        boto3.client(
            "s3", endpoint_url=url, aws_access_key_id="bench", aws_secret_access_key="bench"
        ).create_bucket(Bucket="stages")
        cmd = [
            "taskset", "-c", cores, sys.executable, str(Path(__file__).resolve()), "--child",
            "--base-model", model, "--domains", ",".join(domains), "--store", "s3://stages/run",
            "--endpoint-url", url, "--samples", str(args.samples), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--result", str(result),
            *(["--merged"] if args.merged else []),
        ]  # fmt: skip
        load_before = os.getloadavg()
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
        load_after = os.getloadavg()
    if proc.returncode != 0 or not result.exists():
        sys.exit(f"{label}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out.update(
        started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() - wall)),
        label=label,
        base_model=model,
        n_domains=len(domains),
        cores_arg=cores,
        wall_s=round(wall, 2),
        load_before=[round(x, 2) for x in load_before],
        load_after=[round(x, 2) for x in load_after],
        command=" ".join(cmd),
    )
    return out


def _stage_table(records: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in records:
        s = out.setdefault(
            r["stage"],
            {"seconds": 0.0, "cpu_s": 0.0, "bytes": 0, "peak_mb": 0, "child_peak_mb": 0, "calls": 0},
        )
        s["seconds"] += r["exclusive"]
        s["cpu_s"] += r.get("exclusive_cpu", 0.0)
        s["bytes"] += r["bytes"]
        s["calls"] += 1
        s["peak_mb"] = max(s["peak_mb"], round(r.get("peak_kb", 0) / 1024))
        s["child_peak_mb"] = max(s["child_peak_mb"], round(r.get("child_peak_kb", 0) / 1024))
    for s in out.values():
        s["seconds"] = round(s["seconds"], 3)
        s["cpu_s"] = round(s["cpu_s"], 3)
    return out


def aggregate(run: dict) -> dict:
    """Per job and per domain: exclusive seconds, bytes and peaks of each stage; the overhead sums."""
    records = [r for r in run["records"] if r["stage"] != "domain"]
    job = _stage_table([r for r in records if r["domain"] is None])
    names = list(run["domains"])
    per = {d: _stage_table([r for r in records if r["domain"] == d]) for d in names}
    domain_s = {d: sum(r["seconds"] for r in run["records"] if r["stage"] == "domain" and r["domain"] == d)
                for d in names}  # fmt: skip
    groups = {}
    for d in names:
        t, st = run["domains"][d]["timings"], per[d]
        # the pipeline's own groups (its manifest timings) beside the stages they are made of
        groups[d] = {
            "data": st["data_generate"]["seconds"] + t["data"],
            "train": t["train"],
            "export": t["export"],
            "validate": t["validate"],
            "upload": st.get("upload", {}).get("seconds", 0.0),
        }
        groups[d]["other"] = domain_s[d] + st["data_generate"]["seconds"] - sum(groups[d].values())
    n = len(names)
    training = ("attach_lora", "warm_start", "heldout_loss", "train_steps", "checkpoint_upload")
    dom_cpu = {
        d: sum(r.get("cpu", 0.0) for r in run["records"] if r["stage"] == "domain" and r["domain"] == d)
        + per[d]["data_generate"]["cpu_s"]
        - sum(per[d].get(k, {}).get("cpu_s", 0.0) for k in training)
        for d in names
    }
    stage_names = list(dict.fromkeys(k for d in names for k in per[d]))
    mean = {
        k: {
            "seconds": round(sum(per[d].get(k, {}).get("seconds", 0) for d in names) / n, 3),
            "cpu_s": round(sum(per[d].get(k, {}).get("cpu_s", 0) for d in names) / n, 3),
            "bytes": round(sum(per[d].get(k, {}).get("bytes", 0) for d in names) / n),
            "peak_mb": max(per[d].get(k, {}).get("peak_mb", 0) for d in names),
            "child_peak_mb": max(per[d].get(k, {}).get("child_peak_mb", 0) for d in names),
        }
        for k in stage_names
    }
    groups_mean = {g: round(sum(groups[d][g] for d in names) / n, 3) for g in groups[names[0]]}
    # everything in the job's process that is not a domain's: imports, load, base GGUF, store checks
    per_job = (
        run["process_s"] - sum(domain_s.values()) - sum(per[d]["data_generate"]["seconds"] for d in names)
    )
    return {
        "label": run["label"],
        "started": run.get("started"),
        "base_model": run["base_model"],
        "domains": n,
        "cores": run["cores"],
        "torch_threads": run["threads"],
        "wall_s": run["wall_s"],
        "process_s": round(run["process_s"], 2),
        "process_cpu_s": round(run.get("process_cpu_s", 0.0), 2),
        "load_before": run["load_before"],
        "load_after": run["load_after"],
        "waited_s": run.get("waited_s"),
        "peak_rss_mb": round(max(r.get("peak_kb", 0) for r in run["records"]) / 1024),
        # sampled every 20 ms (getrusage's children figure counts the forked copy of this process)
        "children_peak_rss_mb": round(max(r.get("child_peak_kb", 0) for r in run["records"]) / 1024),
        "hwm_reset": run["hwm_reset"],
        "job": job,
        "per_domain_mean": mean,
        "per_domain_groups_mean": groups_mean,
        "per_domain_groups": {d: {k: round(v, 3) for k, v in g.items()} for d, g in groups.items()},
        "per_domain_overhead_s": round(sum(groups_mean[k] for k in PER_DOMAIN), 2),
        "per_job_overhead_s": round(per_job, 2),
        # the same from CPU seconds (this process's threads and its llama.cpp children; not the S3
        # server's): what other work on the machine inflates far less than seconds
        "per_domain_overhead_cpu_s": round(sum(dom_cpu.values()) / n, 2),
        "per_job_overhead_cpu_s": round(
            run.get("process_cpu_s", 0.0)
            - sum(r.get("cpu", 0.0) for r in run["records"] if r["stage"] == "domain")
            - sum(per[d]["data_generate"]["cpu_s"] for d in names),
            2,
        ),
        "domain_facts": run["domains"],
        "command": run["command"],
    }


def serial_share(t1: float, t2: float) -> float:
    """Amdahl: the share of a time measured on 2 cores that a second core did not shorten, from the
    same work timed on 1 core (t1) and on 2 (t2): serial = 2 t2 - t1, parallel = 2 (t1 - t2)."""
    return round(min(1.0, max(0.0, (2 * t2 - t1) / t2)), 3)


def _util_share(cpu: float, wall: float) -> float:
    return round(min(1.0, max(0.0, 2 - cpu / wall)), 3) if wall else 1.0


# the stages timed again in isolation on 1 and on 2 cores (`--scaling`), and the per-domain / per-job
# stages of the job whose serial share each one stands for; every other stage counts as serial
SCALED = {
    "per_domain": {
        "quantize": "quantize",
        "merged_export_f16": "export_f16",
        "val_gguf_read": "gguf_read",
        "val_llama_quantized": "llama_q4_k_m",
        "val_llama_adapter": "llama_f16",  # before issue 14: a child per check
        "val_llama_f16_adapter": "llama_f16",
        "val_llama_q4_adapter": "llama_q4_k_m",
        "val_llama_q4_base": "llama_q4_k_m",
    },
    "per_job": {"load": "load", "base_export_f16": "export_f16", "base_quantize": "quantize"},
}


def weighted_share(run: dict, scaling: dict, part: str) -> float:
    """The serial share of `run`'s per-domain or per-job overhead: each stage's measured share
    (`scaling`), weighted by its seconds in `run`; stages not timed in isolation count as serial."""
    stages = run["per_domain_mean"] if part == "per_domain" else run["job"]
    total = run["per_domain_overhead_s"] if part == "per_domain" else run["per_job_overhead_s"]
    parallel = sum(
        stages[k]["seconds"] * (1 - scaling["serial_share"][m])
        for k, m in SCALED[part].items()
        if k in stages
    )
    return round(1 - parallel / total, 3)


def planner(runs: dict[str, dict], scaling: dict | None) -> dict:
    from launcher.throughput import model_params

    real3, real1, real1c, tiny3 = runs["real-3"], runs["real-1"], runs["real-1-1core"], runs["tiny-3"]
    out = {
        "measured_vcpus": 2,
        "points": {
            "tiny": {
                "params": model_params("tiny"),
                "per_domain_s": tiny3["per_domain_overhead_s"],
                "per_job_s": tiny3["per_job_overhead_s"],
                "from": "tiny-3",
            },
            "microsoft/DialoGPT-medium": {
                "params": model_params("microsoft/DialoGPT-medium"),
                "per_domain_s": real3["per_domain_overhead_s"],
                "per_job_s": real3["per_job_overhead_s"],
                "from": "real-3",
            },
        },
        # whole jobs on 1 core and on 2: other work on the machine can swamp this (see bench/RESULTS.md)
        "serial_share_from_jobs": {
            "per_domain": serial_share(real1c["per_domain_overhead_s"], real1["per_domain_overhead_s"]),
            "per_job": serial_share(real1c["per_job_overhead_s"], real1["per_job_overhead_s"]),
            "from": "real-1-1core vs real-1",
        },
        # from the 2-core run alone: with S seconds on one core and P on both, cpu = S + 2P and
        # wall = S + P, so S / wall = 2 - cpu / wall (other work on the machine lowers cpu / wall)
        "serial_share_from_utilization": {
            "per_domain": _util_share(real3["per_domain_overhead_cpu_s"], real3["per_domain_overhead_s"]),
            "per_job": _util_share(real3["per_job_overhead_cpu_s"], real3["per_job_overhead_s"]),
            "from": "real-3, CPU seconds / seconds",
        },
    }
    if scaling:
        out["serial_share"] = {
            "per_domain": weighted_share(real3, scaling, "per_domain"),
            "per_job": weighted_share(real3, scaling, "per_job"),
            "from": "--scaling (best of each stage on 1 and 2 cores), weighted by real-3's stage seconds",
        }
    else:
        out["serial_share"] = out["serial_share_from_jobs"]
    return out


# ----------------------------------------------------------------------------------------------------
# --scaling: the heavy CPU stages alone, on 1 core and on 2, alternately, best of each


def scale_child(args: argparse.Namespace) -> None:
    import tempfile

    import torch

    from train.domains import load_registry
    from train.gguf_export import quantize, read_gguf_summary, write_model_gguf
    from train.llama_check import run_llama_check
    from train.model import load_base

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    times = {}

    def timed(stage, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        times[stage] = round(time.perf_counter() - t, 3)
        return out

    base = timed("load", load_base, REAL, load_registry())
    ids = base.tokenizer("what should i eat for more iron? " * 6)["input_ids"]
    with tempfile.TemporaryDirectory(prefix="meetara-scaling-") as tmp:
        f16, q4 = Path(tmp) / "f16.gguf", Path(tmp) / "q4.gguf"
        timed("export_f16", write_model_gguf, base.model, base.tokenizer, f16, name="bench", dtype="f16")
        timed("quantize", quantize, f16, q4)
        timed("gguf_read", lambda: (read_gguf_summary(q4), read_gguf_summary(f16)))
        # llama.cpp with as many threads as cores (by default it takes half the machine's CPUs)
        timed("llama_q4_k_m", run_llama_check, q4, ids, generate=8, threads=threads)
        timed("llama_f16", run_llama_check, f16, ids, generate=8, threads=threads)
    Path(args.result).write_text(json.dumps({"threads": threads, "seconds": times}))


def scaling(args: argparse.Namespace) -> dict:
    import tempfile

    reps: dict[str, list[dict]] = {"0": [], "0,1": []}
    loads = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="meetara-scaling-") as tmp:
        for rep in range(args.reps):
            for cores in reps:
                wait_for_quiet(args.max_load, 120)
                result = Path(tmp) / f"{rep}-{cores}.json"
                before = os.getloadavg()
                cmd = ["taskset", "-c", cores, sys.executable, str(Path(__file__).resolve()),
                       "--scale-child", "--result", str(result)]  # fmt: skip
                proc = subprocess.run(
                    cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
                )
                if proc.returncode != 0:
                    sys.exit(f"scaling {cores}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
                reps[cores].append(json.loads(result.read_text())["seconds"])
                loads.append({"cores": cores, "before": before[0], "after": os.getloadavg()[0]})
                print(f"  cores {cores}: {reps[cores][-1]}", flush=True)
    best = {c: {k: min(r[k] for r in runs) for k in runs[0]} for c, runs in reps.items()}
    return {
        "command": f"python bench/stages.py --scaling --reps {args.reps}",
        "started": started,
        "runs": reps,
        "load_1min": loads,
        "best": best,
        "serial_share": {k: serial_share(best["0"][k], best["0,1"][k]) for k in best["0"]},
    }


def versions() -> dict:
    from importlib.metadata import version

    return {
        p: version(p) for p in ("torch", "transformers", "peft", "llama_cpp_python", "gguf", "boto3", "moto")
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scale-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--scaling",
        action="store_true",
        help="time the heavy CPU stages alone on 1 and on 2 cores (--reps times each, alternately) and "
        "add the serial shares to --out",
    )
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--base-model", default=REAL)
    p.add_argument("--domains", default=",".join(DOMAINS))
    p.add_argument("--store")
    p.add_argument("--endpoint-url")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--merged", action="store_true", help="jobs ship merged Q4_K_M models too")
    p.add_argument("--only", help="comma-separated configuration labels (default: all)")
    p.add_argument("--out", default=str(ROOT / "bench" / "stages.json"))
    p.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-min load average this low")
    p.add_argument("--max-wait", type=float, default=900, help="... but at most this many seconds")
    p.add_argument(
        "--reaggregate",
        action="store_true",
        help="recompute --out's figures from its raw records, run nothing",
    )
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if args.scale_child:
        scale_child(args)
        return
    if args.scaling:
        out = json.loads(Path(args.out).read_text())
        out["scaling"] = scaling(args)
        finish(out, {label: aggregate(r) for label, r in out["raw"].items()}, args.out)
        return
    if args.reaggregate:
        out = json.loads(Path(args.out).read_text())
        finish(out, {label: aggregate(r) for label, r in out["raw"].items()}, args.out)
        return
    import tempfile

    configs = [c for c in CONFIGS if not args.only or c[0] in args.only.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    runs, raw, kept = {}, {}, {}
    if args.only and Path(args.out).exists():  # rerun some configurations, keep the others' records
        kept = json.loads(Path(args.out).read_text())
        raw = {k: v for k, v in kept["raw"].items() if k not in args.only.split(",")}
        runs = {k: aggregate(v) for k, v in raw.items()}
    with tempfile.TemporaryDirectory(prefix="meetara-stages-") as tmp:
        args.tmp = tmp
        for label, model, domains, cores in configs:
            waited = wait_for_quiet(args.max_load, args.max_wait)
            print(f"{label}: {model}, {len(domains)} domain(s), cores {cores} ...", flush=True)
            raw[label] = run_config(label, model, domains, cores, args) | {"waited_s": waited}
            runs[label] = aggregate(raw[label])
            a = runs[label]
            print(
                f"  wall {a['wall_s']} s, per job {a['per_job_overhead_s']} s, per domain overhead "
                f"{a['per_domain_overhead_s']} s, groups {a['per_domain_groups_mean']}, peak RSS "
                f"{a['peak_rss_mb']} MB, load {a['load_before']} -> {a['load_after']}",
                flush=True,
            )
    out = {
        "started": started,
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(),
            "node": platform.node(),
        },
        "versions": versions(),
        "settings": {"samples": args.samples, "epochs": args.epochs, "batch_size": args.batch_size},
        "command": "python bench/stages.py",
        "raw": raw,  # each child's records as measured: `--reaggregate` recomputes the rest from them
    }
    if "scaling" in kept:
        out["scaling"] = kept["scaling"]
    finish(out, runs, args.out)


def finish(out: dict, runs: dict, path: str) -> None:
    order = [c[0] for c in CONFIGS]
    runs = {k: runs[k] for k in sorted(runs, key=lambda k: order.index(k) if k in order else len(order))}
    out["runs"] = runs
    # the configurations may come from several invocations (--only, --scaling): the earliest start
    out["started"] = min([r["started"] for r in runs.values() if r.get("started")] or [out["started"]])
    out.pop("planner", None)
    if all(k in runs for k in ("real-3", "real-1", "real-1-1core", "tiny-3")):
        out["planner"] = planner(runs, out.get("scaling"))
        print(json.dumps(out["planner"], indent=1))
    raw = out.pop("raw")
    out["raw"] = raw  # last: the figures first when read
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
