"""The relearning attack: a few ordinary fine-tuning steps on the erased model, then the concept's plain prompts
are drawn again (the SPQR leaderboard, arXiv 2511.19558, scores erasures on robustness to such fine-tuning).

Two variants (`budget.data`):
- "concept": k images of the concept (the ORIGINAL model's drawings of the forget prompts, seeds disjoint
  from the attacked rows) with their prompts: how many steps bring it back;
- "unrelated": k images of the concept's retain prompts only (benign fine-tuning): does the concept come back
  by itself?

The fine-tuning is the project's own training loop (`training.loop.train_unet`) with the plain diffusion loss
MSE(eps_theta(z_t, c), eps) on every UNet weight: no mask, no surrogate, no retain term. The attacked rows are
then the plain prompts, same seeds, drawn with the relearned UNet. Its result is a whole fine-tuned UNet, kept
in memory (`Learned.weights`), not saved: relearning is re-run on another model, never replayed.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from concept_erase.diffusion.losses import denoising_loss
from concept_erase.diffusion.methods.base import Method
from concept_erase.errors import ConceptEraseError

from .budgets import RelearnBudget
from .core import Learned, Targets

# Seeds of the fine-tuning images, disjoint from the attacked rows' (0, 1, ...) and concept inversion's.
RELEARN_SEED_BASE = 60_000


class Relearning(Method):
    """Plain fine-tuning as a `Method` of the training loop: each image's own prompt, the ordinary denoising loss."""

    name = "relearn"
    help = "fine-tuning with the plain diffusion loss (the relearning attack)"
    fields = frozenset()
    needs_surrogate = False

    def target_prompts(self, prompts, surrogates):
        return prompts

    def loss(self, unet, forget, retain):
        loss = denoising_loss(unet, forget)
        return loss, loss.detach(), loss.detach() * 0


def training_images(base, concept, budget: RelearnBudget, protocol):
    """(images, prompts) the attack fine-tunes on: the original model's drawings of the concept's forget prompts
    ("concept") or retain prompts ("unrelated"), `budget.images` of them, cycling through the prompts."""
    from ..prompts import PromptRow
    from .run import draw

    prompts = list(concept.forget_prompts if budget.data == "concept" else concept.retain_prompts)
    if not prompts:
        raise ConceptEraseError(f"the relearning attack ({budget.data} images) needs {concept.name!r} to have "
                                f"{'forget' if budget.data == 'concept' else 'retain'} prompts")
    rows = [PromptRow(i, prompts[i % len(prompts)], RELEARN_SEED_BASE + i) for i in range(budget.images)]
    return draw(base, rows, protocol), [r.prompt for r in rows]


def learn(pipe, rows, targets: Targets, budget: RelearnBudget, seed: int = 0, *, concept=None, base=None,
          protocol=None, **_) -> Learned:
    from concept_erase.diffusion.data.images import encode_latents
    from concept_erase.diffusion.data.latents import LatentSet
    from concept_erase.diffusion.training.config import TrainConfig
    from concept_erase.diffusion.training.loop import train_unet

    if base is None or concept is None or protocol is None:
        raise ConceptEraseError("the relearning attack fine-tunes on the original model's images (--base)")
    t0 = time.perf_counter()
    images, prompts = training_images(base, concept, budget, protocol)
    latents = encode_latents(pipe, images, batch_size=16)
    config = TrainConfig(method="rl", steps=budget.steps, lr=budget.lr, batch_size=min(budget.batch_size, len(prompts)),
                         seed=seed, alpha=0.0)
    own = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    unet = pipe.unet
    try:
        result = train_unet(pipe, LatentSet(latents, prompts), None, Relearning(config))
        weights = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    finally:  # the attacked model is left as it was: the relearned weights are swapped in only to draw
        pipe.unet = unet
        pipe.unet.load_state_dict(own)
        pipe.unet.requires_grad_(False).eval()
    return Learned("relearn", asdict(budget), list(rows), [r.prompt for r in rows], weights=weights,
                   history=[s["loss"] for s in result.losses], seconds=time.perf_counter() - t0)
