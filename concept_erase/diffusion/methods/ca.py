"""Concept Ablation, model-based (Kumari et al., ICCV 2023, Eq. 3): on noised images of the ANCHOR concept,
the target prompt's prediction is matched to the anchor prompt's, stop-gradient:
MSE(eps_theta(x_t, c_target), sg(eps_theta(x_t, c_anchor))). Here c_target = the forget prompt and the anchor =
its surrogate. Trains the cross-attention K/V projections (`--ca-params kv`, the paper's cheapest variant; on
SD 3 and FLUX the text-side weights, and the prediction is the velocity: docs/ALGORITHMS.md 5) or the whole
UNet.
"""

from __future__ import annotations

from ..losses import salun_loss
from .base import Method
from .options import CASpec


class ConceptAblation(CASpec, Method):
    def forget_set(self, concept, images):
        """Images of the anchors, each paired with a forget prompt that has that anchor as its surrogate
        (cycling, so every forget prompt gets its share)."""
        from ..data.latents import LatentSet

        targets = {a: [p for p in concept.forget_prompts if concept.surrogate_for(p) == a]
                   for a in self.forget_image_prompts(concept)}
        found = images.generated(list(targets), self.config.num_forget_images, "anchor images")
        seen: dict[str, int] = {}
        prompts = []
        for anchor in found.prompts:
            k = seen[anchor] = seen.get(anchor, -1) + 1
            prompts.append(targets[anchor][k % len(targets[anchor])])
        return LatentSet(images.encoded(found), prompts, list(found.prompts))

    def trainable(self, module, family, mask):
        if self.config.ca_params == "unet":
            return mask
        return self._scope(module, family.is_text_key_value, mask)

    def loss(self, unet, forget, retain):
        # The same form as SalUn's forget term (target under no_grad), on anchor images instead of forget images.
        return salun_loss(unet, forget, retain, self.config.alpha)
