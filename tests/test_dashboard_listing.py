"""The dashboard's live pages share what they read of a run's store (issue 27, item 6): open pages
polling a run about once a second each cost one S3 LIST per `api.LISTING_MAX_AGE_S`, not one per page
per second. A real dashboard server, a run whose store is on a real S3 server (moto) behind a proxy
that counts the requests."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from faults import S3Proxy

from launcher import api
from launcher.launch import new_run
from launcher.plan import Workload, plan_local
from launcher.preferences import Preferences
from train.store import open_store

PAGES = 3
WINDOW_S = 6.0  # how long the pages are watched polling: a rate is measured over it, nothing waits on it


def a_run(tmp_path: Path, bucket: str, endpoint: str) -> str:
    """A run on record whose store is s3://BUCKET/p through `endpoint`, with one domain done."""
    plan = plan_local(["nutrition", "legal"], Preferences(), Workload(), "listed")
    store = f"s3://{bucket}/p"
    rec = new_run(plan, store=store, endpoint_url=endpoint, models_dir=tmp_path / "models", budget=None)
    rec.save()
    manifest = {"status": "done", "validation": {"passed": True}, "files": {}, "created": time.time()}
    st = open_store(store, endpoint_url=endpoint)
    st.put("runs/listed/domains/nutrition/manifest.json", json.dumps(manifest).encode())
    return rec.run_id


@contextlib.contextmanager
def dashboard_server(env: dict[str, str], cwd: Path):
    """`meetara dashboard --port 0` as a user starts it; yields (host, port); stops it by its PID."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "dashboard", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)  # it prints the URL once it listens
        line = proc.stdout.readline() if ready else ""
        found = re.search(r"http://([\d.]+|localhost):(\d+)", line)
        assert found, f"no URL printed: {line!r}"
        yield found.group(1), int(found.group(2))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_open_pages_share_one_listing_of_the_runs_store(tmp_path, bucket, s3_server, monkeypatch):
    proxy = S3Proxy(s3_server)
    env = {**os.environ, "MEETARA_STATE_DIR": str(tmp_path / "state")}
    monkeypatch.setenv("MEETARA_STATE_DIR", env["MEETARA_STATE_DIR"])
    try:
        run = a_run(tmp_path, bucket, proxy.url)

        # in the api: a reading no older than max_age_s is reused; without it, the store is listed
        before = proxy.lists()
        for _ in range(3):
            detail = api.run_detail(run, max_age_s=60)
        assert proxy.lists() - before == 1 and detail.done == 1
        api.run_detail(run)
        assert proxy.lists() - before == 2

        with dashboard_server(env, tmp_path) as (host, port):
            streams = []
            for _ in range(PAGES):  # pages open on the run: each stream polls the api once a second
                conn = http.client.HTTPConnection(host, port, timeout=60)
                conn.request("GET", f"/events/runs/{run}")
                resp = conn.getresponse()
                assert resp.status == 200
                while not resp.readline().startswith(b"event: update"):  # the page's first fragment
                    pass
                streams.append(conn)
            start = proxy.lists()
            time.sleep(WINDOW_S)
            listed = proxy.lists() - start
            for conn in streams:
                conn.close()
        # one page alone listed once a second before: PAGES x WINDOW_S listings
        most = WINDOW_S / api.LISTING_MAX_AGE_S + 1
        assert listed <= most, f"{listed} listings in {WINDOW_S:g} s by {PAGES} pages (at most {most:g})"
    finally:
        proxy.close()
