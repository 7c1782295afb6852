"""How much of an erasure a LoRA keeps, on MiniSD: each method's erasure of a digit exported as LoRAs of several
ranks and energies and as a LyCORIS full file, loaded back through diffusers' `load_lora_weights` (the LoRAs)
or `concept-erase apply`'s code (the LyCORIS file), and judged against the full erasure; then the rank-64
LoRA at strengths from 0 to 1.5 (diffusers' `fuse_lora(lora_scale=s)`, the slider A1111 and ComfyUI show).

Erasures (the attack benchmark's recipe, docs/ALGORITHMS.md 2 and 4): SalUn (mask keep 0.5), RL, ESD-x, ESD-u,
`--steps` Adam steps each at lr 1e-4, batch 8 + 8, alpha 0.5 (ESD: 0, 10 DDIM steps of partial sampling); UCE's
closed form. The difference each leaves (erased - MiniSD) is exported with `concept_erase.diffusion.models.lora`
(`concept-erase export --to lora / lycoris-full`), kohya layout, fp16 (what community LoRAs ship; the full
checkpoint's size is counted at fp16 too).

Columns: forget = images of the erased digit's prompts judged as that digit; retain = images of the other
prompts judged as their digit and style; FID on the digit judge's 128-d features of retain-prompt images
against MiniSD's on the same seeds (only comparable within this table); energy = the share of the difference's
squared norm the file holds; size = the file against the full checkpoint (UNet, VAE, text encoder at fp16).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/lora_minisd.py [--model minisd-xl]   # -> results/lora_<model>.md
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from concept_erase.concepts import get_concept
from concept_erase.diffusion.methods.uce import uce_edit
from concept_erase.diffusion.minisd import MINISD_MODELS
from concept_erase.diffusion.minisd.experiment import MASK_BATCH_SIZE, make_latent_sets
from concept_erase.diffusion.minisd.judge import load_judges
from concept_erase.diffusion.models.loading import load_pipeline
from concept_erase.diffusion.models.apply import apply_erasure, read_erasure
from concept_erase.diffusion.models.lora import export_erasure
from concept_erase.diffusion.training.loop import train_unet
from concept_erase.diffusion.training.mask_pass import compute_mask

from erasure_minisd import Evaluator, train_config, write_results  # noqa: E402  (benchmarks/ is the script's folder)

METHODS = {"SalUn": "salun", "RL": "rl", "ESD-x": "esd-x", "ESD-u": "esd-u", "UCE": "uce"}


def erase(pipe, method: str, forget, retain, concept, args) -> None:
    """Erase in place with `method` (the UNet starts at MiniSD's weights)."""
    if method == "uce":
        uce_edit(pipe, concept)
        return
    mask = compute_mask(pipe, forget, 0.5, batch_size=MASK_BATCH_SIZE, seed=args.seed) if method == "salun" else None
    config = train_config(method, args.alpha, args.esd_ddim_steps, steps=args.steps, lr=args.lr,
                          batch_size=args.batch_size, seed=args.seed)
    train_unet(pipe, forget, retain, config, mask=mask)


def add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """The erasure recipe's flags (what `erase` reads), shared with `lora_transfer_minisd.py`."""
    p.add_argument("--concept", default="minisd-digit-seven", help="MiniSD digit preset (default minisd-digit-seven)")
    p.add_argument("--steps", type=int, default=50, help="erasure steps (default 50)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5, help="retain weight of SalUn/RL (ESD: 0)")
    p.add_argument("--esd-ddim-steps", type=int, default=10)
    p.add_argument("--num-forget", type=int, default=48)
    p.add_argument("--num-retain", type=int, default=216)
    p.add_argument("--seed", type=int, default=0)


def model_name(args) -> str:
    return "MiniSD-XL" if args.model == "minisd-xl" else "MiniSD"


def with_lora(base, path: Path, strength: float = 1.0):
    """The base with the LoRA file fused through diffusers, as a diffusers user loads it."""
    pipe = copy.deepcopy(base)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()
    return pipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--ranks", default="4,16,64,256", help="LoRA ranks (default 4,16,64,256)")
    p.add_argument("--energies", default="0.9,0.99", help="LoRA energies (default 0.9,0.99)")
    p.add_argument("--strengths", default="0,0.5,1,1.5", help="strengths of the rank-64 LoRA (default 0,0.5,1,1.5)")
    p.add_argument("--strength-rank", type=int, default=64, help="the LoRA rank of the strength sweep (default 64)")
    add_recipe_flags(p)
    p.add_argument("--eval-forget", type=int, default=15, help="judged forget-prompt images (default 15)")
    p.add_argument("--eval-retain-seeds", type=int, default=1, help="judged images per retain prompt (default 1)")
    p.add_argument("--model", default="minisd", choices=MINISD_MODELS,
                   help="minisd (SD 1.x architecture) or minisd-xl (SDXL: two text encoders, SGM LoRA names)")
    p.add_argument("--out", default=None, help="Markdown output (replaced; default "
                                                "benchmarks/results/lora_<model>.md)")
    args = p.parse_args(argv)
    args.out = args.out or f"benchmarks/results/lora_{args.model.replace('-', '_')}.md"
    methods = [m.strip() for m in args.methods.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    energies = [float(e) for e in args.energies.split(",")]
    strengths = [float(s) for s in args.strengths.split(",")]

    start = time.perf_counter()
    concept = get_concept(args.concept)
    base = load_pipeline(args.model)
    evaluate = Evaluator(base, concept, load_judges(), args.eval_forget, args.eval_retain_seeds)
    forget, retain = make_latent_sets(base, concept, args.num_forget, args.num_retain, seed=args.seed)
    rows = [{"method": model_name(args), "file": "none", **evaluate(base)}]
    print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in methods:
            erased = copy.deepcopy(base)
            torch.manual_seed(args.seed)
            erase(erased, METHODS[name], forget, retain, concept, args)
            rows.append({"method": name, "file": "full erasure", **evaluate(erased)})
            print(json.dumps(rows[-1]), flush=True)
            variants = [(f"LoRA rank {r}", {"rank": r}) for r in ranks]
            variants += [(f"LoRA energy {e:g}", {"energy": e}) for e in energies]
            for label, choice in variants + [("LyCORIS full", {})]:
                path = Path(tmp) / f"{name}-{label.replace(' ', '-')}.safetensors"
                report = export_erasure(base, erased, path, to="lora" if choice else "lycoris-full", dtype="fp16",
                                        **choice)
                ranks_used = [r.rank for r in report.layers if r.rank is not None]
                file_row = {"method": name, "file": label, "energy_kept": report.energy_kept,
                            "bytes": report.file_bytes, "checkpoint_bytes": report.checkpoint_bytes,
                            "mean_rank": sum(ranks_used) / len(ranks_used) if ranks_used else None}
                if choice:
                    model = with_lora(base, path)
                else:  # diffusers has no LyCORIS full loader: the project's apply
                    model = copy.deepcopy(base)
                    apply_erasure(model, read_erasure(path), 1.0)
                rows.append({**file_row, **evaluate(model)})
                print(json.dumps(rows[-1]), flush=True)
                if choice == {"rank": args.strength_rank}:
                    at_one = {k: rows[-1][k] for k in ("forget_acc", "retain_acc", "fid")}
                    for s in strengths:  # strength 1 is the row above
                        rows.append({"method": name, "file": label, "strength": s,
                                     **(at_one if s == 1 else evaluate(with_lora(base, path, s)))})
                        print(json.dumps(rows[-1]), flush=True)
    command = f"python benchmarks/lora_minisd.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    write_results(args.out, tables(args, command, rows, time.perf_counter() - start), rows)
    return 0


def tables(args, command: str, rows: list[dict], seconds: float) -> list[str]:
    pct = lambda v: f"{100 * v:.0f}"  # noqa: E731
    lines = [f"# Erasure as a LoRA on {model_name(args)}", "", f"Command: `{command}`", "",
             f"Concept {args.concept}; erasures: {args.steps} steps, lr {args.lr:g}, batch {args.batch_size} + "
             f"{args.batch_size}, alpha {args.alpha:g} (ESD: 0, {args.esd_ddim_steps} DDIM steps), UCE closed form; "
             f"{args.num_forget} forget / {args.num_retain} retain images; seed {args.seed}. Evaluation: 25 DDIM "
             f"steps, guidance 5, {args.eval_forget} forget-prompt images, {args.eval_retain_seeds} seeds per "
             f"retain prompt, the same seeds for every model. LoRA files are kohya layout at fp16, loaded with "
             f"diffusers' load_lora_weights + fuse_lora; the LyCORIS full file is applied with `concept-erase "
             f"apply`'s code. One seed: a difference of a few images (3 points of forget) is noise. torch "
             f"{torch.__version__}, {torch.get_num_threads()} thread(s), {seconds / 60:.1f} min in all.", ""]
    original = rows[0]
    lines += [f"{model_name(args)} itself: forget {pct(original['forget_acc'])}%, retain {pct(original['retain_acc'])}%.", "",
              "## Rank and energy", "",
              "| method | file | mean rank | energy kept | size (% of the fp16 checkpoint) | forget % | retain % | FID |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows[1:]:
        if "strength" in r:
            continue
        if r["file"] == "full erasure":
            lines.append(f"| {r['method']} | full erasure | | | | {pct(r['forget_acc'])} | {pct(r['retain_acc'])} | "
                         f"{r['fid']:.0f} |")
            continue
        rank = f"{r['mean_rank']:.1f}" if r["mean_rank"] is not None else ""
        size = f"{r['bytes'] / 1e6:.2f} MB ({100 * r['bytes'] / r['checkpoint_bytes']:.1f}%)"
        lines.append(f"| {r['method']} | {r['file']} | {rank} | {100 * r['energy_kept']:.1f}% | {size} | "
                     f"{pct(r['forget_acc'])} | {pct(r['retain_acc'])} | {r['fid']:.0f} |")
    sweep = [r for r in rows if "strength" in r]
    if sweep:
        strengths = sorted({r["strength"] for r in sweep})
        lines += ["", f"## Strength (LoRA rank {args.strength_rank}): forget % / retain %", "",
                  "| method | " + " | ".join(f"{s:g}" for s in strengths) + " |",
                  "| --- | " + " | ".join("---:" for _ in strengths) + " |"]
        for method in dict.fromkeys(r["method"] for r in sweep):
            cells = {r["strength"]: r for r in sweep if r["method"] == method}
            lines.append(f"| {method} | " + " | ".join(
                f"{pct(cells[s]['forget_acc'])} / {pct(cells[s]['retain_acc'])}" for s in strengths) + " |")
    return lines + [""]


if __name__ == "__main__":
    raise SystemExit(main())
