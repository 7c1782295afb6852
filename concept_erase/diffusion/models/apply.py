"""An erasure applied to a model at a strength (`concept-erase apply`): a LoRA or LyCORIS file (`lora.py`, or
another tool's kohya / diffusers LoRA) or a delta (`delta.py`), read back and added as strength x its
difference; `relative_distance` measures how far a model has moved from the erasure's base (a transfer to a
fine-tune, recorded in the card)."""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import ConceptEraseError, first_line
from ...fingerprints import model_fingerprint, weights_digest
from .lora import META_PREFIX, components, kohya_names, layer_group

if TYPE_CHECKING:
    import torch

MAX_STRENGTH = 1.5  # a LoRA slider's usual top: beyond it the difference is extrapolated far past what was trained


@dataclass
class ErasureFile:
    """A LoRA or LyCORIS file read back: its tensors, layout and what it records of its base."""

    path: Path
    tensors: dict
    metadata: dict

    @property
    def layout(self) -> str:
        if any(k.endswith((".diff", ".w_norm", ".diff_b", ".b_norm")) for k in self.tensors):
            return "lycoris-full"
        if any(".lora_A." in k for k in self.tensors):
            return "diffusers"
        return "kohya"

    @property
    def kind(self) -> str:
        return "lycoris-full" if self.layout == "lycoris-full" else "lora"

    @property
    def base(self) -> dict | None:
        """{component: {"fingerprint", "digest"}} of the base it was made on (None: not our file)."""
        raw = self.metadata.get(f"{META_PREFIX}base")
        try:
            return json.loads(raw) if raw else None
        except json.JSONDecodeError:
            raise ConceptEraseError(f"{str(self.path)!r} has damaged metadata (its base)") from None

    def info(self, key: str):
        raw = self.metadata.get(f"{META_PREFIX}{key}")
        try:
            return json.loads(raw) if raw is not None else None
        except json.JSONDecodeError:
            return raw

    def differences(self, pipe) -> dict[str, "torch.Tensor"]:
        """Full parameter name -> the weight difference this file holds for `pipe` (scale alpha / rank applied).
        Refuses a layer `pipe` does not have, or of another shape, with one line."""
        import torch

        known = kohya_names(pipe, both=True)
        modules = components(pipe)
        groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, value in self.tensors.items():
            if self.layout == "diffusers":
                m = re.fullmatch(r"(.+)\.(lora_[AB])\.weight", key)
                layer, part = (m.group(1), m.group(2)) if m else (None, None)
            else:
                layer, _, part = key.partition(".")
            if layer is None or part not in ("lora_A", "lora_B", "lora_down.weight", "lora_up.weight", "alpha",
                                             "diff", "diff_b", "w_norm", "b_norm"):
                raise ConceptEraseError(f"{str(self.path)!r}: tensor {key!r} is not a LoRA or LyCORIS full entry "
                                        "this project reads (LoCon's lora_mid, LoHa and LoKr are not)")
            groups[layer][part] = value.float()
        out = {}
        for layer, parts in groups.items():
            path = layer if self.layout == "diffusers" else known.get(layer)
            component, _, sub = (path or "").partition(".")
            try:
                module = modules[component].get_submodule(sub)
            except (KeyError, AttributeError):
                raise ConceptEraseError(f"{str(self.path)!r} has layer {layer!r}, which this model does not have: "
                                        "it was made for another architecture") from None
            for param, diff in _layer_differences(parts).items():
                target = getattr(module, param, None)
                if target is None or tuple(target.shape) != tuple(diff.shape):
                    shape = None if target is None else tuple(target.shape)
                    raise ConceptEraseError(f"{str(self.path)!r}: layer {layer!r} {param} is {tuple(diff.shape)}, "
                                            f"this model's {shape}: it was made for another architecture")
                out[f"{path}.{param}"] = diff
        return out


def _layer_differences(parts: dict) -> dict[str, "torch.Tensor"]:
    """One layer's entries -> {"weight": difference, "bias": difference}."""
    if "diff" in parts or "w_norm" in parts:
        weight, bias = parts.get("diff", parts.get("w_norm")), parts.get("diff_b", parts.get("b_norm"))
        return {"weight": weight, **({"bias": bias} if bias is not None else {})}
    down, up = parts.get("lora_A", parts.get("lora_down.weight")), parts.get("lora_B", parts.get("lora_up.weight"))
    if down is None or up is None:
        raise ConceptEraseError(f"a LoRA layer has {sorted(parts)}, not both its down and up weights")
    rank = down.shape[0]
    scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0  # kohya: alpha / rank; none: 1
    product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    shape = (up.shape[0], *down.shape[1:])
    return {"weight": (scale * product).reshape(shape)}


def read_erasure_file(path: str | os.PathLike) -> ErasureFile:
    """Read a LoRA or LyCORIS `.safetensors` (ours or another tool's)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except Exception as err:
        raise ConceptEraseError(f"cannot read {str(path)!r} as a LoRA or LyCORIS file: {first_line(err)}") from None
    if not tensors:
        raise ConceptEraseError(f"{str(path)!r} holds no tensors")
    return ErasureFile(path, tensors, metadata)


def add_differences(pipe, differences: dict[str, "torch.Tensor"], strength: float) -> None:
    """pipe's parameter += strength * difference, in place."""
    import torch

    modules = components(pipe)
    with torch.no_grad():
        for name, diff in differences.items():
            component, _, param = name.partition(".")
            target = modules[component].get_parameter(param)
            target.add_(diff.to(target.device, target.dtype), alpha=strength)


