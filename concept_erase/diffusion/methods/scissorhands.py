"""ScissorHands (Wu & Harandi, "Scissorhands: Scrub Data Influence via Connection Sensitivity in Networks", 2024)
on the SalUn layer (docs/ALGORITHMS.md 4).

1. Trim: the engine's "snip" score |theta * dL_f/dtheta| (connection sensitivity) over the forget images ranks
   the connection weights of the up-blocks' second self-attention layers (`options.TRIM_SCOPE`: the authors' Stable
   Diffusion code re-initialises only the self-attention of output_blocks.4 and .7, which are diffusers'
   up_blocks.1/2.attentions.1; SNIP scores connections, so norms are never ranked); the top `--keep` fraction is
   re-initialised once, before training, Kaiming-uniform as the authors' code (seeded by the run's seed).
2. Repair: the forget images are mapped to their surrogate while the retain loss is kept (the authors' code:
   L_u = ||eps(z_f, c_f) - sg eps(z_f, c_surrogate)||^2 in `loss_r + lam * loss_u`, lam 0.1; here
   L_u + alpha L_r, the project's form, alpha = 1 / lam = 10), descended by the paper's gradient projection:
   with g the gradient of that objective and g_f that of the forget images' own denoising loss L_f (lowering
   it re-learns the concept), the update is
       d = g - max(0, <g, g_f>) / ||g_f||^2 * g_f,
   i.e. g without the component that would reduce the forget loss, on every weight. It is handed to the loop
   as the loss L - c (L_f - sg(L_f)) (c the detached coefficient): its gradient is d and its value L, the
   objective being descended, which the divergence guard watches.

Also the home of the gradient helpers the first-order methods share (EraseDiff).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConceptEraseError
from ..losses import _cat, _unet
from .base import Method
from .options import ScissorHandsSpec


def trained_parameters(unet: nn.Module, mask=None) -> list[tuple[str, nn.Parameter, Tensor | None]]:
    """(name, parameter, its bool mask or None) of every weight the optimizer steps (`requires_grad`)."""
    module = getattr(unet, "module", unet)  # under DistributedDataParallel, the wrapped UNet
    masks = {} if mask is None else mask.masks
    return [(name, p, masks.get(name)) for name, p in module.named_parameters() if p.requires_grad]


def gradients(loss: Tensor, params, inputs=None) -> list[Tensor]:
    """d loss / d params (or d loss / d `inputs`, tensors standing for them), zero on frozen entries; the graph
    is kept for the step's own backward."""
    grads = torch.autograd.grad(loss, inputs or [p for _, p, _ in params], retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else (g if m is None else g * m.to(g.device))
            for g, (_, p, m) in zip(grads, params)]


def dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """<a, b> over all the tensors, accumulated in float64."""
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def joint_forward(unet, forget, retain) -> tuple[Tensor, Tensor]:
    """The UNet's predictions for the forget and the retain rows, from ONE forward (losses.py's rule)."""
    n = forget.noisy.shape[0]
    out = _unet(unet, torch.cat([forget.noisy, retain.noisy]), torch.cat([forget.timesteps, retain.timesteps]),
                _cat(forget.cond, retain.cond))
    return out[:n], out[n:]


class ScissorHands(ScissorHandsSpec, Method):
    def trainable(self, module, family, mask):
        """Re-initialises the mask's weights here, once, before the optimizer is built (a resumed run then loads
        its checkpoint over them); every weight is then repaired."""
        if mask is None:
            raise ConceptEraseError("method 'scissorhands' needs the weights to trim (--mask FILE, or let erase "
                                    "compute the SNIP mask)")
        mask.check_compatible(module)
        gen = torch.Generator().manual_seed(self.config.seed)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name in mask.masks and p.dim() > 1:
                    fresh = torch.empty(p.shape, dtype=torch.float32)
                    nn.init.kaiming_uniform_(fresh, a=0, nonlinearity="relu", generator=gen)
                    trim = mask.masks[name].to(p.device)
                    p.copy_(torch.where(trim, fresh.to(p), p))
                elif name in mask.masks:  # a bias or a norm, from a user's mask: the authors zero biases
                    p.masked_fill_(mask.masks[name].to(p.device), 0)
        return None

    def loss(self, unet, forget, retain):
        """forget.target is the noise (L_f, the forget images' own denoising loss), forget.target_cond the
        surrogate (L_u's target)."""
        with torch.no_grad():
            target = _unet(unet, forget.noisy, forget.timesteps, forget.target_cond)
        if retain is None:  # the forget measure after training: L_u alone
            loss_u = F.mse_loss(_unet(unet, forget.noisy, forget.timesteps, forget.cond).float(), target.float())
            return loss_u, loss_u.detach(), torch.zeros((), device=loss_u.device)
        out_f, out_r = joint_forward(unet, forget, retain)
        loss_u = F.mse_loss(out_f.float(), target.float())
        loss_r = F.mse_loss(out_r.float(), retain.target.float())
        loss_f = F.mse_loss(out_f.float(), forget.target.float())
        loss = loss_u + self.config.alpha * loss_r
        params = trained_parameters(unet)
        g, g_f = gradients(loss, params), gradients(loss_f, params)
        norm = dot(g_f, g_f)
        c = (dot(g, g_f).clamp_min(0) / norm).float() if norm > 0 else torch.zeros((), device=loss.device)
        return loss - c * (loss_f - loss_f.detach()), loss_u.detach(), loss_r.detach()  # valued L: see the docstring
