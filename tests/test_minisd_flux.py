"""MiniSD-Flux: the shipped tiny FLUX (a FluxPipeline on the digits world), its training recipe, and the
issue's "Done when" command at reduced size: erase seven, export one file, read it back with diffusers."""

import json

import pytest
import torch

from concept_erase.cli import main
from concept_erase.diffusion.minisd import minisd_path
from concept_erase.diffusion.models.families import FLUX, family_of
from concept_erase.diffusion.models.loading import load_pipeline


def test_minisd_flux_ships_small_safe_judged_and_loads_offline():
    """At most 10 MB of safetensors; a real FluxPipeline at MiniSD's 16 px (8x8 latents packed into 16 tokens);
    its training.json records the command that made it and `minisd check`'s judged accuracy, at least 90% for both
    (sampled with true classifier-free guidance 5: 100% and 100% on 300 images; 89.7% and 96.7% without)."""
    from diffusers import FluxPipeline

    folder = minisd_path("minisd-flux")
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 10 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")]
    training = json.loads((folder / "training.json").read_text())
    assert training["command"].startswith("concept-erase minisd train --family flux")
    assert training["check"]["digit_accuracy"] >= 0.9 and training["check"]["style_accuracy"] >= 0.9
    pipe = load_pipeline("minisd-flux")
    assert isinstance(pipe, FluxPipeline) and family_of(pipe) is FLUX and not pipe.transformer.config.guidance_embeds
    assert pipe.transformer.dtype == torch.float32 and FLUX.image_size(pipe) == (16, 16)
    from concept_erase.diffusion.data.generate import generate_images

    images = generate_images(pipe, ["a handwritten digit three"], [0], num_inference_steps=2)
    assert images[0].size == (16, 16) and images[0].mode == "L"


def test_flux_training_trains_the_transformer_on_minisds_vae_and_text_encoder(tmp_path):
    """`minisd train --family flux` at 3 steps (the shared loop's determinism: test_minisd.py): only the
    transformer moves; the VAE is MiniSD's, and so is the CLIP encoder (the same config and seed; shipped in fp16).
    About 30 s on 2 cores: encoding the 4,311 training images is the cost."""
    from concept_erase.diffusion.minisd.model import build_minisd_flux_pipeline
    from concept_erase.diffusion.minisd.train import MiniSDTrainConfig, save_minisd, train_minisd

    a, summary = train_minisd(MiniSDTrainConfig(unet_steps=3, warmup_steps=1, batch_size=8, vae="minisd",
                                                family="flux"))
    assert summary["parameters"]["transformer"] == sum(p.numel() for p in a.transformer.parameters())
    init = build_minisd_flux_pipeline(0).transformer.state_dict()
    assert all(not torch.equal(v, init[k]) for k, v in a.transformer.state_dict().items() if k.endswith("weight"))
    minisd = load_pipeline("minisd")
    for part in ("text_encoder", "vae"):
        ours = getattr(a, part).state_dict()
        for name, x in getattr(minisd, part).state_dict().items():
            assert torch.equal(ours[name].half(), x.half()), (part, name)
    out = save_minisd(a, summary, tmp_path / "m")
    assert family_of(load_pipeline(out)) is FLUX and (out / "transformer" / "config.json").is_file()


@pytest.fixture(scope="module")
def erased_flux(tmp_path_factory):
    """The "Done when" command at reduced size (2 steps, few images), with the single-file export."""
    tmp = tmp_path_factory.mktemp("minisd-flux-erase")
    out, single = tmp / "erased", tmp / "erased.safetensors"
    code = main(["erase", "--model", "minisd-flux", "--concept", "minisd-digit-seven", "--steps", "2",
                 "--num-forget-images", "9", "--num-retain-images", "27", "--image-steps", "4", "--cache-dir",
                 str(tmp / "cache"), "--no-progress", "--output", str(out), "--export-single-file", str(single)])
    assert code == 0
    return out, single


def test_erase_minisd_flux_exports_a_file_diffusers_reads_back_tensor_for_tensor(erased_flux):
    """diffusers' FLUX converter splits at FLUX.1's width, so MiniSD-Flux's file carries diffusers' names, which
    `from_single_file` loads as they are given the folder's config (offline it has no other config to read)."""
    from diffusers import FluxTransformer2DModel

    out, single = erased_flux
    erased = load_pipeline(out).transformer.state_dict()
    loaded = FluxTransformer2DModel.from_single_file(str(single), config=str(out), subfolder="transformer",
                                                     local_files_only=True).state_dict()
    assert loaded.keys() == erased.keys() and all(torch.equal(loaded[k], erased[k]) for k in erased)
    base = load_pipeline("minisd-flux").transformer.state_dict()
    assert any(not torch.equal(base[k], erased[k]) for k in erased)  # the erasure changed the transformer
    again = load_pipeline(single, config=out).transformer.state_dict()  # our own loader reads it too
    assert all(torch.equal(again[k], erased[k]) for k in erased)
