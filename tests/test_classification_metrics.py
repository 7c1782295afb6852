"""Classification metrics on constructed inputs (docs/ALGORITHMS.md 3): exact values where they are hand-computable."""

import numpy as np
import pytest
import torch

from concept_erase.classification.metrics import (
    accuracy,
    avg_gap,
    mean_std,
    mia_efficacy,
    summarize,
    true_class_confidence,
)


def test_accuracy_and_true_class_confidence():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 1])
    assert accuracy(logits, y) == pytest.approx(50.0)  # rows 0, 1 right; 2 wrong; 3 a tie -> argmax 0, wrong
    conf = true_class_confidence(logits, y)
    e = np.exp(2.0) / (np.exp(2.0) + 1)
    assert conf.tolist() == pytest.approx([e, e, 1 - e, 0.5])
    # a diverged model (NaN logits) gives confidence 0, never NaN, so the SVC still runs
    assert true_class_confidence(torch.full((2, 3), float("nan")), torch.tensor([0, 2])).tolist() == [0.0, 0.0]


def test_mia_separable_distributions():
    """Members confident, non-members not: forget samples that look like non-members score 100, like
    members score 0."""
    rng = np.random.default_rng(0)
    member = rng.uniform(0.95, 1.0, 200)
    non_member = rng.uniform(0.0, 0.4, 200)
    assert mia_efficacy(member, non_member, rng.uniform(0.0, 0.4, 50)) == pytest.approx(100.0)
    assert mia_efficacy(member, non_member, rng.uniform(0.95, 1.0, 50)) == pytest.approx(0.0)


def test_mia_identical_distributions_has_no_signal():
    """Members and non-members drawn alike: the attack is a coin flip, so efficacy stays near 50."""
    rng = np.random.default_rng(1)
    member, non_member, target = rng.uniform(0, 1, 1000), rng.uniform(0, 1, 1000), rng.uniform(0, 1, 1000)
    assert 30.0 < mia_efficacy(member, non_member, target) < 70.0


def test_avg_gap_is_mean_absolute_difference():
    ref = {"UA": 10.0, "RA": 100.0, "TA": 90.0, "MIA": 20.0}
    assert avg_gap({"UA": 14.0, "RA": 98.0, "TA": 90.0, "MIA": 18.0}, ref) == pytest.approx((4 + 2 + 0 + 2) / 4)


def test_mean_std_sample_std():
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, np.sqrt(2.0)))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_paired_gap_exposes_overshoot_that_the_mean_gap_hides():
    """A method that overshoots on one seed and does nothing on the other averages onto Retrain: its gap
    from the means is 0, its paired gap is not."""
    retrain = [{"UA": 50.0, "RA": 100.0, "TA": 90.0, "MIA": 50.0, "RTE": 10.0}] * 2
    erratic = [
        {"UA": 100.0, "RA": 100.0, "TA": 90.0, "MIA": 100.0, "RTE": 1.0},
        {"UA": 0.0, "RA": 100.0, "TA": 90.0, "MIA": 0.0, "RTE": 1.0},
    ]
    out = summarize({"retrain": retrain, "erratic": erratic})
    assert out["erratic"]["avg_gap"] == pytest.approx(0.0)
    assert out["erratic"]["avg_gap_paired"]["mean"] == pytest.approx(25.0)
    assert out["erratic"]["avg_gap_paired"]["per_seed"] == pytest.approx([25.0, 25.0])
    assert out["erratic"]["UA"] == {"mean": 50.0, "std": pytest.approx(np.sqrt(5000.0)), "gap": 0.0}
    assert out["retrain"]["avg_gap"] == 0.0 and out["erratic"]["RTE"]["mean"] == 1.0
