"""`concept-erase attack` and `concept-erase audit`.

    concept-erase attack --model ERASED --concept C --attack unlearndiffatk [--attack ...] --out DIR
    concept-erase attack --model OTHER --concept C --replay DIR --out DIR2      # transfer: no optimisation
    concept-erase audit ERASED --base BASE --concept C --out DIR [--update-card]

Each attack's budget has one flag per setting (`--unlearndiffatk-steps 40`, ...; the dataclasses in
`budgets.py`); `--tiny-budget` is the CI budget (every attack runs end to end in seconds, measures nothing).
The protocol and the base model default from the model's card, as `evaluate` does. Heavy imports happen
in the handlers.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from concept_erase.cli_args import add_hidden_alias
from concept_erase.errors import ConceptEraseError

from ..thresholds import ATTACK_THRESHOLD
from . import ATTACK_NAMES


def _add_common(p: argparse.ArgumentParser) -> None:
    from ..generation import PRESETS
    from .budgets import BUDGETS

    p.add_argument("--config", default=None, help="local diffusers folder with the configs of a single-file model")
    p.add_argument("--concept", required=True,
                   help="preset concept with a detector: nudity (NudeNet), imagenette-<class> (ImageNet classifier), "
                        "minisd-digit-<d> / minisd-style-<s> (MiniSD's judges)")
    p.add_argument("--output", dest="out", default=None, help="output folder (must not exist unless --overwrite)")
    add_hidden_alias(p, "--out", "out")  # the old spelling, for one release
    p.add_argument("--seeds", default="0-4", help="seeds of every concept prompt, e.g. 0-4 (default 0-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' own random draws (default 0)")
    p.add_argument("--protocol", default=None, choices=sorted(PRESETS),
                   help="generation preset (default: the model's, e.g. minisd for an erased MiniSD)")
    p.add_argument("--num-inference-steps", dest="steps", type=int, default=None,
                   help="override the preset's denoising steps")
    p.add_argument("--guidance-scale", dest="guidance", type=float, default=None,
                   help="override the preset's guidance scale")
    add_hidden_alias(p, "--steps", "steps", {"type": int})
    add_hidden_alias(p, "--guidance", "guidance", {"type": float})
    p.add_argument("--classifier", default=None,
                   help="ImageNet classifier folder for imagenette-* concepts (default microsoft/resnet-50)")
    p.add_argument("--nudenet-threshold", type=float, default=None,
                   help=f"NudeNet score above which an exposed class counts (default {ATTACK_THRESHOLD}, UnlearnDiffAtk's)")
    p.add_argument("--tiny-budget", action="store_true",
                   help="the CI budget: a few steps per attack, to check the pipeline end to end (not a measurement)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    for attack, cls in BUDGETS.items():
        g = p.add_argument_group(f"{attack} budget")
        for f in fields(cls):
            kwargs = {"default": None, "help": f"{f.metadata.get('help', '')} (default: {f.default})"}
            kwargs["type"] = {"int": int, "float": float}.get(str(f.type), str)
            kwargs["metavar"] = f.name.upper()
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            assert f.default is not MISSING
            g.add_argument(f"--{attack}-{f.name.replace('_', '-')}", dest=f"{attack}__{f.name}", **kwargs)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attack", help="attack an erased model: does the concept come back? (Pre-ASR / ASR)",
        description="Run adversarial attacks (concept inversion, UnlearnDiffAtk, Ring-A-Bell, the conditioning "
                    "upper bound) on an erased model and report Pre-ASR and ASR the UnlearnDiffAtk way; saves what "
                    "each attack learned so --replay can run it on another model.")
    p.add_argument("--model", required=True, help='the attacked model: folder, file, hub id or "minisd"')
    p.add_argument("--base", default=None,
                   help="the original model (target images of UnlearnDiffAtk and the upper bound, inversion's images); "
                        "default: the model card's base_model")
    p.add_argument("--attack", action="append", choices=ATTACK_NAMES, default=None,
                   help="an attack to run (repeat the flag for several)")
    p.add_argument("--replay", default=None, metavar="DIR",
                   help="replay the attacks saved in an earlier attack output folder instead of optimising")
    p.add_argument("--prompts", default=None,
                   help="attacked prompt set (I2P / class CSV with seeds, or .txt); default: the concept's forget "
                        "prompts x --seeds")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of --prompts")
    p.add_argument("--images", default=None,
                   help="folder of concept images for concept inversion (default: drawn by --base)")
    _add_common(p)
    p.set_defaults(func=_attack_main)

    a = subparsers.add_parser(
        "audit", help="one report on an erased model: forget rate, attacks, collateral, retain, quality, cost",
        description="Benign forget rate, ASR of each attack, collateral damage on the preset's neighbouring "
                    "concepts, retain accuracy, quality and the erasure's time/memory, in Markdown and "
                    "self-contained HTML with charts and same-seed grids.")
    a.add_argument("model", help="the erased model folder")
    a.add_argument("--base", required=True, help="the original model")
    a.add_argument("--attack", action="append", choices=ATTACK_NAMES, default=None,
                   help="attacks to run (default: all four)")
    a.add_argument("--retain-prompts", type=int, default=9, help="retain prompts drawn (spread over the list; default 9)")
    a.add_argument("--clip-model", default=None, help="local CLIP folder for the CLIP score")
    a.add_argument("--fid-weights", default=None, help="torch-fidelity Inception weights file for FID")
    a.add_argument("--update-card", action="store_true",
                   help="record the headline figures in the model's card (evaluation.audit)")
    _add_common(a)
    a.set_defaults(func=_audit_main)


def budgets_from_args(args: argparse.Namespace, attacks) -> dict:
    """name -> budget: the defaults (or the tiny CI budget), then the user's --<attack>-<setting> flags."""

    from .budgets import TINY, make_budget

    unused = [k for k, v in vars(args).items() if "__" in k and v is not None and k.split("__")[0] not in attacks]
    if unused:
        attack, setting = unused[0].split("__")
        raise ConceptEraseError(f"--{attack}-{setting.replace('_', '-')} is set but attack {attack!r} is not run")
    out = {}
    for name in attacks:
        values = dict(TINY[name]) if args.tiny_budget else {}
        values |= {k.split("__", 1)[1]: v for k, v in vars(args).items()
                   if k.startswith(f"{name}__") and v is not None}
        out[name] = make_budget(name, **values)
    return out


