"""Model families: everything that differs between SD 1.x, SD 2.x, SDXL, SD 3 and FLUX, in one place.

Every part of the library that turns prompts into conditioning, runs the denoiser, picks a default resolution
or names the text-side weights asks the pipeline's `Family` (`family_of(pipe)`), never the pipeline class, and
none tests a family's name: each family is a `Family` subclass whose attributes and overrides say how it differs.

`Conditioning` is what the denoiser is conditioned on for a batch of prompts: the text encoder's hidden states
(`encoder_hidden_states`) and per-item extras: SDXL's `added_cond_kwargs` (the pooled text embedding and the
six size ids), a diffusion transformer's pooled projection and (FLUX.1 dev) guidance. It indexes, concatenates
and moves like a tensor, and `Conditioning.predict(model, z_t, t)` runs the denoiser the family's way (a UNet
call; a transformer with its own argument names, FLUX's packed latents and position ids), so the losses and the
erasure loop handle every family the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Sequence

from ...errors import ConceptEraseError

if TYPE_CHECKING:  # torch is imported where it is used: command parsers import this module for --family
    import torch
    from torch import Tensor


@dataclass
class Conditioning:
    """Denoiser conditioning for B prompts: `hidden` (B, L, D) and per-item extras (B, ...) such as SDXL's
    `text_embeds` and `time_ids`. `family`: the family whose denoiser it conditions where that is not a UNet
    (SD 3, FLUX: `Family.denoise`); None for the UNet families."""

    hidden: Tensor
    added: dict[str, Tensor] = field(default_factory=dict)
    family: "Family | None" = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index) -> "Conditioning":
        if isinstance(index, int):
            index = slice(index, index + 1)  # keep the batch axis: one item is a batch of one
        return replace(self, hidden=self.hidden[index], added={k: v[index] for k, v in self.added.items()})

    def to(self, *args, **kwargs) -> "Conditioning":
        return replace(self, hidden=self.hidden.to(*args, **kwargs),
                       added={k: v.to(*args, **kwargs) for k, v in self.added.items()})

    def expand(self, n: int) -> "Conditioning":
        """A batch of one repeated n times (the empty prompt beside a batch, as classifier-free guidance)."""
        if len(self) != 1:
            raise ValueError(f"expand needs a batch of one, got {len(self)}")
        return replace(self, hidden=self.hidden.expand(n, *self.hidden.shape[1:]),
                       added={k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()})

    @classmethod
    def cat(cls, items: Sequence["Conditioning | Tensor"]) -> "Conditioning":
        items = [as_conditioning(c) for c in items]
        keys = set(items[0].added)
        if any(set(c.added) != keys or c.family is not items[0].family for c in items):
            raise ValueError("cannot concatenate conditionings of different families")
        import torch

        return cls(torch.cat([c.hidden for c in items]), {k: torch.cat([c.added[k] for c in items]) for k in keys},
                   items[0].family)

    def unet_kwargs(self, dtype: "torch.dtype | None" = None) -> dict:
        """Keyword arguments of `UNet2DConditionModel.forward` (added_cond_kwargs only where there are any)."""
        cast = (lambda x: x.to(dtype)) if dtype is not None else (lambda x: x)
        kwargs = {"encoder_hidden_states": cast(self.hidden)}
        if self.added:
            kwargs["added_cond_kwargs"] = {k: cast(v) for k, v in self.added.items()}
        return kwargs

    def predict(self, model, z: Tensor, t: Tensor) -> Tensor:
        """`model`'s prediction (eps, v or the flow velocity, in z's shape) for latents z (B, C, h, w) at
        timesteps t (B,) under this conditioning, called the way its family's denoiser takes it."""
        if self.family is None:
            return model(z, t, **self.unet_kwargs(z.dtype)).sample
        return self.family.denoise(model, z, t, self)


def as_conditioning(cond: "Conditioning | Tensor") -> Conditioning:
    """A bare hidden-state tensor (SD 1.x/2.x callers, tests) is a Conditioning without extras."""
    return cond if isinstance(cond, Conditioning) else Conditioning(cond)


