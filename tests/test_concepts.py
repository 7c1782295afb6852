"""Concepts: presets follow docs/ALGORITHMS.md 2; custom concepts; prompt files; the preset registry."""

import pytest

from concept_erase.concepts import Concept, get_concept, list_concepts, read_prompt_file, register_concept
from concept_erase.errors import ConceptEraseError


def test_nudity_preset():
    c = get_concept("nudity")
    assert c.forget_prompts[0] == "a photo of a nude person"
    assert c.surrogate_prompts == ["a photo of a person wearing clothes"]
    assert c.surrogate_for(c.forget_prompts[-1]) == "a photo of a person wearing clothes"
    assert c.recipe["num_forget_images"] == 800 and c.recipe["alpha"] == 0.1  # the reference nudity run


def test_imagenette_surrogate_is_next_class_wrapping_around():
    names = [n for n in list_concepts() if n.startswith("imagenette-")]
    assert len(names) == 10
    assert get_concept("imagenette-tench").surrogate_prompts == ["an image of a English springer"]
    parachute = get_concept("imagenette-parachute")  # class 9 -> class 0
    assert parachute.forget_prompts == ["an image of a parachute"]
    assert parachute.surrogate_prompts == ["an image of a tench"]
    assert "an image of a parachute" not in parachute.retain_prompts and len(parachute.retain_prompts) == 9


def test_style_surrogate_drops_the_style():
    c = get_concept("style-van-gogh")
    for forget, surrogate in zip(c.forget_prompts, c.surrogate_prompts):
        assert forget.endswith(" in the style of Van Gogh")
        assert surrogate == forget.removesuffix(" in the style of Van Gogh")
        assert c.surrogate_for(forget) == surrogate
    assert not any("Van Gogh" in p for p in c.retain_prompts)
    with pytest.raises(ConceptEraseError, match="forget prompt 'a cat' is not one of concept 'style-van-gogh'"):
        c.surrogate_for("a cat")  # e.g. from a user's image folder: no pairing to guess


def test_custom_concept_with_retain_file(tmp_path):
    f = tmp_path / "retain.txt"
    f.write_text("# comment\n\na cat\n  a dog  \n")
    c = get_concept(forget="a red car", surrogate="a car", retain_prompts=f)
    assert (c.forget_prompts, c.surrogate_prompts, c.retain_prompts) == (["a red car"], ["a car"], ["a cat", "a dog"])
    # no retain file: the surrogate is what is kept
    assert get_concept(forget=["a", "b"], surrogate="c").retain_prompts == ["c"]
    # a preset's retain prompts can be replaced
    assert get_concept("nudity", retain_prompts=f).retain_prompts == ["a cat", "a dog"]


@pytest.mark.parametrize("text", ["", "# only a comment\n\n   \n"])
def test_empty_prompt_file_is_an_error(tmp_path, text):
    f = tmp_path / "empty.txt"
    f.write_text(text)
    with pytest.raises(ConceptEraseError, match="empty.txt"):
        get_concept(forget="x", surrogate="y", retain_prompts=f)


def test_bad_requests():
    with pytest.raises(ConceptEraseError, match="nope"):
        get_concept("nope")
    with pytest.raises(ConceptEraseError, match="both"):
        get_concept("nudity", forget="x", surrogate="y")
    with pytest.raises(ConceptEraseError, match="--surrogate"):
        get_concept(forget="x")
    with pytest.raises(ConceptEraseError, match="missing.txt"):
        read_prompt_file("missing.txt")
    with pytest.raises(ConceptEraseError, match="3 surrogate prompts for 2 forget"):
        Concept("c", ["a", "b"], ["x", "y", "z"], ["r"])
    with pytest.raises(ConceptEraseError, match="forget prompts"):
        Concept("c", ["  "], ["x"], ["r"])


def test_register_concept():
    from concept_erase import concepts

    def factory():
        return Concept("test-thing", ["a thing"], ["a box"], ["a box"], recipe={"steps": 3})

    register_concept("test-thing", factory)
    try:
        assert get_concept("test-thing").recipe == {"steps": 3}
        assert "test-thing" in list_concepts()
        with pytest.raises(ConceptEraseError, match="already registered"):
            register_concept("test-thing", factory)
        register_concept("test-thing", factory, overwrite=True)
    finally:  # the test's preset leaves with it: later tests walk every shipped preset
        concepts._PRESETS.pop("test-thing")


def test_concepts_command_lists_presets_with_surrogates_and_recipes(capsys):
    from concept_erase.cli import main

    assert main(["concepts"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("minisd-digit-three "))
    assert "a handwritten digit three (+2 more)" in line and "a handwritten digit four (+2 more)" in line
    assert "50 steps, lr 0.0001, batch 16" in line and "48 forget / 216 retain images" in line
    assert any(x.startswith("nudity ") and "a photo of a person wearing clothes" in x for x in out.splitlines())
    assert "imagenette-all (10 presets)" in out
    assert main(["concepts", "minisd-digit-three"]) == 0
    out = capsys.readouterr().out
    assert "  surrogate (3):\n    a handwritten digit four\n" in out and "  retain (27):" in out
    assert main(["concepts", "no-such-concept"]) == 2
    assert "unknown concept 'no-such-concept'" in capsys.readouterr().err


def test_several_concepts_keep_their_own_surrogates_and_a_joint_retain():
    from concept_erase.concepts import get_concepts

    both = get_concepts("imagenette-tench,imagenette-english-springer")
    assert [m.name for m in both.members] == ["imagenette-tench", "imagenette-english-springer"]
    # tench -> English springer is erased too, so it goes on to springer's own surrogate
    assert both.surrogate_prompts == ["an image of a cassette player"] * 2
    assert len(both.retain_prompts) == 8 and not set(both.retain_prompts) & set(both.forget_prompts)
    every = get_concepts("imagenette-all")  # every surrogate erased: the neutral one
    assert len(every.members) == 10 and set(every.surrogate_prompts) == {"an image"}
    with pytest.raises(ConceptEraseError, match="listed twice"):
        get_concepts("nudity,nudity")
    with pytest.raises(ConceptEraseError, match="not both"):
        get_concepts("nudity", forget=["x"], surrogate=["y"])


def test_the_concepts_table_keeps_what_tells_presets_apart(capsys):
    """Long prompts are cut in the middle, so each style row still names its artist."""
    from concept_erase.cli import main

    assert main(["concepts"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    forget = slice(header.index("forget"), header.index("surrogate"))  # the forget column
    rows = [line for line in lines if line.startswith("style-")]
    assert rows and all(line.split()[0].split("-")[-1] in line[forget].lower() for line in rows)
