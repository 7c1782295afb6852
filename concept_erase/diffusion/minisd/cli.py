"""`concept-erase minisd ...`: (re)train MiniSD or its judges, and check MiniSD's quality bar.

    concept-erase minisd train --out DIR          # the pipeline (about 12 min on 2 cores)
    concept-erase minisd train-judges --out FILE  # digit + style judges (about a minute)
    concept-erase minisd check                    # judged digit / style accuracy of MiniSD's images
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields


def register(subparsers) -> None:
    p = subparsers.add_parser("minisd", help="MiniSD: train it, train its judges, check its quality",
                              description="The embedded MiniSD model (docs/MINISD.md).")
    sub = p.add_subparsers(dest="minisd_command", metavar="ACTION", required=True)

    from .train import MiniSDTrainConfig

    t = sub.add_parser("train", help="train MiniSD from scratch (deterministic) into a diffusers folder")
    t.add_argument("--out", required=True, help="output diffusers folder (must not exist unless --overwrite)")
    for f in fields(MiniSDTrainConfig):
        t.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f"{f.metadata['help']} (default {f.default})")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    t.set_defaults(func=_train)

    j = sub.add_parser("train-judges", help="train the digit and style judges on the real digits")
    j.add_argument("--out", required=True, help="output .safetensors file (must not exist unless --overwrite)")
    j.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    j.add_argument("--epochs", type=int, default=12, help="epochs per judge (default 12)")
    j.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    j.set_defaults(func=_train_judges)

    c = sub.add_parser("check", help="judge MiniSD's images: requested digit and style accuracy")
    c.add_argument("--model", default="minisd", help='"minisd" (default) or a diffusers folder of a MiniSD model')
    c.add_argument("--seeds", type=int, default=10, help="images per (digit, style) prompt (default 10)")
    c.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    c.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    c.set_defaults(func=_check)


def _train(args: argparse.Namespace) -> int:
    from ...io_utils import check_writable
    from .train import MiniSDTrainConfig, main

    check_writable(args.out, args.overwrite, flag="--out")
    config = MiniSDTrainConfig(**{f.name: getattr(args, f.name) for f in fields(MiniSDTrainConfig)})
    main(config, args.out, overwrite=args.overwrite)
    return 0


def _train_judges(args: argparse.Namespace) -> int:
    from ...errors import ConceptEraseError
    from ...io_utils import check_writable
    from .judge import save_judges, train_judges

    check_writable(args.out, args.overwrite, kind="file", suffix=".safetensors", flag="--out")
    if args.epochs < 1:
        raise ConceptEraseError(f"--epochs must be >= 1, got {args.epochs}")
    judges = train_judges(seed=args.seed, epochs=args.epochs)
    save_judges(judges, args.out, overwrite=args.overwrite)
    print(json.dumps(judges.info, indent=2))
    return 0


def _check(args: argparse.Namespace) -> int:
    from ...errors import ConceptEraseError
    from ..loading import load_pipeline
    from .judge import load_judges, score_pipeline

    if args.seeds < 1 or args.steps < 1:
        raise ConceptEraseError(f"--seeds and --steps must be >= 1, got {args.seeds}, {args.steps}")
    pipe = load_pipeline(args.model)
    scores = score_pipeline(pipe, load_judges(), seeds=range(args.seeds), num_inference_steps=args.steps,
                            guidance_scale=args.guidance)
    print(json.dumps(scores, indent=2))
    return 0
