"""The mask pass of a diffusion erasure: the SalUn saliency loss over the forget set, through the mask engine
(`concept_erase/saliency.py`; docs/ALGORITHMS.md 1-2)."""

from __future__ import annotations

from typing import Iterator

import torch

from ...saliency import SaliencyMask
from ..conditioning import PromptEmbeddings
from ..data.latents import LatentSet
from ..losses import SALIENCY_GUIDANCE, noise_batch, sample_noise, training_scheduler
from ..models.families import family_of
from .trained import trained_module


def saliency_batches(pipe, forget: LatentSet, *, batch_size: int = 8, seed: int = 0) -> Iterator:
    """One pass over the forget set as `NoisedBatch`es for the saliency loss: noise and t ~ U{0..T-1} drawn
    from `seed`, `target_cond` the empty prompt (docs/ALGORITHMS.md 1)."""
    device = next(pipe.unet.parameters()).device
    embed = PromptEmbeddings(pipe, device, size=family_of(pipe).latents_image_size(pipe, forget.latent_shape))
    cond, uncond = embed(forget.prompts), embed([""])
    T = pipe.scheduler.config.num_train_timesteps
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
                 progress: bool = False, gradient_checkpointing: bool = False, train: str = "unet"):
    """The SalUn mask of the trained module (`train`: `pipe.unet`, or the text encoder, the loss then
    differentiated through it: `trained.py`) for a forget set: one pass over it with the diffusion saliency loss
    (docs/ALGORITHMS.md 1-2: MSE(eps, (1 + w) eps(x_t, c_f) - w eps(x_t, "")), w = 7.5, t ~ U{0..999}), noise and
    timesteps from `seed`; `include`: None (every UNet weight) or a regex on parameter names.
    `lowest=True` keeps the LEAST salient weights instead (the inverted-mask control of the benchmark).
    `gradient_checkpointing`: recompute activations in the backward pass (the same gradients, less memory)."""
    trained = trained_module(train)(pipe, next(pipe.unet.parameters()).device,
                                    family_of(pipe).latents_image_size(pipe, forget.latent_shape))
    prompts = [forget.prompts[lo: lo + batch_size] for lo in range(0, len(forget), batch_size)]
    batches = zip(saliency_batches(pipe, forget, batch_size=batch_size, seed=seed), prompts)
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    try:
        return SaliencyMask.compute(trained.module, batches, trained.saliency_loss_fn(guidance), keep=keep,
                                    include=include, concept=concept, lowest=lowest, progress=progress)
    finally:
        if gradient_checkpointing:
            pipe.unet.disable_gradient_checkpointing()