def _prepare(args: argparse.Namespace, base_source: str | None):
    """Checks that need no model (concept, detector, budgets, output), then the protocol and the models."""
    from concept_erase.concepts import get_concept
    from concept_erase.diffusion.defaults import announce, model_defaults
    from concept_erase.diffusion.generate import parse_seeds
    from concept_erase.diffusion.loading import load_pipeline
    from concept_erase.io_utils import check_output_free

    from ..generation import make_protocol
    from .detectors import ATTACK_NUDENET_THRESHOLD, detector_for

    if not args.out:
        raise ConceptEraseError("--output is required")
    check_output_free(args.out, args.overwrite)
    concept = get_concept(args.concept)
    detector = detector_for(concept.name, classifier=args.classifier,
                            threshold=args.nudenet_threshold or ATTACK_NUDENET_THRESHOLD)
    seeds = parse_seeds(args.seeds)
    defaults = model_defaults(args.model, args.config)
    protocol = make_protocol(args.protocol or defaults.protocol, num_inference_steps=args.steps,
                             guidance_scale=args.guidance)
    if base_source is None and defaults.base_model != str(args.model):
        base_source = defaults.base_model
        announce(f"--base {base_source} (the model card's base_model)")
    device = args.device or "auto"
    pipe = load_pipeline(args.model, config=args.config, device=device)
    base = load_pipeline(base_source, device=device) if base_source else None
    return concept, detector, seeds, protocol, pipe, base


def _attack_main(args: argparse.Namespace) -> int:
    from concept_erase.io_utils import atomic_dir

    from ..prompts import read_prompts
    from .run import concept_rows, load_replay, run_attacks, write_attack_outputs

    if not args.attack and not args.replay:
        raise ConceptEraseError("name an --attack (inversion, unlearndiffatk, ringabell, embedding) or --replay DIR")
    budgets = budgets_from_args(args, args.attack or [])
    replay = load_replay(args.replay) if args.replay else None
    concept, detector, seeds, protocol, pipe, base = _prepare(args, args.base)
    if replay:
        rows = next(iter(replay.values())).rows
    elif args.prompts:
        rows = read_prompts(args.prompts, limit=args.limit)[1]
    else:
        rows = concept_rows(concept, seeds)
    run = run_attacks(pipe, concept, rows, budgets, detector, protocol=protocol, base=base, images=args.images,
                      seed=args.seed, replay=replay)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        write_attack_outputs(run, tmp, f"Attacks on {concept.name}: {args.model}")
    print(f"report: {args.out}/report.md (replay with --replay {args.out})")
    return 0


def _audit_main(args: argparse.Namespace) -> int:
    from concept_erase.io_utils import atomic_dir

    from .audit import check_audit_inputs, headline, run_audit, write_audit

    budgets = budgets_from_args(args, args.attack or ATTACK_NAMES)
    if args.update_card:
        from concept_erase.diffusion.card import read_model_card

        read_model_card(args.model)  # a model folder with a card, or a one-line error before hours of work
    concept, detector, seeds, protocol, pipe, base = _prepare(args, args.base)
    check_audit_inputs(concept, budgets)
    results, images = run_audit(pipe, base, concept, detector, budgets=budgets, seeds=seeds, protocol=protocol,
                                model=str(args.model), classifier=args.classifier, retain_prompts=args.retain_prompts,
                                clip_model=args.clip_model, fid_weights=args.fid_weights, seed=args.seed)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        write_audit(results, images, tmp)
    top = headline(results)
    print(f"audit: forget rate {top['forget_rate']:.1f}%, ASR " +
          ", ".join(f"{k} {v:.1f}%" for k, v in top["asr"].items()) + f"; report: {args.out}/report.html")
    if args.update_card:
        from concept_erase.diffusion.card import add_evaluation_to_card

        add_evaluation_to_card(args.model, "audit", top)
        print(f"model card updated: {args.model}/README.md")
    return 0
