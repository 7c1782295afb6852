"""UCE, Unified Concept Editing (Gandikota et al., WACV 2024, Eq. 7-8): a closed-form edit of the
cross-attention key and value projections. No images and no training loop: seconds.

For each cross-attention projection W (to_k, to_v; `Family.is_cross_attention` names them), with c_i the
text embeddings of the concepts to erase, v*_i = W c*_i the ORIGINAL outputs for their targets c*_i (the
surrogate prompts), and c_j the embeddings of the concepts to preserve (the retain prompts):

    W' = (s_e sum_i v*_i c_i^T + s_p sum_j W c_j c_j^T + lambda W) (s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T + lambda I)^-1

the minimiser of s_e sum_i ||W' c_i - v*_i||^2 + s_p sum_j ||W' c_j - W c_j||^2 + lambda ||W' - W||_F^2.
Embeddings are token-level. Which tokens (`--uce-tokens`): "last-to-end", as the paper's official code does,
takes each prompt's last word token and every position after it (the end token and the padding, which in
CLIP's causal encoder carry the whole prompt), the erased prompt's rows paired with its target's from their
last word tokens on; "all" takes every position, row k paired with row k. The ridge term lambda keeps the
inverse well conditioned and the edit near W in directions no prompt touches. Several concepts are erased
at once simply by summing over all of their prompts.

On a diffusion transformer (SD 3, FLUX; docs/ALGORITHMS.md 5) there is no cross-attention: the text enters
through `context_embedder` (T5 states, SD 3's joined CLIP + T5, into the stream) and is read by the text
stream's own key/value projections (`attn.add_k_proj`, `attn.add_v_proj`) of every joint (double-stream) block,
the edit the official UCE code makes for FLUX. The same closed form edits each of these layers with its own
inputs: `context_embedder` takes the conditioning itself; a block's projections take what the text stream
carries there, captured from the original transformer at `TRANSFORMER_SIGMAS` on seeded noise shared by each
erased prompt and its target (the stream depends on the noise level and, through joint attention, the image).
Every token position is a row (T5 is not causal: no position carries the whole prompt alone). Biases stay: they
cancel from every residual.

The pieces are shared: RECE (`rece.py`) and MACE's closed-form refinement (`mace.py`) choose other rows and
solve the same closed form with `edit_projections`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ...errors import ConceptEraseError
from .base import Method
from .options import UCE_TOKENS, UCESpec


class UCE(UCESpec, Method):
    """The closed form below as a method: no images, no loop."""

    def card_entries(self, summary):
        return {"edit": {k: summary[k] for k in ("erase_scale", "preserve_scale", "ridge", "tokens", "rounds",
                                                 "regulariser", "edited_parameters", "preserve_prompts")
                         if k in summary}}

    def edit(self, pipe, concept) -> dict:
        c = self.config
        return uce_edit(pipe, concept, erase_scale=c.uce_erase_scale, preserve_scale=c.uce_preserve_scale,
                        ridge=c.uce_lambda, tokens=c.uce_tokens)


def cross_attention_projections(unet: nn.Module, family) -> dict[str, nn.Linear]:
    """The to_k / to_v Linear layers of the UNet's cross-attention (text-conditioned) blocks, by name."""
    found = {name: module for name, module in unet.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("to_k", "to_v")
             and family.is_cross_attention(f"{name}.weight")}
    if not found:
        raise ConceptEraseError("this UNet has no cross-attention key/value projections to edit")
    return found


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


# ------------------------------------------------------------------------------- which token embeddings

def real_token_counts(pipe, prompts: Sequence[str]) -> list[int]:
    """Per prompt, its tokens before the padding (start and end tokens included), as the family's first
    tokenizer counts them (SDXL's two tokenizers split words alike)."""
    from ..models.families import family_of

    family = family_of(pipe)
    tok = family.tokenizer_of(pipe, family.text_encoders[0])
    found = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True)
    return [int(sum(mask)) for mask in found.attention_mask]


