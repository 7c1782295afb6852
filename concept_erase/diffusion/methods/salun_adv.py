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

from ..models.family import Conditioning, as_conditioning
from .options import SalUnAdvSpec
from .salun import SalUn


class SalUnAdv(SalUnAdvSpec, SalUn):

    def prepare(self, trained, pipe, device):
        self.trained = trained  # the module that trains also decides where the inner attack acts

    def forget_batch(self, model, scheduler, latents, cond, target_cond, noise, timesteps, draws, *, step=None,
                     prompts=None):
        # the loop's steps that adv_every divides are attacked; a forget batch outside the loop (the
        # after-training forget measure, step None) is the plain prompts'
        c = self.config
        if step is not None and step % c.adv_every == 0:
            cond = as_conditioning(cond)
            half = max(1, len(cond) // 2)
            gen = torch.Generator().manual_seed(c.seed * 1_000_003 + step + 500_009)
            # the trained module's attack (trained.py): on the conditioning for the UNet, on the input token
            # embeddings for the text encoder (AdvUnlearn), which then re-encodes them with grad
            adv = self.trained.adversarial(model, scheduler, latents[:half], prompts[:half], cond[:half],
                                           steps=c.adv_steps, lr=c.adv_lr, generator=gen)
            cond = Conditioning.cat([adv, cond[half:]]) if half < len(cond) else adv
        return super().forget_batch(model, scheduler, latents, cond, target_cond, noise, timesteps, draws)