def relative_distance(pipe, base_pipe) -> dict[str, float]:
    """Per layer (full module path, its weight and bias together): ||pipe - base|| / ||base||, how far `pipe`
    (a fine-tune, a merge) moved from the erasure's base."""
    base = components(base_pipe)
    change: dict[str, float] = defaultdict(float)
    size: dict[str, float] = defaultdict(float)
    for component, module in components(pipe).items():
        base_state = base[component].state_dict()
        for name, value in module.state_dict().items():
            layer = f"{component}.{name.rpartition('.')[0]}"
            b = base_state[name].detach().double()
            change[layer] += float((value.detach().double() - b).square().sum())
            size[layer] += float(b.square().sum())
    return {layer: math.sqrt(change[layer] / size[layer]) if size[layer] else (math.inf if change[layer] else 0.0)
            for layer in change}


def distance_table(distances: dict[str, float]) -> str:
    """Per layer group: layers that moved, median and largest relative difference."""
    import statistics

    groups: dict[str, list[float]] = defaultdict(list)
    for name, d in distances.items():
        groups[layer_group(name)].append(d)
    groups["all"] = list(distances.values())
    lines = ["| layer group | layers moved | median relative difference | largest |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {g} | {sum(d > 0 for d in v)} of {len(v)} | {statistics.median(v):.2%} | {max(v):.2%} |"
              for g, v in sorted(groups.items(), key=lambda item: (item[0] == "all", item[0]))]
    return "\n".join(lines)


@dataclass
class Erasure:
    """An erasure to apply: a LoRA / LyCORIS file or a delta folder, and what it records of its base."""

    path: Path
    kind: str                    # "lora", "lycoris-full" or "delta"
    base: dict | None            # {component: {"fingerprint", "digest"}}, None when the file does not say
    base_model: str | None       # the base's name as given when it was made
    info: dict                   # concept, method, ... (what the erasure says of itself)
    file: ErasureFile | None = None

    def check_architecture(self, pipe) -> None:
        """One line if `pipe` is not of the architecture the erasure was made on."""
        for component, identity in (self.base or {}).items():
            module = components(pipe).get(component)
            found = model_fingerprint(module) if module is not None else "none"
            if found != identity["fingerprint"]:
                raise ConceptEraseError(f"{str(self.path)!r} was made for another architecture (its base's {component} "
                                        f"fingerprint {identity['fingerprint']}, this model's {found})")

    def is_base(self, pipe) -> bool | None:
        """Are `pipe`'s weights the erasure's base's (None: the erasure does not say)?"""
        if self.base is None:
            return None
        return all(weights_digest(components(pipe)[c]) == identity["digest"] for c, identity in self.base.items())


def read_erasure(path: str | os.PathLike) -> Erasure:
    """A LoRA or LyCORIS `.safetensors` (this project's or another tool's), or a delta folder."""
    from .delta import is_delta, read_delta_config

    path = Path(path)
    if is_delta(path):
        config = read_delta_config(path)
        base = {"unet": {"fingerprint": config["base_fingerprint"], "digest": config["base_digest"]}}
        return Erasure(path, "delta", base, config.get("base_model"), {"concept": (config.get("mask") or {}).get("concept")})
    if path.is_dir():
        raise ConceptEraseError(f"{str(path)!r} is a folder but not a delta (no delta.json); give a delta folder or "
                                "a LoRA / LyCORIS .safetensors")
    file = read_erasure_file(path)
    info = {k: file.info(k) for k in ("concept", "method")}
    return Erasure(path, file.kind, file.base, file.info("base_model"), info, file)


def apply_erasure(pipe, erasure: Erasure, strength: float, base_pipe=None) -> dict[str, "torch.Tensor"]:
    """Put `erasure` onto `pipe` in place at `strength` (weights + strength * difference) and return the
    differences applied. A LoRA / LyCORIS file carries its difference; a delta carries erased values, so its
    difference is taken against its base: `pipe` itself (then the result is `lerp(base, erased, strength)`,
    bit-exact at 0 and 1) or `base_pipe` for another model."""
    import torch

    from .delta import erased_parameters

    erasure.check_architecture(pipe)
    if erasure.file is not None:
        differences = erasure.file.differences(pipe)
        add_differences(pipe, differences, strength)
        return differences
    if erasure.is_base(pipe):
        erased = erased_parameters(pipe.unet, erasure.path)
        state = pipe.unet.state_dict()  # shares storage with the parameters
        differences = {f"unet.{n}": v.float() - state[n].float() for n, v in erased.items()}
        with torch.no_grad():
            for name, value in erased.items():
                state[name].copy_(torch.lerp(state[name], value.to(state[name]), strength))
        return differences
    if base_pipe is None:
        raise ConceptEraseError(f"delta {str(erasure.path)!r} holds erased values, not a difference: to apply it to "
                                "a model other than its base, pass --base (the model it was made on)")
    erased = erased_parameters(base_pipe.unet, erasure.path)
    base_state = base_pipe.unet.state_dict()
    differences = {f"unet.{n}": v.float() - base_state[n].float() for n, v in erased.items()}
    add_differences(pipe, differences, strength)
    return differences
