"""Pulling outputs: sha256-verified, atomic, resumable; a bad download never replaces a good file."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from conftest import run_cli
from test_store import small_filesystem

from launcher.pull import pull, pull_domain
from train import BadInput
from train.store import open_store


def entry(key: str, data: bytes) -> dict:
    return {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def publish(store, run: str, domain: str, status: str = "done", size: int = 300_000) -> dict[str, bytes]:
    """A finished domain as the training job leaves it: files first, the manifest last."""
    files = {
        "adapter": os.urandom(size),
        "merged_q4_k_m": os.urandom(size // 3),
    }
    base = b"GGUF" + hashlib.sha256(run.encode()).digest() * 30  # one base per run, shared by its domains
    names = {"adapter": "adapter.gguf", "merged_q4_k_m": "model-Q4_K_M.gguf"}
    prefix = f"runs/{run}/domains/{domain}"
    for name, data in files.items():
        store.put(f"{prefix}/{names[name]}", data)
    store.put(f"runs/{run}/base/tiny-f16.gguf", base)
    manifest = {
        "domain": domain,
        "status": status,
        "validation": {"passed": status == "done"},
        "base_gguf": entry(f"runs/{run}/base/tiny-f16.gguf", base),
        "files": {n: entry(f"{prefix}/{names[n]}", d) for n, d in files.items()},
    }
    store.put(
        f"{prefix}/{'manifest.json' if status == 'done' else 'failed.json'}", json.dumps(manifest).encode()
    )
    return files


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path}/store")
    s3 = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("bucket")
    return open_store(f"s3://{bucket}/p", endpoint_url=s3)


def test_pull_verifies_and_is_idempotent(store, tmp_path):
    files = publish(store, "r", "legal")
    dest = tmp_path / "models"
    first = pull_domain(store, "r", "legal", dest)
    assert first.status == "pulled"
    assert (dest / "legal" / "adapter.gguf").read_bytes() == files["adapter"]
    assert (dest / "legal" / "model-Q4_K_M.gguf").read_bytes() == files["merged_q4_k_m"]
    assert (dest / "base" / "tiny-f16.gguf").exists()
    assert json.loads((dest / "legal" / "manifest.json").read_text())["domain"] == "legal"
    assert not list(dest.rglob(".*.part"))
    again = pull_domain(store, "r", "legal", dest)
    assert (again.status, again.bytes) == ("up-to-date", 0)


def test_corrupt_object_is_refused_and_the_previous_file_kept(store, tmp_path):
    publish(store, "r", "legal")
    dest = tmp_path / "models"
    old = b"an adapter from an earlier pull"
    (dest / "legal").mkdir(parents=True)
    (dest / "legal" / "adapter.gguf").write_bytes(old)
    # the store's object no longer matches what its manifest recorded (bit rot, a half-written upload)
    store.put("runs/r/domains/legal/adapter.gguf", b"garbage" * 1000)
    r = pull_domain(store, "r", "legal", dest)
    assert r.status == "error" and "sha256" in r.detail and "previous local file is kept" in r.detail
    assert (dest / "legal" / "adapter.gguf").read_bytes() == old
    assert not (dest / "legal" / "manifest.json").exists()
    assert not list(dest.rglob(".*.part"))


def test_partial_download_is_resumed(store, tmp_path):
    files = publish(store, "r", "legal", size=2_000_000)
    dest = tmp_path / "models"
    part = dest / "legal" / ".adapter.gguf.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(files["adapter"][:1_200_000])  # an earlier pull stopped here
    r = pull_domain(store, "r", "legal", dest)
    assert r.status == "pulled"
    assert (dest / "legal" / "adapter.gguf").read_bytes() == files["adapter"]
    # only the rest of the adapter was fetched (plus the other files in full)
    others = len(files["merged_q4_k_m"]) + (dest / "base" / "tiny-f16.gguf").stat().st_size
    assert r.bytes == 800_000 + others


def test_unfinished_and_failed_domains_are_not_pulled(store, tmp_path):
    publish(store, "r", "legal")
    publish(store, "r", "nutrition", status="failed")
    results = {
        x.domain: x.status for x in pull(store, "r", ["legal", "nutrition", "finance"], tmp_path / "m")
    }
    assert results == {"legal": "pulled", "nutrition": "failed-validation", "finance": "not-finished"}
    assert not (tmp_path / "m" / "nutrition").exists()


# ---- a models folder that cannot take the files ----------------------------------------------------


def test_a_models_dir_that_is_a_file_is_one_line_bad_input(tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    publish(store, "r", "legal")
    a_file = tmp_path / "models"
    a_file.write_text("not a folder")
    for dest, expected in ((a_file, "is a file, not a folder"), (a_file / "sub", f"is under {a_file}")):
        with pytest.raises(BadInput) as e:
            pull(store, "r", ["legal"], dest)
        assert expected in str(e.value) and "\n" not in str(e.value)
    assert a_file.read_text() == "not a folder"
    # the conductor pulls domain by domain: there it is an error result, not an exception
    r = pull_domain(store, "r", "legal", a_file)
    assert r.status == "error" and "\n" not in r.detail


def test_meetara_pull_into_a_file_is_one_line(tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    publish(store, "r", "legal")
    (tmp_path / "models").write_text("x")
    r = run_cli(
        "pull", "--run-id", "r", "-d", "legal", "--store", f"file://{tmp_path}/store",
        "--models-dir", "models", module="launcher", cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --models-dir models is a file, not a folder"
    ]


def test_a_pull_bigger_than_the_free_space_writes_nothing(store, tmp_path):
    publish(store, "r", "legal", size=600_000)
    with small_filesystem(tmp_path / "small", "256k") as dest:
        (result,) = pull(store, "r", ["legal"], dest)
        assert result.status == "error" and "disk full" in result.detail and "\n" not in result.detail
        assert "nothing was written" in result.detail
        assert not (dest / "legal" / "adapter.gguf").exists()
        assert not (dest / "legal" / "manifest.json").exists() and not list(dest.rglob(".*.part"))


def test_a_disk_that_fills_during_a_pull_leaves_nothing_partial(store, tmp_path):
    """The manifest promised a small file, the object is bigger (replaced in the store): the free-space
    check passes and the disk fills while downloading. The pull reports it; no partial file stays."""
    publish(store, "r", "legal", size=60_000)
    store.put("runs/r/domains/legal/adapter.gguf", os.urandom(600_000))
    with small_filesystem(tmp_path / "small", "256k") as dest:
        (result,) = pull(store, "r", ["legal"], dest)
        assert result.status == "error" and "disk full while downloading" in result.detail, result.detail
        assert "\n" not in result.detail
        assert not list(dest.rglob(".*.part")) and not (dest / "legal" / "adapter.gguf").exists()
        assert not (dest / "legal" / "manifest.json").exists()


# ---- what a run ships since issue 14: one Q4_K_M base per run, an adapter per domain -------------


def publish_adapters(
    store, run: str, domains: list[str], size: int = 200_000, f16: bytes | None = None
) -> tuple[bytes, dict]:
    """Finished domains as `python -m train` now leaves them: the run's Q4_K_M base once (and its f16
    base with --base-f16), an adapter per domain, each manifest naming the bases under `base_files`."""
    base = b"GGUF" + hashlib.sha256(run.encode()).digest() * 2000
    base_entry = entry(f"runs/{run}/base/tiny-Q4_K_M.gguf", base)
    store.put(base_entry["key"], base)
    bases = {"q4_k_m": base_entry}
    if f16 is not None:
        bases["f16"] = entry(f"runs/{run}/base/tiny-f16.gguf", f16)
        store.put(bases["f16"]["key"], f16)
    adapters = {}
    for d in domains:
        adapters[d] = os.urandom(size)
        key = f"runs/{run}/domains/{d}/adapter.gguf"
        store.put(key, adapters[d])
        manifest = {
            "domain": d,
            "status": "done",
            "validation": {"passed": True},
            "base_gguf": base_entry,
            "base_files": bases,
            "files": {"adapter": entry(key, adapters[d])},
        }
        store.put(f"runs/{run}/domains/{d}/manifest.json", json.dumps(manifest).encode())
    return base, adapters


def test_a_run_pulls_its_base_once_and_an_adapter_per_domain(store, tmp_path):
    base, adapters = publish_adapters(store, "r", ["legal", "nutrition", "fitness"])
    dest = tmp_path / "models"
    results = pull(store, "r", ["legal", "nutrition", "fitness"], dest)
    assert [r.status for r in results] == ["pulled"] * 3
    # the base's bytes come down once, with the first domain; the others fetch only their adapter
    assert [r.bytes for r in results] == [len(base) + len(adapters["legal"]), 200_000, 200_000]
    assert (dest / "base" / "tiny-Q4_K_M.gguf").read_bytes() == base
    assert sorted(p.name for p in (dest / "base").iterdir()) == ["tiny-Q4_K_M.gguf"]
    for d, data in adapters.items():
        assert sorted(p.name for p in (dest / d).iterdir()) == ["adapter.gguf", "manifest.json"]
        assert (dest / d / "adapter.gguf").read_bytes() == data
        assert results[0].files["base_q4_k_m"] == str(dest / "base" / "tiny-Q4_K_M.gguf")
    again = pull(store, "r", ["legal", "nutrition", "fitness"], dest)
    assert [(r.status, r.bytes) for r in again] == [("up-to-date", 0)] * 3


def test_a_run_that_shipped_its_f16_base_too_pulls_both(store, tmp_path):
    f16 = os.urandom(50_000)
    base, adapters = publish_adapters(store, "r", ["legal"], f16=f16)
    dest = tmp_path / "models"
    [r] = pull(store, "r", ["legal"], dest)
    assert r.status == "pulled" and r.bytes == len(base) + len(f16) + len(adapters["legal"])
    assert (dest / "base" / "tiny-f16.gguf").read_bytes() == f16
    assert sorted(p.name for p in (dest / "base").iterdir()) == ["tiny-Q4_K_M.gguf", "tiny-f16.gguf"]


def test_an_old_run_with_merged_models_and_the_f16_base_still_pulls(store, tmp_path):
    """Manifests written before issue 14 name an f16 base (`base_gguf` only) and a merged Q4_K_M per
    domain: a pull today fetches exactly those, as it did."""
    old = {d: publish(store, "old", d) for d in ("legal", "nutrition")}
    dest = tmp_path / "models"
    results = pull(store, "old", ["legal", "nutrition"], dest)
    assert [r.status for r in results] == ["pulled", "pulled"]
    assert sorted(p.name for p in (dest / "base").iterdir()) == ["tiny-f16.gguf"]
    for d, files in old.items():
        assert (dest / d / "model-Q4_K_M.gguf").read_bytes() == files["merged_q4_k_m"]
        assert (dest / d / "adapter.gguf").read_bytes() == files["adapter"]
    assert results[1].bytes == sum(len(b) for b in old["nutrition"].values())  # the base came once
