"""What a checkpoint costs, and the checkpoint interval that follows from it.

    python bench/checkpoint_cost.py                       # tiny and dialogpt-medium-shape, CPU, ~3 min

For each model, `train.lora.train` itself (what `python -m train` runs) trains `--steps` steps with a
checkpoint every `--every` steps, twice: to a file store (uploads block, as for `file://`) and to a
real S3-compatible server on 127.0.0.1 (moto, started here; uploads in the background, as for
`s3://`). Reported, as medians: the training step (checkpoint excluded), what one checkpoint blocks
training for (serializing the adapter, optimizer, scheduler and RNG state, plus the write when
uploads block), how long a background upload takes, and the checkpoint's size.

The interval that follows: the fewest steps N such that (a) the blocking cost is at most
`--overhead` (2 %) of N steps of training and (b) an upload finishes within N steps, so background
uploads never queue behind each other (training would then wait for them). Fewer steps between
checkpoints means less work redone after a preemption, so the smallest such N is the one to take.

A local S3 server answers in milliseconds; a real bucket across the internet takes longer (about
100 ms per request plus the transfer), which only (b) feels: the report gives the upload time that
N steps cover.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def measure(
    model_name: str, store_url: str, endpoint: str | None, steps: int, every: int, batch: int
) -> dict:
    import torch
    from train_throughput import build_model, make_data

    from train.lora import LoraParams, attach_lora, train
    from train.store import open_store

    path = Path(tempfile.mkdtemp()) / "data.json"
    pad_id = make_data(path, 128, domains=4)["pad_id"]
    data = json.loads(path.read_text())
    params = LoraParams(batch_size=batch, checkpoint_every=every, torch_compile=False, pack=False)
    model = attach_lora(build_model(model_name, "cpu", torch.float32), params)
    store = open_store(store_url, endpoint_url=endpoint)
    r = train(model, data, params, pad_id=pad_id, store=store, prefix="bench", max_steps=steps)
    folder = f"bench/step-{every * len(r.checkpoint_seconds):08d}"
    size = sum(len(store.get(k)) for k in store.list(folder))
    return {
        "model": model_name,
        "store": store_url.split(":")[0],
        "background": bool(r.upload_seconds),
        "steps": len(r.step_seconds),
        "checkpoints": len(r.checkpoint_seconds),
        "step_s": statistics.median(r.step_seconds),
        "blocking_s": statistics.median(r.checkpoint_seconds),
        "upload_s": statistics.median(r.upload_seconds) if r.upload_seconds else None,
        "bytes": size,
    }


def interval(row: dict, overhead: float) -> int:
    """What `python -m train` would pick from these costs (train.lora.auto_interval, default cap)."""
    from train.lora import LoraParams, auto_interval

    cap = LoraParams().checkpoint_max_seconds
    return auto_interval(row["step_s"], row["blocking_s"], row["upload_s"], overhead, cap)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,dialogpt-medium-shape")
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--overhead", type=float, default=0.02)
    ap.add_argument("--json", type=Path, default=Path("checkpoint_cost.json"))
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args(argv)

    import boto3
    import torch
    from moto.server import ThreadedMotoServer

    # the local server takes any credentials; never send the user's real ones to it
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    os.environ.pop("AWS_SESSION_TOKEN", None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    rows, t0 = [], time.time()
    try:
        for name in args.models.split(","):
            for url, ep in ((f"file://{tempfile.mkdtemp()}", None), (f"s3://bench/{name}", endpoint)):
                row = measure(name, url, ep, args.steps, args.every, args.batch)
                row["interval"] = interval(row, args.overhead)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    finally:
        server.stop()
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.platform()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "overhead": args.overhead,
        "batch": args.batch,
        "rows": rows,
        "wall_s": round(time.time() - t0, 1),
    }
    args.json.write_text(json.dumps(report, indent=1))
    if not args.no_results:
        lines = [
            "",
            f"Run {report['date']} UTC · {report['machine']} · torch {report['torch']} · batch "
            f"{args.batch} · `python bench/checkpoint_cost.py` · {report['wall_s']} s",
            "",
            "| model | store | upload | s/step | blocks training | upload | size | interval (steps) |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            up = f"{r['upload_s'] * 1000:.0f} ms" if r["upload_s"] is not None else "-"
            lines.append(
                f"| {r['model']} | {r['store']} | {'background' if r['background'] else 'blocking'} "
                f"| {r['step_s']:.3f} | {r['blocking_s'] * 1000:.1f} ms | {up} "
                f"| {r['bytes'] / 2**20:.2f} MiB | {r['interval']} |"
            )
        with args.results.open("a") as f:
            f.write("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
