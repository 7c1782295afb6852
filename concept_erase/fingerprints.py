"""Identities of models: what a cache key, a delta or a mask checks that it was made for.

`weights_digest` hashes a module's weights (names, dtypes, shapes and bytes): two modules share it only when
every weight is bit-identical.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every state-dict tensor's name, dtype, shape and bytes: the weights' identity (unlike
    `saliency.model_fingerprint`, which hashes the architecture only)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
