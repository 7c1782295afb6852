"""Loading and saving Stable Diffusion pipelines: any checkpoint in, any format out.

In: a diffusers folder, a hub id (online only), "minisd", or one `.safetensors` / `.ckpt` file in the original
Stable Diffusion layout (read with diffusers' `from_single_file`; `config` names a local diffusers folder so
it works offline). A `.ckpt` is a pickle: it is only ever opened with `torch.load(weights_only=True)`, which
refuses any object that would run code, and diffusers' own loader does the same. The training metadata that
PyTorch Lightning stored beside the weights of SD 1.x checkpoints (sd-v1-4.ckpt) is read as inert stand-ins.

Out, three ways (issue 3):
  (a) `save_pipeline`: a diffusers folder whose README.md is a model card (YAML front matter);
  (b) `export_single_file`: one `.safetensors` in the original SD key layout (model.diffusion_model.*,
      first_stage_model.*, cond_stage_model.transformer.*), which `from_single_file` loads back exactly;
  (c) `save_delta`: only the changed UNet entries plus their mask; `apply_delta` puts them back on the base
      bit for bit, and refuses a base with another architecture or other weights.
Every output is written to a temporary sibling and renamed (`concept_erase.io_utils`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConceptEraseError
from ..io_utils import atomic_dir, atomic_file

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: `concept-erase export --help` must not pay for it (cli.py)
DTYPES: dict[str, str] = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                          "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
LDM_UNET, LDM_VAE, LDM_CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
DELTA_FORMAT = "concept-erase-unet-delta"


# ----------------------------------------------------------------------------------------------- loading


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """None -> float32; "fp16"/"bf16"/"fp32" (or their long names, or a torch.dtype) -> that dtype."""
    import torch

    key = "fp32" if dtype is None else str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ConceptEraseError(f"unknown dtype {str(dtype)!r}; use fp32, fp16 or bf16")
    return getattr(torch, DTYPES[key])


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


def load_pipeline(
    source: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
):
    """A `StableDiffusionPipeline` from `source`, with no safety checker, in eval mode.

    source: "minisd", a diffusers folder, a `.safetensors` / `.ckpt` single file (`config`: a local diffusers
    folder, or "minisd", giving the component configs; required offline), or a hub id (online only).
    dtype: fp32 by default; fp16 / bf16 only with CUDA (half precision on CPU is slow and lossy).
    device: None keeps the pipeline on the CPU; "auto" picks cuda when available.
    """
    import torch

    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    # Half precision only where it will run on a GPU: an explicit CUDA device, or no device (the caller
    # moves the pipeline) on a machine that has one.
    runs_on_cuda = target.type == "cuda" if target is not None else torch.cuda.is_available()
    if torch_dtype != torch.float32 and not runs_on_cuda:
        raise ConceptEraseError(f"dtype {dtype!s} needs a CUDA device; use fp32 on CPU")

    source = str(source)
    path = _minisd_path() if source == "minisd" else Path(source).expanduser()
    if path.is_dir():
        pipe = _load_folder(path, torch_dtype)
    elif path.is_file():
        pipe = _load_single_file(path, config, torch_dtype)
    elif _looks_like_hub_id(source):
        pipe = _load_hub(source, torch_dtype)
    else:
        raise ConceptEraseError(
            f"model {source!r} does not exist (expected a diffusers folder, a .safetensors/.ckpt file, "
            "a hub id or 'minisd')")
    if target is not None:
        pipe.to(target)
    for name in ("unet", "vae", "text_encoder"):
        getattr(pipe, name).eval()
    return pipe


def _minisd_path() -> Path:
    try:
        from .minisd import minisd_path
    except ImportError as err:
        raise ConceptEraseError(f"MiniSD is not available in this installation ({err})") from None
    return minisd_path()


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None and not source.endswith(
        (".safetensors",) + PICKLE_SUFFIXES)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_folder(path: Path, torch_dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise ConceptEraseError(f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json)")
    try:
        return StableDiffusionPipeline.from_pretrained(
            path, dtype=torch_dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, local_files_only=True)
    except Exception as err:
        raise ConceptEraseError(f"cannot load pipeline folder {str(path)!r}: {_first_line(err)}") from None


def _load_hub(repo_id: str, torch_dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ConceptEraseError(f"model {repo_id!r} is not a local path, and the hub is offline (HF_HUB_OFFLINE=1)")
    try:
        return StableDiffusionPipeline.from_pretrained(
            repo_id, dtype=torch_dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    except Exception as err:
        raise ConceptEraseError(f"cannot load hub model {repo_id!r}: {_first_line(err)}") from None


def read_checkpoint_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a single-file checkpoint, read safely; a ConceptEraseError for anything that is not
    one: a missing file, a truncated or garbage safetensors, a pickle needing code to load (refused unrun)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConceptEraseError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:  # reads and validates the header only: a truncated file fails here, before any weight is read
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as err:
            raise ConceptEraseError(
                f"{str(path)!r} is not a readable safetensors file (truncated or damaged?): {_first_line(err)}") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise ConceptEraseError(f"{str(path)!r} is not a checkpoint (expected .safetensors or .ckpt)")
    state = safe_torch_load(path)
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConceptEraseError(f"{str(path)!r} is not a checkpoint: it holds a {type(state).__name__}, not weights")
    return [k for k, v in state.items() if isinstance(v, torch.Tensor)]


class _Inert:
    """What each `LIGHTNING_STAND_INS` global unpickles to: accepts any arguments and state, keeps none, runs
    nothing (Lightning itself is never imported, nor needed)."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# The globals that PyTorch Lightning checkpoints, such as the official SD 1.x .ckpt files (sd-v1-4.ckpt,
