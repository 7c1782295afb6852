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

from dataclasses import dataclass, field

import torch

from ..models.family import Conditioning, as_conditioning
from ..training.trained import TRAINED
from .base import option_names
from .salun import SalUn


@dataclass
class AdversarialOptions:
    adversarial: bool = field(default=False, metadata={
        "help": "SalUn-Adv: every --adv-every steps an inner attack finds adversarial conditionings for half the "
                "forget items against the current model, and the step remaps them to the surrogate as well "
                "(AdvUnlearn-style; --method salun only)"})
    adv_every: int = field(default=1, metadata={
        "help": "adversarial: run the inner attack every this many steps", "min": 1})
    adv_steps: int = field(default=5, metadata={
        "help": "adversarial: inner attack steps (Adam on the conditioning)", "min": 1})
    adv_lr: float = field(default=0.02, metadata={"help": "adversarial: the inner attack's learning rate", "above": 0})
    train: str = field(default="unet", metadata={
        "help": "the module that trains: unet, or text-encoder (AdvUnlearn's plug-in robust text encoder, UNet "
                "frozen; salun only; the saliency mask is over the encoder's weights; the inner attack of "
                "--adversarial perturbs the input token embeddings)", "choices": TRAINED})


class SalUnAdv(SalUn):
    name = "salun-adv"
    help = ("SalUn-Adv (SalUn + AdvUnlearn-style adversarial training): every --adv-every steps, --adv-steps inner "
            "attack steps find adversarial conditionings for half the forget items against the current model; the "
            "SalUn step remaps them to the surrogate with the plain prompts, on the saliency mask's weights")
    fields = SalUn.fields | option_names(AdversarialOptions)

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


# --adversarial turns a method into its adversarial variant (the run config rewrites the method name).
ADVERSARIAL_VARIANTS = {"salun": SalUnAdv.name}
