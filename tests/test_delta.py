"""The delta: saved against a base, applied back bit for bit, refused on another base or when damaged."""

import json

import pytest
import torch

from concept_erase.diffusion.models.delta import apply_delta, save_delta
from concept_erase.diffusion.models.tiny import build_tiny_pipeline
from concept_erase.errors import ConceptEraseError


def _erase_inside(unet, mask, seed=0):
    """Change some weights only where `mask` is True (what a masked SalUn update does)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            m = mask.masks.get(name)
            if m is not None and m.any():
                p[m] += 0.01 * torch.randn(int(m.sum()), generator=g)


def test_delta_reproduces_the_erased_unet_bit_for_bit(tmp_path, tiny_pipeline, other_pipeline):
    import copy

    from concept_erase.saliency import SaliencyMask

    base = tiny_pipeline.unet
    mask = SaliencyMask.random(base, keep=0.3, seed=1, concept="cat")
    erased = copy.deepcopy(base)
    _erase_inside(erased, mask)
    with torch.no_grad():  # one change OUTSIDE the mask as well: must still be reproduced exactly
        erased.conv_in.bias[0] += 1.0
    path = save_delta(base, erased, mask, tmp_path / "delta")
    assert sorted(p.name for p in path.iterdir()) == ["delta.json", "delta.safetensors"]
    info = json.loads((path / "delta.json").read_text())
    assert info["mask"]["keep"] == 0.3 and info["parameters"]["conv_in.bias"]["from_mask"] is False

    fresh = build_tiny_pipeline(seed=0)
    assert apply_delta(fresh, path) is fresh
    after, want = fresh.unet.state_dict(), erased.state_dict()
    assert all(torch.equal(after[k], want[k]) for k in want)
    # applying again: the base has changed, so its weights digest no longer matches
    with pytest.raises(ConceptEraseError, match="other base weights"):
        apply_delta(fresh, path)
    with pytest.raises(ConceptEraseError, match="other base weights"):
        apply_delta(other_pipeline.unet, path)
    small = build_tiny_pipeline(seed=0, unet_channels=(16, 32)).unet
    with pytest.raises(ConceptEraseError, match="another UNet architecture"):
        apply_delta(small, path)
    # without a mask: exactly the changed entries
    path2 = save_delta(base, erased, None, tmp_path / "delta2")
    fresh2 = build_tiny_pipeline(seed=0).unet
    apply_delta(fresh2, path2)
    assert all(torch.equal(fresh2.state_dict()[k], want[k]) for k in want)
    with pytest.raises(ConceptEraseError, match="already exists"):
        save_delta(base, erased, mask, path)
    # a damaged delta: refused before anything is written, or caught by the erased weights' digest
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path2 / "delta.safetensors"))
    name = next(k for k in tensors if k.startswith("value."))
    save_file({k: v for k, v in tensors.items() if k != name}, str(path2 / "delta.safetensors"))
    untouched = build_tiny_pipeline(seed=0).unet
    with pytest.raises(ConceptEraseError, match="damaged"):
        apply_delta(untouched, path2)
    assert all(torch.equal(untouched.state_dict()[k], base.state_dict()[k]) for k in want)
    save_file({**tensors, name: tensors[name] + 1}, str(path2 / "delta.safetensors"))
    with pytest.raises(ConceptEraseError, match="its values do not give the erased weights"):
        apply_delta(build_tiny_pipeline(seed=0).unet, path2)


@pytest.mark.parametrize("damage", ["flipped value bit", "damaged mask byte", "short values", "short mask",
                                    "mask of another dtype"])
def test_a_damaged_delta_leaves_the_base_exactly_as_it_was(tmp_path, tiny_pipeline, damage):
    """Every parameter of the delta is checked (sizes, then the erased weights' digest) before any is written,
    so damage in the LAST parameter cannot leave the first ones applied."""
    import copy

    from safetensors.torch import load_file, save_file

    from concept_erase.saliency import SaliencyMask

    base = tiny_pipeline.unet
    mask = SaliencyMask.random(base, keep=0.3, seed=1)
    erased = copy.deepcopy(base)
    _erase_inside(erased, mask)
    path = save_delta(base, erased, mask, tmp_path / "delta")
    tensors = load_file(str(path / "delta.safetensors"))
    last = sorted(json.loads((path / "delta.json").read_text())["parameters"])[-1]
    value, packed = tensors[f"value.{last}"], tensors[f"mask.{last}"]
    if damage == "flipped value bit":
        bits = value.clone().view(torch.int32)
        bits[0] ^= 1 << 20
        tensors[f"value.{last}"] = bits.view(torch.float32)
    elif damage == "damaged mask byte":
        tensors[f"mask.{last}"] = packed.clone()
        tensors[f"mask.{last}"][0] ^= 0xFF
    elif damage == "short values":
        tensors[f"value.{last}"] = value[:-1].clone()
    elif damage == "short mask":
        tensors[f"mask.{last}"] = packed[:-1].clone()
    else:
        tensors[f"mask.{last}"] = packed.to(torch.int16)
    save_file(tensors, str(path / "delta.safetensors"))
    target = build_tiny_pipeline(seed=0).unet
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ConceptEraseError, match=r"is damaged: .*(erased weights|masked entries|bytes)"):
        apply_delta(target, path)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())



def test_sdxl_delta_round_trips_and_refuses_an_sd1_base(tmp_path, tiny_sdxl_pipeline, tiny_pipeline):
    import copy

    erased = copy.deepcopy(tiny_sdxl_pipeline.unet)
    with torch.no_grad():
        erased.add_embedding.linear_1.weight[0, :3] += 1.0  # SDXL's own text_time embedding changed too
        erased.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight[1] -= 0.5
    path = save_delta(tiny_sdxl_pipeline.unet, erased, None, tmp_path / "delta")
    with pytest.raises(ConceptEraseError, match="another UNet architecture"):
        apply_delta(tiny_pipeline, path)
    apply_delta(tiny_sdxl_pipeline, path)
    for (name, a), b in zip(tiny_sdxl_pipeline.unet.state_dict().items(), erased.state_dict().values()):
        assert torch.equal(a, b), name
