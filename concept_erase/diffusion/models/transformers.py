"""The diffusion-transformer families, SD 3 and FLUX (docs/ALGORITHMS.md 5): rectified flow, a transformer as
the denoiser, 16-channel latents, and the text stream's own weights as the text-side scope."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from ...errors import ConceptEraseError
from .family import Conditioning, Family


class TransformerFamily(Family):
    """A diffusion transformer trained with rectified flow (SD 3, FLUX; docs/ALGORITHMS.md 5): the denoiser is
    `pipe.transformer`, the scheduler FlowMatchEulerDiscreteScheduler (the losses noise with it:
    `losses.RectifiedFlow`), the VAE has 16 channels with a shift and a scale. There is no cross-attention: the
    text tokens have their own projections in the joint (double-stream) blocks and attend together with the image
    tokens, so the text-side scope (`is_cross_attention`) is those projections plus the embedders of the text."""

    default_resolution = 1024
    denoiser_name = "transformer"
    pipeline_kwargs: dict = {}
    sampling_steps = 28         # diffusers' SD 3 and FLUX pipelines' default
    # the text stream's own weights in the joint blocks (the analogue of cross-attention), and the embedders that
    # carry the text into the stream (`context_embedder`) and into the modulation (`time_text_embed.text_embedder`)
    TEXT_SIDE = (".add_q_proj.", ".add_k_proj.", ".add_v_proj.", ".to_add_out.", ".ff_context.", ".norm1_context.",
                 ".norm_added_q.", ".norm_added_k.")
    TEXT_EMBEDDERS = ("context_embedder.", "time_text_embed.text_embedder.")
    config_marker: str          # a key only this family's transformer config has (detection from a pipeline)
    single_stream = False       # single-stream blocks after the joint ones (FLUX)
    max_sequence_length: int    # T5 tokens the pipeline encodes by default (capped by the tokenizer's maximum)
    t5_tokenizer: str           # the pipeline's T5 tokenizer

    def is_cross_attention(self, name: str) -> bool:
        return name.startswith(self.TEXT_EMBEDDERS) or any(part in name for part in self.TEXT_SIDE)

    def is_text_key_value(self, name: str) -> bool:
        """The whole text-side scope: a UNet's K/V read the text encoder's states directly, but here the keys and
        values of the text tokens, in the joint blocks and (FLUX) the single-stream ones, are computed from what
        the text stream carries there, which every text-side weight shapes (docs/ALGORITHMS.md 5)."""
        return self.is_cross_attention(name)

    def check_method(self, method) -> None:
        if not method.transformer_form:
            raise ConceptEraseError(f"--method {method.name} has no form for diffusion transformers yet; on "
                                    f"{self.description} use salun, rl, esd-x, esd-u, ca or uce")

    def check_erase(self, config, method) -> None:
        super().check_erase(config, method)
        if config.save_delta:
            raise ConceptEraseError(f"--save-delta is not available for diffusion transformers yet ({self.description}); "
                                    "the erased model is written as a diffusers folder (--export-single-file: one file)")

    def check_mask(self, mask, source) -> None:
        """Refuse a mask made for a UNet (or the other transformer) by its parameter names."""
        names = [name for name, _ in mask.model_shapes]
        single_stream = any(n.startswith("single_transformer_blocks.") for n in names)
        if not any(n.startswith("transformer_blocks.") for n in names) or single_stream != self.single_stream:
            raise ConceptEraseError(f"mask {str(source)!r} was not made for a {self.name} transformer "
                                    f"({self.description})")

    def image_size(self, pipe) -> tuple[int, int]:
        size = self.latent_sample_size(pipe) * self.vae_factor(pipe)
        return size, size

    def latent_sample_size(self, pipe) -> int:
        raise NotImplementedError

    def t5_length(self, pipe) -> int:
        """The T5 sequence length to encode: the pipeline's default, at most the tokenizer's maximum."""
        return min(self.max_sequence_length, getattr(pipe, self.t5_tokenizer).model_max_length)

    def sampling_kwargs(self, pipe) -> dict:
        """The pipeline pads T5's tokens to `max_sequence_length` (512 unless told), and the transformer attends
        to the padding (FLUX and SD 3 pass no text mask): sample at the length training encodes (MiniSD-Flux: 16).
        FluxPipeline's default size is FLUX.1's (1024) whatever the model: sample at the model's own size."""
        height, width = self.image_size(pipe)
        return {"max_sequence_length": self.t5_length(pipe), "height": height, "width": width}


