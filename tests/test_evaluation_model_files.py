"""The scoring models' files checked without torch (`evaluation/model_files.py`)."""

import random
from pathlib import Path

import pytest

from concept_erase.errors import ConceptEraseError
from evaluation.model_files import check_fid_weights, check_onnx_model, clip_folder


def _nudenet_320n() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("nudenet").origin).parent / "320n.onnx"  # the wheel's model


def test_the_wheels_nudenet_model_passes_and_damaged_copies_do_not(tmp_path):
    real = _nudenet_320n().read_bytes()
    check_onnx_model(_nudenet_320n())
    damaged = {"random.onnx": random.Random(1).randbytes(2048), "empty.onnx": b"",
               "truncated.onnx": real[:len(real) // 2], "text.onnx": b"not a model\n" * 100}
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConceptEraseError, match=rf"'{tmp_path / name}' is not a NudeNet ONNX model"):
            check_onnx_model(tmp_path / name)
    with pytest.raises(ConceptEraseError, match="does not exist"):
        check_onnx_model(tmp_path / "missing.onnx")


def test_missing_clip_folder_and_fid_weights_are_named(tmp_path):
    with pytest.raises(ConceptEraseError, match=rf"'{tmp_path / 'clip'}' does not exist"):
        clip_folder(tmp_path / "clip")
    assert clip_folder(tmp_path) == tmp_path
    with pytest.raises(ConceptEraseError, match=rf"'{tmp_path / 'w.pth'}' does not exist"):
        check_fid_weights(tmp_path / "w.pth")
