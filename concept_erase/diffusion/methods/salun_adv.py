"""SalUn-Adv: SalUn made robust to adversarial prompts, in the spirit of AdvUnlearn (Zhang et al., NeurIPS 2024), or
to relearning, in the spirit of meta-unlearning (Gao et al., arXiv 2410.12777, ICCV 2025; docs/ALGORITHMS.md 4).

AdvUnlearn solves min_theta [forget loss on adversarial prompts found by an inner attack + retain loss]. Here the
outer problem is SalUn's own step (docs/ALGORITHMS.md 2: the forget prediction steered to the surrogate's,
alpha x the retain denoising loss, on the saliency mask's weights); the inner problem is, by `--adv-attack`:

- conditioning (the default): the conditioning-space attack (`evaluation/attacks/embedding.py`'s objective, at a
  small budget): every `adv_every` steps, for half of the step's forget items, `adv_steps` Adam steps on a
  perturbation delta of their conditioning minimise the CURRENT model's denoising error on those forget images,
  i.e. find the conditioning that still draws the concept. The SalUn step then remaps those adversarial
  conditionings to the surrogate, together with the plain forget prompts of the other half.
- relearn: the relearning attack (`evaluation/attacks/relearn.py`), simulated: every `adv_every` steps,
  `adv_steps` Adam steps fine-tune EVERY weight of the UNet on the micro-batch's forget images with their own
  prompts (the attacker's plain denoising loss), SalUn's forget loss is taken at those fine-tuned weights
  theta', and its gradient at theta' (first-order, as first-order MAML: no gradient through the simulated
  steps) joins the step's own SalUn gradient, times `adv_weight`; the weights (and their gradients, the
  flags of what trains) are then put back bit for bit. The sum goes through the same masked optimizer, so only
  the salient entries move.

Both inner attacks draw their noise from (seed, step), so a run is deterministic and a resumed run repeats the
uninterrupted one. Both take gradients with `torch.autograd.grad`: the model's accumulated gradients (and DDP's
hooks) are untouched until the outer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...errors import ConceptEraseError
from ..conditioning import minimise_denoising_error
from ..losses import NoisedBatch
from ..models.family import Conditioning, as_conditioning
from .options import SalUnAdvSpec
from .salun import SalUn


@dataclass
class RelearnedBatch(NoisedBatch):
    """A forget batch with SalUn's forget loss at the simulated relearned weights: its value and, per trained
    parameter, its gradient there (what the outer step adds, `adv_weight` times)."""

    relearned_loss: Tensor | None = None
    relearned_grads: list[tuple[nn.Parameter, Tensor]] = field(default_factory=list)


class SalUnAdv(SalUnAdvSpec, SalUn):

    def prepare(self, trained, pipe, device):
        self.trained = trained  # the module that trains also decides where the inner attack acts

    def forget_batch(self, model, scheduler, latents, cond, target_cond, noise, timesteps, draws, *, step=None,
                     prompts=None):
        # the loop's steps that adv_every divides are attacked; a forget batch outside the loop (the
        # after-training forget measure, step None) is the plain prompts'
        c = self.config
        attacked = step is not None and step % c.adv_every == 0
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + (step or 0) + 500_009)
        if attacked and c.adv_attack == "conditioning":
            cond = as_conditioning(cond)
            half = max(1, len(cond) // 2)
            # the trained module's attack (trained.py): on the conditioning for the UNet, on the input token
            # embeddings for the text encoder (AdvUnlearn), which then re-encodes them with grad
            adv = self.trained.adversarial(model, scheduler, latents[:half], prompts[:half], cond[:half],
                                           steps=c.adv_steps, lr=self.inner_lr(), generator=gen)
            cond = Conditioning.cat([adv, cond[half:]]) if half < len(cond) else adv
        batch = super().forget_batch(model, scheduler, latents, cond, target_cond, noise, timesteps, draws)
        if attacked and c.adv_attack == "relearn":
            value, grads = self.relearned_forget_gradient(model, scheduler, latents, cond, batch, gen)
            batch = RelearnedBatch(**vars(batch), relearned_loss=value, relearned_grads=grads)
        return batch

    def relearned_forget_gradient(self, model: nn.Module, scheduler, latents: Tensor, cond, batch: NoisedBatch,
                                  generator: torch.Generator) -> tuple[Tensor, list[tuple[nn.Parameter, Tensor]]]:
        """SalUn's forget loss on `batch` at theta' (every weight of `model` after `adv_steps` Adam steps at the
        inner rate minimising the denoising error of `latents` under their own prompts' `cond`) and its gradient
        there for each parameter that trains; `model` is left exactly as it was."""
        params = list(model.parameters())
        if any(hasattr(p, "full_tensor") for p in params):
            raise ConceptEraseError("--adv-attack relearn does not run on a sharded (FSDP) model")
        trains = [p.requires_grad for p in params]
        kept = [(p.detach().clone(), p.grad) for p in params]
        try:
            model.requires_grad_(True)  # the attacker fine-tunes every weight, salient or not
            minimise_denoising_error(model, scheduler, latents, lambda: cond, params, steps=self.config.adv_steps,
                                     lr=self.inner_lr(), generator=generator)
            value = super().loss(model, batch, None)[0]
            trained = [p for p, t in zip(params, trains) if t]
            grads = torch.autograd.grad(value, trained)
        finally:
            with torch.no_grad():
                for p, (weight, grad), t in zip(params, kept, trains):
                    p.copy_(weight)
                    p.grad = grad
                    p.requires_grad_(t)
        return value.detach(), list(zip(trained, grads))

    def loss(self, unet, forget, retain):
        loss, loss_f, loss_r = super().loss(unet, forget, retain)
        if isinstance(forget, RelearnedBatch):
            # value: the relearned forget loss; gradient: its gradient at theta', applied at theta (first-order)
            linear = sum((g * (p - p.detach())).sum() for p, g in forget.relearned_grads)
            loss = loss + self.config.adv_weight * (forget.relearned_loss + linear)
        return loss, loss_f, loss_r

    def card_entries(self, summary: dict) -> dict:
        c = self.config
        return {**super().card_entries(summary),
                "adversarial": {"attack": c.adv_attack, "every": c.adv_every, "steps": c.adv_steps,
                                "lr": self.inner_lr(), **({"weight": c.adv_weight} if c.adv_attack == "relearn"
                                                          else {})}}
