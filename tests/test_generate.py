"""generate_images: one generator per image; the `generate` command."""

import json

import numpy as np
import pytest
from PIL import Image

from concept_erase.cli import main
from concept_erase.concepts import read_prompt_file
from concept_erase.diffusion.data.generate import generate_images, parse_seeds
from concept_erase.errors import ConceptEraseError


def _px(image):
    return np.asarray(image, dtype=np.int16)


def test_a_seed_means_the_same_image_at_any_batch_size(tiny_pipeline):
    prompts, seeds = ["a cat", "a dog", "a cat", "a cat"], [1, 2, 1, 3]
    batched = generate_images(tiny_pipeline, prompts, seeds, num_inference_steps=2, batch_size=4)
    single = generate_images(tiny_pipeline, prompts, seeds, num_inference_steps=2, batch_size=1)
    assert [im.size for im in batched] == [(32, 32)] * 4 and batched[0].mode == "RGB"
    for a, b in zip(batched, single):
        # identical noise per image; allow one grey level for batch-size-dependent CPU kernels
        assert np.abs(_px(a) - _px(b)).max() <= 1
    assert np.abs(_px(batched[0]) - _px(batched[2])).max() <= 1  # same prompt and seed inside one batch
    assert np.abs(_px(batched[0]) - _px(batched[3])).mean() > 5  # another seed: another image


def test_one_channel_vae_gives_grey_images():
    from concept_erase.diffusion.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0, image_size=16, in_channels=1)
    images = generate_images(pipe, ["x", "y"], [0, 1], num_inference_steps=2, guidance_scale=3.0)
    assert [(im.mode, im.size) for im in images] == [("L", (16, 16))] * 2


def test_long_prompts_are_counted_in_one_warning(tiny_pipeline):
    limit = tiny_pipeline.tokenizer.model_max_length
    long = " ".join(["cat"] * (2 * limit))
    with pytest.warns(UserWarning, match=rf"^2 of 3 prompts are longer than the text encoder's {limit} tokens \(first: prompt 1,") as record:
        generate_images(tiny_pipeline, ["a dog", long, long], [0, 1, 2], num_inference_steps=1, batch_size=1)
    assert len([w for w in record if "longer than the text encoder" in str(w.message)]) == 1


def test_bad_arguments(tiny_pipeline):
    with pytest.raises(ConceptEraseError, match="2 prompts but 1 seeds"):
        generate_images(tiny_pipeline, ["a", "b"], [0])
    with pytest.raises(ConceptEraseError, match="batch size"):
        generate_images(tiny_pipeline, ["a"], [0], batch_size=0)


def test_parse_seeds_and_prompt_files(tmp_path):
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_seeds("7") == [7]
    for bad in ("x", "3-1", "", "-2"):
        with pytest.raises(ConceptEraseError, match="seed"):
            parse_seeds(bad)
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\na cat\n a dog \n")
    assert read_prompt_file(f) == ["a cat", "a dog"]
    f.write_text("\n# only a comment\n")
    with pytest.raises(ConceptEraseError, match="no prompts"):
        read_prompt_file(f)


def test_generate_command(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "imgs"
    args = ["generate", "--model", str(tiny_pipeline_dir), "--prompt", "a cat", "--prompt", "a dog",
            "--seeds", "0-1", "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a cat", 0), ("a cat", 1), ("a dog", 0), ("a dog", 1)]
    assert sorted(p.name for p in out.glob("0*.png")) == [r["file"] for r in rows]
    sheet = Image.open(out / "contact_sheet.png")  # one row per prompt, one column per seed
    assert sheet.size == (150 + 2 * (64 + 2), 20 + 2 * 64)
    # the output exists: refused without --overwrite, exit code 2, nothing touched
    before = (out / "00000.png").read_bytes()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "00000.png").read_bytes() == before
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["generate", "--model", str(tiny_pipeline_dir), "--prompts", str(empty), "--out", str(tmp_path / "x")]) == 2
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "a", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "has no prompts" in err and "does not exist" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_generate_takes_the_base_models_defaults(tmp_path, capsys):
    import shutil

    from concept_erase.diffusion.models.card import model_card
    from concept_erase.diffusion.minisd import minisd_path

    erased = tmp_path / "erased"
    shutil.copytree(minisd_path(), erased)
    (erased / "README.md").write_text(model_card({"base_model": "minisd", "concept": "minisd-digit-three"}))
    out = tmp_path / "imgs"
    assert main(["generate", "--model", str(erased), "--prompt", "a handwritten digit one", "--out", str(out)]) == 0
    row = json.loads((out / "index.jsonl").read_text().splitlines()[0])
    assert (row["steps"], row["guidance"]) == (25, 5.0)
    assert "base_model: minisd): --num-inference-steps 25, --guidance-scale 5" in capsys.readouterr().err
    assert main(["generate", "--model", "minisd", "--prompt", "a", "--height", "512", "--width", "512",
                 "--out", str(tmp_path / "z")]) == 2
    assert "--height 512 px does not suit minisd" in capsys.readouterr().err


def test_generate_reads_a_shipped_prompt_set_by_name(tmp_path):
    from concept_erase.concepts import read_prompt_list
    from concept_erase.diffusion.minisd import DIGITS, STYLES

    assert len(read_prompt_list("minisd-digits")) == len(DIGITS) * len(STYLES)
    with pytest.raises(ConceptEraseError, match="neither a file nor a shipped set"):
        read_prompt_list("minisd-digit")
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,evaluation_seed\na cat,1\na cat,2\na dog,3\n")
    assert read_prompt_list(csv) == ["a cat", "a dog"]


def test_no_progress_hides_the_bar(tiny_pipeline_dir, tmp_path, capsys):
    args = ["generate", "--model", str(tiny_pipeline_dir), "--prompt", "a cat", "--seeds", "0-2",
            "--num-inference-steps", "2", "--output"]
    assert main([*args, str(tmp_path / "a"), "--no-progress"]) == 0
    assert "image" not in capsys.readouterr().err.replace("images", "")  # no bar
    assert main([*args, str(tmp_path / "b")]) == 0
    assert "3/3" in capsys.readouterr().err  # the bar counts images, of how many
