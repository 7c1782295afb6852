"""What an erasure method is: one object per run, built once from the run's config, that owns everything
method-specific (docs/ALGORITHMS.md 2). The training loop (`training/loop.py`), the job (`training/job.py`)
and `plan` ask it and never test its name.

A `Method` says, through its spec (`options.py`, no torch, so the parsers and the run config read it before
torch loads)
- which fields of the run config it reads (`fields`): the shared field groups plus its own options dataclass;
  a field it does not read, set by the user, is refused with one line naming the flag and the method
  (`check_fields`, called by the run config for `erase` and `plan` alike);
- what data it needs (`forget_image_prompts`, `needs_retain`: the retain denoising term, whenever its alpha
  > 0); and here, with tensors, `forget_set`: images of the forget prompts, images of the anchors paired with
  forget prompts, or prompts only;
- what it trains: `trainable(module, family, mask)` gives a `SaliencyMask` over the trained module's
  parameters (its saliency mask, or its layer scope narrowed by a user's mask), or None for every weight;
- its loss for one step: `loss(unet, forget_batch, retain_batch)` -> (loss, loss_forget, loss_retain);
- or, for a closed-form method (UCE), `edit(pipe, concept)` instead of a loop.

Seams kept in single places elsewhere: the optimizer is built once by the loop from `trainable`
(`saliency.build_optimizer`: state for the salient entries only), and each step's loss and weights are checked
by `training/guard.py`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ...errors import ConceptEraseError
from ..losses import NoisedBatch, noise_batch
from .spec import MethodSpec


class Method(MethodSpec):
    """Base class: see the module docstring. One instance per run, holding the run's config; its facts (name,
    fields, defaults, what data it asks) are its spec's (`options.py`), which it subclasses."""

    # -- its data ----------------------------------------------------------------------------------------

    def forget_set(self, concept, images):
        """The forget items this method trains on, as a `LatentSet` (`images`: a `data.latents.ImageSource`).
        Default: images of the forget prompts (or the user's folder), each with its surrogate prompt."""
        from ..data.latents import LatentSet

        c = self.config
        found = (images.from_folder(c.forget_images, concept.forget_prompts[0]) if c.forget_images
                 else images.generated(concept.forget_prompts, c.num_forget_images, "forget images"))
        return LatentSet(images.encoded(found), found.prompts, [concept.surrogate_for(p) for p in found.prompts])

    def check_pipeline(self, pipe) -> None:
        """Refuse, before any image is generated, a setting of this method the pipeline cannot run."""

    # -- what it trains ----------------------------------------------------------------------------------

    def trainable(self, module: nn.Module, family, mask):
        """The SaliencyMask of the weights that train (None: all of them). Default: the user's mask, if any."""
        return mask

    def _scope(self, unet: nn.Module, keep_name: Callable[[str], bool], mask):
        """Every weight of the parameters `keep_name` selects, narrowed by a user's mask if one is given."""
        from ...saliency import SaliencyMask

        scope = SaliencyMask.from_names(unet, keep_name, concept=self.name)
        if mask is not None:
            mask.check_compatible(unet)
            scope.masks = {n: m & mask.masks.get(n, torch.zeros_like(m)) for n, m in scope.masks.items()}
        return scope

    # -- one step ----------------------------------------------------------------------------------------

    def prepare(self, trained, pipe, device) -> None:
        """Once, before any update (and before a resumed checkpoint is loaded). `trained`: the run's trained
        module (`training/trained.py`), which also encodes prompts."""

    def target_prompts(self, prompts: list[str], surrogates: list[str] | None) -> list[str]:
        """Per forget item, the prompt its target is computed from (`NoisedBatch.target_cond`)."""
        if surrogates is None:
            raise ConceptEraseError(f"method {self.name!r} needs a surrogate prompt for every forget item")
        return surrogates

    def draw(self, gen: torch.Generator) -> dict:
        """Extra random draws of a step's GLOBAL batch, after its noise and timesteps (same on every process)."""
        return {}

    def forget_batch(self, model: nn.Module, scheduler, latents: Tensor | None, cond, target_cond, noise: Tensor,
                     timesteps: Tensor, draws: dict, *, step: int | None = None,
                     prompts: list[str] | None = None) -> NoisedBatch:
        """The forget items of a micro-batch, noised: z_t = q_sample(z, t, eps). `model` is the unwrapped UNet;
        `step` and `prompts` are given inside the loop (None: a measurement after training)."""
        return noise_batch(scheduler, latents, cond, noise, timesteps, target_cond)

    def loss(self, unet: nn.Module, forget: NoisedBatch, retain: NoisedBatch | None) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def card_entries(self, summary: dict) -> dict:
        """What the model card records of how this method ran (`summary`: the job's)."""
        c = self.config
        return {"steps": summary["steps"],
                "training": {"trained": summary["trained"], "lr": c.lr, "alpha": c.alpha, "batch_size": c.batch_size,
                             "seed": c.seed, "forget_images": summary["forget_images"],
                             "retain_images": summary["retain_images"]}}

    def edit(self, pipe, concept) -> dict:
        """A closed-form method's edit of `pipe` in place; returns its report."""
        raise NotImplementedError

    def write_files(self, folder) -> None:
        """Files this method adds to the output folder beside the pipeline (SAFREE: its safree.json)."""
