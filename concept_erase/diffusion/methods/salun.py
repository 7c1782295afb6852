"""SalUn (Fan et al., ICLR 2024, arXiv 2310.12508) and RL, its objective without the mask (docs/ALGORITHMS.md 2).

The forget prompt's prediction on a forget image is steered to the surrogate prompt's (stop-gradient), plus
alpha x the retain denoising loss; SalUn trains only the weights of its saliency mask, RL every weight (the
control that shows what the mask buys).
"""

from __future__ import annotations

from ...errors import ConceptEraseError
from ..losses import salun_loss
from .base import FORGET_IMAGE_FIELDS, LOOP_FIELDS, RETAIN_FIELDS, SALIENCY_FIELDS, SAMPLING_FIELDS, Method


class SalUn(Method):
    name = "salun"
    help = ("SalUn (arXiv 2310.12508): the forget prompt's prediction steered to the surrogate's (stop-gradient), "
            "plus alpha x the retain denoising loss, on the saliency mask's weights")
    fields = LOOP_FIELDS | SAMPLING_FIELDS | RETAIN_FIELDS | FORGET_IMAGE_FIELDS | SALIENCY_FIELDS
    default_alpha = 0.5  # the reference README's class command (docs/ALGORITHMS.md 2); a preset may set its own
    computes_mask = True
    transformer_form = True  # the same objective in velocity space (rectified flow: losses.RectifiedFlow)

    def trainable(self, module, family, mask):
        if mask is None:
            raise ConceptEraseError("method 'salun' needs a saliency mask (--mask FILE, or let erase compute one)")
        return mask

    def loss(self, unet, forget, retain):
        return salun_loss(unet, forget, retain, self.config.alpha)


class RL(SalUn):
    name = "rl"
    help = "SalUn's objective on every weight (no mask): measures what the mask buys"
    fields = LOOP_FIELDS | SAMPLING_FIELDS | RETAIN_FIELDS | FORGET_IMAGE_FIELDS
    computes_mask = False

    def trainable(self, module, family, mask):
        if mask is not None:
            raise ConceptEraseError("method 'rl' trains every weight; drop --mask or use --method salun")
        return None
