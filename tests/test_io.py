"""Loading any checkpoint (safely), saving three ways, and the `export` command."""

import contextlib
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from concept_erase.cli import main
from concept_erase.diffusion.io import (
    add_evaluation_to_card,
    apply_delta,
    export_single_file,
    load_pipeline,
    read_model_card,
    save_delta,
    save_pipeline,
    to_original_state_dict,
    unet_to_ldm,
)
from concept_erase.diffusion.tiny import build_tiny_pipeline
from concept_erase.errors import ConceptEraseError

COMPONENTS = ("unet", "vae", "text_encoder")


def assert_same_weights(a, b):
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def other_pipeline():
    """A pipeline with the tiny architecture but other weights (seed 1) than `tiny_pipeline_dir` (seed 0)."""
    return build_tiny_pipeline(seed=1)


# --------------------------------------------------------------------------------------------- loading


def test_load_diffusers_folder(tiny_pipeline_dir, tiny_pipeline, monkeypatch):
    pipe = load_pipeline(tiny_pipeline_dir)
    assert pipe.safety_checker is None and pipe.unet.dtype == torch.float32 and not pipe.unet.training
    assert_same_weights(pipe, tiny_pipeline)
    monkeypatch.setattr("concept_erase.diffusion.minisd.minisd_path", lambda: tiny_pipeline_dir)
    assert_same_weights(load_pipeline("minisd"), tiny_pipeline)


def test_load_errors(tmp_path, tiny_pipeline_dir):
    cases = {
        str(tmp_path / "missing"): "does not exist",
        "someone/some-model": "hub is offline",
        str(tmp_path): "no model_index.json",
    }
    (tmp_path / "notes.txt").write_text("hello")
    cases[str(tmp_path / "notes.txt")] = "not a checkpoint"
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00not a pickle at all")
    cases[str(tmp_path / "garbage.ckpt")] = "not a checkpoint"
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    cases[str(tmp_path / "junk.safetensors")] = "not a readable safetensors"
    from safetensors.torch import save_file

    save_file({"some.weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    cases[str(tmp_path / "other.safetensors")] = "not a Stable Diffusion checkpoint"
    for source, message in cases.items():
        with pytest.raises(ConceptEraseError, match=message):
            load_pipeline(source, config=tiny_pipeline_dir)
    with pytest.raises(ConceptEraseError, match="needs a CUDA device"):
        load_pipeline(tiny_pipeline_dir, dtype="fp16", device="cpu")
    with pytest.raises(ConceptEraseError, match="unknown dtype"):
        load_pipeline(tiny_pipeline_dir, dtype="fp64")


class _Payload:
    """Unpickling this calls Path.touch(marker): stands for any code a malicious .ckpt would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_unsafe_pickle_is_refused_without_running(tmp_path, tiny_pipeline_dir, other_pipeline):
    marker = tmp_path / "payload-ran"
    state = to_original_state_dict(other_pipeline)
    state["model.diffusion_model.evil"] = _Payload(marker)
    torch.save({"state_dict": state}, tmp_path / "evil.ckpt")
    with pytest.raises(ConceptEraseError, match="refusing to load .*needs code to run"):
        load_pipeline(tmp_path / "evil.ckpt", config=tiny_pipeline_dir)
    assert not marker.exists()
    torch.load(tmp_path / "evil.ckpt", weights_only=False)  # proof that the payload is live
    assert marker.exists()


LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


@contextlib.contextmanager
def _saving_as(module_name: str, cls: type):
    """A context in which pickle finds `cls` as `module_name.<cls name>`: stand-in modules (and their parent
    packages) in sys.modules, removed again on exit."""
    cls.__module__ = module_name
    with pytest.MonkeyPatch.context() as mp:
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):
            mp.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        setattr(sys.modules[module_name], cls.__name__, cls)
        yield


def _save_lightning_ckpt(path, state, callback_state):
    """Save `state` the way PyTorch Lightning saved the SD 1.x checkpoints (sd-v1-4.ckpt): training metadata
    beside "state_dict", with the ModelCheckpoint callback pickled under its Lightning name. The stand-in
    Lightning module exists only while saving: loading must not need (or import) Lightning."""
    import numpy as np

    model_checkpoint = type("ModelCheckpoint", (), {})
    callback = model_checkpoint()
    callback.__dict__.update(monitor="val/loss_simple_ema", best_model_score=np.float64(0.125))
    ckpt = {"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
            "torch_version": torch.torch_version.TorchVersion("1.12.1"), "best": np.float32(0.5),
            "callbacks": {model_checkpoint: callback_state, "instance": callback},
            "optimizer_states": [], "lr_schedulers": [], "state_dict": state}
    with _saving_as(LIGHTNING_MODULE, model_checkpoint):
        torch.save(ckpt, path)


def test_lightning_ckpt_loads_without_running_lightning(tmp_path, tiny_pipeline_dir, other_pipeline):
    import numpy as np

    from concept_erase.diffusion.io import read_checkpoint_keys

    state = to_original_state_dict(other_pipeline)
    path = tmp_path / "sd-v1-4-style.ckpt"
    _save_lightning_ckpt(path, state, {"best_model_path": "logs/last.ckpt", "scores": np.arange(3)})
    with pytest.raises(Exception, match="Unsupported global"):  # what plain weights_only says
        torch.load(path, weights_only=True)
    assert sorted(read_checkpoint_keys(path)) == sorted(state)
    assert_same_weights(load_pipeline(path, config=tiny_pipeline_dir), other_pipeline)
    assert LIGHTNING_MODULE not in sys.modules and not any(
        "pytorch_lightning" in str(g) for g in torch.serialization.get_safe_globals())  # nothing left behind


class _Eval:
    """Unpickling this calls eval(): a payload a malicious .ckpt could hide among Lightning's metadata."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",))


class _System(_Eval):
    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload, named", [(_Eval, "GLOBAL eval"), (_System, r"GLOBAL \w+\.system"),
                                            (_Payload, "GLOBAL getattr")])
