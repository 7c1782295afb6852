"""Checks of what the browser sends: one-line `ConceptEraseError`s naming the bad value. Used by the
Compare and Evaluate tabs alike (`ui` and `evaluate` both import this; neither imports the other's internals)."""

from __future__ import annotations

from typing import Any

from concept_erase.diffusion.models.apply import MAX_STRENGTH  # noqa: F401 (the Compare tab's slider: `apply`'s range)
from concept_erase.errors import ConceptEraseError
from concept_erase.validate import SEED_MAX

MAX_SEED = SEED_MAX  # the project's one seed rule (validate.py): whole numbers from 0 to 2**32 - 1
MAX_GUIDANCE = 20.0


def check_prompt(prompt: Any, limit: int, what: str = "prompt") -> str:
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise ConceptEraseError(f"{what} must be text, got {type(prompt).__name__}")
    if len(prompt) > limit:
        raise ConceptEraseError(f"{what} is {len(prompt)} characters long; the limit is {limit}. Shorten it.")
    return prompt


def check_int(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConceptEraseError(f"{name} must be a whole number, got {value!r}") from None
    if number != int(number) or not low <= number <= high:
        raise ConceptEraseError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


def check_float(value: Any, name: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConceptEraseError(f"{name} must be a number, got {value!r}") from None
    if not low <= number <= high:
        raise ConceptEraseError(f"{name} must be between {low} and {high}, got {value!r}")
    return number
