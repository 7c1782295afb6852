"""ScissorHands (Wu & Harandi, "Scissorhands: Scrub Data Influence via Connection Sensitivity in Networks", 2024)
on the SalUn layer (docs/ALGORITHMS.md 4).

1. Trim: the engine's "snip" score |theta * dL_f/dtheta| (connection sensitivity) over the forget images ranks
   every UNet weight; the top `--keep` fraction is re-initialised to zero (the connection removed, which is
   what the score measures) once, before training.
2. Repair: gradient projection. With g_r the gradient of the retain denoising loss and g_f that of the forget
   images' own denoising loss (lowering it re-learns the concept), the update descends
       d = g_r - max(0, <g_r, g_f>) / ||g_f||^2 * g_f,
   i.e. g_r with the component that would reduce the forget loss projected out, on every weight. It is handed
   to the loop as the loss L_r - c (L_f - sg(L_f)) (c the detached coefficient): its gradient is d and its value
   L_r, the objective being descended, which the divergence guard watches.

Also the home of the gradient helpers the first-order methods share (EraseDiff).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConceptEraseError
from ..losses import _cat, _unet
from .base import FORGET_IMAGE_FIELDS, LOOP_FIELDS, RETAIN_DATA, SALIENCY_FIELDS, SAMPLING_FIELDS, Method


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


class ScissorHands(Method):
    name = "scissorhands"
    help = ("ScissorHands (Wu & Harandi 2024): the top --keep UNet weights by SNIP connection sensitivity on the "
            "forget images are re-initialised (zero), then repaired on the retain images by gradient projection "
            "(the retain gradient without the component that lowers the forget loss)")
    # no --alpha: the repair descends the retain loss itself, weighted 1 (default_alpha asks for retain images)
    fields = LOOP_FIELDS | SAMPLING_FIELDS | RETAIN_DATA | FORGET_IMAGE_FIELDS | SALIENCY_FIELDS
    default_alpha = 1.0
    computes_mask = True
    default_score = "snip"
    default_keep = 0.01

    def target_prompts(self, prompts, surrogates):
        return list(prompts)  # no surrogate: the forget loss is the forget images' own denoising loss

    def trainable(self, module, family, mask):
        """Trims the mask's weights (zero) here, once, before the optimizer is built (a resumed run then loads
        its checkpoint over them); every weight is then repaired."""
        if mask is None:
            raise ConceptEraseError("method 'scissorhands' needs the weights to trim (--mask FILE, or let erase "
                                    "compute the SNIP mask)")
        mask.check_compatible(module)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name in mask.masks:
                    p.masked_fill_(mask.masks[name].to(p.device), 0)
        return None

    def loss(self, unet, forget, retain):
        if retain is None:  # the forget measure after training: the forget loss alone
            loss_f = F.mse_loss(_unet(unet, forget.noisy, forget.timesteps, forget.cond).float(), forget.target.float())
            return loss_f, loss_f.detach(), torch.zeros((), device=loss_f.device)
        out_f, out_r = joint_forward(unet, forget, retain)
        loss_f = F.mse_loss(out_f.float(), forget.target.float())
        loss_r = F.mse_loss(out_r.float(), retain.target.float())
        params = trained_parameters(unet)
        g_f, g_r = gradients(loss_f, params), gradients(loss_r, params)
        norm = dot(g_f, g_f)
        c = (dot(g_r, g_f).clamp_min(0) / norm).float() if norm > 0 else torch.zeros((), device=loss_f.device)
        return loss_r - c * (loss_f - loss_f.detach()), loss_f.detach(), loss_r.detach()  # valued L_r: see the docstring
