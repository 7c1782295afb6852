"""MiniSD's architecture: a genuine StableDiffusionPipeline at laptop size (docs/MINISD.md).

- tokenizer: CLIP BPE with one token per prompt word, model_max_length 16 (a character-level tokenizer
  padded to 77 drowned the digit word in padding in the prototype);
- text encoder: a small random CLIP text model, kept FROZEN (training it jointly collapsed the prompts);
- VAE: AutoencoderKL, 1 channel, 16x16 -> 4x8x8 latents;
- UNet: UNet2DConditionModel (32, 64, 128), one layer per block, cross-attention on the first two
  levels, about 3.1M parameters;
- scheduler: SD's scaled-linear DDIM.
"""

from __future__ import annotations

from . import vocabulary
from .data import IMAGE_SIZE

MODEL_MAX_LENGTH = 16
UNET_CHANNELS = (32, 64, 128)
VAE_CHANNELS = (32, 64)
TEXT_HIDDEN = 32


def build_minisd_pipeline(seed: int = 0):
    """MiniSD with random weights, deterministic in `seed` (the starting point of `train.py`)."""
    from ..tiny import build_tiny_pipeline

    return build_tiny_pipeline(
        seed, image_size=IMAGE_SIZE, in_channels=1, words=vocabulary(), model_max_length=MODEL_MAX_LENGTH,
        unet_channels=UNET_CHANNELS, vae_channels=VAE_CHANNELS, text_hidden=TEXT_HIDDEN,
    )


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
