"""The classification benchmark: Original -> every unlearning method, over seeds, as the paper's table.

Protocol (summarised under every table, docs/ALGORITHMS.md 3):
1. Per seed, train the Original on the whole training set, and Retrain from scratch on the retain set, with
   one SGD recipe (`--epochs`, `--lr`).
2. Every other method starts from that seed's Original and runs `--unlearn-epochs` epochs at each rate of
   `--lr-grid` (the same grid and epochs for all: no method gets a budget the others do not). The rate kept
   is the one with the lowest validation score
       |forget accuracy - target| + (100 - validation accuracy)
   where the target is 0 for class forgetting (an unseen class is never predicted) and the model's own
   validation accuracy for random forgetting (unseen training images should look like held-out ones). It uses
   no test data and no Retrain model.
3. The kept run is scored on UA, RA, TA, MIA-Efficacy (metrics.py); RTE is its wall time (SalUn's includes
   computing its mask). Avg. Gap to Retrain: from the means (the paper's) and paired per seed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..io_utils import atomic_dir
from ..runtime import resolve_device
from ..saliency import SaliencyMask
from . import methods as M
from .config import ALL_METHODS, METHOD_NAMES, ClassifyConfig, ForgetSpec
from .data import load_data, split_forget
from .metrics import METRICS, accuracy, evaluate, predict_logits, summarize
from .models import build_model

logger = logging.getLogger(__name__)


def selection_score(model: torch.nn.Module, task: M.UnlearnTask) -> float:
    """The validation criterion of the protocol (module docstring, step 2); lower is better."""
    data, split = task.data, task.split
    val_acc = accuracy(predict_logits(model, data.x_val[split.val_idx]), data.y_val[split.val_idx])
    x_f, y_f = task.forget
    forget_acc = accuracy(predict_logits(model, x_f), y_f)
    target = 0.0 if split.spec.kind == "class" else val_acc
    score = abs(forget_acc - target) + (100.0 - val_acc)
    return score if score == score else float("inf")  # NaN (a diverged run) never wins


def _run_method(key: str, model, task, sgd, gen, cfg: ClassifyConfig, mask: SaliencyMask | None):
    if key == "ft":
        return M.finetune(model, task, sgd, gen)
    if key == "ga":
        return M.gradient_ascent(model, task, sgd, gen)
    if key == "rl":
        return M.random_label(model, task, sgd, gen)
    if key == "l1":
        return M.l1_sparse(model, task, sgd, gen, alpha=cfg.l1_alpha)
    if key == "salun":
        return M.salun(model, task, sgd, gen, mask=mask)
    raise AssertionError(key)


@contextlib.contextmanager
def _torch_threads(n: int):
    """Use `n` CPU threads inside the block (0: leave torch's setting), restored afterwards."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _tune_and_run(key: str, original: torch.nn.Module, task: M.UnlearnTask, cfg: ClassifyConfig,
                  seed: int, mask: SaliencyMask | None, mask_seconds: float) -> dict:
    """One method on one seed: every rate of the grid from the same Original, keep the best on validation."""
    best = None
    for sgd in cfg.unlearn_sgd:
        t0 = time.perf_counter()
        model = _run_method(key, copy.deepcopy(original), task, sgd, torch.Generator().manual_seed(1000 + seed),
                            cfg, mask)
        seconds = time.perf_counter() - t0 + mask_seconds
        score = selection_score(model, task)
        if best is None or score < best[0]:
            best = (score, sgd.lr, seconds, model)
    score, lr, seconds, model = best
    return {"seed": seed, **evaluate(model, task.data, task.split), "RTE": seconds, "lr": lr, "val_score": score}


