"""MiniSD's architecture: a genuine StableDiffusionPipeline at laptop size (docs/MINISD.md).

- tokenizer: CLIP BPE with one token per prompt word, model_max_length 16 (a character-level tokenizer
  padded to 77 drowned the digit word in padding in the prototype);
- text encoder: a small random CLIP text model, kept FROZEN (training it jointly collapsed the prompts);
- VAE: AutoencoderKL, 1 channel, 16x16 -> 4x8x8 latents;
- UNet: UNet2DConditionModel (32, 64, 128), one layer per block, cross-attention on the first two
  levels, about 3.1M parameters;
- scheduler: SD's scaled-linear DDIM.

MiniSD-XL is the same world with SDXL's architecture (`build_minisd_xl_pipeline`): a
`StableDiffusionXLPipeline` with two frozen random CLIP text encoders (hidden 32 and 48, the second with a
48-d projection: cross-attention on 80-d concatenated penultimate states), the pooled embedding and six size
ids added to the time embedding (`text_time`), SDXL's level layout (no attention on the first level,
cross-attention on the others), linear attention projections, the empty prompt as zeros.
"""

from __future__ import annotations

from . import vocabulary
from .data import IMAGE_SIZE

MODEL_MAX_LENGTH = 16
UNET_CHANNELS = (32, 64, 128)
VAE_CHANNELS = (32, 64)
TEXT_HIDDEN = 32
# MiniSD-XL's two encoders differ in width as SDXL's do (768, 1280): diffusers' single-file reader tells them
# apart by width, so equal widths would load text_encoder_2 from the first encoder's weights.
XL_TEXT_HIDDEN = (32, 48)


def build_minisd_pipeline(seed: int = 0):
    """MiniSD with random weights, deterministic in `seed` (the starting point of `train.py`)."""
    from ..models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(
        seed, image_size=IMAGE_SIZE, in_channels=1, words=vocabulary(), model_max_length=MODEL_MAX_LENGTH,
        unet_channels=UNET_CHANNELS, vae_channels=VAE_CHANNELS, text_hidden=TEXT_HIDDEN,
    )


def build_minisd_xl_pipeline(seed: int = 0):
    """MiniSD-XL with random weights, deterministic in `seed`."""
    from ..models.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(
        seed, image_size=IMAGE_SIZE, in_channels=1, words=vocabulary(), model_max_length=MODEL_MAX_LENGTH,
        unet_channels=UNET_CHANNELS, vae_channels=VAE_CHANNELS, text_hidden=XL_TEXT_HIDDEN,
        projection_dim=XL_TEXT_HIDDEN[1], time_embed_dim=8,
    )


BUILDERS = {"sd1": build_minisd_pipeline, "sdxl": build_minisd_xl_pipeline}


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
