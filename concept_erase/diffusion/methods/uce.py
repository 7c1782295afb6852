"""UCE, Unified Concept Editing (Gandikota et al., WACV 2024, Eq. 7-8): a closed-form edit of the
cross-attention key and value projections. No images and no training loop: seconds.

For each cross-attention projection W (to_k, to_v; `Family.is_cross_attention` names them), with c_i the
text embeddings of the concepts to erase, v*_i = W c*_i the ORIGINAL outputs for their targets c*_i (the
surrogate prompts), and c_j the embeddings of the concepts to preserve (the retain prompts):

    W' = (s_e sum_i v*_i c_i^T + s_p sum_j W c_j c_j^T + lambda W) (s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T + lambda I)^-1

the minimiser of s_e sum_i ||W' c_i - v*_i||^2 + s_p sum_j ||W' c_j - W c_j||^2 + lambda ||W' - W||_F^2.
Embeddings are token-level: every token position of the prompt (start, words, end and padding, which in
CLIP carry the whole prompt too), the erased prompt's position k paired with its target's position k. The
ridge term lambda keeps the inverse well conditioned and the edit near W in directions no prompt touches.
Several concepts are erased at once simply by summing over all of their prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from ...errors import ConceptEraseError
from .base import Method, option_names


@dataclass
class UCEOptions:
    uce_erase_scale: float = field(default=1.0, metadata={"help": "UCE: erase scale s_e", "min": 0})
    uce_preserve_scale: float | None = field(default=None, metadata={
        "help": "UCE: preserve scale s_p (default: max(0.1, 1 / number of retain prompts))", "min": 0})
    uce_lambda: float = field(default=0.1, metadata={
        "help": "UCE: ridge lambda that keeps the inverse stable (the edit stays near the original weights)",
        "min": 0})


class UCE(Method):
    """The closed form below as a method: no images, no loop."""

    name = "uce"
    help = ("UCE (Gandikota et al. 2024): closed-form edit of the cross-attention K/V projections mapping each "
            "forget prompt to its surrogate while keeping the retain prompts; seconds, no images")
    fields = option_names(UCEOptions) | {"retain_prompts"}
    closed_form = True

    def card_entries(self, summary):
        return {"edit": {k: summary[k] for k in ("erase_scale", "preserve_scale", "ridge", "edited_parameters",
                                                 "preserve_prompts") if k in summary}}

    def edit(self, pipe, concept) -> dict:
        c = self.config
        return uce_edit(pipe, concept, erase_scale=c.uce_erase_scale, preserve_scale=c.uce_preserve_scale,
                        ridge=c.uce_lambda)


def cross_attention_projections(unet: nn.Module, family) -> dict[str, nn.Linear]:
    """The to_k / to_v Linear layers of the UNet's cross-attention (text-conditioned) blocks, by name."""
    found = {name: module for name, module in unet.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("to_k", "to_v")
             and family.is_cross_attention(f"{name}.weight")}
    if not found:
        raise ConceptEraseError("this UNet has no cross-attention key/value projections to edit")
    return found


def _tokens(cond) -> Tensor:
    """(B, L, D) hidden states -> (B * L, D) token embeddings in float64."""
    hidden = cond.hidden if hasattr(cond, "hidden") else cond
    return hidden.reshape(-1, hidden.shape[-1]).double()


@torch.no_grad()
def uce_weights(W: Tensor, erase: Tensor, targets: Tensor, preserve: Tensor | None, erase_scale: float,
                preserve_scale: float, ridge: float) -> Tensor:
    """The closed form for one projection W (out x d). erase, targets: (N, d) token embeddings c_i, c*_i
    (row k of each paired); preserve: (M, d) or None. Computed in float64, returned in W's dtype."""
    W64 = W.double()
    d = W64.shape[1]
    v_star = targets @ W64.T                                  # (N, out): W c*_i with the original W
    lhs = erase_scale * v_star.T @ erase + ridge * W64        # (out, d)
    rhs = erase_scale * erase.T @ erase + ridge * torch.eye(d, dtype=torch.float64, device=W.device)
    if preserve is not None and preserve_scale > 0:
        gram = preserve.T @ preserve
        lhs = lhs + preserve_scale * W64 @ gram
        rhs = rhs + preserve_scale * gram
    # W' = lhs rhs^-1, rhs symmetric positive definite (ridge > 0 or enough tokens): solve, never invert
    return torch.linalg.solve(rhs, lhs.T).T.to(W.dtype)


