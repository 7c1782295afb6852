"""Every command takes its defaults from the model's card and configs: an erased MiniSD keeps MiniSD's."""

import shutil

import pytest

from concept_erase.diffusion.minisd import MINISD_GUIDANCE, minisd_path
from concept_erase.diffusion.models.card import model_card
from concept_erase.diffusion.models.defaults import base_model_of, check_resolution, model_defaults, native_resolution
from concept_erase.errors import ConceptEraseError


def _configs_only(src, dst, base_model=None):
    """A model folder with the configs of `src` (no weights: defaults never load them) and maybe a card."""
    for part in ("unet", "vae"):
        (dst / part).mkdir(parents=True)
        shutil.copy(src / part / "config.json", dst / part / "config.json")
    if base_model is not None:
        (dst / "README.md").write_text(model_card({"base_model": base_model, "concept": "minisd-digit-three"}))
    return dst


def test_minisd_and_models_erased_from_it_share_minisd_defaults(tmp_path):
    first = _configs_only(minisd_path(), tmp_path / "erased", "minisd")
    second = _configs_only(minisd_path(), tmp_path / "erased-again", "erased")  # relative to the folder
    for source in ("minisd", str(first), str(second)):
        d = model_defaults(source)
        assert (d.base_model, d.protocol, d.classifier, d.guidance, d.native_resolution) == (
            "minisd", "minisd", "minisd-digits", MINISD_GUIDANCE, 16), source
    assert base_model_of(str(second))[1].endswith(f"(model card base_model: {first} -> minisd)")


def test_single_file_takes_the_family_of_its_config(tmp_path):
    file = tmp_path / "erased.safetensors"
    file.write_bytes(b"")
    assert model_defaults(str(file), "minisd").protocol == "minisd"
    d = model_defaults(str(file))
    assert (d.protocol, d.native_resolution) == ("paper", None)


def test_other_models_get_the_paper_defaults_at_their_size(tiny_pipeline_dir):
    d = model_defaults(str(tiny_pipeline_dir))
    assert (d.protocol, d.classifier, d.guidance) == ("paper", "microsoft/resnet-50", 7.5)
    assert d.native_resolution == native_resolution(str(tiny_pipeline_dir)) is not None
    assert model_defaults("some-org/some-model").native_resolution is None  # a hub id: unknown offline


def test_a_resolution_that_cannot_suit_the_model_is_an_error():
    d = model_defaults("minisd")
    check_resolution(16, d)
    check_resolution(32, d)  # twice the size still draws
    with pytest.raises(ConceptEraseError, match="512 px does not suit minisd, which draws 16 px images"):
        check_resolution(512, d)
    check_resolution(512, model_defaults("some-org/some-model"))  # unknown size: nothing to check


def test_sdxl_models_get_the_sdxl_protocol(tmp_path, tiny_sdxl_pipeline_dir):
    """SDXL is told from model_index.json alone; an erased copy (card base_model) inherits it."""
    d = model_defaults(str(tiny_sdxl_pipeline_dir))
    assert (d.protocol, d.guidance, d.native_resolution) == ("sdxl", 5.0, 32)
    erased = _configs_only(tiny_sdxl_pipeline_dir, tmp_path / "erased", str(tiny_sdxl_pipeline_dir))
    assert model_defaults(str(erased)).protocol == "sdxl"
    file = tmp_path / "erased.safetensors"
    file.write_bytes(b"")
    assert model_defaults(str(file), str(tiny_sdxl_pipeline_dir)).protocol == "sdxl"
    from evaluation.generation import PRESETS

    sdxl = PRESETS["sdxl"]
    assert (sdxl.scheduler, sdxl.num_inference_steps, sdxl.guidance_scale, sdxl.resolution) == ("euler", 50, 5.0, 1024)


def test_presets_are_refused_on_the_other_world(tiny_pipeline_dir, tmp_path, capsys):
    """A Stable Diffusion preset on MiniSD (800 + 800 nudity images from a digit model) is refused before any
    work, and so is a MiniSD preset on a model of a released checkpoint's size; custom prompts fit anything,
    and the tiny test pipeline (32 px) reads MiniSD's prompts."""
    from dataclasses import replace

    from concept_erase.cli import main
    from concept_erase.concepts import get_concept
    from concept_erase.diffusion.models.defaults import check_concept_fits

    minisd = model_defaults("minisd")
    for name in ("nudity", "imagenette-tench"):
        with pytest.raises(ConceptEraseError, match=f"preset '{name}' is written for Stable Diffusion"):
            check_concept_fits(get_concept(name), minisd)
    check_concept_fits(get_concept("minisd-digit-seven"), minisd)
    check_concept_fits(get_concept("minisd-digit-seven"), model_defaults(str(tiny_pipeline_dir)))
    released = replace(model_defaults(str(tiny_pipeline_dir)), native_resolution=512)
    with pytest.raises(ConceptEraseError, match="preset 'minisd-digit-seven' is written for MiniSD"):
        check_concept_fits(get_concept("minisd-digit-seven"), released)
    check_concept_fits(get_concept("nudity"), released)
    assert main(["erase", "--model", "minisd", "--concept", "nudity", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "minisd-digit-<digit>" in err[0] and not (tmp_path / "o").exists()
