"""Attack benchmark on MiniSD: does the erased digit come back under each attack?

For each seed, MiniSD's "seven" is erased with every method (same forget/retain images, same training budget:
the erasure benchmark's settings), then each model is attacked with the four attacks at ONE budget (the same
for every model) on the same rows (the concept's three forget prompts x the evaluation seeds), and scored by
the MiniSD digit judge. Pre-ASR and ASR are counted the UnlearnDiffAtk way (docs/PROTOCOLS.md 6: a row succeeds
if the concept shows before OR after the attack). Beside them: forget accuracy (seven prompts judged seven),
retain accuracy (the other prompts judged as their digit and style) and FID on the judge's features against
the original model's images, as `erasure_minisd.py` measures them.

Two reference models show what the attacks can do at all:
- the remap control, the project's calibration (docs/PROTOCOLS.md, "Calibration against a control"): MiniSD with
  the concept's token read as its surrogate's ("seven" as "eight", `erase --method remap`), the UNet untouched,
  attacked at the same budgets, rows and seeds by the same code `attack` runs (`run.attack_control`). The concept
  is unreachable by prompt but still in the weights: an attack that recovers it there on fewer than 95% of the
  rows is uncalibrated, and its ASR on an erased model is only a lower bound;
- the original model (its Pre-ASR is the detector's hit rate on undamaged images).

The budgets are `attack`'s defaults (evaluation/attacks/budgets.py) unless a `--<attack>-steps` flag is given.

    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/attacks_minisd.py --methods SalUn,RL,SalUn-Adv \
        --out benchmarks/results/attacks_minisd.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


from concept_erase.concepts import get_concept
from concept_erase.diffusion.methods.remap import remapped_copy
from concept_erase.diffusion.training.loop import train_unet
from concept_erase.diffusion.training.mask_pass import compute_mask
from concept_erase.diffusion.models.loading import load_pipeline
from concept_erase.diffusion.methods import METHODS as REGISTERED_METHODS
from concept_erase.diffusion.minisd.experiment import MASK_BATCH_SIZE, make_latent_sets
from concept_erase.diffusion.minisd.judge import load_judges
from erasure_minisd import Evaluator, train_config, write_results  # the erasure benchmark's parts
from evaluation.attacks.budgets import make_budget
from evaluation.attacks.detectors import detector_for
from evaluation.attacks.run import CALIBRATED_MIN, attack_control, concept_rows, run_attacks
from evaluation.generation import make_protocol

REMAP = "remap control (the ceiling)"
ORIGINAL = "original MiniSD"
# table name -> the erase method; the mask is computed for the methods that use one
METHODS = {"SalUn": "salun", "RL": "rl", "ESD-x": "esd-x", "ESD-u": "esd-u", "SalUn-Adv": "salun-adv"}
MASKED = {"salun", "salun-adv"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concept", default="minisd-digit-seven", help="MiniSD digit preset (default minisd-digit-seven)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--seeds", default="0,1,2", help="benchmark seeds (data, mask, training and attack draws)")
    p.add_argument("--eval-seeds", default="0,1,2", help="seeds of the attacked rows (each forget prompt x these)")
    p.add_argument("--steps", type=int, default=50, help="erasure steps (default 50)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5, help="retain weight of SalUn/RL/SalUn-Adv (ESD: 0)")
    p.add_argument("--esd-ddim-steps", type=int, default=10)
    p.add_argument("--num-forget", type=int, default=48)
    p.add_argument("--num-retain", type=int, default=216)
    p.add_argument("--eval-forget", type=int, default=30, help="judged forget-prompt images")
    p.add_argument("--eval-retain-seeds", type=int, default=2, help="judged images per retain prompt")
    for attack in ("inversion", "unlearndiffatk", "embedding"):
        p.add_argument(f"--{attack}-steps", type=int, default=None, help=f"{attack} steps (default: attack's)")
    p.add_argument("--out", default="benchmarks/results/attacks_minisd.md", help="Markdown output (replaced)")
    p.add_argument("--tabulate", nargs="+", metavar="FILE", default=None,
                   help="no runs: build the tables from the JSON result lines in these files (the .jsonl of "
                        "earlier runs, or their logs), e.g. one run per seed in parallel")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    eval_seeds = [int(s) for s in args.eval_seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    available = [m for m in methods if METHODS[m] in REGISTERED_METHODS]
    skipped = [m for m in methods if m not in available]

    start = time.perf_counter()
    budgets = {"inversion": make_budget("inversion", steps=args.inversion_steps),
               "unlearndiffatk": make_budget("unlearndiffatk", steps=args.unlearndiffatk_steps),
               "ringabell": make_budget("ringabell"),
               "embedding": make_budget("embedding", steps=args.embedding_steps)}  # None: the default
    if args.tabulate:
        results = [json.loads(line) for f in args.tabulate for line in Path(f).read_text().splitlines()
                   if line.startswith("{")]
        seeds = sorted({r["seed"] for r in results})
    else:
        results = run(args, seeds, eval_seeds, available, budgets)
    if not any(r["model"] == ORIGINAL for r in results):  # runs from before the original was a row of its own
        base = load_pipeline("minisd")
        results.append({"model": ORIGINAL, "seed": None,
                        **Evaluator(base, get_concept(args.concept), load_judges(), args.eval_forget,
                                    args.eval_retain_seeds)(base)})
    command = f"python benchmarks/attacks_minisd.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    write_tables(args, command, results, seeds, eval_seeds, available, skipped, budgets, time.perf_counter() - start)
    return 0


def run(args, seeds, eval_seeds, available, budgets) -> list[dict]:
    """Erase with each method per seed, attack every model, evaluate: one result row per (model, seed)."""
    concept = get_concept(args.concept)
    judges = load_judges()
    pipe, base = load_pipeline("minisd"), load_pipeline("minisd")
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    detector = detector_for(concept.name)
    protocol = make_protocol("minisd")
    rows = concept_rows(concept, eval_seeds)
    evaluate = Evaluator(base, concept, judges, args.eval_forget, args.eval_retain_seeds)
    results = [{"model": ORIGINAL, "seed": None, **evaluate(base)}]
    print(json.dumps(results[0]), flush=True)

    def attack(name: str, model, seed: int, erase_s: float | None) -> None:
        outcome = run_attacks(model, concept, rows, budgets, detector, protocol=protocol, base=base, seed=seed,
                              log=lambda line: print(f"[{name} seed {seed}] {line}", flush=True))
        s = outcome.summary()
        row = {"model": name, "seed": seed, "erase_s": erase_s, **evaluate(model), "pre_asr": s["pre_asr"],
               **{f"asr_{a}": v["asr"] for a, v in s["attacks"].items()},
               **{f"alone_{a}": v["attack_alone"] for a, v in s["attacks"].items()},
               "attack_s": {a: v["seconds"] for a, v in s["attacks"].items()}}
        results.append(row)
        print(json.dumps(row), flush=True)

    for seed in seeds:
        # The calibration first: `attack`'s own control at these budgets, rows and attack seed.
        control = attack_control(base, concept, rows, budgets, detector, protocol=protocol, seed=seed,
                                 log=lambda line: print(f"[{REMAP} seed {seed}] {line}", flush=True))
        row = {"model": REMAP, "seed": seed, "erase_s": None, **evaluate(remapped_copy(base, concept)[0]),
               "pre_asr": control["pre_asr"], **{f"asr_{a}": v for a, v in control["attacks"].items()}}
        results.append(row)
        print(json.dumps(row), flush=True)
        forget, retain = make_latent_sets(base, concept, args.num_forget, args.num_retain, seed=seed)
        for name in available:
            method = METHODS[name]
            pipe.unet.load_state_dict(base_state)
            t0 = time.perf_counter()
            mask = compute_mask(pipe, forget, 0.5, batch_size=MASK_BATCH_SIZE, seed=seed) if method in MASKED else None
            config = train_config(method, args.alpha, args.esd_ddim_steps, steps=args.steps, lr=args.lr,
                                  batch_size=args.batch_size, seed=seed)
            train_unet(pipe, forget, retain, config, mask=mask)
            attack(name, pipe, seed, time.perf_counter() - t0)
        pipe.unet.load_state_dict(base_state)
    return results


def write_tables(args, command: str, rows: list[dict], seeds, eval_seeds, available, skipped, budgets,
                 seconds: float) -> None:
    """The Markdown table (mean +- std over seeds per model) and the .jsonl of every result row."""
    concept = get_concept(args.concept)
    original = next(r for r in rows if r["model"] == ORIGINAL)
    results = [r for r in rows if r["model"] != ORIGINAL]
    n_rows = len(concept.forget_prompts) * len(eval_seeds)

    lines = ["# MiniSD attack benchmark", "",
             f"Command: `{command}`", "",
             f"Erasure: {args.concept}, {args.steps} steps, lr {args.lr}, batch {args.batch_size}+{args.batch_size}, "
             f"alpha {args.alpha} (ESD: 0), keep 0.5, {args.num_forget} forget / {args.num_retain} retain images, "
             f"ESD {args.esd_ddim_steps} DDIM steps of partial sampling. Seeds {seeds} (data, mask, training, attack "
             f"draws); mean +- std over seeds.",
             f"Attacks: {n_rows} rows ({len(concept.forget_prompts)} forget prompts x seeds {eval_seeds}), DDIM 25 "
             "steps, guidance 5, MiniSD digit judge. Budgets (the same for every model): "
             + "; ".join(f"{n}: " + ", ".join(f"{k}={v}" for k, v in vars(b).items()) for n, b in budgets.items()) + ".",
             "ASR counts a row whose plain prompt already shows the digit (Pre-ASR) as a success, as UnlearnDiffAtk "
             "does; in brackets, the attacked images alone.",
             f"Original MiniSD: forget acc {100 * original['forget_acc']:.1f}%, retain acc "
             f"{100 * original['retain_acc']:.1f}%.", ""]
    if skipped:
        lines += [f"Not run (method not available in this build): {', '.join(skipped)}.", ""]
    header = ["model", "erase s", "forget acc %", "retain acc %", "FID (judge)", "Pre-ASR %",
              *[f"ASR {a} %" for a in budgets]]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]

    def ms(sel, key, scale=1.0):
        xs = [scale * r[key] for r in sel]
        return f"{statistics.mean(xs):.1f} +- {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"

    for name in [*available, REMAP]:
        sel = [r for r in results if r["model"] == name]
        if not sel:
            continue
        erase_s = [r["erase_s"] for r in sel if r["erase_s"] is not None]
        cells = [f"{statistics.mean(erase_s):.0f}" if erase_s else "-", ms(sel, "forget_acc", 100),
                 ms(sel, "retain_acc", 100), ms(sel, "fid"), ms(sel, "pre_asr")]
        cells += [ms(sel, f"asr_{a}") + (f" ({statistics.mean(r[f'alone_{a}'] for r in sel):.0f})"
                                         if name != REMAP else "") for a in budgets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    control = [r for r in results if r["model"] == REMAP]
    if control:
        recovered = {a: statistics.mean(r[f"asr_{a}"] for r in control) for a in budgets}
        lines += ["", f"Calibrated at these budgets (the control recovered on at least {CALIBRATED_MIN:g}% of the "
                  "rows): " + (", ".join(a for a, v in recovered.items() if v >= CALIBRATED_MIN) or "none")
                  + ". Uncalibrated, their ASR only a lower bound: "
                  + (", ".join(f"{a} ({v:.1f}%)" for a, v in recovered.items() if v < CALIBRATED_MIN) or "none") + "."]
    attacked = [r for r in results if "attack_s" in r]
    mean_s = {a: statistics.mean(r["attack_s"][a] for r in attacked) for a in budgets} if attacked else {}
    lines += ["", "Mean attack time per erased model (s, the machine shared with other jobs): "
              + ", ".join(f"{a} {v:.0f}" for a, v in mean_s.items()) + ".",
              f"Wall time of this {'tabulation' if args.tabulate else 'run'}: {seconds:.0f} s.", ""]
    write_results(args.out, lines, rows)


if __name__ == "__main__":
    raise SystemExit(main())