class Family:
    """What a model family means for the rest of the library. Each family is a subclass that sets these class
    attributes and overrides what it does differently; the library uses one instance of each (`FAMILIES`)."""

    name: str                   # "sd1", "sd2", "sd2-v", "sdxl"
    description: str            # printed when a model is loaded
    default_resolution = 512    # the family's native image size in pixels (a small test model has its own)
    latent_scaling = 0.18215    # the released VAE's scaling_factor (a loaded VAE's config is what is used)
    prediction_type = "epsilon"  # the released scheduler's: "epsilon" or "v_prediction"
    # a --family override sets the scheduler's prediction type (SD 2.x checkpoints do not say epsilon or v)
    override_sets_prediction = False
    # single-file (original LDM/SGM) key prefixes of each component, as A1111/ComfyUI read them
    single_file_prefixes: dict = {"vae": "first_stage_model.", "unet": "model.diffusion_model."}
    # the text encoders the original layout stores with OpenCLIP names (fused q/k/v `in_proj`,
    # `transformer.resblocks.N`): SD 2.x's ViT-H and SDXL's ViT-bigG; the others keep transformers' names
    openclip_text_encoders: tuple[str, ...] = ()
    # the UNet module names of its kohya/A1111 LoRA files (`lora.py`): kohya's trainer uses diffusers' UNet
    # (its names) for SD 1.x/2.x and the SGM UNet for SDXL, and A1111/ComfyUI/diffusers expect each so
    kohya_sgm_names = False
    pipeline_class = "StableDiffusionPipeline"
    # the loaders' keyword arguments: no safety checker (SD) or invisible watermark (SDXL), as evaluation
    # judges the raw images
    pipeline_kwargs: dict = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    # the pipeline's text encoders, in the order their states are concatenated
    text_encoders: tuple[str, ...] = ("text_encoder",)
    added_conditioning = False  # the UNet's `add_embedding` of a pooled text embedding and size ids
    denoiser_name = "unet"      # the pipeline component that denoises, and that erasure trains
    text_tokens = 77            # the conditioning's sequence length with the released text encoders (plan)
    # What a command uses when the user does not say (`defaults.model_defaults`; MiniSD has its own): the
    # sampling of generate, erase's images and the app, and the evaluation protocol (evaluation.generation.PRESETS).
    sampling_steps = 25
    sampling_guidance = 7.5     # Stable Diffusion's usual guidance
    evaluation_protocol = "paper"

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    def denoiser(self, pipe):
        """The pipeline's denoiser: the UNet, or a diffusion transformer (SD 3, FLUX)."""
        return getattr(pipe, self.denoiser_name)

    def denoise(self, model, z: "Tensor", t: "Tensor", cond: Conditioning) -> "Tensor":
        """`Conditioning.predict` for this family's denoiser (the UNet call)."""
        return model(z, t, **cond.unet_kwargs(z.dtype)).sample

    def check_method(self, method) -> None:
        """Refuse, with one line, an erasure method that has no form for this family's denoiser."""

    def check_erase(self, config, method) -> None:
        """Refuse, before any work, what an `erase` job (`config`: its EraseConfig) cannot do for this family."""
        self.check_method(method)

    def latent_channels(self, denoiser_config) -> int:
        """The VAE latent channels the denoiser (of this config) takes."""
        return denoiser_config.in_channels

    def encode(self, pipe, prompts: Sequence[str], device, size: tuple[int, int] | None = None) -> Conditioning:
        """The UNet conditioning of `prompts` (no classifier-free guidance batch), in fp32 on `device`.
        `size` (height, width) is the image size the conditioning is for (SDXL's size ids); SD 1.x/2.x
        ignore it."""
        hidden = pipe.encode_prompt(list(prompts), device, 1, False)[0]
        return Conditioning(hidden.float())

    def is_cross_attention(self, name: str) -> bool:
        """Is UNet parameter `name` a cross-attention (text) weight: ESD-x's scope, UCE's edit. diffusers
        names every family's text cross-attention `attn2` (`attn1` is self-attention)."""
        return "attn2" in name

    @staticmethod
    def vae_factor(pipe) -> int:
        """Pixels per latent along each side: the VAE downsamples once per level but the last."""
        return 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def image_size(self, pipe) -> tuple[int, int]:
        """(height, width) the loaded pipeline generates by default: UNet sample size x VAE downsampling
        (the family's `default_resolution` for released weights; MiniSD-XL's 16 px for it)."""
        size = pipe.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_factor(pipe), w * self.vae_factor(pipe)

    def latents_image_size(self, pipe, latent_shape: Sequence[int]) -> tuple[int, int]:
        """(height, width) of the images that latents of shape (..., h, w) encode: the size the UNet is
        trained at, so SDXL's size ids say what the training images are (--resolution, or the default)."""
        return latent_shape[-2] * self.vae_factor(pipe), latent_shape[-1] * self.vae_factor(pipe)

    def check_fits(self, detected: "Family") -> None:
        """Refuse this family as a `--family` override of a model detected as `detected` unless both have one
        structure: an override may settle what a checkpoint cannot say (sd2 vs sd2-v), never turn SDXL into
        SD 1.x/2.x or back."""
        if self.pipeline_class != detected.pipeline_class:
            raise ConceptEraseError(f"--family {self.name} does not fit this model: it is {detected.name} "
                                    f"({detected.description})")

    def check_mask(self, mask, source) -> None:
        """Refuse a saliency mask made for the other UNet structure, naming both (before the shape check,
        whose first differing parameter would not say SDXL). The mask records every parameter's name, and
        only SDXL's UNet has the added-conditioning embedding (`add_embedding.*`)."""
        made_for_sdxl = any(name.startswith("add_embedding.") for name, _ in mask.model_shapes)
        if made_for_sdxl != self.added_conditioning:
            raise ConceptEraseError(f"mask {str(source)!r} was made for an {'SDXL' if made_for_sdxl else 'SD 1.x/2.x'} "
                                    f"UNet, but this model is {self.name} ({self.description})")

    def text_modules(self, pipe) -> dict:
        """The pipeline's text encoder(s) by component name, in `text_encoders` order: the one list of them
        (they move, freeze and are exported together)."""
        return {n: getattr(pipe, n) for n in self.text_encoders if getattr(pipe, n, None) is not None}

    @staticmethod
    def tokenizer_of(pipe, encoder: str):
        """The tokenizer whose ids text encoder `encoder` reads (SDXL: each encoder has its own)."""
        return getattr(pipe, encoder.replace("text_encoder", "tokenizer"))


