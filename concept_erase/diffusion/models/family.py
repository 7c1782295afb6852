"""What a model family is: the `Family` base class, and `Conditioning`, what a denoiser is conditioned on.

`Conditioning` is the text encoder's hidden states (`encoder_hidden_states`) and per-item extras: SDXL's
`added_cond_kwargs` (the pooled text embedding and the six size ids), a diffusion transformer's pooled
projection and (FLUX.1 dev) guidance. It indexes, concatenates and moves like a tensor, and
`Conditioning.predict(model, z_t, t)` runs the denoiser the family's way (a UNet call; a transformer with its
own argument names, FLUX's packed latents and position ids), so the losses and the erasure loop handle every
family the same way. The families themselves are `families.py` (Stable Diffusion's UNets, the registry and
detection) and `transformers.py` (SD 3 and FLUX).
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
    # a diffusion transformer's original key layout (`single_file.TRANSFORMER_LAYOUTS`), written alone; None: LDM/SGM
    single_file_layout: str | None = None
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

    def sampling_defaults(self, denoiser_config: dict) -> tuple[int, float, str]:
        """(steps, guidance, evaluation protocol) for a model of this family whose denoiser's config.json says
        `denoiser_config` ({} when unread): the class's `sampling_steps`, `sampling_guidance` and
        `evaluation_protocol`, unless the structure says otherwise (FLUX.1 schnell's)."""
        return self.sampling_steps, self.sampling_guidance, self.evaluation_protocol

    def denoiser(self, pipe):
        """The pipeline's denoiser: the UNet, or a diffusion transformer (SD 3, FLUX)."""
        return getattr(pipe, self.denoiser_name)

    def sampling_kwargs(self, pipe) -> dict:
        """Extra keyword arguments of the pipeline's call so that it conditions as `encode` does."""
        return {}

    def guidance_kwargs(self, pipe, guidance_scale: float, negatives: list[str] | None, n: int) -> dict:
        """The pipeline call's guidance for `n` prompts: classifier-free guidance at `guidance_scale` against
        `negatives` (None: the pipeline's empty prompt)."""
        return {"guidance_scale": guidance_scale, "negative_prompt": negatives}

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

    def is_text_key_value(self, name: str) -> bool:
        """Is denoiser parameter `name` one that maps the text into attention keys and values (Concept Ablation's
        `--ca-params kv`): cross-attention's to_k and to_v."""
        return self.is_cross_attention(name) and (".to_k." in name or ".to_v." in name)

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
