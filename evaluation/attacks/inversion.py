"""Concept inversion (Pham et al., "Circumventing Concept Erasure Methods For Text-to-Image Generative
Models", ICLR 2024): textual inversion on the ERASED model. Every weight stays frozen; k new token
embeddings are learned from images of the concept with the ordinary denoising loss (textual inversion's
objective). If the erased UNet can still draw the concept, some embedding reaches it.

Here the learned tokens are a universal prefix: learned on the concept images with their captions after the
placeholders, and evaluated as "<tokens> <row prompt>" on each attacked row (UnlearnDiffAtk learns one
prefix per prompt instead). Initialisation: the mean vocabulary embedding (no hint of the concept).
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from concept_erase.diffusion.conditioning import optimise_conditioning
from concept_erase.errors import ConceptEraseError

from .budgets import InversionBudget
from .core import Learned, Targets, attack_denoising_error, check_prefix_fits, encode, frozen, vocabulary
from .structure import prefixed


def learn(pipe, rows, targets: Targets, budget: InversionBudget, seed: int = 0, **_) -> Learned:
    if targets.images is None or not len(targets.images):
        raise ConceptEraseError("concept inversion needs images of the concept (--base to draw them, or --images)")
    t0 = time.perf_counter()
    n = min(budget.images, targets.images.shape[0])
    latents, captions = targets.images[:n], list(targets.captions or [""] * n)[:n]
    k = budget.tokens
    check_prefix_fits(pipe, [*captions, *(r.prompt for r in rows)], k)
    vectors = {name: w.detach().float().mean(0).expand(1, k, -1).clone().requires_grad_(True)
               for name, w in vocabulary(pipe).items()}
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    per_step = min(budget.batch_size, n)

    def objective(step):
        # Cycle through the images in a seeded order, batch_size per step (textual inversion's loop).
        idx = [order[(step * per_step + j) % n] for j in range(per_step)]
        cond = encode(pipe, [prefixed(captions[i], k) for i in idx], vectors)
        return attack_denoising_error(pipe, latents[idx], cond, idx, step, seed)

    with frozen(pipe):
        history = [loss.item() / per_step
                   for loss in optimise_conditioning(vectors.values(), objective, steps=budget.steps, lr=budget.lr)]
    return Learned("inversion", asdict(budget), list(rows), [prefixed(r.prompt, k) for r in rows],
                   prefix={name: v.detach() for name, v in vectors.items()}, history=history,
                   seconds=time.perf_counter() - t0)
