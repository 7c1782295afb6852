"""ESD (Gandikota et al., ICCV 2023): target eps0(z_t, "") - eta (eps0(z_t, c) - eps0(z_t, "")), eps0 the
frozen original UNet, z_t from partial DDIM sampling with the model being trained (docs/ALGORITHMS.md 2).
It needs no images: the forget "data" are its prompts. ESD-x trains the cross-attention weights, ESD-u every
other weight.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..losses import NoisedBatch, esd_loss, esd_partial_sample, esd_scheduler
from .base import LOOP_FIELDS, RETAIN_FIELDS, SAMPLING_FIELDS, Method, option_names


@dataclass
class ESDOptions:
    esd_eta: float = field(default=1.0, metadata={"help": "ESD negative guidance eta", "min": 0})
    esd_ddim_steps: int = field(default=50, metadata={
        "help": "ESD: DDIM steps of the partial sampling that gives z_t", "min": 1})
    esd_start_guidance: float = field(default=3.0, metadata={
        "help": "ESD: guidance scale of that partial sampling", "min": 0})


class ESD(Method):
    # retain images (alpha > 0) are generated like any method's, so the sampling fields apply to them
    fields = LOOP_FIELDS | SAMPLING_FIELDS | RETAIN_FIELDS | option_names(ESDOptions) | {"mask"}
    needs_surrogate = False
    samples_latents = True
    frozen_copy = True
    cross_attention: ClassVar[bool]

    def check_pipeline(self, pipe):
        from ..data.generate import check_sampling

        check_sampling(pipe, self.config.esd_ddim_steps, steps_flag="--esd-ddim-steps")

    def forget_set(self, concept, images):
        return images.prompts_only(concept.forget_prompts)

    def forget_image_prompts(self, concept):
        return []

    def trainable(self, module, family, mask):
        return self._scope(module, lambda n: family.is_cross_attention(n) == self.cross_attention, mask)

    def prepare(self, trained, pipe, device):
        # eps0 is the model BEFORE any update (also before a resumed checkpoint is loaded)
        self.frozen = copy.deepcopy(pipe.unet).requires_grad_(False).eval().to(device)
        self.sampler = esd_scheduler(pipe.scheduler)  # private: set_timesteps mutates it

    def target_prompts(self, prompts, surrogates):
        return [""] * len(prompts)  # the empty prompt: eps0(z_t, "")

    def draw(self, gen):
        return {"stop": int(torch.randint(0, self.config.esd_ddim_steps, (1,), generator=gen))}

    def forget_batch(self, model, scheduler, latents, cond, target_cond, noise, timesteps, draws, *, step=None,
                     prompts=None):
        c = self.config
        z_t, t = esd_partial_sample(model, self.sampler, noise, cond, target_cond, c.esd_ddim_steps, draws["stop"],
                                    c.esd_start_guidance)
        return NoisedBatch(z_t, noise, noise, t, cond, target_cond)

    def loss(self, unet, forget, retain):
        return esd_loss(unet, self.frozen, forget, self.config.esd_eta, retain, self.config.alpha)


class ESDX(ESD):
    name = "esd-x"
    help = "ESD-x: ESD's negative-guidance target on the cross-attention weights only"
    cross_attention = True


class ESDU(ESD):
    name = "esd-u"
    help = "ESD-u: ESD's negative-guidance target on every weight except cross-attention"
    cross_attention = False
