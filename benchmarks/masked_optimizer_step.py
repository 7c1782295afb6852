"""The masked optimizer step alone: `MaskedOptimizer` (SalUn's salient entries, packed Adam state) against torch
Adam over every entry, on the same parameters and gradients, at SD 1.5's scale by default.

Rounds alternate the two optimizers; each timing is the process's CPU time of one `step()` (the work done,
which other jobs on a shared machine inflate less than wall time); the fastest round of each is reported.
The first round (Adam's state allocation) is not timed.

    OMP_NUM_THREADS=2 python benchmarks/masked_optimizer_step.py --tensors 20 --size 5000000 --rounds 6
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from concept_erase.saliency import MaskedOptimizer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tensors", type=int, default=172, help="number of parameter tensors")
    p.add_argument("--size", type=int, default=5_000_000, help="entries per tensor (172 x 5M = 860M, SD 1.5's UNet)")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of salient entries (random mask)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (fastest reported)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(args.size)) for _ in range(args.tensors)]
    grads = [torch.randn(args.size) for _ in range(args.tensors)]
    masks = [torch.rand(args.size) < args.keep for _ in range(args.tensors)]
    optimizers = {"torch Adam, every entry": torch.optim.Adam(params, lr=1e-3),
                  f"MaskedOptimizer(Adam), keep {args.keep}": MaskedOptimizer(list(zip(params, masks)),
                                                                             torch.optim.Adam, lr=1e-3)}
    best = dict.fromkeys(optimizers, float("inf"))
    for rnd in range(1 + args.rounds):
        for name, opt in optimizers.items():
            for p_, g in zip(params, grads):
                p_.grad = g.clone()
            t = time.process_time()
            opt.step()
            seconds = time.process_time() - t
            if rnd:
                best[name] = min(best[name], seconds)
    n = args.tensors * args.size
    print(f"{n / 1e6:.0f}M float32 entries in {args.tensors} tensors, {torch.get_num_threads()} threads, "
          f"fastest of {args.rounds} rounds, CPU seconds per step\n\n| optimizer | CPU s | per 100M entries |\n"
          "| --- | ---: | ---: |")
    for name, s in best.items():
        print(f"| {name} | {s:.3f} | {s * 1e8 / n:.3f} |")
    plain, masked = best.values()
    print(f"\nmasked step / Adam step: x{masked / plain:.3f}")


if __name__ == "__main__":
    main()
