"""`models/facts.py`: what a model's files say before it loads, checked against the loaded model."""

import json
import shutil

import pytest
import torch

from concept_erase.diffusion.models.facts import ModelFacts, check_pickle_header, model_facts
from concept_erase.errors import ConceptEraseError


def test_the_files_say_what_the_loaded_pipeline_has(tiny_pipeline_dir):
    from concept_erase.diffusion.models.loading import load_pipeline

    pipe = load_pipeline(str(tiny_pipeline_dir))
    facts = model_facts(tiny_pipeline_dir)
    assert facts.timesteps == pipe.scheduler.config.num_train_timesteps
    assert facts.vae_factor == pipe.vae_scale_factor
    assert facts.denoiser == {name: p.numel() for name, p in pipe.unet.named_parameters()}
    assert facts.parameters("attn2") == sum(p.numel() for n, p in pipe.unet.named_parameters() if "attn2" in n)


def test_packaged_models_sharded_weights_and_what_says_nothing(tmp_path, tiny_pipeline_dir):
    assert model_facts("minisd").parameters() == 3_141_700 and model_facts("minisd").timesteps == 1000
    # a sharded UNet: the index names the shards, whose headers are summed
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_pipeline_dir, folder)
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "part-1.safetensors")
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "part-1.safetensors", "b": "part-1.safetensors"}}))
    assert model_facts(folder).denoiser == model_facts(tiny_pipeline_dir).denoiser
    (unet / "part-1.safetensors").write_bytes(b"\xff" * 16)  # a damaged header: no count, checked after loading
    assert model_facts(folder).denoiser is None and model_facts(folder).timesteps == 1000
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    assert model_facts(single, config="minisd") == ModelFacts(1000, 2)  # configs only: the weights are the file's
    assert model_facts("someone/a-hub-model") == ModelFacts()


def test_a_pickle_header_is_recognised_and_random_bytes_are_not(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "zip.ckpt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    for name in ("zip.ckpt", "legacy.ckpt"):
        check_pickle_header(tmp_path / name)
    (tmp_path / "random.ckpt").write_bytes(bytes(range(7, 200)))
    with pytest.raises(ConceptEraseError, match="unreadable pickle data .* starts with bytes 07 08 09 0a"):
        check_pickle_header(tmp_path / "random.ckpt")
