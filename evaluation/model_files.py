"""The scoring models an evaluation is given besides the diffusion model (a NudeNet ONNX file, a CLIP folder,
Inception weights), checked without torch, onnxruntime or transformers.

`evaluate` and `audit` call these before anything heavy loads, so a missing or foreign file is refused as fast
as a bad flag (`import torch` alone takes seconds, docs/ARCHITECTURE.md); the loaders call them too, and then
load the file, which is the deep check (a well-formed ONNX file that is not NudeNet's fails there).
"""

from __future__ import annotations

from pathlib import Path

from concept_erase.errors import ConceptEraseError

# An ONNX file is one protobuf `ModelProto` message (onnx/onnx.proto): field 1 is ir_version (a varint), field 7
# the graph (length-delimited). Protobuf's wire types: 0 varint, 1 fixed 64-bit, 2 length-delimited, 5 fixed 32-bit.
_ONNX_IR_VERSION, _ONNX_GRAPH = 1, 7
_FIXED_BYTES = {1: 8, 5: 4}


def _varint(data, at: int) -> tuple[int, int]:
    """The varint at `at` of `data` and where it ends; ValueError past the end or over 10 bytes."""
    value = 0
    for i in range(10):
        if at + i >= len(data):
            raise ValueError("it ends inside a number")
        value |= (data[at + i] & 0x7F) << (7 * i)
        if data[at + i] < 0x80:
            return value, at + i + 1
    raise ValueError(f"a number at byte {at} is over 10 bytes long")


def _onnx_fault(data) -> str | None:
    """Why `data` (the file's bytes, a memoryview or mmap) is not an ONNX `ModelProto`, or None. Walks the
    message's top-level fields only (each field's key, then its length), so a 100 MB model reads a handful of
    bytes; random bytes fail within a few fields."""
    at, seen = 0, set()
    while at < len(data):
        key, start = _varint(data, at)
        number, wire = key >> 3, key & 7
        if number == 0 or wire not in (0, 1, 2, 5):
            return f"byte {at} is no protobuf field (field {number}, wire type {wire})"
        if wire == 0:
            _, at = _varint(data, start)
        elif wire == 2:
            length, at = _varint(data, start)
            at += length
        else:
            at = start + _FIXED_BYTES[wire]
        if at > len(data):
            return f"the field at byte {at} runs past the end of the file"
        seen.add((number, wire))
    if (_ONNX_IR_VERSION, 0) not in seen or (_ONNX_GRAPH, 2) not in seen:
        return "no IR version or no graph"
    return None


def check_onnx_model(path: str | Path, what: str = "NudeNet model file") -> None:
    """Refuse a file that does not exist or is not an ONNX model, naming it, before onnxruntime loads."""
    import mmap

    path = Path(path)
    if not path.is_file():
        raise ConceptEraseError(f"{what} {str(path)!r} does not exist")
    with path.open("rb") as f:
        if path.stat().st_size == 0:
            fault = "the file is empty"
        else:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                try:
                    fault = _onnx_fault(data)
                except ValueError as err:
                    fault = str(err)
    if fault:
        raise ConceptEraseError(f"{what} {str(path)!r} is not a NudeNet ONNX model (not an ONNX file: {fault})")


def local_folder(name: str | Path) -> Path:
    """A model folder: `name` itself, or a hub id resolved through the local cache / the hub when online."""
    if Path(name).is_dir() or "/" not in str(name) or str(name).startswith((".", "/")):
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as err:  # offline and not cached, unknown id
        raise ConceptEraseError(f"cannot get model {str(name)!r} ({type(err).__name__}); give a local folder") from None


def clip_folder(path: str | Path) -> Path:
    """The local folder of a CLIP model (a folder, or a hub id through the cache / the hub when online)."""
    folder = local_folder(path)
    if not folder.is_dir():
        raise ConceptEraseError(f"CLIP model folder {str(path)!r} does not exist (offline: give a local folder)")
    return folder


def check_fid_weights(path: str | Path) -> None:
    """torch-fidelity's Inception weights file must exist (`quality.make_fid` then loads it)."""
    if not Path(path).is_file():
        raise ConceptEraseError(f"Inception weights file {str(path)!r} does not exist")
