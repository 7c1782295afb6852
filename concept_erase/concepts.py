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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import prompts as _prompt_sets

from .errors import ConceptEraseError

# The project's own prompt sets (docs/ARCHITECTURE.md: `prompts/` at the top level), installed as package data.
PROMPTS_DIR = Path(_prompt_sets.__file__).resolve().parent

# Modules that register presets of their own when imported (looked up only when a name is unknown, so
# `concept_erase.concepts` never imports diffusers eagerly).
PRESET_PROVIDERS: tuple[str, ...] = ("concept_erase.diffusion.minisd.presets",)


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
    neutral_surrogate: str | None = field(default=None, metadata={
        "help": "what a forget prompt steers to when its surrogate is erased in the same run and so is every "
                "surrogate after it (e.g. all ten Imagenette classes at once)"})
    parts: list["Concept"] = field(default_factory=list, metadata={
        "help": "the individual concepts of a several-concept run (see `combine_concepts`); empty for one"})
    world: str | None = field(default=None, metadata={
        "help": 'the models a preset is written for: "minisd" (MiniSD and models erased from it) or '
                '"stable-diffusion" (released checkpoints); None (a custom concept): any model'})

    def __post_init__(self):
        self.forget_prompts = _clean(self.forget_prompts, f"forget prompts of concept {self.name!r}")
        self.surrogate_prompts = _clean(self.surrogate_prompts, f"surrogate prompts of concept {self.name!r}")
        self.retain_prompts = _clean(self.retain_prompts, f"retain prompts of concept {self.name!r}")
        if len(self.surrogate_prompts) not in (1, len(self.forget_prompts)):
            raise ConceptEraseError(
                f"concept {self.name!r} has {len(self.surrogate_prompts)} surrogate prompts for "
                f"{len(self.forget_prompts)} forget prompts (give one, or one per forget prompt)"
            )

    @property
    def members(self) -> list["Concept"]:
        """The individual concepts erased: `parts`, or this concept alone."""
        return self.parts or [self]

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

# Each preset family's recipe, by the pattern of its names: the presets build theirs from here, and --help quotes
# it (`recipe_default`) without building a preset. A provider adds its own (MiniSD's "minisd-*").
RECIPES: dict[str, dict[str, Any]] = {
    "nudity": {"num_forget_images": 800, "num_retain_images": 800, "steps": 100, "lr": 1e-5, "batch_size": 8,
               "alpha": 0.1},
    "imagenette-*": {"num_forget_images": 900, "num_retain_images": 900, "steps": 560, "lr": 1e-5,
                     "batch_size": 8, "alpha": 0.5},
    "style-*": {"num_forget_images": 300, "num_retain_images": 600, "steps": 200, "lr": 1e-5, "batch_size": 8,
                "alpha": 0.5},
}


def recipe_default(f) -> str:
    """A recipe field's default in --help (`cli_args`' `default_from`): "the --concept preset's recipe (nudity:
    100; ...), else 100", from the table the presets are built from."""
    _import_providers()
    values = "; ".join(f"{pattern}: {recipe[f.name]:g}" for pattern, recipe in RECIPES.items() if f.name in recipe)
    return f"the --concept preset's recipe ({values}), else {f.default:g}"


def nudity() -> Concept:
    # docs/ALGORITHMS.md 2: 800 generated forget images, surrogate "a photo of a person wearing clothes", 800 retain
    # images, Adam lr 1e-5, batch 8, one epoch (800 / 8 = 100 steps); alpha 0.1, the retain weight of the
    # reference's nudity run (its argparse default), not the 0.5 of its class command.
    return Concept(
        name="nudity",
        world="stable-diffusion",
        forget_prompts=read_prompt_file(PROMPTS_DIR / "nudity_forget.txt"),
        surrogate_prompts=["a photo of a person wearing clothes"],
        retain_prompts=read_prompt_file(PROMPTS_DIR / "nudity_retain.txt"),
        recipe=dict(RECIPES["nudity"]),
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
        world="stable-diffusion",
        forget_prompts=[prompt(names[k])],
        surrogate_prompts=[prompt(names[(k + 1) % len(names)])],
        retain_prompts=[prompt(n) for i, n in enumerate(names) if i != k],
        recipe=dict(RECIPES["imagenette-*"]),
        neighbours=[prompt(n) for n in IMAGENETTE_NEIGHBOURS.get(names[k], [])],
        neutral_surrogate="an image",
    )


def art_styles() -> list[str]:
    return read_prompt_file(PROMPTS_DIR / "art_styles.txt")


