"""EraseDiff (Wu, Le, Hayat & Harandi, "EraseDiff: Erasing Data Influence in Diffusion Models", 2024), on the
SalUn layer (docs/ALGORITHMS.md 4).

The bilevel problem
    min_theta L_r(theta)   s.t.   theta in argmin_phi f(phi),   f(phi) = E ||eps_phi(z_t^f, c_f) - eps_f||^2,
with z_t^f the forget latents noised as usual and the targets eps_f ~ U(0, I), noise from another distribution
than the Gaussian the model denoises (their denoising is steered out of distribution), while the retain loss
L_r (the ordinary denoising loss) is kept low. Solved first-order as the paper does, with BOME's dynamic
barrier: the constraint is h(theta) = f(theta) - f(phi_K) <= 0, phi_K the weights after K descent steps on f.
Every weight is the lower-level variable, so phi_K is held fixed and h's first-order gradient is grad f(theta)
(the paper's code: loss_q = loss_du - sg(mean f(phi_K))); f(phi_K) is only h's value, which the direction does
not use, so the K steps are not run. The update direction is
    d = grad L_r + lambda grad f,   lambda = max(0, (eta ||grad f||^2 - <grad L_r, grad f>) / ||grad f||^2),
so that d lowers f at least at rate eta ||grad f||^2 whatever the retain gradient asks. It is handed to the loop
as the loss L_r + lambda (f - sg f), valued L_r (what the divergence guard watches): its gradient is d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import _unet
from .base import Method
from .options import EraseDiffSpec
from .scissorhands import dot, gradients, joint_forward, trained_parameters


def ood_targets(noise: torch.Tensor, seed: int) -> torch.Tensor:
    """eps_f ~ U(0, I) per forget item, from a generator keyed by the step's draw and the item's own Gaussian
    noise (its first entry's bits), so it does not depend on how the batch is split across processes or
    micro-batches."""
    out = torch.empty(noise.shape, dtype=torch.float32)
    for i, row in enumerate(noise):
        key = int(row.reshape(-1)[0].float().cpu().view(torch.int32))
        out[i] = torch.rand(row.shape, generator=torch.Generator().manual_seed((seed + key) % 2**63))
    return out.to(noise.device, noise.dtype)


class EraseDiff(EraseDiffSpec, Method):
    def target_prompts(self, prompts, surrogates):
        return list(prompts)  # no surrogate: the forget images keep their own prompt, the target is eps_f

    def trainable(self, module, family, mask):
        self.mask = mask  # a user's mask narrows every weight; the gradients then stay inside it
        return mask

    def draw(self, gen):
        return {"ood_seed": int(torch.randint(0, 2**62, (1,), generator=gen))}

    def forget_batch(self, model, scheduler, latents, cond, target_cond, noise, timesteps, draws, *, step=None,
                     prompts=None):
        batch = super().forget_batch(model, scheduler, latents, cond, target_cond, noise, timesteps, draws)
        batch.target = ood_targets(noise, draws["ood_seed"])  # z_t noised as usual (Gaussian), the target eps_f
        return batch

    def loss(self, unet, forget, retain):
        if retain is None:  # the forget measure after training: f alone
            f = F.mse_loss(_unet(unet, forget.noisy, forget.timesteps, forget.cond).float(), forget.target.float())
            return f, f.detach(), torch.zeros((), device=f.device)
        out_f, out_r = joint_forward(unet, forget, retain)
        f = F.mse_loss(out_f.float(), forget.target.float())
        loss_r = F.mse_loss(out_r.float(), retain.target.float())
        params = trained_parameters(unet, getattr(self, "mask", None))
        g_r, g_f = gradients(loss_r, params), gradients(f, params)
        norm = dot(g_f, g_f)
        lam = ((self.config.erasediff_eta * norm - dot(g_r, g_f)).clamp_min(0) / norm).float() if norm > 0 else 0.0
        return loss_r + lam * (f - f.detach()), f.detach(), loss_r.detach()  # valued L_r: see the docstring
