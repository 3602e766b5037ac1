"""Training pipeline that runs on the GPU box (and locally): data -> LoRA -> checkpoints -> GGUF.

Must not import `launcher` or `budgets`: the rented machine installs only `meetara[train]`.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(e: BaseException) -> str:
    """An error as one line for the user: its message's first line (ANSI colours removed), else its
    type's name."""
    text = _ANSI.sub("", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


class BadInput(ValueError):
    """A user error (unknown domain, malformed file, bad URL): reported in one line, exit code 2."""

    @classmethod
    def from_validation(cls, error: ValueError, where: str = "") -> BadInput:
        """One line from a pydantic ValidationError: its first problem, with the field's dotted path."""
        first = error.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "value"
        return cls(f"{where}invalid {loc}: {first['msg']}")
