"""Forget-Me-Not (Zhang, Wang, Xu, Wang & Shi, "Forget-Me-Not: Learning to Forget in Text-to-Image Diffusion
Models", 2023): attention re-steering (docs/ALGORITHMS.md 4).

On noised images of the concept with their own prompt, the loss is the norm of the cross-attention
probabilities that the image's queries give the concept's tokens,
    L = sum over cross-attention layers l of  mean over items of ||A_l[:, :, concept tokens]||_F,
minimised in tens of steps, so the UNet stops attending to those words. The concept's tokens of a forget
prompt are its tokens that its surrogate prompt lacks ("a photo of a nude person" against "a photo of a
person wearing clothes": "nude"). The maps are read by hooking the cross-attention layers
(`cross_attention_probabilities`): they run diffusers' explicit `AttnProcessor` (the same attention as SDPA,
with the probabilities materialised) while the loss is computed.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConceptEraseError
from ..losses import NoisedBatch, _cat, _unet
from ..models.family import as_conditioning
from .base import Method
from .options import FMNSpec


@dataclass
class FMNBatch(NoisedBatch):
    tokens: Tensor | None = None  # (B, L) bool: the concept's token positions of each item's prompt


@contextmanager
def cross_attention_probabilities(unet: nn.Module) -> Iterator[list[Tensor]]:
    """While open, every cross-attention layer of `unet` appends its attention probabilities, (batch x heads,
    queries, tokens), to the yielded list; the layers' own processors are put back on exit."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    layers = [m for m in getattr(unet, "module", unet).modules() if isinstance(m, Attention) and m.is_cross_attention]
    if not layers:
        raise ConceptEraseError("FMN needs a UNet with cross-attention layers; this one has none")
    recorded: list[Tensor] = []
    saved = [m.processor for m in layers]

    def recording(layer):
        scores = layer.get_attention_scores

        def get_attention_scores(query, key, attention_mask=None):
            probs = scores(query, key, attention_mask)
            recorded.append(probs)
            return probs
        return get_attention_scores

    try:
        for m in layers:
            m.set_processor(AttnProcessor())
            m.get_attention_scores = recording(m)  # an instance attribute, in front of the class's method
        yield recorded
    finally:
        for m, processor in zip(layers, saved):
            m.__dict__.pop("get_attention_scores", None)
            m.set_processor(processor)


def concept_tokens(tokenizer, prompts: list[str], surrogates: list[str]) -> Tensor:
    """(B, L) bool: per prompt, the positions of its tokens that its surrogate prompt does not have."""
    def ids(texts):
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    mine, theirs = ids(prompts), ids(surrogates)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    out = torch.zeros(mine.shape, dtype=torch.bool)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        out[i] = ~torch.isin(a, b) & ~torch.isin(a, special)
        if not out[i].any():
            raise ConceptEraseError(f"FMN: the forget prompt {prompts[i]!r} has no token that its surrogate "
                                    f"{surrogates[i]!r} lacks, so no concept token to re-steer")
    return out


def concept_positions(tokenizer, prompts: list[str], surrogates: list[str]) -> tuple[Tensor, Tensor]:
    """(B, L) bool each: the concept's own tokens (the words the surrogate lacks: `concept_tokens`), and those
    plus every end token, which carries the whole prompt in CLIP's causal encoder (the official FMN code's
    `use_pooler`, on in its released configuration, which MACE's code keeps; a tokenizer that pads with its end
    token, as SD 1.x's, marks the padding too, as the official code does)."""
    words = concept_tokens(tokenizer, prompts, surrogates)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return words, words | (ids == tokenizer.eos_token_id)


def attention_resteering_loss(maps: list[Tensor], tokens: Tensor, rows: int, region: Tensor | None = None) -> Tensor:
    """Sum over layers of the mean over items of ||A[item][:, queries, concept tokens]||_F. `rows`: the batch of
    the forward (a joint forward puts the retain rows after the len(tokens) forget rows); `region`: (n, h, w)
    bool per item, the latent positions whose queries count (MACE: the concept's region, `region_queries`),
    None: every query (FMN)."""
    n = tokens.shape[0]
    total = torch.zeros((), device=tokens.device)
    for probs in maps:  # (rows x heads, queries, tokens), item-major (diffusers' head_to_batch_dim)
        per_item = probs.reshape(rows, probs.shape[0] // rows, *probs.shape[1:])[:n].float()
        picked = per_item * tokens[:, None, None, :].to(per_item.device)
        if region is not None:
            picked = picked * region_queries(region, probs.shape[1]).to(per_item.device)[:, None, :, None]
        total = total + picked.flatten(1).norm(dim=1).mean()
    return total


def region_queries(region: Tensor, queries: int) -> Tensor:
    """(n, h, w) bool at latent resolution -> (n, queries) float at a layer's own resolution (the UNet halves
    both sides per level), resized by nearest neighbour as MACE resizes its masks."""
    h, w = region.shape[-2:]
    f = round(math.sqrt(h * w / queries))
    return F.interpolate(region[:, None].float(), size=(h // f, w // f), mode="nearest").flatten(1)


class FMN(FMNSpec, Method):
    def prepare(self, trained, pipe, device):
        self.tokenizer = pipe.tokenizer
        self.encode = trained.target

    def target_prompts(self, prompts, surrogates):
        """The forget prompts themselves (FMN has no target); their concept tokens are found here, once."""
        if surrogates is None:
            raise ConceptEraseError("method 'fmn' needs a surrogate prompt per forget prompt (its concept tokens "
                                    "are the words the surrogate lacks)")
        pairs = dict(zip(prompts, surrogates))
        self.tokens = dict(zip(pairs, concept_positions(self.tokenizer, list(pairs), list(pairs.values()))[1]))
        self.known = {p: as_conditioning(self.encode([p])).hidden for p in pairs}  # to name the rows of a batch
        return list(prompts)

    def trainable(self, module, family, mask):
        if self.config.fmn_params == "cross-attention":
            return self._scope(module, family.is_cross_attention, mask)
        return mask

    def forget_batch(self, model, scheduler, latents, cond, target_cond, noise, timesteps, draws, *, step=None,
                     prompts=None):
        batch = super().forget_batch(model, scheduler, latents, cond, target_cond, noise, timesteps, draws)
        prompts = prompts or self._prompts_of(cond)  # the measure after training names no prompts
        tokens = torch.stack([self.tokens[p] for p in prompts])
        return FMNBatch(**vars(batch), tokens=tokens)

    def _prompts_of(self, cond) -> list[str]:
        hidden = as_conditioning(cond).hidden
        return [next(p for p, h in self.known.items() if torch.equal(h[0].to(row.device), row)) for row in hidden]

    def loss(self, unet, forget, retain):
        n = forget.noisy.shape[0]
        with cross_attention_probabilities(unet) as maps:
            if retain is None or self.config.alpha == 0:
                _unet(unet, forget.noisy, forget.timesteps, forget.cond)
                loss_r = None
            else:
                out = _unet(unet, torch.cat([forget.noisy, retain.noisy]),
                            torch.cat([forget.timesteps, retain.timesteps]), _cat(forget.cond, retain.cond))
                loss_r = F.mse_loss(out[n:].float(), retain.target.float())
            loss_f = attention_resteering_loss(maps, forget.tokens.to(forget.noisy.device),
                                               n if loss_r is None else n + retain.noisy.shape[0])
        if loss_r is None:
            return loss_f, loss_f.detach(), torch.zeros((), device=loss_f.device)
        return loss_f + self.config.alpha * loss_r, loss_f.detach(), loss_r.detach()
