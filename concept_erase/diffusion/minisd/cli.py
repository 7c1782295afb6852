"""`concept-erase minisd ...`: (re)train MiniSD or its judges, and check MiniSD's quality bar.

    concept-erase minisd train --output DIR          # the pipeline (about 12 min on 2 cores)
    concept-erase minisd train-judges --output FILE  # digit + style judges (about a minute)
    concept-erase minisd check                       # judged digit / style accuracy of MiniSD's images
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from ...cli_args import add_flags, check_fields, values_from
from . import MINISD_GUIDANCE, MINISD_STEPS
from .config import MiniSDTrainConfig


@dataclass
class Output:
    output: str = field(metadata={"help": "the folder or file to write (must not exist unless --overwrite)",
                                  "aliases": ("--out",)})
    overwrite: bool = field(default=False, metadata={"help": "replace --output if it exists"})


@dataclass
class JudgeTraining:
    seed: int = field(default=0, metadata={"help": "seed", "seed": True})
    epochs: int = field(default=12, metadata={"help": "epochs per judge", "min": 1})

    def __post_init__(self):
        check_fields(self)


@dataclass
class Check:
    model: str = field(default="minisd", metadata={"help": '"minisd" or a diffusers folder of a MiniSD model'})
    seeds: int = field(default=10, metadata={"help": "images per (digit, style) prompt (seeds 0..N-1)", "min": 1,
                                             "flag": "num-seeds", "aliases": ("--seeds",)})
    num_inference_steps: int = field(default=MINISD_STEPS, metadata={
        "help": "DDIM steps", "min": 1, "aliases": ("--steps",)})
    guidance_scale: float = field(default=MINISD_GUIDANCE, metadata={
        "help": "classifier-free guidance scale", "min": 0, "aliases": ("--guidance",)})

    def __post_init__(self):
        check_fields(self)


def register(subparsers) -> None:
    p = subparsers.add_parser("minisd", help="MiniSD: train it, train its judges, check its quality",
                              description="The embedded MiniSD model (docs/MINISD.md).")
    sub = p.add_subparsers(dest="minisd_command", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train MiniSD from scratch (deterministic) into a diffusers folder")
    add_flags(t, Output, help_override={"output": "output diffusers folder (must not exist unless --overwrite)"})
    add_flags(t, MiniSDTrainConfig)
    t.set_defaults(func=_train)

    j = sub.add_parser("train-judges", help="train the digit and style judges on the real digits")
    add_flags(j, Output, help_override={"output": "output .safetensors file (must not exist unless --overwrite)"})
    add_flags(j, JudgeTraining)
    j.set_defaults(func=_train_judges)

    c = sub.add_parser("check", help="judge MiniSD's images: requested digit and style accuracy")
    add_flags(c, Check)
    c.set_defaults(func=_check)


def _train(args: argparse.Namespace) -> int:
    from ...io_utils import check_writable

    out = Output(**values_from(args, Output))
    config = MiniSDTrainConfig(**values_from(args, MiniSDTrainConfig))
    check_writable(out.output, out.overwrite, flag="--output")
    from .train import main  # imports torch: after the checks

    main(config, out.output, overwrite=out.overwrite)
    from ...logs import finish

    finish(args, f"wrote {out.output}", {"output": out.output},
           next_command=f"concept-erase minisd check --model {out.output}")
    return 0


def _train_judges(args: argparse.Namespace) -> int:
    from ...io_utils import check_writable

    out = Output(**values_from(args, Output))
    config = JudgeTraining(**values_from(args, JudgeTraining))
    check_writable(out.output, out.overwrite, kind="file", suffix=".safetensors", flag="--output")
    from .judge import save_judges, train_judges  # imports torch: after the checks

    judges = train_judges(seed=config.seed, epochs=config.epochs)
    save_judges(judges, out.output, overwrite=out.overwrite)
    from ...logs import finish

    finish(args, [json.dumps(judges.info, indent=2), f"wrote {out.output}"], judges.info)
    return 0


def _check(args: argparse.Namespace) -> int:
    from ..models.loading import load_pipeline
    from .judge import load_judges, score_pipeline

    config = Check(**values_from(args, Check))
    pipe = load_pipeline(config.model)
    scores = score_pipeline(pipe, load_judges(), seeds=range(config.seeds),
                            num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale)
    from ...logs import finish

    finish(args, json.dumps(scores, indent=2), scores)
    return 0