def style(artist: str) -> Concept:
    # docs/ALGORITHMS.md 2: a style's surrogate is the same prompt without the style, so content survives.
    subjects = read_prompt_file(PROMPTS_DIR / "style_subjects.txt")
    others = [a for a in art_styles() if a != artist]
    return Concept(
        name=f"style-{slug(artist)}",
        world="stable-diffusion",
        forget_prompts=[f"a painting of {s} in the style of {artist}" for s in subjects],
        surrogate_prompts=[f"a painting of {s}" for s in subjects],
        retain_prompts=[f"a painting of {s}" for s in subjects]
        + [f"a painting of {s} in the style of {a}" for s in subjects for a in others],
        recipe=dict(RECIPES["style-*"]),
        neighbours=[f"a painting of {subjects[0]} in the style of {a}" for a in STYLE_NEIGHBOURS.get(artist, [])],
    )


_PRESETS: dict[str, Callable[[], Concept]] = {"nudity": nudity}
# Names that stand for several presets erased together.
GROUPS: dict[str, Callable[[], list[str]]] = {
    "imagenette-all": lambda: [f"imagenette-{slug(n)}" for n in imagenette_classes()],
    "style-all": lambda: [f"style-{slug(a)}" for a in art_styles()],
}


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
            concept = replace(concept, retain_prompts=list(retain_prompts), recipe=dict(concept.recipe),
                              neighbours=list(concept.neighbours))
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


def get_concepts(
    names: str | Sequence[str] | None = None,
    *,
    concepts_file: str | os.PathLike | None = None,
    forget: Sequence[str] | str | None = None,
    surrogate: Sequence[str] | str | None = None,
    retain_prompts: str | os.PathLike | Sequence[str] | None = None,
) -> Concept:
    """What one erasure run erases: `names` (one preset, several separated by commas, or a group such as
    ``imagenette-all``) and/or the preset names of `concepts_file` (one per line), combined with
    `combine_concepts`; or a custom concept from `forget` + `surrogate`. `retain_prompts` overrides the
    retain set."""
    listed = [n.strip() for n in (names.split(",") if isinstance(names, str) else names or [])]
    if "" in listed:  # "a,,b" or "a,": a dropped name would erase less than was asked, silently
        raise ConceptEraseError(f"--concept {names!r} has an empty name (a doubled, leading or trailing comma)")
    if concepts_file is not None:
        listed += read_prompt_file(concepts_file)
    if not listed:
        return get_concept(None, forget=forget, surrogate=surrogate, retain_prompts=retain_prompts)
    if forget is not None or surrogate is not None:
        raise ConceptEraseError(f"give preset concepts ({', '.join(listed)}) or --forget/--surrogate, not both")
    expanded = [m for n in listed for m in (GROUPS[n]() if n in GROUPS else [n])]
    if len(expanded) == 1:
        return get_concept(expanded[0], retain_prompts=retain_prompts)
    combined = combine_concepts([get_concept(n) for n in expanded])
    if retain_prompts is not None:
        retain = read_prompt_file(retain_prompts) if isinstance(retain_prompts, (str, os.PathLike)) else retain_prompts
        combined.retain_prompts = _clean(retain, "--retain-prompts")
    return combined


def combine_concepts(concepts: Sequence[Concept]) -> Concept:
    """Several concepts erased in one run, as one Concept whose `parts` are the originals.

    - forget prompts: all of them, each keeping its own surrogate (SalUn: a surrogate per concept). Where a
      surrogate is itself erased in this run (Imagenette k -> k + 1 with both k and k + 1 erased), it follows
      that concept's surrogate in turn until one is kept; if every surrogate along the way is erased, the
      concept's `neutral_surrogate` (or an error naming the concept).
    - retain prompts: the union of the retain sets minus every erased prompt (the joint retain); if nothing
      is left, the surrogates (as a custom concept without retain prompts).
    - neighbours (the audit's collateral prompts): the union, minus every erased prompt.
    - recipe: the first concept's, with its forget-image count times the number of concepts.
    """
    if len(concepts) == 1:
        return concepts[0]
    names = [c.name for c in concepts]
    if len(set(names)) != len(names):
        raise ConceptEraseError(f"concept {next(n for n in names if names.count(n) > 1)!r} is listed twice")
    owner: dict[str, Concept] = {}
    for c in concepts:
        for p in c.forget_prompts:
            if p in owner:
                raise ConceptEraseError(f"forget prompt {p!r} belongs to both {owner[p].name!r} and {c.name!r}")
            owner[p] = c
    forget = list(owner)
    surrogates = []
    for p in forget:
        s, seen = owner[p].surrogate_for(p), {p}
        while s in owner and s not in seen:
            seen.add(s)
            s = owner[s].surrogate_for(s)
        if s in owner:  # the chain came back: every surrogate along it is erased
            if owner[p].neutral_surrogate is None:
                raise ConceptEraseError(f"every surrogate of concept {owner[p].name!r} is erased in this run too; "
                                        "erase fewer concepts together")
            s = owner[p].neutral_surrogate
        surrogates.append(s)
    erased = set(forget)
    retain = [r for r in dict.fromkeys(r for c in concepts for r in c.retain_prompts) if r not in erased]
    recipe = dict(concepts[0].recipe)
    if "num_forget_images" in recipe:
        recipe["num_forget_images"] *= len(concepts)
    worlds = {c.world for c in concepts}
    if len(worlds) > 1:
        raise ConceptEraseError(f"concepts {', '.join(names)} are written for different models "
                                f"({', '.join(sorted(str(w) for w in worlds))}); erase them in separate runs")
    return Concept(name="+".join(names), forget_prompts=forget, surrogate_prompts=surrogates, world=worlds.pop(),
                   retain_prompts=retain or list(dict.fromkeys(surrogates)), recipe=recipe,
                   neighbours=[n for n in dict.fromkeys(n for c in concepts for n in c.neighbours) if n not in erased],
                   parts=list(concepts))


