"""Build small, real Stable Diffusion pipelines offline: for tests, fixtures and MiniSD.

Everything here is a genuine diffusers `StableDiffusionPipeline` (CLIP tokenizer and text encoder,
UNet2DConditionModel, AutoencoderKL, DDIM scheduler); only the sizes are small and no file is downloaded.
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
):
    """A randomly initialised StableDiffusionPipeline of about 1M parameters, deterministic in `seed`.

    The VAE downsamples by 2 ** (len(vae_channels) - 1); the scheduler is SD's (scaled_linear betas, DDIM).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, model_max_length=model_max_length)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=text_hidden,
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
    )
    vae = AutoencoderKL(
        in_channels=in_channels, out_channels=in_channels, latent_channels=4, sample_size=image_size,
        block_out_channels=tuple(vae_channels), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
