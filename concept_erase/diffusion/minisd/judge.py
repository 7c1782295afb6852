"""The MiniSD judges: which digit, and which style, an image shows.

Two small CNNs trained in seconds on the REAL digits (all three styles), so they judge MiniSD's images
against ground truth rather than against MiniSD itself. Held-out accuracy is stored with the weights and
checked by the tests (bar: 97% for digits). The digit judge's penultimate layer doubles as the feature
space for a Frechet distance between image sets: `Judges.fid_features()` is a feature extractor for the same
torchmetrics FID metric that `evaluate quality` uses with Inception (`evaluation.quality.make_fid`).

Weights live in one safetensors file (`digit.*`, `style.*` keys): loading executes no pickled code.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import ConceptEraseError
from ...io_utils import atomic_file
from . import DIGITS, MINISD_GUIDANCE, MINISD_STEPS, STYLES, judges_path, minisd_prompt
from .data import IMAGE_SIZE, load_digit_images


class JudgeNet(nn.Module):
    """16x16 grey image -> class logits; `features` is the 128-d penultimate activation."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),   # 8x8
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),   # 4x4
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_tensor(images) -> torch.Tensor:
    """PIL images, a uint8/float array ([N,H,W] or [N,H,W,C]) or a [N,1,H,W] tensor -> [N,1,16,16] in [0,1]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float()
        if x.ndim == 3:
            x = x.unsqueeze(1)
    else:
        if isinstance(images, np.ndarray):
            arrays = list(images)
        else:
            arrays = [np.asarray(im.convert("L")) if hasattr(im, "convert") else np.asarray(im) for im in images]
        if not arrays:
            raise ConceptEraseError("no images to judge")
        arr = np.stack([a.mean(axis=-1) if a.ndim == 3 else a for a in arrays]).astype(np.float32)
        if arr.max(initial=0) > 1.0:
            arr = arr / 255.0
        x = torch.from_numpy(arr).unsqueeze(1)
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    return x.clamp(0, 1)


@dataclass
class Judges:
    digit: JudgeNet
    style: JudgeNet
    info: dict = field(default_factory=dict)  # held-out accuracies and training settings

    @torch.no_grad()
    def predict_digits(self, images) -> np.ndarray:
        """Digit index 0-9 per image (see `DIGITS`)."""
        return self.digit(to_tensor(images)).argmax(1).numpy()

    @torch.no_grad()
    def predict_styles(self, images) -> np.ndarray:
        """Style index per image (see `STYLES`)."""
        return self.style(to_tensor(images)).argmax(1).numpy()

    def fid_features(self) -> "JudgeFeatures":
        """The digit judge's 128-d features as an FID feature extractor (`evaluation.quality.make_fid`)."""
        return JudgeFeatures(self.digit)


class JudgeFeatures(nn.Module):
    """A judge's penultimate activations for torchmetrics' FID: a uint8 [N, C, H, W] batch (what
    `evaluation.quality.images_to_uint8` gives) -> [N, 128] features."""

    num_features = 128

    def __init__(self, net: JudgeNet):
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return self.net.features(to_tensor(x))


def _train_one(net: JudgeNet, x: torch.Tensor, y: torch.Tensor, epochs: int, gen: torch.Generator,
               shift: bool) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * ((len(x) + 127) // 128))
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            xb = x[idx]
            if shift:
                # Random 1-pixel shifts (pad + crop) so generated digits that sit slightly off-centre are
                # judged by shape, not position. Not for the style judge: "bold" is a one-pixel dilation,
                # and shifted plain digits taught it to confuse the two (92.7% vs 100% held out).
                dx, dy = torch.randint(3, (2,), generator=gen).tolist()
                xb = F.pad(xb, (1, 1, 1, 1))[:, :, dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE]
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()


@torch.no_grad()
def _accuracy(net: JudgeNet, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(1) == y).float().mean())


