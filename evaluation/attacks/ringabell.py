"""Ring-A-Bell (Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models?",
ICLR 2024): a concept vector v = mean over prompt pairs of (enc(prompt with the concept) - enc(the same
prompt without it)), added with strength eta to each attacked prompt's conditioning: c = enc(prompt) + eta v.

The pairs are the concept's own (forget prompt, surrogate prompt) pairs, which differ exactly by the concept.
The vector is taken with the ORIGINAL model's text encoder when one is given (the paper's attack is model
agnostic: it never looks at the erased model), else with the attacked model's. The paper's genetic search
that turns the vector into discrete tokens is not implemented: this is the continuous attack.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from concept_erase.diffusion.conditioning import FIXED

from .budgets import RingABellBudget
from .core import Learned, encode


def concept_vector(pipe, concept, pairs: int = 0) -> dict[str, torch.Tensor]:
    """{"hidden": (L, D)} and, for families with pooled extras (SDXL), those too: mean(enc(f) - enc(s))."""
    forget = list(concept.forget_prompts)
    surrogate = [concept.surrogate_for(p) for p in forget]
    if pairs:
        forget, surrogate = forget[:pairs], surrogate[:pairs]
    with torch.no_grad():
        a, b = encode(pipe, forget), encode(pipe, surrogate)
    vector = {"hidden": (a.hidden - b.hidden).mean(0)}
    for key, value in a.added.items():
        if key not in FIXED:  # SDXL's image-size ids are not text
            vector[key] = (value - b.added[key]).mean(0)
    return vector


def learn(pipe, rows, targets, budget: RingABellBudget, seed: int = 0, *, concept, base=None, **_):
    t0 = time.perf_counter()
    vector = concept_vector(base if base is not None else pipe, concept, budget.pairs)
    offset = {k: budget.eta * v.cpu() for k, v in vector.items()}
    info = {**asdict(budget), "vector_from": "base model's text encoder" if base is not None else "attacked model's"}
    return Learned("ringabell", info, list(rows), [r.prompt for r in rows], offset=offset,
                   seconds=time.perf_counter() - t0)
