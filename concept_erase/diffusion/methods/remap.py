"""Token remap: the concept's words made to read as its surrogate's, in the text encoder's input token
embeddings only. The UNet (or transformer) is untouched, so the concept is unreachable by prompt but still in
the weights: what a prompt filter or a blocklist achieves, and the control every attack must beat
(docs/PROTOCOLS.md, "Calibration against a control"). A closed form, like UCE: no images, no loop.

The concept's tokens come from each forget prompt and its surrogate, as each text encoder's own tokenizer
splits them (SDXL, SD 3 and FLUX have several): the tokens of the forget prompt that the surrogate does not
share (a difflib alignment of the two token sequences), less any token some surrogate prompt uses. When the
two differ by as many tokens on each side ("seven" / "eight"), token k takes the embedding of the surrogate's
token k; otherwise each takes the mean of the surrogate's differing tokens ("nude" / "wearing clothes"). A
token remapped from several prompts takes the mean of its targets. Every target is read from the original
embeddings. A surrogate that only drops words leaves nothing to remap to, and is refused.

A remapped token reads as the surrogate everywhere, also in a retain prompt that uses it: the report's
retain figure measures that drift.
"""

from __future__ import annotations

import copy
from difflib import SequenceMatcher

import torch

from ...errors import ConceptEraseError
from .base import Method
from .options import RemapSpec


class Remap(RemapSpec, Method):
    """The token remap as a method: `erase --method remap`."""

    def card_entries(self, summary):
        return {"weights": "text encoder input token embeddings of the concept's words only; UNet unchanged",
                "edit": {k: summary[k] for k in ("remapped", "edited_token_rows") if k in summary}}

    def edit(self, pipe, concept) -> dict:
        return remap_tokens(pipe, concept)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def token_targets(tokenizer, concept) -> dict[int, list[list[int]]]:
    """Concept token id -> the surrogate token ids it reads as, one list per forget prompt that has it (the
    module docstring's rule)."""
    pairs = [(p, concept.surrogate_for(p)) for p in concept.forget_prompts]
    in_surrogates = {i for _, s in pairs for i in _ids(tokenizer, s)}
    targets: dict[int, list[list[int]]] = {}
    for forget, surrogate in pairs:
        a, b = _ids(tokenizer, forget), _ids(tokenizer, surrogate)
        ops = [op for op in SequenceMatcher(None, a, b, autojunk=False).get_opcodes() if op[0] != "equal"]
        mine = [i for _, i1, i2, _, _ in ops for i in a[i1:i2]]
        theirs = [j for _, _, _, j1, j2 in ops for j in b[j1:j2]]
        if mine and not theirs:
            raise ConceptEraseError(f"--method remap maps the concept's words to its surrogate's, but surrogate "
                                    f"{surrogate!r} only drops words of {forget!r}: give a surrogate that replaces "
                                    "them")
        for k, token in enumerate(mine):
            if token not in in_surrogates:
                targets.setdefault(token, []).append([theirs[k]] if len(mine) == len(theirs) else theirs)
    if not targets:
        raise ConceptEraseError(f"--method remap finds no word of concept {concept.name!r} to remap: every token of "
                                "its forget prompts is also in a surrogate prompt")
    return targets


def _encodings(pipe, prompts) -> torch.Tensor:
    from ..models.families import family_of

    device = next(family_of(pipe).denoiser(pipe).parameters()).device
    return family_of(pipe).encode(pipe, list(prompts), device).hidden.double().cpu()


@torch.no_grad()
def remap_tokens(pipe, concept) -> dict:
    """Remap `concept`'s tokens in every text encoder of `pipe`, in place. Returns the report: what was remapped
    (per encoder, token -> what it reads as), the rows edited, and two measures on the text encoders' output:
    per concept, how far each forget prompt still is from its surrogate (0: it reads exactly as the surrogate),
    and the relative drift of the retain prompts (0: untouched)."""
    from ..models.families import family_of

    family = family_of(pipe)
    forget = list(concept.forget_prompts)
    surrogates = [concept.surrogate_for(p) for p in forget]
    keep = [p for p in dict.fromkeys(concept.retain_prompts) if p not in set(forget)]
    before, surrogate_codes = _encodings(pipe, forget), _encodings(pipe, surrogates)
    retain_before = _encodings(pipe, keep) if keep else None
    remapped, rows = {}, 0
    for name, encoder in family.text_modules(pipe).items():
        tokenizer = family.tokenizer_of(pipe, name)
        weight = encoder.get_input_embeddings().weight
        original = weight.detach().clone()
        done = {}
        for token, lists in token_targets(tokenizer, concept).items():
            weight[token] = torch.stack([original[ids].mean(0) for ids in lists]).mean(0).to(weight.dtype)
            done[tokenizer.decode([token])] = sorted({tokenizer.decode(ids) for ids in lists})
        remapped[name] = done
        rows += len(done)
    after = _encodings(pipe, forget)
    per_concept = {}
    for member in concept.members:
        idx = [i for i, p in enumerate(forget) if p in set(member.forget_prompts)]
        num = float(((after[idx] - surrogate_codes[idx]) ** 2).sum())
        den = float(((before[idx] - surrogate_codes[idx]) ** 2).sum())
        per_concept[member.name] = round(num / den, 6) if den > 0 else 0.0
    drift = 0.0
    if retain_before is not None:
        drift = float(((_encodings(pipe, keep) - retain_before) ** 2).sum() / (retain_before ** 2).sum())
    return {"remapped": remapped, "edited_token_rows": rows, "edited_parameters": 0,
            "forget_per_concept": per_concept,
            "forget_measure": "sum ||enc'(f) - enc(s)||^2 / sum ||enc(f) - enc(s)||^2 over each forget prompt f and "
                              "its surrogate s, the text encoders' output (0: f reads as s; 1: unchanged)",
            "retain": round(drift, 6),
            "retain_measure": "relative drift sum ||enc'(r) - enc(r)||^2 / sum ||enc(r)||^2 of the retain prompts' "
                              "encodings (0: untouched; a retain prompt drifts when it uses a remapped token)"}


def remapped_copy(pipe, concept):
    """The remap control of `pipe` in memory: a pipeline sharing `pipe`'s UNet (or transformer), VAE and
    scheduler, with its own copies of the text encoders, remapped. Returns (control, `remap_tokens`' report);
    `pipe` is unchanged."""
    from ..models.families import family_of

    copies = {name: copy.deepcopy(encoder) for name, encoder in family_of(pipe).text_modules(pipe).items()}
    control = type(pipe).from_pipe(pipe, **copies)  # diffusers: the other components and the config shared
    return control, remap_tokens(control, concept)
