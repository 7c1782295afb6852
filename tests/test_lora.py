"""`concept_erase/diffusion/models/lora.py` and the `export --to lora / lycoris-full` and `apply` commands: an
erasure's difference as files that real clients load (diffusers' `load_lora_weights`, the `lycoris-lora`
package), and applied to a model at a strength."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from concept_erase.cli import main
from concept_erase.diffusion.models.apply import apply_erasure, read_erasure
from concept_erase.diffusion.models.lora import _factor, _sgm_module_names, components, export_erasure


def _perturbed(pipe, seed: int = 0, scale: float = 0.01):
    """A copy of `pipe` whose every Linear, Conv2d and norm parameter (UNet and text encoders) moved: what an
    erasure that trained everything leaves, minus embeddings (no LoRA or LyCORIS layer holds those)."""
    erased = copy.deepcopy(pipe)
    gen = torch.Generator().manual_seed(seed)
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for module in components(erased).values():
            for layer in module.modules():
                if isinstance(layer, kinds):
                    for p in layer.parameters(recurse=False):
                        p.add_(scale * torch.randn(p.shape, generator=gen))
    return erased


def _states(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c, m in components(pipe).items() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def minisd():
    from concept_erase.diffusion.models.loading import load_pipeline

    return load_pipeline("minisd")


@pytest.fixture(scope="module")
def tiny_sdxl():
    from concept_erase.diffusion.models.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(seed=0, layers_per_block=2, transformer_layers=(1, 2))


@pytest.mark.parametrize("model,layout,rank", [("minisd", "kohya", 4), ("minisd", "kohya", 4096),
                                               ("minisd", "diffusers", 4), ("tiny_sdxl", "kohya", 4),
                                               ("tiny_sdxl", "kohya", 4096), ("tiny_sdxl", "diffusers", 4096)])
def test_diffusers_load_lora_weights_gives_base_plus_the_difference(model, layout, rank, request, tmp_path):
    """diffusers' own loader reads the file onto the base: every weight is base + the file's reconstructed
    difference (float tolerance); at full rank that is the erased model's Linear and Conv2d weights."""
    base = request.getfixturevalue(model)
    erased = _perturbed(base)
    path = tmp_path / "erasure.safetensors"
    report = export_erasure(base, erased, path, rank=rank, layout=layout)
    file = read_erasure(path).file
    keys = list(file.tensors)
    if layout == "kohya":  # SDXL under the SGM names A1111/ComfyUI expect, SD 1.x under diffusers'
        sgm = model == "tiny_sdxl"
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys) == sgm
        assert any(k.startswith("lora_unet_down_blocks_") for k in keys) != sgm
        assert any(k.startswith("lora_te1_" if sgm else "lora_te_") for k in keys)
    assert any(v.dim() == 4 and v.shape[-1] == 3 for k, v in file.tensors.items() if "down" in k or "lora_A" in k)
    lora_layers = [r for r in report.layers if r.rank is not None]
    assert all(r.kept == pytest.approx(r.energy) for r in lora_layers) == (rank == 4096)
    assert report.energy_kept < 1  # biases and norms moved too, and no LoRA holds them
    differences = file.differences(base)
    loaded = copy.deepcopy(base)
    loaded.load_lora_weights(str(path))
    loaded.fuse_lora()
    loaded.unload_lora_weights()
    before, after, target = _states(base), _states(loaded), _states(erased)
    for name, value in after.items():
        expected = before[name] + differences[name] if name in differences else before[name]
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=0, msg=name)
    assert len(differences) == sum(r.rank is not None for r in report.layers) > 50
    if rank == 4096:
        for name in differences:
            torch.testing.assert_close(after[name], target[name], atol=1e-5, rtol=0, msg=name)


def _sgm_view(unet) -> torch.nn.Module:
    """The UNet's modules under their SGM paths, as kohya's and LyCORIS's SDXL tools hold the model."""
    view = torch.nn.Module()
    for path, sgm in _sgm_module_names(unet).items():
        node, *parts = [view, *sgm.split(".")]
        for part in parts[:-1]:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        if not hasattr(node, parts[-1]):
            node.add_module(parts[-1], unet.get_submodule(path))
    return view


