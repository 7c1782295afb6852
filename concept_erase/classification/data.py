"""Data for classifier unlearning: a dataset as in-memory tensors, and the forget/retain split.

Two sources (docs/ALGORITHMS.md 3):
- `digits`: scikit-learn's bundled 8x8 digits (1,797 images, ships with scikit-learn, works offline). The
  train/val/test split is fixed (stratified, seed 0) so every run and every seed sees the same images.
- Hugging Face `datasets` (the `data` extra): `cifar10`, `cifar100`, `svhn` by name when online, or a local
  folder written by `datasets.Dataset(Dict).save_to_disk` with a `train` and a `test` split. A validation
  split is used if present, otherwise carved from train (fixed, seed 0).

Images are held as float32 tensors (N, C, H, W), standardised per channel with the training statistics;
CIFAR-10 is about 0.7 GB this way, which keeps the training loop a plain tensor index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConceptEraseError
from .config import ForgetSpec

# name -> (hub id, config, image column, label column). Columns are as published on the hub.
HUB_DATASETS: dict[str, tuple[str, str | None, str, str]] = {
    "cifar10": ("uoft-cs/cifar10", None, "img", "label"),
    "cifar100": ("uoft-cs/cifar100", None, "img", "fine_label"),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits", "image", "label"),
}
DATASET_CHOICES = ("digits", *HUB_DATASETS)


@dataclass
class ClassificationData:
    """Train/val/test tensors of one dataset. `x_*`: float32 (N, C, H, W); `y_*`: int64 (N,)."""

    name: str
    num_classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass
class ForgetSplit:
    """Index sets into the training data, plus the evaluation subsets the metrics use.

    For class forgetting, "test" and "val" mean the samples of the remaining classes (the forgotten class is
    not expected to be recognised any more; the paper's TA is on the remaining classes).
    """

    spec: ForgetSpec
    forget_idx: torch.Tensor
    retain_idx: torch.Tensor
    val_idx: torch.Tensor
    test_idx: torch.Tensor


def split_forget(data: ClassificationData, spec: ForgetSpec, seed: int = 0) -> ForgetSplit:
    """Forget/retain indices of the training set; the random subset is drawn with `seed` (fixed by default)."""
    n = len(data.y_train)
    if spec.kind == "class":
        cls = int(spec.value)
        if cls >= data.num_classes:
            raise ConceptEraseError(f"forget class {cls} is out of range for {data.name} ({data.num_classes} classes)")
        forget = data.y_train == cls
        val_idx = torch.nonzero(data.y_val != cls).flatten()
        test_idx = torch.nonzero(data.y_test != cls).flatten()
    else:
        count = int(round(spec.value * n))
        if count < 1 or count >= n:
            raise ConceptEraseError(f"--forget {spec}: selects {count} of {n} training images")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        forget = torch.zeros(n, dtype=torch.bool)
        forget[perm[:count]] = True
        val_idx = torch.arange(len(data.y_val))
        test_idx = torch.arange(len(data.y_test))
    return ForgetSplit(
        spec=spec,
        forget_idx=torch.nonzero(forget).flatten(),
        retain_idx=torch.nonzero(~forget).flatten(),
        val_idx=val_idx,
        test_idx=test_idx,
    )


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Per-channel mean/std of the training images, applied to every split."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def _stratified_split(y: np.ndarray, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, ...]:
    """Indices (train, val, test) with each class split in the same proportions; deterministic."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_val, n_test = int(round(fractions[0] * len(idx))), int(round(fractions[1] * len(idx)))
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def load_digits_data() -> ClassificationData:
    """scikit-learn's digits: 8x8 grey images, 10 classes; a fixed 70/10/20 train/val/test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    tr, va, te = (torch.from_numpy(i) for i in _stratified_split(bunch.target, (0.1, 0.2), seed=0))
    x_tr, x_va, x_te = _standardise(x[tr], x[va], x[te])
    return ClassificationData("digits", 10, x_tr, y[tr], x_va, y[va], x_te, y[te])


def _columns(split, image_col: str | None, label_col: str | None) -> tuple[str, str]:
    """The image and label columns: the given names, or the first Image / ClassLabel feature."""
    from datasets import ClassLabel, Image

    features = split.features
    if image_col is None:
        image_col = next((k for k, f in features.items() if isinstance(f, Image)), None)
        image_col = image_col or next((k for k in ("img", "image") if k in features), None)
    if label_col is None:
        label_col = next((k for k, f in features.items() if isinstance(f, ClassLabel)), None)
        label_col = label_col or next((k for k in ("label", "fine_label", "labels") if k in features), None)
    if image_col not in features or label_col not in features:
        raise ConceptEraseError(f"cannot find image and label columns in dataset columns {list(features)}")
    return image_col, label_col


def _to_tensors(split, image_col: str, label_col: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = [np.asarray(im) for im in split[image_col]]
    x = torch.from_numpy(np.stack(images)).float() / 255.0
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # grey HW or HWC -> NCHW
    return x.contiguous(), torch.tensor(split[label_col], dtype=torch.int64)


def load_hf_data(name_or_path: str, val_fraction: float = 0.1) -> ClassificationData:
    """CIFAR-10/100 or SVHN by name (online), or a local `save_to_disk` folder with train and test splits."""
    if name_or_path not in HUB_DATASETS and not Path(name_or_path).is_dir():
        raise ConceptEraseError(
            f"--dataset {name_or_path!r} is neither one of {', '.join(DATASET_CHOICES)} nor a dataset folder"
        )
    try:
        import datasets
    except ModuleNotFoundError as err:
        raise ConceptEraseError(
            f"--dataset {name_or_path!r} needs the 'datasets' package: pip install 'concept-erase[data]'"
        ) from err

    image_col = label_col = None
    if name_or_path in HUB_DATASETS:
        hub_id, config, image_col, label_col = HUB_DATASETS[name_or_path]
        try:
            splits = datasets.load_dataset(hub_id, config)
        except Exception as err:  # offline, or the hub moved: one line, not a traceback
            raise ConceptEraseError(f"cannot load dataset {name_or_path!r} ({hub_id}) from the hub: {err}") from None
        name = name_or_path
    else:
        path = Path(name_or_path)
        try:
            splits = datasets.load_from_disk(os.fspath(path))
        except Exception as err:
            raise ConceptEraseError(f"cannot read dataset folder {name_or_path!r}: {err}") from None
        name = path.name
    if not isinstance(splits, datasets.DatasetDict) or not {"train", "test"} <= set(splits):
        raise ConceptEraseError(f"dataset {name_or_path!r} needs 'train' and 'test' splits")

    image_col, label_col = _columns(splits["train"], image_col, label_col)
    x_tr, y_tr = _to_tensors(splits["train"], image_col, label_col)
    x_te, y_te = _to_tensors(splits["test"], image_col, label_col)
    val_name = next((k for k in ("validation", "val") if k in splits), None)
    if val_name is not None:
        x_va, y_va = _to_tensors(splits[val_name], image_col, label_col)
    else:
        tr, va, _ = (torch.from_numpy(i) for i in _stratified_split(y_tr.numpy(), (val_fraction, 0.0), seed=0))
        x_tr, y_tr, x_va, y_va = x_tr[tr], y_tr[tr], x_tr[va], y_tr[va]
    feature = splits["train"].features[label_col]
    num_classes = getattr(feature, "num_classes", None) or int(max(y_tr.max(), y_te.max())) + 1
    x_tr, x_va, x_te = _standardise(x_tr, x_va, x_te)
    return ClassificationData(name, int(num_classes), x_tr, y_tr, x_va, y_va, x_te, y_te)


def load_data(name_or_path: str) -> ClassificationData:
    """`digits` (bundled), a hub name from `HUB_DATASETS`, or a local `save_to_disk` folder."""
    if name_or_path == "digits":
        return load_digits_data()
    return load_hf_data(name_or_path)
