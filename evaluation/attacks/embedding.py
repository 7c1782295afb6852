"""The conditioning-space upper bound: for each attacked prompt, the UNet conditioning itself (the text
encoder's output; SDXL: also the pooled text embedding) is optimised directly, bypassing the tokenizer and the
encoder, so the erased model denoises the original model's image of that prompt and seed (the UnlearnDiffAtk
objective without any constraint on the input).

No prompt can give a conditioning this search cannot, so its success rate bounds every text attack on this
model: a concept it cannot recover is gone from the UNet; one it recovers while the prompt attacks fail is
"unreachable by prompt" but still in the weights, which is what weight-level methods such as SalUn must rule out.
Initialisation: each prompt's own conditioning.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from concept_erase.diffusion.conditioning import FIXED, optimise_conditioning
from concept_erase.diffusion.models.family import Conditioning
from concept_erase.errors import ConceptEraseError

from .budgets import EmbeddingBudget
from .core import Learned, Targets, attack_denoising_error, encode, frozen


def learn(pipe, rows, targets: Targets, budget: EmbeddingBudget, seed: int = 0, **_) -> Learned:
    if targets.rows is None:
        raise ConceptEraseError("the embedding attack needs the original model's image of each prompt (--base)")
    t0 = time.perf_counter()
    out, history = [], []
    with frozen(pipe):
        for lo in range(0, len(rows), budget.batch_size):
            rids = list(range(lo, min(lo + budget.batch_size, len(rows))))
            with torch.no_grad():
                start = encode(pipe, [rows[r].prompt for r in rids])
            hidden = start.hidden.detach().clone().requires_grad_(True)
            added = {k: v.detach().clone().requires_grad_(k not in FIXED) for k, v in start.added.items()}
            params = [hidden, *(v for k, v in added.items() if k not in FIXED)]

            def objective(step):
                return attack_denoising_error(pipe, targets.rows[rids], Conditioning(hidden, added), rids, step, seed,
                                              budget.timesteps)

            steps = [loss.item() / len(rids)
                     for loss in optimise_conditioning(params, objective, steps=budget.steps, lr=budget.lr,
                                                       cosine=budget.cosine)]
            history = [h + s * len(rids) / len(rows) for h, s in zip(history or [0.0] * len(steps), steps)]
            out.append(Conditioning(hidden.detach().cpu(), {k: v.detach().cpu() for k, v in added.items()}))
    return Learned("embedding", asdict(budget), list(rows), [r.prompt for r in rows], conditioning=Conditioning.cat(out),
                   history=history, seconds=time.perf_counter() - t0)
