"""Model families: the Conditioning batch type and family detection."""

import json

import pytest
import torch

from concept_erase.diffusion.models.families import (
    FLUX, SD1, SD2, SD2_V, SD3, SDXL, family_from_config, family_from_keys, family_of, set_family,
)
from concept_erase.diffusion.models.family import Conditioning, as_conditioning
from concept_erase.errors import ConceptEraseError


def _cond(n, extras=True):
    g = torch.Generator().manual_seed(n)
    added = {"text_embeds": torch.randn(n, 3, generator=g), "time_ids": torch.randn(n, 6, generator=g)} if extras else {}
    return Conditioning(torch.randn(n, 4, 5, generator=g), added)


def test_conditioning_indexes_concatenates_and_expands_every_part():
    a, b = _cond(2), _cond(3)
    both = Conditioning.cat([a, b])
    assert len(both) == 5 and both.added["time_ids"].shape == (5, 6)
    assert torch.equal(both[2:].hidden, b.hidden) and torch.equal(both[2:].added["text_embeds"], b.added["text_embeds"])
    one = both[torch.tensor([4])]
    assert torch.equal(one.expand(3).added["time_ids"], b.added["time_ids"][2:].expand(3, 6))
    assert len(both[0]) == 1  # an int index keeps the batch axis
    with pytest.raises(ValueError):
        both.expand(2)
    with pytest.raises(ValueError):
        Conditioning.cat([a, _cond(1, extras=False)])


def test_unet_kwargs_pass_added_cond_only_when_present_and_cast():
    plain = as_conditioning(torch.ones(2, 3, 4))
    assert set(plain.unet_kwargs()) == {"encoder_hidden_states"}
    kwargs = _cond(2).unet_kwargs(torch.float16)
    assert kwargs["encoder_hidden_states"].dtype == torch.float16
    assert kwargs["added_cond_kwargs"]["time_ids"].dtype == torch.float16


def test_family_of_tiny_sd_pipeline_encodes_like_the_pipeline(tiny_pipeline):
    family = family_of(tiny_pipeline)
    assert family is SD1 and list(family.text_modules(tiny_pipeline)) == ["text_encoder"]
    cond = family.encode(tiny_pipeline, ["a cat", "a dog"], "cpu")
    expected = tiny_pipeline.encode_prompt(["a cat", "a dog"], "cpu", 1, False)[0]
    assert torch.equal(cond.hidden, expected.float()) and cond.added == {}


@pytest.mark.parametrize("prediction,family", [("epsilon", SD2), ("v_prediction", SD2_V)])
def test_tiny_sd2_pipeline_is_detected_from_its_structure(prediction, family):
    """The tiny SD 2.x pipeline is told apart as released SD 2.x is: a 1024-wide text encoder, and the
    scheduler's prediction type (no class name or marker)."""
    from concept_erase.diffusion.models.tiny import build_tiny_sd2_pipeline

    pipe = build_tiny_sd2_pipeline(prediction_type=prediction)
    assert family_of(pipe) is family
    cond = family.encode(pipe, ["a cat"], "cpu")
    assert cond.hidden.shape == (1, 77, 1024) and cond.added == {}
    out = pipe.unet(torch.zeros(1, 4, 16, 16), torch.tensor([1]), **cond.unet_kwargs()).sample
    assert out.shape == (1, 4, 16, 16)


