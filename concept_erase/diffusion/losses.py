"""The diffusion losses of SalUn (arXiv 2310.12508) and ESD (Gandikota et al. 2023). docs/ALGORITHMS.md 1-2.

Everything works on latents (already scaled by the VAE's scaling factor) and on prompt embeddings (the frozen
text encoder's output), so nothing here touches the VAE or the tokenizer. Noise and timesteps come in the
batch: the caller draws them from its own seeded generator, which is what makes a run reproducible, resumable
and the same on one or several processes.

Each loss runs the UNet ONCE on a concatenated batch (as classifier-free guidance does): faster, and under
DistributedDataParallel a second forward with grad before one backward would fire the gradient hooks twice.

The same losses train the diffusion transformers (SD 3, FLUX), whose objective is rectified flow: `noise_batch`
with their flow-matching scheduler gives x_t = (1 - sigma) x_0 + sigma eps and the velocity target eps - x_0
(`RectifiedFlow`), and `Conditioning.predict` runs the denoiser the family's way. "eps" below then reads
"velocity": SalUn's surrogate remapping, the saliency loss's guided prediction and the retain loss all keep
their form (docs/ALGORITHMS.md 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.family import Conditioning, as_conditioning
from .models.transformers import at_guidance, guidance_distilled

SALIENCY_GUIDANCE = 7.5  # w in docs/ALGORITHMS.md 1: MSE(eps, (1 + w) eps(x_t, c_f) - w eps(x_t, "")), as the reference


@dataclass
class NoisedBatch:
    """Latents noised at timesteps: z_t = q_sample(z, t, eps), with the conditioning to use."""

    noisy: Tensor        # (B, C, h, w) z_t
    noise: Tensor        # (B, C, h, w) eps
    target: Tensor       # (B, C, h, w) what the denoiser predicts: eps, v (v-prediction), or eps - z (flow)
    timesteps: Tensor    # (B,) long; rectified flow: sigma * 1000, float (what SD 3's transformer takes)
    cond: Conditioning | Tensor  # the conditioning of each item's prompt (a bare tensor: hidden states only)
    target_cond: Conditioning | Tensor | None = None  # SalUn: the surrogate prompt; saliency/ESD: the empty one


def sample_noise(latents: Tensor | tuple[int, ...], num_train_timesteps: int,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """eps ~ N(0, I) and t ~ U{0..T-1} for each latent, from `generator` (on the CPU, then moved), so the
    draw does not depend on the device or on how the batch is later split. `latents` may be just the batch's
    shape (ESD samples its own z_t: it has no latents, only their shape), then both stay on the CPU in fp32."""
    shape, device, dtype = ((latents.shape, latents.device, latents.dtype) if isinstance(latents, Tensor)
                            else (tuple(latents), torch.device("cpu"), torch.float32))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
    t = torch.randint(0, num_train_timesteps, (shape[0],), generator=generator).to(device)
    return noise, t


class RectifiedFlow:
    """The training side of a flow-matching scheduler (SD 3, FLUX; Esser et al. 2024, "Scaling Rectified Flow
    Transformers for High-Resolution Image Synthesis", section 2-3): x_t = (1 - sigma) x_0 + sigma eps, the
    model predicts the velocity eps - x_0 at timestep sigma * 1000.

    The loop draws t ~ U{0..T-1} (`sample_noise`, the same draw for every family, so resume and the process
    split are unchanged); sigma is a function of it, through the quantile u = (t + 0.5) / T:
    - a scheduler with a fixed shift (SD 3): u is mapped to the logit-normal distribution, sigmoid(m + s z)
      with z the standard normal's u-quantile, m = 0, s = 1 (section 3.1's lognorm(0, 1), diffusers'
      train_dreambooth_sd3.py `weighting_scheme="logit_normal"`), then shifted as the scheduler's own
      sigmas are: shift sigma / (1 + (shift - 1) sigma) (shift 3 for SD 3, section 5.3.2);
    - a scheduler with dynamic shifting (FLUX): u itself, shifted by the image's sequence length as
      FluxPipeline samples (`calculate_shift`: mu linear in the number of packed 2x2 tokens between
      base_image_seq_len and max_image_seq_len; sigma = e^mu / (e^mu + 1/u - 1)), so training visits the noise
      levels sampling does at this resolution. (diffusers' train_dreambooth_flux.py draws u uniformly without
      this shift.)"""

    LOGIT_MEAN, LOGIT_STD = 0.0, 1.0

    def __init__(self, config):
        self.config = config  # the flow-matching scheduler's (num_train_timesteps, shift, dynamic shifting)

    def mu(self, latent_shape: tuple[int, ...]) -> float | None:
        """A dynamically shifting scheduler's mu for latents of shape (..., h, w), as FluxPipeline's
        `calculate_shift` (linear in the number of packed 2x2 tokens); None for a fixed shift."""
        c = self.config
        if not c.get("use_dynamic_shifting", False):
            return None
        tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        lo, hi = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        base, top = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        return base + (top - base) * (tokens - lo) / (hi - lo)

    def sigmas(self, timesteps: Tensor, latent_shape: tuple[int, ...]) -> Tensor:
        """sigma in (0, 1) of each drawn t ~ U{0..T-1}, for latents of shape (..., h, w), in float32."""
        c = self.config
        u = (timesteps.double() + 0.5) / c.num_train_timesteps
        mu = self.mu(latent_shape)
        if mu is not None:
            sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        else:
            z = math.sqrt(2) * torch.special.erfinv(2 * u - 1)  # the standard normal's u-quantile
            s = torch.sigmoid(self.LOGIT_MEAN + self.LOGIT_STD * z)
            shift = c.get("shift", 1.0)
            sigma = shift * s / (1 + (shift - 1) * s)
        return sigma.float()

    def noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, the velocity target eps - x_0, the model timesteps sigma * 1000) of a batch."""
        sigma = self.sigmas(timesteps, latents.shape).to(latents.device)
        s = sigma.view(-1, *[1] * (latents.ndim - 1)).to(latents.dtype)
        return (1 - s) * latents + s * noise, noise - latents, sigma * self.config.num_train_timesteps


