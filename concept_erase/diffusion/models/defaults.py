"""Defaults a command takes from the model it is given: its base model (through the model card), its family
(`Family.sampling_guidance`, `evaluation_protocol`, ...), and the image size its UNet and VAE were built for.

An erased model keeps its base's defaults: `erase` writes `base_model` into the card, so an erased MiniSD is
sampled, evaluated and judged as MiniSD is (DDIM, 25 steps, guidance 5, the digit judge), not with the
paper's 512 px protocol and an ImageNet classifier. Cards are followed through chains (an erased model
erased again). Every command prints what it chose (`ModelDefaults.describe`), and a resolution far from
the model's own size is refused (`check_resolution`): a 16 px model sampled at 512 px only burns hours.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConceptEraseError
from ..minisd import MINISD_GUIDANCE, MINISD_MODELS, MINISD_STEPS, minisd_path
from .facts import check_model_source
from .families import FAMILIES, FLUX, SD1, family_from_config

# The judge of class prompt sets for every model but MiniSD (evaluation.classes.load_classifier).
IMAGENET_CLASSIFIER = "microsoft/resnet-50"
# A resolution more than this factor away from the model's own size cannot suit it.
RESOLUTION_FACTOR = 2
CARD_CHAIN_LIMIT = 8


@dataclass(frozen=True)
class ModelDefaults:
    """What a command uses for a model when the user does not say."""

    base_model: str  # the root of the card chain: "minisd", "minisd-xl", a hub id, a folder or a file
    native_resolution: int | None  # the image side the UNet and VAE were built for (None: unknown)
    protocol: str  # evaluation preset name (evaluation.generation.PRESETS)
    classifier: str  # judge for class prompt sets (evaluation.classes.load_classifier)
    steps: int
    guidance: float
    via: str  # how base_model was found, for the printed line

    @property
    def is_minisd(self) -> bool:
        return self.base_model in MINISD_MODELS

    def describe(self, *chosen: str) -> str:
        """One line: which model the defaults come from and the `chosen` settings (already formatted)."""
        return f"defaults for {self.via}: " + ", ".join(chosen)


def _card_base(folder: Path) -> str | None:
    from .card import read_model_card

    if not (folder / "README.md").is_file():
        return None
    try:
        base = read_model_card(folder).get("base_model")
    except ConceptEraseError:  # a folder whose README is not a card: no base to follow
        return None
    return str(base) if base else None


def _resolve_relative(base: str, folder: Path) -> str:
    """A card's base_model is the --model the user typed, maybe relative to where erase ran: try it as
    written, then beside the erased folder."""
    if base in MINISD_MODELS or Path(base).expanduser().exists():
        return base
    sibling = folder.parent / base
    return str(sibling) if sibling.exists() else base


def base_model_of(source: str, config: str | None = None) -> tuple[str, str]:
    """(root base model, how it was found). A single file takes its family from `config` ("minisd" or a
    folder); a folder with a card follows `base_model` until a model without one."""
    source = str(source)
    if source in MINISD_MODELS:
        return source, source
    path = Path(source).expanduser()
    if path.is_file():
        if config is not None:
            root, _ = base_model_of(str(config))
            return root, f"{source} (configs from {config})"
        return source, source
    chain = [source]
    current = path
    for _ in range(CARD_CHAIN_LIMIT):
        if not current.is_dir():
            break
        base = _card_base(current)
        if base is None:
            break
        base = _resolve_relative(base, current)
        chain.append(base)
        if base in MINISD_MODELS:
            break
        current = Path(base).expanduser()
    via = source if len(chain) == 1 else f"{source} (model card base_model: {' -> '.join(chain[1:])})"
    return chain[-1], via


def native_resolution(source: str, config: str | None = None) -> int | None:
    """UNet sample size x VAE downsampling, read from the folder's config files (no weights are loaded);
    None for a hub id or a single file without a config folder."""
    if str(source) in MINISD_MODELS:
        folder = minisd_path(str(source))
    else:
        path = Path(str(source)).expanduser()
        folder = path if path.is_dir() else None
        if folder is None and config is not None:
            return native_resolution(config)
    if folder is None:
        return None
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = unet.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    if not isinstance(size, int):
        return None
    return size * 2 ** (len(vae.get("block_out_channels", [0])) - 1)


def model_defaults(source: str | os.PathLike, config: str | os.PathLike | None = None) -> ModelDefaults:
    """The defaults for `source` (any `load_pipeline` source) from its base model and configs."""
    source, config = str(source), None if config is None else str(config)
    check_model_source(source)  # before any default is said
    base, via = base_model_of(source, config)
    resolution = native_resolution(source, config)
    if resolution is None and base != source:
        resolution = native_resolution(base)
    if base in MINISD_MODELS:
        protocol = "minisd-flux" if base == "minisd-flux" else "minisd"  # its own flow-matching scheduler
        return ModelDefaults(base, resolution, protocol, "minisd-digits", MINISD_STEPS, MINISD_GUIDANCE, via)
    # a hub id or a single file without configs says nothing before loading: SD 1.x's defaults
    steps, guidance, protocol = (_folder_defaults(source, config) or _folder_defaults(base)
                                 or SD1.sampling_defaults({}))
    return ModelDefaults(base, resolution, protocol, IMAGENET_CLASSIFIER, steps, guidance, via)


def sampling_default(index: int) -> str:
    """A sampling flag's default in --help, from what `model_defaults` resolves: "the base model's (minisd*: 25;
    sd1: 25; ...; flux: 28; flux-schnell: 4)" for index 0 (steps), the guidance for index 1. Keys: the shipped
    MiniSD models, each --family, and FLUX.1 schnell's structure (a transformer without a guidance embedding)."""
    values = {"minisd*": (MINISD_STEPS, MINISD_GUIDANCE)}
    values |= {name: family.sampling_defaults({}) for name, family in FAMILIES.items()}
    values[FLUX.schnell_protocol] = FLUX.sampling_defaults({"guidance_embeds": False})
    return "the base model's (" + "; ".join(f"{key}: {v[index]:g}" for key, v in values.items()) + ")"


