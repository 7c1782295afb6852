"""--help tells the truth about defaults a preset or protocol decides: each number it shows for a shipped
preset (erase's recipe) or protocol (evaluate's sampling) is the one the run resolves, through the same
function the run calls (`EraseConfig.for_concept`, `make_protocol`)."""

import re
from fnmatch import fnmatch

import pytest

from concept_erase.cli import _leaf_parsers, build_parser

RECIPE_FLAGS = {"steps": "--steps", "lr": "--lr", "batch_size": "--batch-size",
                "num_forget_images": "--num-forget-images", "num_retain_images": "--num-retain-images"}
PROTOCOL_FLAGS = {"scheduler": "--scheduler", "num_inference_steps": "--num-inference-steps",
                  "guidance_scale": "--guidance-scale", "resolution": "--resolution"}


def _help_of(command: list[str], flag: str) -> str:
    prog = " ".join(["concept-erase", *command])
    parser = next(p for p in _leaf_parsers(build_parser(command[0])) if p.prog == prog)
    return " ".join(parser._option_string_actions[flag].help.split())


def _shown(help_text: str, key: str) -> str:
    """The value --help gives for `key` ("minisd-*", "else") in "(default: ... (a: 1; b: 2), else 3)"."""
    if key == "else":
        return re.search(r", else ([^)]+)\)$", help_text).group(1)
    return re.search(rf"[(; ]{re.escape(key)}: ([^;)]+)", help_text).group(1)


def _recipe_pattern(help_text: str, preset: str) -> str:
    patterns = re.findall(r"[(; ]([\w*-]+): ", help_text)
    matching = [p for p in patterns if fnmatch(preset, p)]
    assert len(matching) == 1, (preset, patterns)  # every shipped preset is named by exactly one entry
    return matching[0]


def test_erase_help_gives_each_shipped_preset_the_recipe_its_run_resolves(tmp_path):
    from concept_erase.concepts import list_concepts
    from concept_erase.diffusion.training.config import EraseConfig

    helps = {field: _help_of(["erase"], flag) for field, flag in RECIPE_FLAGS.items()}
    custom = EraseConfig.for_concept(model="minisd", output=str(tmp_path / "out"), forget=["a"], surrogate=["b"])
    presets = [name for name in list_concepts() if not name.endswith("-all")]
    assert any(name.startswith("minisd-") for name in presets) and "nudity" in presets
    for name in presets:
        config = EraseConfig.for_concept(model="minisd", output=str(tmp_path / "out"), concept=name)
        for field, help_text in helps.items():
            assert _shown(help_text, _recipe_pattern(help_text, name)) == f"{getattr(config, field):g}", (name, field)
    for field, help_text in helps.items():  # no preset: the field's own default
        assert _shown(help_text, "else") == f"{getattr(custom, field):g}", field


def test_the_help_would_show_a_stale_recipe(monkeypatch):
    """The help is read from the table the presets are built from: change it and both move together."""
    from concept_erase.concepts import RECIPES, get_concept

    monkeypatch.setitem(RECIPES, "nudity", {**RECIPES["nudity"], "steps": 7})
    assert get_concept("nudity").recipe["steps"] == 7
    assert _shown(_help_of(["erase"], "--steps"), "nudity") == "7"


@pytest.mark.parametrize("kind", ["classes", "nudity", "quality"])
def test_evaluate_help_gives_each_protocol_the_settings_its_run_uses(kind):
    from evaluation.generation import PRESETS, make_protocol

    for field, flag in PROTOCOL_FLAGS.items():
        help_text = _help_of(["evaluate", kind], flag)
        for name in PRESETS:
            used = getattr(make_protocol(name), field)  # what evaluate's run builds from --protocol NAME
            expected = "the model's" if used in (None, "model") else f"{used:g}" if isinstance(used, float) \
                else str(used)
            assert _shown(help_text, name) == expected, (kind, field, name)


def test_generate_and_erase_help_give_the_sampling_each_model_resolves(tiny_flux_pipeline_dir, tiny_pipeline_dir,
                                                                      tmp_path):
    """The sampling steps and guidance `generate` and `erase` take from the model: --help shows, for MiniSD, SD
    1.x, FLUX.1 dev and FLUX.1 schnell's structure (a tiny FLUX saved without a guidance embedding), what
    `model_defaults` resolves from those models' folders."""
    from concept_erase.diffusion.models.defaults import model_defaults
    from concept_erase.diffusion.models.tiny import build_tiny_flux_pipeline

    schnell = tmp_path / "schnell"
    build_tiny_flux_pipeline(0, guidance_embeds=False).save_pretrained(schnell)
    models = {"minisd*": "minisd", "sd1": tiny_pipeline_dir, "flux": tiny_flux_pipeline_dir, "flux-schnell": schnell}
    for command in (["generate"], ["erase"]):
        steps_help, guidance_help = _help_of(command, "--num-inference-steps"), _help_of(command, "--guidance-scale")
        for key, model in models.items():
            defaults = model_defaults(model)
            assert _shown(steps_help, key) == f"{defaults.steps:g}", (command, key)
            assert _shown(guidance_help, key) == f"{defaults.guidance:g}", (command, key)
    assert _shown(steps_help, "flux-schnell") == "4" and _shown(guidance_help, "flux") == "3.5"


def test_a_real_erase_run_records_the_recipe_the_help_shows(tmp_path, monkeypatch, capsys):
    """Not the function a run calls but a run: `erase --concept minisd-digit-seven --json` on MiniSD, with the
    preset's own optimizer settings (only the image counts and their sampling steps, which this test does not
    compare, are cut to keep it short), records in its summary the steps, lr and batch size --help prints for
    that preset. Its 50 optimizer steps of 16 make it the slowest test here (about 25 s of CPU; a minute on a
    loaded 2-core machine): a real run is what this test is for."""
    import json

    from concept_erase.cli import main

    monkeypatch.setenv("CONCEPT_ERASE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "erased"
    assert main(["erase", "--model", "minisd", "--concept", "minisd-digit-seven", "--output", str(out), "--json",
                 "--num-forget-images", "3", "--num-retain-images", "27", "--num-inference-steps", "4",
                 "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    recorded = json.loads((out / "erase_summary.json").read_text())
    for field in ("steps", "lr", "batch_size"):
        assert printed[field] == recorded[field], field  # the --json result is the folder's summary
        help_text = _help_of(["erase"], RECIPE_FLAGS[field])
        assert _shown(help_text, _recipe_pattern(help_text, "minisd-digit-seven")) == f"{recorded[field]:g}", field
