"""Identities of models: what a cache key, a delta or a mask checks that it was made for.

`weights_digest` hashes a module's weights (names, dtypes, shapes and bytes): two modules share it only when
every weight is bit-identical.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Iterable

from .errors import ConceptEraseError, first_line

if TYPE_CHECKING:
    import torch


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every state-dict tensor's name, dtype, shape and bytes: the weights' identity (unlike
    `saliency.model_fingerprint`, which hashes the architecture only)."""
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

