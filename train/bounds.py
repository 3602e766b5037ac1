"""The bounds of the numbers a user gives meetara, in one place: the CLIs' options, the MCP tools'
arguments, the dashboard's fields and the job's own options all refuse the same values in the same words.

Every number is finite (inf and nan are refused by name wherever a number comes in). Samples and
epochs have a maximum: a domain's conversations are generated and held in memory, and each epoch
trains on all of them, so a value far past these is a typo or an attack (`plan(samples=10**12)` at
$0/h on the local backend would otherwise be accepted and run for ever).
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import Field

from train import BadInput

MIN_SAMPLES, MAX_SAMPLES = 16, 100_000  # the maximum: 500 x the default of 200 conversations per domain
MIN_EPOCHS, MAX_EPOCHS = 0.01, 100.0  # the default is 2

Samples = Annotated[int, Field(ge=MIN_SAMPLES, le=MAX_SAMPLES)]
Epochs = Annotated[float, Field(ge=MIN_EPOCHS, le=MAX_EPOCHS, allow_inf_nan=False)]


def finite(value: float, name: str) -> float:
    """`value` when it is a finite number; else BadInput naming `name` (e.g. '--epochs')."""
    if not math.isfinite(value):
        raise BadInput(f"{name} must be a finite number, not {value}")
    return value
