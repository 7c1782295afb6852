"""Identities of models: what a cache key, a delta, a mask or an evaluation folder checks it was made for.
The one home of every model hash:

- architecture: `model_fingerprint` (names and shapes of the parameters; short), what a mask and a delta
  must match;
- weights: `weights_digest` / `state_digest` / `tensors_digest` (names, dtypes, shapes and bytes: equal
  only when every weight is bit-identical), and `pipeline_digest` over a pipeline's components (the image
  cache key, an evaluation folder's model);
- files: `DIGEST_KEY` / `check_file_digest`, a safetensors file's recorded content digest.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Iterable

from .errors import ConceptEraseError, first_line

if TYPE_CHECKING:
    import torch


def parameter_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def shapes_fingerprint(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """A short hash of parameter names and shapes (what a saved mask records of its model)."""
    text = ";".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in shapes)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """The architecture, not the values: `shapes_fingerprint` of every parameter."""
    return shapes_fingerprint(parameter_shapes(model))


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every state-dict tensor's name, dtype, shape and bytes: the weights' identity (unlike
    `model_fingerprint`, which hashes the architecture only)."""
    return state_digest(module.state_dict())


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """`weights_digest` of a state dict (e.g. weights about to be written into a module, checked first)."""
    return tensors_digest(sorted(state.items()))


def tensors_digest(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """`state_digest` of (name, tensor) pairs given in name order, read one at a time (a file's tensors can
    be hashed without holding them all)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in items:
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# The components whose weights decide a generated image (text_encoder_2: SDXL's second encoder, when present).
PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def pipeline_digest(pipe, *, scheduler: bool = True) -> str:
    """Identity of everything that decides a generated image's pixels except the prompt and seed: each
    component's `weights_digest` and, with `scheduler`, the scheduler's class and config (an evaluation sets
    its own scheduler from its protocol, so it leaves it out)."""
    import json

    h = hashlib.sha256()
    for name in PIPELINE_COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            h.update(f"{name}:{weights_digest(module)}|".encode())
    if scheduler:
        h.update(json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str).encode())
        h.update(type(pipe.scheduler).__name__.encode())
    return h.hexdigest()


# The metadata key of a safetensors file's content digest (`state_digest` of its tensors), written by the
# single-file export and mask files, so a flipped byte is reported on load instead of loading as other weights.
DIGEST_KEY = "concept_erase_sha256"


def check_file_digest(path: str | os.PathLike, what: str) -> bool:
    """Recompute a safetensors file's content digest, tensor by tensor, and compare it with the one in its
    metadata. Returns False for a file that records none (written by another tool or an older version);
    raises ConceptEraseError naming the file when they differ."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get(DIGEST_KEY)
            if recorded is None:
                return False
            actual = tensors_digest((k, f.get_tensor(k)) for k in sorted(f.keys()))
    except Exception as err:
        raise ConceptEraseError(f"cannot read {what} {str(path)!r}: {first_line(err)}") from None
    if actual != recorded:
        raise ConceptEraseError(f"{what} {str(path)!r} is damaged: its content digest ({actual[:16]}) differs "
                                f"from the one recorded when it was written ({recorded[:16]})")
    return True