# v1-5-pruned.ckpt), pickle beside "state_dict": the ModelCheckpoint callback (under "callbacks"), numpy
# scalars/arrays in its state (numpy < 2 and >= 2 module names), torch's version string. torch's weights_only
# unpickler maps each name to `_Inert` (`safe_globals` with (object, "module.Name") pairs); every other global
# is still refused.
LIGHTNING_STAND_INS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "torch.torch_version.TorchVersion",
)


def _lightning_stand_ins():
    """A context in which `torch.load(weights_only=True)`, ours and diffusers', reads `LIGHTNING_STAND_INS`."""
    import torch

    return torch.serialization.safe_globals([(_Inert, name) for name in LIGHTNING_STAND_INS])


def safe_torch_load(path: str | os.PathLike) -> Any:
    """`torch.load` that never executes pickled code: anything outside plain tensors and containers is refused
    (a `__reduce__` payload raises here without running), except Lightning's training metadata, which becomes
    inert `_Inert` objects (`LIGHTNING_STAND_INS`). Zip-format files are memory-mapped, not read."""
    import torch

    path = Path(path)
    try:
        with _lightning_stand_ins():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        # torch names the global it refused to import, e.g. "GLOBAL posix.system" or "GLOBAL getattr"
        found = re.search(r"GLOBAL [\w.]+", str(err))
        if found is None:  # not a refused import: the bytes are not a valid pickle at all
            raise ConceptEraseError(f"{str(path)!r} is not a checkpoint (or is damaged): {_first_line(err)}") from None
        raise ConceptEraseError(
            f"refusing to load {str(path)!r}: the pickle needs code to run ({found.group(0)}); "
            "convert it to .safetensors with a tool you trust") from None
    except Exception as err:
        raise ConceptEraseError(f"{str(path)!r} is not a checkpoint (or is damaged): {_first_line(err)}") from None


def _resolve_config(config: str | os.PathLike | None, path: Path) -> str | None:
    from huggingface_hub import constants

    if config is None:
        if constants.HF_HUB_OFFLINE:
            raise ConceptEraseError(
                f"single-file checkpoint {str(path)!r} needs --config <local diffusers folder> while offline")
        return None
    folder = _minisd_path() if str(config) == "minisd" else Path(config).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ConceptEraseError(f"config {str(config)!r} is not a diffusers pipeline folder (no model_index.json)")
    return str(folder)


