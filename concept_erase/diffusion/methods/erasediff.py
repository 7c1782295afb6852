"""EraseDiff (Wu, Le, Hayat & Harandi, "EraseDiff: Erasing Data Influence in Diffusion Models", 2024), on the
SalUn layer (docs/ALGORITHMS.md 4).

The bilevel problem
    min_theta L_r(theta)   s.t.   theta in argmin_phi f(phi),   f(phi) = E ||eps_phi(z_t^f, c_f) - eps_f||^2,
with the forget images' targets eps_f ~ U(0, I), noise from another distribution than the Gaussian the model
denoises (their denoising is steered out of distribution), while the retain loss L_r (the ordinary denoising
loss) is kept low. Solved first-order as the paper does (a BOME-style dynamic barrier): the constraint
becomes h(theta) = f(theta) - f(phi_K(theta)) <= 0 with phi_K K steps of gradient descent on f from theta, its
gradient taken first-order, grad h = grad f(theta) - grad f(phi_K), and the update direction is
    d = grad L_r + lambda grad h,   lambda = max(0, (eta ||grad h||^2 - <grad L_r, grad h>) / ||grad h||^2).
It is handed to the loop as the loss L_r + lambda (f(theta) - <sg(grad f(phi_K)), theta>), less its own value
so that it is valued L_r (what the divergence guard watches): its gradient is d.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..losses import _unet
from ..models.family import as_conditioning
from .base import FORGET_IMAGE_FIELDS, LOOP_FIELDS, RETAIN_DATA, SAMPLING_FIELDS, Method, option_names
from .scissorhands import dot, gradients, joint_forward, trained_parameters


@dataclass
class EraseDiffOptions:
    erasediff_inner_steps: int = field(default=1, metadata={
        "help": "EraseDiff: K, the gradient steps on the forget objective that give phi_K", "min": 1})
    erasediff_inner_lr: float = field(default=1e-3, metadata={
        "help": "EraseDiff: the learning rate of those inner steps", "above": 0})
    erasediff_eta: float = field(default=0.1, metadata={
        "help": "EraseDiff: eta of the dynamic barrier (the update lowers h at least at rate eta ||grad h||^2)",
        "min": 0})


def ood_targets(noise: torch.Tensor, seed: int) -> torch.Tensor:
    """eps_f ~ U(0, I) per forget item, from a generator keyed by the step's draw and the item's own noise (its
    first entry's bits), so it does not depend on how the batch is split across processes or micro-batches."""
    out = torch.empty(noise.shape, dtype=torch.float32)
    for i, row in enumerate(noise):
        key = int(row.reshape(-1)[0].float().cpu().view(torch.int32))
        out[i] = torch.rand(row.shape, generator=torch.Generator().manual_seed((seed + key) % 2**63))
    return out.to(noise.device, noise.dtype)


class EraseDiff(Method):
    name = "erasediff"
    help = ("EraseDiff (Wu et al. 2024): the forget images' denoising steered to uniform (out-of-distribution) noise "
            "as the inner problem of a bilevel objective whose outer one keeps the retain loss; first-order, with a "
            "dynamic barrier")
    # no --alpha: the outer objective is the retain loss itself (default_alpha asks for retain images)
    fields = LOOP_FIELDS | SAMPLING_FIELDS | RETAIN_DATA | FORGET_IMAGE_FIELDS | option_names(EraseDiffOptions) | {"mask"}
    default_alpha = 1.0

    def target_prompts(self, prompts, surrogates):
        return list(prompts)  # no surrogate: the forget images keep their own prompt, the target is eps_f

    def trainable(self, module, family, mask):
        self.mask = mask  # a user's mask narrows every weight; the projections then stay inside it
        return mask

    def draw(self, gen):
        return {"ood_seed": int(torch.randint(0, 2**62, (1,), generator=gen))}

    def forget_batch(self, model, scheduler, latents, cond, target_cond, noise, timesteps, draws, *, step=None,
                     prompts=None):
        batch = super().forget_batch(model, scheduler, latents, cond, target_cond, noise, timesteps, draws)
        batch.target = ood_targets(noise, draws["ood_seed"])
        return batch

    def loss(self, unet, forget, retain):
        if retain is None:  # the forget measure after training: f alone
            f = F.mse_loss(_unet(unet, forget.noisy, forget.timesteps, forget.cond).float(), forget.target.float())
            return f, f.detach(), torch.zeros((), device=f.device)
        c = self.config
        out_f, out_r = joint_forward(unet, forget, retain)
        f = F.mse_loss(out_f.float(), forget.target.float())
        loss_r = F.mse_loss(out_r.float(), retain.target.float())
        params = trained_parameters(unet, getattr(self, "mask", None))
        g_r, g_f = gradients(loss_r, params), gradients(f, params)
        g_phi = g_f
        phi = [p.detach() for _, p, _ in params]
        for _ in range(c.erasediff_inner_steps):  # phi_{k+1} = phi_k - lr grad f(phi_k), phi_0 = theta
            phi = [x - c.erasediff_inner_lr * g for x, g in zip(phi, g_phi)]
            g_phi = self._forget_gradient(unet, params, phi, forget)
        g_h = [a - b for a, b in zip(g_f, g_phi)]  # first-order grad of h = f(theta) - f(phi_K)
        norm = dot(g_h, g_h)
        lam = ((c.erasediff_eta * norm - dot(g_r, g_h)).clamp_min(0) / norm).float() if norm > 0 else 0.0
        linear = sum((g.detach() * p).sum() for g, (_, p, _) in zip(g_phi, params))
        step = (f - f.detach()) - (linear - linear.detach())  # valued 0, the gradient of h (first-order)
        return loss_r + lam * step, f.detach(), loss_r.detach()

    @staticmethod
    def _forget_gradient(unet, params, phi, forget):
        """grad f at the weights `phi` (the others as they are), through `torch.func.functional_call`."""
        module = getattr(unet, "module", unet)
        leaves = [x.detach().requires_grad_(True) for x in phi]
        cond = as_conditioning(forget.cond)
        out = torch.func.functional_call(module, {name: x for (name, _, _), x in zip(params, leaves)},
                                         (forget.noisy, forget.timesteps), cond.unet_kwargs(forget.noisy.dtype),
                                         strict=False).sample
        f = F.mse_loss(out.float(), forget.target.float())
        return gradients(f, params, inputs=leaves)
