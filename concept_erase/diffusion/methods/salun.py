"""SalUn (Fan et al., ICLR 2024, arXiv 2310.12508) and RL, its objective without the mask (docs/ALGORITHMS.md 2).

The forget prompt's prediction on a forget image is steered to the surrogate prompt's (stop-gradient), plus
alpha x the retain denoising loss; SalUn trains only the weights of its saliency mask, RL every weight (the
control that shows what the mask buys).
"""

from __future__ import annotations

from ...errors import ConceptEraseError
from ..losses import salun_loss
from .base import Method
from .options import RLSpec, SalUnSpec


class SalUn(SalUnSpec, Method):
    def trainable(self, module, family, mask):
        if mask is None:
            raise ConceptEraseError("method 'salun' needs a saliency mask (--mask FILE, or let erase compute one)")
        return mask

    def loss(self, unet, forget, retain):
        return salun_loss(unet, forget, retain, self.config.alpha)


class RL(RLSpec, SalUn):
    def trainable(self, module, family, mask):
        if mask is not None:
            raise ConceptEraseError("method 'rl' trains every weight; drop --mask or use --method salun")
        return None