def _load_single_file(path: Path, config: str | os.PathLike | None, torch_dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    keys = read_checkpoint_keys(path)  # fails cleanly (and safely) before diffusers sees the file
    if not any(k.startswith(LDM_UNET) for k in keys):
        raise ConceptEraseError(
            f"{str(path)!r} is not a Stable Diffusion checkpoint (no {LDM_UNET}* weights among {len(keys)} tensors)")
    config_dir = _resolve_config(config, path)
    kwargs = {"config": config_dir, "local_files_only": True} if config_dir else {}
    try:
        with _lightning_stand_ins():  # diffusers reads the file again with weights_only=True
            return StableDiffusionPipeline.from_single_file(
                str(path), dtype=torch_dtype, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False, **kwargs)
    except Exception as err:
        raise ConceptEraseError(f"cannot load checkpoint {str(path)!r}: {_first_line(err)}") from None


# ------------------------------------------------------------------------------- (a) diffusers + model card


def save_pipeline(pipe, out_dir: str | os.PathLike, *, card: dict | None = None, overwrite: bool = False) -> Path:
    """Write `pipe` as a diffusers folder (safetensors weights) with a README.md model card made from `card`:
    base_model, concept, surrogate, method, keep, steps, evaluation (a dict of figures), any extra keys."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(model_card(card or {}), encoding="utf-8")
    return out_dir


def _plain(value: Any) -> Any:
    """Tensors, numpy scalars, paths and tuples -> YAML-safe builtins."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def model_card(card: dict) -> str:
    """A Hugging Face model card: YAML front matter (machine-readable) + a short human-readable body."""
    import yaml

    card = _plain(dict(card))
    tags = ["stable-diffusion", "text-to-image", "diffusers", "concept-erasure"]
    if card.get("method"):
        tags.append(str(card["method"]))
    front = {"base_model": card.pop("base_model", None), "library_name": "diffusers",
             "pipeline_tag": "text-to-image",
             "tags": list(dict.fromkeys(tags + [str(t) for t in card.pop("tags", [])]))}
    front.update(card)
    front = {k: v for k, v in front.items() if v is not None}
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    concept = front.get("concept")
    lines.append(f"# {front.get('base_model', 'Stable Diffusion')} without {concept!r}" if concept else "# Erased model")
    lines.append("")
    what = f"The concept {concept!r} was erased" if concept else "A concept was erased"
    how = f" with {front['method']}" if front.get("method") else ""
    lines.append(f"{what}{how} (SalUn weight saliency, arXiv 2310.12508) using concept-erase.")
    for key, label in (("surrogate", "Surrogate prompt"), ("keep", "Kept (trainable) weight fraction"),
                       ("steps", "Training steps")):
        if key in front:
            lines.append(f"- {label}: {front[key]}")
    if isinstance(front.get("evaluation"), dict):
        lines += ["", "## Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in _flatten(front["evaluation"]).items()]
    lines += ["", "## Use", "", "```python", "from diffusers import StableDiffusionPipeline",
              'pipe = StableDiffusionPipeline.from_pretrained("<this folder>")', "```", ""]
    return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_model_card(path: str | os.PathLike) -> dict:
    """The YAML front matter of a model card (a README.md, or a folder holding one)."""
    import yaml

    path = Path(path)
    readme = path / "README.md" if path.is_dir() else path
    if not readme.is_file():
        raise ConceptEraseError(f"no model card at {str(readme)!r}")
    text = readme.read_text(encoding="utf-8")
    match = re.match(r"---\r?\n(.*?)\r?\n---\r?\n", text, re.DOTALL)
    if match is None:
        raise ConceptEraseError(f"model card {str(readme)!r} has no YAML front matter")
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        raise ConceptEraseError(f"model card {str(readme)!r} has broken YAML: {_first_line(err)}") from None
    if not isinstance(data, dict):
        raise ConceptEraseError(f"model card {str(readme)!r} front matter is not a mapping")
    return data


def add_evaluation_to_card(folder: str | os.PathLike, name: str, summary: dict) -> dict:
    """Record an evaluation's headline figures in an erased model's card: `evaluation.<name>` in the front
    matter (and its table in the body), README.md rewritten atomically. Returns the new front matter."""
    front = read_model_card(folder)
    evaluation = front.get("evaluation") if isinstance(front.get("evaluation"), dict) else {}
    front["evaluation"] = {**evaluation, name: _plain(summary)}
    with atomic_file(Path(folder) / "README.md", overwrite=True) as tmp:
        tmp.write_text(model_card(front), encoding="utf-8")
    return front


# ------------------------------------------------------------------------- (b) original SD single file
#
# The inverse of diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` /
# `convert_ldm_clip_checkpoint` (diffusers/loaders/single_file_utils.py), written for any number of blocks
# and layers per block (diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py hard-codes
# SD 1.x's 4 blocks x 2 layers). LDM numbers the UNet's sub-modules sequentially: input_blocks.0 is conv_in,
# then each down level has `layers_per_block` (resnet[, attention]) entries followed by one downsampler.

_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet_rest(rest: str) -> str:
    for hf, ldm in _RESNET_TO_LDM:
        if rest.startswith(hf + "."):
            return ldm + rest[len(hf):]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """Diffusers UNet2DConditionModel keys -> LDM keys (without the model.diffusion_model. prefix)."""
    if not isinstance(layers_per_block, int):
        raise ConceptEraseError(f"cannot export a UNet with per-block layer counts {layers_per_block!r}")
    n = layers_per_block + 1  # LDM entries per level: the layers, then the down/up sampler
    up_has_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_FIXED:
            out[f"{_UNET_FIXED[module]}.{param}"] = value
            continue
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            index = 1 + i * n + j if side == "down" else i * n + j
            blocks = "input_blocks" if side == "down" else "output_blocks"
            rest = _resnet_rest(rest) if kind == "resnets" else rest
            out[f"{blocks}.{index}.{0 if kind == 'resnets' else 1}.{rest}"] = value
            continue
        m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
        if m:
            out[f"input_blocks.{(int(m.group(1)) + 1) * n}.0.op.{m.group(2)}"] = value
            continue
        m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
        if m:
            i = int(m.group(1))
            out[f"output_blocks.{i * n + layers_per_block}.{2 if i in up_has_attention else 1}.conv.{m.group(2)}"] = value
            continue
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            j = int(m.group(2))
            if m.group(1) == "resnets":
                out[f"middle_block.{2 * j}.{_resnet_rest(m.group(3))}"] = value
            else:
                out[f"middle_block.{2 * j + 1}.{m.group(3)}"] = value
            continue
        raise ConceptEraseError(f"cannot export UNet parameter {key!r}: it has no original Stable Diffusion name")
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL keys -> LDM keys (without the first_stage_model. prefix)."""
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        # the decoder's levels are numbered from the bottom in LDM, from the top in diffusers
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{num_blocks - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{num_blocks - 1 - int(m.group(1))}.upsample.", new)
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", new)
        if m:
            if m.group(2) not in _VAE_ATTN_TO_LDM:
                raise ConceptEraseError(f"cannot export VAE parameter {key!r}: it has no original Stable Diffusion name")
            new = f"{m.group(1)}.mid.attn_1.{_VAE_ATTN_TO_LDM[m.group(2)]}.{m.group(3)}"
            if m.group(3) == "weight" and m.group(2) != "group_norm":
                value = value.reshape(*value.shape, 1, 1)  # LDM's attention projections are 1x1 convolutions
        if "_blocks." in new or "mid_block." in new:
            raise ConceptEraseError(f"cannot export VAE parameter {key!r}: it has no original Stable Diffusion name")
        out[new] = value
    return out


def to_original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder under the original Stable Diffusion checkpoint names.

    The text encoder keeps transformers' CLIP names under cond_stage_model.transformer. (the SD 1.x layout);
    an SD 2.x OpenCLIP encoder is written the same way, which diffusers loads back but tools expecting
    cond_stage_model.model.* do not.
    """
    unet = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    vae = vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels))
    text = pipe.text_encoder.state_dict()
    state = {LDM_UNET + k: v for k, v in unet.items()}
    state.update({LDM_VAE + k: v for k, v in vae.items()})
    state.update({LDM_CLIP + k: v for k, v in text.items()})
    # CPU and contiguous for safetensors; no copy when already so (an SD checkpoint is GBs)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def export_single_file(pipe, path: str | os.PathLike, *, overwrite: bool = False,
                       dtype: str | torch.dtype | None = None) -> Path:
    """One `.safetensors` in the original SD layout; load it back with
    `StableDiffusionPipeline.from_single_file(path, config=<a diffusers folder of the same model>)`.
    `dtype` ("fp16", "bf16", "fp32"): store the weights in that precision (default: as they are)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConceptEraseError(f"single-file export {str(path)!r} must end in .safetensors")
    state = to_original_state_dict(pipe)
    if dtype is not None:
        target = resolve_dtype(dtype)
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    with atomic_file(path, overwrite=overwrite) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return path


# ------------------------------------------------------------------------------------------- (c) delta


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


def save_delta(base_unet, erased_unet, mask, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save what erasure changed: a folder with `delta.safetensors` (for every changed parameter, its bit-packed
    mask and the erased values under it) and `delta.json` (the base's fingerprint and weights digest).

    `mask`: a `SaliencyMask` (or name -> BoolTensor); its entries are stored for each changed parameter, so
    its keep ratio and concept travel with the delta. A parameter changed outside its mask, or `mask=None`,
    falls back to the exact set of changed entries. Either way `apply_delta` reproduces `erased_unet` exactly.
    """
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from ..saliency import model_fingerprint

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
    import numpy as np
    import torch
    from safetensors import safe_open

    from ..saliency import model_fingerprint

    path = Path(path)
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
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
    if lacking:
        raise ConceptEraseError(f"delta config {str(config_file)!r} is damaged: no {lacking[0]!r}")
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
        raise ConceptEraseError(f"cannot read {str(path / 'delta.safetensors')!r}: {_first_line(err)}") from None
    state = unet.state_dict()  # tensors share storage with the parameters: writing them updates the model
    # Check everything before writing anything, so a damaged delta leaves the base as it was.
    for name in config["parameters"]:
        absent = next((k for k in (f"mask.{name}", f"value.{name}") if k not in stored), None)
        if name not in state or absent:
            raise ConceptEraseError(f"delta {str(path)!r} is damaged: no {absent or name!r} to apply")
    with torch.no_grad():
        for name, info in config["parameters"].items():
            target = state[name]
            n = target.numel()
            where = torch.from_numpy(np.unpackbits(stored[f"mask.{name}"].numpy())[:n].astype(bool))
            where = where.reshape(target.shape).to(target.device)
            target[where] = stored[f"value.{name}"].to(target.device, target.dtype)
    if weights_digest(unet) != config["erased_digest"]:  # safetensors carries no checksum of its own
        raise ConceptEraseError(f"delta {str(path)!r} did not reproduce the erased weights (damaged values); "
                                "reload the base before using it")
    return pipe_or_unet