class SD3Family(TransformerFamily):
    """Stable Diffusion 3 and 3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution
    Image Synthesis", section 2 and 5.2): an MMDiT with joint blocks on 16-channel latents in 2x2 patches; three
    text encoders."""

    name = "sd3"
    description = "Stable Diffusion 3 / 3.5 (MMDiT; CLIP-L + OpenCLIP bigG + T5-XXL, rectified flow)"
    latent_scaling = 1.5305     # the released VAE's scaling_factor; latents are (x - 0.0609) * 1.5305
    pipeline_class = "StableDiffusion3Pipeline"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    t5_tokenizer = "tokenizer_3"
    sampling_guidance = 7.0     # diffusers' StableDiffusion3Pipeline default
    config_marker = "pos_embed_max_size"
    # Stability AI's MMDiT names under the all-in-one files' prefix (`sd3_medium.safetensors`), as ComfyUI and
    # diffusers' SD3Transformer2DModel.from_single_file read them
    single_file_layout = "mmdit"
    single_file_prefixes = {"transformer": "model.diffusion_model."}
    max_sequence_length = 256   # StableDiffusion3Pipeline's default
    text_tokens = 77 + max_sequence_length  # CLIP's tokens, then T5's

    def encode(self, pipe, prompts: Sequence[str], device, size: tuple[int, int] | None = None) -> Conditioning:
        """hidden: CLIP-L's and bigG's penultimate states joined on the feature axis (768 + 1280), zero-padded to
        T5's width (4096) and followed on the sequence axis by T5's states (77 + 256 tokens); pooled_projections:
        both CLIP encoders' projected pooled embeddings joined (768 + 1280 = 2048). As the pipeline encodes."""
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.t5_length(pipe))
        return Conditioning(hidden.float(), {"pooled_projections": pooled.float()}, self)

    def denoise(self, model, z, t, cond):
        """SD3Transformer2DModel takes the latents unpacked (it patches them itself) and t = sigma * 1000."""
        return model(hidden_states=z, timestep=t, encoder_hidden_states=cond.hidden.to(z.dtype),
                     pooled_projections=cond.added["pooled_projections"].to(z.dtype)).sample

    def latent_sample_size(self, pipe) -> int:
        return pipe.transformer.config.sample_size

