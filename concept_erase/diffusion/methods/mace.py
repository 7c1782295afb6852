"""MACE, Mass Concept Erasure (Lu, Wang, Li, Liu & Kong, "MACE: Mass Concept Erasure in Diffusion Models",
CVPR 2024), in its three stages (docs/ALGORITHMS.md 4). No training loop of the project's: the LoRAs are
tens of Adam steps inside the edit, and what is saved is the fused weights, so the outputs are UCE's.

1. Closed-form refinement (MACE section 3.2) of every cross-attention key/value projection W, so the words
   that co-occur with the concept stop carrying it: with e_f the embeddings of the tokens a forget prompt
   shares with its surrogate (its common prefix, and its common suffix with the padding after it, aligned
   from the end as MACE's official code aligns them; the concept's own tokens are left to stage 2), e_g the
   surrogate's embeddings at the same places and c_j the preserved prompts' tokens,
       W' = argmin sum ||W' e_f - W e_g||^2 + lambda ||W' - W||^2 + s_p sum ||W' c_j - W c_j||^2,
   which is UCE's closed form on those rows (`uce.edit_projections`).
2. Per concept, a LoRA (rank r, on every cross-attention to_k and to_v, from the refined weights) trained to
   lower the attention the concept's tokens (its own words, and the end token with what pads like it, MACE's
   `use_pooler`) draw inside the concept's region: L = sum_l mean_items ||A_l[region, concept tokens]||_F
   (`fmn.attention_resteering_loss`), on the base model's images of the concept, timesteps drawn by MACE's
   importance sampling f(t) = sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400)). The paper's region is a
   Grounded-SAM segmentation of the concept in each image; here it is taken from the concept's own
   attention maps (`concept_region`): the refined model's head-averaged attention on the concept's words,
   each layer's map brought to the latent grid, averaged, at least half its maximum.
3. Closed-form fusion (MACE section 3.4) of the concepts' LoRAs: with W_i = W' + up_i down_i and E_i every
   token of concept i's forget prompts,
       W* = argmin sum_i ||W* E_i - W_i E_i||^2 + lambda ||W* - W'||^2 + s_p sum ||W* c_j - W' c_j||^2,
   so every LoRA keeps its effect on its own concept's prompts and none changes another's.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..losses import noise_batch
from ..models.family import Conditioning, as_conditioning
from .base import Method
from .fmn import attention_resteering_loss, concept_positions, cross_attention_probabilities
from .options import MACESpec
from .uce import (EditRows, aligned_rows, edit_projections, prepare_edit, preserved_prompts,
                  real_token_counts)

REGION_TIMESTEP = 300  # the middle of the importance-sampled window, where the concept's layout is set


class MACE(MACESpec, Method):
    """The three stages of the module docstring, as one closed-form-style edit."""

    def card_entries(self, summary):
        keys = ("rank", "ridge", "preserve_scale", "steps", "lr", "batch_size", "seed", "forget_images",
                "edited_parameters", "refinement")
        return {"edit": {k: summary[k] for k in keys if k in summary}}

    def edit(self, pipe, concept) -> dict:
        from ...runtime import process_state
        from ..data.generate import check_sampling
        from ..data.images import images_per_prompt
        from ..data.latents import ImageSource

        c = self.config
        check_sampling(pipe, c.image_steps, c.resolution, c.resolution, size_flags=("--resolution", "--resolution"))
        if not c.forget_images:
            images_per_prompt(c.num_forget_images, len(concept.forget_prompts), "--num-forget-images")
        forget = self.forget_set(concept, ImageSource(pipe, c, process_state()))
        return mace_edit(pipe, concept, forget.latents, forget.prompts, forget.surrogates, rank=c.mace_rank,
                         ridge=c.mace_lambda, preserve_scale=c.mace_preserve_scale, steps=c.steps, lr=c.lr,
                         batch_size=c.batch_size, seed=c.seed)


# ------------------------------------------------------------------------------- stage 1: the refinement

def _hidden(cond) -> Tensor:
    return as_conditioning(cond).hidden.double()


def shared_token_rows(pipe, embed, concept) -> tuple[Tensor, Tensor, list[str]]:
    """Stage 1's rows: per forget prompt, the embeddings of its tokens that its surrogate shares (the common
    prefix, then the common suffix from its start to the end of the padded sequence, aligned with the
    surrogate's from there) paired with the surrogate's at the same places, and each row's concept."""
    from ..models.families import family_of

    family = family_of(pipe)
    tok = family.tokenizer_of(pipe, family.text_encoders[0])
    forget = list(concept.forget_prompts)
    targets = [concept.surrogate_for(p) for p in forget]
    owner_of = {p: m.name for m in concept.members for p in m.forget_prompts}
    h_f, h_t = _hidden(embed(forget)), _hidden(embed(targets))
    n_f, n_t = real_token_counts(pipe, forget), real_token_counts(pipe, targets)
    erase, target, owner = [], [], []
    for i, (p, s) in enumerate(zip(forget, targets)):
        a = tok(p, truncation=True, max_length=tok.model_max_length).input_ids
        b = tok(s, truncation=True, max_length=tok.model_max_length).input_ids
        prefix = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        suffix = 0
        while suffix < min(len(a), len(b)) - prefix and a[-1 - suffix] == b[-1 - suffix]:
            suffix += 1
        e, t = aligned_rows(h_f[i], h_t[i], n_f[i] - suffix, n_t[i] - suffix)
        erase += [h_f[i, :prefix], e]
        target += [h_t[i, :prefix], t]
        owner += [owner_of.get(p, concept.name)] * (prefix + len(e))
    return torch.cat(erase), torch.cat(target), owner


