"""An erasure as the files that diffusers, A1111, ComfyUI and Forge load onto any checkpoint of its family.

An erasure is a per-parameter weight difference from its base (erased - base). `export_erasure` writes it as

- a LoRA (`to="lora"`): each changed Linear weight's difference by truncated SVD, `up @ down` (rank `rank`,
  or per layer the smallest rank that keeps `energy` of the difference's squared norm); a Conv2d as kohya's
  LoCon does it (down: a k x k conv to `rank` channels, up: a 1x1 conv), as kohya's
  `networks/extract_lora_from_models.py` extracts a fine-tune. Biases, norms and embeddings have no LoRA form:
  the export reports the share of the difference they hold;
- LyCORIS "full" (`to="lycoris-full"`): the exact difference, `<name>.diff` / `.diff_b` for Linear and Conv2d
  layers, `.w_norm` / `.b_norm` for norms (LyCORIS's FullModule and NormModule).

Key layouts: kohya/A1111 (`lora_unet_<module path, "." -> "_">.lora_down.weight`, `.lora_up.weight`, `.alpha`;
text encoders `lora_te_` or, with two, `lora_te1_` / `lora_te2_`; the UNet under diffusers' module names for
SD 1.x/2.x and the SGM names for SDXL, `Family.kohya_sgm_names`, from `single_file.unet_to_ldm`), or diffusers/
peft (`unet.<module>.lora_A.weight`, `.lora_B.weight`, as `load_lora_weights` reads them). Alpha is the rank
(scale 1) and the singular values are split evenly between up and down, so half precision loses least.

Reading such files back and applying them at a strength is `apply.py`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ...errors import ConceptEraseError
from ...fingerprints import model_fingerprint, weights_digest
from ...io_utils import atomic_file
from .loading import resolve_dtype

if TYPE_CHECKING:
    import torch

# safetensors metadata keys this project writes (strings only); kohya's own `ss_*` keys are left to kohya.
META_PREFIX = "concept_erase."
FORMATS = ("lora", "lycoris-full")
LAYOUTS = ("kohya", "diffusers")


# ---------------------------------------------------------------------------------------------------- names

def components(pipe) -> dict[str, "torch.nn.Module"]:
    """The pipeline's modules an erasure can change: the UNet and the family's text encoders."""
    from .families import family_of

    family = family_of(pipe)
    if getattr(pipe, "unet", None) is None:  # the diffusion transformers' LoRA names are not written yet
        raise ConceptEraseError(f"LoRA and LyCORIS files cover the UNet families (SD 1.x, 2.x, SDXL), not {family.name}")
    return {"unet": pipe.unet, **family.text_modules(pipe)}


def _kohya_prefixes(pipe) -> dict[str, str]:
    """kohya's prefix of each component: `lora_unet`, and `lora_te` (one text encoder) or `lora_te1` /
    `lora_te2` (SDXL's two)."""
    encoders = [name for name in components(pipe) if name != "unet"]
    prefixes = {"unet": "lora_unet"}
    prefixes.update({name: "lora_te" if len(encoders) == 1 else f"lora_te{i + 1}" for i, name in enumerate(encoders)})
    return prefixes


def _sgm_module_names(unet) -> dict[str, str]:
    """The UNet's module paths -> their SGM/LDM paths (the original checkpoint's, `single_file.unet_to_ldm`)."""
    from .single_file import _same, unet_to_ldm

    layers = unet.config.layers_per_block
    # unet_to_ldm only renames keys and passes the values through, so the values can be the diffusers names.
    renamed = unet_to_ldm({k: k for k in unet.state_dict()}, layers if isinstance(layers, int) else _same(layers))
    return {hf.rpartition(".")[0]: ldm.rpartition(".")[0] for ldm, hf in renamed.items()}


def kohya_names(pipe, *, both: bool = False) -> dict[str, str]:
    """Each parameter-holding module's kohya name -> its full path (`unet.down_blocks.0...`). The UNet takes
    the family's names (SGM for SDXL); `both`: also the other spelling, for reading a file (A1111 and ComfyUI
    read either)."""
    from .families import family_of

    sgm = family_of(pipe).kohya_sgm_names
    names = {}
    for component, prefix in _kohya_prefixes(pipe).items():
        module = components(pipe)[component]
        paths = {name.rpartition(".")[0] for name, _ in module.named_parameters()}
        spellings = []
        if component != "unet" or not sgm or both:
            spellings.append({p: p for p in paths})
        if component == "unet" and (sgm or both):
            spellings.append(_sgm_module_names(module))
        for spelling in spellings:
            for path in paths:
                names[f"{prefix}_{spelling[path].replace('.', '_')}"] = f"{component}.{path}"
    return names


def layer_group(name: str) -> str:
    """The group a parameter or module is reported under: its text encoder, or the kind of UNet layer."""
    component, _, path = name.partition(".")
    if component != "unet":
        return component
    for pattern, group in (("attn2", "cross-attention (attn2)"), ("attn1", "self-attention (attn1)"),
                           (".ff.", "feed-forward"), ("proj_in", "transformer in/out"),
                           ("proj_out", "transformer in/out"), ("norm", "norms"), ("resnets", "resnet layers"),
                           ("samplers", "down/up samplers")):
        if pattern in path:
            return group
    return "embeddings, conv in/out"


# ---------------------------------------------------------------------------------------------- differences

def weight_differences(base_pipe, erased_pipe) -> Iterator[tuple[str, "torch.Tensor"]]:
    """(full parameter name, erased - base in fp32) for every parameter that differs, one at a time (an SDXL
    UNet's differences are GBs). Refuses pipelines of different architectures."""
    import torch

    base, erased = components(base_pipe), components(erased_pipe)
    if base.keys() != erased.keys():
        raise ConceptEraseError(f"the erased model has components {sorted(erased)}, its base {sorted(base)}")
    for component, module in erased.items():
        if model_fingerprint(module) != model_fingerprint(base[component]):
            raise ConceptEraseError(f"the erased model's {component} has another architecture than the base's "
                                    f"(fingerprint {model_fingerprint(module)}, base {model_fingerprint(base[component])})")
        base_state = base[component].state_dict()
        for name, value in module.state_dict().items():
            if not torch.equal(value, base_state[name]):
                yield f"{component}.{name}", value.detach().float().cpu() - base_state[name].detach().float().cpu()


def _factor(diff: "torch.Tensor", rank: int | None, energy: float | None):
    """Truncated SVD of a Linear (out, in) or Conv2d (out, in, k, k) difference: (down, up, kept squared norm,
    total squared norm), `up @ down` its best rank-r approximation (Eckart-Young)."""
    import torch

    matrix = diff.reshape(diff.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    power = s.square()
    total = float(power.sum())
    if energy is not None:  # the smallest r whose leading singular values keep `energy` of the squared norm
        r = int(torch.searchsorted(power.cumsum(0) / total, torch.tensor(energy, dtype=power.dtype) - 1e-12)) + 1
    else:
        r = rank
    r = max(1, min(r, s.numel()))
    root = s[:r].sqrt()
    down, up = root[:, None] * vh[:r], u[:, :r] * root[None, :]
    if diff.dim() == 4:  # LoCon: down is a k x k conv to r channels, up a 1x1 conv
        down, up = down.reshape(r, *diff.shape[1:]), up.reshape(diff.shape[0], r, 1, 1)
    return down.float(), up.float(), float(power[:r].sum()), total


@dataclass
class LayerRecord:
    """What one changed parameter became in the export."""

    name: str          # full parameter name, `unet.down_blocks...to_q.weight`
    energy: float      # the difference's squared norm
    kept: float        # the squared norm the file keeps (all of it for LyCORIS full)
    rank: int | None = None       # the LoRA rank (None: not a LoRA layer)
    full_rank: int | None = None  # min(out, in * k * k)


@dataclass
class ExportReport:
    """The export's layers, file size and the full checkpoint's size at the same precision."""

    path: Path
    to: str
    layers: list[LayerRecord] = field(default_factory=list)
    file_bytes: int = 0
    checkpoint_bytes: int = 0
    dtype: str = "fp32"

    def groups(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for record in self.layers:
            g = out.setdefault(layer_group(record.name), {"layers": set(), "ranks": [], "energy": 0.0, "kept": 0.0,
                                                           "left_out": 0.0})
            g["energy"] += record.energy
            g["kept"] += record.kept
            if record.kept > 0:
                g["layers"].add(record.name.rpartition(".")[0])
            if record.rank is not None:
                g["ranks"].append(record.rank)
            elif record.kept < record.energy:
                g["left_out"] += record.energy
        return out

    @property
    def energy_kept(self) -> float:
        total = sum(r.energy for r in self.layers)
        return sum(r.kept for r in self.layers) / total if total else 1.0

    def table(self) -> str:
        """Per layer group: the layers in the file, their LoRA ranks, the share of the difference's squared norm
        kept, and the share held by parameters the format cannot carry; then the file size."""
        lines = ["| layer group | layers in the file | LoRA rank | energy kept | not in the format |",
                 "| --- | ---: | ---: | ---: | ---: |"]
        groups = self.groups()
        for name, g in sorted(groups.items()):
            ranks = g["ranks"]
            rank = "" if not ranks else str(ranks[0]) if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}"
            share = g["kept"] / g["energy"] if g["energy"] else 1.0
            left = g["left_out"] / g["energy"] if g["energy"] else 0.0
            lines.append(f"| {name} | {len(g['layers'])} | {rank} | {share:.1%} | {left:.1%} |")
        lines.append(f"| all | {sum(len(g['layers']) for g in groups.values())} | | {self.energy_kept:.1%} | |")
        lines.append("")
        lines.append(f"{self.path}: {_size(self.file_bytes)}, {self.file_bytes / self.checkpoint_bytes:.2%} of the "
                     f"full checkpoint ({_size(self.checkpoint_bytes)}: UNet, VAE and text encoders at {self.dtype}); "
                     f"not in the format: {'biases, norms and embeddings' if self.to == 'lora' else 'embeddings'}")
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _layer_kind(module) -> str | None:
    """"lora" for a Linear or Conv2d, "norm" for a GroupNorm or LayerNorm, None for what neither format holds."""
    import torch

    if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        return "lora"
    if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
        return "norm"
    return None


def erasure_tensors(base_pipe, erased_pipe, *, to: str = "lora", rank: int | None = None,
                    energy: float | None = None, layout: str = "kohya") -> tuple[dict, list[LayerRecord]]:
    """The file's tensors (fp32) and a record per changed parameter. `to`: "lora" (exactly one of `rank`,
    `energy`) or "lycoris-full"; `layout`: "kohya" or "diffusers" (a LoRA only: LyCORIS files are kohya-named)."""
    import torch

    if to not in FORMATS:
        raise ConceptEraseError(f"unknown erasure format {to!r}; choose {' or '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise ConceptEraseError(f"unknown LoRA layout {layout!r}; choose {' or '.join(LAYOUTS)}")
    if to == "lora" and (rank is None) == (energy is None):
        raise ConceptEraseError("a LoRA export needs exactly one of --rank and --energy")
    if to == "lycoris-full" and layout != "kohya":
        raise ConceptEraseError("LyCORIS files use kohya's names: --layout diffusers is for --to lora")
    kohya = {path: name for name, path in kohya_names(erased_pipe).items()}
    modules = components(erased_pipe)
    tensors: dict[str, torch.Tensor] = {}
    records: list[LayerRecord] = []
    for name, diff in weight_differences(base_pipe, erased_pipe):
        path, _, param = name.rpartition(".")
        component, _, sub = path.partition(".")
        kind = _layer_kind(modules[component].get_submodule(sub))
        squared = float(diff.double().square().sum())
        key = kohya[path] if layout == "kohya" else path
        if to == "lora" and kind == "lora" and param == "weight":
            down, up, kept, _ = _factor(diff, rank, energy)
            if layout == "kohya":
                tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
            else:
                tensors.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
            records.append(LayerRecord(name, squared, kept, down.shape[0], min(diff.shape[0], diff[0].numel())))
        elif to == "lycoris-full" and kind is not None:
            suffix = {("lora", "weight"): "diff", ("lora", "bias"): "diff_b", ("norm", "weight"): "w_norm",
                      ("norm", "bias"): "b_norm"}[kind, param]
            tensors[f"{key}.{suffix}"] = diff
            records.append(LayerRecord(name, squared, squared))
        else:
            records.append(LayerRecord(name, squared, 0.0))
    if to == "lycoris-full":
        _complete_lycoris(tensors, modules, {v: k for k, v in kohya.items()})
    if not tensors:
        raise ConceptEraseError("the erased model does not differ from its base in any layer a "
                                f"{'LoRA' if to == 'lora' else 'LyCORIS file'} can hold")
    return tensors, records


def _complete_lycoris(tensors: dict, modules: dict, paths: dict[str, str]) -> None:
    """LyCORIS reads a layer from its weight entry (`diff`, `w_norm`) and a norm's bias beside it: give a layer
    whose weight or bias alone changed the other as zeros."""
    import torch

    for key in list(tensors):
        name, _, suffix = key.rpartition(".")
        component, _, sub = paths[name].partition(".")
        module = modules[component].get_submodule(sub)
        pair = {"diff": "diff_b", "diff_b": "diff", "w_norm": "b_norm", "b_norm": "w_norm"}[suffix]
        param = module.weight if pair in ("diff", "w_norm") else module.bias
        if param is not None and f"{name}.{pair}" not in tensors:
            tensors[f"{name}.{pair}"] = torch.zeros(param.shape)


def checkpoint_bytes(pipe, dtype: "torch.dtype") -> int:
    """The size of the whole model's weights (UNet, VAE, text encoders) at `dtype`."""
    from ...fingerprints import PIPELINE_COMPONENTS

    size = dtype.itemsize
    return sum(p.numel() * size for name in PIPELINE_COMPONENTS if getattr(pipe, name, None) is not None
               for p in getattr(pipe, name).parameters())


def base_identity(pipe) -> dict[str, dict[str, str]]:
    """What an erasure file records of its base: each component's architecture fingerprint and weights digest."""
    return {name: {"fingerprint": model_fingerprint(m), "digest": weights_digest(m)}
            for name, m in components(pipe).items()}


def export_erasure(base_pipe, erased_pipe, path: str | os.PathLike, *, to: str = "lora", rank: int | None = None,
                   energy: float | None = None, layout: str = "kohya", dtype: str | None = None,
                   info: dict | None = None, overwrite: bool = False) -> ExportReport:
    """Write the erasure (erased_pipe - base_pipe) as a LoRA or LyCORIS `.safetensors` and report what it kept.
    `dtype` ("fp16", "bf16", "fp32"; default fp32); `info`: what the file's metadata says of the erasure (the
    base model's name, concept, method), beside the base's identity."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConceptEraseError(f"erasure export {str(path)!r} must end in .safetensors")
    target = resolve_dtype(dtype)
    tensors, records = erasure_tensors(base_pipe, erased_pipe, to=to, rank=rank, energy=energy, layout=layout)
    tensors = {k: v.to(target).contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", f"{META_PREFIX}format": to, f"{META_PREFIX}layout": layout,
                f"{META_PREFIX}base": json.dumps(base_identity(base_pipe), sort_keys=True)}
    if to == "lora":
        metadata[f"{META_PREFIX}rank" if rank is not None else f"{META_PREFIX}energy"] = str(rank or energy)
    metadata.update({f"{META_PREFIX}{k}": json.dumps(v) for k, v in (info or {}).items() if v is not None})
    with atomic_file(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    dtype_name = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}[str(target)]
    return ExportReport(path, to, records, path.stat().st_size, checkpoint_bytes(erased_pipe, target), dtype_name)
