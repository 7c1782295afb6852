"""The models the app may use: the ones named at launch and the ones its Erase tab made, addressed by name only.

The browser never sends a filesystem path: every request names a model from this registry, and an unknown
name is refused with a one-line error. Pipelines are loaded once, at launch (so a bad `--base` / `--erased`
fails before the server starts) or when the Erase tab's job has written its model (`ModelRegistry.add`). An erasure file (a LoRA, LyCORIS or delta from
`concept-erase export` / `erase --save-delta`) joins as the base plus that erasure at a strength the page sets
(`Strength`: `concept-erase apply`'s arithmetic), so the before/after can show a community checkpoint.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concept_erase.errors import ConceptEraseError

BASE_NAME = "base"
# The file the erase command writes beside the model card (docs/ALGORITHMS.md 1: the saliency mask it trained under).
MASK_FILENAME = "mask.safetensors"


@dataclass
class Model:
    """One launched model: its public name, where it came from, and what its folder says about it."""

    name: str
    source: str
    pipe: Any = field(repr=False)
    card: dict = field(default_factory=dict)
    mask_path: Path | None = None
    strength: "Strength | None" = None  # an erasure file applied to the base at a strength (None: weights as loaded)
    # Pipelines are not safe to call from two threads at once (schedulers keep state); one lock each.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def public_source(self) -> str:
        """`source` as the browser may see it: a hub id or "minisd" as is, a local path by its last part only
        (visitors, e.g. under --host 0.0.0.0 or --share, learn nothing of the server's file system)."""
        return Path(self.source).name if Path(self.source).exists() else self.source


def _unique_name(wanted: str, taken: set[str]) -> str:
    name, i = wanted, 2
    while name in taken:
        name, i = f"{wanted}-{i}", i + 1
    return name


def _read_card(folder: Path) -> dict:
    """The model card's front matter, or {} for folders that have none (e.g. a plain diffusers folder)."""
    from concept_erase.diffusion.models.card import read_model_card

    if not (folder / "README.md").is_file():
        return {}
    try:
        return read_model_card(folder) or {}
    except ConceptEraseError:
        return {}


def _load_erased(path: Path, name: str, base: str, device: str | None, dtype: str | None) -> Model:
    """An erased model folder or single file, with the card and mask beside a folder."""
    from concept_erase.diffusion.minisd import MINISD_MODELS
    from concept_erase.diffusion.models.loading import load_pipeline

    # A single-file checkpoint takes its component configs from the base (offline from_single_file).
    config = base if path.is_file() and (base in MINISD_MODELS or Path(base).is_dir()) else None
    pipe = load_pipeline(str(path), config=config, dtype=dtype, device=device)
    # Card and mask come only with a folder: a single file's neighbours may belong to another model.
    card = _read_card(path) if path.is_dir() else {}
    mask = path / MASK_FILENAME if path.is_dir() and (path / MASK_FILENAME).is_file() else None
    return Model(name, str(path), pipe, card, mask)


@dataclass
class Strength:
    """An erasure file on a copy of the base, at the strength of the latest request (1.0 when loaded).

    Setting a strength puts the base's values back into every parameter the erasure changes, then applies the
    erasure at the new strength with `apply_erasure`, so the weights are exactly what `concept-erase apply
    --strength s` writes (no drift from repeated changes)."""

    erasure: Any
    originals: dict  # full parameter name -> the base's value, for the parameters the erasure changes
    value: float = 1.0

    @classmethod
    def applied(cls, pipe, erasure, base_pipe) -> "Strength":
        """Apply `erasure` to `pipe` (a copy of `base_pipe`) at strength 1; the base's own parameters serve as
        the originals (the base model is never changed), so nothing is copied twice."""
        from concept_erase.diffusion.models.apply import apply_erasure
        from concept_erase.diffusion.models.lora import components

        base = components(base_pipe)
        changed = apply_erasure(pipe, erasure, 1.0)
        originals = {}
        for name in changed:
            component, _, param = name.partition(".")
            originals[name] = base[component].get_parameter(param)
        return cls(erasure, originals)

    def set(self, pipe, strength: float) -> None:
        """Weights = the base's + `strength` x the erasure's difference (call under the model's lock)."""
        import torch

        from concept_erase.diffusion.models.apply import apply_erasure
        from concept_erase.diffusion.models.lora import components

        if strength == self.value:
            return
        modules = components(pipe)
        with torch.no_grad():
            for name, value in self.originals.items():
                component, _, param = name.partition(".")
                modules[component].get_parameter(param).copy_(value)
        apply_erasure(pipe, self.erasure, strength)
        self.value = strength


def _load_erasure_file(path: Path, name: str, base: Model) -> Model:
    """The base plus an erasure file at strength 1, on a copy of the base's pipeline. A delta must have been
    made on this base (it holds erased values, not a difference); a LoRA / LyCORIS file goes onto any model
    of its architecture, and the card says when that is a transfer."""
    import copy

    from concept_erase.diffusion.models.apply import read_erasure

    erasure = read_erasure(path)
    erasure.check_architecture(base.pipe)
    is_base = erasure.is_base(base.pipe)
    if erasure.kind == "delta" and not is_base:
        raise ConceptEraseError(f"delta {str(path)!r} was made on another base than {base.source!r}; run "
                                "`concept-erase apply` with --base, or pass a LoRA / LyCORIS file")
    pipe = copy.deepcopy(base.pipe)
    card = {k: v for k, v in erasure.info.items() if v is not None}
    card["erasure"] = f"{erasure.kind} file {path.name}, applied at the strength the Compare tab sets"
    card["transfer"] = ("unknown (the file does not record its base)" if is_base is None else
                        "no: the base is the one it was made on" if is_base else
                        f"yes: made on {erasure.base_model or 'another model'}, applied to {base.public_source}")
    return Model(name, str(path), pipe, card, strength=Strength.applied(pipe, erasure, base.pipe))


class ModelRegistry:
    """The base model and each erased model, by name. `names` lists them base first."""

    def __init__(self, models: list[Model], *, device: str | None = None, dtype: str | None = None):
        from concept_erase.diffusion.models.defaults import model_defaults

        if not models:
            raise ConceptEraseError("the app needs at least a base model")
        # Replaced whole, never changed in place, so a reader on another thread sees one list or the next.
        self._models = {m.name: m for m in models}
        self._adding = threading.Lock()
        self.base_name = models[0].name
        self.device, self.dtype = device, dtype  # what models added later are loaded with, as at launch
        self.added: list[str] = []  # the models the Erase tab made, in order
        # the base's defaults (MiniSD: guidance 5 and the digit judge), as every command takes them
        self.defaults = model_defaults(models[0].source)

    def default_guidance(self, config) -> float:
        """The guidance the page opens with: --default-guidance, else the base model's."""
        return self.defaults.guidance if config.default_guidance is None else config.default_guidance

    @classmethod
    def load(cls, base: str, erased: list[str], *, device: str | None = None, dtype: str | None = None,
             names: list[str] | None = None, erasures: list[str] = ()) -> "ModelRegistry":
        """Load `base` (any `load_pipeline` source, e.g. "minisd"), each erased model folder/file, and the base
        plus each erasure file (`erasures`: LoRA, LyCORIS or delta, at a strength the page sets).

        An erased model is named by `names` (one per erased model) or after its folder (made unique), which
        is what the browser sees; an erasure file after its name, with "@ strength".
        """
        from concept_erase.diffusion.models.loading import load_pipeline

        if not erased and not erasures:
            raise ConceptEraseError("pass at least one --erased model or --erasure file to compare against the base")
        for flag, sources in (("erased model", erased), ("erasure", erasures)):
            for source in sources:
                if not Path(source).exists():
                    raise ConceptEraseError(f"{flag} {source!r} does not exist")
        models = [Model(BASE_NAME, base, load_pipeline(base, dtype=dtype, device=device))]
        taken = {BASE_NAME}
        for i, source in enumerate(erased):
            path = Path(source)
            wanted = names[i] if names is not None else path.stem if path.is_file() else path.name
            models.append(_load_erased(path, _unique_name(wanted, taken), base, device, dtype))
            taken.add(models[-1].name)
        for source in erasures:
            path = Path(source)
            models.append(_load_erasure_file(path, _unique_name(f"{path.stem} @ strength", taken), models[0]))
            taken.add(models[-1].name)
        return cls(models, device=device, dtype=dtype)

    @property
    def has_strength(self) -> bool:
        """Does any model carry an erasure file whose strength the page sets?"""
        return any(m.strength is not None for m in self._models.values())

    def add(self, folder: str | Path, wanted: str) -> Model:
        """Load an erased model folder the app has just written and offer it under `wanted` (made unique)."""
        with self._adding:
            model = _load_erased(Path(folder), _unique_name(wanted, set(self._models)),
                                 self._models[self.base_name].source, self.device, self.dtype)
            self._models = {**self._models, model.name: model}
            self.added.append(model.name)
        return model

    @property
    def names(self) -> list[str]:
        return list(self._models)

    @property
    def erased_names(self) -> list[str]:
        return [n for n in self._models if n != self.base_name]

    def get(self, name: str) -> Model:
        if not isinstance(name, str) or name not in self._models:
            raise ConceptEraseError(f"unknown model {name!r}; this app has {', '.join(self._models)}")
        return self._models[name]
