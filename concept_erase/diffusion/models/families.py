"""Model families: everything that differs between SD 1.x, SD 2.x, SDXL, SD 3 and FLUX, in one place.

Every part of the library that turns prompts into conditioning, runs the denoiser, picks a default resolution
or names the text-side weights asks the pipeline's `Family` (`family_of(pipe)`), never the pipeline class, and
none tests a family's name: each family is a `Family` subclass whose attributes and overrides say how it differs.

This module holds Stable Diffusion's UNet families (SD 1.x, SD 2.x, SDXL), the registry of every family
(`FAMILIES`, with SD 3 and FLUX from `transformers.py`) and detection from a pipeline, a folder or a checkpoint's
keys. The base class and `Conditioning` are `family.py`.
"""

from __future__ import annotations

from dataclasses import field
from typing import Sequence

from ...errors import ConceptEraseError
from .family import Conditioning, Family
from .transformers import FluxFamily, SD3Family


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
# A FLUX transformer of another width than FLUX.1's is written under diffusers' names (`single_file.flux_single_file`).
_TRANSFORMER_KEYS = (("joint_blocks.", SD3), ("double_blocks.", FLUX), ("single_transformer_blocks.", FLUX))


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