def _flow_matching(scheduler) -> bool:
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    return isinstance(scheduler, (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler))


def training_scheduler(scheduler):
    """`scheduler` itself when its `add_noise` is DDPM's q_sample (DDPM, DDIM); `RectifiedFlow` for a
    flow-matching scheduler (SD 3, FLUX); else a DDPM scheduler with its betas and prediction type: LMS and
    Euler scale the noise by sigma in `add_noise` (a sampler's convention), which would train the UNet on
    wrongly scaled inputs."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if isinstance(scheduler, (DDPMScheduler, DDIMScheduler, RectifiedFlow)):
        return scheduler
    if _flow_matching(scheduler):
        return RectifiedFlow(scheduler.config)
    return DDPMScheduler.from_config(scheduler.config)


def noise_batch(scheduler, latents: Tensor, cond: Tensor, noise: Tensor, timesteps: Tensor,
                target_cond: Tensor | None = None) -> NoisedBatch:
    """The forward process z_t = q_sample(z, t, eps) with the pipeline's betas, whatever its sampler (see
    `training_scheduler`). The denoising target is eps for epsilon-prediction models (SD 1.x, SD 2 base) and
    the velocity for v-prediction ones (SD 2.x 768), computed from the clean latents. A flow-matching
    scheduler (SD 3, FLUX) noises by rectified flow instead (`RectifiedFlow`: `timesteps` are the loop's
    draws t ~ U{0..T-1}, turned into sigma)."""
    scheduler = training_scheduler(scheduler)
    if isinstance(scheduler, RectifiedFlow):
        noisy, target, model_t = scheduler.noise(latents, noise, timesteps)
        return NoisedBatch(noisy, noise, target, model_t, cond, target_cond)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if getattr(scheduler.config, "prediction_type", "epsilon") == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return NoisedBatch(noisy, noise, target, timesteps, cond, target_cond)


def _unet(unet: nn.Module, z: Tensor, t: Tensor, cond: Conditioning | Tensor) -> Tensor:
    return as_conditioning(cond).predict(unet, z, t)


def _cat(*conds: Conditioning | Tensor) -> Conditioning:
    return Conditioning.cat(conds)


def denoising_loss(unet: nn.Module, batch: NoisedBatch) -> Tensor:
    """The ordinary diffusion loss MSE(eps_theta(z_t, c), eps) (v for v-prediction models)."""
    return F.mse_loss(_unet(unet, batch.noisy, batch.timesteps, batch.cond).float(), batch.target.float())


def saliency_loss(unet: nn.Module, batch: NoisedBatch, guidance: float = SALIENCY_GUIDANCE) -> Tensor:
    """docs/ALGORITHMS.md 1: MSE(eps, (1 + w) eps_theta(x_t, c_f) - w eps_theta(x_t, "")), gradients through both
    terms (the guided prediction is what generates the concept). `batch.target_cond` = the empty prompt."""
    n = batch.noisy.shape[0]
    out = _unet(unet, torch.cat([batch.noisy, batch.noisy]), torch.cat([batch.timesteps, batch.timesteps]),
                _cat(batch.cond, batch.target_cond))
    eps_c, eps_u = out[:n], out[n:]
    guided = (1 + guidance) * eps_c - guidance * eps_u
    return F.mse_loss(guided.float(), batch.target.float())


def saliency_loss_fn(guidance: float = SALIENCY_GUIDANCE) -> Callable[[nn.Module, NoisedBatch], Tensor]:
    """The `loss_fn(model, batch)` that `concept_erase.saliency.compute_saliency` expects."""
    return lambda unet, batch: saliency_loss(unet, batch, guidance)


def salun_loss(unet: nn.Module, forget: NoisedBatch, retain: NoisedBatch | None,
               alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """docs/ALGORITHMS.md 2. forget: target = eps_theta(z_t, c_surrogate) under no_grad (the reference ran it with
    grad and detached it: wasted memory); loss_f = MSE(eps_theta(z_t, c_f), target). retain: the ordinary
    denoising loss. Returns (loss_f + alpha * loss_r, loss_f, loss_r)."""
    with torch.no_grad():
        target = _unet(unet, forget.noisy, forget.timesteps, forget.target_cond)
    return _joint_loss(unet, forget, target, retain, alpha)


def _joint_loss(unet, forget: NoisedBatch, target: Tensor, retain: NoisedBatch | None,
                alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """loss_f = MSE(unet(forget), target) [+ alpha * the retain denoising loss], in ONE UNet forward."""
    if retain is None or alpha == 0:
        loss_f = F.mse_loss(_unet(unet, forget.noisy, forget.timesteps, forget.cond).float(), target.float())
        return loss_f, loss_f.detach(), torch.zeros((), device=loss_f.device)
    n = forget.noisy.shape[0]
    out = _unet(unet, torch.cat([forget.noisy, retain.noisy]), torch.cat([forget.timesteps, retain.timesteps]),
                _cat(forget.cond, retain.cond))
    loss_f = F.mse_loss(out[:n].float(), target.float())
    loss_r = F.mse_loss(out[n:].float(), retain.target.float())
    return loss_f + alpha * loss_r, loss_f.detach(), loss_r.detach()


@torch.no_grad()
def esd_target(frozen_unet: nn.Module, batch: NoisedBatch, eta: float) -> Tensor:
    """ESD: eps0(z_t, "") - eta * (eps0(z_t, c) - eps0(z_t, "")), eps0 the frozen original UNet
    (negative guidance away from c). `batch.target_cond` = the empty prompt. Rectified flow: the same form in
    velocity; a guidance-distilled FLUX runs both frozen passes at guidance embedding 1 (docs/ALGORITHMS.md 5)."""
    n = batch.noisy.shape[0]
    out = _unet(frozen_unet, torch.cat([batch.noisy, batch.noisy]), torch.cat([batch.timesteps, batch.timesteps]),
                at_guidance(_cat(batch.cond, batch.target_cond), 1.0))
    eps_c, eps_u = out[:n], out[n:]
    return eps_u - eta * (eps_c - eps_u)


def esd_loss(unet: nn.Module, frozen_unet: nn.Module, forget: NoisedBatch, eta: float,
             retain: NoisedBatch | None = None, alpha: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """ESD's MSE(eps_theta(z_t, c), esd_target); ESD itself has no retain term (alpha = 0), but one can be
    added with the same meaning as in SalUn. Returns (loss, loss_f, loss_r)."""
    target = esd_target(frozen_unet, forget, eta)
    return _joint_loss(unet, forget, target, retain, alpha)


def esd_scheduler(scheduler):
    """A private DDIM scheduler with the pipeline's betas, for ESD's partial sampling (docs/ALGORITHMS.md 2), whatever
    sampler the pipeline ships with; for a flow-matching pipeline (SD 3, FLUX) a private copy of its own
    FlowMatchEulerDiscreteScheduler (docs/ALGORITHMS.md 5)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if _flow_matching(scheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    return DDIMScheduler.from_config(scheduler.config)


@torch.no_grad()  # ESD samples z_t as data; the loss's gradient starts at z_t, not inside the chain
def esd_partial_sample(unet: nn.Module, scheduler, noise: Tensor, cond: Conditioning | Tensor,
                       uncond: Conditioning | Tensor,
                       num_steps: int, stop_index: int, guidance: float) -> tuple[Tensor, Tensor]:
    """ESD's z_t: start from `noise`, run `stop_index` of `num_steps` DDIM steps with the model being trained
    (classifier-free guidance `guidance`, conditioned on c) and return (z_t, t) at that point. A flow-matching
    scheduler takes Euler steps of the velocity on its own timesteps (FLUX's shifted by the sequence length, as
    FluxPipeline samples) and gives t = sigma * 1000; a guidance-distilled FLUX takes `guidance` as its guidance
    embedding in one pass, as it samples.

    `scheduler` must be a private copy (set_timesteps mutates it): see `esd_scheduler`."""
    flow = _flow_matching(scheduler)
    mu = RectifiedFlow(scheduler.config).mu(noise.shape) if flow else None
    scheduler.set_timesteps(num_steps, device=noise.device, **({"mu": mu} if mu is not None else {}))
    z = noise if flow else noise * scheduler.init_noise_sigma  # rectified flow starts from x_1 = eps
    n = z.shape[0]
    for t in scheduler.timesteps[:stop_index]:
        if guidance_distilled(cond):
            eps = _unet(unet, z, t.expand(n), at_guidance(cond, guidance))
        else:
            out = _unet(unet, torch.cat([z, z]), t.expand(2 * n), _cat(cond, uncond))
            eps = out[n:] + guidance * (out[:n] - out[n:])
        z = scheduler.step(eps, t, z).prev_sample
    t = scheduler.timesteps[stop_index].expand(n)
    return z, (t if flow else t.long())
