"""The app's Erase tab on MiniSD and MiniSD-XL: how long one erase takes, and whether it erased.

Each row calls the tab's own handler (`app.erase.erase`: the checks, the library's erase job, the new model
loaded into the registry) on a fresh cache folder, so the base model generates every training image, as a
visitor's first erase of a concept does. Recipes: `browser` is the smallest that works, the one
tests/test_app_browser.py runs (8 SalUn steps on 27 forget and 27 retain images); `preset` is the preset's own
(MiniSD's: 50 steps, 48 forget and 216 retain images). Then the erased model is judged like
`erasure_minisd.py` (same evaluator: forget accuracy on the erased digit's prompts, retain accuracy on the
other digits in every style, 25 DDIM steps, guidance 5). Wall time is the handler's, from the button to the
model in the registry; images + load + save is what the job spent outside the mask and the steps.

    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/app_erase_minisd.py --model minisd \
        --out benchmarks/results/app_erase_minisd.md
    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/app_erase_minisd.py --model minisd-xl \
        --out benchmarks/results/app_erase_minisd_xl.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from app.erase import EraseJobs, erase, erase_defaults
from app.models import Model, ModelRegistry
from app.ui import AppConfig
from concept_erase.concepts import get_concept
from concept_erase.diffusion.minisd import MINISD_MODELS
from concept_erase.diffusion.minisd.judge import load_judges
from concept_erase.diffusion.models.loading import load_pipeline
from erasure_minisd import Evaluator, write_results  # noqa: E402  (benchmarks/ is the script's folder)

RECIPES = {"browser": {"max_erase_steps": 8, "max_erase_images": 27}, "preset": {}}


def run(model: str, concept: str, recipe: str, evaluate) -> dict:
    """One erase through the tab's handler on a fresh cache, then the erased model judged."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CONCEPT_ERASE_CACHE"] = tmp  # the job's image cache: nothing generated before
        registry = ModelRegistry([Model("base", model, None)])
        config = AppConfig(erase_output=os.path.join(tmp, "erased"), **RECIPES[recipe])
        values = erase_defaults(registry, config, concept)
        t0 = time.perf_counter()
        _, new = erase(registry, config, EraseJobs(), "bench", concept, "", "", values["steps"],
                            values["num_forget_images"], values["num_retain_images"])
        wall = time.perf_counter() - t0
        with open(os.path.join(new.source, "erase_summary.json"), encoding="utf-8") as f:
            summary = json.load(f)  # the job's own timings
        steps_s = summary["seconds_per_step"] * summary["steps"]
        row = {"model": model, "concept": concept, "recipe": recipe, **values, "wall_s": wall,
               "mask_s": summary["seconds_mask"], "steps_s": steps_s,
               "images_load_save_s": wall - summary["seconds_mask"] - steps_s, **evaluate(new.pipe)}
    print(row, flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minisd", choices=MINISD_MODELS)
    p.add_argument("--concept", default="minisd-digit-three", help="a MiniSD preset")
    p.add_argument("--recipes", default="browser,preset", help="comma-separated subset of: " + ", ".join(RECIPES))
    p.add_argument("--eval-forget", type=int, default=30, help="judged forget-prompt images (default 30)")
    p.add_argument("--eval-seeds", type=int, default=2, help="judged images per retain prompt (default 2)")
    p.add_argument("--out", default="benchmarks/results/app_erase_minisd.md", help="Markdown output (replaced)")
    args = p.parse_args(argv)
    base = load_pipeline(args.model)
    base.set_progress_bar_config(disable=True)
    evaluate = Evaluator(base, get_concept(args.concept), load_judges(), args.eval_forget, args.eval_seeds)
    original = evaluate(base)
    lines = [f"# The app's Erase tab on {args.model}", "",
             f"Command: `python benchmarks/app_erase_minisd.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"Concept {args.concept}, SalUn through `app.erase.erase` on a fresh cache (every training image "
             f"generated). Evaluation: 25 DDIM steps, guidance 5; {len(evaluate.forget)} forget-prompt images, "
             f"{args.eval_seeds} seeds per retain prompt. torch {torch.__version__}, {torch.get_num_threads()} "
             f"threads, {os.cpu_count()} cores.", "",
             f"Original model: forget acc {100 * original['forget_acc']:.1f}%, retain acc "
             f"{100 * original['retain_acc']:.1f}%.", "",
             "| recipe | steps | forget / retain images | wall s | images + load + save s | mask s | steps s | "
             "forget acc % (lower is better) | retain acc % |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = []
    for recipe in args.recipes.split(","):
        row = run(args.model, args.concept, recipe, evaluate)
        rows.append(row)
        lines.append(f"| {recipe} | {row['steps']} | {row['num_forget_images']} / {row['num_retain_images']} | "
                     f"{row['wall_s']:.0f} | {row['images_load_save_s']:.0f} | {row['mask_s']:.1f} | "
                     f"{row['steps_s']:.0f} | {100 * row['forget_acc']:.1f} | {100 * row['retain_acc']:.1f} |")
    write_results(args.out, lines + [""], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