def preserve_rows(embed, prompts: Sequence[str]) -> Tensor | None:
    """Every token embedding of the preserved prompts (None: none)."""
    return _hidden(embed(list(prompts))).flatten(0, 1) if prompts else None


# ------------------------------------------------------------------------------- stage 2: the LoRAs

def importance_weights(num_train_timesteps: int) -> Tensor:
    """MACE's relation-focal importance sampling over t = 0..T-1 (its official code's f(t)), unnormalised."""
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    return torch.sigmoid(0.05 * (t - 200)) - torch.sigmoid(0.05 * (t - 400))


@contextmanager
def lora_on(layers: dict[str, nn.Linear], rank: int, generator: torch.Generator) -> Iterator[list[Tensor]]:
    """While open, each layer computes W x + up (down x): down ~ N(0, 1/rank^2), up = 0 (diffusers'
    LoRALinearLayer initialisation, so training starts from the refined model). Yields [down, up, ...] in
    the order of `layers`, trainable; the layers' own weights are not touched."""
    params, handles = [], []
    for module in layers.values():
        w = module.weight
        down = (torch.randn(rank, w.shape[1], generator=generator, dtype=torch.float32) / rank).to(w)
        up = torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device)
        down.requires_grad_(True)
        up.requires_grad_(True)
        params += [down, up]
        handles.append(module.register_forward_hook(
            lambda m, args, out, down=down, up=up: out + nn.functional.linear(nn.functional.linear(args[0], down), up)))
    try:
        yield params
    finally:
        for h in handles:
            h.remove()


def concept_region(maps: list[Tensor], words: Tensor, rows: int, size: tuple[int, int]) -> Tensor:
    """(B, h, w) bool on the latent grid `size`: where the concept's words draw the most attention. Per item,
    each layer's attention on `words` (summed over them, averaged over heads) is resized to the grid
    (bilinear) and averaged over layers; the region is where that map is at least half its maximum (our
    stand-in for MACE's Grounded-SAM mask of the concept)."""
    h, w = size
    total = torch.zeros(words.shape[0], h, w)
    for probs in maps:
        per_item = probs.reshape(rows, probs.shape[0] // rows, *probs.shape[1:]).float().mean(1)  # (B, Q, L)
        on_words = (per_item * words[:, None, :].to(per_item.device)).sum(-1).cpu()
        f = round((h * w / on_words.shape[1]) ** 0.5)
        grid = on_words.reshape(-1, 1, h // f, w // f)
        total += nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False)[:, 0]
    return total >= 0.5 * total.flatten(1).amax(1)[:, None, None]


@dataclass
class ConceptData:
    """One concept's training items: latents, conditioning, the tokens the loss reads, the regions."""

    latents: Tensor
    cond: Conditioning
    tokens: Tensor
    region: Tensor


def concept_data(pipe, embed, latents: Tensor, prompts: list[str], surrogates: list[str], seed: int) -> ConceptData:
    """The items of one concept, with each image's region from the model as it is (the base model, before
    any stage: the region belongs to the image, as a segmentation would) at REGION_TIMESTEP."""
    unet = pipe.unet
    device = next(unet.parameters()).device
    latents = latents.to(device)
    cond = as_conditioning(embed(prompts))
    words, tokens = concept_positions(pipe.tokenizer, prompts, surrogates)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=gen).to(latents)
    t = torch.full((len(prompts),), REGION_TIMESTEP, dtype=torch.long, device=device)
    batch = noise_batch(pipe.scheduler, latents, cond, noise, t)
    with torch.no_grad(), cross_attention_probabilities(unet) as maps:
        cond.predict(unet, batch.noisy, batch.timesteps)
    region = concept_region(maps, words, len(prompts), tuple(latents.shape[-2:]))
    return ConceptData(latents, cond, tokens, region)


