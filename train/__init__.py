"""Training pipeline that runs on the GPU box (and locally): data -> LoRA -> checkpoints -> GGUF.

Must not import `launcher` or `budgets`: the rented machine installs only `meetara[train]`.
"""


class BadInput(ValueError):
    """A user error (unknown domain, malformed file, bad URL): reported in one line, exit code 2."""
