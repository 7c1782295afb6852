"""What a model says before it loads: read from its folder's JSON configs and safetensors headers, and from a
pickle file's first bytes, without torch and without reading a weight.

The commands check what depends on the model (denoising steps against the scheduler's trained timesteps, an
image size against the VAE's factor, a --keep against the denoiser's parameter count) here, before `import
torch` (seconds, docs/ARCHITECTURE.md), and again on the loaded pipeline: a hub id, or a single file whose
weights are one pickle, says nothing here and is checked after loading only. A safetensors file is 8 bytes
(little-endian header length), then a JSON header naming each tensor's dtype and shape, then the data.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConceptEraseError
from ..minisd import MINISD_MODELS, minisd_path

# A safetensors header larger than this is not one (the format caps it at 100 MB).
MAX_HEADER = 100_000_000
# The weights file of a diffusers component, whole or sharded (its index names the shards).
WEIGHTS = "diffusion_pytorch_model.safetensors"
# Single files read with torch.load (weights_only): their first bytes are checked by `check_pickle_header`.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ModelFacts:
    """What the configs say; None where they do not say it (or there are none)."""

    timesteps: int | None = None              # the scheduler's num_train_timesteps
    vae_factor: int | None = None             # the VAE's downsampling: 2 ** (len(block_out_channels) - 1)
    denoiser: dict[str, int] | None = None    # the UNet's / transformer's parameters: name -> entries

    def parameters(self, include: str | None = None) -> int | None:
        """Entries of the denoiser's parameters whose name the regex `include` finds (None: all); None when
        the weights were not readable."""
        if self.denoiser is None:
            return None
        pattern = re.compile(include) if include else None
        return sum(n for name, n in self.denoiser.items() if pattern is None or pattern.search(name))


def looks_like_hub_id(source: str) -> bool:
    """"owner/name" (not a weights file's name): what diffusers would fetch from the hub."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None and not source.endswith(
        (".safetensors",) + PICKLE_SUFFIXES)


def check_model_source(source: str | os.PathLike) -> None:
    """A one-line error for a model that is neither a MiniSD name, an existing folder or file, nor shaped like
    a hub id: checked before any default is resolved or printed, and again by `load_pipeline`."""
    source = str(source)
    if source in MINISD_MODELS or Path(source).expanduser().exists() or looks_like_hub_id(source):
        return
    raise ConceptEraseError(
        f"model {source!r} does not exist (expected a diffusers folder, a .safetensors/.ckpt file, "
        f"a hub id or one of {', '.join(MINISD_MODELS)})")


def configs_folder(source: str | os.PathLike, config: str | os.PathLike | None = None) -> Path | None:
    """The diffusers folder holding a `load_pipeline` source's component configs: a MiniSD name's packaged
    folder, the folder itself, or a single file's `config` folder; None where none is at hand (a hub id, a
    single file without `config`)."""
    source = str(source)
    path = minisd_path(source) if source in MINISD_MODELS else Path(source).expanduser()
    if path.is_dir():
        return path
    return configs_folder(config) if path.is_file() and config is not None else None


def model_facts(source: str | os.PathLike, config: str | os.PathLike | None = None) -> ModelFacts:
    """The facts of any `load_pipeline` source (`configs_folder`): a single file's configs say the scheduler
    and VAE, but its weights are the file's, so the denoiser's size stays unsaid. A hub id, or anything
    unreadable, gives no facts."""
    folder = configs_folder(source, config)
    if folder is None:
        return ModelFacts()
    denoiser = _denoiser(folder) if folder == configs_folder(source) else None
    return ModelFacts(_timesteps(folder), _vae_factor(folder), denoiser)


def _json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _timesteps(folder: Path) -> int | None:
    found = _json(folder / "scheduler" / "scheduler_config.json").get("num_train_timesteps")
    return found if isinstance(found, int) and found > 0 else None


def _vae_factor(folder: Path) -> int | None:
    channels = _json(folder / "vae" / "config.json").get("block_out_channels")
    return 2 ** (len(channels) - 1) if isinstance(channels, list) and channels else None


def _denoiser(folder: Path) -> dict[str, int] | None:
    """Parameter name -> entries of the folder's UNet or transformer, from its safetensors headers."""
    for name in ("unet", "transformer"):
        component = folder / name
        if not component.is_dir():
            continue
        if (component / WEIGHTS).is_file():
            files = [component / WEIGHTS]
        else:  # sharded: the index maps every tensor to its shard
            shards = _json(component / f"{WEIGHTS}.index.json").get("weight_map")
            files = [component / f for f in dict.fromkeys(shards.values())] if isinstance(shards, dict) else []
        shapes: dict[str, int] = {}
        for file in files:
            header = safetensors_shapes(file)
            if header is None:
                return None
            shapes.update({k: math.prod(shape) for k, shape in header.items()})
        return shapes or None
    return None


def safetensors_shapes(path: str | os.PathLike) -> dict[str, list[int]] | None:
    """Tensor name -> shape from a safetensors file's header alone; None when it is not a readable one."""
    try:
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            if size > MAX_HEADER:
                return None
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error):
        return None
    if not isinstance(header, dict):
        return None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("shape"), list)}


def check_pickle_header(path: str | os.PathLike) -> None:
    """Refuse a .ckpt/.pt file that is neither a zip archive (torch.save's format) nor a pickle (its legacy
    format, protocol 2 and up: the PROTO opcode 0x80 and the protocol) from its first bytes: random or damaged
    bytes are named before torch loads. A file that passes can still be damaged further in (`safe_torch_load`)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return  # the loader names a missing or unreadable file
    if head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return
    raise ConceptEraseError(f"{str(path)!r} is not a checkpoint (or is damaged): unreadable pickle data (neither "
                            f"a zip archive nor a pickle: it starts with bytes {head.hex(' ') or 'none'})")