class FluxFamily(TransformerFamily):
    """FLUX.1 dev and schnell (Black Forest Labs 2024; described in Labs et al., "FLUX.1 Kontext", arXiv
    2506.15742): double-stream blocks (text and image tokens with their own weights, joint attention) then
    single-stream blocks on 2x2-packed latents, RoPE over (text, row, column) position ids; dev is
    guidance-distilled (the guidance scale is an input embedding, no unconditional pass when sampling)."""

    name = "flux"
    description = "FLUX.1 (double/single-stream transformer; CLIP-L pooled + T5-XXL, rectified flow)"
    latent_scaling = 0.3611     # the released VAE's scaling_factor; latents are (x - 0.1159) * 0.3611
    pipeline_class = "FluxPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    t5_tokenizer = "tokenizer_2"
    sampling_guidance = 3.5     # FLUX.1 dev's distilled guidance, diffusers' FluxPipeline default
    evaluation_protocol = "flux"  # FluxPipeline's own scheduler and defaults (evaluation.generation.PRESETS)
    # FLUX.1 schnell, a transformer without `guidance_embeds` (timestep-distilled, not guidance-distilled), as
    # diffusers' Flux pipeline docs sample it: 4 steps, guidance 0 (none), T5 at 256 tokens (its most there).
    # MiniSD-Flux has schnell's structure but its own sampling (25 steps, true CFG 5: `defaults.model_defaults`).
    schnell_steps = 4
    schnell_guidance = 0.0
    schnell_protocol = "flux-schnell"
    schnell_max_sequence_length = 256
    config_marker = "axes_dims_rope"
    # Black Forest Labs' names with no prefix, as `flux1-dev.safetensors` holds the transformer alone
    single_file_layout = "bfl"
    single_file_prefixes = {"transformer": ""}
    single_stream = True
    max_sequence_length = 512   # FluxPipeline's default (dev)
    # The guidance a guidance-distilled transformer is trained and measured at (its conditioning's `guidance`):
    # diffusers' train_dreambooth_flux.py default, FLUX.1 dev's sampling guidance.
    training_guidance = 3.5

    def encode(self, pipe, prompts: Sequence[str], device, size: tuple[int, int] | None = None) -> Conditioning:
        """hidden: T5's states (512 x 4096 for dev); pooled_projections: CLIP-L's pooled output (768);
        guidance (guidance-distilled models only): `training_guidance` per item. The text position ids are
        zeros and the image ids follow the latent grid: both are made when the transformer runs (`denoise`)."""
        import torch

        hidden, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                               num_images_per_prompt=1,
                                               max_sequence_length=self.t5_length(pipe))
        added = {"pooled_projections": pooled.float()}
        if pipe.transformer.config.guidance_embeds:
            added["guidance"] = torch.full((len(prompts),), self.training_guidance, device=hidden.device)
        return Conditioning(hidden.float(), added, self)

    def denoise(self, model, z, t, cond):
        """FluxTransformer2DModel on z (B, 16, h, w) packed into (B, h/2 * w/2, 64) tokens with their (0, row,
        column) ids, t = sigma (the model multiplies by 1000), and the guidance embedding where the model has one;
        the output unpacked to z's shape. As FluxPipeline calls it."""
        from diffusers import FluxPipeline

        b, c, h, w = z.shape
        if h % 2 or w % 2:
            raise ConceptEraseError(f"FLUX packs 2x2 latent patches: a {h}x{w} latent grid is not even")
        tokens = FluxPipeline._pack_latents(z, b, c, h, w)
        guidance = cond.added.get("guidance")
        if model.config.guidance_embeds and guidance is None:
            raise ConceptEraseError("this FLUX transformer is guidance-distilled: its conditioning needs a guidance")
        out = model(hidden_states=tokens, timestep=t.to(z.dtype) / 1000,
                    guidance=guidance.to(z.dtype) if model.config.guidance_embeds else None,
                    encoder_hidden_states=cond.hidden.to(z.dtype),
                    pooled_projections=cond.added["pooled_projections"].to(z.dtype),
                    txt_ids=z.new_zeros(cond.hidden.shape[1], 3),
                    img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, z.device, z.dtype)).sample
        return FluxPipeline._unpack_latents(out, h, w, 1)

    text_tokens = max_sequence_length

    @staticmethod
    def is_schnell(denoiser_config) -> bool:
        """FLUX.1 schnell's structure: the transformer's config (a loaded one, or its config.json) says it has no
        guidance embedding. A config that does not say (unread) is dev's, the family's defaults."""
        return denoiser_config.get("guidance_embeds") is False

    def sampling_defaults(self, denoiser_config: dict) -> tuple[int, float, str]:
        if self.is_schnell(denoiser_config):
            return self.schnell_steps, self.schnell_guidance, self.schnell_protocol
        return super().sampling_defaults(denoiser_config)

    def t5_length(self, pipe) -> int:
        """Dev's 512 T5 tokens, schnell's 256 (each at most the tokenizer's maximum: MiniSD-Flux's 16)."""
        if self.is_schnell(pipe.transformer.config):
            return min(self.schnell_max_sequence_length, super().t5_length(pipe))
        return super().t5_length(pipe)

    def guidance_kwargs(self, pipe, guidance_scale: float, negatives: list[str] | None, n: int) -> dict:
        """Dev takes the scale as its guidance embedding (one pass). A transformer without that embedding
        (schnell's structure, MiniSD-Flux) ignores `guidance_scale`; above 1 it is sampled with true
        classifier-free guidance (Ho & Salimans 2022): FluxPipeline's `true_cfg_scale` against the negative
        prompts, the empty prompt unless given, which MiniSD-Flux was trained to follow by prompt dropout
        (`minisd train --empty-prompt-rate`). FLUX schnell as released is sampled at 1 or below (no CFG)."""
        if pipe.transformer.config.guidance_embeds or guidance_scale <= 1:
            return super().guidance_kwargs(pipe, guidance_scale, negatives, n)
        return {"true_cfg_scale": guidance_scale, "negative_prompt": negatives or [""] * n}

    def latent_channels(self, denoiser_config) -> int:
        return denoiser_config.in_channels // 4  # 2x2 patches packed into the channels

    def latent_sample_size(self, pipe) -> int:
        # the transformer's config has no size; the VAE's sample_size is the image size (FLUX.1: 1024)
        return pipe.vae.config.sample_size // self.vae_factor(pipe)


def guidance_distilled(cond) -> bool:
    """Is `cond` for a guidance-distilled transformer (FLUX.1 dev): the guidance scale is an input embedding, and
    sampling runs one pass, with no unconditional prediction."""
    return isinstance(cond, Conditioning) and "guidance" in cond.added


def at_guidance(cond, scale: float):
    """`cond` with a guidance-distilled transformer's guidance embedding at `scale` (any other unchanged). ESD's
    frozen passes on FLUX dev run at 1: the distilled model's prediction without guidance (docs/ALGORITHMS.md 5)."""
    if not guidance_distilled(cond):
        return cond
    import torch

    return replace(cond, added={**cond.added, "guidance": torch.full_like(cond.added["guidance"], scale)})
