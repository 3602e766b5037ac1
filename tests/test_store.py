"""The object stores: the file store and the S3 store against a real S3 server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import closed_port, run_cli

from train import BadInput, checkpoint
from train.store import FileStore, S3Store, StoreError, open_store


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path}/store")
    bucket = request.getfixturevalue("bucket")
    return open_store(f"s3://{bucket}/some/prefix", endpoint_url=request.getfixturevalue("s3_server"))


def test_put_get_list_delete(store, tmp_path):
    store.put("a/b/one.bin", b"1" * 10)
    store.put("a/two.bin", b"2")
    src = tmp_path / "big.bin"
    src.write_bytes(bytes(range(256)) * 4096)
    store.put_file("a/c/big.bin", src)
    assert store.get("a/b/one.bin") == b"1" * 10
    assert store.exists("a/two.bin") and not store.exists("a/nope")
    assert store.list("a") == ["a/b/one.bin", "a/c/big.bin", "a/two.bin"]
    assert store.list("a/b") == ["a/b/one.bin"]
    assert store.list("zzz") == []
    dst = tmp_path / "back.bin"
    store.get_file("a/c/big.bin", dst)
    assert dst.read_bytes() == src.read_bytes()
    store.put("a/two.bin", b"replaced")
    assert store.get("a/two.bin") == b"replaced"
    store.delete("a/two.bin")
    assert not store.exists("a/two.bin")
    with pytest.raises(KeyError):
        store.get("a/two.bin")


def test_s3_objects_live_under_the_prefix(bucket, s3_server):
    import boto3

    store = open_store(f"s3://{bucket}/runs-here", endpoint_url=s3_server)
    store.put("x/y.txt", b"hi")
    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=bucket)["Contents"]
    ]
    assert keys == ["runs-here/x/y.txt"]


def test_keys_cannot_escape_the_store(tmp_path):
    store = FileStore(tmp_path)
    for bad in ("../x", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(ValueError):
            store.put(bad, b"")


def test_file_store_writes_are_atomic(tmp_path):
    store = FileStore(tmp_path)
    store.put("k", b"old")

    class Boom(Exception):
        pass

    import os

    real = os.fsync
    os.fsync = lambda fd: (_ for _ in ()).throw(Boom())  # fail after the bytes were written
    try:
        with pytest.raises(Boom):
            store.put("k", b"new")
    finally:
        os.fsync = real
    assert store.get("k") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["k"]  # no temp file left behind


@pytest.mark.parametrize("url", ["ftp://x/y", "s3://", "s3:///prefix", "file://"])
def test_bad_urls(url):
    with pytest.raises(BadInput, match="bad store URL"):
        open_store(url)


def test_unreachable_endpoint_is_a_store_error(monkeypatch):
    monkeypatch.setenv("MEETARA_STORE_RETRIES", "2")
    store = S3Store("b", "p", endpoint_url=f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(StoreError, match="failed") as e:
        store.put("k", b"x")
    assert "testing" not in str(e.value)  # the secret never appears in errors


def test_transient_errors_are_retried(bucket, s3_server):
    """The first two connections are reset by the network, the third reaches the server: the put succeeds."""
    from faults import FlakyProxy

    host, port = s3_server.removeprefix("http://").split(":")
    proxy = FlakyProxy(host, int(port), drop_first=2)
    try:
        store = open_store(f"s3://{bucket}/p", endpoint_url=proxy.url)
        store.put("k", b"v")
        assert proxy.dropped == 2
        assert store.get("k") == b"v"
    finally:
        proxy.close()


def test_a_failing_request_is_sent_as_often_as_the_store_retries_say(
    bucket, s3_server, tmp_path, monkeypatch
):
    """MEETARA_STORE_RETRIES=3: a request the server keeps answering with a 500 reaches it 3 times,
    whatever the call (one retry layer: not botocore's on top of meetara's), and ends in one line."""
    from faults import FailingS3

    monkeypatch.setenv("MEETARA_STORE_RETRIES", "3")
    server = FailingS3(s3_server, "broken")
    try:
        store = open_store(f"s3://{bucket}/p", endpoint_url=server.url)
        store.put("fine", b"v")  # the rest goes through
        assert store.get("fine") == b"v" and server.refused == []
        (tmp_path / "f").write_bytes(b"x")
        calls = {
            "put": lambda: store.put("broken/k", b"v"),
            "get": lambda: store.get("broken/k"),
            "exists": lambda: store.exists("broken/k"),
            "list": lambda: store.list("broken"),
            "put_file": lambda: store.put_file("broken/f", tmp_path / "f"),
            "get_file": lambda: store.get_file("broken/f", tmp_path / "got"),
        }
        for what, call in calls.items():
            before = len(server.refused)
            with pytest.raises(StoreError, match="InternalError|500") as e:
                call()
            assert len(server.refused) - before == 3, (what, server.refused[before:])
            assert "\n" not in str(e.value)
    finally:
        server.close()


def test_a_download_cut_off_each_time_is_read_as_often_as_the_store_retries_say(
    bucket, s3_server, tmp_path, monkeypatch
):
    """A body cut off on every read: downloaded 3 times with MEETARA_STORE_RETRIES=3 (not boto3's 5
    reads per try on top of meetara's retries), then one line."""
    monkeypatch.setenv("MEETARA_STORE_RETRIES", "3")
    proxy, store = _proxied_store(bucket, s3_server)
    try:
        store.put("big", os.urandom(1 << 20))
        proxy.cut_next_response(64 << 10, times=100)
        with pytest.raises(StoreError, match="failed") as e:
            store.get_file("big", tmp_path / "got")
        assert proxy.cut == 3 and "\n" not in str(e.value)
    finally:
        proxy.close()


def test_checkpoints_commit_atomically_and_skip_bad_ones(store):
    prefix = "run/dom/checkpoints"
    for step in (10, 20, 30):
        checkpoint.save(store, prefix, step, {"a.bin": bytes([step]) * 100, "b.bin": b"state"}, {"n": step})
    assert checkpoint.latest(store, prefix).step == 30
    # a corrupt part in the newest: skipped for the previous valid one
    store.put("run/dom/checkpoints/step-00000030/a.bin", b"garbage")
    assert checkpoint.latest(store, prefix).step == 20
    # a partial newer checkpoint (parts uploaded, no manifest): does not exist
    store.put("run/dom/checkpoints/step-00000040/a.bin", b"x")
    ckpt = checkpoint.latest(store, prefix)
    assert ckpt.step == 20 and ckpt.parts["a.bin"] == bytes([20]) * 100 and ckpt.meta == {"n": 20}
    # a malformed manifest: skipped too
    store.put("run/dom/checkpoints/step-00000020/MANIFEST.json", b"{not json")
    assert checkpoint.latest(store, prefix).step == 10


def test_prune_keeps_the_newest(store):
    prefix = "p/checkpoints"
    for step in range(1, 6):
        checkpoint.save(store, prefix, step, {"w": b"x" * step})
    assert checkpoint.prune(store, prefix, keep=2) == [3, 2, 1]
    assert checkpoint.steps(store, prefix) == [5, 4]
    assert checkpoint.latest(store, prefix).step == 5


def test_a_partial_folder_never_takes_a_good_checkpoints_place(store):
    """A killed upload left step 151 without a manifest; the resumed run commits 102 and prunes to
    one: 102 stays (not 151); discard_after removes what a resume point has above it."""
    prefix = "p/checkpoints"
    checkpoint.save(store, prefix, 101, {"w": b"a"})
    store.put(f"{prefix}/step-00000151/w", b"partial")
    checkpoint.save(store, prefix, 102, {"w": b"b"})
    assert checkpoint.prune(store, prefix, keep=1) == [151, 101]
    assert checkpoint.latest(store, prefix).step == 102
    store.put(f"{prefix}/step-00000160/w", b"partial")
    assert checkpoint.discard_after(store, prefix, 102) == [160]
    assert checkpoint.steps(store, prefix) == [102]


def _proxied_store(bucket: str, s3_server: str):
    from faults import FlakyProxy

    host, port = s3_server.removeprefix("http://").split(":")
    proxy = FlakyProxy(host, int(port))
    return proxy, open_store(f"s3://{bucket}/p", endpoint_url=proxy.url)


def test_an_outage_mid_checkpoint_is_retried_through(bucket, s3_server, monkeypatch):
    """The server goes away after the first part of a checkpoint is uploaded and comes back after two
    refused connections: the upload retries and the checkpoint commits."""
    # the request cut by the outage and two refused connections fail: the fourth attempt goes through
    monkeypatch.setenv("MEETARA_STORE_RETRIES", "4")
    proxy, store = _proxied_store(bucket, s3_server)
    try:
        proxy.outage(after_requests=1, refuse=2)
        checkpoint.save(store, "d/checkpoints", 10, {"a.bin": b"a" * 5000, "b.bin": b"b" * 5000}, {"n": 10})
        assert proxy.dropped == 2
        ckpt = checkpoint.latest(store, "d/checkpoints")
        assert ckpt.step == 10 and ckpt.parts == {"a.bin": b"a" * 5000, "b.bin": b"b" * 5000}
    finally:
        proxy.close()


def test_a_checkpoint_cut_off_by_an_outage_is_never_resumed_from(bucket, s3_server):
    proxy, store = _proxied_store(bucket, s3_server)
    try:
        checkpoint.save(store, "d/checkpoints", 10, {"a.bin": b"old", "b.bin": b"old"})
        proxy.outage(after_requests=1)  # the server stays away: the rest of step 20 never arrives
        with pytest.raises(StoreError):
            checkpoint.save(store, "d/checkpoints", 20, {"a.bin": b"new", "b.bin": b"new"})
        proxy.heal()
        assert "d/checkpoints/step-00000020/a.bin" in store.list("d/checkpoints")  # a part did arrive
        ckpt = checkpoint.latest(store, "d/checkpoints")
        assert ckpt.step == 10 and ckpt.parts["a.bin"] == b"old"
    finally:
        proxy.close()


def test_a_body_cut_off_mid_read_is_read_again(bucket, s3_server):
    """The connection drops after 64 KiB of a 1 MiB checkpoint part's body: the read is retried, and
    the checkpoint loads whole (the resume a preempted job makes)."""
    proxy, store = _proxied_store(bucket, s3_server)
    try:
        part = os.urandom(1 << 20)
        checkpoint.save(store, "d/checkpoints", 10, {"a.bin": part}, {"n": 10})
        proxy.cut_next_response(64 << 10)
        assert store.get("d/checkpoints/step-00000010/a.bin") == part
        assert proxy.cut == 1
        proxy.cut_next_response(64 << 10)  # the first part read by a resume
        ckpt = checkpoint.latest(store, "d/checkpoints")
        assert proxy.cut == 2 and ckpt.step == 10 and ckpt.parts["a.bin"] == part
    finally:
        proxy.close()


@pytest.fixture
def checksum_refusing(s3_server: str):
    from faults import ChecksumRefusingS3

    server = ChecksumRefusingS3(s3_server)
    yield server
    server.close()


def test_a_server_refusing_checksum_headers_works_with_the_defaults(bucket, checksum_refusing, tmp_path):
    """boto3 >= 1.36 would send CRC32 headers on every put and part; meetara asks only where S3
    requires, so a server that answers those headers with 501 stores and returns everything, big
    (multipart) files included."""
    store = open_store(f"s3://{bucket}/p", endpoint_url=checksum_refusing.url)
    store.put("k", b"v")
    big = tmp_path / "model.gguf"
    big.write_bytes(os.urandom(9 << 20))  # over boto3's 8 MiB multipart threshold
    store.put_file("models/model.gguf", big)
    checkpoint.save(store, "d/checkpoints", 10, {"a.bin": b"a" * 5000}, {"n": 10})
    assert store.get("k") == b"v"
    got = tmp_path / "got.gguf"
    store.get_file("models/model.gguf", got)
    assert got.read_bytes() == big.read_bytes()
    assert checkpoint.latest(store, "d/checkpoints").parts == {"a.bin": b"a" * 5000}
    assert checksum_refusing.refused == [] and checksum_refusing.forwarded >= 6


def test_a_501_is_one_line_and_never_retried(bucket, checksum_refusing, monkeypatch):
    """Asking for checksums (boto3's own setting) on such a server: the first 501 ends it, in one line
    that names the setting."""
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    store = open_store(f"s3://{bucket}/p", endpoint_url=checksum_refusing.url)
    with pytest.raises(StoreError) as e:
        store.put("k", b"v")
    assert len(checksum_refusing.refused) == 1  # not five times as if transient
    assert "501 NotImplemented" in str(e.value) and "AWS_REQUEST_CHECKSUM_CALCULATION" in str(e.value)
    assert "\n" not in str(e.value)


def test_checksum_settings_follow_the_user(monkeypatch, tmp_path):
    from train.store import checksum_envs

    config = tmp_path / "aws-config"
    config.write_text("[default]\nresponse_checksum_validation = when_supported\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    monkeypatch.delenv("AWS_RESPONSE_CHECKSUM_VALIDATION", raising=False)
    assert checksum_envs() == {
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_supported",
    }
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    assert checksum_envs()["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_supported"


# ---- stores that cannot be written: a full disk, a read-only or pseudo filesystem, a file --------


@contextmanager
def small_filesystem(path: Path, size: str = "256k", *options: str):
    """A real filesystem of `size` bytes mounted at `path` (tmpfs; needs root): a disk that fills up."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    cmd = ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_store_is_one_line_and_keeps_what_it_had(tmp_path):
    with small_filesystem(tmp_path / "small", "256k") as root:
        store = FileStore(root)
        store.put("runs/r/a.bin", b"a" * 100_000)
        with pytest.raises(StoreError) as e:
            store.put("runs/r/a.bin", os.urandom(400_000))  # more than the disk holds
        message = str(e.value)
        assert "the store is full writing runs/r/a.bin" in message and "\n" not in message
        assert store.get("runs/r/a.bin") == b"a" * 100_000  # the old object is whole
        src = tmp_path / "big.bin"
        src.write_bytes(os.urandom(400_000))
        with pytest.raises(StoreError, match="the store is full writing runs/r/b.bin"):
            store.put_file("runs/r/b.bin", src)
        assert sorted(p.name for p in (root / "runs" / "r").iterdir()) == ["a.bin"]  # no temp file left
        store.put("runs/r/c.bin", b"c" * 1000)  # the space the failed writes took is free again


def test_train_on_a_full_store_stops_with_one_line(tmp_path):
    with small_filesystem(tmp_path / "small", "128k") as root:
        r = run_cli("--domains", "legal", "--store", f"file://{root}", "--samples", "80", "--no-merged", "-q")
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert lines[-1].startswith(f"error: file://{root}: the store is full writing runs/default/")
        assert not [p for p in root.rglob(".*") if p.is_file()]  # no temp file left behind


def test_store_roots_that_cannot_hold_a_store_fail_at_open(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for url, expected in (
        ("file:///proc/self", "file:///proc/self: a proc kernel filesystem cannot hold a store"),
        ("file:///sys/kernel", "a sysfs kernel filesystem"),
        (f"file://{a_file}", f"file://{a_file}: not a directory"),
        (f"file://{a_file}/store", "cannot create store directory"),
    ):
        with pytest.raises(StoreError) as e:
            open_store(url)
        assert expected in str(e.value) and "\n" not in str(e.value), url


def test_a_read_only_store_opens_for_reading_only(tmp_path):
    with small_filesystem(tmp_path / "ro", "64k", "ro") as root:
        with pytest.raises(StoreError, match="not writable"):
            open_store(f"file://{root}")
        assert open_store(f"file://{root}", writable=False).list("") == []


def test_python_m_train_refuses_proc_self_before_any_work():
    r = run_cli("--domains", "legal", "--store", "file:///proc/self", "--samples", "80", "-q")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: file:///proc/self: a proc kernel filesystem cannot hold a store; use a folder"
    ]
