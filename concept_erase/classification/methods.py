"""Unlearning methods for classifiers (docs/ALGORITHMS.md 3), each a short loop over the same SGD step.

- Retrain: train from scratch on the retain set, with the Original's recipe (the gold standard).
- FT: fine-tune the Original on the retain set only (catastrophic forgetting of the forget set).
- GA: gradient ascent on the forget set (maximise its cross-entropy).
- RL: random labelling: the forget samples get labels drawn uniformly from the OTHER classes, mixed with the
  retain set, ordinary cross-entropy training.
- l1-sparse: FT plus an l1 penalty whose weight decays linearly to 0 over the epochs (Jia et al. 2023,
  "Model sparsity can simplify machine unlearning", as in their reference code).
- SalUn: RL restricted to the salient weights: the mask is the top `keep` fraction of |sum of forget-set
  cross-entropy gradients| at the Original (SalUn eq. 5-6, docs/ALGORITHMS.md 1), and the masked optimizer steps only
  those, so every other weight stays bit-identical through SGD's momentum and weight decay.

Every method that starts from the Original gets the same number of epochs and the same learning-rate grid;
`runner.py` picks each method's rate on the validation split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..saliency import SaliencyMask, build_optimizer
from .config import SGDConfig
from .data import ClassificationData, ForgetSplit


def cross_entropy_loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The classification forget loss for the saliency mask (docs/ALGORITHMS.md 1): mean CE over a batch."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def iterate_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int,
                    generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches in a shuffled order (`generator`) or in order (None)."""
    order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def random_other_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A label drawn uniformly from the classes other than the true one, per sample."""
    shift = torch.randint(1, num_classes, y.shape, generator=generator)
    return (y + shift) % num_classes


# A method's per-epoch data: (epoch) -> list of (x, y, sign) batches; sign -1 means gradient ascent.
EpochBatches = Callable[[int], list[tuple[torch.Tensor, torch.Tensor, float]]]


def sgd_train(model: nn.Module, epoch_batches: EpochBatches, cfg: SGDConfig, *, mask: SaliencyMask | None = None,
              penalty: Callable[[nn.Module, int], torch.Tensor] | None = None) -> nn.Module:
    """The one training loop: SGD with momentum and weight decay, cosine learning rate, optional mask/penalty."""
    device = next(model.parameters()).device
    model.train()
    optimizer = build_optimizer(model, mask, "sgd", lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    batches = [epoch_batches(e) for e in range(cfg.epochs)]  # drawn up front: the step count fixes the schedule
    total = sum(len(b) for b in batches)
    step = 0
    try:
        for epoch, epoch_list in enumerate(batches):
            for x, y, sign in epoch_list:
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = sign * F.cross_entropy(model(x.to(device)), y.to(device))
                if penalty is not None:
                    loss = loss + penalty(model, epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    finally:
        if mask is not None:  # build_optimizer froze the parameters with no salient entry
            model.requires_grad_(True)
    model.eval()
    return model


def _epochs_over(x: torch.Tensor, y: torch.Tensor, cfg: SGDConfig, generator: torch.Generator,
                 sign: float = 1.0) -> EpochBatches:
    return lambda epoch: [(bx, by, sign) for bx, by in iterate_batches(x, y, cfg.batch_size, generator)]


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SGDConfig,
                     generator: torch.Generator) -> nn.Module:
    """Ordinary training (the Original on all training data, Retrain on the retain set, FT)."""
    return sgd_train(model, _epochs_over(x, y, cfg, generator), cfg)


@dataclass
class UnlearnTask:
    """What every method sees: the Original's training data split into forget and retain."""

    data: ClassificationData
    split: ForgetSplit

    @property
    def forget(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.x_train[self.split.forget_idx], self.data.y_train[self.split.forget_idx]

    @property
    def retain(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.x_train[self.split.retain_idx], self.data.y_train[self.split.retain_idx]


def finetune(model: nn.Module, task: UnlearnTask, cfg: SGDConfig, generator: torch.Generator) -> nn.Module:
    return train_classifier(model, *task.retain, cfg, generator)


def gradient_ascent(model: nn.Module, task: UnlearnTask, cfg: SGDConfig, generator: torch.Generator) -> nn.Module:
    return sgd_train(model, _epochs_over(*task.forget, cfg, generator, sign=-1.0), cfg)


def random_label(model: nn.Module, task: UnlearnTask, cfg: SGDConfig, generator: torch.Generator,
                 mask: SaliencyMask | None = None) -> nn.Module:
    """RL: forget samples relabelled (fresh labels every epoch) and shuffled in with the retain set."""
    x_f, y_f = task.forget
    x_r, y_r = task.retain
    x = torch.cat([x_f, x_r])

    def epoch_batches(epoch: int):
        y = torch.cat([random_other_labels(y_f, task.data.num_classes, generator), y_r])
        return [(bx, by, 1.0) for bx, by in iterate_batches(x, y, cfg.batch_size, generator)]

    return sgd_train(model, epoch_batches, cfg, mask=mask)


def l1_sparse(model: nn.Module, task: UnlearnTask, cfg: SGDConfig, generator: torch.Generator,
              alpha: float = 5e-4) -> nn.Module:
    """FT + alpha_t * ||theta||_1 with alpha_t = alpha * (1 - epoch / epochs)."""

    def penalty(m: nn.Module, epoch: int) -> torch.Tensor:
        weight = alpha * (1 - epoch / cfg.epochs)
        return weight * sum(p.abs().sum() for p in m.parameters())

    return sgd_train(model, _epochs_over(*task.retain, cfg, generator), cfg, penalty=penalty)


def saliency_mask(model: nn.Module, task: UnlearnTask, keep: float, batch_size: int) -> SaliencyMask:
    """SalUn's mask at the Original: one pass over the forget set, cross-entropy, global top-`keep`."""
    device = next(model.parameters()).device
    x_f, y_f = task.forget
    batches = [(bx.to(device), by.to(device)) for bx, by in iterate_batches(x_f, y_f, batch_size)]
    return SaliencyMask.compute(model, batches, cross_entropy_loss_fn, keep=keep,
                                concept=f"{task.data.name} {task.split.spec}")


def salun(model: nn.Module, task: UnlearnTask, cfg: SGDConfig, generator: torch.Generator,
          mask: SaliencyMask) -> nn.Module:
    return random_label(model, task, cfg, generator, mask=mask)
