"""Image quality, erased vs original (docs/PROTOCOLS.md): FID on 2048-d Inception features and CLIP score.

Both are torchmetrics `Metric`s (update/compute, sum-reduced states: feature sums, outer-product sums and
counts for FID; score sum and count for CLIP), so they merge across processes.

FID's default Inception network comes from torch-fidelity, which imports torchvision and downloads its
weights on first use; neither works offline beside torch 2.13 CPU (docs/DEPENDENCIES.md). Hence a clear error, a
`weights_path` for a pre-downloaded `pt_inception-2015-12-05-6726825d.pth`, and an injectable feature
extractor (tests use a dummy one; one reference used 64-d features and a wrong uint8 cast: we don't).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torchmetrics import Metric

from concept_erase.errors import ConceptEraseError

from .model_files import check_fid_weights, clip_folder


def images_to_uint8(images: Sequence, size: int | None = None) -> torch.Tensor:
    """PIL images -> [N, 3, H, W] uint8 (the input torchmetrics' Inception expects; no float rescaling)."""
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), resample=3)  # bicubic
        arrays.append(np.asarray(im))
    if len({a.shape for a in arrays}) > 1:
        raise ConceptEraseError("images of different sizes: pass size= to resize them")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def make_fid(feature_extractor: torch.nn.Module | None = None, weights_path: str | None = None, **metric_kwargs):
    """torchmetrics `FrechetInceptionDistance`: 2048-d Inception features by default, or `feature_extractor`
    (a module mapping a uint8 [N, 3, H, W] batch to [N, D] features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature_extractor is not None:
        return FrechetInceptionDistance(feature=feature_extractor, **metric_kwargs)
    if weights_path is not None:
        check_fid_weights(weights_path)
    try:
        return FrechetInceptionDistance(feature=2048,
                                        feature_extractor_weights_path=weights_path, **metric_kwargs)
    except Exception as err:  # ModuleNotFoundError (torch-fidelity/torchvision), URLError/OSError (offline)
        raise ConceptEraseError(
            f"FID's 2048-d Inception features are unavailable ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            "they need torch-fidelity with a working torchvision and its weights (pass --fid-weights "
            "pt_inception-2015-12-05-6726825d.pth offline)"
        ) from None


def load_clip(path: str | Path):
    """A local CLIP folder -> (CLIPModel, CLIPProcessor), read offline; see `ClipScore`."""
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    from .classes import load_image_processor

    path = clip_folder(path)
    model = CLIPModel.from_pretrained(str(path)).eval()
    processor = CLIPProcessor(image_processor=load_image_processor(path), tokenizer=CLIPTokenizer.from_pretrained(str(path)))
    return model, processor


def _embedding(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScore(Metric):
    """CLIP score (Hessel et al. 2021, as torchmetrics defines it): mean of 100 * max(cos(image, text), 0).

    Our own metric because torchmetrics 1.9's CLIPScore reads `get_image_features` as a tensor, which
    transformers 5 no longer returns. State: score sum and image count, sum-reduced.
    """

    full_state_update = False

    def __init__(self, model, processor, **kwargs):
        super().__init__(**kwargs)
        self.model, self.processor = model.eval(), processor
        self.add_state("score", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, images: Sequence, prompts: Sequence[str]) -> None:
        device = next(self.model.parameters()).device
        max_len = getattr(self.processor.tokenizer, "model_max_length", 77)
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        text = self.processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        img = _embedding(self.model.get_image_features(pixel_values=pixels.to(device)))
        txt = _embedding(self.model.get_text_features(
            input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device)))
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        self.score += (100 * cos.clamp(min=0)).double().sum().cpu()
        self.n += len(images)

    def compute(self) -> torch.Tensor:
        return self.score / self.n.clamp(min=1)


def frechet_distance(fid, reference: Sequence, images: Sequence, *, batch_size: int = 32,
                     size: int | None = None) -> float:
    """The Frechet distance of `images` to `reference` images through an FID metric from `make_fid` (Inception
    features, or another extractor such as MiniSD's judge: `Judges.fid_features()`), updated batch by batch."""
    if len(reference) < 2 or len(images) < 2:
        raise ConceptEraseError("FID needs at least 2 images on each side")
    fid.reset()
    for start in range(0, len(reference), batch_size):
        fid.update(images_to_uint8(reference[start:start + batch_size], size), real=True)
    for start in range(0, len(images), batch_size):
        fid.update(images_to_uint8(images[start:start + batch_size], size), real=False)
    return float(fid.compute())


def score_quality(
    images: Sequence,
    prompts: Sequence[str],
    *,
    reference: Sequence | None = None,
    fid=None,
    clip=None,
    batch_size: int = 32,
    size: int | None = None,
) -> dict:
    """FID of `images` against `reference` images (when both a metric and references are given) and the
    CLIP score of `images` with their `prompts` (when `clip` is given). Returns {"fid", "clip_score",
    "images", "reference_images"} with None for what was not computed."""
    if len(images) != len(prompts):
        raise ConceptEraseError(f"{len(prompts)} prompts for {len(images)} images")
    result = {"images": len(images), "reference_images": len(reference) if reference is not None else 0,
              "fid": None, "clip_score": None}
    for metric in (fid, clip):  # a metric reused for a second model must not mix in the first one's images
        if metric is not None:
            metric.reset()
    if fid is not None and reference is not None:
        result["fid"] = frechet_distance(fid, reference, images, batch_size=batch_size, size=size)
    if clip is not None:
        for start in range(0, len(images), batch_size):
            clip.update(images[start:start + batch_size], prompts[start:start + batch_size])
        result["clip_score"] = float(clip.compute())
    return result
