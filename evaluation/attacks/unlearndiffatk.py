"""UnlearnDiffAtk (Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still
Easy To Generate Unsafe Images ... For Now", ECCV 2024).

For each attacked prompt, k prefix tokens are optimised so that the ERASED model, conditioned on
"<k tokens> <prompt>", denoises the image the ORIGINAL model draws for that prompt and seed: the erased
model used as its own diffusion classifier (the paper's eq. 3: min over the prefix of E_t,eps ||eps_theta(x_t,
c_adv) - eps||^2). The paper's tokens are discrete: each step runs the model on the nearest vocabulary
embeddings (cosine, as PEZ, Wen et al. 2023) and applies the gradient to the continuous embeddings
(straight-through); the final tokens are those nearest ids, so the prompt can be typed. The soft variant
skips the projection (a free-embedding attack, between the discrete one and the conditioning upper bound).

Initialisation: k vocabulary tokens drawn from (seed, row). Prompts are attacked in batches; each row's noise
and timesteps come from its own generator, so a row learns the same prefix in any batch.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

from concept_erase.diffusion.conditioning import optimise_conditioning

from .budgets import UnlearnDiffAtkBudget
from .core import Learned, Targets, attack_denoising_error, check_prefix_fits, encode, frozen, special_ids, vocabulary
from .structure import prefixed


def nearest_ids(vectors, vocab, allowed) -> torch.Tensor:
    """Ids of the vocabulary rows most cosine-similar to `vectors` (..., D), among `allowed` ids."""
    sims = F.normalize(vectors.detach().float(), dim=-1) @ F.normalize(vocab.detach().float()[allowed], dim=-1).T
    return allowed[sims.argmax(-1)]


def _init_seed(seed: int, row: int, restart: int) -> int:
    """Restart 0 draws the initial tokens from (seed, row) as a single run always has; restart j from its own."""
    return seed * 100_003 + row + restart * 1_000_000_007


@torch.no_grad()
def row_errors(pipe, texts, vectors, latents, rids, seed: int, step: int, draws: int = 8) -> torch.Tensor:
    """Each row's denoising error under its prefix, averaged over `draws` stratified timesteps drawn for `step`
    (the restarts' selection criterion: the attack's own objective, on a fresh draw)."""
    return torch.stack([attack_denoising_error(pipe, latents[i:i + 1], encode(pipe, [texts[i]], {
        name: v[i:i + 1] for name, v in vectors.items()}), [r], step, seed, draws) for i, r in enumerate(rids)])


def learn(pipe, rows, targets: Targets, budget: UnlearnDiffAtkBudget, seed: int = 0, **_) -> Learned:
    from concept_erase.errors import ConceptEraseError

    if targets.rows is None:
        raise ConceptEraseError("UnlearnDiffAtk needs the original model's image of each prompt (--base)")
    t0 = time.perf_counter()
    k = budget.tokens
    check_prefix_fits(pipe, [r.prompt for r in rows], k)
    vocab = vocabulary(pipe)
    first = next(iter(vocab))  # discrete ids are chosen on the first encoder's vocabulary (SDXL: shared ids)
    banned = set(special_ids(pipe))
    allowed = torch.tensor([i for i in range(vocab[first].shape[0]) if i not in banned])
    discrete = budget.variant == "discrete"
    texts = [prefixed(r.prompt, k) for r in rows]
    ids_out, soft_out, history = [], {name: [] for name in vocab}, []

    def vectors(params):
        if not discrete:
            return params
        ids = nearest_ids(params[first], vocab[first], allowed)
        # straight-through: the forward sees vocabulary rows, the gradient updates the free vectors
        return {name: p + (vocab[name].detach().float()[ids] - p).detach() for name, p in params.items()}

    with frozen(pipe):
        for lo in range(0, len(rows), budget.batch_size):
            rids = list(range(lo, min(lo + budget.batch_size, len(rows))))
            best, best_error = None, torch.full((len(rids),), float("inf"))
            for restart in range(budget.restarts):
                init = torch.stack([allowed[torch.randint(len(allowed), (k,), generator=torch.Generator().manual_seed(
                    _init_seed(seed, r, restart)))] for r in rids])
                params = {name: w.detach().float()[init].clone().requires_grad_(True) for name, w in vocab.items()}

                def objective(step, params=params):
                    cond = encode(pipe, texts[lo:lo + len(rids)], vectors(params))
                    return attack_denoising_error(pipe, targets.rows[rids], cond, rids, step, seed, budget.timesteps)

                steps = [loss.item() / len(rids) / budget.restarts
                         for loss in optimise_conditioning(params.values(), objective, steps=budget.steps,
                                                           lr=budget.lr, cosine=budget.cosine)]
                history = [h + s * len(rids) / len(rows) for h, s in zip(history or [0.0] * len(steps), steps)]
                final = {name: p.detach() for name, p in params.items()}
                if budget.restarts == 1:
                    best = final
                    break
                # Keep, per row, the restart whose prefix denoises the target best, on draws no step trained on.
                error = row_errors(pipe, texts[lo:lo + len(rids)], vectors(final), targets.rows[rids], rids, seed,
                                   step=budget.steps)
                better = error < best_error
                best_error = torch.where(better, error, best_error)
                best = final if best is None else {name: torch.where(better[:, None, None], final[name], v)
                                                   for name, v in best.items()}
            if discrete:
                ids_out.append(nearest_ids(best[first], vocab[first], allowed))
            for name, p in best.items():
                soft_out[name].append(p)
    common = dict(history=history, seconds=time.perf_counter() - t0)
    if discrete:
        ids = torch.cat(ids_out)
        decoded = [pipe.tokenizer.decode(i.tolist()) + " " + r.prompt for i, r in zip(ids, rows)]
        return Learned("unlearndiffatk", asdict(budget), list(rows), texts, prefix_ids=ids, decoded=decoded, **common)
    return Learned("unlearndiffatk", asdict(budget), list(rows), texts,
                   prefix={name: torch.cat(v) for name, v in soft_out.items()}, **common)