@pytest.mark.parametrize("model", ["minisd", "tiny_sdxl"])
def test_lycoris_lora_merges_the_full_file_to_the_erased_weights(model, request, tmp_path, capsys):
    from lycoris.utils import merge
    from safetensors.torch import load_file

    base = request.getfixturevalue(model)
    erased = _perturbed(base)
    path = tmp_path / "erasure.safetensors"
    report = export_erasure(base, erased, path, to="lycoris-full")
    assert report.energy_kept == pytest.approx(1.0)
    merged = copy.deepcopy(base)
    encoders = [m for c, m in components(merged).items() if c != "unet"]
    unet = _sgm_view(merged.unet) if model == "tiny_sdxl" else merged.unet
    merge(encoders, unet, load_file(str(path)), 1.0)
    assert "0 Modules been merged" not in capsys.readouterr().out
    after, target, before = _states(merged), _states(erased), _states(base)
    assert sum(not torch.equal(after[k], before[k]) for k in after) == sum(
        not torch.equal(target[k], before[k]) for k in target)
    for name, value in after.items():
        torch.testing.assert_close(value, target[name], atol=1e-6, rtol=0, msg=name)


def test_energy_picks_the_smallest_rank_that_keeps_it():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    diff = u[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ v[:, :3].T  # squared norms 9, 4, 1 of 14
    for kwargs, rank, kept in (({"energy": 0.6}, 1, 9), ({"energy": 0.9}, 2, 13), ({"energy": 0.95}, 3, 14),
                               ({"energy": 1.0}, 3, 14), ({"rank": 1}, 1, 9), ({"rank": 100}, 6, 14)):
        down, up, got, total = _factor(diff, kwargs.get("rank"), kwargs.get("energy"))
        assert down.shape[0] == rank and got == pytest.approx(kept, rel=1e-5) and total == pytest.approx(14, rel=1e-5)
    conv = torch.randn(5, 4, 3, 3, generator=gen)  # LoCon: a 3x3 conv to r channels, then a 1x1 conv
    down, up, _, _ = _factor(conv, 36, None)
    assert down.shape == (5, 4, 3, 3) and up.shape == (5, 5, 1, 1)  # rank min(5, 4 * 3 * 3)
    torch.testing.assert_close((up.flatten(1) @ down.flatten(1)).reshape(conv.shape), conv, atol=1e-5, rtol=0)


def test_apply_at_a_strength_and_a_delta_on_its_base_bit_for_bit(tiny_pipeline, other_pipeline, tmp_path):
    from concept_erase.diffusion.models.delta import save_delta

    base = tiny_pipeline
    erased = _perturbed(base)
    lora = tmp_path / "e.safetensors"
    export_erasure(base, erased, lora, rank=2)
    before = _states(base)
    for strength in (0.0, 0.5, 1.5):
        pipe = copy.deepcopy(base)
        differences = apply_erasure(pipe, read_erasure(lora), strength)
        after = _states(pipe)
        for name, value in after.items():
            expected = before[name] + strength * differences.get(name, 0)
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=name)
        assert all(torch.equal(after[n], before[n]) for n in after) == (strength == 0)
    delta = save_delta(base.unet, erased.unet, None, tmp_path / "delta")
    for strength in (0.0, 1.0):  # a delta on its own base: lerp(base, erased, s), exact at both ends
        pipe = copy.deepcopy(base)
        apply_erasure(pipe, read_erasure(delta), strength)
        want = base if strength == 0 else erased
        assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), want.unet.state_dict().values()))
    other = copy.deepcopy(other_pipeline)  # same architecture, other weights: a transfer needs the delta's base
    with pytest.raises(Exception, match="pass --base"):
        apply_erasure(other, read_erasure(delta), 1.0)
    moved = _states(other)
    apply_erasure(other, read_erasure(delta), 1.0, base_pipe=base)
    diff = erased.unet.state_dict()
    for name, value in other.unet.state_dict().items():
        expected = moved[f"unet.{name}"] + (diff[name] - base.unet.state_dict()[name])
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)


