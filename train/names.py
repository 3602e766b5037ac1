"""Names that travel from the user to the job: one type per name, used by the CLI, the MCP server,
the launcher and `python -m train` alike, so a name is refused before any money moves.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints, TypeAdapter, ValidationError

from train import BadInput

# SkyPilot's rule for task and job names (sky/task.py _VALID_NAME_REGEX), since a run id names managed
# jobs too, at most 64 characters
RUN_ID_PATTERN = r"^[A-Za-z0-9]+(?:[._-]{1,2}[A-Za-z0-9]+)*$"
RUN_ID_MAX = 64
RUN_ID_RULE = (
    "1-64 ASCII letters and digits, which '.', '_' or '-' may join (at most two in a row), "
    "starting and ending with a letter or digit"
)

RunId = Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN, max_length=RUN_ID_MAX, strict=True)]
_RUN_ID = TypeAdapter(RunId)


def check_run_id(run_id: object) -> str:
    """`run_id` if it is a valid run id, else BadInput in one line (it names files, jobs and keys)."""
    try:
        return _RUN_ID.validate_python(run_id)
    except ValidationError:
        shown = repr(run_id) if len(repr(run_id)) <= 80 else repr(run_id)[:77] + "..."
        raise BadInput(f"invalid run id {shown}: {RUN_ID_RULE}") from None
