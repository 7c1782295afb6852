"""Where things run and where they are kept: the torch device, the accelerate process, the cache folder, and
how much memory the process holds. One home each, so a command, the evaluation suite and the app agree.
Import-light: torch and accelerate are imported inside the functions.
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


def resident_memory(peak: bool = False) -> int | None:
    """This process's resident memory in bytes, now (or its peak with `peak`); None where it cannot be read.
    Linux reads /proc; elsewhere getrusage's peak stands in for both (bytes on macOS, KiB on Linux)."""
    import sys

    if not peak and sys.platform.startswith("linux"):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    try:
        import resource
    except ImportError:  # Windows
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024