def test_a_transfer_onto_a_merge_adds_the_same_difference_and_its_distance_scales(tiny_pipeline, tmp_path):
    """A weighted merge (A1111's weighted sum) of a fine-tune with the base: `relative_distance` from the base is
    the merge weight times the fine-tune's, layer by layer, and the LyCORIS file and the delta (against its
    base) put the same difference onto it."""
    from concept_erase.diffusion.models.apply import relative_distance
    from concept_erase.diffusion.models.delta import save_delta

    base = tiny_pipeline
    tuned = _perturbed(base, seed=1, scale=0.02)
    merged = copy.deepcopy(base)
    tuned_unet = tuned.unet.state_dict()
    merged.unet.load_state_dict({k: torch.lerp(v, tuned_unet[k], 0.25) for k, v in base.unet.state_dict().items()})
    full, merge_distance = relative_distance(tuned, base), relative_distance(merged, base)
    assert {k for k, v in full.items() if v > 0 and k.startswith("unet.")} == {
        k for k, v in merge_distance.items() if v > 0}
    assert any(k.startswith("text_encoder.") and v > 0 for k, v in full.items())  # not in the merge: UNet only
    for layer, d in merge_distance.items():
        assert d == pytest.approx(0.25 * full[layer] if layer.startswith("unet.") else 0.0, rel=1e-4, abs=1e-9), layer
    erased = copy.deepcopy(base)
    erased.unet.load_state_dict(_perturbed(base, seed=2).unet.state_dict())
    lycoris = tmp_path / "full.safetensors"
    export_erasure(base, erased, lycoris, to="lycoris-full")
    delta = save_delta(base.unet, erased.unet, None, tmp_path / "delta")
    results = []
    for erasure in (lycoris, delta):
        pipe = copy.deepcopy(merged)
        apply_erasure(pipe, read_erasure(erasure), 1.0, base_pipe=base)
        results.append(pipe.unet.state_dict())
    before, erased_unet, base_unet = merged.unet.state_dict(), erased.unet.state_dict(), base.unet.state_dict()
    for name, value in results[0].items():
        expected = before[name] + (erased_unet[name] - base_unet[name])
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(results[1][name], expected, atol=1e-6, rtol=0, msg=name)


def test_export_and_apply_commands_record_a_transfer(tiny_pipeline, tmp_path, capsys):
    """`export --to lora` from an erased folder (its card names the base) and `apply` onto a fine-tune: the
    per-group table, the distance from the base, and the card's record of the transfer; an SDXL erasure on an
    SD 1.x model is refused with one line and nothing written."""
    from concept_erase.diffusion.models.card import read_model_card, save_pipeline
    from concept_erase.diffusion.models.loading import load_pipeline
    from concept_erase.diffusion.models.tiny import build_tiny_sdxl_pipeline

    base_dir, erased_dir, tuned_dir = tmp_path / "base", tmp_path / "erased", tmp_path / "tuned"
    tiny_pipeline.save_pretrained(base_dir)
    save_pipeline(_perturbed(tiny_pipeline), erased_dir, card={"base_model": str(base_dir), "concept": "x",
                                                              "method": "rl"})
    tuned = _perturbed(tiny_pipeline, seed=1, scale=0.001)
    tuned.save_pretrained(tuned_dir)
    lora = tmp_path / "x.safetensors"
    assert main(["export", str(erased_dir), "--to", "lora", "--energy", "0.9", "--output", str(lora)]) == 0
    out = capsys.readouterr().out
    assert "| cross-attention (attn2) |" in out and "of the full checkpoint" in out
    assert main(["apply", str(lora), "--model", str(tuned_dir), "--strength", "0.5", "--output",
                 str(tmp_path / "applied")]) == 0
    out = capsys.readouterr().out
    assert "transfer:" in out and "median relative difference" in out
    card = read_model_card(tmp_path / "applied")
    assert card["erasure"]["transfer"] is True and card["erasure"]["strength"] == 0.5
    assert card["concept"] == "x" and 0 < card["erasure"]["distance_from_base"]["max"] < 0.1
    meta = read_erasure(lora).file.metadata
    assert json.loads(meta["concept_erase.base_model"]) == str(base_dir)
    # a delta records its base, so it exports without --base; LyCORIS full holds it exactly
    assert main(["export", str(erased_dir), "--to", "delta", "--base", str(base_dir), "--output",
                 str(tmp_path / "delta")]) == 0
    full = tmp_path / "full.safetensors"
    assert main(["export", str(tmp_path / "delta"), "--to", "lycoris-full", "--output", str(full)]) == 0
    assert "| all | " in capsys.readouterr().out
    pipe = copy.deepcopy(tiny_pipeline)
    apply_erasure(pipe, read_erasure(full), 1.0)
    erased_unet = load_pipeline(str(erased_dir)).unet.state_dict()
    for name, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(value, erased_unet[name], atol=1e-6, rtol=0)

    sdxl = build_tiny_sdxl_pipeline(seed=0)
    other = tmp_path / "sdxl.safetensors"
    export_erasure(sdxl, _perturbed(sdxl), other, rank=2)
    assert main(["apply", str(other), "--model", str(tuned_dir), "--output", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("concept-erase: error: ") and "another architecture" in err[-1]
    assert not (tmp_path / "no").exists()
