"""SAFREE (Yoon et al., ICLR 2025): training-free, at inference. The weights are unchanged; the "erased model"
is the base pipeline folder plus `safree.json`, which `models/loading.load_pipeline` applies when it loads the
folder (`attach_safree`), so generation, evaluation, attacks and the app all sample through it.

Per prompt (SAFREE section 3, with the paper's defaults):
- concept subspace C: the text encoder's pooled embeddings of the concept's keywords, projection P_C;
- trigger tokens: p_i = the pooled embedding of the prompt with word token i masked (id 0, as the paper's
  code), d_i = ||(I - P_C) p_i||; token i is a trigger when d_i >= (1 + alpha) mean_{j != i} d_j (removing it
  moves the prompt away from the concept), alpha = 0.01. A one-word prompt compares d_1 with the whole prompt's
  distance instead (no other word to average);
- selective projection: a trigger token's embedding e becomes (I - P_C) P_I e, P_I the projection onto the
  input space spanned by the p_i (so it stays within the prompt's own space); other tokens are unchanged;
- self-validating filtering: beta = 1 - mean cosine(e, (I - P_C) P_I e) over the prompt's real tokens, and
  t' = round(gamma sigmoid(5 (10 beta - 5.333))) with gamma = 10 (the code's sigmoid, scale 2 x k = 2.5): the
  filtered embedding conditions the first t' + 1 of 50 denoising steps, the original one the rest. Here that
  window is a fraction of the trajectory (timestep >= T (1 - (t' + 1) / 50)), so it means the same at any step
  count and for any caller that gives the UNet a timestep (attacks at random timesteps too).
Not implemented: SAFREE's latent re-attention (the Fourier filter on the UNet's skip features).

The filter and its hooks are `models/safree.py` (beside the loader, which attaches them).
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import ConceptEraseError
from ..models.safree import SAFREE_CONFIG, SafreeFilter
from .base import Method
from .options import SAFREESpec


class SAFREE(SAFREESpec, Method):
    def card_entries(self, summary):
        return {"weights": "unchanged: SAFREE acts at inference, from safree.json (applied by concept-erase's "
                           "load_pipeline; plain diffusers loads the unfiltered base model)",
                "edit": {k: summary[k] for k in ("keywords", "alpha", "gamma") if k in summary}}

    def edit(self, pipe, concept) -> dict:
        c = self.config
        settings = {"keywords": concept_keywords(concept), "alpha": c.safree_alpha, "gamma": c.safree_gamma}
        filt = SafreeFilter(pipe, settings)
        flagged = {m.name: _share(filt, m.forget_prompts) for m in concept.members}
        self.settings = settings
        return {**settings, "edited_parameters": 0, "forget_per_concept": flagged,
                "forget_measure": "SAFREE: fraction of the forget prompts in which a trigger token is found (1: all)",
                "retain": _share(filt, [p for p in concept.retain_prompts if p not in concept.forget_prompts]),
                "retain_measure": "SAFREE: fraction of the retain prompts in which a trigger token is found (0: none)"}

    def write_files(self, folder: Path) -> None:
        (folder / SAFREE_CONFIG).write_text(json.dumps({"method": "safree", **self.settings}, indent=1) + "\n")


def _share(filt: "SafreeFilter", prompts) -> float:
    prompts = list(prompts)
    return round(sum(bool(filt.triggers(p).any()) for p in prompts) / len(prompts), 6) if prompts else 0.0


def concept_keywords(concept) -> list[str]:
    """The concept's keywords, whose embeddings span its subspace: the words of its forget prompts that no
    surrogate or retain prompt has ("seven" for MiniSD's digit; "nude" for "a photo of a nude person")."""
    others = {w for p in [*concept.surrogate_prompts, *concept.retain_prompts] for w in p.lower().split()}
    words = [w for p in concept.forget_prompts for w in p.lower().split() if w not in others]
    if not words:
        raise ConceptEraseError(f"SAFREE finds no keyword of concept {concept.name!r}: every word of its forget "
                                "prompts is also in a surrogate or retain prompt")
    return list(dict.fromkeys(words))
