"""The rules for numbers a user gives (flags, CSV cells, app fields): one home, one-line errors naming the value.

Seeds: whole numbers in [0, 2**32 - 1] everywhere (the CLI, prompt CSVs, the app). That is numpy's range and
holds every published I2P `evaluation_seed`; it also keeps the seeds derived from it (`seed * 1_000_003 + step`
for a training step, `seed + i` for row i of a prompt file) far inside torch's 64-bit generator range.
"""

from __future__ import annotations

import math

from .errors import ConceptEraseError

SEED_MAX = 2**32 - 1


def parse_seed(value, what: str = "seed") -> int:
    """A seed from an int, or from text such as "42" or "42.0" (spreadsheets write whole numbers so);
    "1.7", "-1", "1e30", "nan" and "" are refused by name."""
    number = value
    if isinstance(value, str):
        text = value.strip()
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise ConceptEraseError(f"{what} {value!r} is not a whole number") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConceptEraseError(f"{what} {value!r} is not a whole number")
    if isinstance(number, float):
        if not (math.isfinite(number) and number.is_integer()):
            raise ConceptEraseError(f"{what} {value!r} is not a whole number")
        number = int(number)
    if not 0 <= number <= SEED_MAX:
        raise ConceptEraseError(f"{what} {value!r} is out of range: seeds are whole numbers from 0 to {SEED_MAX}")
    return number


def check_number(value: float, what: str, *, minimum: float | None = None, above: float | None = None,
                 maximum: float | None = None) -> float:
    """A finite number (no nan or inf) that is >= `minimum`, > `above` and <= `maximum` where given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConceptEraseError(f"{what} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConceptEraseError(f"{what} must be >= {minimum:g}, got {value!r}")
    if above is not None and not value > above:
        raise ConceptEraseError(f"{what} must be > {above:g}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConceptEraseError(f"{what} must be <= {maximum:g}, got {value!r}")
    return value
