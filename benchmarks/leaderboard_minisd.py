"""The leaderboard on MiniSD: every erasure method the project ships, run through the `erase` command exactly as a
user runs it, on one concept, judged the same way, seed by seed.

Each method runs with the concept preset's recipe (`--concept minisd-digit-seven`: 48 forget / 216 retain
images, 50 steps, lr 1e-4, batch 16) plus the per-method flags in `RECIPES`, which are the recipes
docs/ALGORITHMS.md section 4 reports for MiniSD (e.g. ScissorHands' repair weight, ANT's learning rate).
The remap control (the concept's tokens remapped, UNet untouched) is the row every attack is calibrated
against; its forget rate is what a prompt filter achieves. Closed forms (UCE, RECE) and the training-free
SAFREE do not depend on the seed and run once.

Columns: forget = images of the concept's prompts judged as the digit (lower is better); retain = images of
the other prompts judged as their digit and style; FID on the digit judge's 128-d features of retain-prompt
images against MiniSD's on the same seeds (only comparable within this table); mean +- std over seeds.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/leaderboard_minisd.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from concept_erase.cli import main as concept_erase
from concept_erase.concepts import get_concept
from concept_erase.diffusion.methods import method_spec
from concept_erase.diffusion.minisd.judge import load_judges
from concept_erase.diffusion.models.loading import load_pipeline

from erasure_minisd import Evaluator, write_results  # noqa: E402  (benchmarks/ is the script's folder)

# method -> the flags added to the preset's recipe (docs/ALGORITHMS.md section 4 says why each differs)
RECIPES = {
    "salun": [], "rl": [], "salun-adv": ["--method", "salun", "--adversarial"], "esd-x": [], "esd-u": [], "ca": [],
    "uce": [], "rece": [], "mace": [], "safree": [], "fmn": ["--alpha", "300", "--lr", "3e-4", "--steps", "100"],
    "scissorhands": ["--alpha", "10"],
    "erasediff": [], "ant": ["--lr", "2e-4"], "remap": [],
}


def method_flags(method: str) -> list[str]:
    return RECIPES[method] if RECIPES[method][:1] == ["--method"] else ["--method", method, *RECIPES[method]]


def seed_free(method: str) -> bool:
    """Closed forms and the training-free SAFREE read no seed: one run."""
    return "seed" not in method_spec(method_flags(method)[1]).fields


def erase(flags: list[str], concept: str, seed: int, out: Path, cache: Path, model: str = "minisd") -> float:
    """`concept-erase erase --model MODEL --concept CONCEPT FLAGS` (FLAGS: "--method NAME" and the method's
    recipe) with the run's seed and image cache where the method reads them; the command's wall time."""
    argv = ["erase", "--model", model, "--concept", concept, *flags, "--output", str(out), "--no-progress",
            "--quiet"]
    fields = method_spec(flags[flags.index("--method") + 1]).fields  # erase refuses flags the method ignores
    argv += ["--cache-dir", str(cache)] if "cache_dir" in fields else []
    argv += ["--seed", str(seed)] if "seed" in fields else []
    start = time.perf_counter()
    if concept_erase(argv) != 0:
        raise SystemExit(f"erase failed: {' '.join(argv)}")
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concept", default="minisd-digit-seven", help="MiniSD digit preset (default minisd-digit-seven)")
    p.add_argument("--methods", default=",".join(RECIPES), help="comma-separated subset of: " + ", ".join(RECIPES))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--eval-forget", type=int, default=15, help="judged forget-prompt images (default 15)")
    p.add_argument("--eval-retain-seeds", type=int, default=1, help="judged images per retain prompt (default 1)")
    p.add_argument("--out", default="benchmarks/results/leaderboard_minisd.md", help="Markdown output (replaced)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of --out's .jsonl and run only the methods it does not have yet")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",")]
    if unknown := [m for m in methods if m not in RECIPES]:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    command = f"python benchmarks/leaderboard_minisd.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    start = time.perf_counter()
    base = load_pipeline("minisd")
    evaluate = Evaluator(base, get_concept(args.concept), load_judges(), args.eval_forget, args.eval_retain_seeds)
    rows = [{"method": "MiniSD", "seed": None, **evaluate(base)}]
    done = Path(args.out).with_suffix(".jsonl")
    if args.resume and done.exists():  # the same evaluation images (fixed seeds): earlier rows stay comparable
        rows += [r for r in map(json.loads, done.read_text().splitlines()) if r["method"] != "MiniSD"]
    methods = [m for m in methods if m not in {r["method"] for r in rows}]
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            for seed in seeds[:1] if seed_free(method) else seeds:
                out = Path(tmp) / f"{method}-{seed}"
                seconds = erase(method_flags(method), args.concept, seed, out, Path(tmp) / "cache")
                rows.append({"method": method, "seed": seed, "erase_s": seconds, **evaluate(load_pipeline(str(out)))})
                print(json.dumps(rows[-1]), flush=True)
            # after each method: a run stopped early still leaves the table of the methods it finished
            write_results(args.out, table(args, command, rows, time.perf_counter() - start), rows)
    return 0


def cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """Mean +- sample std of `values` times `scale` (the mean alone for one value)."""
    values = [scale * v for v in values]
    spread = f" +- {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def method_rows(rows: list[dict], flags) -> list[str]:
    """One table row per method of `rows` (in order): its flags (`flags(method)`), runs, forget, retain, FID and
    erase seconds over its seeds."""
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        lines.append(f"| {method} | {flags(method) or '-'} | {len(runs)} | "
                     f"{cell([r['forget_acc'] for r in runs])} | {cell([r['retain_acc'] for r in runs])} | "
                     f"{cell([r['fid'] for r in runs], 1.0, 0)} | {statistics.mean(r['erase_s'] for r in runs):.0f} |")
    return lines


def table(args, command: str, rows: list[dict], seconds: float) -> list[str]:
    lines = [f"# The leaderboard on MiniSD: {args.concept}", "", f"Command: `{command}`", "",
             "Every method through `concept-erase erase --model minisd --concept " + args.concept + "` with the "
             "preset's recipe plus the flags below (docs/ALGORITHMS.md section 4); judged on "
             f"{args.eval_forget} forget-prompt images and {args.eval_retain_seeds} image(s) per retain prompt, "
             "25 DDIM steps, guidance 5, the same seeds for every model; mean +- std over the erase seeds "
             f"(closed forms and SAFREE: one run). {seconds / 60:.1f} min in all on a shared CPU.", "",
             f"MiniSD itself: forget {100 * rows[0]['forget_acc']:.0f}%, retain {100 * rows[0]['retain_acc']:.0f}%.",
             "", "| method | extra flags | seeds | forget % (lower is better) | retain % | FID (judge) | erase s |",
             "| --- | --- | ---: | --- | --- | --- | ---: |"]
    return lines + method_rows(rows[1:], lambda method: " ".join(RECIPES[method]))


if __name__ == "__main__":
    raise SystemExit(main())