def test_lightning_ckpt_with_a_payload_is_refused(tmp_path, tiny_pipeline_dir, other_pipeline, payload, named):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.ckpt"
    _save_lightning_ckpt(path, to_original_state_dict(other_pipeline), {"best_model_path": payload(marker)})
    with pytest.raises(ConceptEraseError, match=f"refusing to load .*needs code to run \\({named}"):
        load_pipeline(path, config=tiny_pipeline_dir)
    assert not marker.exists()


def test_lightning_global_off_the_list_is_refused_by_name(tmp_path, tiny_pipeline_dir, other_pipeline):
    attribute_dict = type("AttributeDict", (dict,), {})
    with _saving_as("pytorch_lightning.utilities.parsing", attribute_dict):
        torch.save({"hparams": attribute_dict(lr=1e-4), "state_dict": to_original_state_dict(other_pipeline)},
                   tmp_path / "hparams.ckpt")
    with pytest.raises(ConceptEraseError, match=r"needs code to run \(GLOBAL pytorch_lightning\.utilities\.parsing\.AttributeDict\)"):
        load_pipeline(tmp_path / "hparams.ckpt", config=tiny_pipeline_dir)


def test_truncated_safetensors_is_refused(tmp_path, tiny_pipeline_dir, other_pipeline):
    path = export_single_file(other_pipeline, tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConceptEraseError, match="truncated"):
        load_pipeline(tmp_path / "cut.safetensors", config=tiny_pipeline_dir)


# ------------------------------------------------------------------------------- single file, both ways


def test_single_file_round_trip_through_diffusers(tmp_path, tiny_pipeline_dir, other_pipeline):
    path = export_single_file(other_pipeline, tmp_path / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and q.ndim == 4
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    # diffusers' own loader, configs from a folder holding OTHER weights: the file's weights must win
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_pipeline_dir), local_files_only=True)
    assert_same_weights(loaded, other_pipeline)
    # the same weights as a pickled .ckpt, read through load_pipeline (weights_only)
    torch.save({"state_dict": to_original_state_dict(other_pipeline)}, tmp_path / "model.ckpt")
    assert_same_weights(load_pipeline(tmp_path / "model.ckpt", config=tiny_pipeline_dir), other_pipeline)
    with pytest.raises(ConceptEraseError, match="already exists"):
        export_single_file(other_pipeline, path)
    with pytest.raises(ConceptEraseError, match="must end in .safetensors"):
        export_single_file(other_pipeline, tmp_path / "model.ckpt2")
    assert leftovers(tmp_path) == []


