"""Quality metrics on constructed inputs: FID with a dummy feature extractor (a set against itself is ~0),
CLIP score with a tiny random CLIP read from a folder, sum-reduced states merging across shards."""

import numpy as np
import pytest
import torch
from PIL import Image

from concept_erase.errors import ConceptEraseError
from evaluation.quality import ClipScore, images_to_uint8, load_clip, make_fid, score_quality


class MeanColourFeatures(torch.nn.Module):
    """A stand-in for Inception: uint8 [N, 3, H, W] -> 12 colour statistics (4 quadrants x 3 channels)."""

    num_features = 12

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)


def random_images(n, seed, scale=255):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, scale, (24, 24, 3), dtype=np.uint8)) for _ in range(n)]


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    images = random_images(40, 0)
    same = score_quality(images, ["p"] * 40, reference=images, fid=make_fid(MeanColourFeatures()))
    assert same["fid"] == pytest.approx(0, abs=1e-6) and same["clip_score"] is None
    darker = random_images(40, 1, scale=128)
    shifted = score_quality(darker, ["p"] * 40, reference=images, fid=make_fid(MeanColourFeatures()))["fid"]
    assert shifted > 0.01
    # one metric scoring two models in turn: the second score is what a fresh metric gives
    reused = make_fid(MeanColourFeatures())
    score_quality(images, ["p"] * 40, reference=images, fid=reused)
    assert score_quality(darker, ["p"] * 40, reference=images, fid=reused)["fid"] == pytest.approx(shifted, rel=1e-5)


def test_fid_state_merges_across_shards():
    real, fake = images_to_uint8(random_images(20, 0)), images_to_uint8(random_images(20, 1, scale=200))
    whole, a, b = (make_fid(MeanColourFeatures()) for _ in range(3))
    whole.update(real, real=True)
    whole.update(fake, real=False)
    a.update(real[:10], real=True)
    a.update(fake[:5], real=False)
    b.update(real[10:], real=True)
    b.update(fake[5:], real=False)
    a.merge_state(b)
    assert float(a.compute()) == pytest.approx(float(whole.compute()), rel=1e-5)


def test_inception_fid_without_its_weights_is_a_clear_error():
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity is installed")
    except Exception:
        pass
    with pytest.raises(ConceptEraseError, match="Inception"):
        make_fid()


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from concept_erase.diffusion.models.tiny import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(["cat", "dog"])
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1, image_size=32, patch_size=8)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_clip_score_matches_the_definition_and_merges(tiny_clip_dir):
    model, processor = load_clip(tiny_clip_dir)
    images, prompts = random_images(4, 2), ["a cat", "a dog", "cat", "dog"]
    with torch.no_grad():
        img = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
        txt = model.get_text_features(**processor.tokenizer(prompts, return_tensors="pt", padding=True)).pooler_output
    expected = (100 * torch.cosine_similarity(img, txt).clamp(min=0)).mean().item()
    assert score_quality(images, prompts, clip=ClipScore(model, processor), batch_size=3)["clip_score"] == pytest.approx(expected, rel=1e-4)
    a, b = ClipScore(model, processor), ClipScore(model, processor)
    a.update(images[:1], prompts[:1])
    b.update(images[1:], prompts[1:])
    a.merge_state(b)
    assert float(a.compute()) == pytest.approx(expected, rel=1e-4)


def test_minisd_judge_features_go_through_the_same_fid_metric():
    """MiniSD's judge-feature Frechet distance is this module's FID metric with another extractor: zero for a
    set against itself, larger for other digits, the same at any batch size."""
    from concept_erase.diffusion.minisd.data import load_digit_images
    from concept_erase.diffusion.minisd.judge import load_judges
    from evaluation.quality import frechet_distance

    test = load_digit_images("test")
    images = [Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8), mode="L") for x in test.images[:240]]
    sevens = [im for im, d in zip(images, test.digits[:240].tolist()) if d == 7]
    fid = make_fid(feature_extractor=load_judges().fid_features())
    assert abs(frechet_distance(fid, images, images)) < 1e-2
    whole = frechet_distance(fid, images, sevens)
    assert whole > 10 and frechet_distance(fid, images, sevens, batch_size=7) == pytest.approx(whole, rel=1e-4)
