"""MiniSD: loads offline as a real StableDiffusionPipeline, its judges are accurate on held-out real digits,
the training script is deterministic, and one short real SalUn erasure works."""

import numpy as np
import pytest
import torch

from concept_erase.errors import ConceptEraseError


def test_prompts_and_vocabulary():
    from concept_erase.diffusion.minisd import DIGITS, STYLES, minisd_prompt, vocabulary
    from concept_erase.diffusion.minisd.model import MODEL_MAX_LENGTH
    from concept_erase.diffusion.models.tiny import build_tokenizer

    assert minisd_prompt("seven") == "a handwritten digit seven"
    assert minisd_prompt(7, "negative") == "a handwritten digit seven in negative"
    assert minisd_prompt("one", "bold") == "a handwritten digit one in bold strokes"
    assert len({minisd_prompt(d, s) for d in DIGITS for s in STYLES}) == 30
    with pytest.raises(ConceptEraseError, match="'eleven'"):
        minisd_prompt("eleven")
    with pytest.raises(ConceptEraseError, match="'italic'"):
        minisd_prompt("one", "italic")
    # One token per word (docs/MINISD.md): the longest prompt fits in 16 tokens with BOS/EOS.
    tok = build_tokenizer(vocabulary(), model_max_length=MODEL_MAX_LENGTH)
    ids = tok(minisd_prompt("seven", "bold")).input_ids
    assert len(ids) == len(minisd_prompt("seven", "bold").split()) + 2 <= MODEL_MAX_LENGTH


def test_concept_presets_cover_every_variant():
    from concept_erase.concepts import get_concept, list_concepts
    from concept_erase.diffusion.minisd import minisd_prompt
    from concept_erase.diffusion.minisd.presets import digit_concept

    assert {"minisd-digit-seven", "minisd-style-bold", "minisd-style-negative"} <= set(list_concepts())
    c = get_concept("minisd-digit-seven")
    assert c.forget_prompts == [minisd_prompt("seven", s) for s in ("plain", "bold", "negative")]
    assert c.surrogate_for(minisd_prompt("seven", "negative")) == minisd_prompt("eight", "negative")
    assert len(c.retain_prompts) == 27 and not any("seven" in p for p in c.retain_prompts)
    s = get_concept("minisd-style-bold")
    assert len(s.forget_prompts) == 10 and all("bold" in p for p in s.forget_prompts)
    assert s.surrogate_for(minisd_prompt("three", "bold")) == minisd_prompt("three")
    assert not any("bold" in p for p in s.retain_prompts)
    with pytest.raises(ConceptEraseError, match="surrogate"):
        digit_concept("seven", surrogate="seven")


def test_style_transforms():
    from concept_erase.diffusion.minisd.data import load_digit_images

    test = load_digit_images("test")
    assert test.images.shape[1:] == (1, 16, 16) and len(test) == 3 * 360
    plain, bold, neg = (test.images[test.styles == s] for s in range(3))
    assert torch.allclose(neg, 1 - plain)
    assert (bold >= plain).all() and bold.mean() > plain.mean() + 0.05


