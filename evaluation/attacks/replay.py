"""Replaying saved attacks (`attack --replay DIR`): the folder is checked whole before any model loads, and
a replay runs on another model only where it fits.

What a saved attack must be (`read_saved_attack`; anything else is one line naming the folder and the fault):
- attack.json: a JSON object with the attack's name (one of the registry's), its budget (the attack's
  settings, within their bounds), its rows (prompt, seed), the text of each row, the history, the attacked
  model's structure (`core.structure_of`) and the shape of every tensor;
- learned.safetensors: readable, the tensors attack.json lists with those shapes, every float finite, each
  tensor of the width the structure says, one per row where it is per row.

Where it may run (`fit_replay`): on a model of the same structure (family, text encoders, conditioning width)
as learned; on another structure only as a text prompt, which is what transfers (the discrete UnlearnDiffAtk's
decoded prompts, typed into the other model). A learned embedding, token vector or conditioning means nothing
to another structure's encoder or UNet, so that replay is refused. The report says where a replay came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import torch

from concept_erase.diffusion.models.family import Conditioning

from concept_erase.diffusion.models.families import FAMILIES
from concept_erase.errors import ConceptEraseError, first_line
from concept_erase.validate import parse_seed

from ..prompts import PromptRow
from .core import ATTACK_FILE, LEARNED_FILE, PLACEHOLDER, Learned, describe_structure, prefixed

# The keys of attack.json a replay needs, and their JSON types.
REQUIRED = {"attack": str, "budget": dict, "rows": list, "texts": list, "structure": dict, "tensors": dict}
# What each attack's learned.safetensors holds (the discrete UnlearnDiffAtk: ids; soft: vectors).
TENSORS = {"inversion": ("prefix.",), "unlearndiffatk": ("prefix_ids", "prefix."), "ringabell": ("offset.",),
           "embedding": ("conditioning.",), "textfree": ("latents",)}


class _Fault(Exception):
    """A fault of the saved attack; `read_saved_attack` names the folder in front of it."""


def read_saved_attack(folder: str | Path) -> Learned:
    """The attack saved in `folder`, checked whole without any model (see the module docstring)."""
    folder = Path(folder)
    if not (folder / ATTACK_FILE).is_file() or not (folder / LEARNED_FILE).is_file():
        raise ConceptEraseError(f"{str(folder)!r} holds no saved attack ({ATTACK_FILE} + {LEARNED_FILE})")
    try:
        meta = _read_meta(folder / ATTACK_FILE)
        tensors = _read_tensors(folder / LEARNED_FILE, meta)
        return _learned(meta, tensors)
    except _Fault as fault:
        raise ConceptEraseError(f"--replay {str(folder)!r}: {fault}") from None


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _Fault(f"{ATTACK_FILE} is not readable JSON ({first_line(err)})") from None
    if not isinstance(meta, dict):
        raise _Fault(f"{ATTACK_FILE} is not a JSON object")
    for key, kind in REQUIRED.items():
        if key not in meta:  # older versions wrote no structure or shapes: such a folder cannot be checked
            raise _Fault(f"{ATTACK_FILE} has no {key!r} (a folder from an older version: run the attack again)")
        if not isinstance(meta[key], kind):
            raise _Fault(f"{ATTACK_FILE}'s {key!r} is not a JSON {'object' if kind is dict else kind.__name__}")
    if meta["attack"] not in TENSORS:
        raise _Fault(f"unknown attack {meta['attack']!r} in {ATTACK_FILE} (replayable: {', '.join(TENSORS)})")
    if meta.get("placeholder", PLACEHOLDER) != PLACEHOLDER:
        raise _Fault(f"{ATTACK_FILE}'s placeholder {meta['placeholder']!r} is not {PLACEHOLDER!r}")
    _check_budget(meta["attack"], meta["budget"])
    _check_structure(meta["structure"])
    meta["rows"] = [_row(r) for r in meta["rows"]]
    texts, decoded = meta["texts"], meta.get("decoded")
    for name, values in (("texts", texts), ("decoded", decoded)):
        if values is not None and (len(values) != len(meta["rows"]) or not all(isinstance(t, str) for t in values)):
            raise _Fault(f"{ATTACK_FILE}'s {name!r} is not one string per row ({len(meta['rows'])} rows)")
    history = meta.get("history", [])
    if not isinstance(history, list) or not all(_finite(h) for h in history):
        raise _Fault(f"{ATTACK_FILE}'s history is not a list of finite numbers")
    return meta


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_budget(attack: str, budget: dict) -> None:
    """The saved budget within the bounds a run's would be (extra notes such as Ring-A-Bell's `vector_from`
    are kept as they are)."""
    from .budgets import BUDGETS, make_budget

    settings = {f.name for f in fields(BUDGETS[attack])}
    try:
        make_budget(attack, **{k: v for k, v in budget.items() if k in settings})
    except (ConceptEraseError, TypeError) as err:
        raise _Fault(f"{ATTACK_FILE}'s budget: {first_line(err)}") from None


def _check_structure(structure: dict) -> None:
    encoders = structure.get("encoders")
    shapes_ok = isinstance(encoders, dict) and encoders and all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(n, int) and n > 0 for n in s) for s in encoders.values())
    if structure.get("family") not in FAMILIES or not shapes_ok or not isinstance(structure.get("conditioning"), int):
        raise _Fault(f"{ATTACK_FILE}'s structure {structure!r} is not a model structure (family, encoders, "
                     "conditioning width)")


def _row(row) -> PromptRow:
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("index"), int):
        raise _Fault(f"{ATTACK_FILE} has a row that is not a prompt with its index and seed: {str(row)[:80]!r}")
    known = {f.name for f in fields(PromptRow)}
    if set(row) - known:
        raise _Fault(f"{ATTACK_FILE} has a row with unknown keys {sorted(set(row) - known)}")
    try:
        seed = parse_seed(row.get("seed"), f"{ATTACK_FILE} row {row['index']}'s seed")
    except ConceptEraseError as err:
        raise _Fault(str(err)) from None
    return PromptRow(**{**row, "seed": seed, "categories": tuple(row.get("categories") or ())})


def _read_tensors(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The tensors, readable and finite, exactly those attack.json lists with its shapes, of the widths the
    recorded structure gives, one per row where per row."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors' own error type for truncated or foreign bytes, or OSError
        raise _Fault(f"{LEARNED_FILE} is not readable ({first_line(err)})") from None
    recorded = meta["tensors"]
    if set(tensors) != set(recorded):
        raise _Fault(f"{LEARNED_FILE} holds {sorted(tensors)}, but {ATTACK_FILE} lists {sorted(recorded)}")
    for name, tensor in tensors.items():
        if list(tensor.shape) != recorded[name]:
            raise _Fault(f"{LEARNED_FILE}'s {name} is {list(tensor.shape)}, but {ATTACK_FILE} records {recorded[name]}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _Fault(f"{LEARNED_FILE}'s {name} is not finite")
    attack = meta["attack"]
    if not any(name.startswith(TENSORS[attack]) for name in tensors):
        raise _Fault(f"{LEARNED_FILE} holds none of what a {attack} attack learns ({', '.join(TENSORS[attack])}...)")
    _check_widths(tensors, meta)
    return tensors


def _check_widths(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    structure, rows = meta["structure"], len(meta["rows"])
    k = None
    for name, tensor in tensors.items():
        kind, _, part = name.partition(".")
        if name == "prefix_ids":
            vocab = next(iter(structure["encoders"].values()))[0]
            if tensor.is_floating_point() or tensor.ndim != 2 or tensor.shape[0] != rows:
                raise _Fault(f"{LEARNED_FILE}'s prefix_ids is not one row of token ids per prompt ({rows})")
            if tensor.numel() and not (0 <= int(tensor.min()) and int(tensor.max()) < vocab):
                raise _Fault(f"{LEARNED_FILE}'s prefix_ids are not ids of the {vocab}-token vocabulary")
            k = tensor.shape[1]
        elif kind == "prefix":
            width = structure["encoders"].get(part, [0, None])[1]
            if tensor.ndim != 3 or tensor.shape[0] not in (1, rows) or tensor.shape[2] != width:
                raise _Fault(f"{LEARNED_FILE}'s {name} {list(tensor.shape)} is not (1 or {rows} rows, tokens, "
                             f"{width}) for {describe_structure(structure)}")
            k = tensor.shape[1]
        elif name == "latents" and (tensor.ndim != 4 or tensor.shape[0] != rows):
            raise _Fault(f"{LEARNED_FILE}'s latents {list(tensor.shape)} are not one initial noise per row ({rows})")
        elif name in ("offset.hidden", "conditioning.hidden"):
            lead = (rows,) if kind == "conditioning" else ()
            if tensor.ndim != len(lead) + 2 or tuple(tensor.shape[:len(lead)]) != lead \
                    or tensor.shape[-1] != structure["conditioning"]:
                raise _Fault(f"{LEARNED_FILE}'s {name} {list(tensor.shape)} is not ({'rows, ' if lead else ''}"
                             f"tokens, {structure['conditioning']}) for {describe_structure(structure)}")
    texts = [prefixed(r.prompt, k or 0) for r in meta["rows"]]
    if meta["texts"] != texts:
        raise _Fault(f"{ATTACK_FILE}'s texts are not each row's prompt after the {k or 0} learned token(s)")


def _learned(meta: dict, tensors: dict[str, torch.Tensor]) -> Learned:
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    conditioning = None
    if "conditioning.hidden" in tensors:
        conditioning = Conditioning(tensors["conditioning.hidden"], part("conditioning.added."))
    seconds = meta.get("seconds", 0.0)
    return Learned(meta["attack"], meta["budget"], meta["rows"], meta["texts"], part("prefix."),
                   tensors.get("prefix_ids"), part("offset."), conditioning, meta.get("decoded"),
                   meta.get("history", []), seconds if _finite(seconds) else 0.0, meta["structure"],
                   meta.get("model") if isinstance(meta.get("model"), str) else None, tensors.get("latents"))


def load_replay(folder: str | Path) -> dict[str, Learned]:
    """The attacks saved in an attack output folder (one sub-folder per attack) or in one attack's folder, each
    checked whole; they must share their rows (one image per row and seed)."""
    folder = Path(folder)
    if (folder / ATTACK_FILE).is_file():
        learned = read_saved_attack(folder)
        return {learned.attack: learned}
    found = [read_saved_attack(p) for p in sorted(folder.iterdir()) if (p / ATTACK_FILE).is_file()] \
        if folder.is_dir() else []
    if not found:
        raise ConceptEraseError(f"--replay {str(folder)!r} holds no saved attack (an attack output folder)")
    named = {}
    for learned in found:
        if learned.attack in named:
            raise ConceptEraseError(f"--replay {str(folder)!r} holds two saved {learned.attack} attacks")
        if [(r.prompt, r.seed) for r in learned.rows] != [(r.prompt, r.seed) for r in found[0].rows]:
            raise ConceptEraseError(f"--replay {str(folder)!r}: its {learned.attack} and {found[0].attack} attacks "
                                    "attacked different rows")
        named[learned.attack] = learned
    return named


def fit_replay(learned: Learned, structure: dict, model: str) -> tuple[Learned, dict]:
    """`learned` as it replays on `model` of `structure`, and what the report says of it: as learned when the
    structures match; as its text prompts when they differ and it is a text prompt; else a one-line refusal."""
    info = {"from_model": learned.model, "from": describe_structure(learned.structure), "as": "learned tensors"}
    if learned.structure == structure:
        return learned, info
    if learned.decoded is None:
        raise ConceptEraseError(
            f"cannot replay the {learned.attack} attack learned on {describe_structure(learned.structure)} on "
            f"{model}, which is {describe_structure(structure)}: what it learned fits that structure only; across "
            "structures only a text prompt transfers (unlearndiffatk --unlearndiffatk-variant discrete)")
    return learned.as_text(), {**info, "as": f"its text prompts (crossed to {describe_structure(structure)})"}
