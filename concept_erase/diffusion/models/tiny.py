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


def _clip_text_config(tokenizer, hidden: int, model_max_length: int, projection_dim: int, act: str):
    """A two-layer CLIP text config `hidden` wide (4 heads, MLP 2x) for `tokenizer`, activation `act`."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=projection_dim,
        hidden_act=act)


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
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, model_max_length=model_max_length)
    tokenizer_2 = build_tokenizer(words, model_max_length=model_max_length)
    # CLIP-L's quick_gelu, OpenCLIP bigG's gelu
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, text_hidden[0], model_max_length, projection_dim,
                                                   "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer, text_hidden[1], model_max_length,
                                                                   projection_dim, "gelu"))
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


# ------------------------------------------------------------------------------ diffusion transformers

def build_t5_tokenizer(words: Sequence[str] = (), model_max_length: int = 32):
    """A T5 (Unigram SentencePiece-style) tokenizer made in memory: pad, end and unknown tokens, each of
    `words` as one "▁word" piece, the word-start piece and single characters (lower-case letters, digits,
    punctuation). Like T5's, it appends the end token and pads with id 0; no sentinel tokens."""
    import string

    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words)]
    pieces += [("▁", -2.0)] + [(c, -3.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _tiny_t5(tokenizer, d_model: int):
    """A one-layer T5 v1.1 encoder (gated GELU) `d_model` wide: the sequence encoder of FLUX and SD 3. No dropout
    (T5's config default is 0.1, active in a freshly built module's training mode)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                      num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, is_encoder_decoder=False)
    return T5EncoderModel(config)


def _tiny_dit_vae(in_channels: int, image_size: int, vae_channels: Sequence[int], scaling: float, shift: float):
    """A 16-channel AutoencoderKL as FLUX's and SD 3's (no quant convs; a shift and a scale of the latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=in_channels, out_channels=in_channels, latent_channels=16, sample_size=image_size,
        block_out_channels=tuple(vae_channels), norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), scaling_factor=scaling, shift_factor=shift,
    )


def build_tiny_flux_pipeline(
    seed: int = 0,
    *,
    image_size: int = 32,
    in_channels: int = 3,
    words: Sequence[str] = (),
    model_max_length: int = 77,
    t5_max_length: int = 32,
    vae_channels: Sequence[int] = (32, 64),
    clip_hidden: int = 32,
    t5_hidden: int = 48,
    heads: int = 2,
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6),
    double_layers: int = 1,
    single_layers: int = 1,
    guidance_embeds: bool = True,
    vae=None,
):
    """A randomly initialised FluxPipeline with FLUX.1's structure at toy size: CLIP-L (pooled), a T5 v1.1
    encoder (sequence), a FluxTransformer2DModel with double- and single-stream blocks on 2x2-packed 16-channel
    latents (in_channels 64), RoPE over (axes_dims_rope: head dim = their sum) and, as FLUX.1 dev, a guidance
    embedding (`guidance_embeds=False`: schnell's structure); FLUX's VAE scale and shift; the flow-matching
    scheduler with FLUX's resolution-dependent shift. `vae`: another AutoencoderKL instead of the 16-channel one
    (MiniSD-Flux: MiniSD's 4-channel VAE); the transformer takes its latent channels packed 2x2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, model_max_length=model_max_length)
    tokenizer_2 = build_t5_tokenizer(words, model_max_length=t5_max_length)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, clip_hidden, model_max_length, clip_hidden, "quick_gelu"))
    text_encoder_2 = _tiny_t5(tokenizer_2, t5_hidden)
    latent_channels = vae.config.latent_channels if vae is not None else 16
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=double_layers, num_single_layers=single_layers,
        attention_head_dim=sum(axes_dims_rope), num_attention_heads=heads, joint_attention_dim=t5_hidden,
        pooled_projection_dim=clip_hidden, guidance_embeds=guidance_embeds, axes_dims_rope=tuple(axes_dims_rope),
    )
    if vae is None:
        vae = _tiny_dit_vae(in_channels, image_size, vae_channels, scaling=0.3611, shift=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def build_tiny_sd3_pipeline(
    seed: int = 0,
    *,
    image_size: int = 32,
    in_channels: int = 3,
    words: Sequence[str] = (),
    model_max_length: int = 77,
    t5_max_length: int = 32,
    vae_channels: Sequence[int] = (32, 64),
    clip_hidden: tuple[int, int] = (32, 48),
    t5_hidden: int = 96,
    heads: int = 4,
    head_dim: int = 8,
    layers: int = 2,
):
    """A randomly initialised StableDiffusion3Pipeline with SD 3's structure at toy size: CLIP-L and bigG-style
    encoders with projections (penultimate states joined on the feature axis and zero-padded to the T5 width,
    pooled = both projections), a T5 v1.1 encoder whose states follow on the sequence axis, an MMDiT
    (SD3Transformer2DModel, patch 2, joint blocks) on 16-channel latents; SD 3's VAE scale and shift; the
    flow-matching scheduler with shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    if sum(clip_hidden) > t5_hidden:
        raise ValueError(f"the CLIP widths {clip_hidden} must fit in the T5 width {t5_hidden} (they are padded to it)")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, model_max_length=model_max_length)
    tokenizer_2 = build_tokenizer(words, model_max_length=model_max_length)
    tokenizer_3 = build_t5_tokenizer(words, model_max_length=t5_max_length)
    text_encoder = CLIPTextModelWithProjection(
        _clip_text_config(tokenizer, clip_hidden[0], model_max_length, clip_hidden[0], "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(tokenizer_2, clip_hidden[1], model_max_length, clip_hidden[1], "gelu"))
    text_encoder_3 = _tiny_t5(tokenizer_3, t5_hidden)
    vae_factor = 2 ** (len(vae_channels) - 1)
    latent_size = image_size // vae_factor
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=t5_hidden, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=sum(clip_hidden), out_channels=16, pos_embed_max_size=max(16, latent_size),
    )
    vae = _tiny_dit_vae(in_channels, image_size, vae_channels, scaling=1.5305, shift=0.0609)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
