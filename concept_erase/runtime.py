"""Where things run and where they are kept: the torch device, the accelerate process, the cache folder.
One home each, so a command, the evaluation suite and the app agree. Import-light: torch and accelerate are
imported inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConceptEraseError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """None -> leave where loaded (CPU); "auto" -> cuda when available, else cpu."""
    import torch

    if device is None:
        return None
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConceptEraseError(f"unknown device {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConceptEraseError(f"device {str(device)!r} asked for but CUDA is not available")
    return device


def process_state():
    """accelerate's PartialState for this process. On a machine without CUDA, `cpu=True` is what makes
    accelerate see a torchrun / `accelerate launch` world on CPU (gloo) instead of N lone rank-0 processes."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def cache_root() -> Path:
    """$CONCEPT_ERASE_CACHE, else ~/.cache/concept-erase: generated images and latents (`images/`) and the
    demo's erased model (`demo-models/`) live under it."""
    return Path(os.environ.get("CONCEPT_ERASE_CACHE", Path.home() / ".cache" / "concept-erase"))