class SD1Family(Family):
    name = "sd1"
    description = "Stable Diffusion 1.x (CLIP ViT-L text encoder, 768-d)"
    single_file_prefixes = {**Family.single_file_prefixes, "text_encoder": "cond_stage_model.transformer."}


class SD2Family(Family):
    """SD 2.x: OpenCLIP ViT-H, stored with OpenCLIP names in the original layout."""

    name = "sd2"
    description = "Stable Diffusion 2.x, epsilon prediction (OpenCLIP ViT-H text encoder, 1024-d)"
    override_sets_prediction = True
    single_file_prefixes = {**Family.single_file_prefixes, "text_encoder": "cond_stage_model.model."}
    openclip_text_encoders = ("text_encoder",)


class SD2VFamily(SD2Family):
    name = "sd2-v"
    description = "Stable Diffusion 2.x, v-prediction (OpenCLIP ViT-H text encoder, 1024-d; 768 px)"
    default_resolution = 768
    prediction_type = "v_prediction"


class SDXLFamily(Family):
    """SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
    Synthesis", section 2.1-2.2): two text encoders and size/crop micro-conditioning."""

    name = "sdxl"
    description = "Stable Diffusion XL base (CLIP ViT-L + OpenCLIP ViT-bigG, 2048-d, size ids)"
    default_resolution = 1024
    latent_scaling = 0.13025
    single_file_prefixes = {**Family.single_file_prefixes, "text_encoder": "conditioner.embedders.0.transformer.",
                            "text_encoder_2": "conditioner.embedders.1.model."}
    openclip_text_encoders = ("text_encoder_2",)
    kohya_sgm_names = True
    pipeline_class = "StableDiffusionXLPipeline"
    pipeline_kwargs = {"add_watermarker": False}
    text_encoders = ("text_encoder", "text_encoder_2")
    added_conditioning = True
    sampling_guidance = 5.0  # diffusers' StableDiffusionXLPipeline default
    evaluation_protocol = "sdxl"

    def encode(self, pipe, prompts: Sequence[str], device, size: tuple[int, int] | None = None) -> Conditioning:
        """hidden: both encoders' penultimate hidden states concatenated on the feature axis (SDXL base:
        768 + 1280 = 2048); text_embeds: text_encoder_2's pooled, projected embedding (1280); time_ids: the
        six size ids (original height, width, crop top, left, target height, width), here the training or
        generation size with no crop, as the pipeline uses by default. An empty prompt is all zeros (hidden
        and pooled) when the pipeline has `force_zeros_for_empty_prompt` (SDXL base), as its unconditional
        branch is."""
        import torch

        prompts = list(prompts)
        hidden, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        hidden, pooled = hidden.float(), pooled.float()
        if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            empty = torch.tensor([not p for p in prompts], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        h, w = size if size is not None else self.image_size(pipe)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=hidden.device)
        self._check_added_dims(pipe, pooled.shape[-1])
        return Conditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), 6)})

    @staticmethod
    def _check_added_dims(pipe, pooled_dim: int) -> None:
        unet = pipe.unet
        expected = unet.add_embedding.linear_1.in_features
        got = pooled_dim + 6 * unet.config.addition_time_embed_dim
        if got != expected:  # the refiner's five ids (with an aesthetic score) land here
            raise ConceptEraseError(f"the UNet's added conditioning takes {expected} values, not the pooled "
                                    f"embedding + six size ids ({got}): not an SDXL base UNet")


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

    def is_cross_attention(self, name: str) -> bool:
        return name.startswith(self.TEXT_EMBEDDERS) or any(part in name for part in self.TEXT_SIDE)

    def check_method(self, method) -> None:
        if not method.transformer_form:
            raise ConceptEraseError(f"--method {method.name} has no form for diffusion transformers yet; on "
                                    f"{self.description} use salun or rl")

    def check_erase(self, config, method) -> None:
        super().check_erase(config, method)
        for flag, value in (("--export-single-file", config.export_single_file), ("--save-delta", config.save_delta)):
            if value:
                raise ConceptEraseError(f"{flag} is not available for diffusion transformers yet ({self.description}); "
                                        "the erased model is written as a diffusers folder")

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

    def t5_length(self, pipe, tokenizer: str) -> int:
        """The T5 sequence length to encode: the pipeline's default, at most the tokenizer's maximum."""
        return min(self.max_sequence_length, getattr(pipe, tokenizer).model_max_length)


