"""`concept-erase attack` and `concept-erase audit` on MiniSD at the tiny CI budget, and their one-line errors.

The "erased" model here is a prompt-only erasure made in seconds: the text encoder's token embedding of
"seven" is overwritten by that of "one", so prompts for seven draw one while the UNet still knows seven.
"""

import json

import pytest
import torch

from concept_erase.cli import main


@pytest.fixture(scope="module")
def remapped(tmp_path_factory):
    from concept_erase.diffusion.models.card import save_pipeline
    from concept_erase.diffusion.models.loading import load_pipeline

    pipe = load_pipeline("minisd")
    ids = [pipe.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("seven", "one")]
    weight = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids[0]] = weight[ids[1]]
    path = tmp_path_factory.mktemp("remap") / "seven-as-one"
    save_pipeline(pipe, path, card={"base_model": "minisd", "concept": "minisd-digit-seven", "method": "token remap"})
    return path


FAST = ["--seeds", "0", "--steps", "8", "--tiny-budget"]


def test_audit_writes_markdown_html_and_card(remapped, tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(["audit", str(remapped), "--base", "minisd", "--concept", "minisd-digit-seven", "--out", str(out),
                 "--retain-prompts", "3", "--update-card", *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["attacks"]) == {"inversion", "unlearndiffatk", "ringabell", "embedding"}
    assert results["forget"]["prompts"] == 3 and results["forget"]["base_detected"] == 100.0
    assert results["forget"]["forget_rate"] == 100.0  # "seven" now draws a one
    for a in results["attacks"].values():
        assert a["asr"] >= a["pre_asr"] and a["budget"]
    assert results["neighbours"]["images"] == 6 and results["retain"]["erased"]["digit"] >= 0
    assert "judge_frechet" in results["quality"] and results["erasure"] is None
    md = (out / "report.md").read_text()
    assert "Pre-ASR" in md and "(Pre-ASR) OR" in md and "MiniSD digit judge" in md
    # the answer first, the protocol last; counts a person can read; what each attack does
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Verdict" and sections[-1] == "## Protocol"
    assert "**Erased: yes.** The concept shows in 0 of 3 of the erased model's images" in md
    assert "(base model: 3 of 3)" in md and "lower is better" in md and "the worst neighbour is '" in md
    assert "- embedding: the conditioning-space bound" in md and " of 3 |" in md
    assert "By prompt (digit and style both right)" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and 'src="http' not in page and 'src="grid' not in page
    card = (remapped / "README.md").read_text()
    assert "audit:" in card and "forget_rate: 100.0" in card
    assert "forget rate 100.0%" in capsys.readouterr().out


def test_attack_saves_what_it_learned_and_replays_it_on_another_model(remapped, tmp_path):
    out = tmp_path / "att"
    assert main(["attack", "--model", str(remapped), "--concept", "minisd-digit-seven", "--attack", "embedding",
                 "--attack", "unlearndiffatk", "--out", str(out), *FAST]) == 0
    first = json.loads((out / "results.json").read_text())
    assert (out / "embedding" / "learned.safetensors").is_file()
    assert first["attacks"]["unlearndiffatk"]["per_row"][0]["adversarial_prompt"].endswith("digit seven")
    again = tmp_path / "replay"
    assert main(["attack", "--model", str(remapped), "--concept", "minisd-digit-seven", "--replay", str(out),
                 "--out", str(again), "--seeds", "0", "--steps", "8"]) == 0
    second = json.loads((again / "results.json").read_text())
    for name in ("embedding", "unlearndiffatk"):  # same model, same seeds: the replay draws the same images
        assert second["attacks"][name]["replayed"]
        assert second["attacks"][name]["replay"] == {"from_model": str(remapped), "as": "learned tensors",
                                                      "from": "sd1 (text_encoder 32 wide, conditioning 32)"}
        assert second["attacks"][name]["per_row"] == first["attacks"][name]["per_row"]
    assert f"- embedding: replayed from {remapped} (sd1" in (again / "report.md").read_text()


def test_an_attack_that_blows_up_exits_2_and_writes_nothing(remapped, tmp_path, capsys):
    out = tmp_path / "att"
    assert main(["attack", "--model", str(remapped), "--concept", "minisd-digit-seven", "--attack", "embedding",
                 "--embedding-lr", "1e30", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("concept-erase: error: embedding attack: its objective is nan at step"), err
    assert not out.exists() and not any(tmp_path.iterdir())


def test_audit_checks_what_it_needs_before_the_first_image(monkeypatch, tmp_path, capsys):
    from concept_erase.diffusion.models import loading

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_pipeline", no_model)
    audit = ["audit", "minisd", "--base", "minisd", "--concept", "minisd-digit-seven", "--out", str(tmp_path / "a")]
    for flags, message in ((["--retain-prompts", "1", "--seeds", "0"], "the quality step's Frechet distance needs "
                                                                       "at least 2"),
                           (["--fid-weights", str(tmp_path / "none.pth")], "does not exist"),
                           (["--clip-model", str(tmp_path / "no-clip")], "does not exist")):
        assert main([*audit, *flags]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv,message", [
    (["--concept", "minisd-digit-seven", "--attack", "unlearndiffatk", "--unlearndiffatk-steps", "0"],
     "--unlearndiffatk-steps must be >= 1, got 0"),
    (["--concept", "minisd-digit-seven", "--attack", "embedding", "--inversion-steps", "9"], "'inversion' is not run"),
    (["--concept", "minisd-digit-seven", "--attack", "ringabell", "--ringabell-eta", "0"],
     "--ringabell-eta must be > 0"),
    (["--concept", "minisd-digit-seven", "--attack", "embedding", "--embedding-lr", "inf"],
     "--embedding-lr must be a finite number, got inf"),
    (["--concept", "minisd-digit-seven", "--attack", "ringabell", "--ringabell-eta", "-inf"],
     "--ringabell-eta must be a finite number, got -inf"),
    (["--concept", "style-van-gogh", "--attack", "embedding"], "'style-van-gogh' has no detector"),
    (["--concept", "minisd-digit-seven"], "name an --attack"),
])
def test_bad_attack_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "x"
    assert main(["attack", "--model", "minisd", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # notices (chosen defaults) may come first
    errors = [line for line in err if line.startswith("concept-erase: error:")]
    assert errors == [err[-1]] and message in err[-1], err
    assert not out.exists()


def test_unknown_attack_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["attack", "--model", "minisd", "--concept", "minisd-digit-seven", "--attack", "pez", "--out", str(tmp_path)])
    assert "invalid choice: 'pez'" in capsys.readouterr().err
