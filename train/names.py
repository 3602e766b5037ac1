"""Names that travel from the user to the job: one type per name, used by the CLI, the MCP server,
the launcher and `python -m train` alike, so a name is refused before any money moves.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints, TypeAdapter, ValidationError

from train import BadInput

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
RUN_ID_RE = re.compile(RUN_ID_PATTERN)
RUN_ID_RULE = "1-64 characters: letters, digits, '.', '_', '-', starting with a letter or digit"

RunId = Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN, strict=True)]
_RUN_ID = TypeAdapter(RunId)


def check_run_id(run_id: object) -> str:
    """`run_id` if it is a valid run id, else BadInput in one line (it names files, jobs and keys)."""
    try:
        return _RUN_ID.validate_python(run_id)
    except ValidationError:
        shown = repr(run_id) if len(repr(run_id)) <= 80 else repr(run_id)[:77] + "..."
        raise BadInput(f"invalid run id {shown}: {RUN_ID_RULE}") from None
