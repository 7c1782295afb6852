"""The delta: only the UNet entries that erasure changed, with their mask. `save_delta` writes it against a
base; `apply_delta` puts it back on that base bit for bit, and refuses a base with another architecture
(fingerprint) or other weights (digest).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import ConceptEraseError, first_line
from ...fingerprints import model_fingerprint, state_digest, weights_digest
from ...io_utils import atomic_dir

if TYPE_CHECKING:
    import torch

DELTA_FORMAT = "concept-erase-unet-delta"


def save_delta(base_unet, erased_unet, mask, path: str | os.PathLike, *, overwrite: bool = False,
               base_model: str | None = None) -> Path:
    """Save what erasure changed: a folder with `delta.safetensors` (for every changed parameter, its bit-packed
    mask and the erased values under it) and `delta.json` (the base's fingerprint and weights digest).

    `mask`: a `SaliencyMask` (or name -> BoolTensor); its entries are stored for each changed parameter, so
    its keep ratio and concept travel with the delta. A parameter changed outside its mask, or `mask=None`,
    falls back to the exact set of changed entries. Either way `apply_delta` reproduces `erased_unet` exactly.
    `base_model`: the base's name as the user gave it, recorded so `export --to lora` and `apply` find it.
    """
    import numpy as np
    import torch
    from safetensors.torch import save_file

    masks = getattr(mask, "masks", mask) or {}
    base, erased = base_unet.state_dict(), erased_unet.state_dict()
    if model_fingerprint(base_unet) != model_fingerprint(erased_unet) or base.keys() != erased.keys():
        raise ConceptEraseError("the erased UNet and the base UNet have different architectures")
    tensors: dict[str, torch.Tensor] = {}
    entries = {}
    for name, b in base.items():
        e = erased[name]
        if e.dtype != b.dtype:
            raise ConceptEraseError(f"parameter {name!r} is {e.dtype} in the erased UNet but {b.dtype} in the base")
        changed = (e != b).cpu()  # bitwise-different entries (NaN != NaN, so a NaN entry counts as changed)
        if not bool(changed.any()):
            continue
        where = masks.get(name)
        where = where.cpu().bool() if where is not None and not bool((changed & ~where.cpu().bool()).any()) else changed
        tensors[f"mask.{name}"] = torch.from_numpy(np.packbits(where.reshape(-1).numpy()))
        tensors[f"value.{name}"] = e.detach().cpu()[where].contiguous()
        entries[name] = {"shape": list(b.shape), "dtype": str(b.dtype).removeprefix("torch."),
                         "from_mask": where is not changed}
    config = {
        "format": DELTA_FORMAT, "format_version": 1,
        "base_model": base_model,
        "base_fingerprint": model_fingerprint(base_unet), "base_digest": weights_digest(base_unet),
        "erased_digest": weights_digest(erased_unet),
        "changed_entries": int(sum(int(tensors[f"value.{n}"].numel()) for n in entries)),
        "mask": {"keep": getattr(mask, "keep", None), "scope": getattr(mask, "scope", None),
                 "concept": getattr(mask, "concept", None)} if hasattr(mask, "masks") else None,
        "parameters": entries,
    }
    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "delta.safetensors"), metadata={"format": DELTA_FORMAT})
        (tmp / "delta.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def apply_delta(pipe_or_unet, path: str | os.PathLike):
    """Write a `save_delta` folder's values into a base pipeline's (or UNet's) weights, in place, and return
    it. Refuses a base whose architecture (fingerprint) or weights (digest) differ from the delta's base."""
    import torch

    state = _denoiser(pipe_or_unet).state_dict()  # tensors share storage with the parameters
    updated = erased_parameters(pipe_or_unet, path)
    with torch.no_grad():
        for name, tensor in updated.items():
            state[name].copy_(tensor)
    return pipe_or_unet


def _denoiser(pipe_or_unet):
    """The model a delta applies to: a pipeline's denoiser (its family's UNet or transformer, whose fingerprint
    then refuses a delta of another family), or the model itself."""
    if hasattr(pipe_or_unet, "components"):
        from .families import family_of

        return family_of(pipe_or_unet).denoiser(pipe_or_unet)
    return pipe_or_unet


def is_delta(path: str | os.PathLike) -> bool:
    return (Path(path) / "delta.json").is_file()


def read_delta_config(path: str | os.PathLike) -> dict:
    """A delta folder's `delta.json`, checked to be one."""
    path = Path(path)
    config_file = path / "delta.json"
    if not config_file.is_file():
        raise ConceptEraseError(f"{str(path)!r} is not a delta folder (no delta.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConceptEraseError(f"delta config {str(config_file)!r} is damaged: {err}") from None
    if config.get("format") != DELTA_FORMAT:
        raise ConceptEraseError(f"{str(config_file)!r} is not a concept-erase delta (format={config.get('format')!r})")
    lacking = [k for k in ("base_fingerprint", "base_digest", "erased_digest", "parameters") if k not in config]
    if lacking or not isinstance(config["parameters"], dict):
        raise ConceptEraseError(f"delta config {str(config_file)!r} is damaged: no {(lacking or ['parameters'])[0]!r}")
    return config


def erased_parameters(pipe_or_unet, path: str | os.PathLike) -> dict[str, "torch.Tensor"]:
    """The erased values of every parameter the delta changes, built beside the base (which is not touched)
    and checked: the base's architecture (fingerprint) and weights (digest) must be the delta's base's, and
    the result the erased weights (digest)."""
    from safetensors import safe_open

    path = Path(path)
    unet = _denoiser(pipe_or_unet)
    config = read_delta_config(path)
    if model_fingerprint(unet) != config["base_fingerprint"]:
        raise ConceptEraseError(
            f"delta {str(path)!r} was made for another UNet architecture (fingerprint {config['base_fingerprint']}, "
            f"this base's {model_fingerprint(unet)})")
    if weights_digest(unet) != config["base_digest"]:
        raise ConceptEraseError(
            f"delta {str(path)!r} was made on other base weights (digest {config['base_digest'][:16]}, "
            f"this base's {weights_digest(unet)[:16]}); load the exact base it was saved against")
    try:
        with safe_open(str(path / "delta.safetensors"), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise ConceptEraseError(f"cannot read {str(path / 'delta.safetensors')!r}: {first_line(err)}") from None
    state = unet.state_dict()
    # The erased weights are built beside the base and their digest checked before anything is written: a
    # flipped value bit, a damaged mask byte or a short tensor leaves the base exactly as it was.
    updated = {name: _updated_tensor(path, name, state.get(name), stored) for name in config["parameters"]}
    if state_digest({**state, **updated}) != config["erased_digest"]:  # safetensors has no checksum of its own
        raise ConceptEraseError(f"delta {str(path)!r} is damaged: its values do not give the erased weights "
                                f"(digest {config['erased_digest'][:16]}); the base was left unchanged")
    return updated


def _updated_tensor(path: Path, name: str, target, stored: dict) -> "torch.Tensor":
    """A copy of base parameter `name` with the delta's values written under its mask, after checking that
    the stored mask and values have the sizes the parameter needs."""
    import numpy as np
    import torch

    packed, values = stored.get(f"mask.{name}"), stored.get(f"value.{name}")
    if target is None or packed is None or values is None:
        absent = name if target is None else f"mask.{name}" if packed is None else f"value.{name}"
        raise ConceptEraseError(f"delta {str(path)!r} is damaged: no {absent!r} to apply")
    n = target.numel()
    if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
        raise ConceptEraseError(f"delta {str(path)!r} is damaged: the mask of {name!r} has {packed.numel()} "
                                f"{str(packed.dtype).removeprefix('torch.')} entries, not {(n + 7) // 8} bytes")
    where = torch.from_numpy(np.unpackbits(packed.numpy())[:n].astype(bool)).reshape(target.shape)
    if values.numel() != int(where.sum()):
        raise ConceptEraseError(f"delta {str(path)!r} is damaged: {name!r} has {values.numel()} values for "
                                f"{int(where.sum())} masked entries")
    new = target.detach().clone()
    new[where.to(new.device)] = values.reshape(-1).to(new.device, new.dtype)
    return new
