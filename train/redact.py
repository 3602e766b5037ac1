"""Keep credentials out of log output, at every level, DEBUG included.

`install()` (called by `train.cli.run_app`, so by `meetara` and `python -m train`) wraps the formatter
of each root handler so that the fully formatted record (message with its arguments, traceback, stack)
is redacted before it is written. botocore, boto3, urllib3 and every other library log through those
handlers, so their DEBUG output (request headers, canonical requests, signed URLs) is covered.

Two things are replaced with `***`:

- the values of secret environment variables (`secret_env_names`: AWS keys and session token,
  provider API keys, and any variable whose name says SECRET, TOKEN, PASSWORD, API_KEY, ...), as
  written and URL-encoded, plus any value registered with `add_secret` (credentials read from files);
- known credential shapes whatever their source: `Authorization` header values (AWS SigV4
  `Credential=` and `Signature=`, Bearer, Basic), `X-Amz-Security-Token` / `X-Amz-Credential` /
  `X-Amz-Signature` headers and query parameters, `api_key=` style query parameters, and the
  `SecretAccessKey` / `SessionToken` fields of STS answers (XML or JSON).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from urllib.parse import quote

MASK = "***"
MIN_SECRET_LEN = 6  # shorter values would garble ordinary text and protect nothing

SECRET_ENV = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "LAMBDA_API_KEY",
        "RUNPOD_API_KEY",
        "VAST_API_KEY",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
    }
)
# a whole '_'-separated part of the name: HF_TOKEN and DB_PASSWORD, not TOKENIZERS_PARALLELISM
_SECRET_NAME = re.compile(
    r"(?:^|_)(?:SECRET|TOKEN|PASSWORD|PASSWD|PASSPHRASE|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(?:_|$)"
)
# names that match the pattern above but hold no secret (paths, switches)
_NOT_SECRET_NAME = re.compile(r"(_FILE|_PATH|_DIR|_URL|_ENDPOINT|_REGION|_EXPIRATION)$")

_Q = r"""['"]?"""  # an optional quote around a header name or value
_VALUE = r"""[^\s'"&,;}<>)\]]+"""  # a token: up to a space, quote, separator or closing bracket
# (pattern, replacement, lowercase substrings one of which a text must hold for the pattern to apply:
# a cheap test that spares the regular expressions on the many log lines that hold no credential)
_PATTERNS: list[tuple[re.Pattern[str], str, tuple[str, ...]]] = [
    # AWS SigV4: the access key id in the credential scope, and the signature
    (re.compile(r"(Credential=)[^/\s'\",&]+", re.I), r"\1" + MASK, ("credential=",)),
    (re.compile(r"(Signature=)[^&\s'\",]{16,}", re.I), r"\1" + MASK, ("signature=",)),
    # SigV2 presigned URLs: the access key id
    (re.compile(r"(AWSAccessKeyId=)[^&\s'\",]+", re.I), r"\1" + MASK, ("awsaccesskeyid=",)),
    # session token / credential / signature as a header (request dict, canonical request) or query
    (
        re.compile(
            r"(x-amz-(?:security-token|credential|signature)" + _Q + r"\s*[:=]\s*b?" + _Q + r")" + _VALUE,
            re.I,
        ),
        r"\1" + MASK,
        ("x-amz-",),
    ),
    # Authorization headers (any scheme: SigV4, Basic, Bearer): the whole value, to its quote or line end
    (
        re.compile(r"(\bauthorization" + _Q + r"\s*[:=]\s*b?" + _Q + r")[^'\"\r\n]+", re.I),
        r"\1" + MASK,
        ("authorization",),
    ),
    (re.compile(r"\b(Bearer)\s+[A-Za-z0-9._~+/=-]{8,}", re.I), r"\1 " + MASK, ("bearer",)),
    (
        re.compile(r"((?:x-)?(?:api-?key|auth-token)" + _Q + r"\s*[:=]\s*b?" + _Q + r")" + _VALUE, re.I),
        r"\1" + MASK,
        ("apikey", "api-key", "auth-token"),
    ),
    # query parameters that carry a key (RunPod and Vast take the API key in the URL)
    (
        re.compile(r"([?&](?:api_?key|apikey|access_token|token|key)=)[^&\s'\"#]+", re.I),
        r"\1" + MASK,
        ("key=", "token="),
    ),
    # STS and credential-process answers: XML elements and JSON / dict fields
    (
        re.compile(r"(<(SecretAccessKey|SessionToken|SecurityToken|AccessKeyId)>)[^<]*(</\2>)", re.I),
        r"\1" + MASK + r"\3",
        ("<secretaccesskey", "<sessiontoken", "<securitytoken", "<accesskeyid"),
    ),
    (
        re.compile(
            r"(" + _Q + r"(?<![\w-])(?:SecretAccessKey|SessionToken|SecurityToken|AccessKeyId|"
            r"aws_secret_access_key|aws_session_token|aws_security_token|aws_access_key_id|api_?key|"
            r"access_token|refresh_token|auth_token|password|secret)"
            + _Q
            + r"\s*[:=]\s*b?"
            + _Q
            + r")"
            + _VALUE,
            re.I,
        ),
        r"\1" + MASK,
        (
            "accesskey",
            "sessiontoken",
            "securitytoken",
            "aws_",
            "apikey",
            "api_key",
            "_token",
            "password",
            "secret",
        ),
    ),
]

_registered: set[str] = set()
_lock = threading.Lock()


def is_secret_name(name: str) -> bool:
    """Whether an environment variable of this name holds a credential."""
    upper = name.upper()
    if upper in SECRET_ENV:
        return True
    return bool(_SECRET_NAME.search(upper)) and not _NOT_SECRET_NAME.search(upper)


def secret_env_names(environ: dict[str, str] | None = None) -> list[str]:
    """The names of the secret variables set in `environ` (default: this process's environment)."""
    env = os.environ if environ is None else environ
    return sorted(n for n, v in env.items() if v and is_secret_name(n))


def add_secret(value: str | None) -> None:
    """Redact `value` from all log output from now on (for credentials read from files, not env)."""
    if value and len(value.strip()) >= MIN_SECRET_LEN:
        with _lock:
            _registered.add(value.strip())


_cache: tuple[object, list[str]] = (None, [])
_SECRET_NAMES_SEEN: list[str] = []  # the secret variables found last time, whose values the cache key holds


def _secret_values() -> list[str]:
    """The strings to mask, longest first (a value that contains another goes whole); recomputed only
    when the environment or the registered secrets change."""
    global _cache
    env = os.environ
    key = (tuple(env), tuple(env.get(n) for n in _SECRET_NAMES_SEEN), len(_registered))
    if _cache[0] == key:
        return _cache[1]
    names = secret_env_names()
    _SECRET_NAMES_SEEN[:] = names
    values = {env[n].strip() for n in names} | set(_registered)
    out = set()
    for v in values:
        if len(v) >= MIN_SECRET_LEN:
            out.add(v)
            encoded = quote(v, safe="")
            if encoded != v:
                out.add(encoded)
    result = sorted(out, key=len, reverse=True)
    _cache = ((tuple(env), tuple(env.get(n) for n in names), len(_registered)), result)
    return result


def redact(text: str) -> str:
    """`text` with every known secret value and credential shape replaced by `***`."""
    if not text:
        return text
    for value in _secret_values():
        if value in text:
            text = text.replace(value, MASK)
    lower = text.lower()
    for pattern, repl, triggers in _PATTERNS:
        if any(t in lower for t in triggers):
            text = pattern.sub(repl, text)
    return text


class RedactingFormatter(logging.Formatter):
    """Wraps a handler's formatter: formats the record as before, then redacts the whole text."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()  # what a handler without a formatter uses

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


class RedactingFilter(logging.Filter):
    """For handlers whose formatter cannot be wrapped: redacts the record's message and traceback in
    place (the message is formatted with its arguments first, so a secret passed as an argument goes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler to report
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_on(handler: logging.Handler) -> None:
    """Make `handler` write redacted text (idempotent)."""
    if not isinstance(handler.formatter, RedactingFormatter):
        handler.setFormatter(RedactingFormatter(handler.formatter))
    if not any(isinstance(f, RedactingFilter) for f in handler.filters):
        handler.addFilter(RedactingFilter())


def install(logger: logging.Logger | None = None) -> None:
    """Redact every handler of `logger` (default: the root logger, which every library propagates to)."""
    for handler in (logger or logging.getLogger()).handlers:
        install_on(handler)
