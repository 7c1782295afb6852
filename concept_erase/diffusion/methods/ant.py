"""ANT (Li, Lu, Ren & Kong, "Set You Straight: Auto-Steering Denoising Trajectories to Sidestep Unwanted Concepts",
arXiv 2504.12782): fine-tuning that reverses the classifier-free-guidance direction of the concept in the
middle-to-late denoising stages only, on the weights of an augmentation-enhanced saliency map
(docs/ALGORITHMS.md 4).

z_t comes from partial DDIM sampling with the model being trained (as ESD's), from one start noise to two stop
indices per step: k+ < t' (the early stage, the image's structure) and k- >= t' (the middle-to-late stages).
With eps0 the frozen original UNet, eta the guidance scale:

    early:  L1 = ||eps(z+, c) - [eps0(z+, "") + eta (eps0(z+, c) - eps0(z+, ""))]||^2   (the CFG direction kept)
    late:   L3 = ||eps(z-, c) - [eps0(z-, "") - eta (eps0(z-, c) - eps0(z-, ""))]||^2   (the CFG direction reversed)
    uncond: L2, L4 = ||eps(z, "") - eps0(z, "")||^2 at z+ and z-                      (unconditional unchanged)
    loss = L3 + a2 L4 + a1 (L1 + a2 L2)

The mask is the engine's "ant" score (`concept_erase/saliency.py`) of `ant_score_loss`, ANT's late-stage term
at the model being erased, over `ant_rounds` augmented passes of the forget images (`training/mask_pass.py`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ...errors import ConceptEraseError
from ..losses import NoisedBatch, _cat, _unet, esd_partial_sample, esd_scheduler
from ..models.family import Conditioning, as_conditioning
from .base import Method
from .options import ANTSpec


def late_stage_start(scheduler, options) -> int:
    """t' as a training timestep: the DDIM timestep at step index `ant_before_step` of `ant_ddim_steps`
    (the late stage is t <= t')."""
    check_stages(options)
    ddim = esd_scheduler(scheduler)
    ddim.set_timesteps(options.ant_ddim_steps)
    return int(ddim.timesteps[options.ant_before_step])


def check_stages(options) -> None:
    if options.ant_before_step >= options.ant_ddim_steps:
        raise ConceptEraseError(f"--ant-before-step {options.ant_before_step} leaves no late stage in "
                                f"--ant-ddim-steps {options.ant_ddim_steps}")


def ant_score_loss(unet, batch: NoisedBatch, eta: float) -> torch.Tensor:
    """ANT's late-stage term L3 at the model being erased (the frozen original IS that model, so its target is
    a stop-gradient): MSE(eps(z_t, c), sg[eps(z_t, "") - eta (eps(z_t, c) - eps(z_t, ""))]); `batch.target_cond`
    is the empty prompt. Its gradient is the saliency map's (the early-stage and unconditional terms are zero,
    with zero gradient, at the original model)."""
    n = batch.noisy.shape[0]
    out = _unet(unet, torch.cat([batch.noisy, batch.noisy]), torch.cat([batch.timesteps, batch.timesteps]),
                _cat(batch.cond, batch.target_cond))
    eps_c, eps_u = out[:n], out[n:]
    target = (eps_u - eta * (eps_c - eps_u)).detach()
    return F.mse_loss(eps_c.float(), target.float())


class ANT(ANTSpec, Method):
    def check_pipeline(self, pipe):
        from ..data.generate import check_sampling

        check_stages(self.config)
        check_sampling(pipe, self.config.ant_ddim_steps, steps_flag="--ant-ddim-steps")

    def forget_set(self, concept, images):
        if self.config.mask:  # a given mask: no images to score, the training samples its own z_t
            return images.prompts_only(concept.forget_prompts)
        return super().forget_set(concept, images)

    def trainable(self, module, family, mask):
        if mask is None:
            raise ConceptEraseError("method 'ant' needs a saliency mask (--mask FILE, or let erase compute one)")
        return mask

    def prepare(self, trained, pipe, device):
        check_stages(self.config)
        self.frozen = copy.deepcopy(pipe.unet).requires_grad_(False).eval().to(device)  # eps0, before any update
        self.sampler = esd_scheduler(pipe.scheduler)  # private: set_timesteps mutates it

    def target_prompts(self, prompts, surrogates):
        return [""] * len(prompts)  # the empty prompt: eps0(z_t, "")

    def draw(self, gen):
        c = self.config
        return {"early": int(torch.randint(0, c.ant_before_step, (1,), generator=gen)),
                "late": int(torch.randint(c.ant_before_step, c.ant_ddim_steps, (1,), generator=gen))}

    def forget_batch(self, model, scheduler, latents, cond, target_cond, noise, timesteps, draws, *, step=None,
                     prompts=None):
        """The early and the late z_t of one trajectory (the same start noise), stacked: early rows first."""
        c = self.config
        z, t = zip(*(esd_partial_sample(model, self.sampler, noise, cond, target_cond, c.ant_ddim_steps, draws[k],
                                        c.ant_start_guidance) for k in ("early", "late")))
        two = lambda x: Conditioning.cat([as_conditioning(x)] * 2)  # noqa: E731
        return NoisedBatch(torch.cat(z), torch.cat([noise, noise]), torch.cat([noise, noise]), torch.cat(t),
                           two(cond), two(target_cond))

    def loss(self, unet, forget, retain):
        c = self.config
        n = forget.noisy.shape[0]
        z, t = torch.cat([forget.noisy, forget.noisy]), torch.cat([forget.timesteps, forget.timesteps])
        both = _cat(forget.cond, forget.target_cond)
        with torch.no_grad():
            out0 = _unet(self.frozen, z, t, both)
        eps0_c, eps0_u = out0[:n], out0[n:]
        half = n // 2  # early rows, then late rows (forget_batch)
        sign = torch.ones(n, 1, 1, 1, device=z.device, dtype=eps0_c.dtype)
        sign[half:] = -1  # the guidance direction kept early, reversed late
        target = eps0_u + sign * c.ant_eta * (eps0_c - eps0_u)
        out = _unet(unet, z, t, both)
        eps_c, eps_u = out[:n].float(), out[n:].float()
        cond_early, cond_late = (F.mse_loss(eps_c[s], target[s].float()) for s in (slice(0, half), slice(half, n)))
        unc_early, unc_late = (F.mse_loss(eps_u[s], eps0_u[s].float()) for s in (slice(0, half), slice(half, n)))
        loss = cond_late + c.ant_alpha_2 * unc_late + c.ant_alpha_1 * (cond_early + c.ant_alpha_2 * unc_early)
        return loss, cond_late.detach(), torch.zeros((), device=loss.device)