# ----------------------------------------------------------------------------------------------- the CLI


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="convert a model: diffusers folder, original-SD single file, or a delta against its base",
        description="Load SRC (any format load_pipeline reads) and write it in another format.",
    )
    p.add_argument("source", metavar="SRC", help='the model: a diffusers folder, .safetensors/.ckpt file, hub id or "minisd"')
    p.add_argument("--to", required=True, choices=("single-file", "diffusers", "delta"),
                   help="output format: one original-layout .safetensors, a diffusers folder, or a UNet delta")
    p.add_argument("out", metavar="OUT", help="the output file (single-file) or folder")
    p.add_argument("--config", default=None, help="local diffusers folder with the configs of a single-file SRC")
    p.add_argument("--base", default=None, help="delta only: the base model the delta applies to (required)")
    p.add_argument("--base-config", default=None, help="delta only: config folder for a single-file --base")
    p.add_argument("--mask", default=None,
                   help="delta only: the saliency mask used for the erasure (default: SRC/mask.safetensors when "
                        "present, else exactly the changed entries)")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="single-file only: precision of the stored weights (default: as loaded, fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from ..io_utils import check_output_free

    check_output_free(args.out, args.overwrite)  # fail before loading anything
    if args.to != "delta" and (args.base or args.base_config or args.mask):
        raise ConceptEraseError("--base, --base-config and --mask only apply to --to delta")
    if args.to != "single-file" and args.dtype:
        raise ConceptEraseError("--dtype only applies to --to single-file")
    if args.to == "delta" and not args.base:
        raise ConceptEraseError("--to delta needs --base (the model the delta applies to)")
    pipe = load_pipeline(args.source, config=args.config)
    if args.to == "single-file":
        export_single_file(pipe, args.out, overwrite=args.overwrite, dtype=args.dtype)
    elif args.to == "diffusers":
        source = Path(args.source)
        try:  # carry the erased model's card over
            card = read_model_card(source) if source.is_dir() else {}
        except ConceptEraseError:
            card = {}
        card.setdefault("base_model", args.source)
        save_pipeline(pipe, args.out, card=card, overwrite=args.overwrite)
    else:
        from ..saliency import SaliencyMask

        base = load_pipeline(args.base, config=args.base_config)
        mask_file = args.mask or (Path(args.source) / "mask.safetensors")  # what `erase` saves beside the model
        mask = SaliencyMask.load(mask_file, model=base.unet) if args.mask or Path(mask_file).is_file() else None
        save_delta(base.unet, pipe.unet, mask, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0
