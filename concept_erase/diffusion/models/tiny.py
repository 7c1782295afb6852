"""Build small, real Stable Diffusion pipelines offline: for tests, fixtures, MiniSD and MiniSD-XL.

Everything here is a genuine diffusers pipeline: `build_tiny_pipeline` a `StableDiffusionPipeline` (CLIP
tokenizer and text encoder, UNet2DConditionModel, AutoencoderKL, DDIM scheduler), `build_tiny_sd2_pipeline`
one with SD 2.x's structure (a 1024-wide OpenCLIP-style text encoder, linear projections, epsilon or
v-prediction), `build_tiny_sdxl_pipeline`
a `StableDiffusionXLPipeline` with SDXL's structure (two CLIP text encoders, the second with a projection,
a UNet with `text_time` added conditioning). Only the sizes are small and no file is downloaded.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (the base alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_tokenizer(words: Sequence[str] = (), model_max_length: int = 77):
    """A CLIP BPE tokenizer made in memory: the 512 byte symbols (+ end-of-word forms), the two specials,
    and, for each of `words`, the chain of merges that makes it one token (longest words first, so a
    shorter word's merges cannot split a longer one). Raises if a word still splits."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet]
    merges: list[str] = []
    for word in sorted(dict.fromkeys(w.lower() for w in words), key=lambda w: (-len(w), w)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for sym in symbols[1:]:
            merges.append(f"{current} {sym}")
            current = current + sym
            if current not in tokens:
                tokens.append(current)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=model_max_length)
    for word in words:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"word {word!r} did not become one token ({len(ids)} tokens); choose other words")
    return tok


def build_tiny_pipeline(
    seed: int = 0,
    *,
    image_size: int = 32,
    in_channels: int = 3,
    words: Sequence[str] = (),
    model_max_length: int = 77,
    unet_channels: Sequence[int] = (32, 64),
    vae_channels: Sequence[int] = (32, 64),
    text_hidden: int = 32,
    text_layers: int = 2,
    text_intermediate: int | None = None,
    hidden_act: str = "quick_gelu",
    use_linear_projection: bool = False,
    prediction_type: str = "epsilon",
):
    """A randomly initialised StableDiffusionPipeline of about 1M parameters, deterministic in `seed`.

    The VAE downsamples by 2 ** (len(vae_channels) - 1); the scheduler is SD's (scaled_linear betas, DDIM)
    with `prediction_type`. `text_intermediate` defaults to 2 * text_hidden.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, model_max_length=model_max_length)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=text_intermediate or 2 * text_hidden,
        num_attention_heads=4, num_hidden_layers=text_layers, max_position_embeddings=model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=text_hidden, hidden_act=hidden_act,
    )
    text_encoder = CLIPTextModel(text_config)
    latent_size = image_size // 2 ** (len(vae_channels) - 1)
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=text_hidden, attention_head_dim=8, norm_num_groups=8,
        use_linear_projection=use_linear_projection,
    )
    vae = _tiny_vae(in_channels, image_size, vae_channels)
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=_sd_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd2_pipeline(seed: int = 0, *, prediction_type: str = "epsilon", **kwargs):
    """A randomly initialised StableDiffusionPipeline with SD 2.x's structure at toy size: the text encoder
    is 1024 wide as OpenCLIP ViT-H's (the width SD 2.x is told apart by, `families.family_of`) but has one
    layer, four heads and a 64-wide MLP (about 5M parameters); gelu as OpenCLIP; the UNet cross-attends to
    1024 dims with linear projections; `prediction_type` "v_prediction" for the 768-v models."""
    return build_tiny_pipeline(seed, text_hidden=1024, text_layers=1, text_intermediate=64, hidden_act="gelu",
                               use_linear_projection=True, prediction_type=prediction_type, **kwargs)


def _tiny_vae(in_channels: int, image_size: int, vae_channels: Sequence[int]):
    """The tiny pipelines' AutoencoderKL: downsamples by 2 ** (len(vae_channels) - 1) to 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=in_channels, out_channels=in_channels, latent_channels=4, sample_size=image_size,
        block_out_channels=tuple(vae_channels), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
    )


def _sd_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def build_tiny_sdxl_pipeline(
    seed: int = 0,
    *,
    image_size: int = 32,
    in_channels: int = 3,
    words: Sequence[str] = (),
    model_max_length: int = 77,
    unet_channels: Sequence[int] = (32, 64),
    transformer_layers: Sequence[int] | None = None,
    vae_channels: Sequence[int] = (32, 64),
    text_hidden: tuple[int, int] = (32, 48),
    projection_dim: int = 48,
    time_embed_dim: int = 8,
    layers_per_block: int = 1,
):
    """A randomly initialised StableDiffusionXLPipeline with SDXL base's structure at toy size.

    As in SDXL base: the first UNet level has no attention, the others cross-attend to both text encoders'
    penultimate hidden states concatenated (cross_attention_dim = sum(text_hidden)); `text_time` adds the
    pooled projected embedding of text_encoder_2 and six size ids embedded with `time_embed_dim` sinusoids
    each (projection_class_embeddings_input_dim = projection_dim + 6 * time_embed_dim, SDXL: 1280 + 6 * 256);
    use_linear_projection; `force_zeros_for_empty_prompt`. `transformer_layers`: transformer blocks per
    level (SDXL: 1, 2, 10; default one per attention level). The two encoders must differ in width (SDXL:
    768, 1280): diffusers' single-file reader tells them apart by it."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, model_max_length=model_max_length)
    tokenizer_2 = build_tokenizer(words, model_max_length=model_max_length)

    def text_config(hidden: int) -> "CLIPTextConfig":
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=model_max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=projection_dim,
            hidden_act="gelu",  # OpenCLIP bigG's activation (CLIP-L keeps quick_gelu)
        )

    config_1 = text_config(text_hidden[0])
    config_1.hidden_act = "quick_gelu"
    text_encoder = CLIPTextModel(config_1)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(text_hidden[1]))
    latent_size = image_size // 2 ** (len(vae_channels) - 1)
    n = len(unet_channels)
    layers = tuple(transformer_layers) if transformer_layers is not None else (1,) * n
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=tuple(unet_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        transformer_layers_per_block=layers, cross_attention_dim=sum(text_hidden), attention_head_dim=8,
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim, projection_class_embeddings_input_dim=projection_dim + 6 * time_embed_dim,
    )
    vae = _tiny_vae(in_channels, image_size, vae_channels)
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, scheduler=_sd_scheduler(), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
