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
from .config import TRAIN_FAMILIES
from .data import IMAGE_SIZE

MODEL_MAX_LENGTH = 16
UNET_CHANNELS = (32, 64, 128)
VAE_CHANNELS = (32, 64)
TEXT_HIDDEN = 32
# MiniSD-XL's two encoders differ in width as SDXL's do (768, 1280): diffusers' single-file reader tells them
# apart by width, so equal widths would load text_encoder_2 from the first encoder's weights.
XL_TEXT_HIDDEN = (32, 48)
# MiniSD-Flux's transformer: 4 heads of 16 dims (RoPE over text, row, column: 4 + 6 + 6), 2 double- then 2
# single-stream blocks; its T5 encoder is 32 wide.
FLUX_HEADS = 4
FLUX_ROPE = (4, 6, 6)
FLUX_LAYERS = (2, 2)
FLUX_T5_HIDDEN = 32


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


def build_minisd_flux_pipeline(seed: int = 0):
    """MiniSD-Flux with random weights, deterministic in `seed`: a `FluxPipeline` on MiniSD's VAE (4 latent
    channels, 16 px -> 8x8 latents packed 2x2 into 16 tokens; FLUX.1's latent shift, here 0), MiniSD's CLIP
    tokenizer and text encoder (the same config and seed give the same weights: pooled embedding), a
    one-layer T5 v1.1 encoder on its own one-piece-per-word vocabulary (sequence), and a FluxTransformer2DModel
    with double- and single-stream blocks and RoPE. Schnell's structure: no guidance embedding, sampled
    without classifier-free guidance."""
    from ..models.tiny import _tiny_vae, build_tiny_flux_pipeline

    vae = _tiny_vae(1, IMAGE_SIZE, VAE_CHANNELS)
    vae.register_to_config(shift_factor=0.0)  # FluxPipeline decodes latents / scale + shift
    return build_tiny_flux_pipeline(
        seed, image_size=IMAGE_SIZE, in_channels=1, words=vocabulary(), model_max_length=MODEL_MAX_LENGTH,
        t5_max_length=MODEL_MAX_LENGTH, clip_hidden=TEXT_HIDDEN, t5_hidden=FLUX_T5_HIDDEN, heads=FLUX_HEADS,
        axes_dims_rope=FLUX_ROPE, double_layers=FLUX_LAYERS[0], single_layers=FLUX_LAYERS[1],
        guidance_embeds=False, vae=vae,
    )


# keyed by the names `minisd train --family` offers (config.py holds them without torch, for the parser)
BUILDERS = dict(zip(TRAIN_FAMILIES, (build_minisd_pipeline, build_minisd_xl_pipeline, build_minisd_flux_pipeline)))


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
