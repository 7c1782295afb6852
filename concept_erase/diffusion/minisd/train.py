"""Train MiniSD from scratch, deterministically, on 2 CPU cores (docs/MINISD.md).

Reads top to bottom: data -> VAE (reconstruction + tiny KL) -> latents (posterior MEAN, scaled to unit
variance) -> UNet (epsilon prediction, 10% empty prompts for classifier-free guidance, AdamW with warm-up
and cosine decay, EMA) -> fp16 diffusers folder. The text encoder stays frozen at its random init.

    concept-erase minisd train --output DIR

Time: 657 s (11 minutes) on 2 idle cores, measured 2026-11-29 with torch 2.13.0+cpu; the committed weights
took 33 minutes because that machine was shared with other jobs (training.json records it). That retrain
reproduced every committed weight file byte for byte: same seed, torch version and thread count -> the same
weights. Retrain only when the architecture changes: the committed weights in `concept_erase/assets/minisd/`
came from this script with its defaults.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import ConceptEraseError
from ...io_utils import atomic_dir
from ..models.family import Conditioning
from ..models.families import family_of
from . import minisd_prompt, DIGITS, STYLES
from .data import DigitImages, load_digit_images
from .config import MiniSDTrainConfig
from .model import BUILDERS, count_parameters

logger = logging.getLogger(__name__)




def _log(msg: str) -> None:
    logger.info("minisd %s %s", time.strftime("%H:%M:%S"), msg)


def train_vae(vae, images: torch.Tensor, config: MiniSDTrainConfig, gen: torch.Generator) -> None:
    """Reconstruction MSE + a tiny KL term: latents stay close to a Gaussian without blurring digits."""
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)
    x_all = images * 2 - 1  # SD's VAE works in [-1, 1]
    for step in range(config.vae_steps):
        x = x_all[torch.randint(len(x_all), (config.batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + config.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == config.vae_steps - 1:
            _log(f"vae step {step}/{config.vae_steps} loss {loss.item():.4f}")
    vae.eval()


def _reuse_vae(vae, source: str) -> None:
    """Load another MiniSD-world model's trained VAE (the same digits, the same AutoencoderKL shape)."""
    from diffusers import AutoencoderKL

    from . import minisd_path

    folder = minisd_path() if source == "minisd" else Path(source)
    if not (folder / "vae").is_dir():
        raise ConceptEraseError(f"--vae {source!r} is not a diffusers folder with a vae/ subfolder")
    vae.load_state_dict(AutoencoderKL.from_pretrained(folder, subfolder="vae").float().state_dict())
    _log(f"VAE reused from {folder}")


