"""Loading Stable Diffusion pipelines safely: any checkpoint in.

In: a diffusers folder, a hub id (online only), "minisd", "minisd-xl", or one `.safetensors` / `.ckpt` file in
the original Stable Diffusion (LDM) or SDXL (SGM) layout (read with diffusers' `from_single_file`; `config`
names a local diffusers folder so it works offline). The model family (SD 1.x, SD 2.x, SDXL, SD 3, FLUX: `families.py`)
is detected from the folder's config or the file's keys before anything heavy is read, printed, and can be
overridden (`family`); other families (the SDXL refiner, PixArt, ...) are refused by name. A `.ckpt` is a pickle: it is only ever opened with `torch.load(weights_only=True)`, which
refuses any object that would run code, and diffusers' own loader does the same. The training metadata that
PyTorch Lightning stored beside the weights of SD 1.x checkpoints (sd-v1-4.ckpt) is read as inert stand-ins.

The ways out are `card.save_pipeline` (a diffusers folder with a model card), `single_file.export_single_file`
(the original key layout) and `delta.save_delta` (only what erasure changed).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ConceptEraseError, first_line
from ...fingerprints import check_file_digest
from ...runtime import resolve_device
from ..minisd import MINISD_MODELS, minisd_path
from .facts import PICKLE_SUFFIXES, check_model_source, check_pickle_header
from .family import Family
from .families import family_from_config, family_from_keys, get_family, set_family

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: `concept-erase export --help` must not pay for it (cli.py)
DTYPES: dict[str, str] = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                          "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """None -> float32; "fp16"/"bf16"/"fp32" (or their long names, or a torch.dtype) -> that dtype."""
    import torch

    key = "fp32" if dtype is None else str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ConceptEraseError(f"unknown dtype {str(dtype)!r}; use fp32, fp16 or bf16")
    return getattr(torch, DTYPES[key])


def load_pipeline(
    source: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    family: str | None = None,
):
    """A `StableDiffusionPipeline` (SD 1.x/2.x), `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline` or
    `FluxPipeline` (the family's `pipeline_class`) from `source`, with no safety checker or watermarker, in eval mode.

    source: "minisd", "minisd-xl", a diffusers folder, a `.safetensors` / `.ckpt` single file (`config`: a local
    diffusers folder, "minisd" or "minisd-xl", giving the component configs; required offline), or a hub id
    (online only).
    family: override the detected family ("sd1", "sd2", "sd2-v", "sdxl", "sd3", "flux"; `--family`).
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
    if family is not None:
        get_family(family)  # an unknown name fails before any loading
    path = minisd_path(source) if source in MINISD_MODELS else Path(source).expanduser()
    if path.is_dir():
        pipe, how = _load_folder(path, torch_dtype, family), "its model_index.json"
        if (path / "safree.json").is_file():  # an inference-time erasure: the base weights + SAFREE's hooks
            from .safree import attach_safree

            attach_safree(pipe, path)
    elif path.is_file():
        pipe, how = _load_single_file(path, config, torch_dtype, family), "its tensor names"
    else:
        check_model_source(source)  # a hub id, or a one-line error
        pipe, how = _load_hub(source, torch_dtype, family), "its model_index.json"
    found = set_family(pipe, family)
    logger.info("model family: %s, %s (%s)", found.name, found.description,
                "from --family" if family else "detected from " + how)
    if target is not None:
        pipe.to(target)
    for module in (found.denoiser(pipe), pipe.vae, *found.text_modules(pipe).values()):
        module.eval()
    return pipe


def _pipeline_class(family: Family):
    import diffusers

    from ...logs import follow_progress_switch

    pipeline_class = getattr(diffusers, family.pipeline_class)  # imports transformers too
    follow_progress_switch()  # --no-progress reaches diffusers' and transformers' loading bars here
    return pipeline_class


def _chosen(detected: Family, override: str | None) -> Family:
    """The family to load as: the override when given (if it fits, `Family.check_fits`), else the detected one."""
    if not override:
        return detected
    family = get_family(override)
    family.check_fits(detected)
    return family


def _load_folder(path: Path, torch_dtype: torch.dtype, override: str | None):
    if not (path / "model_index.json").is_file():
        raise ConceptEraseError(f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json)")
    family = _chosen(family_from_config(path), override)
    try:
        return _pipeline_class(family).from_pretrained(path, dtype=torch_dtype, local_files_only=True,
                                                       **family.pipeline_kwargs)
    except Exception as err:
        raise ConceptEraseError(f"cannot load pipeline folder {str(path)!r}: {first_line(err)}") from None


def _load_hub(repo_id: str, torch_dtype: torch.dtype, override: str | None):
    from huggingface_hub import constants, hf_hub_download

    if constants.HF_HUB_OFFLINE:
        raise ConceptEraseError(f"model {repo_id!r} is not a local path, and the hub is offline (HF_HUB_OFFLINE=1)")
    try:  # the small index first: another family is refused before gigabytes download
        index = Path(hf_hub_download(repo_id, "model_index.json")).parent
        family = _chosen(family_from_config(index), override)
        return _pipeline_class(family).from_pretrained(repo_id, dtype=torch_dtype, **family.pipeline_kwargs)
    except ConceptEraseError:
        raise
    except Exception as err:
        raise ConceptEraseError(f"cannot load hub model {repo_id!r}: {first_line(err)}") from None


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
                f"{str(path)!r} is not a readable safetensors file (truncated or damaged?): {first_line(err)}") from None
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
    check_pickle_header(path)  # random bytes are named from their first ones (the CLI asks before torch loads)
    try:
        with _lightning_stand_ins():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        # torch names the global it refused to import, e.g. "GLOBAL posix.system" or "GLOBAL getattr"
        found = re.search(r"GLOBAL [\w.]+", str(err))
        if found is None:  # not a refused import: the bytes are not a valid pickle at all
            raise ConceptEraseError(f"{str(path)!r} is not a checkpoint (or is damaged): {_torch_reason(err)}") from None
        raise ConceptEraseError(
            f"refusing to load {str(path)!r}: the pickle needs code to run ({found.group(0)}); "
            "convert it to .safetensors with a tool you trust") from None
    except Exception as err:
        raise ConceptEraseError(f"{str(path)!r} is not a checkpoint (or is damaged): {_torch_reason(err)}") from None


