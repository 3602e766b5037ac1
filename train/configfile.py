"""Reading the small files users write (config and preferences YAML, JSON): every way such a file can
be wrong becomes a one-line `BadInput` naming the file, never a traceback, a hang or gigabytes of memory.

- size: at most `MAX_CONFIG_BYTES` (1 MiB; a config file is a few hundred bytes) is read;
- encoding: UTF-8 (a UTF-8 BOM is accepted); UTF-16/32 and bytes that are not UTF-8 are named;
- nesting: YAML or JSON nested deeper than Python can parse (RecursionError) is refused;
- aliases: a YAML document whose anchors and aliases expand to more than `MAX_VALUES` values (the
  "billion laughs" shape) is refused before anything walks it.

Used by `launcher.preferences`, `budgets.caps` and `launcher.cli` (`providers set`); part of `train`
so that both `launcher` and `budgets` may import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from train import BadInput

MAX_CONFIG_BYTES = 1 << 20
MAX_VALUES = 100_000


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} B"


def read_bytes(path: Path, *, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The file's bytes; `BadInput` if it cannot be read or is larger than `limit`."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{path}: is a directory, not a config file")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    if len(data) > limit:
        try:
            size = f"{_size(path.stat().st_size)}, " if path.stat().st_size > limit else ""
        except OSError:
            size = ""
        raise BadInput(f"{path}: too large ({size}over the {_size(limit)} limit for a config file)")
    return data


def decode(data: bytes, where: str) -> str:
    """UTF-8 text (BOM dropped); `BadInput` naming UTF-16/32 or the first byte that is not UTF-8."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
        kind = "UTF-32" if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")) else "UTF-16"
        raise BadInput(f"{where}: the file is {kind}: save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        hint = " (UTF-16 without a BOM?)" if b"\x00" in data[:64] else ""
        bad = f"byte 0x{data[e.start]:02x} at offset {e.start}"
        raise BadInput(f"{where}:{line}: not UTF-8 ({bad}){hint}: save it as UTF-8") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise BadInput(f"{where}:{line}: contains a NUL character (UTF-16 without a BOM?): save it as UTF-8")
    return text


def read_text(path: Path, *, limit: int = MAX_CONFIG_BYTES) -> str:
    """The file as text, size- and encoding-checked (see the module's docstring)."""
    return decode(read_bytes(path, limit=limit), str(path))


def check_expansion(doc: Any, where: str, limit: int = MAX_VALUES) -> Any:
    """`doc` if walking it (aliases followed, as every consumer does) visits at most `limit` values."""
    count, stack = 0, [doc]
    while stack:
        x = stack.pop()
        count += 1
        if count > limit:
            raise BadInput(f"{where}: expands to over {limit} values (YAML anchors and aliases?)")
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list | tuple | set):
            stack.extend(x)
    return doc


def yaml_error(e: Exception, where: str) -> BadInput:
    """One line for a PyYAML or ruamel.yaml parse error: file, line, the parser's problem."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or ""
    return BadInput(f"{where}{line}: not valid YAML{f' ({problem})' if problem else ''}")


def parse_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)` with every failure as one line."""
    import yaml  # here: importing this module stays cheap (the ledger imports budgets.caps)

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise yaml_error(e, where) from None
    except RecursionError:
        raise BadInput(f"{where}: nested too deeply to be a config file") from None
    return check_expansion(doc, where)


def load_yaml(path: Path, *, limit: int = MAX_CONFIG_BYTES) -> Any:
    """A YAML config file, read and parsed; `BadInput` (one line) for anything wrong with it."""
    return parse_yaml(read_text(path, limit=limit), str(path))


def parse_json(text: str | bytes, where: str) -> Any:
    """`json.loads` with every failure as one line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{where}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise BadInput(f"{where}: not UTF-8: save it as UTF-8") from None
    except RecursionError:
        raise BadInput(f"{where}: nested too deeply") from None


def load_json(path: Path, *, limit: int = MAX_CONFIG_BYTES) -> Any:
    """A JSON file, read and parsed; `BadInput` (one line) for anything wrong with it."""
    return parse_json(read_text(path, limit=limit), str(path))


def yaml_number(value: Any, *, none_means: str | None = None) -> Any:
    """A number setting as YAML 1.1 gave it, for a pydantic `mode="before"` validator: YAML reads
    off/no/false as False and on/yes/true as True, which pydantic would take for 0 and 1 (`daily: off`,
    a $0 cap). In a setting where None means no limit (`none_means`, e.g. "no cap"), off is None, as
    the environment's `off` is; anything else a bool is, is refused."""
    if not isinstance(value, bool):
        return value
    if none_means and value is False:
        return None
    word = "on/yes/true" if value else "off/no/false"
    raise ValueError(
        f"{word} is not a number: write one" + (f", or off for {none_means}" if none_means else "")
    )