@torch.no_grad()
def encode_mean_latents(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior MEAN latents, unscaled (training on posterior samples gave noise textures: docs/MINISD.md)."""
    return torch.cat([vae.encode(images[i:i + batch_size] * 2 - 1).latent_dist.mean
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> Conditioning:
    """Frozen text-encoder conditioning, exactly as the pipeline's family conditions its UNet at generation
    (SDXL: size ids of MiniSD's 16 px images, the empty prompt as zeros)."""
    return family_of(pipe).encode(pipe, prompts, "cpu")


def train_unet(pipe, latents: torch.Tensor, prompt_ids: torch.Tensor, prompt_states: Conditioning,
               config: MiniSDTrainConfig, gen: torch.Generator) -> dict:
    """The family's denoising loss (`losses.noise_batch`): epsilon prediction on SD's noise schedule for the
    UNet, the rectified-flow velocity for MiniSD-Flux's transformer; returns the EMA weights' state dict.

    `prompt_states[prompt_ids[i]]` is the conditioning of latent i; the last row of `prompt_states` is the
    empty prompt, used instead with probability `empty_prompt_rate`."""
    from ..losses import noise_batch, training_scheduler

    unet = family_of(pipe).denoiser(pipe)  # the UNet, or MiniSD-Flux's transformer
    noise_scheduler = training_scheduler(pipe.scheduler)  # DDIM's add_noise is DDPM's q_sample
    empty = len(prompt_states) - 1
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=1e-2)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to zero
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.unet_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    unet.train()
    start, running = time.perf_counter(), 0.0
    for step in range(config.unet_steps):
        idx = torch.randint(len(latents), (config.batch_size,), generator=gen)
        z0 = latents[idx]
        cond = prompt_ids[idx].clone()
        cond[torch.rand(config.batch_size, generator=gen) < config.empty_prompt_rate] = empty
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=gen)
        batch = noise_batch(noise_scheduler, z0, prompt_states[cond], noise, t)
        loss = F.mse_loss(batch.cond.predict(unet, batch.noisy, batch.timesteps), batch.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        # EMA with a short ramp so early steps do not dominate a 2,000-step run.
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == config.unet_steps - 1:
            elapsed = time.perf_counter() - start
            _log(f"unet step {step}/{config.unet_steps} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} "
                 f"{elapsed:.0f}s")
    unet.eval()
    return ema


def train_minisd(config: MiniSDTrainConfig):
    """The whole recipe; returns the trained fp32 pipeline and a summary dict."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    data = load_digit_images("train")
    excluded = config.excluded()
    if excluded:  # skipped when empty, so MiniSD's own recipe stays bit-identical
        keep = ~torch.isin(data.digits, torch.tensor(excluded))
        data = DigitImages(data.images[keep], data.digits[keep], data.styles[keep])
        _log(f"never shown: {', '.join(DIGITS[d] for d in excluded)}")
    pipe = BUILDERS[config.family](config.seed)
    family = family_of(pipe)
    text = family.text_modules(pipe)
    for encoder in text.values():
        encoder.requires_grad_(False).eval()
    denoiser = family.denoiser_name  # "unet", or "transformer" (MiniSD-Flux)
    _log(f"{len(data)} training images ({config.family}); {denoiser} {count_parameters(getattr(pipe, denoiser)):,} params, "
         f"vae {count_parameters(pipe.vae):,}, " + ", ".join(f"{n} {count_parameters(m):,}" for n, m in text.items()))

    if config.vae:
        _reuse_vae(pipe.vae, config.vae)
    else:
        train_vae(pipe.vae, data.images, config, gen)
    pipe.vae.requires_grad_(False)
    latents = encode_mean_latents(pipe.vae, data.images)
    scaling_factor = float(1.0 / latents.std())
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor
    _log(f"latents {tuple(latents.shape)}, scaling factor {scaling_factor:.4f}")

    # One row per (digit, style) prompt, then the empty prompt last.
    prompts = [minisd_prompt(d, s) for s in range(len(STYLES)) for d in range(len(DIGITS))] + [""]
    prompt_ids = data.styles * len(DIGITS) + data.digits
    prompt_states = encode_prompts(pipe, prompts)
    ema = train_unet(pipe, latents, prompt_ids, prompt_states, config, gen)
    getattr(pipe, denoiser).load_state_dict(ema)
    summary = {
        "config": asdict(config), "seconds": round(time.perf_counter() - start, 1),
        "train_images": len(data), "scaling_factor": scaling_factor,
        "parameters": {n: count_parameters(getattr(pipe, n)) for n in (denoiser, "vae", *text)},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    return pipe, summary


def save_minisd(pipe, summary: dict, out: str | Path, overwrite: bool = False) -> Path:
    """fp16 diffusers folder (safetensors) + training.json, written atomically. Load it back in fp32 on
    CPU (`load_pipeline("minisd")` does); fp16 only halves the committed size."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        pipe.to(torch.float32)
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return Path(out)


def main(config: MiniSDTrainConfig, out: str | Path, overwrite: bool = False) -> Path:
    pipe, summary = train_minisd(config)
    path = save_minisd(pipe, summary, out, overwrite=overwrite)
    _log(f"saved MiniSD to {path} in {summary['seconds']:.0f}s")
    return path