def test_unet_key_layout_matches_stable_diffusion():
    """SD 1.x's block structure (4 levels x 2 layers, no attention at the bottom) at toy width: the names
    must be the original checkpoint's, and diffusers' converter must map them back to the same tensors."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel(
        block_out_channels=(8, 8, 16, 16), layers_per_block=2, norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=2, sample_size=8)
    state = unet.state_dict()
    ldm = unet_to_ldm(state, 2)
    expected = {
        "down_blocks.1.attentions.1.proj_in.weight": "input_blocks.5.1.proj_in.weight",
        "down_blocks.2.downsamplers.0.conv.weight": "input_blocks.9.0.op.weight",
        "down_blocks.3.resnets.1.conv1.weight": "input_blocks.11.0.in_layers.2.weight",
        "down_blocks.2.resnets.0.conv_shortcut.weight": "input_blocks.7.0.skip_connection.weight",
        "mid_block.resnets.1.time_emb_proj.weight": "middle_block.2.emb_layers.1.weight",
        "mid_block.attentions.0.norm.weight": "middle_block.1.norm.weight",
        "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.1.conv.weight",
        "up_blocks.1.upsamplers.0.conv.weight": "output_blocks.5.2.conv.weight",
        "up_blocks.3.attentions.2.proj_out.bias": "output_blocks.11.1.proj_out.bias",
        "conv_norm_out.weight": "out.0.weight",
        "time_embedding.linear_2.bias": "time_embed.2.bias",
    }
    for hf, sd in expected.items():
        assert ldm[sd] is state[hf], hf
    assert len(ldm) == len(state)
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()}, unet.config)
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)


# ------------------------------------------------------------------------------------------ model card


def test_save_pipeline_with_model_card(tmp_path, tiny_pipeline):
    card = {"base_model": "runwayml/stable-diffusion-v1-5", "concept": "nudity", "method": "salun",
            "surrogate": "a photo of a person wearing clothes", "keep": 0.5, "steps": 120,
            "evaluation": {"nudenet@0.6": {"exposed": 3}, "fid": 17.5}, "tags": ["my-tag"]}
    out = save_pipeline(tiny_pipeline, tmp_path / "erased", card=card)
    front = read_model_card(out)
    assert front["base_model"] == card["base_model"] and front["keep"] == 0.5 and front["steps"] == 120
    assert {"concept-erasure", "salun", "my-tag", "stable-diffusion"} <= set(front["tags"])
    assert front["evaluation"] == card["evaluation"] and front["surrogate"] == card["surrogate"]
    readme = (out / "README.md").read_text()
    assert "| nudenet@0.6.exposed | 3 |" in readme
    assert_same_weights(load_pipeline(out), tiny_pipeline)
    with pytest.raises(ConceptEraseError, match="already exists"):
        save_pipeline(tiny_pipeline, out)
    assert leftovers(tmp_path) == []
    (tmp_path / "plain.md").write_text("# no front matter\n")
    with pytest.raises(ConceptEraseError, match="no YAML front matter"):
        read_model_card(tmp_path / "plain.md")

    # an evaluation run later adds its figures; the rest of the card stays as it was
    add_evaluation_to_card(out, "nudity", {"images": 8, "exposed_parts": 1})
    after = read_model_card(out)
    assert after["evaluation"] == {**card["evaluation"], "nudity": {"images": 8, "exposed_parts": 1}}
    assert {k: v for k, v in after.items() if k != "evaluation"} == {k: v for k, v in front.items() if k != "evaluation"}
    assert "| nudity.exposed_parts | 1 |" in (out / "README.md").read_text() and leftovers(out) == []


# ----------------------------------------------------------------------------------------------- delta


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
    with pytest.raises(ConceptEraseError, match="did not reproduce"):
        apply_delta(build_tiny_pipeline(seed=0).unet, path2)


# ----------------------------------------------------------------------------------------- the command


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