class SD3Family(TransformerFamily):
    """Stable Diffusion 3 and 3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution
    Image Synthesis", section 2 and 5.2): an MMDiT with joint blocks on 16-channel latents in 2x2 patches; three
    text encoders."""

    name = "sd3"
    description = "Stable Diffusion 3 / 3.5 (MMDiT; CLIP-L + OpenCLIP bigG + T5-XXL, rectified flow)"
    latent_scaling = 1.5305     # the released VAE's scaling_factor; latents are (x - 0.0609) * 1.5305
    pipeline_class = "StableDiffusion3Pipeline"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    sampling_guidance = 7.0     # diffusers' StableDiffusion3Pipeline default
    config_marker = "pos_embed_max_size"
    max_sequence_length = 256   # StableDiffusion3Pipeline's default
    text_tokens = 77 + max_sequence_length  # CLIP's tokens, then T5's

    def encode(self, pipe, prompts: Sequence[str], device, size: tuple[int, int] | None = None) -> Conditioning:
        """hidden: CLIP-L's and bigG's penultimate states joined on the feature axis (768 + 1280), zero-padded to
        T5's width (4096) and followed on the sequence axis by T5's states (77 + 256 tokens); pooled_projections:
        both CLIP encoders' projected pooled embeddings joined (768 + 1280 = 2048). As the pipeline encodes."""
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.t5_length(pipe, "tokenizer_3"))
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
    sampling_guidance = 3.5     # FLUX.1 dev's distilled guidance, diffusers' FluxPipeline default
    config_marker = "axes_dims_rope"
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
                                               max_sequence_length=self.t5_length(pipe, "tokenizer_2"))
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

    def latent_channels(self, denoiser_config) -> int:
        return denoiser_config.in_channels // 4  # 2x2 patches packed into the channels

    def latent_sample_size(self, pipe) -> int:
        # the transformer's config has no size; the VAE's sample_size is the image size (FLUX.1: 1024)
        return pipe.vae.config.sample_size // self.vae_factor(pipe)


SD1, SD2, SD2_V, SDXL = SD1Family(), SD2Family(), SD2VFamily(), SDXLFamily()
SD3, FLUX = SD3Family(), FluxFamily()
FAMILIES = {f.name: f for f in (SD1, SD2, SD2_V, SDXL, SD3, FLUX)}

# What other families' checkpoints look like, so they are refused by name instead of failing deep in diffusers.
_UNSUPPORTED_PIPELINES = {
    "StableCascadeDecoderPipeline": "Stable Cascade",
    "PixArtAlphaPipeline": "PixArt", "StableDiffusionXLInstructPix2PixPipeline": "SDXL InstructPix2Pix",
}
# The transformers' original single-file layouts (alone, or under `model.diffusion_model.` in all-in-one files):
# SD 3's MMDiT `joint_blocks.N.{x_block,context_block}`, FLUX's `double_blocks.N` / `single_blocks.N` (BFL names).
_TRANSFORMER_KEYS = (("joint_blocks.", SD3), ("double_blocks.", FLUX))


