"""RECE, Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024): UCE's closed form, then, in closed
form too, the embedding that still regenerates the concept in the edited model; that embedding joins the
erase set and the edit is solved again, for a few rounds. Seconds, no images.

Round r (r = 1..R), with W the original projections and W'_r the current edit (to_k and to_v of every
cross-attention layer, `uce.py`):

    c'_r = argmin_c  sum_l ||W'_l c - W_l c_e||^2 + rho sum_j (c_j^T c)^2
         = (sum_l W'_l^T W'_l + rho C_p^T C_p)^-1 sum_l W'_l^T W_l c_e

for each erased token embedding c_e (the rows UCE edits, `--uce-tokens`): the input whose outputs in the
edited model are the concept's outputs in the original one (RECE section 3.2: what an attack such as
concept inversion would find). The second term is the regulariser that keeps the derived embeddings away
from the preserved prompts' rows c_j (C_p), so erasing them moves the preserved outputs least (RECE section
3.3 adds a regularisation term to the derivation for that purpose; this form is this project's reading of
it). Every c'_r is then erased like the concept itself (paired with the concept's target rows) and UCE's
closed form is solved again from the ORIGINAL weights with the enlarged erase set, so the preservation term
always refers to the original model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .options import RECESpec
from .uce import (UCE, EditRows, default_preserve_scale, edit_projections, prepare_edit, preserved_prompts,
                  uce_rows)


class RECE(RECESpec, UCE):
    """UCE's closed form, iterated with derived embeddings (the module docstring)."""

    def edit(self, pipe, concept) -> dict:
        c = self.config
        return rece_edit(pipe, concept, rounds=c.rece_rounds, regulariser=c.rece_regulariser,
                         erase_scale=c.uce_erase_scale, preserve_scale=c.uce_preserve_scale, ridge=c.uce_lambda,
                         tokens=c.uce_tokens)


@torch.no_grad()
def regenerating_embeddings(edited: list[Tensor], original: list[Tensor], concept_rows: Tensor,
                            preserve: Tensor | None, regulariser: float) -> Tensor:
    """The closed form above: per row c_e of `concept_rows` (N, d), the embedding c' minimising
    sum_l ||W'_l c' - W_l c_e||^2 + rho sum_j (c_j^T c')^2 over the projections (`edited` W'_l and their
    `original` W_l, each out_l x d, float64). A relative ridge of 1e-9 of the mean diagonal keeps the solve
    defined when the projections alone do not span every direction."""
    d = concept_rows.shape[1]
    gram = sum(Wn.T @ Wn for Wn in edited)
    rhs = sum(Wn.T @ Wo for Wn, Wo in zip(edited, original)) @ concept_rows.T       # (d, N)
    if preserve is not None and regulariser > 0:
        gram = gram + regulariser * preserve.T @ preserve
    gram = gram + 1e-9 * gram.diagonal().mean() * torch.eye(d, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram, rhs).T


def regeneration_gap(edited: list[Tensor], original: list[Tensor], derived: Tensor, concept_rows: Tensor) -> float:
    """sum_l ||W'_l c' - W_l c_e||^2 / sum_l ||W_l c_e||^2: how closely the derived embeddings bring back the
    concept's outputs in the edited model (0: exactly; RECE erases them, so the next round's gap grows)."""
    num = sum(float(((derived @ Wn.T - concept_rows @ Wo.T) ** 2).sum()) for Wn, Wo in zip(edited, original))
    den = sum(float(((concept_rows @ Wo.T) ** 2).sum()) for Wo in original)
    return num / den if den > 0 else 0.0


@torch.no_grad()
def rece_edit(pipe, concept, *, rounds: int = 3, regulariser: float = 1e-3, erase_scale: float = 1.0,
              preserve_scale: float | None = None, ridge: float = 0.1, tokens: str = "last-to-end") -> dict:
    """Edit `pipe.unet` in place with RECE. Returns UCE's report plus the rounds, the regulariser and, per
    round, the regeneration gap of the embeddings derived from the edit before it (`regeneration_gap`), and
    that of the final edit (`regeneration_after`)."""
    layers, originals, embed = prepare_edit(pipe)
    preserve = preserved_prompts(concept, None)
    preserve_scale = default_preserve_scale(preserve_scale, preserve)
    base = uce_rows(pipe, embed, concept, preserve, tokens)
    concept_rows, concept_targets = base.erase, base.target
    original = [originals[n].double() for n in layers]
    settings = {"erase_scale": erase_scale, "preserve_scale": preserve_scale, "ridge": ridge}
    rows, gaps = base, []
    measures = edit_projections(layers, originals, rows, **settings)
    for _ in range(rounds):
        edited = [m.weight.detach().double() for m in layers.values()]
        derived = regenerating_embeddings(edited, original, concept_rows, base.preserve, regulariser)
        gaps.append(round(regeneration_gap(edited, original, derived, concept_rows), 6))
        rows = EditRows(torch.cat([rows.erase, derived]), torch.cat([rows.target, concept_targets]), base.preserve,
                        rows.owner + [None] * len(derived))
        measures = edit_projections(layers, originals, rows, **settings)
    edited = [m.weight.detach().double() for m in layers.values()]
    derived = regenerating_embeddings(edited, original, concept_rows, base.preserve, regulariser)
    return {**settings, "tokens": tokens, "rounds": rounds, "regulariser": regulariser,
            "edited_parameters": len(layers), "preserve_prompts": len(preserve), **measures,
            "regeneration_per_round": gaps,
            "regeneration_after": round(regeneration_gap(edited, original, derived, concept_rows), 6),
            "regeneration_measure": "sum ||W'c' - W c||^2 / sum ||W c||^2 of the embeddings c' derived in closed "
                                    "form to regenerate the concept's outputs (0: fully regenerated)"}