def _torch_reason(err: BaseException) -> str:
    """Why torch.load refused a file, without torch's advice to retry with `weights_only=False`: that runs
    whatever code the pickle names, which this tool never does (and a damaged file would not load anyway)."""
    text = str(err)
    unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if unpickler:
        return f"unreadable pickle data ({unpickler.group(1).strip()})"
    line = first_line(err)
    if "weights_only" in line:
        return "unreadable pickle data"
    return line.split("  (Could this error message be improved?")[0].strip()


def _resolve_config(config: str | os.PathLike | None, path: Path) -> str | None:
    from huggingface_hub import constants

    if config is None:
        if constants.HF_HUB_OFFLINE:
            raise ConceptEraseError(
                f"single-file checkpoint {str(path)!r} needs --config <local diffusers folder> while offline")
        return None
    folder = minisd_path(str(config)) if str(config) in MINISD_MODELS else Path(config).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ConceptEraseError(f"config {str(config)!r} is not a diffusers pipeline folder (no model_index.json)")
    return str(folder)


def _load_single_file(path: Path, config: str | os.PathLike | None, torch_dtype: torch.dtype,
                      override: str | None):
    keys = read_checkpoint_keys(path)  # fails cleanly (and safely) before diffusers sees the file
    if path.suffix == ".safetensors":  # our exports record a content digest: a flipped byte is caught here
        check_file_digest(path, "checkpoint")
    try:  # the refiner / no denoiser at all are refused here, by name
        detected = family_from_keys(keys)
    except ConceptEraseError as err:
        raise ConceptEraseError(f"{str(path)!r}: {err}") from None
    family = _chosen(detected, override)
    config_dir = _resolve_config(config, path)
    if config_dir is not None and family_from_config(config_dir).pipeline_class != family.pipeline_class:
        raise ConceptEraseError(f"--config {str(config)!r} is a {family_from_config(config_dir).name} model but "
                                f"{str(path)!r} is {family.name}; give the configs of the same family")
    kwargs = {"config": config_dir, "local_files_only": True} if config_dir else {}
    try:
        with _lightning_stand_ins():  # diffusers reads the file again with weights_only=True
            if family.single_file_layout is not None and not any(k.startswith("first_stage_model.") for k in keys):
                return _transformer_alone(path, family, config_dir, torch_dtype)
            return _pipeline_class(family).from_single_file(
                str(path), dtype=torch_dtype, **family.pipeline_kwargs, **kwargs)
    except Exception as err:
        raise ConceptEraseError(f"cannot load checkpoint {str(path)!r}: {first_line(err)}") from None


def _transformer_alone(path: Path, family: Family, config_dir: str | None, torch_dtype: torch.dtype):
    """A file holding a diffusion transformer alone (FLUX's own files, `export_single_file`'s): the transformer
    through diffusers' single-file reader, every other component from the config folder."""
    import json

    import diffusers

    if config_dir is None:
        raise ConceptEraseError(f"{str(path)!r} holds a {family.name} transformer alone: pass --config <a diffusers "
                                "folder of the model> for its text encoders and VAE")
    name = json.loads((Path(config_dir) / "model_index.json").read_text())[family.denoiser_name][1]
    denoiser = getattr(diffusers, name).from_single_file(str(path), config=config_dir, subfolder=family.denoiser_name,
                                                         dtype=torch_dtype, local_files_only=True)
    return _pipeline_class(family).from_pretrained(config_dir, dtype=torch_dtype, local_files_only=True,
                                                   **{family.denoiser_name: denoiser}, **family.pipeline_kwargs)
