"""Adversarial attacks on erased models: does the concept come back under an adversarial prompt?

Four attacks, each a `learn(pipe, rows, targets, budget, seed, ...) -> Learned` with a fixed, printed budget
(`budgets.py`), deterministic in its seed, saving what it learned so it can be replayed on another model:

- `inversion`: concept inversion (Pham et al., ICLR 2024), textual inversion on the erased model;
- `unlearndiffatk`: UnlearnDiffAtk (Zhang et al., ECCV 2024), k prefix tokens per prompt, discrete or soft;
- `ringabell`: Ring-A-Bell (Tsai et al., ICLR 2024), a concept vector added to the prompt's conditioning;
- `embedding`: the conditioning-space upper bound (no tokenizer, no text encoder).

`run.py` is the `concept-erase attack` job (Pre-ASR / ASR the UnlearnDiffAtk way, docs/PROTOCOLS.md),
`audit.py` the `concept-erase audit` report, `detectors.py` the success tests.
"""

from __future__ import annotations

from importlib import import_module

ATTACK_NAMES = ("inversion", "unlearndiffatk", "ringabell", "embedding")


def attack_fn(name: str):
    """The `learn` function of attack `name` (a one-line error for an unknown one)."""
    from concept_erase.errors import ConceptEraseError

    if name not in ATTACK_NAMES:
        raise ConceptEraseError(f"unknown attack {name!r} (choose from {', '.join(ATTACK_NAMES)})")
    return import_module(f"{__name__}.{name}").learn