def train_judges(seed: int = 0, epochs: int = 12) -> Judges:
    """Train both judges on the real training digits; report accuracy on the held-out digits."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    train, test = load_digit_images("train"), load_digit_images("test")
    digit, style = JudgeNet(len(DIGITS)), JudgeNet(len(STYLES))
    _train_one(digit, train.images, train.digits, epochs, gen, shift=True)
    _train_one(style, train.images, train.styles, epochs, gen, shift=False)
    info = {
        "digit_test_accuracy": round(_accuracy(digit, test.images, test.digits), 4),
        "style_test_accuracy": round(_accuracy(style, test.images, test.styles), 4),
        "test_images": len(test), "train_images": len(train), "seed": seed, "epochs": epochs,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return Judges(digit, style, info)


def save_judges(judges: Judges, path: str | Path, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    tensors = {f"digit.{k}": v.contiguous() for k, v in judges.digit.state_dict().items()}
    tensors |= {f"style.{k}": v.contiguous() for k, v in judges.style.state_dict().items()}
    with atomic_file(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={"info": json.dumps(judges.info), "format": "pt"})
    return Path(path)


_CACHE: dict[str, Judges] = {}


def load_judges(path: str | Path | None = None) -> Judges:
    """The packaged judges (or those at `path`), cached per path; eval mode, fp32, CPU."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else judges_path()
    key = str(path.resolve())
    if key in _CACHE:
        return _CACHE[key]
    if not path.is_file():
        raise ConceptEraseError(f"judges file not found: {str(path)!r}")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get("info", "{}"))
    nets = []
    for prefix, n in (("digit.", len(DIGITS)), ("style.", len(STYLES))):
        net = JudgeNet(n)
        net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        nets.append(net.eval())
    _CACHE[key] = Judges(nets[0], nets[1], info)
    return _CACHE[key]


@dataclass
class GeneratedSet:
    """Images drawn for every (digit, style, seed), with what was asked for."""

    images: list
    digits: np.ndarray   # requested digit index per image
    styles: np.ndarray   # requested style index per image
    seeds: np.ndarray


def generate_digit_set(pipe, digits: Sequence[int] = range(len(DIGITS)), styles: Sequence[int] = range(len(STYLES)),
                       seeds: Sequence[int] = range(10), *, num_inference_steps: int = MINISD_STEPS,
                       guidance_scale: float = MINISD_GUIDANCE, batch_size: int = 64) -> GeneratedSet:
    """One image per (digit, style, seed), seed-stable (`generate_images`), in that nested order: what the
    judges score (`score_set`)."""
    from ..data.generate import generate_images

    cells = [(d, s, seed) for d in digits for s in styles for seed in seeds]
    images = generate_images(pipe, [minisd_prompt(d, s) for d, s, _ in cells], [seed for *_, seed in cells],
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             batch_size=batch_size)
    d, s, seed = (np.array(c) for c in zip(*cells))
    return GeneratedSet(images, d, s, seed)


def score_set(judges: Judges, gen: GeneratedSet) -> dict:
    """Judged accuracy: overall, per digit (all styles), per style (all digits), and per (digit, style)."""
    pd, ps = judges.predict_digits(gen.images), judges.predict_styles(gen.images)
    dig_ok, sty_ok = pd == gen.digits, ps == gen.styles
    out = {"digit_accuracy": float(dig_ok.mean()), "style_accuracy": float(sty_ok.mean()), "images": len(pd),
           "per_digit": {}, "per_style": {}, "per_cell": {}}
    for d in np.unique(gen.digits):
        sel = gen.digits == d
        out["per_digit"][DIGITS[d]] = {"digit": float(dig_ok[sel].mean()), "style": float(sty_ok[sel].mean())}
    for s in np.unique(gen.styles):
        sel = gen.styles == s
        out["per_style"][STYLES[s]] = {"digit": float(dig_ok[sel].mean()), "style": float(sty_ok[sel].mean())}
        for d in np.unique(gen.digits):
            cell = sel & (gen.digits == d)
            out["per_cell"][f"{DIGITS[d]}/{STYLES[s]}"] = float(dig_ok[cell].mean())
    return out


def score_pipeline(pipe, judges: Judges, seeds: Sequence[int] = range(10), **generate_kwargs) -> dict:
    """MiniSD's quality bar: every digit in every style, judged. Bars: digit and style >= 90%."""
    return score_set(judges, generate_digit_set(pipe, seeds=seeds, **generate_kwargs))


@functools.lru_cache(maxsize=None)
def confusable_digits(digit: int, k: int = 2) -> tuple[int, ...]:
    """The k digits the packaged digit judge confuses with `digit` most: the highest mean softmax probability
    it gives them on the held-out real images of `digit` (all styles). MiniSD's digit presets list these as
    their neighbours (the audit's collateral check)."""
    test = load_digit_images("test")
    with torch.no_grad():
        probs = F.softmax(load_judges().digit(test.images[test.digits == digit]), dim=1).mean(0)
    probs[digit] = -1.0
    return tuple(int(i) for i in probs.topk(k).indices)
