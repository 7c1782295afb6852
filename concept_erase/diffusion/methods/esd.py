"""ESD (Gandikota et al., ICCV 2023): target eps0(z_t, "") - eta (eps0(z_t, c) - eps0(z_t, "")), eps0 the
frozen original UNet, z_t from partial DDIM sampling with the model being trained (docs/ALGORITHMS.md 2).
It needs no images: the forget "data" are its prompts. ESD-x trains the cross-attention weights, ESD-u every
other weight. On SD 3 and FLUX (docs/ALGORITHMS.md 5) the same target in velocity, z_t from Euler steps of the
family's flow-matching scheduler, and the text-side scope in place of cross-attention.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch

from ..losses import NoisedBatch, esd_loss, esd_partial_sample, esd_scheduler
from .base import Method
from .options import ESDSpec, ESDUSpec, ESDXSpec


class ESD(ESDSpec, Method):
    cross_attention: ClassVar[bool]

    def check_pipeline(self, pipe):
        from ..data.generate import check_sampling

        check_sampling(pipe, self.config.esd_ddim_steps, steps_flag="--esd-ddim-steps")

    def forget_set(self, concept, images):
        return images.prompts_only(concept.forget_prompts)

    def trainable(self, module, family, mask):
        return self._scope(module, lambda n: family.is_cross_attention(n) == self.cross_attention, mask)

    def prepare(self, trained, pipe, device):
        from ..models.families import family_of

        # eps0 is the model BEFORE any update (also before a resumed checkpoint is loaded): the UNet or the transformer
        self.frozen = copy.deepcopy(family_of(pipe).denoiser(pipe)).requires_grad_(False).eval().to(device)
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


class ESDX(ESDXSpec, ESD):
    cross_attention = True


class ESDU(ESDUSpec, ESD):
    cross_attention = False
