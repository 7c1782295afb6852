"""MiniSD: a real Stable Diffusion pipeline small enough to train on a laptop CPU (docs/MINISD.md).

It draws scikit-learn's handwritten digits (16x16, one channel) in three styles, from prompts such as
"a handwritten digit seven in bold strokes". The trained weights ship inside the package
(`concept_erase/assets/minisd/`), so every command runs offline with `--model minisd`.

This module is the package's leaf (it imports nothing of the library but its errors): the loaders, the
defaults and the judge all read MiniSD's names and sampling from here. The concept presets are `presets.py`.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import ConceptEraseError

DIGITS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLES: tuple[str, ...] = ("plain", "bold", "negative")

# The words a prompt is made of after the digit word; "plain" adds nothing.
STYLE_SUFFIX: dict[str, str] = {"plain": "", "bold": " in bold strokes", "negative": " in negative"}
PROMPT_PREFIX = "a handwritten digit"

# The models shipped in the package, loadable by name: MiniSD, MiniSD-XL and MiniSD-Flux, the same digits world
# with the same judges and sampling.
MINISD_MODELS: tuple[str, ...] = ("minisd", "minisd-xl", "minisd-flux")
# how `concept-erase minisd train` rebuilds each (MiniSD-XL and MiniSD-Flux reuse MiniSD's trained VAE)
TRAIN_FLAGS = {"minisd": "", "minisd-xl": " --family sdxl --vae minisd", "minisd-flux": " --family flux --vae minisd"}
# MiniSD's sampling everywhere (generate, erase's forget/retain images, evaluation, app, demo, benchmarks):
# what `concept-erase minisd check` measured at 100% requested digit and style.
MINISD_STEPS = 25
MINISD_GUIDANCE = 5.0

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "minisd"


def minisd_path(name: str = "minisd") -> Path:
    """The packaged diffusers folder of "minisd" (SD 1.x architecture), "minisd-xl" (SDXL architecture) or
    "minisd-flux" (FLUX.1's), fp16 weights; load it in fp32 on CPU."""
    if name not in MINISD_MODELS:
        raise ConceptEraseError(f"unknown packaged model {name!r}; choose {' or '.join(MINISD_MODELS)}")
    path = ASSETS.parent / name / "pipeline"
    if not (path / "model_index.json").is_file():
        raise ConceptEraseError(f"{name} weights missing at {str(path)!r}: run `concept-erase minisd train"
                                f"{TRAIN_FLAGS[name]}`")
    return path


def judges_path() -> Path:
    """The packaged digit and style judges (one safetensors file)."""
    return ASSETS / "judges.safetensors"


def _index(name: str | int, choices: tuple[str, ...], what: str) -> int:
    if isinstance(name, int) and 0 <= name < len(choices):
        return name
    if name in choices:
        return choices.index(name)
    raise ConceptEraseError(f"unknown MiniSD {what} {name!r}; choose one of {', '.join(choices)}")


def digit_index(digit: str | int) -> int:
    """0-9 for a digit given by name ("seven") or index."""
    return _index(digit, DIGITS, "digit")


def style_index(style: str | int) -> int:
    """The index in `STYLES` of a style given by name or index."""
    return _index(style, STYLES, "style")


def minisd_prompt(digit: str | int, style: str | int = "plain") -> str:
    """The prompt MiniSD was trained on for a digit (name or 0-9) in a style."""
    return f"{PROMPT_PREFIX} {DIGITS[digit_index(digit)]}{STYLE_SUFFIX[STYLES[style_index(style)]]}"


def vocabulary() -> list[str]:
    """Every word of every MiniSD prompt: the tokenizer makes each one a single token (docs/MINISD.md)."""
    words = PROMPT_PREFIX.split() + list(DIGITS)
    for suffix in STYLE_SUFFIX.values():
        words += suffix.split()
    return list(dict.fromkeys(words))


__all__ = ["DIGITS", "STYLES", "MINISD_MODELS", "MINISD_STEPS", "MINISD_GUIDANCE", "minisd_path", "judges_path",
           "digit_index", "style_index", "minisd_prompt", "vocabulary"]
