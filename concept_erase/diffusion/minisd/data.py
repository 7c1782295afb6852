"""The MiniSD training data: scikit-learn's 1,797 handwritten digits, 16x16, in three styles.

Styles are derived from the digit itself (docs/MINISD.md): plain; bold = 2x2 grey dilation (thicker
strokes); negative = 1 - x. Images are float32 in [0, 1], ink bright on dark for "plain".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import DIGITS, STYLES, minisd_prompt

IMAGE_SIZE = 16


def apply_style(images: torch.Tensor, style: str) -> torch.Tensor:
    """Restyle plain [N, 1, H, W] images in [0, 1]."""
    if style == "plain":
        return images
    if style == "bold":
        # 2x2 max filter keeping the size: pad one pixel right and bottom, then pool with stride 1.
        return F.max_pool2d(F.pad(images, (0, 1, 0, 1)), kernel_size=2, stride=1)
    if style == "negative":
        return 1.0 - images
    raise ValueError(f"unknown style {style!r}")


@dataclass
class DigitImages:
    images: torch.Tensor  # [N, 1, 16, 16] float32 in [0, 1]
    digits: torch.Tensor  # [N] int64, 0-9
    styles: torch.Tensor  # [N] int64, index into STYLES

    def __len__(self) -> int:
        return len(self.digits)

    def prompts(self) -> list[str]:
        return [minisd_prompt(int(d), int(s)) for d, s in zip(self.digits, self.styles)]


def load_digit_images(split: str = "train") -> DigitImages:
    """Every digit in every style. `split`: "train" (80%), "test" (every 5th digit, held out) or "all".

    The split is by source digit, so a held-out digit is held out in all three of its styles."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    index = torch.arange(len(y))
    keep = {"train": index % 5 != 0, "test": index % 5 == 0, "all": index >= 0}[split]
    x, y = x[keep], y[keep]
    x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False).clamp(0, 1)
    images, digits, styles = [], [], []
    for s, style in enumerate(STYLES):
        images.append(apply_style(x, style))
        digits.append(y)
        styles.append(torch.full_like(y, s))
    return DigitImages(torch.cat(images), torch.cat(digits), torch.cat(styles))


__all__ = ["DigitImages", "load_digit_images", "apply_style", "IMAGE_SIZE", "DIGITS", "STYLES"]
