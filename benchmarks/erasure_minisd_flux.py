"""Erasure benchmark on MiniSD-Flux (the FLUX.1 architecture in the digits world): SalUn, RL and UCE erase seven.

Each method runs the issue's command, `concept-erase erase --model minisd-flux --concept minisd-digit-seven
--method M [--steps N] --seed S`, with the preset's recipe (docs/MINISD.md: 48 forget / 216 retain images drawn by
the model, lr 1e-4, batch 16, alpha 0.5; SalUn keeps the salient half of the transformer's weights, RL trains all
of them, UCE is the closed-form edit of the text-side projections and has no steps). The erased model then draws
every (digit, style) prompt at MiniSD's sampling (25 steps, true classifier-free guidance 5 against the empty
prompt) and the packaged judges score them:

- forget: images of "seven" (any style) judged seven (lower is better);
- retain: images of the other nine digits judged as the digit asked for;
- style: every image judged in the style asked for.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/erasure_minisd_flux.py \
        --out benchmarks/results/erasure_minisd_flux.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from concept_erase.cli import main as cli
from concept_erase.diffusion.minisd.judge import load_judges, score_pipeline
from concept_erase.diffusion.models.loading import load_pipeline

METHODS = {"SalUn": ["--method", "salun"], "RL": ["--method", "rl"], "UCE": ["--method", "uce"]}
CONCEPT = "minisd-digit-seven"


def judged(pipe, judges, image_seeds: int) -> dict:
    """Forget, retain and style accuracy (fractions) over every (digit, style) prompt at `image_seeds` seeds."""
    scores = score_pipeline(pipe, judges, seeds=range(image_seeds))
    per_digit = scores["per_digit"]
    erased = CONCEPT.rsplit("-", 1)[1]
    return {"forget": per_digit[erased]["digit"],
            "retain": statistics.mean(v["digit"] for k, v in per_digit.items() if k != erased),
            "style": scores["style_accuracy"]}


def erase(method: str, steps: int, seed: int, work: Path) -> tuple[Path, float]:
    out = work / f"{method}-{seed}"
    argv = ["erase", "--model", "minisd-flux", "--concept", CONCEPT, *METHODS[method], "--no-progress", "--quiet",
            "--output", str(out)]
    if method != "UCE":  # a closed form on the prompts: no steps, no draws, no images
        argv += ["--steps", str(steps), "--seed", str(seed), "--cache-dir", str(work / "cache")]
    start = time.perf_counter()
    if cli(argv) != 0:
        raise SystemExit(f"erase failed: {' '.join(argv)}")
    return out, time.perf_counter() - start


def cell(values: list[float]) -> str:
    pct = [100 * v for v in values]
    return f"{statistics.mean(pct):.1f} +- {statistics.pstdev(pct):.1f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--steps", type=int, default=20, help="optimizer steps of SalUn and RL (default 20)")
    p.add_argument("--seeds", default="0,1", help="comma-separated erase seeds (default 0,1)")
    p.add_argument("--image-seeds", type=int, default=10, help="images per (digit, style) prompt (default 10)")
    p.add_argument("--out", default=None, help="write the table to this markdown file")
    args = p.parse_args(argv)
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    judges = load_judges()
    base = judged(load_pipeline("minisd-flux"), judges, args.image_seeds)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            runs = []
            for seed in seeds[:1] if method == "UCE" else seeds:  # UCE is deterministic: one run
                out, seconds = erase(method, args.steps, seed, Path(tmp))
                runs.append(judged(load_pipeline(str(out)), judges, args.image_seeds) | {"seconds": seconds})
                print(method, seed, runs[-1], file=sys.stderr, flush=True)
            rows.append(f"| {method} | {'-' if method == 'UCE' else args.steps} | "
                        + " | ".join(cell([r[k] for r in runs]) for k in ("forget", "retain", "style"))
                        + f" | {statistics.mean(r['seconds'] for r in runs):.0f} |")
    command = "python benchmarks/erasure_minisd_flux.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# MiniSD-Flux erasure benchmark", "",
             f"Command: `HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 {command.strip()}`",
             f"Concept {CONCEPT}, the preset's recipe, erase seeds {seeds}; evaluation: 25 steps, true CFG 5, "
             f"{args.image_seeds} images per (digit, style) prompt. Values: mean +- std over erase seeds. "
             f"torch {torch.__version__}, 1 thread, a CPU shared with other jobs (seconds are wall time of the "
             "whole `erase` command: image generation on the first run, mask, training, saving).", "",
             f"Original model: forget {100 * base['forget']:.1f}%, retain {100 * base['retain']:.1f}%, "
             f"style {100 * base['style']:.1f}%.", "",
             "| method | steps | forget acc % (lower is better) | retain acc % | style acc % | s per erase |",
             "| --- | --- | --- | --- | --- | --- |", *rows]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
