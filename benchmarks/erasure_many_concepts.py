"""Erasing several concepts at once on MiniSD: forget and retain against the number of digits erased (1, 3, 5),
for SalUn, UCE and ESD-u, with wall time per concept; everything measured side by side in one run.

Digit sets: {one}, {one, three, five}, {one, three, five, seven, nine}: no digit's surrogate (k -> k + 1) is
itself erased, so every concept keeps its own surrogate. One run erases the whole set
(`concept_erase.concepts.combine_concepts`):
- SalUn: one saliency mask over the union forget set (`--num-forget` images per digit), a surrogate per
  digit, the joint retain set (the other digits), `--steps-per-concept` x n steps;
- ESD-u: the union of the forget prompts (ESD needs no images), the same number of steps;
- UCE: one closed-form edit for all the digits, preserving the other digits' prompts.

Columns: forget accuracy (images of the erased digits' prompts, every style, judged as the erased digit):
mean over the erased digits and the worst digit; retain accuracy (images of the other digits' prompts
judged as their digit AND style); wall time per concept = the method's whole cost for the set / n: for
SalUn the forget + retain image generation and encoding, the mask and the training; for ESD-u the
training; for UCE the edit. Also the process's CPU time per concept: with one thread it is the work done,
and unlike wall time it does not grow when other jobs share the cores. Values: mean +- std over seeds.

    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/erasure_many_concepts.py --out benchmarks/results/erasure_many_concepts.md
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import numpy as np
import torch

from concept_erase.concepts import combine_concepts
from concept_erase.diffusion.data.latents import LatentSet
from concept_erase.diffusion.training.config import TrainConfig
from concept_erase.diffusion.training.loop import train_unet
from concept_erase.diffusion.training.mask_pass import compute_mask
from concept_erase.diffusion.data.generate import generate_images
from concept_erase.diffusion.models.loading import load_pipeline
from concept_erase.diffusion.minisd import DIGITS, STYLES, minisd_prompt
from concept_erase.diffusion.minisd.experiment import MASK_BATCH_SIZE, SAMPLING, make_latent_sets
from concept_erase.diffusion.minisd.judge import load_judges
from concept_erase.diffusion.minisd.presets import digit_concept
from concept_erase.diffusion.methods.uce import uce_edit
from erasure_minisd import mean_std, write_results  # noqa: E402  (benchmarks/ is the script's folder)

DIGIT_SETS = {1: ["one"], 3: ["one", "three", "five"], 5: ["one", "three", "five", "seven", "nine"]}
METHODS = ("SalUn", "UCE", "ESD-u")


def evaluate(pipe, judges, erased: list[str], seeds: int) -> dict:
    """Forget: every style of each erased digit, `seeds` images each; retain: every style of every other digit."""
    kept = [d for d in DIGITS if d not in erased]
    forget = [(d, s, k) for d in erased for s in range(len(STYLES)) for k in range(seeds)]
    retain = [(d, s, k) for d in kept for s in range(len(STYLES)) for k in range(seeds)]
    images = generate_images(pipe, [minisd_prompt(d, s) for d, s, _ in forget + retain],
                             [k for _, _, k in forget + retain], batch_size=128, **SAMPLING)
    digits, styles = judges.predict_digits(images), judges.predict_styles(images)
    f_digits = digits[:len(forget)]
    per_digit = {d: float(np.mean([f_digits[i] == DIGITS.index(d) for i, (e, _, _) in enumerate(forget) if e == d]))
                 for d in erased}
    want = np.array([[DIGITS.index(d), s] for d, s, _ in retain])
    ok = (digits[len(forget):] == want[:, 0]) & (styles[len(forget):] == want[:, 1])
    return {"forget_mean": float(np.mean(list(per_digit.values()))), "forget_worst": max(per_digit.values()),
            "forget_per_digit": per_digit, "retain": float(ok.mean())}


def run(pipe, base_state, judges, n: int, seed: int, args) -> list[dict]:
    concept = combine_concepts([digit_concept(d) for d in DIGIT_SETS[n]])
    steps = args.steps_per_concept * n
    rows = []
    for method in args.methods:
        pipe.unet.load_state_dict(base_state)
        torch.manual_seed(seed)
        t0, c0 = time.perf_counter(), time.process_time()
        if method == "SalUn":
            forget, retain = make_latent_sets(pipe, concept, args.num_forget * n, args.num_retain, seed=seed)
            t_data = time.perf_counter() - t0
            mask = compute_mask(pipe, forget, 0.5, batch_size=MASK_BATCH_SIZE, seed=seed, concept=concept.name)
            train_unet(pipe, forget, retain, TrainConfig(method="salun", steps=steps, lr=args.lr,
                                                         batch_size=args.batch_size, alpha=0.5, seed=seed), mask=mask)
        elif method == "ESD-u":
            t_data = 0.0
            shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
            forget = LatentSet.prompts_only(concept.forget_prompts, shape)
            train_unet(pipe, forget, None, TrainConfig(method="esd-u", steps=steps, lr=args.lr, batch_size=args.batch_size,
                                                       seed=seed, esd_ddim_steps=args.esd_ddim_steps))
        else:  # UCE
            t_data = 0.0
            uce_edit(pipe, concept)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        row = {"method": method, "n": n, "seed": seed, "steps": 0 if method == "UCE" else steps,
               "seconds": seconds, "seconds_images": t_data, "seconds_per_concept": seconds / n,
               "cpu_seconds_per_concept": cpu / n,
               **evaluate(pipe, judges, DIGIT_SETS[n], args.eval_seeds)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    pipe.unet.load_state_dict(base_state)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="1,3,5", help="numbers of digits erased together (from 1, 3, 5)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--steps-per-concept", type=int, default=50, help="SalUn and ESD-u steps per erased digit (50)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (1e-4, MiniSD's recipe)")
    p.add_argument("--batch-size", type=int, default=16, help="forget (and retain) batch (16)")
    p.add_argument("--num-forget", type=int, default=48, help="SalUn: generated forget images per digit (48)")
    p.add_argument("--num-retain", type=int, default=216, help="SalUn: generated retain images (216)")
    p.add_argument("--esd-ddim-steps", type=int, default=10, help="ESD: DDIM steps of its partial sampling (10)")
    p.add_argument("--eval-seeds", type=int, default=4, help="judged images per (digit, style) prompt (4)")
    p.add_argument("--out", default="benchmarks/results/erasure_many_concepts.md", help="Markdown output (replaced)")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    args.methods = [m.strip() for m in args.methods.split(",")]
    if any(c not in DIGIT_SETS for c in counts) or any(m not in METHODS for m in args.methods):
        p.error(f"counts from {sorted(DIGIT_SETS)}, methods from {METHODS}")
    seeds = [int(s) for s in args.seeds.split(",")]

    start = time.perf_counter()
    judges = load_judges()
    pipe = load_pipeline("minisd")
    base_state = copy.deepcopy(pipe.unet.state_dict())
    base = {n: evaluate(pipe, judges, DIGIT_SETS[n], args.eval_seeds) for n in counts}
    rows = [r for n in counts for seed in seeds for r in run(pipe, base_state, judges, n, seed, args)]

    lines = ["# Erasing several MiniSD digits at once", "",
             f"Command: `python benchmarks/erasure_many_concepts.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"Settings: digit sets {', '.join('{' + ', '.join(DIGIT_SETS[n]) + '}' for n in counts)}; SalUn and ESD-u "
             f"{args.steps_per_concept} steps per digit, lr {args.lr}, batch {args.batch_size}; SalUn keep 0.5, alpha "
             f"0.5, {args.num_forget} forget images per digit and {args.num_retain} retain images; ESD-u eta 1, "
             f"{args.esd_ddim_steps} DDIM steps, no retain term; UCE erase scale 1, preserve scale "
             f"max(0.1, 1 / retain prompts), ridge 0.1. Evaluation: DDIM 25 steps, guidance 5, {args.eval_seeds} seeds "
             f"per (digit, style). Seeds {seeds}; mean +- std. torch {torch.__version__}, {torch.get_num_threads()} "
             "threads; the machine's 2 cores were shared with other jobs: wall times are inflated and noisy, CPU times are "
             "the measure of work.", "",
             "Original model: " + "; ".join(f"{n} digit(s): forget {100 * base[n]['forget_mean']:.1f}%, retain "
                                            f"{100 * base[n]['retain']:.1f}%" for n in counts), "",
             "| method | digits erased | forget acc % (mean over erased digits) | worst erased digit % | "
             "retain acc % (other digits) | wall time per concept (s) | CPU time per concept (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for method in args.methods:
        for n in counts:
            sel = [r for r in rows if r["method"] == method and r["n"] == n]
            lines.append(f"| {method} | {n} | {mean_std(sel, 'forget_mean', 100)} | "
                         f"{mean_std(sel, 'forget_worst', 100)} | {mean_std(sel, 'retain', 100)} | "
                         f"{mean_std(sel, 'seconds_per_concept', digits=2)} | "
                         f"{mean_std(sel, 'cpu_seconds_per_concept', digits=2)} |")
    lines += ["", "SalUn's wall time includes generating and encoding its images (ESD-u and UCE need none): "
              + "; ".join(f"{n} digit(s): {statistics.mean(r['seconds_images'] for r in rows if r['method'] == 'SalUn' and r['n'] == n):.0f} s"
                          for n in counts if any(r["method"] == "SalUn" and r["n"] == n for r in rows)) + ".",
              "", f"Total benchmark wall time: {time.perf_counter() - start:.0f} s.", ""]
    write_results(args.out, lines, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