def aligned_rows(a: Tensor, b: Tensor, start_a: int, start_b: int) -> tuple[Tensor, Tensor]:
    """Rows of two (L, d) token sequences from their starts to the end, aligned at the starts and cut to one
    length (the official UCE code's alignment of an erased prompt with its target)."""
    n = a.shape[0] - max(start_a, start_b)
    return a[start_a:start_a + n], b[start_b:start_b + n]


@dataclass
class EditRows:
    """The token embeddings of a closed-form edit, float64: `erase` rows c_i paired with `target` rows c*_i,
    `preserve` rows c_j (or None), and the concept each erase row belongs to (`owner`, None: an added row)."""

    erase: Tensor
    target: Tensor
    preserve: Tensor | None
    owner: list[str | None]


def _hidden(cond) -> Tensor:
    """(B, L, D) hidden states in float64."""
    return (cond.hidden if hasattr(cond, "hidden") else cond).double()


def uce_rows(pipe, embed, concept, preserve: Sequence[str], tokens: str) -> EditRows:
    """UCE's rows: every forget prompt of `concept` paired with its surrogate, and the preserved prompts,
    with the token selection `tokens` (the module docstring)."""
    if tokens not in UCE_TOKENS:
        raise ConceptEraseError(f"unknown UCE token selection {tokens!r}; choose {' or '.join(UCE_TOKENS)}")
    forget = list(concept.forget_prompts)
    targets = [concept.surrogate_for(p) for p in forget]
    owner_of = {p: m.name for m in concept.members for p in m.forget_prompts}
    h_erase, h_target = _hidden(embed(forget)), _hidden(embed(targets))
    h_keep = _hidden(embed(list(preserve))) if preserve else None
    if tokens == "all":
        starts_erase = starts_target = [0] * len(forget)
        starts_keep = [0] * len(preserve)
    else:  # the last word token: the end token's position - 1
        starts_erase = [n - 2 for n in real_token_counts(pipe, forget)]
        starts_target = [n - 2 for n in real_token_counts(pipe, targets)]
        starts_keep = [n - 2 for n in real_token_counts(pipe, preserve)] if preserve else []
    erase, target, owner = [], [], []
    for i, p in enumerate(forget):
        e, t = aligned_rows(h_erase[i], h_target[i], starts_erase[i], starts_target[i])
        erase.append(e)
        target.append(t)
        owner += [owner_of.get(p, concept.name)] * len(e)
    keep = torch.cat([h_keep[j, s:] for j, s in enumerate(starts_keep)]) if preserve else None
    return EditRows(torch.cat(erase), torch.cat(target), keep, owner)


# ------------------------------------------------------------------------------- the edit

def preserved_prompts(concept, preserve_prompts: Sequence[str] | None) -> list[str]:
    """The prompts an edit keeps: `preserve_prompts` or the concept's retain prompts, less any forget prompt."""
    forget = set(concept.forget_prompts)
    keep = preserve_prompts if preserve_prompts is not None else concept.retain_prompts
    return [p for p in dict.fromkeys(keep) if p not in forget]


def default_preserve_scale(preserve_scale: float | None, preserve: Sequence[str]) -> float:
    return max(0.1, 1.0 / max(1, len(preserve))) if preserve_scale is None else preserve_scale


