"""The text-free attack, TINA-style (arXiv 2603.17828): no prompt reaches the concept, the image's own noise does.

Each attacked row's concept image (the ORIGINAL model's image of that prompt and seed, `Targets.rows`) is
inverted on the ERASED model by DDIM inversion (Song et al., ICLR 2021; the deterministic ODE run backwards)
under the empty prompt, and the erased model then regenerates from the inverted noise z_T under the same
prompt. TINA's own attack also optimises the noise or trajectory; this is its inversion-only form (we found no
access to the paper's text, so the formulation is ours, documented here and in docs/PROTOCOLS.md).

Inversion and regeneration are one exact pair when they use the same steps and the same guided prediction:
the inversion runs the protocol's denoising steps (`protocol.num_inference_steps`) with classifier-free
guidance at the protocol's scale, which under the empty prompt is the unconditional prediction itself. What
comes back is whatever the erased UNet's unconditional trajectory keeps of the image, so an inversion can
reproduce an image on a model that never knew the concept: read the figure beside the never-knew floor
(`attack --floor`).

`budget.prompt`: the prompt it inverts and regenerates under: "" (text-free) or a neutral prompt.
Deterministic: no random draw at all.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from concept_erase.diffusion.models.family import Conditioning
from concept_erase.errors import ConceptEraseError

from .budgets import TextFreeBudget
from .core import Learned, Targets, encode, frozen


def ddim_invert(pipe, latents: torch.Tensor, cond: Conditioning, steps: int, guidance: float) -> torch.Tensor:
    """z_0 -> z_T: DDIM's update run from low to high noise on the timesteps the pipeline's scheduler samples
    with in `steps` steps, the noise predicted at each level with classifier-free guidance `guidance` against
    the empty prompt (as the pipeline samples)."""
    scheduler = pipe.scheduler
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ConceptEraseError(f"the text-free attack inverts noise-prediction samplers (DDIM, DDPM, LMS, Euler); "
                                f"{type(scheduler).__name__} has no alphas_cumprod")
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    # the clean end of the schedule as DDIM's last step sees it (1, or alphas_cumprod[0] without set_alpha_to_one)
    clean = torch.as_tensor(getattr(scheduler, "final_alpha_cumprod", 1.0), dtype=torch.float64)
    both = Conditioning.cat([encode(pipe, [""] * len(latents)), cond]).to(pipe.unet.device)
    z, a_prev = latents.to(pipe.unet.device, torch.float64), clean
    for t in scheduler.timesteps.flip(0).tolist():  # low noise to high
        tt = torch.full((2 * len(z),), int(t), device=z.device)
        eps_u, eps_c = both.predict(pipe.unet, torch.cat([z, z]).to(pipe.unet.dtype), tt).double().chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        a_t = alphas[int(t)]
        x0 = (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        z, a_prev = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps, a_t
    return z.float().cpu()


def learn(pipe, rows, targets: Targets, budget: TextFreeBudget, seed: int = 0, *, protocol=None, **_) -> Learned:
    if targets.rows is None:
        raise ConceptEraseError("the text-free attack inverts the original model's image of each prompt (--base)")
    if protocol is None:
        raise ConceptEraseError("the text-free attack needs the generation protocol (its steps and guidance)")
    t0 = time.perf_counter()
    prompts = [budget.prompt] * len(rows)
    with frozen(pipe), torch.no_grad():
        cond = encode(pipe, prompts)
        noise = torch.cat([ddim_invert(pipe, targets.rows[lo:lo + 8], cond[lo:lo + 8], protocol.num_inference_steps,
                                       protocol.guidance_scale) for lo in range(0, len(rows), 8)])
    return Learned("textfree", asdict(budget), list(rows), [r.prompt for r in rows],
                   conditioning=cond.to("cpu"), latents=noise, seconds=time.perf_counter() - t0)
