"""`concept-erase classify`: the classification unlearning benchmark (runner.py), as the paper's table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from dataclasses import dataclass, field

from ..cli_args import add_flags, values_from


def _default_out(dataset: str, forget: str) -> str:
    return f"runs/classify-{Path(dataset).name}-{forget.replace(':', '')}"


@dataclass
class ClassifyOutput:
    """Where `classify` writes results.json and results.md."""

    output: str | None = field(default=None, metadata={
        "help": "Output folder for results.json and results.md (default: runs/classify-<dataset>-<forget>); "
                "refused if it exists.", "aliases": ("--out",)})
    overwrite: bool = field(default=False, metadata={"help": "Replace --output if it exists."})


def register(subparsers) -> None:
    # Import-light: config.py has no torch import; the work happens in `run`.
    from .config import ClassifyConfig

    parser = subparsers.add_parser(
        "classify",
        help="Image-classification unlearning benchmark (Retrain, FT, GA, RL, l1-sparse, SalUn).",
        description="Train an Original classifier per seed, unlearn a class or a random subset with each method "
                    "(learning rate chosen on the validation split), and print UA, RA, TA, MIA-Efficacy, RTE and "
                    "the Avg. Gap to Retrain as the SalUn paper's table; also writes results.json and results.md.",
    )
    add_flags(parser, ClassifyConfig)
    add_flags(parser, ClassifyOutput)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io_utils import check_writable
    from .config import ClassifyConfig

    cfg = ClassifyConfig(**values_from(args, ClassifyConfig))  # validates everything before any work
    where = ClassifyOutput(**values_from(args, ClassifyOutput))
    out = where.output or _default_out(cfg.dataset, cfg.forget)
    check_writable(out, where.overwrite, flag="--output")
    from .runner import run_classification, write_results  # torch: only once the input is known to be good

    from ..logs import finish

    results = run_classification(cfg)
    write_results(results, out, overwrite=where.overwrite)
    finish(args, [results["table"], "", f"wrote {out}/: results.md and results.json (the result as JSON)"],
           json.loads((Path(out) / "results.json").read_text()))
    return 0