def test_sdxl_encodes_both_encoders_pooled_embedding_and_size_ids(tiny_sdxl_pipeline):
    pipe = tiny_sdxl_pipeline
    family = family_of(pipe)
    assert family is SDXL and family.default_resolution == 1024
    assert list(family.text_modules(pipe)) == ["text_encoder", "text_encoder_2"]  # in the order they are concatenated
    cond = family.encode(pipe, ["a cat", ""], "cpu", size=(24, 40))
    hidden, _, pooled, _ = pipe.encode_prompt(prompt=["a cat", ""], device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    # 77 x (32 + 48): both penultimate states, concatenated on the feature axis
    assert cond.hidden.shape == (2, 77, 80) and torch.equal(cond.hidden[:1], hidden[:1])
    assert torch.equal(cond.added["text_embeds"][:1], pooled[:1])
    # the empty prompt is zeros (force_zeros_for_empty_prompt), as the pipeline's unconditional branch
    assert not cond.hidden[1].any() and not cond.added["text_embeds"][1].any()
    assert cond.added["time_ids"].tolist() == [[24, 40, 0, 0, 24, 40]] * 2
    default = family.encode(pipe, ["a cat"], "cpu")  # no size: the pipeline's default image size
    assert default.added["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]
    out = pipe.unet(torch.zeros(2, 4, 16, 16), torch.tensor([1, 1]), **cond.unet_kwargs()).sample
    assert out.shape == (2, 4, 16, 16)


def test_family_from_keys_detects_and_refuses_by_name():
    assert family_from_keys(["model.diffusion_model.x", "cond_stage_model.transformer.text_model.y"]) is SD1
    assert family_from_keys(["model.diffusion_model.x", "cond_stage_model.model.positional_embedding"]) is SD2
    assert family_from_keys(["model.diffusion_model.x", "conditioner.embedders.0.transformer.a",
                             "conditioner.embedders.1.model.b"]) is SDXL
    assert family_from_keys(["model.diffusion_model.label_emb.0.0.weight"]) is SDXL  # UNet only
    # the transformers' original layouts, alone or under model.diffusion_model. (all-in-one files)
    assert family_from_keys(["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
                             "text_encoders.clip_l.transformer.text_model.embeddings.position_ids"]) is SD3
    assert family_from_keys(["joint_blocks.0.context_block.attn.qkv.weight"]) is SD3
    assert family_from_keys(["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]) is FLUX
    assert family_from_keys(["model.diffusion_model.double_blocks.0.txt_attn.qkv.weight", "vae.x"]) is FLUX
    cases = {"refiner": ["model.diffusion_model.x", "conditioner.embedders.0.model.text_projection"],
             "not a Stable Diffusion checkpoint": ["some.weight"]}
    for message, keys in cases.items():
        with pytest.raises(ConceptEraseError, match=message):
            family_from_keys(keys)


def test_family_from_config_refuses_other_pipelines(tmp_path, tiny_sdxl_pipeline_dir, tiny_pipeline_dir,
                                                   tiny_flux_pipeline_dir, tiny_sd3_pipeline_dir):
    assert family_from_config(tiny_sdxl_pipeline_dir) is SDXL and family_from_config(tiny_pipeline_dir) is SD1
    assert family_from_config(tiny_flux_pipeline_dir) is FLUX and family_from_config(tiny_sd3_pipeline_dir) is SD3
    refiner = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
               "text_encoder": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    for index, what in (({"_class_name": "PixArtAlphaPipeline"}, "PixArt"), (refiner, "an SDXL refiner")):
        (tmp_path / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ConceptEraseError, match=f"unsupported model family: {what}"):
            family_from_config(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({**refiner, "requires_aesthetics_score": False,
                                                           "text_encoder": ["transformers", "CLIPTextModel"]}))
    assert family_from_config(tmp_path) is SDXL  # an img2img pipeline of the base model is SDXL


def test_family_override_is_checked_and_sets_prediction_type(tiny_pipeline, tiny_sdxl_pipeline):
    with pytest.raises(ConceptEraseError, match="--family sdxl does not fit"):
        set_family(tiny_pipeline, "sdxl")
    with pytest.raises(ConceptEraseError, match="--family sd1 does not fit"):
        set_family(tiny_sdxl_pipeline, "sd1")
    with pytest.raises(ConceptEraseError, match="unknown model family 'sd4'"):
        set_family(tiny_pipeline, "sd4")
    assert set_family(tiny_pipeline, "sd2-v") is SD2_V and family_of(tiny_pipeline) is SD2_V
    assert tiny_pipeline.scheduler.config.prediction_type == "v_prediction"


def test_transformer_pipelines_are_told_apart_by_their_components(tiny_sdxl_pipeline):
    from concept_erase.diffusion.models.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    flux, sd3 = build_tiny_flux_pipeline(0), build_tiny_sd3_pipeline(0)
    assert family_of(flux) is FLUX and family_of(sd3) is SD3  # before SDXL's test: both have a text_encoder_2
    assert FLUX.denoiser(flux) is flux.transformer and SDXL.denoiser(tiny_sdxl_pipeline) is tiny_sdxl_pipeline.unet
    assert list(FLUX.text_modules(flux)) == ["text_encoder", "text_encoder_2"]
    assert list(SD3.text_modules(sd3)) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert FLUX.image_size(flux) == SD3.image_size(sd3) == (32, 32)
    assert set_family(flux, "flux") is FLUX
    with pytest.raises(ConceptEraseError, match="--family sd3 does not fit this model: it is flux"):
        set_family(flux, "sd3")
    # a mask is checked against the denoiser's structure, by its parameter names
    from concept_erase.saliency import SaliencyMask

    flux_mask = SaliencyMask.random(flux.transformer, keep=0.5, seed=0)
    FLUX.check_mask(flux_mask, "f")
    for family, mask in ((SD3, flux_mask), (FLUX, SaliencyMask.random(sd3.transformer, keep=0.5, seed=0)),
                         (FLUX, SaliencyMask.random(tiny_sdxl_pipeline.unet, keep=0.5, seed=0))):
        with pytest.raises(ConceptEraseError, match=f"was not made for a {family.name} transformer"):
            family.check_mask(mask, "m")


def test_refiner_pipeline_is_refused(tiny_sdxl_pipeline):
    tiny_sdxl_pipeline.text_encoder = None  # the refiner has only the OpenCLIP bigG encoder
    with pytest.raises(ConceptEraseError, match="SDXL refiner"):
        family_of(tiny_sdxl_pipeline)