def test_assets_are_small_safe_and_load_offline():
    from diffusers import StableDiffusionPipeline

    from concept_erase.diffusion.models.loading import load_pipeline
    from concept_erase.diffusion.minisd import ASSETS, minisd_path

    for assets in (ASSETS, minisd_path("minisd-xl").parent):  # MiniSD, MiniSD-XL: at most 10 MB each
        files = [p for p in assets.rglob("*") if p.is_file()]
        assert sum(p.stat().st_size for p in files) <= 10 * 2**20, assets
        assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")]
    assert (minisd_path() / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = load_pipeline("minisd")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == torch.float32 and pipe.vae.config.in_channels == 1
    images = pipe(["a handwritten digit three"], num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (16, 16) and images[0].mode == "L"
    xl = load_pipeline("minisd-xl")
    assert type(xl).__name__ == "StableDiffusionXLPipeline" and xl.unet.config.addition_embed_type == "text_time"
    assert xl.text_encoder_2.config.hidden_size != xl.text_encoder.config.hidden_size  # as SDXL's (768, 1280)
    images = xl(["a handwritten digit three"], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (16, 16) and images[0].mode == "L"


def test_judges_accurate_on_held_out_real_digits():
    from concept_erase.diffusion.minisd.data import load_digit_images
    from concept_erase.diffusion.minisd.judge import load_judges

    judges = load_judges()
    test = load_digit_images("test")  # every 5th source digit, never seen by the judges, in all styles
    # As PIL images: the path the judges take on generated images.
    from PIL import Image

    images = [Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8), mode="L") for x in test.images]
    assert (judges.predict_digits(images) == test.digits.numpy()).mean() >= 0.97
    assert (judges.predict_styles(images) == test.styles.numpy()).mean() >= 0.97
    from evaluation.quality import images_to_uint8

    assert judges.fid_features()(images_to_uint8(images[:5])).shape == (5, 128)


def test_the_digit_presets_neighbours_are_the_judges_confusions():
    """The presets' torch-free table (so a preset builds without torch) is what the packaged judge measures;
    retraining the judges without updating the table fails here."""
    from concept_erase.concepts import get_concept
    from concept_erase.diffusion.minisd import minisd_prompt
    from concept_erase.diffusion.minisd.judge import confusable_digits
    from concept_erase.diffusion.minisd.presets import CONFUSABLE_DIGITS

    assert CONFUSABLE_DIGITS == {d: confusable_digits(d) for d in range(10)}
    assert minisd_prompt(CONFUSABLE_DIGITS[7][0], "bold") in get_concept("minisd-digit-seven").neighbours


def test_training_is_deterministic(tmp_path):
    from concept_erase.diffusion.minisd.train import MiniSDTrainConfig, save_minisd, train_minisd

    config = MiniSDTrainConfig(vae_steps=2, unet_steps=3, warmup_steps=1, batch_size=8)
    a, summary = train_minisd(config)
    b, _ = train_minisd(config)
    for (name, x), (_, y) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(x, y), name
    out = save_minisd(a, summary, tmp_path / "m")
    assert (out / "training.json").is_file() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(ConceptEraseError, match="--unet-steps must be >= 1, got 0"):
        MiniSDTrainConfig(unet_steps=0)


def test_training_with_exclude_never_shows_the_digit(monkeypatch):
    """The never-knew model: neither the VAE's images nor the UNet's (latent, prompt) pairs hold a seven; the
    prompts of the digits it keeps are the ones MiniSD trains on."""
    from concept_erase.diffusion.minisd import DIGITS, train
    from concept_erase.diffusion.minisd.data import load_digit_images

    seen = {}

    def train_unet(pipe, latents, ids, *_):
        seen["ids"] = ids
        return pipe.unet.state_dict()

    monkeypatch.setattr(train, "train_vae", lambda vae, images, *_: seen.setdefault("vae", images))
    monkeypatch.setattr(train, "train_unet", train_unet)
    train.train_minisd(train.MiniSDTrainConfig(exclude="seven", vae_steps=1, unet_steps=2, warmup_steps=1))
    data = load_digit_images("train")
    sevens = data.digits == 7
    assert len(seen["vae"]) == int((~sevens).sum()) and torch.equal(seen["vae"], data.images[~sevens])
    assert not bool((seen["ids"] % 10 == 7).any()) and set((seen["ids"] % 10).tolist()) == set(range(10)) - {7}
    for bad, named in (("sevn", "unknown MiniSD digit 'sevn'"), (",".join(DIGITS), "leaves no digit")):
        with pytest.raises(ConceptEraseError, match=named):
            train.MiniSDTrainConfig(exclude=bad)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from concept_erase.cli import main

    (tmp_path / "taken").mkdir()
    for argv, named in ((["train", "--output", str(tmp_path / "taken")], "already exists"),
                        (["check", "--seeds", "0"], "--num-seeds must be >= 1, got 0"),
                        (["train-judges", "--output", str(tmp_path / "j"), "--epochs", "0"], "--epochs must be >= 1"),
                        (["check", "--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan")):
        assert main(["minisd", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("concept-erase: error: ") and named in err, err
    assert not (tmp_path / "j").exists()


@pytest.fixture(scope="module", params=["minisd", "minisd-xl"])
def short_erasure(request):
    """A short real SalUn run on MiniSD, and on MiniSD-XL through the SDXL path (two text encoders, pooled
    embedding, size ids): forget "seven" (all styles) -> "eight"."""
    from concept_erase.diffusion.training.config import TrainConfig
    from concept_erase.diffusion.training.loop import train_unet
    from concept_erase.diffusion.training.mask_pass import compute_mask
    from concept_erase.diffusion.models.loading import load_pipeline
    from concept_erase.diffusion.minisd.experiment import MASK_BATCH_SIZE, make_latent_sets
    from concept_erase.diffusion.minisd.judge import generate_digit_set, load_judges, score_set
    from concept_erase.diffusion.minisd.presets import digit_concept

    judges = load_judges()
    pipe = load_pipeline(request.param)
    concept = digit_concept("seven")
    before = score_set(judges, generate_digit_set(pipe, seeds=range(4)))
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    forget, retain = make_latent_sets(pipe, concept, 48, 162)
    mask = compute_mask(pipe, forget, keep=0.5, batch_size=MASK_BATCH_SIZE)
    train_unet(pipe, forget, retain, TrainConfig(method="salun", steps=30, lr=1e-4, batch_size=16), mask=mask)
    after = score_set(judges, generate_digit_set(pipe, seeds=range(4)))
    return before, after, base, pipe.unet, mask


def test_minisd_meets_its_quality_bar(short_erasure):
    """Before any erasure, every digit in every style (4 seeds each) is judged the requested digit and the
    requested style at least 90% of the time (the bar; `concept-erase minisd check` runs more seeds), for
    MiniSD and MiniSD-XL alike."""
    before = short_erasure[0]
    assert before["images"] == 120
    assert before["digit_accuracy"] >= 0.9 and before["style_accuracy"] >= 0.9, before


def test_short_erasure_forgets_seven_and_keeps_the_rest(short_erasure):
    from concept_erase.demo import other_accuracy

    before, after, *_ = short_erasure
    b7, a7 = before["per_digit"]["seven"]["digit"], after["per_digit"]["seven"]["digit"]
    assert b7 >= 0.75
    assert a7 <= b7 / 2, (b7, a7)
    assert other_accuracy(after, "seven") >= other_accuracy(before, "seven") - 0.10


def test_short_erasure_leaves_weights_outside_the_mask_bit_identical(short_erasure):
    _, _, base, unet, mask = short_erasure
    changed = 0
    for name, p in unet.named_parameters():
        frozen = ~mask.masks[name]
        assert torch.equal(p.detach()[frozen], base[name][frozen]), name
        changed += int((p.detach()[~frozen] != base[name][~frozen]).sum())
    assert changed > 0
