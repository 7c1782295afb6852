"""The model card: written with the pipeline, read back, and extended by evaluations."""

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