def attention_in_region(unet, scheduler, data: ConceptData, index: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """MACE's LoRA loss on items `index` of a concept: the concept tokens' attention inside its region."""
    device = data.latents.device
    cond = data.cond[index]
    batch = noise_batch(scheduler, data.latents[index], cond, noise.to(data.latents), t.to(device))
    with cross_attention_probabilities(unet) as maps:
        cond.predict(unet, batch.noisy, batch.timesteps)
        return attention_resteering_loss(maps, data.tokens[index].to(device), len(index), data.region[index])


def train_lora(pipe, layers, data: ConceptData, *, rank: int, steps: int, lr: float, batch_size: int,
               seed: int) -> tuple[list[Tensor], list[float]]:
    """Stage 2 for one concept: Adam on a fresh LoRA (`lora_on`) for `steps` steps, each on `batch_size` of its
    items drawn with noise and importance-sampled timesteps from `seed`. Returns the LoRA's tensors
    (detached) and the losses."""
    from ..conditioning import optimise_conditioning

    unet = pipe.unet
    T = pipe.scheduler.config.num_train_timesteps
    weights = importance_weights(T)
    gen = torch.Generator().manual_seed(seed)
    n = data.latents.shape[0]

    def objective(step: int) -> Tensor:
        index = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        noise = torch.randn((len(index), *data.latents.shape[1:]), generator=gen)
        t = torch.multinomial(weights, len(index), replacement=True, generator=gen)
        return attention_in_region(unet, pipe.scheduler, data, index, noise, t)

    with lora_on(layers, rank, gen) as params:
        history = optimise_conditioning(params, objective, steps=steps, lr=lr)
        return [p.detach() for p in params], [round(float(h), 6) for h in history]


# ------------------------------------------------------------------------------- stage 3: the fusion

@torch.no_grad()
def fused_weights(W: Tensor, adapted: Sequence[tuple[Tensor, Tensor]], preserve: Tensor | None,
                  preserve_scale: float, ridge: float) -> Tensor:
    """Stage 3's closed form for one projection W (out x d): `adapted` pairs each concept's token rows E_i
    (N_i, d) with its adapted weight W_i; solved in float64, returned in W's dtype."""
    W64 = W.double()
    d = W64.shape[1]
    lhs = ridge * W64
    rhs = ridge * torch.eye(d, dtype=torch.float64, device=W.device)
    for rows, Wi in adapted:
        gram = rows.T @ rows
        lhs = lhs + Wi.double() @ gram
        rhs = rhs + gram
    if preserve is not None and preserve_scale > 0:
        gram = preserve.T @ preserve
        lhs = lhs + preserve_scale * W64 @ gram
        rhs = rhs + preserve_scale * gram
    return torch.linalg.solve(rhs, lhs.T).T.to(W.dtype)


# ------------------------------------------------------------------------------- the edit

def _fixed_loss(pipe, data: ConceptData, batch_size: int, seed: int) -> float:
    """The stage-2 loss on one fixed draw of a concept's items (what the summary compares before and after)."""
    gen = torch.Generator().manual_seed(seed + 1)
    index = torch.arange(min(batch_size, data.latents.shape[0]))
    noise = torch.randn((len(index), *data.latents.shape[1:]), generator=gen)
    t = torch.multinomial(importance_weights(pipe.scheduler.config.num_train_timesteps), len(index),
                          replacement=True, generator=gen)
    with torch.no_grad():
        return float(attention_in_region(pipe.unet, pipe.scheduler, data, index, noise, t))


def mace_edit(pipe, concept, latents: Tensor, prompts: list[str], surrogates: list[str], *, rank: int = 1,
              ridge: float = 1e3, preserve_scale: float = 0.0, steps: int = 50, lr: float = 1e-5,
              batch_size: int = 1, seed: int = 0, preserve_prompts: Sequence[str] | None = None) -> dict:
    """Edit `pipe.unet`'s cross-attention K/V in place with MACE's three stages (the module docstring), on
    forget images `latents` with their `prompts` and `surrogates`. Deterministic for a seed. Returns the
    report: settings, the refinement's measures (`uce.edit_projections`), each concept's LoRA losses, and
    per concept the stage-2 loss after the edit relative to the base model's (`forget_per_concept`)."""
    from ...errors import ConceptEraseError

    layers, originals, embed = prepare_edit(pipe)
    preserve = preserved_prompts(concept, preserve_prompts)
    keep = preserve_rows(embed, preserve) if preserve_scale > 0 else None
    owner_of = {p: m.name for m in concept.members for p in m.forget_prompts}
    items = {m.name: [i for i, p in enumerate(prompts) if owner_of.get(p, concept.name) == m.name]
             for m in concept.members}
    missing = [name for name, idx in items.items() if not idx]
    if missing:
        raise ConceptEraseError(f"MACE trains a LoRA per concept; no forget image of {', '.join(missing)}")
    unet = pipe.unet
    trainable = {n: p.requires_grad for n, p in unet.named_parameters()}
    unet.requires_grad_(False)  # the LoRAs train; the UNet's own gradients are never needed
    try:
        data = {m.name: concept_data(pipe, embed, latents[idx], [prompts[i] for i in idx],
                                     [surrogates[i] for i in idx], seed + k)
                for k, (m, idx) in enumerate(zip(concept.members, items.values()))}
        before = {n: _fixed_loss(pipe, d, batch_size, seed + k) for k, (n, d) in enumerate(data.items())}

        erase, target, owner = shared_token_rows(pipe, embed, concept)
        refinement = edit_projections(layers, originals, EditRows(erase, target, keep, owner),
                                      erase_scale=1.0, preserve_scale=preserve_scale, ridge=ridge)
        refined = {n: m.weight.detach().clone() for n, m in layers.items()}

        loras, losses = {}, {}
        for k, (n, d) in enumerate(data.items()):
            loras[n], losses[n] = train_lora(pipe, layers, d, rank=rank, steps=steps, lr=lr, batch_size=batch_size,
                                             seed=seed + k)
        rows = {m.name: _hidden(embed(list(m.forget_prompts))).flatten(0, 1) for m in concept.members}
        for j, (n, module) in enumerate(layers.items()):  # W_i = W' + up_i down_i, per concept i
            adapted = [(rows[c], refined[n] + lora[2 * j + 1] @ lora[2 * j]) for c, lora in loras.items()]
            module.weight.data.copy_(fused_weights(refined[n], adapted, keep, preserve_scale, ridge))
        after = {n: _fixed_loss(pipe, d, batch_size, seed + k) for k, (n, d) in enumerate(data.items())}
    finally:
        for n, p in unet.named_parameters():
            p.requires_grad_(trainable[n])
    return {
        "rank": rank, "ridge": ridge, "preserve_scale": preserve_scale, "steps": steps, "lr": lr,
        "batch_size": batch_size, "seed": seed, "forget_images": int(latents.shape[0]),
        "edited_parameters": len(layers), "preserve_prompts": len(preserve) if keep is not None else 0,
        "refinement": {k: refinement[k] for k in ("forget_per_concept", "retain")},
        "lora_losses": losses,
        "forget_per_concept": {n: round(after[n] / before[n], 6) if before[n] > 0 else 0.0 for n in before},
        "forget_measure": "the concept tokens' attention in its region (the LoRA loss, one fixed draw) after the "
                          "edit relative to the base model's (0: none left; 1: unchanged)",
        "retain": refinement["retain"] if keep is not None else None,
        "retain_measure": "relative drift sum ||W'c_j - W c_j||^2 / sum ||W c_j||^2 of the preserved prompts "
                          "after the refinement (null: nothing preserved, --mace-preserve-scale 0)",
    }