@torch.no_grad()
def edit_projections(layers: dict[str, nn.Linear], originals: dict[str, Tensor],
                     rows: EditRows | Mapping[str, EditRows], *, erase_scale: float, preserve_scale: float,
                     ridge: float) -> dict:
    """Set every projection in `layers` to the closed form computed from its ORIGINAL weight (`originals`,
    by name) and `rows` (one set for every layer, or per layer name: a transformer's layers each see their own
    inputs). Returns the report's measures: per concept the erase residual
    sum ||W' c_i - v*_i||^2 / sum ||W c_i - v*_i||^2 over the layers and its rows (0: every erased token now
    gives its target's output; 1: unchanged), and the relative drift sum ||W' c_j - W c_j||^2 / sum ||W c_j||^2
    of the preserved rows (0: untouched)."""
    per_layer = rows if isinstance(rows, Mapping) else dict.fromkeys(layers, rows)
    if ridge <= 0 and any(r.preserve is None for r in per_layer.values()):
        raise ConceptEraseError("a closed-form edit needs a ridge lambda > 0 when there is nothing to preserve")
    names = sorted({o for r in per_layer.values() for o in r.owner if o is not None})
    num, den = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    drift_num = drift_den = 0.0
    for name, module in layers.items():
        W, rows = originals[name], per_layer[name]
        index = {n: [i for i, o in enumerate(rows.owner) if o == n] for n in names}
        new = uce_weights(W, rows.erase, rows.target, rows.preserve, erase_scale, preserve_scale, ridge)
        W64, new64 = W.double(), new.double()
        v_star = rows.target @ W64.T
        for n, idx in index.items():
            num[n] += float(((rows.erase[idx] @ new64.T - v_star[idx]) ** 2).sum())
            den[n] += float(((rows.erase[idx] @ W64.T - v_star[idx]) ** 2).sum())
        if rows.preserve is not None:
            drift_num += float(((rows.preserve @ (new64 - W64).T) ** 2).sum())
            drift_den += float(((rows.preserve @ W64.T) ** 2).sum())
        module.weight.data.copy_(new)
    return {
        "forget_per_concept": {n: round(num[n] / den[n], 6) if den[n] > 0 else 0.0 for n in names},
        "forget_measure": "erase residual sum ||W'c - W c*||^2 / sum ||W c - W c*||^2 over the edited layers "
                          "(0: erased prompt = its target; 1: unchanged)",
        "retain": round(drift_num / drift_den, 6) if drift_den > 0 else 0.0,
        "retain_measure": "relative drift sum ||W'c_j - W c_j||^2 / sum ||W c_j||^2 of the preserved prompts",
    }


def prepare_edit(pipe):
    """What every closed-form edit starts from: the cross-attention K/V layers by name, a copy of their
    original weights, and a `PromptEmbeddings` of the pipeline."""
    from ..conditioning import PromptEmbeddings
    from ..models.families import family_of

    family = family_of(pipe)
    if getattr(pipe, "unet", None) is None:
        raise ConceptEraseError(f"the closed-form edits change a UNet's cross-attention; {family.description} "
                                "has no UNet")
    layers = cross_attention_projections(pipe.unet, family)
    originals = {name: m.weight.detach().clone() for name, m in layers.items()}
    return layers, originals, PromptEmbeddings(pipe, next(pipe.unet.parameters()).device)


@torch.no_grad()
def uce_edit(pipe, concept, *, erase_scale: float = 1.0, preserve_scale: float | None = None,
             ridge: float = 0.1, preserve_prompts: Sequence[str] | None = None, tokens: str = "last-to-end") -> dict:
    """Edit `pipe.unet` in place: erase `concept`'s forget prompts (each mapped to its surrogate) and preserve
    its retain prompts (or `preserve_prompts`). Returns a report: the settings, the number of edited
    parameters and `edit_projections`' measures. A diffusion transformer (no `unet`) is edited in its
    transformer form (`transformer_uce_edit`)."""
    if getattr(pipe, "unet", None) is None:
        return transformer_uce_edit(pipe, concept, erase_scale=erase_scale, preserve_scale=preserve_scale,
                                    ridge=ridge, preserve_prompts=preserve_prompts)
    layers, originals, embed = prepare_edit(pipe)
    preserve = preserved_prompts(concept, preserve_prompts)
    preserve_scale = default_preserve_scale(preserve_scale, preserve)
    rows = uce_rows(pipe, embed, concept, preserve, tokens)
    measures = edit_projections(layers, originals, rows, erase_scale=erase_scale, preserve_scale=preserve_scale,
                                ridge=ridge)
    return {"erase_scale": erase_scale, "preserve_scale": preserve_scale, "ridge": ridge, "tokens": tokens,
            "edited_parameters": len(layers), "preserve_prompts": len(preserve), **measures}


# ------------------------------------------------------------------------------- the transformer form

# the noise levels (rectified flow's sigma) at which the text stream's inputs are captured: early, middle, late
TRANSFORMER_SIGMAS = (0.25, 0.5, 0.75)