def run_classification(cfg: ClassifyConfig) -> dict:
    """Run the benchmark; returns the JSON-ready results (config, per-seed rows, summary, table)."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    data = load_data(cfg.dataset)
    split = split_forget(data, cfg.forget_spec)
    task = M.UnlearnTask(data, split)
    model_name = cfg.model if cfg.model != "auto" else ("cnn" if data.name == "digits" else "resnet18")

    def fresh_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(model_name, data.num_classes, data.image_shape[0]).to(device)

    fixed_mask = None
    if cfg.mask is not None:  # read and checked before any training: a bad file fails in a second
        fixed_mask = SaliencyMask.load(cfg.mask, model=fresh_model(0))
    logger.info(f"classify: {data.name} ({len(data.y_train)} train / {len(data.y_val)} val / {len(data.y_test)} test, "
        f"{data.num_classes} classes), forget {cfg.forget_spec}: {len(split.forget_idx)} forget / "
        f"{len(split.retain_idx)} retain; model {model_name}; {cfg.seeds} seed(s); device {device}")

    per_seed: dict[str, list[dict]] = {key: [] for key in (*cfg.method_keys, "original")}
    masks_info = []
    threads = cfg.threads or (1 if model_name == "cnn" and device.type == "cpu" else 0)
    with _torch_threads(threads):
        for seed in range(cfg.seeds):
            t0 = time.perf_counter()
            original = M.train_classifier(fresh_model(seed), data.x_train, data.y_train, cfg.train_sgd,
                                          torch.Generator().manual_seed(seed))
            per_seed["original"].append({"seed": seed, **evaluate(original, data, split),
                                         "RTE": time.perf_counter() - t0})
            step = f"  seed {seed + 1} of {cfg.seeds}:"
            logger.info(f"{step} Original trained ({per_seed['original'][-1]['RTE']:.0f} s)")
            t0 = time.perf_counter()
            retrained = M.train_classifier(fresh_model(seed), *task.retain, cfg.train_sgd,
                                           torch.Generator().manual_seed(seed))
            per_seed["retrain"].append({"seed": seed, **evaluate(retrained, data, split),
                                        "RTE": time.perf_counter() - t0})
            logger.info(f"{step} Retrain done ({per_seed['retrain'][-1]['RTE']:.0f} s)")
            for key in cfg.method_keys:
                if key == "retrain":
                    continue
                mask, mask_seconds = fixed_mask, 0.0
                if key == "salun" and mask is None:
                    t0 = time.perf_counter()
                    mask = M.saliency_mask(original, task, cfg.keep, cfg.batch_size)
                    mask_seconds = time.perf_counter() - t0  # counted in SalUn's RTE
                    masks_info.append({"seed": seed, "kept_fraction": mask.kept_fraction, "seconds": mask_seconds})
                per_seed[key].append(_tune_and_run(key, original, task, cfg, seed, mask, mask_seconds))
                logger.info(f"{step} {METHOD_NAMES[key]} done ({len(cfg.unlearn_sgd)} learning rates, "
                    f"{per_seed[key][-1]['RTE']:.0f} s)")
            logger.info(f"  seed {seed + 1} of {cfg.seeds}: " + "; ".join(
                f"{METHOD_NAMES.get(k, 'Original')} UA {v[-1]['UA']:.1f} TA {v[-1]['TA']:.1f}"
                for k, v in per_seed.items()))
        used_threads = torch.get_num_threads()

    results = {
        "config": asdict(cfg),
        "model": model_name,
        "dataset": {"name": data.name, "num_classes": data.num_classes, "train": len(data.y_train),
                    "val": len(data.y_val), "test": len(data.y_test), "forget": len(split.forget_idx),
                    "retain": len(split.retain_idx), "test_scored": len(split.test_idx)},
        "per_seed": per_seed,
        "summary": summarize(per_seed),
        "masks": masks_info,
        "environment": {"torch": torch.__version__, "threads": used_threads, "device": str(device),
                        "python": platform.python_version()},
        "total_seconds": time.perf_counter() - start,
    }
    results["table"] = format_table(results)
    return results


def _cell(stat: dict, with_gap: bool) -> str:
    text = f"{stat['mean']:.2f} ± {stat['std']:.2f}"
    return f"{text} ({stat['gap']:.2f})" if with_gap and "gap" in stat else text


def format_table(results: dict) -> str:
    """The paper-style Markdown table: Retrain first, gaps to Retrain's means in parentheses, mean ± std."""
    cfg, summary = results["config"], results["summary"]
    lines = [
        f"Classification unlearning: {results['dataset']['name']}, forget {ForgetSpec.parse(cfg['forget'])}, "
        f"model {results['model']}, {cfg['seeds']} seed(s); percent, mean ± std over seeds, "
        f"(gap to Retrain's mean).",
        "",
        "| Method | UA | RA | TA | MIA-Efficacy | Avg. Gap | Avg. Gap (paired) | RTE (s) | lr |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in (*[k for k in ALL_METHODS if k in summary], "original"):
        row = summary[key]
        ref = key == "retrain"
        lrs = sorted({r["lr"] for r in results["per_seed"][key] if "lr" in r})
        cells = [_cell(row[k], not ref) for k in METRICS]
        gap = "-" if ref else f"{row['avg_gap']:.2f}"
        paired = "-" if ref else f"{row['avg_gap_paired']['mean']:.2f} ± {row['avg_gap_paired']['std']:.2f}"
        name = METHOD_NAMES.get(key, "Original (no unlearning)")
        lr = ",".join(f"{v:g}" for v in lrs) if lrs else f"{cfg['lr']:g} (train)"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {gap} | {paired} | {row['RTE']['mean']:.2f} | {lr} |")
    lines += [
        "",
        f"UA = 100 - forget accuracy; RA = retain accuracy; TA = test accuracy"
        f"{' (remaining classes)' if cfg['forget'].startswith('class') else ''}; MIA-Efficacy = forget samples an "
        "SVC (rbf, C=3, gamma=auto) on true-class confidence calls non-members (retain = members, test = "
        "non-members). Avg. Gap = mean |method - Retrain| over UA, RA, TA, MIA: from the means, and paired "
        f"per seed (mean ± std). lr: the rate(s) kept per seed from {cfg['lr_grid']} ({cfg['unlearn_epochs']} "
        "epochs each) by the validation score |forget acc - target| + validation error (target: 0 for a class, "
        f"validation accuracy for random data). Total {results['total_seconds']:.0f} s.",
    ]
    return "\n".join(lines)


def write_results(results: dict, out: str | Path, overwrite: bool = False) -> Path:
    """`results.json` and `results.md` in `out`, written atomically."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "results.md").write_text(results["table"] + "\n")
    return Path(out)