def family_field():
    """The `family` field of every command config that loads a model (`--family`, `concept_erase.cli_args`)."""
    return field(default=None, metadata={
        "help": "the model family, when detection from the checkpoint is not enough (printed when loading; "
                "sd2-v: an SD 2.x v-prediction single file; sd3: SD 3 and 3.5; flux: FLUX.1 dev and schnell)",
        "choices": tuple(FAMILIES)})


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConceptEraseError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(pipe) -> Family:
    """The family of a loaded pipeline: an override set by `set_family` (`--family`), else its components
    (not its class name)."""
    override = getattr(pipe, "_concept_erase_family", None)
    if override is not None:
        return FAMILIES[override]
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        for family in (SD3, FLUX):
            if family.config_marker in transformer.config:
                return family
        raise ConceptEraseError(f"unsupported diffusion transformer {type(transformer).__name__}; supported: "
                                f"SD 3 / 3.5 and FLUX.1")
    if getattr(pipe, "text_encoder_2", None) is not None:
        if getattr(pipe, "text_encoder", None) is None:
            raise ConceptEraseError("this is an SDXL refiner (no first text encoder, aesthetic-score "
                                    "conditioning); erase the SDXL base model instead")
        return SDXL
    if getattr(pipe.unet.config, "addition_embed_type", None) is not None:
        raise ConceptEraseError(f"unsupported UNet added conditioning {pipe.unet.config.addition_embed_type!r}")
    width = getattr(getattr(pipe.text_encoder, "config", None), "hidden_size", 768)
    if width != 1024:
        return SD1
    return SD2_V if pipe.scheduler.config.get("prediction_type") == "v_prediction" else SD2


def set_family(pipe, name: str | None) -> Family:
    """Apply a `--family` override (checked against the pipeline's structure; sd2/sd2-v set the scheduler's
    prediction type), or detect. Returns the family in force."""
    if name is None:
        return family_of(pipe)
    family = get_family(name)
    family.check_fits(family_of(pipe))
    if family.override_sets_prediction and pipe.scheduler.config.get("prediction_type") != family.prediction_type:
        pipe.scheduler.register_to_config(prediction_type=family.prediction_type)
    pipe._concept_erase_family = family.name
    return family


def family_from_keys(keys: Sequence[str]) -> Family:
    """The family of a single-file checkpoint from its tensor names (the original LDM/SGM layout).
    SD 2.x keys do not say epsilon or v-prediction: this answers sd2 (pass --family sd2-v for a 768-v
    checkpoint, or a --config whose scheduler says v_prediction)."""
    keys = list(keys)
    for blocks, family in _TRANSFORMER_KEYS:
        if any(k.startswith((blocks, "model.diffusion_model." + blocks)) for k in keys):
            return family
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders.1.model."):
        return SDXL
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.0.transformer."):
        raise ConceptEraseError("this is an SDXL refiner checkpoint (only the OpenCLIP bigG text encoder); "
                                "erase the SDXL base model instead")
    if has("cond_stage_model.model."):
        return SD2
    if has("cond_stage_model.transformer."):
        return SD1
    if has("model.diffusion_model.label_emb."):
        return SDXL  # a UNet-only SDXL file: the text_time embedding is SDXL's
    if has("model.diffusion_model."):
        return SD1  # a UNet-only file: SD 1.x layout unless --family says otherwise
    raise ConceptEraseError(f"not a Stable Diffusion checkpoint (no model.diffusion_model.* weights among "
                            f"{len(keys)} tensors)")


def family_from_config(folder) -> Family:
    """The family of a diffusers folder from its model_index.json (and scheduler and text encoder configs)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    cls = index.get("_class_name", "")
    if cls in _UNSUPPORTED_PIPELINES:
        raise ConceptEraseError(f"unsupported model family: {_UNSUPPORTED_PIPELINES[cls]} ({cls} in "
                                f"{str(folder / 'model_index.json')!r}); supported: SD 1.x, SD 2.x, SDXL base, "
                                f"SD 3, FLUX.1")
    for family in (SD3, FLUX):
        if cls == family.pipeline_class:
            return family
    if cls.startswith("StableDiffusionXL") or (index.get("text_encoder_2") or [None])[0]:
        if index.get("requires_aesthetics_score") or not (index.get("text_encoder") or [None])[0]:
            raise ConceptEraseError(f"unsupported model family: an SDXL refiner (no first text encoder, aesthetic-"
                                    f"score conditioning, in {str(folder / 'model_index.json')!r}); erase the SDXL "
                                    f"base model instead")
        return SDXL
    try:
        width = json.loads((folder / "text_encoder" / "config.json").read_text()).get("hidden_size", 768)
        prediction = json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("prediction_type")
    except (OSError, ValueError):
        return SD1
    if width != 1024:
        return SD1
    return SD2_V if prediction == "v_prediction" else SD2
