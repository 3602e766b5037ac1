"""Secrets never reach a log, at any level; meetara's state is the user's alone (folders 0700, files 0600).

The end-to-end check is a real `meetara launch` on the local backend with an S3 store (the moto server
of conftest) and MEETARA_LOG=DEBUG: botocore then logs every request's headers and canonical request,
in the launcher and in the job (whose output the local backend keeps in a log file in the state dir).
"""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import stat
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import run_cli

from budgets import open_private, private_dir, private_file, state_dir, write_private
from budgets.ledger import Ledger
from train.redact import MASK, RedactingFilter, install, install_on, is_secret_name, redact

# distinctive values, with the characters (/ + =) that URL-encoding changes
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAMEETARATESTKEY42",
    "AWS_SECRET_ACCESS_KEY": "mEeTaRa/SecretAccess+Key=0123456789abcdef",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEMeetaraSession/Token+With=Slashes0123456789==",
}


def forms(value: str) -> list[str]:
    """How a secret can show up in text: as is and URL-encoded."""
    return sorted({value, quote(value, safe="")})


def leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [name for name, v in SECRETS.items() for f in forms(v) if f.encode() in data]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture(scope="module")
def debug_launch(s3_server, tmp_path_factory):
    """One `meetara launch` of one small domain, local backend, S3 store, everything at DEBUG."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="secrets-debug")
    work = tmp_path_factory.mktemp("debug-launch")
    env = {
        **SECRETS,
        "MEETARA_LOG": "DEBUG",
        "MEETARA_STATE_DIR": str(work / "state"),
        "MEETARA_CONFIG": str(work / "absent.yaml"),
    }
    r = run_cli(
        "launch", "-d", "nutrition", "--budget", "1", "--yes", "--samples", "80", "--run-id", "sec",
        "--store", "s3://secrets-debug/team", "--endpoint-url", s3_server, "--poll", "0.2",
        module="launcher", cwd=work, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return work, r


def test_debug_logs_of_an_s3_launch_hold_no_credential_value(debug_launch):
    work, r = debug_launch
    # DEBUG was on and botocore logged the signed requests (else this test would prove nothing)...
    assert "DEBUG:botocore.endpoint:Sending http request" in r.stderr
    assert f"'X-Amz-Security-Token': b'{MASK}'" in r.stderr and f"'Authorization': b'{MASK}'" in r.stderr
    assert f"x-amz-security-token:{MASK}" in r.stderr  # the canonical request botocore.auth logs
    # ...and no credential value is in the launcher's output
    assert leaks(r.stderr) == [] and leaks(r.stdout) == []
    # the job (`python -m train`) logged at DEBUG too, into its log file in the state dir
    logs = list((work / "state" / "local-jobs").glob("*/log"))
    assert logs, "the local backend kept the job's log"
    job_log = logs[0].read_text(errors="replace")
    assert (
        "DEBUG:botocore.endpoint:Sending http request" in job_log
        and f"x-amz-security-token:{MASK}" in job_log
    )
    # no file meetara left anywhere (state, ledger, run record, job logs, pulled models) holds one
    for path in work.rglob("*"):
        if path.is_file():
            assert leaks(path.read_bytes()) == [], path


def test_a_launch_leaves_its_state_private(debug_launch):
    work, _ = debug_launch
    state = work / "state"
    assert mode(state) == 0o700
    assert mode(state / "ledger.sqlite") == 0o600
    assert mode(state / "runs") == 0o700 and mode(state / "runs" / "sec.json") == 0o600
    (job,) = (state / "local-jobs").iterdir()
    assert mode(job) == 0o700 and mode(job / "log") == 0o600
    shared = [f"{p.relative_to(state)} {mode(p):o}" for p in state.rglob("*") if mode(p) & 0o077]
    assert shared == [], f"readable by others: {shared}"


def test_state_dir_is_created_private_and_an_old_one_is_tightened(tmp_path, monkeypatch):
    monkeypatch.setenv("MEETARA_STATE_DIR", str(tmp_path / "new" / "state"))
    assert mode(state_dir()) == 0o700
    old = tmp_path / "old"  # a state dir an older meetara left 0755
    old.mkdir()
    (old / "ledger.sqlite").touch()
    old.chmod(0o755)
    monkeypatch.setenv("MEETARA_STATE_DIR", str(old))
    assert state_dir() == old and mode(old) == 0o700
    shared = tmp_path / "shared"  # someone pointed MEETARA_STATE_DIR at a folder of other things
    shared.mkdir()
    (shared / "notes.txt").touch()
    shared.chmod(0o755)
    monkeypatch.setenv("MEETARA_STATE_DIR", str(shared))
    assert state_dir() == shared and mode(shared) == 0o755  # not meetara's to lock
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    monkeypatch.setenv("MEETARA_STATE_DIR", str(sticky))
    assert state_dir() == sticky and mode(sticky) == 0o1777  # /tmp-like: never touched
    assert mode(private_dir(tmp_path / "a" / "b")) == 0o700


def test_private_files_are_0600_whatever_the_umask(tmp_path):
    before = os.umask(0)  # the loosest umask: modes come from the code, not from the user's setting
    try:
        assert mode(private_file(tmp_path / "p")) == 0o600
        assert mode(write_private(tmp_path / "w.json", "{}")) == 0o600
        assert (tmp_path / "w.json").read_text() == "{}"
        with open_private(tmp_path / "job.log") as f:
            f.write(b"line\n")
        with open_private(tmp_path / "job.log") as f:  # appends
            f.write(b"more\n")
        assert mode(tmp_path / "job.log") == 0o600 and (tmp_path / "job.log").read_bytes() == b"line\nmore\n"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    finally:
        os.umask(before)


def test_ledger_and_its_wal_files_are_0600(tmp_path):
    before = os.umask(0o022)
    try:
        path = tmp_path / "ledger.sqlite"
        ledger = Ledger(path)
        ledger.reserve("r", "j", 0.1, provider="local", gpu="cpu", rate_per_hour=1.0, rate_source="local")
        side = [Path(f"{path}{s}") for s in ("-wal", "-shm")]
        assert all(p.exists() for p in side)  # WAL mode, connection open: the files are there now
        assert [mode(p) for p in (path, *side)] == [0o600] * 3
        # a second process's connection (sqlite3 here) does not loosen them
        sqlite3.connect(path).execute("SELECT count(*) FROM reservations").fetchall()
        assert [mode(p) for p in (path, *side)] == [0o600] * 3
    finally:
        os.umask(before)


# ---- redaction, unit by unit ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (
            "headers={'X-Amz-Date': b'20260101T000000Z', 'X-Amz-Security-Token': b'IQoJb3JpZ2luX2VjEN//x+y=',"
            " 'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIAXXXXXXXXXXXXXXXX/20260101/us-east-1/s3/"
            "aws4_request, SignedHeaders=host;x-amz-date, Signature=0123456789abcdef0123456789abcdef'}",
            ["IQoJb3JpZ2luX2VjEN//x+y=", "AKIAXXXXXXXXXXXXXXXX", "0123456789abcdef0123456789abcdef"],
        ),
        ("x-amz-security-token:IQoJb3JpZ2luX2VjEN//x+y=\nhost:s3", ["IQoJb3JpZ2luX2VjEN//x+y="]),
        ("Authorization: AWS4-HMAC-SHA256 Credential=AKIAYYYYYYYYYYYYYYYY/x", ["AKIAYYYYYYYYYYYYYYYY"]),
        (
            "GET https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAZZZZ%2F2026"
            "&X-Amz-Security-Token=IQo%2Bsess&X-Amz-Signature=abcdef0123456789abcdef",
            ["AKIAZZZZ", "IQo%2Bsess", "abcdef0123456789abcdef"],
        ),
        ("http://h/k?AWSAccessKeyId=AKIAV2V2V2&Signature=9XzMUuphoDaL8Coqm82veI9lzs4%3D", ["AKIAV2V2V2"]),
        ('"GET /api/v0/bundles/?api_key=vastkey123456&q=1 HTTP/1.1" 200', ["vastkey123456"]),
        ("{'Authorization': 'Bearer lambda-secret-key-0001'}", ["lambda-secret-key-0001"]),
        ("<SessionToken>sts/token+1==</SessionToken><SecretAccessKey>sts-secret</SecretAccessKey>", ["sts"]),
        ('{"SecretAccessKey": "json-secret-1", "aws_session_token": "json-token-2"}', ["json-"]),
    ],
)
def test_credential_shapes_are_masked_whatever_their_source(text, secret):
    out = redact(text)
    assert MASK in out and not [s for s in secret if s in out], out


def test_ordinary_log_text_is_left_alone():
    for text in (
        "Token indices sequence length is longer than the specified maximum",
        "legal: step 12/40 loss 3.21 tokens/s 5400 max_new_tokens=8",
        "DEBUG:botocore.hooks:Event needs-retry.s3.GetObject: calling handler <function x at 0x7f>",
        "x-amz-date:20260101T000000Z",
    ):
        assert redact(text) == text


def test_secret_env_values_are_masked_raw_and_url_encoded(monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", "rp-KEY/with+odd=chars")
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "svc-token-value")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a secret: "false" stays readable
    text = "a rp-KEY/with+odd=chars b rp-KEY%2Fwith%2Bodd%3Dchars c svc-token-value d false"
    assert redact(text) == f"a {MASK} b {MASK} c {MASK} d false"
    assert is_secret_name("LAMBDA_API_KEY") and not is_secret_name("AWS_SHARED_CREDENTIALS_FILE")


def test_an_installed_handler_masks_arguments_and_tracebacks(monkeypatch):
    monkeypatch.setenv("VAST_API_KEY", "vast-secret-000111")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("meetara.test-redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        install(logger)
        install(logger)  # idempotent: one wrapper, one filter
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        logger.warning("key is %s", "vast-secret-000111")
        try:
            raise RuntimeError("failed with key vast-secret-000111")
        except RuntimeError:
            logger.exception("boom", stack_info=True)
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "vast-secret-000111" not in out
    assert out.count(MASK) >= 2 and "RuntimeError: failed with key ***" in out


def test_a_handler_added_later_is_covered_by_install_on():
    handler = logging.StreamHandler(io.StringIO())
    install_on(handler)
    record = logging.LogRecord("x", logging.DEBUG, __file__, 1, "Bearer %s", ("abcdefgh12345678",), None)
    assert handler.format(record) == f"Bearer {MASK}"


def test_the_log_level_is_case_blind_and_a_bad_one_is_one_line():
    assert run_cli("--help", env={"MEETARA_LOG": "debug"}).returncode == 0
    r = run_cli("--help", env={"MEETARA_LOG": "loud"})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: MEETARA_LOG='LOUD': use DEBUG, INFO, WARNING, ERROR, CRITICAL or a number 0-50"
    ]
