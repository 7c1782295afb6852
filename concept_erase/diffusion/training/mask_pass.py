"""The mask pass of a diffusion erasure: a loss over the forget set through the mask engine
(`concept_erase/saliency.py`; docs/ALGORITHMS.md 1, 4), scored as the run asks:
- salun and snip: one pass of the SalUn saliency loss (snip multiplies its gradient by the weights);
- ant: `ANTOptions.ant_rounds` augmented passes (each with its own noise and timestep draws, over every forget
  prompt variant) of ANT's late-stage loss, timesteps drawn from the late stage t <= t' only."""

from __future__ import annotations

from typing import Iterator

import torch

from ...errors import ConceptEraseError
from ...saliency import SaliencyMask
from ..conditioning import PromptEmbeddings
from ..data.latents import LatentSet
from ..losses import SALIENCY_GUIDANCE, noise_batch, sample_noise, training_scheduler
from ..methods.ant import ant_score_loss, late_stage_start
from ..methods.options import ANTOptions
from ..models.families import family_of
from .trained import trained_module


def saliency_batches(pipe, forget: LatentSet, *, batch_size: int = 8, seed: int = 0,
                     max_timestep: int | None = None) -> Iterator:
    """One pass over the forget set as `NoisedBatch`es for the saliency loss: noise and t ~ U{0..T-1} drawn
    from `seed` (t ~ U{0..max_timestep} when given), `target_cond` the empty prompt (docs/ALGORITHMS.md 1)."""
    device = next(family_of(pipe).denoiser(pipe).parameters()).device
    embed = PromptEmbeddings(pipe, device, size=family_of(pipe).latents_image_size(pipe, forget.latent_shape))
    cond, uncond = embed(forget.prompts), embed([""])
    T = pipe.scheduler.config.num_train_timesteps if max_timestep is None else max_timestep + 1
    scheduler = training_scheduler(pipe.scheduler)
    gen = torch.Generator().manual_seed(seed)
    for lo in range(0, forget.latents.shape[0], batch_size):
        z = forget.latents[lo: lo + batch_size]
        noise, t = sample_noise(z, T, gen)
        c = cond[lo: lo + batch_size]
        yield noise_batch(scheduler, z.to(device), c, noise.to(device), t.to(device), uncond.expand(len(c)))


def mask_batch(config) -> int:
    """The mask pass's batch: the training micro-batch (the scores are a sum over the whole forget set, so the
    split changes only their common scale, up to float rounding, and the memory the pass needs)."""
    return max(1, config.batch_size // config.gradient_accumulation_steps)


def compute_mask(pipe, forget: LatentSet, keep: float = 0.5, *, include=None, batch_size: int = 8,
                 seed: int = 0, guidance: float = SALIENCY_GUIDANCE, concept: str = "", lowest: bool = False,
                 progress: bool = False, gradient_checkpointing: bool = False, train: str = "unet",
                 score: str = "salun", ant: ANTOptions | None = None):
    """The saliency mask of the trained module (`train`: `pipe.unet`, or the text encoder, the loss then
    differentiated through it: `trained.py`) for a forget set: one pass over it with the diffusion saliency loss
    (docs/ALGORITHMS.md 1-2: MSE(eps, (1 + w) eps(x_t, c_f) - w eps(x_t, "")), w = 7.5, t ~ U{0..999}), noise and
    timesteps from `seed`; `include`: None (every UNet weight) or a regex on parameter names.
    `lowest=True` keeps the LEAST salient weights instead (the inverted-mask control of the benchmark).
    `gradient_checkpointing`: recompute activations in the backward pass (the same gradients, less memory).
    `score`: salun, snip or ant (the module docstring); `ant`: ANT's settings (t', eta, rounds; default ANT's)."""
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    trained = trained_module(train)(pipe, next(denoiser.parameters()).device,
                                    family.latents_image_size(pipe, forget.latent_shape))
    prompts = [forget.prompts[lo: lo + batch_size] for lo in range(0, len(forget), batch_size)]
    if score == "ant":
        if train != "unet":
            raise ConceptEraseError(f"--score ant ranks UNet weights (ANT trains the UNet), not --train {train}")
        ant = ant or ANTOptions()
        late = late_stage_start(pipe.scheduler, ant)
        # round r: its own noise and timesteps (ANT's several seeds) over every forget prompt variant
        batches = (zip(saliency_batches(pipe, forget, batch_size=batch_size, seed=seed * 1_000_003 + r,
                                        max_timestep=late), prompts) for r in range(ant.ant_rounds))
        loss_fn = lambda unet, item: ant_score_loss(unet, item[0], ant.ant_eta)  # noqa: E731
    else:
        batches = zip(saliency_batches(pipe, forget, batch_size=batch_size, seed=seed), prompts)
        loss_fn = trained.saliency_loss_fn(guidance)
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    try:
        return SaliencyMask.compute(trained.module, batches, loss_fn, keep=keep, include=include, concept=concept,
                                    lowest=lowest, progress=progress, score=score)
    finally:
        if gradient_checkpointing:
            denoiser.disable_gradient_checkpointing()
