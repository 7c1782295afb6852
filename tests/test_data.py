"""Forget/retain image sets: generated once, cached with a manifest, resumable; user folders; latents."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from concept_erase.diffusion.data import generate as generate_module
from concept_erase.diffusion.data.folder import read_jsonl
from concept_erase.diffusion.data.generate import SamplingSettings
from concept_erase.diffusion.data.images import ImageSet, encode_latents
from concept_erase.diffusion.models.tiny import build_tiny_pipeline
from concept_erase.errors import ConceptEraseError

FAST = SamplingSettings(num_inference_steps=2, guidance_scale=3.0)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


@pytest.fixture
def count_generated(monkeypatch):
    """Counts the images actually generated (generate_images is looked up at call time by images.py)."""
    calls = []
    real = generate_module.generate_images

    def counting(pipe, prompts, seeds, **kw):
        calls.extend(zip(prompts, seeds))
        return real(pipe, prompts, seeds, **kw)

    monkeypatch.setattr(generate_module, "generate_images", counting)
    return calls


def manifest_rows(root):
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def test_generated_once_then_reused_and_extended(tmp_path, pipe, count_generated):
    first = ImageSet.generate(pipe, ["a cat", "a dog"], 2, tmp_path, seed=10, settings=FAST, batch_size=3)
    assert first.prompts == ["a cat", "a cat", "a dog", "a dog"] and first.seeds == [10, 11, 12, 13]
    assert len(count_generated) == 4 and len(manifest_rows(first.root)) == 4
    assert all(p.is_file() for p in first.paths)

    again = ImageSet.generate(pipe, ["a cat", "a dog"], 2, tmp_path, seed=10, settings=FAST)
    assert len(count_generated) == 4  # nothing regenerated
    assert again.paths == first.paths

    # more seeds of the same prompts, same model and settings: only the new ones are generated
    more = ImageSet.generate(pipe, ["a cat"], 4, tmp_path, seed=10, settings=FAST)
    assert more.seeds == [10, 11, 12, 13] and count_generated[4:] == [("a cat", 12), ("a cat", 13)]
    # the cached image is the image generate_images gives for that (prompt, seed)
    direct = generate_module.generate_images(pipe, ["a dog"], [13], num_inference_steps=2, guidance_scale=3.0)[0]
    cached = Image.open(first.paths[3])
    assert np.abs(np.asarray(direct, np.int16) - np.asarray(cached, np.int16)).max() <= 1

    # other weights or other settings: another cache entry
    other = ImageSet.generate(build_tiny_pipeline(seed=1), ["a cat"], 1, tmp_path, seed=10, settings=FAST)
    slower = ImageSet.generate(pipe, ["a cat"], 1, tmp_path, seed=10, settings=SamplingSettings(3, 3.0))
    assert len({first.root, other.root, slower.root}) == 3
    with pytest.raises(ConceptEraseError, match="non-empty prompts"):
        ImageSet.generate(pipe, ["ok", " "], 1, tmp_path)
    with pytest.raises(ConceptEraseError, match="--num-inference-steps must be >= 1, got 0"):
        SamplingSettings(num_inference_steps=0)


def test_concurrent_runs_sharing_a_fresh_cache_generate_each_image_once(tmp_path, pipe, count_generated):
    """Two runs (threads here: the lock is a per-open flock, so it works the same between processes) ask the
    same fresh cache for the same images: the second waits for the first and then generates nothing."""
    import threading

    other = build_tiny_pipeline(seed=0)  # the same weights, its own modules: the runs share nothing in memory
    sets = []
    runs = [threading.Thread(target=lambda p=p: sets.append(
        ImageSet.generate(p, ["a cat", "a dog"], 3, tmp_path, seed=5, settings=FAST, batch_size=2)))
        for p in (pipe, other)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(120)
    assert len(sets) == 2 and sets[0].paths == sets[1].paths
    assert sorted(count_generated) == sorted({(p, s) for p, s in zip(sets[0].prompts, sets[0].seeds)})
    assert len(manifest_rows(sets[0].root)) == 6


def test_a_set_has_exactly_the_number_of_images_asked(tmp_path, pipe, count_generated):
    """8 images of 3 prompts are 3 + 3 + 2, not 9; fewer images than prompts is refused before generating."""
    from concept_erase.diffusion.data.images import images_per_prompt

    images = ImageSet.generate(pipe, ["a", "b", "c"], 3, tmp_path, seed=0, settings=FAST, total=8)
    assert len(images) == 8 and len(count_generated) == 8
    assert [images.prompts.count(p) for p in "abc"] == [3, 3, 2]
    assert images_per_prompt(27, 9) == [3] * 9 and images_per_prompt(10, 4) == [3, 3, 2, 2]
    with pytest.raises(ConceptEraseError, match="--num-retain-images 3 is fewer than the 9 prompts"):
        images_per_prompt(3, 9, "--num-retain-images")


def test_concurrent_runs_encode_the_latents_once(tmp_path, pipe, monkeypatch):
    import threading

    from concept_erase.diffusion.data import images as data

    images = ImageSet.generate(pipe, ["a cat"], 2, tmp_path, settings=FAST)
    calls = []
    real = data.encode_latents

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "encode_latents", counting)
    results = []
    runs = [threading.Thread(target=lambda p=p: results.append(images.latents(p)))
            for p in (pipe, build_tiny_pipeline(seed=0))]
    for run in runs:
        run.start()
    for run in runs:
        run.join(120)
    assert len(results) == 2 and torch.equal(results[0], results[1]) and len(calls) == 1


def test_interrupted_generation_resumes(tmp_path, pipe, monkeypatch, count_generated):
    real = generate_module.generate_images
    batches = []

    def dies_on_second_batch(*args, **kw):
        batches.append(1)
        if len(batches) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(generate_module, "generate_images", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        ImageSet.generate(pipe, ["a cat", "a dog"], 2, tmp_path, settings=FAST, batch_size=2)
    (root,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(manifest_rows(root)) == 2 and len(list((root / "images").glob("*.png"))) == 2
    with open(root / "manifest.jsonl", "a") as f:
        f.write('{"file": "images/half')  # a line cut short by the kill

    monkeypatch.setattr(generate_module, "generate_images", real)
    done = ImageSet.generate(pipe, ["a cat", "a dog"], 2, tmp_path, settings=FAST, batch_size=2)
    assert len(done) == 4 and all(p.is_file() for p in done.paths)
    # the torn line was ended, not extended: every image is listed, so the next run generates nothing
    assert len(read_jsonl(root / "manifest.jsonl")) == 4
    assert not [p for p in (root / "images").iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_latents_are_the_posterior_mean_and_cached(tmp_path, pipe, monkeypatch):
    images = ImageSet.generate(pipe, ["a cat"], 3, tmp_path, settings=FAST)
    latents = images.latents(pipe, batch_size=2)
    assert latents.shape == (3, 4, 16, 16) and latents.dtype == torch.float32
    x = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 127.5 - 1 for im in images.images()])).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    torch.testing.assert_close(latents, want, rtol=1e-4, atol=1e-5)
    assert len(list(images.root.glob("latents-*.safetensors"))) == 1
    # another training resolution: other latents, cached apart
    assert images.latents(pipe, size=(64, 64)).shape == (3, 4, 32, 32)
    assert len(list(images.root.glob("latents-*.safetensors"))) == 2

    def refuse(*a, **k):
        raise AssertionError("latents were re-encoded instead of read from the cache")

    monkeypatch.setattr("concept_erase.diffusion.data.images.encode_latents", refuse)
    assert torch.equal(images.latents(pipe), latents)


def test_user_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(ConceptEraseError, match="needs a prompt"):
        ImageSet.from_folder(folder)
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "text": f"shade {i}"}) + "\n" for i in range(3)))
    images = ImageSet.from_folder(folder, cache_dir=tmp_path / "cache")
    assert images.prompts == ["shade 0", "shade 1", "shade 2"] and images.seeds == [None] * 3
    assert ImageSet.from_folder(folder, prompt="grey").prompts == ["grey"] * 3

    # a 1-channel, 16 px model: RGB images of another size are converted and resized
    grey = build_tiny_pipeline(seed=0, image_size=16, in_channels=1)
    latents = images.latents(grey)
    assert latents.shape == (3, 4, 8, 8)
    assert len(list((tmp_path / "cache").rglob("latents-*.safetensors"))) == 1
    assert not list(folder.glob("latents*"))  # nothing written into the user's folder
    torch.testing.assert_close(encode_latents(grey, images.images(), batch_size=1), latents)
    # the user replaces an image by another of the same size: its latents are re-encoded, not read stale
    Image.fromarray(np.full((20, 24, 3), 250, np.uint8)).save(folder / "0.png")
    os.utime(folder / "0.png", ns=(1, 1))  # a different modification time, whatever the clock's resolution
    again = ImageSet.from_folder(folder, cache_dir=tmp_path / "cache").latents(grey)
    assert not torch.equal(again[0], latents[0]) and torch.equal(again[1:], latents[1:])

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConceptEraseError, match="no images"):
        ImageSet.from_folder(tmp_path / "empty", prompt="x")
    with pytest.raises(ConceptEraseError, match="does not exist"):
        ImageSet.from_folder(tmp_path / "nope", prompt="x")


def test_the_image_phase_says_what_it_makes_and_how_long_it_takes(tmp_path, capsys):
    pipe = build_tiny_pipeline(seed=0)
    ImageSet.generate(pipe, ["a cat", "a dog"], 3, tmp_path, settings=FAST, batch_size=2, progress=True,
                      label="forget images")
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("concept-erase: forget images: generating 6 images"))
    assert f"({FAST.num_inference_steps} steps each)" in line and "about " in line and "s per image" in line
    assert "forget images: 100%" in err and "6/6" in err  # the bar names them and counts them
    ImageSet.generate(pipe, ["a cat", "a dog"], 3, tmp_path, settings=FAST, batch_size=2, label="forget images")
    assert "generating" not in capsys.readouterr().err  # all cached: nothing to announce
    # --no-progress hides the bar, never the status line (a long silent run looks hung)
    ImageSet.generate(pipe, ["a bird", "a fish"], 3, tmp_path, settings=FAST, batch_size=2, label="retain images")
    err = capsys.readouterr().err
    assert "concept-erase: retain images: generating 6 images" in err and "6/6" not in err
