"""The diffusion commands' parsing: `export` between every format."""

import json
import shutil

import torch
from helpers import assert_same_weights, leftovers

from concept_erase.cli import main
from concept_erase.diffusion.models.card import read_model_card, save_pipeline
from concept_erase.diffusion.models.delta import apply_delta
from concept_erase.diffusion.models.loading import load_pipeline


def test_export_command(tmp_path, tiny_pipeline_dir, other_pipeline, capsys):
    src = tmp_path / "erased"
    save_pipeline(other_pipeline, src, card={"base_model": "tiny", "concept": "cat"})
    assert main(["export", str(src), "--to", "single-file", str(tmp_path / "m.safetensors")]) == 0
    assert_same_weights(load_pipeline(tmp_path / "m.safetensors", config=tiny_pipeline_dir), other_pipeline)
    assert main(["export", str(tmp_path / "m.safetensors"), "--config", str(tiny_pipeline_dir),
                 "--to", "diffusers", str(tmp_path / "back")]) == 0
    assert_same_weights(load_pipeline(tmp_path / "back"), other_pipeline)
    assert main(["export", str(src), "--to", "diffusers", str(tmp_path / "copy")]) == 0
    assert main(["export", str(src), "--to", "single-file", str(tmp_path / "h.safetensors"), "--dtype", "fp16"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "h.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    assert read_model_card(tmp_path / "copy")["concept"] == "cat"  # the card travels with the model

    # delta of a copy of the base with one changed weight, then applied back onto the base
    changed = load_pipeline(tiny_pipeline_dir)
    with torch.no_grad():
        changed.unet.conv_out.weight[0, 0, 0, 0] += 0.5
    save_pipeline(changed, tmp_path / "changed")
    assert main(["export", str(tmp_path / "changed"), "--to", "delta", str(tmp_path / "d"),
                 "--base", str(tiny_pipeline_dir)]) == 0
    info = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert info["changed_entries"] == 1 and info["mask"] is None
    # the mask `erase` saves beside the model is picked up: the delta then stores the masked entries
    from concept_erase.saliency import SaliencyMask

    SaliencyMask.from_names(changed.unet, r"^conv_out\.weight$").save(tmp_path / "changed" / "mask.safetensors")
    assert main(["export", str(tmp_path / "changed"), "--to", "delta", str(tmp_path / "d3"),
                 "--base", str(tiny_pipeline_dir)]) == 0
    info = json.loads((tmp_path / "d3" / "delta.json").read_text())
    assert info["changed_entries"] == changed.unet.conv_out.weight.numel() and info["mask"]["keep"] > 0
    restored = apply_delta(load_pipeline(tiny_pipeline_dir), tmp_path / "d3")
    assert torch.equal(restored.unet.conv_out.weight, changed.unet.conv_out.weight)
    assert main(["export", str(src), "--to", "delta", str(tmp_path / "d2")]) == 2
    assert "needs --base" in capsys.readouterr().err
    assert main(["export", str(src), "--to", "single-file", str(tmp_path / "m.safetensors")]) == 2
    shutil.rmtree(tmp_path / "back")
    assert leftovers(tmp_path) == []
