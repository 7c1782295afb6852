"""The model card: written with the pipeline, read back, and extended by evaluations."""

import re

import pytest
from helpers import assert_same_weights, leftovers

from concept_erase.diffusion.models.card import add_evaluation_to_card, read_model_card, save_pipeline
from concept_erase.diffusion.models.loading import load_pipeline
from concept_erase.errors import ConceptEraseError


def test_save_pipeline_with_model_card(tmp_path, tiny_pipeline):
    card = {"base_model": "runwayml/stable-diffusion-v1-5", "concept": "nudity", "method": "salun",
            "surrogate": "a photo of a person wearing clothes", "keep": 0.5, "steps": 120,
            "evaluation": {"nudenet@0.6": {"exposed": 3}, "fid": 17.5}, "tags": ["my-tag"]}
    out = save_pipeline(tiny_pipeline, tmp_path / "erased", card=card)
    front = read_model_card(out)
    assert front["base_model"] == card["base_model"] and front["keep"] == 0.5 and front["steps"] == 120
    assert {"concept-erasure", "salun", "my-tag", "stable-diffusion"} <= set(front["tags"])
    assert front["evaluation"] == card["evaluation"] and front["surrogate"] == card["surrogate"]
    readme = (out / "README.md").read_text()
    assert "| nudenet@0.6.exposed | 3 |" in readme
    assert_same_weights(load_pipeline(out), tiny_pipeline)
    with pytest.raises(ConceptEraseError, match="already exists"):
        save_pipeline(tiny_pipeline, out)
    assert leftovers(tmp_path) == []
    (tmp_path / "plain.md").write_text("# no front matter\n")
    with pytest.raises(ConceptEraseError, match="no YAML front matter"):
        read_model_card(tmp_path / "plain.md")

    # an evaluation run later adds its figures; the rest of the card stays as it was
    add_evaluation_to_card(out, "nudity", {"images": 8, "exposed_parts": 1})
    after = read_model_card(out)
    assert after["evaluation"] == {**card["evaluation"], "nudity": {"images": 8, "exposed_parts": 1}}
    assert {k: v for k, v in after.items() if k != "evaluation"} == {k: v for k, v in front.items() if k != "evaluation"}
    assert "| nudity.exposed_parts | 1 |" in (out / "README.md").read_text() and leftovers(out) == []



def _code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.DOTALL)


@pytest.mark.parametrize("which", ["sd1", "sdxl"])
def test_the_cards_snippet_runs_for_its_family(which, tmp_path, tiny_pipeline, tiny_sdxl_pipeline):
    """A card names its family's pipeline class (an SDXL card that said StableDiffusionPipeline loaded, then
    failed on the first call), and both of its loading lines run as written, offline."""
    from concept_erase.diffusion.models.card import SINGLE_FILE, THIS_FOLDER
    from concept_erase.diffusion.models.single_file import export_single_file

    pipe = tiny_pipeline if which == "sd1" else tiny_sdxl_pipeline
    out = save_pipeline(pipe, tmp_path / "erased", card={"concept": "cat", "method": "uce", "forget_prompts": ["a cat"]})
    single = export_single_file(pipe, tmp_path / "erased.safetensors")
    blocks = _code_blocks((out / "README.md").read_text())
    assert len(blocks) == 1 and ("StableDiffusionXLPipeline" in blocks[0]) == (which == "sdxl")
    code = blocks[0].replace(SINGLE_FILE, str(single)).replace(THIS_FOLDER, str(out))
    code = code.replace("pipe('a cat')", "pipe('a cat', num_inference_steps=2)")  # fast, the same calls
    scope: dict = {}
    exec(compile(code, "card snippet", "exec"), scope)
    assert scope["image"].size[0] > 0 and type(scope["pipe"]).__name__ == type(pipe).__name__
