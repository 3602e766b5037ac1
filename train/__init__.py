"""Training pipeline that runs on the GPU box (and locally): data -> LoRA -> checkpoints -> GGUF.

Must not import `launcher` or `budgets`: the rented machine installs only `meetara[train]`.
"""

from __future__ import annotations


class BadInput(ValueError):
    """A user error (unknown domain, malformed file, bad URL): reported in one line, exit code 2."""

    @classmethod
    def from_validation(cls, error: ValueError, where: str = "") -> BadInput:
        """One line from a pydantic ValidationError: its first problem, with the field's dotted path."""
        first = error.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "value"
        return cls(f"{where}invalid {loc}: {first['msg']}")
