"""SalUn-Adv: SalUn made robust to adversarial prompts, in the spirit of AdvUnlearn (Zhang et al., NeurIPS 2024).

AdvUnlearn solves min_theta [forget loss on adversarial prompts found by an inner attack + retain loss]. Here the
outer problem is SalUn's own step (docs/ALGORITHMS.md 2: the forget prediction steered to the surrogate's,
alpha x the retain denoising loss, on the saliency mask's weights); the inner problem is the conditioning-space
attack (`evaluation/attacks/embedding.py`'s objective, at a small budget): every `adv_every` steps, for half of
the step's forget items, `adv_steps` Adam steps on a perturbation delta of their conditioning minimise the
CURRENT model's denoising error on those forget images, i.e. find the conditioning that still draws the
concept. The SalUn step then remaps those adversarial conditionings to the surrogate, together with the
plain forget prompts of the other half.

The inner attack starts from delta = 0 at every refresh and draws its noise from (seed, step), so a run is
deterministic and a resumed run repeats the uninterrupted one. It takes gradients with `torch.autograd.grad`
on delta only: the model's gradients (and DDP's hooks) are untouched until the outer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .families import Conditioning, as_conditioning
from .losses import noise_batch, sample_noise
from .methods import MASK_FIELDS, SalUn, register_method

ADV_FIELDS = frozenset({"adversarial", "adv_every", "adv_steps", "adv_lr", "train"})
FIXED = ("time_ids",)  # SDXL's image-size ids describe the image, not the text


def adversarial_conditioning(unet: nn.Module, scheduler, latents: Tensor, cond: Conditioning, *, steps: int,
                             lr: float, generator: torch.Generator) -> Conditioning:
    """cond + delta, with delta from `steps` Adam steps (from 0) minimising unet's denoising error on `latents`
    (fresh noise and timestep per step from `generator`). Returns a detached conditioning."""
    cond = as_conditioning(cond)
    deltas = {"hidden": torch.zeros_like(cond.hidden, requires_grad=True)}
    deltas |= {k: torch.zeros_like(v, requires_grad=True) for k, v in cond.added.items() if k not in FIXED}
    opt = torch.optim.Adam(list(deltas.values()), lr=lr)
    T = scheduler.config.num_train_timesteps

    def shifted() -> Conditioning:
        return Conditioning(cond.hidden + deltas["hidden"], {k: v + deltas[k] if k in deltas else v
                                                             for k, v in cond.added.items()})

    for _ in range(steps):
        noise, t = sample_noise(latents, T, generator)
        batch = noise_batch(scheduler, latents, cond, noise.to(latents.device), t.to(latents.device))
        pred = unet(batch.noisy, batch.timesteps, **shifted().unet_kwargs(batch.noisy.dtype)).sample
        loss = F.mse_loss(pred.float(), batch.target.float())
        grads = torch.autograd.grad(loss, list(deltas.values()))
        for d, g in zip(deltas.values(), grads):
            d.grad = g
        opt.step()
    with torch.no_grad():
        return Conditioning(shifted().hidden.detach(), {k: v.detach() for k, v in shifted().added.items()})


class SalUnAdv(SalUn):
    name = "salun-adv"
    help = ("SalUn-Adv (SalUn + AdvUnlearn-style adversarial training): every --adv-every steps, --adv-steps inner "
            "attack steps find adversarial conditionings for half the forget items against the current model; the "
            "SalUn step remaps them to the surrogate with the plain prompts, on the saliency mask's weights")
    fields = SalUn.fields | ADV_FIELDS | MASK_FIELDS

    _pending: tuple[int, list[str]] | None = None

    def condition(self, cond, step, prompts):
        # forget_batch, called next in the loop, attacks on the steps adv_every divides; a forget batch without
        # this call (the after-training forget measure) is the plain prompts'
        self._pending = (step, prompts)
        return cond

    def forget_batch(self, model, scheduler, latents, cond, target_cond, noise, timesteps, draws):
        c = self.config
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] % c.adv_every == 0:
            step, prompts = pending
            cond = as_conditioning(cond)
            half = max(1, len(cond) // 2)
            gen = torch.Generator().manual_seed(c.seed * 1_000_003 + step + 500_009)
            # the trained module's attack (trained.py): on the conditioning for the UNet, on the input token
            # embeddings for the text encoder (AdvUnlearn), which then re-encodes them with grad
            adv = self.trained.adversarial(model, scheduler, latents[:half], prompts[:half], cond[:half],
                                           steps=c.adv_steps, lr=c.adv_lr, generator=gen)
            cond = Conditioning.cat([adv, cond[half:]]) if half < len(cond) else adv
        return super().forget_batch(model, scheduler, latents, cond, target_cond, noise, timesteps, draws)


register_method(SalUnAdv)
# --adversarial turns a method into its adversarial variant (TrainConfig rewrites the method name).
ADVERSARIAL_VARIANTS = {"salun": SalUnAdv.name}
