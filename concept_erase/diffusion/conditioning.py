"""Conditionings: prompts encoded once for training, and optimised in conditioning space.

- `PromptEmbeddings`: each distinct prompt encoded once with the frozen text encoder(s), the way the
  pipeline's family conditions its UNet (`models/families.py`);
- `optimise_conditioning`: THE Adam loop on what perturbs a conditioning, against a denoising error. Its callers
  say what is perturbed and the objective: SalUn-Adv's inner attack (`minimise_denoising_error`, AdvUnlearn,
  Zhang et al., NeurIPS 2024) on the conditioning for the UNet (`adversarial_conditioning`) or on the input
  token embeddings (`training/trained.py`), and the attacks of `evaluation/attacks` (learned tokens, the
  conditioning itself; per-row seeded noise);
- `shifted` adds a perturbation to a conditioning (never to `FIXED`), `edited_token_embeddings` is the one
  hook on a text encoder's input token embeddings.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import noise_batch, sample_noise
from .models.family import Conditioning, as_conditioning
from .models.families import family_of


class PromptEmbeddings:
    """Encode each distinct prompt once with the frozen text encoder(s), the way the pipeline's family
    conditions its UNet (`families.py`); index by item."""

    def __init__(self, pipe, device, size: tuple[int, int] | None = None):
        self.pipe, self.device, self.size, self.cache = pipe, device, size, {}
        self.family = family_of(pipe)
        for encoder in self.family.text_modules(pipe).values():
            encoder.to(device)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if new:
            cond = self.family.encode(self.pipe, new, self.device, self.size)
            self.cache.update((p, cond[i]) for i, p in enumerate(new))
        return Conditioning.cat([self.cache[p] for p in prompts])


FIXED = ("time_ids", "guidance")  # SDXL's image-size ids and FLUX's guidance are not the text's: never perturbed


def shifted(cond: Conditioning, offset: Mapping[str, Tensor]) -> Conditioning:
    """`cond` + `offset` ({"hidden": ..., and any of cond's extras}); extras without an offset stay as they are."""
    return replace(cond, hidden=cond.hidden + offset["hidden"].to(cond.hidden),
                   added={k: v + offset[k].to(v) if k in offset else v for k, v in cond.added.items()})


@contextmanager
def edited_token_embeddings(edits: Mapping[nn.Module, Callable[[Tensor, Tensor], Tensor]]):
    """While active, each text encoder's input token embeddings (B, L, D) are `edit(ids, embeddings)`: where a
    token-space perturbation enters (AdvUnlearn's attack, an attack's learned tokens), so the encoder runs as
    usual and gradients flow through it to the perturbation. The encoders' weights are untouched."""
    handles = [encoder.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output, edit=edit: edit(inputs[0], output)) for encoder, edit in edits.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def optimise_conditioning(params: Sequence[Tensor], objective: Callable[[int], Tensor], *, steps: int,
                          lr: float, cosine: bool = False) -> list[Tensor]:
    """Adam on `params`, whatever they perturb (a conditioning delta, input token embeddings, the conditioning
    itself), for `steps` steps minimising `objective(step)`, a denoising error of the conditioning they give.
    Gradients by `torch.autograd.grad` on `params` only: the model's own gradients (and DDP's hooks) are never
    touched. `cosine`: the learning rate decays from `lr` to 0 on a cosine, so a noisy objective (one random
    timestep per step) settles instead of wandering at the last step (the attacks' calibration). Returns each
    step's objective, detached (no device sync)."""
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    history = []
    for step in range(steps):
        loss = objective(step)
        for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
            p.grad = g  # None for a tensor the objective did not use: Adam skips it, as after backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        history.append(loss.detach())
    return history


def minimise_denoising_error(unet: nn.Module, scheduler, latents: Tensor, perturbed: Callable[[], Conditioning],
                             params: Sequence[Tensor], *, steps: int, lr: float, generator: torch.Generator) -> None:
    """SalUn-Adv's inner attack (AdvUnlearn, Zhang et al., NeurIPS 2024): `steps` Adam steps on `params` minimising
    unet's denoising error on `latents` under `perturbed()`, the conditioning they give; fresh noise and timestep
    per step from `generator`."""
    T = scheduler.config.num_train_timesteps

    def error(step: int) -> Tensor:
        noise, t = sample_noise(latents, T, generator)
        batch = noise_batch(scheduler, latents, perturbed(), noise.to(latents.device), t.to(latents.device))
        pred = batch.cond.predict(unet, batch.noisy, batch.timesteps)
        return F.mse_loss(pred.float(), batch.target.float())

    optimise_conditioning(params, error, steps=steps, lr=lr)


def adversarial_conditioning(unet: nn.Module, scheduler, latents: Tensor, cond: Conditioning, *, steps: int,
                             lr: float, generator: torch.Generator) -> Conditioning:
    """The inner attack on the conditioning for the UNet: cond + delta, delta (on all but `FIXED`) from 0 by
    `minimise_denoising_error`. Returns a detached conditioning."""
    cond = as_conditioning(cond)
    delta = {"hidden": torch.zeros_like(cond.hidden, requires_grad=True)}
    delta |= {k: torch.zeros_like(v, requires_grad=True) for k, v in cond.added.items() if k not in FIXED}
    minimise_denoising_error(unet, scheduler, latents, lambda: shifted(cond, delta), delta.values(), steps=steps,
                             lr=lr, generator=generator)
    with torch.no_grad():
        return shifted(cond, delta)
