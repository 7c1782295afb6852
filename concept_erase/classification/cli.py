"""`concept-erase classify`: the classification unlearning benchmark (runner.py), as the paper's table."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _default_out(dataset: str, forget: str) -> str:
    from pathlib import Path

    return f"runs/classify-{Path(dataset).name}-{forget.replace(':', '')}"


def register(subparsers) -> None:
    # Import-light: config.py has no torch import; the work happens in `run`.
    from .config import ClassifyConfig

    parser = subparsers.add_parser(
        "classify",
        help="Image-classification unlearning benchmark (Retrain, FT, GA, RL, l1-sparse, SalUn).",
        description="Train an Original classifier per seed, unlearn a class or a random subset with each method "
                    "(learning rate chosen on the validation split), and print UA, RA, TA, MIA-Efficacy, RTE and "
                    "the Avg. Gap to Retrain as the SalUn paper's table; also writes results.json and results.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(ClassifyConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = int if f.type == "int" else float if f.type.startswith("float") else str
        parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    parser.add_argument("--out", default=None,
                        help="Output folder for results.json and results.md "
                             "(default: runs/classify-<dataset>-<forget>); refused if it exists.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io_utils import check_writable
    from .config import ClassifyConfig
    from .runner import run_classification, write_results

    names = [f.name for f in dataclasses.fields(ClassifyConfig)]
    cfg = ClassifyConfig(**{n: getattr(args, n) for n in names})  # validates everything before any work
    out = args.out or _default_out(cfg.dataset, cfg.forget)
    check_writable(out, args.overwrite, flag="--out")
    results = run_classification(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(results["table"])
    write_results(results, out, overwrite=args.overwrite)
    print(f"\nwrote {out}/results.json and {out}/results.md", file=sys.stderr)
    return 0