@torch.no_grad()
def uce_edit(pipe, concept, *, erase_scale: float = 1.0, preserve_scale: float | None = None,
             ridge: float = 0.1, preserve_prompts: Sequence[str] | None = None) -> dict:
    """Edit `pipe.unet` in place: erase `concept`'s forget prompts (each mapped to its surrogate) and preserve
    its retain prompts (or `preserve_prompts`). Returns a report: the settings, the number of edited
    parameters, and per concept the mean erase residual sum ||W' c_i - v*_i||^2 / sum ||W c_i - v*_i||^2 over
    the edited layers (0: every erased token now gives its target's output; 1: unchanged), and the relative
    drift sum ||W' c_j - W c_j||^2 / sum ||W c_j||^2 of the preserved prompts (0: untouched)."""
    from ..conditioning import PromptEmbeddings
    from ..models.families import family_of

    family = family_of(pipe)
    unet = pipe.unet
    device = next(unet.parameters()).device
    embed = PromptEmbeddings(pipe, device)
    forget = list(concept.forget_prompts)
    preserve = list(preserve_prompts if preserve_prompts is not None else concept.retain_prompts)
    preserve = [p for p in dict.fromkeys(preserve) if p not in set(forget)]
    if preserve_scale is None:
        preserve_scale = max(0.1, 1.0 / max(1, len(preserve)))
    if ridge <= 0 and not preserve:
        raise ConceptEraseError("UCE needs a ridge lambda > 0 when there is nothing to preserve")
    c_erase = _tokens(embed(forget))
    c_target = _tokens(embed([concept.surrogate_for(p) for p in forget]))
    c_keep = _tokens(embed(preserve)) if preserve else None
    tokens_per_prompt = c_erase.shape[0] // len(forget)
    owner = {p: m.name for m in concept.members for p in m.forget_prompts}
    rows = {m.name: [] for m in concept.members}
    for i, p in enumerate(forget):
        rows[owner.get(p, concept.name)].extend(range(i * tokens_per_prompt, (i + 1) * tokens_per_prompt))

    layers = cross_attention_projections(unet, family)
    num = {name: 0.0 for name in rows}
    den = {name: 0.0 for name in rows}
    drift_num = drift_den = 0.0
    for module in layers.values():
        W = module.weight.data
        new = uce_weights(W, c_erase, c_target, c_keep, erase_scale, preserve_scale, ridge)
        W64, new64 = W.double(), new.double()
        v_star = c_target @ W64.T
        for name, idx in rows.items():
            num[name] += float(((c_erase[idx] @ new64.T - v_star[idx]) ** 2).sum())
            den[name] += float(((c_erase[idx] @ W64.T - v_star[idx]) ** 2).sum())
        if c_keep is not None:
            drift_num += float(((c_keep @ (new64 - W64).T) ** 2).sum())
            drift_den += float(((c_keep @ W64.T) ** 2).sum())
        module.weight.data.copy_(new)
    return {
        "erase_scale": erase_scale, "preserve_scale": preserve_scale, "ridge": ridge,
        "edited_parameters": len(layers), "preserve_prompts": len(preserve),
        "forget_per_concept": {name: round(num[name] / den[name], 6) if den[name] > 0 else 0.0 for name in rows},
        "forget_measure": "UCE erase residual sum ||W'c - W c*||^2 / sum ||W c - W c*||^2 over the edited layers "
                          "(0: erased prompt = its target; 1: unchanged)",
        "retain": round(drift_num / drift_den, 6) if drift_den > 0 else 0.0,
        "retain_measure": "relative drift sum ||W'c_j - W c_j||^2 / sum ||W c_j||^2 of the preserved prompts",
    }