def _folder_defaults(source: str, config: str | None = None) -> tuple[int, float, str] | None:
    """`Family.sampling_defaults` of `source` (or of the config folder of a single file): its family from its
    model_index.json, its denoiser's config.json (FLUX.1 schnell's structure has its own); None when there is
    no such folder or it cannot be read."""
    path = Path(str(source)).expanduser()
    folder = path if path.is_dir() else Path(config).expanduser() if config and path.is_file() else None
    if folder is None or not (folder / "model_index.json").is_file():
        return None
    try:
        family = family_from_config(folder)
    except (ConceptEraseError, OSError, ValueError):
        return None
    try:
        denoiser = json.loads((folder / family.denoiser_name / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        denoiser = {}
    return family.sampling_defaults(denoiser if isinstance(denoiser, dict) else {})


def check_resolution(resolution: int | None, defaults: ModelDefaults, what: str = "--resolution") -> None:
    """Refuse a resolution the model cannot draw at: more than RESOLUTION_FACTOR times from its own size."""
    native = defaults.native_resolution
    if resolution is None or native is None:
        return
    if resolution > native * RESOLUTION_FACTOR or resolution * RESOLUTION_FACTOR < native:
        # a size that came from a --protocol preset is fixed by choosing MiniSD's; a size flag, by its value
        hint = "--protocol minisd" if defaults.is_minisd and what.startswith("--protocol") else f"{what} {native}"
        raise ConceptEraseError(f"{what} {resolution} px does not suit {defaults.via}, which draws "
                                f"{native} px images; use {hint}")


# A released Stable Diffusion draws at 512 px or more; MiniSD and test pipelines draw far smaller images.
RELEASED_RESOLUTION = 512


def check_concept_fits(concept, defaults: ModelDefaults) -> None:
    """Refuse a preset written for the other world: a Stable Diffusion preset (nudity, Imagenette, artists) on
    MiniSD, or a MiniSD preset on a model that draws at a released checkpoint's size. Custom concepts
    (--forget/--surrogate) fit any model."""
    if concept.world == "stable-diffusion" and defaults.is_minisd:
        raise ConceptEraseError(f"preset {concept.name!r} is written for Stable Diffusion checkpoints, not "
                                f"{defaults.via}: MiniSD's presets are minisd-digit-<digit> and minisd-style-<style> "
                                "(`concept-erase concepts` lists them), or give --forget and --surrogate")
    native = defaults.native_resolution
    if concept.world == "minisd" and not defaults.is_minisd and native and native >= RELEASED_RESOLUTION:
        raise ConceptEraseError(f"preset {concept.name!r} is written for MiniSD, not {defaults.via} ({native} px): "
                                "its presets are nudity, imagenette-<class> and style-<artist> (`concept-erase "
                                "concepts` lists them), or give --forget and --surrogate")
