"""Unlearning metrics, in percent (docs/ALGORITHMS.md 3; SalUn paper, section 5 and Table 3).

- UA  = 100 - accuracy on the forget set (higher = more forgotten; Retrain's value is the target).
- RA  = accuracy on the retain set.
- TA  = accuracy on the test set (for class forgetting: the test images of the remaining classes).
- MIA-Efficacy: an SVC (rbf, C=3, gamma="auto", as in the reference code) is trained on one feature, the
  softmax confidence of the true class, with retain samples as members (1) and test samples as non-members
  (0), the retain side cut to the test set's size; the score is the fraction of forget samples it predicts
  as non-members. Caveat measured on digits: with one feature the SVC mostly flags low-confidence samples.
- Avg. Gap = mean over (UA, RA, TA, MIA) of |method - Retrain|: from the means over seeds (the paper's) and
  paired per seed (mean of per-seed gaps), which a method cannot win by averaging overshoots with no-ops.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data import ClassificationData, ForgetSplit

METRICS = ("UA", "RA", "TA", "MIA")  # the metrics the Avg. Gap averages over


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits in eval mode, on the model's device, returned on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Percent of rows whose arg-max is the label (0 for no rows)."""
    return 100.0 * (logits.argmax(1) == y).float().mean().item() if len(y) else 0.0


def true_class_confidence(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the true class: the MIA feature (0 where a diverged model gives NaN)."""
    return torch.nan_to_num(logits.softmax(1).gather(1, y[:, None]).squeeze(1), nan=0.0)


def mia_efficacy(member: np.ndarray, non_member: np.ndarray, target: np.ndarray) -> float:
    """Percent of `target` samples an SVC trained on member (1) vs non-member (0) features calls non-member."""
    from sklearn.svm import SVC

    member = np.asarray(member, dtype=np.float64).reshape(len(member), -1)
    non_member = np.asarray(non_member, dtype=np.float64).reshape(len(non_member), -1)
    target = np.asarray(target, dtype=np.float64).reshape(len(target), -1)
    x = np.concatenate([member, non_member])
    y = np.concatenate([np.ones(len(member)), np.zeros(len(non_member))])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return 100.0 * float(1.0 - clf.predict(target).mean())


def evaluate(model: nn.Module, data: ClassificationData, split: ForgetSplit) -> dict[str, float]:
    """UA, RA, TA and MIA-Efficacy of `model`, in percent."""
    x, y = data.x_train, data.y_train
    forget_logits = predict_logits(model, x[split.forget_idx])
    retain_logits = predict_logits(model, x[split.retain_idx])
    test_x, test_y = data.x_test[split.test_idx], data.y_test[split.test_idx]
    test_logits = predict_logits(model, test_x)
    y_f, y_r = y[split.forget_idx], y[split.retain_idx]

    # Members = retain samples, cut to the test set's size with a fixed draw (the reference uses a subset of
    # the retain set as large as the test set, so the two SVC classes are balanced).
    n = min(len(y_r), len(test_y))
    pick = torch.randperm(len(y_r), generator=torch.Generator().manual_seed(0))[:n]
    mia = mia_efficacy(
        true_class_confidence(retain_logits[pick], y_r[pick]).numpy(),
        true_class_confidence(test_logits, test_y).numpy(),
        true_class_confidence(forget_logits, y_f).numpy(),
    )
    return {
        "UA": 100.0 - accuracy(forget_logits, y_f),
        "RA": accuracy(retain_logits, y_r),
        "TA": accuracy(test_logits, test_y),
        "MIA": mia,
    }


def avg_gap(metrics: dict[str, float], reference: dict[str, float]) -> float:
    """Mean over UA, RA, TA, MIA of |metrics - reference| (percentage points)."""
    return sum(abs(metrics[k] - reference[k]) for k in METRICS) / len(METRICS)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarize(per_seed: dict[str, list[dict[str, float]]], reference: str = "retrain") -> dict[str, dict]:
    """Mean/std per metric and method, gaps to the reference method's means, and both Avg. Gaps.

    `per_seed[method][i]` holds seed i's metrics (UA, RA, TA, MIA, RTE); every method has the same seeds.
    """
    ref_runs = per_seed[reference]
    ref_mean = {k: mean_std([r[k] for r in ref_runs])[0] for k in METRICS}
    out = {}
    for method, runs in per_seed.items():
        if len(runs) != len(ref_runs):
            raise ValueError(f"{method} has {len(runs)} seeds, {reference} has {len(ref_runs)}")
        row: dict[str, object] = {}
        for k in (*METRICS, "RTE"):
            mean, std = mean_std([r[k] for r in runs])
            row[k] = {"mean": mean, "std": std}
            if k in METRICS:
                row[k]["gap"] = abs(mean - ref_mean[k])
        row["avg_gap"] = avg_gap({k: row[k]["mean"] for k in METRICS}, ref_mean)
        paired = [avg_gap(run, ref) for run, ref in zip(runs, ref_runs)]
        mean, std = mean_std(paired)
        row["avg_gap_paired"] = {"mean": mean, "std": std, "per_seed": paired}
        out[method] = row
    return out