# ----------------------------------------------------------------------------------------------- the CLI


@dataclass
class ConceptsConfig:
    """`concept-erase concepts [NAME]`: what the presets erase, into what, and with which recipe."""

    name: str | None = field(default=None, metadata={
        "help": "a preset or group to show in full (every prompt); without it, one line per preset",
        "positional": True})


def register(subparsers) -> None:
    from .cli_args import add_flags

    p = subparsers.add_parser(
        "concepts", help="list the concept presets with their surrogates and recipes",
        description="The presets `mask` and `erase` take as --concept: forget prompts, what each is steered to "
                    "(the surrogate), how many retain prompts keep the rest, and the recipe (flags override it).")
    add_flags(p, ConceptsConfig)
    p.set_defaults(func=_concepts_main)


def describe_recipe(recipe: dict[str, Any]) -> str:
    """"50 steps, lr 0.0001, batch 16, alpha 0.5, 48 forget / 216 retain images" (what the recipe sets)."""
    parts = [f"{recipe['steps']} steps" if "steps" in recipe else "",
             f"lr {recipe['lr']:g}" if "lr" in recipe else "",
             f"batch {recipe['batch_size']}" if "batch_size" in recipe else "",
             f"alpha {recipe['alpha']:g}" if "alpha" in recipe else "",
             (f"{recipe.get('num_forget_images', '?')} forget / {recipe.get('num_retain_images', '?')} retain images"
              if "num_forget_images" in recipe or "num_retain_images" in recipe else "")]
    return ", ".join(p for p in parts if p) or "the command's defaults"


def _shorten(prompts: Sequence[str], width: int = 48) -> str:
    """The first prompt and how many more, cut in the middle where too long: the end of a prompt (the
    artist of "... in the style of Claude Monet") is what tells presets apart."""
    more = f" (+{len(prompts) - 1} more)" if len(prompts) > 1 else ""
    text, room = prompts[0], width - len(more)
    if len(text) > room:
        head = (room - 3) // 3
        text = text[:head] + "..." + text[len(text) - (room - 3 - head):]
    return text + more


def _concepts_main(args) -> int:
    from .cli_args import values_from
    from .logs import finish

    config = ConceptsConfig(**values_from(args, ConceptsConfig))
    if config.name is not None:
        if config.name in GROUPS:
            members = GROUPS[config.name]()
            finish(args, f"{config.name}: erases together {', '.join(members)}", {config.name: members})
            return 0
        c = get_concept(config.name)
        lines = [f"{c.name}\n  recipe: {describe_recipe(c.recipe)}"]
        for label, prompts in (("forget", c.forget_prompts), ("surrogate", c.surrogate_prompts),
                               ("retain", c.retain_prompts), ("neighbours (collateral checks)", c.neighbours)):
            if prompts:
                lines.append(f"  {label} ({len(prompts)}):\n" + "\n".join(f"    {p}" for p in prompts))
        finish(args, lines, {"name": c.name, "recipe": c.recipe, "forget": c.forget_prompts,
                             "surrogate": c.surrogate_prompts, "retain": c.retain_prompts, "neighbours": c.neighbours},
               next_command=f"concept-erase erase --model MODEL --concept {c.name} --output ERASED")
        return 0
    rows = [("preset", "forget", "surrogate", "retain", "recipe")]
    for name in list_concepts():
        c = get_concept(name)
        rows.append((name, _shorten(c.forget_prompts), _shorten(c.surrogate_prompts), str(len(c.retain_prompts)),
                     describe_recipe(c.recipe)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[4] for r in rows]
    lines.append(f"\ngroups: {', '.join(f'{g} ({len(f())} presets)' for g, f in GROUPS.items())}")
    lines.append("`erase --concept NAME` uses a preset; flags override its recipe.")
    finish(args, lines, {"presets": {name: get_concept(name).recipe for name in list_concepts()},
                         "groups": {g: f() for g, f in GROUPS.items()}},
           next_command="concept-erase concepts NAME  (every prompt of one preset)")
    return 0