def text_stream_projections(transformer: nn.Module) -> dict[str, nn.Linear]:
    """`context_embedder` and the text stream's key/value projections of every joint (double-stream) block."""
    found = {name: module for name, module in transformer.named_modules() if isinstance(module, nn.Linear)
             and (name == "context_embedder" or name.endswith((".attn.add_k_proj", ".attn.add_v_proj")))}
    if "context_embedder" not in found:
        raise ConceptEraseError(f"this {type(transformer).__name__} has no context_embedder to edit")
    return found


@torch.no_grad()
def stream_inputs(pipe, layers: dict[str, nn.Linear], cond) -> dict[str, Tensor]:
    """Per layer, its inputs (float64 rows: noise level, then prompt, then token) when the transformer runs on
    `cond` at each of `TRANSFORMER_SIGMAS`, on noise seeded per batch position: prompt k of two calls of one
    length sees the same noise, so an erased prompt's rows pair with its target's."""
    from ..models.families import family_of

    family = family_of(pipe)
    transformer = family.denoiser(pipe)
    device = next(transformer.parameters()).device
    h, w = (side // family.vae_factor(pipe) for side in family.image_size(pipe))
    noise = torch.randn(len(cond), family.latent_channels(transformer.config), h, w,
                        generator=torch.Generator().manual_seed(0)).to(device)
    found: dict[str, list[Tensor]] = {name: [] for name in layers}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: found[name].append(args[0]))
             for name, module in layers.items()]
    try:
        for sigma in TRANSFORMER_SIGMAS:
            cond.to(device).predict(transformer, noise, torch.full((len(cond),), sigma * 1000, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double() for name, xs in found.items()}


def transformer_rows(pipe, layers: dict[str, nn.Linear], concept, preserve: Sequence[str]) -> dict[str, EditRows]:
    """UCE's rows for each of a transformer's `layers`: the inputs under every forget prompt paired with those
    under its surrogate, and the inputs under the preserved prompts."""
    from ..conditioning import PromptEmbeddings

    embed = PromptEmbeddings(pipe, next(layers["context_embedder"].parameters()).device)
    forget = list(concept.forget_prompts)
    owner_of = {p: m.name for m in concept.members for p in m.forget_prompts}
    erase = stream_inputs(pipe, layers, embed(forget))
    target = stream_inputs(pipe, layers, embed([concept.surrogate_for(p) for p in forget]))
    keep = stream_inputs(pipe, layers, embed(list(preserve))) if preserve else None
    tokens = next(iter(erase.values())).shape[0] // (len(TRANSFORMER_SIGMAS) * len(forget))
    owner = [owner_of.get(p, concept.name) for p in forget for _ in range(tokens)] * len(TRANSFORMER_SIGMAS)
    return {name: EditRows(erase[name], target[name], keep[name] if keep else None, owner) for name in layers}


@torch.no_grad()
def transformer_uce_edit(pipe, concept, *, erase_scale: float = 1.0, preserve_scale: float | None = None,
                         ridge: float = 0.1, preserve_prompts: Sequence[str] | None = None) -> dict:
    """UCE on a diffusion transformer, in place (the module docstring): `context_embedder` and the joint blocks'
    `add_k_proj` / `add_v_proj`, each from its own captured inputs. Returns the report `uce_edit` does."""
    from ..models.families import family_of

    layers = text_stream_projections(family_of(pipe).denoiser(pipe))
    originals = {name: m.weight.detach().clone() for name, m in layers.items()}
    preserve = preserved_prompts(concept, preserve_prompts)
    preserve_scale = default_preserve_scale(preserve_scale, preserve)
    rows = transformer_rows(pipe, layers, concept, preserve)
    measures = edit_projections(layers, originals, rows, erase_scale=erase_scale, preserve_scale=preserve_scale,
                                ridge=ridge)
    return {"erase_scale": erase_scale, "preserve_scale": preserve_scale, "ridge": ridge, "tokens": "all",
            "edited_parameters": len(layers), "preserve_prompts": len(preserve), **measures}
