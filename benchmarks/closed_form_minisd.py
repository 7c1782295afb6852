"""The closed-form and inference-time methods on MiniSD: UCE with each token selection, RECE and SAFREE, judged like `erasure_minisd.py` (same evaluator, same sampling).

Every row starts from the original MiniSD and erases the concept with the method's defaults (docs/ALGORITHMS.md
4); there is no training, so there is no seed of the method: the seeds only change the judged images
(`--eval-seeds` images per retain prompt and forget prompt). Columns: forget accuracy (images of the forget
prompts judged as the erased digit / style), retain accuracy (images of the retain prompts judged as their
requested digit AND style), FID on the digit judge's features against the original model's images on the same
seeds, and the edit's wall time.

    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/closed_form_minisd.py \
        --out benchmarks/results/closed_form_minisd.md
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

from concept_erase.concepts import get_concept
from concept_erase.diffusion.methods.rece import rece_edit
from concept_erase.diffusion.methods.safree import concept_keywords
from concept_erase.diffusion.models.safree import SafreeFilter, SafreeHooks
from concept_erase.diffusion.methods.uce import uce_edit
from concept_erase.diffusion.minisd import MINISD_MODELS
from concept_erase.diffusion.minisd.judge import load_judges
from concept_erase.diffusion.models.loading import load_pipeline
from erasure_minisd import Evaluator, write_results  # noqa: E402  (benchmarks/ is the script's folder)


def safree(pipe, concept) -> SafreeHooks:
    """SAFREE's hooks with its defaults (what load_pipeline attaches from safree.json)."""
    return SafreeHooks(SafreeFilter(pipe, {"keywords": concept_keywords(concept), "alpha": 0.01, "gamma": 10}))


# name -> the edit, in place, of (pipe, concept); SAFREE returns its hooks, removed after the evaluation
METHODS = {
    "UCE (last-to-end tokens: default)": lambda pipe, concept: uce_edit(pipe, concept, tokens="last-to-end"),
    "UCE (all tokens)": lambda pipe, concept: uce_edit(pipe, concept, tokens="all"),
    "RECE": rece_edit,
    "SAFREE": safree,
}


def measure(pipe, base_state, evaluate, concept, method: str) -> dict:
    pipe.unet.load_state_dict(base_state)
    t0 = time.perf_counter()
    done = METHODS[method](pipe, concept)
    seconds = time.perf_counter() - t0
    row = {"method": method, "concept": concept.name, "seconds": seconds, **evaluate(pipe)}
    if isinstance(done, SafreeHooks):
        done.remove()
    pipe.unet.load_state_dict(base_state)
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", default="minisd-digit-seven", help="comma-separated MiniSD concept presets")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--eval-forget", type=int, default=30, help="judged forget-prompt images (default 30)")
    p.add_argument("--eval-seeds", type=int, default=4, help="judged images per retain prompt (default 4)")
    p.add_argument("--model", default="minisd", choices=MINISD_MODELS)
    p.add_argument("--out", default="benchmarks/results/closed_form_minisd.md", help="Markdown output (replaced)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}")
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    base_state = copy.deepcopy(pipe.unet.state_dict())
    judges = load_judges()
    lines = ["# Closed-form and inference-time methods on MiniSD", "",
             f"Command: `python benchmarks/closed_form_minisd.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"Model {args.model}; each method's defaults (docs/ALGORITHMS.md 4). Evaluation: 25 DDIM steps, "
             f"guidance 5; {args.eval_forget} forget-prompt images, {args.eval_seeds} seeds per retain prompt. "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads.", ""]
    rows = []
    for name in args.concepts.split(","):
        concept = get_concept(name)
        evaluate = Evaluator(pipe, concept, judges, args.eval_forget, args.eval_seeds)
        original = evaluate(pipe)
        lines += [f"## {name}", "", f"Original model: forget acc {100 * original['forget_acc']:.1f}%, retain acc "
                  f"{100 * original['retain_acc']:.1f}%. FID compares {len(evaluate.retain)} retain-prompt images "
                  "on the judge's 128-d features (compare within this table only).", "",
                  "| method | forget acc % (lower is better) | retain acc % | FID (judge features) | edit s |",
                  "| --- | --- | --- | --- | --- |"]
        for method in methods:
            row = measure(pipe, base_state, evaluate, concept, method)
            rows.append(row)
            lines.append(f"| {method} | {100 * row['forget_acc']:.1f} | {100 * row['retain_acc']:.1f} | "
                         f"{row['fid']:.1f} | {row['seconds']:.3f} |")
        lines.append("")
    write_results(args.out, lines, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
