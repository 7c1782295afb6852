"""What to forget, what to steer it to, what to keep: a `Concept` and its presets (docs/ALGORITHMS.md 2).

A concept names its forget prompts (the images SalUn unlearns), its surrogate prompt(s) (the SalUn target:
eps_theta(z_t, c_surrogate) replaces eps_theta(z_t, c_forget)), and its retain prompts (the ordinary
denoising loss that keeps everything else). Presets:

- ``nudity``: forget "a photo of a nude person" (and variants), surrogate "a photo of a person wearing
  clothes", retain clothed people (the reference recipe: 800 forget images, 1 epoch).
- ``imagenette-<class>`` (ten): forget "an image of a {class}", surrogate class (k + 1) mod 10, retain
  the other nine classes (the reference recipe: 5 epochs over ~900 images).
- ``style-<artist>``: forget "a painting of {subject} in the style of {artist}", surrogate the same prompt
  without the style, retain the same subjects in the other styles and without a style.

Custom concepts come from ``get_concept(forget=..., surrogate=..., retain_prompts=FILE)``; other layers add
presets with ``register_concept`` (MiniSD adds ``minisd-*``). Prompt files live in the repository's
``prompts/`` folder: one prompt per line, ``#`` starts a comment.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import prompts as _prompt_sets

from .errors import ConceptEraseError

# The project's own prompt sets (docs/ARCHITECTURE.md: `prompts/` at the top level), installed as package data.
PROMPTS_DIR = Path(_prompt_sets.__file__).resolve().parent

# Modules that register presets of their own when imported (looked up only when a name is unknown, so
# `concept_erase.concepts` never imports diffusers eagerly).
PRESET_PROVIDERS: tuple[str, ...] = ("concept_erase.diffusion.minisd",)


@dataclass
class Concept:
    """A concept to erase. `surrogate_prompts` has one entry (shared) or one per forget prompt."""

    name: str = field(metadata={"help": "short name used in model cards and summaries"})
    forget_prompts: list[str] = field(metadata={"help": "prompts whose images are unlearned"})
    surrogate_prompts: list[str] = field(metadata={"help": "SalUn targets: one, or one per forget prompt"})
    retain_prompts: list[str] = field(metadata={"help": "prompts whose images keep the ordinary denoising loss"})
    recipe: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "EraseConfig defaults for this concept (the reference settings); the user's flags win"},
    )
    neighbours: list[str] = field(
        default_factory=list,
        metadata={"help": "prompts of nearby concepts an erasure must not damage (the audit's collateral check)"},
    )

    def __post_init__(self):
        self.forget_prompts = _clean(self.forget_prompts, f"forget prompts of concept {self.name!r}")
        self.surrogate_prompts = _clean(self.surrogate_prompts, f"surrogate prompts of concept {self.name!r}")
        self.retain_prompts = _clean(self.retain_prompts, f"retain prompts of concept {self.name!r}")
        if len(self.surrogate_prompts) not in (1, len(self.forget_prompts)):
            raise ConceptEraseError(
                f"concept {self.name!r} has {len(self.surrogate_prompts)} surrogate prompts for "
                f"{len(self.forget_prompts)} forget prompts (give one, or one per forget prompt)"
            )

    def surrogate_for(self, forget_prompt: str) -> str:
        """The surrogate prompt paired with `forget_prompt`."""
        if len(self.surrogate_prompts) == 1:
            return self.surrogate_prompts[0]
        if forget_prompt not in self.forget_prompts:  # e.g. a user's image folder with its own prompts
            raise ConceptEraseError(
                f"forget prompt {forget_prompt!r} is not one of concept {self.name!r}'s, so it has no surrogate "
                "(this concept pairs one surrogate with each of its own forget prompts)")
        return self.surrogate_prompts[self.forget_prompts.index(forget_prompt)]

    def to_card(self) -> dict[str, Any]:
        """The fields a model card records."""
        return {
            "concept": self.name,
            "forget_prompts": list(self.forget_prompts),
            "surrogate_prompts": list(self.surrogate_prompts),
            "num_retain_prompts": len(self.retain_prompts),
        }


def _clean(prompts: Sequence[str] | str, what: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    out = [p.strip() for p in prompts if p is not None and p.strip()]
    if not out:
        raise ConceptEraseError(f"{what} are empty")
    return out


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file: one per line, blank lines and `#` comments skipped; empty -> error."""
    path = Path(path)
    if not path.is_file():
        raise ConceptEraseError(f"prompt file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ConceptEraseError(f"prompt file {str(path)!r} is not UTF-8 text") from err
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConceptEraseError(f"prompt file {str(path)!r} has no prompts")
    return prompts


def read_prompt_list(source: str | os.PathLike) -> list[str]:
    """The distinct prompts of a shipped set by name (`--prompts minisd-digits`), of a CSV's `prompt`
    column, or of a text file (`read_prompt_file`), in file order."""
    import csv

    path = Path(source)
    if not path.exists() and _prompt_sets.prompt_set_path(str(source)) is not None:
        path = _prompt_sets.prompt_set_path(str(source))
    if path.suffix.lower() != ".csv":
        if not path.exists() and "/" not in str(source) and not path.suffix:
            raise ConceptEraseError(f"prompts {str(source)!r} is neither a file nor a shipped set "
                                    f"({', '.join(_prompt_sets.prompt_set_names())})")
        return read_prompt_file(path)
    if not path.is_file():
        raise ConceptEraseError(f"prompt file {str(path)!r} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "prompt" not in (reader.fieldnames or []):
            raise ConceptEraseError(f"prompt file {str(path)!r} has no 'prompt' column")
        prompts = [(row["prompt"] or "").strip() for row in reader]
    prompts = list(dict.fromkeys(p for p in prompts if p))
    if not prompts:
        raise ConceptEraseError(f"prompt file {str(path)!r} has no prompts")
    return prompts


def slug(text: str) -> str:
    """'English springer' -> 'english-springer' (preset names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ----------------------------------------------------------------------------------------------- presets

def nudity() -> Concept:
    # docs/ALGORITHMS.md 2: 800 generated forget images, surrogate "a photo of a person wearing clothes", 800 retain
    # images, Adam lr 1e-5, batch 8, alpha 0.5, one epoch (800 / 8 = 100 steps).
    return Concept(
        name="nudity",
        forget_prompts=read_prompt_file(PROMPTS_DIR / "nudity_forget.txt"),
        surrogate_prompts=["a photo of a person wearing clothes"],
        retain_prompts=read_prompt_file(PROMPTS_DIR / "nudity_retain.txt"),
        recipe={"num_forget_images": 800, "num_retain_images": 800, "steps": 100, "lr": 1e-5,
                "batch_size": 8, "alpha": 0.5},
        neighbours=list(NUDITY_NEIGHBOURS),
    )


# Nearby concepts per preset, which an erasure should leave alone (the audit draws them before and after).
NUDITY_NEIGHBOURS = ["a photo of a person in a swimsuit", "a photo of a shirtless man on a beach",
                     "a portrait photo of a woman"]
IMAGENETTE_NEIGHBOURS = {
    "tench": ["goldfish", "barracouta"], "English springer": ["cocker spaniel", "Welsh springer spaniel"],
    "cassette player": ["tape player", "radio"], "chain saw": ["hedge trimmer", "lawn mower"],
    "church": ["cathedral", "chapel"], "French horn": ["trumpet", "trombone"],
    "garbage truck": ["fire engine", "trailer truck"], "gas pump": ["parking meter", "vending machine"],
    "golf ball": ["tennis ball", "ping-pong ball"], "parachute": ["paraglider", "hot air balloon"],
}
STYLE_NEIGHBOURS = {
    "Van Gogh": ["Paul Gauguin", "Claude Monet"], "Pablo Picasso": ["Georges Braque", "Henri Matisse"],
    "Claude Monet": ["Pierre-Auguste Renoir", "Camille Pissarro"], "Salvador Dali": ["Rene Magritte", "Max Ernst"],
    "Andy Warhol": ["Roy Lichtenstein", "Keith Haring"], "Rembrandt": ["Johannes Vermeer", "Caravaggio"],
    "Kelly McKernan": ["Alphonse Mucha", "Loish"], "Thomas Kinkade": ["Bob Ross", "Norman Rockwell"],
}


def imagenette_classes() -> list[str]:
    return read_prompt_file(PROMPTS_DIR / "imagenette_classes.txt")


def imagenette(k: int) -> Concept:
    # docs/ALGORITHMS.md 2: class k -> class (k + 1) mod 10; the reference trains 5 epochs over ~900 forget images
    # (about 560 steps at batch 8). Retain: the other nine classes.
    names = imagenette_classes()
    prompt = "an image of a {}".format
    return Concept(
        name=f"imagenette-{slug(names[k])}",
        forget_prompts=[prompt(names[k])],
        surrogate_prompts=[prompt(names[(k + 1) % len(names)])],
        retain_prompts=[prompt(n) for i, n in enumerate(names) if i != k],
        recipe={"num_forget_images": 900, "num_retain_images": 900, "steps": 560, "lr": 1e-5,
                "batch_size": 8, "alpha": 0.5},
        neighbours=[prompt(n) for n in IMAGENETTE_NEIGHBOURS.get(names[k], [])],
    )


def art_styles() -> list[str]:
    return read_prompt_file(PROMPTS_DIR / "art_styles.txt")


def style(artist: str) -> Concept:
    # docs/ALGORITHMS.md 2: a style's surrogate is the same prompt without the style, so content survives.
    subjects = read_prompt_file(PROMPTS_DIR / "style_subjects.txt")
    others = [a for a in art_styles() if a != artist]
    return Concept(
        name=f"style-{slug(artist)}",
        forget_prompts=[f"a painting of {s} in the style of {artist}" for s in subjects],
        surrogate_prompts=[f"a painting of {s}" for s in subjects],
        retain_prompts=[f"a painting of {s}" for s in subjects]
        + [f"a painting of {s} in the style of {a}" for s in subjects for a in others],
        recipe={"num_forget_images": 300, "num_retain_images": 600, "steps": 200, "lr": 1e-5,
                "batch_size": 8, "alpha": 0.5},
        neighbours=[f"a painting of {subjects[0]} in the style of {a}" for a in STYLE_NEIGHBOURS.get(artist, [])],
    )


_PRESETS: dict[str, Callable[[], Concept]] = {"nudity": nudity}


def _register_builtin() -> None:
    for k, name in enumerate(imagenette_classes()):
        _PRESETS[f"imagenette-{slug(name)}"] = lambda k=k: imagenette(k)
    for artist in art_styles():
        _PRESETS[f"style-{slug(artist)}"] = lambda artist=artist: style(artist)


_register_builtin()


def register_concept(name: str, factory: Callable[[], Concept], *, overwrite: bool = False) -> None:
    """Add a preset: `factory()` returns the Concept (called on each `get_concept(name)`)."""
    if name in _PRESETS and not overwrite:
        raise ConceptEraseError(f"concept preset {name!r} is already registered")
    _PRESETS[name] = factory


def list_concepts() -> list[str]:
    """Names of every preset (imports the preset providers first)."""
    _import_providers()
    return sorted(_PRESETS)


def _import_providers() -> None:
    for module in PRESET_PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:  # a provider that is not there yet is simply not a source
            if err.name is None or not module.startswith(err.name):
                raise


def get_concept(
    name: str | None = None,
    *,
    forget: Sequence[str] | str | None = None,
    surrogate: Sequence[str] | str | None = None,
    retain_prompts: str | os.PathLike | Sequence[str] | None = None,
) -> Concept:
    """A preset by `name`, or a custom concept from `forget` + `surrogate` (+ retain prompts).

    `retain_prompts` is a prompt file path or a list of prompts; it overrides a preset's retain prompts.
    A custom concept without retain prompts keeps its surrogate prompts (the nudity recipe's choice).
    """
    if isinstance(retain_prompts, (str, os.PathLike)):
        retain_prompts = read_prompt_file(retain_prompts)
    if name is not None:
        if forget is not None or surrogate is not None:
            raise ConceptEraseError(f"give a preset concept ({name!r}) or --forget/--surrogate, not both")
        if name not in _PRESETS:
            _import_providers()
        if name not in _PRESETS:
            raise ConceptEraseError(f"unknown concept {name!r} (presets: {', '.join(sorted(_PRESETS))})")
        concept = _PRESETS[name]()
        if retain_prompts is not None:
            concept = Concept(concept.name, concept.forget_prompts, concept.surrogate_prompts,
                              list(retain_prompts), dict(concept.recipe), list(concept.neighbours))
        return concept
    if forget is None or surrogate is None:
        raise ConceptEraseError("a custom concept needs both --forget and --surrogate (or name a preset)")
    forget_list = _clean(forget, "--forget prompts")
    surrogate_list = _clean(surrogate, "--surrogate prompts")
    return Concept(
        name=f"custom: {forget_list[0]}",
        forget_prompts=forget_list,
        surrogate_prompts=surrogate_list,
        retain_prompts=list(retain_prompts) if retain_prompts is not None else surrogate_list,
    )
