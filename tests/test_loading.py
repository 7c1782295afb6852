"""Loading any checkpoint safely: diffusers folders, MiniSD, single files, and pickles that never run code."""

import contextlib
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import assert_same_weights

from concept_erase.diffusion.models.loading import load_pipeline
from concept_erase.diffusion.models.single_file import export_single_file, to_original_state_dict
from concept_erase.errors import ConceptEraseError


def test_load_diffusers_folder(tiny_pipeline_dir, tiny_pipeline, monkeypatch):
    pipe = load_pipeline(tiny_pipeline_dir)
    assert pipe.safety_checker is None and pipe.unet.dtype == torch.float32 and not pipe.unet.training
    assert_same_weights(pipe, tiny_pipeline)
    monkeypatch.setattr("concept_erase.diffusion.models.loading.minisd_path", lambda name="minisd": tiny_pipeline_dir)
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
    import random

    (tmp_path / "random.ckpt").write_bytes(random.Random(0).randbytes(4096))
    cases[str(tmp_path / "random.ckpt")] = r"not a checkpoint \(or is damaged\): unreadable pickle data"
    for source, message in cases.items():
        with pytest.raises(ConceptEraseError, match=message) as caught:
            load_pipeline(source, config=tiny_pipeline_dir)
        assert "weights_only" not in str(caught.value)  # never torch's advice to run the pickle's code
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

    from concept_erase.diffusion.models.loading import read_checkpoint_keys

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



def test_load_sdxl_folder_and_refuse_other_families(tmp_path, tiny_sdxl_pipeline_dir, capsys):
    import json

    pipe = load_pipeline(tiny_sdxl_pipeline_dir)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and not pipe.unet.training
    assert "model family: sdxl" in capsys.readouterr().err
    with pytest.raises(ConceptEraseError, match="--family sd1 does not fit"):
        load_pipeline(tiny_sdxl_pipeline_dir, family="sd1")
    with pytest.raises(ConceptEraseError, match="unknown model family"):
        load_pipeline(tiny_sdxl_pipeline_dir, family="sdxl-turbo")
    (tmp_path / "pixart").mkdir()
    (tmp_path / "pixart" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(ConceptEraseError, match="unsupported model family: PixArt"):
        load_pipeline(tmp_path / "pixart")
    from safetensors.torch import save_file

    # an SD 3 single file is detected as such, and configs of another family are refused by name
    save_file({"model.diffusion_model.joint_blocks.0.attn.qkv.weight": torch.zeros(2)}, str(tmp_path / "sd3.safetensors"))
    with pytest.raises(ConceptEraseError, match="is a sdxl model but .* is sd3"):
        load_pipeline(tmp_path / "sd3.safetensors", config=tiny_sdxl_pipeline_dir)
