"""Replaying saved attacks (`attack --replay DIR`): the folder is checked whole before any model loads, and
a replay runs on another model only where it fits.

What a saved attack must be (`check_saved_attack`, without torch: the tensors are read as numpy arrays; anything
else is one line naming the folder and the fault):
- attack.json: a JSON object with the attack's name (one of the registry's), its budget (the attack's
  settings, within their bounds), its rows (prompt, seed), the text of each row, the history, the attacked
  model's structure (`structure.structure_of`) and the shape of every tensor;
- learned.safetensors: readable, the tensors attack.json lists with those shapes, every float finite, each
  tensor of the width the structure says, one per row where it is per row.

Where it may run (`replay_info`, before the model loads where its configs are at hand; `fit_replay`): on a model of the same structure (family, text encoders, conditioning width)
as learned; on another structure only as a text prompt, which is what transfers (the discrete UnlearnDiffAtk's
decoded prompts, typed into the other model). A learned embedding, token vector or conditioning means nothing
to another structure's encoder or UNet, so that replay is refused. The report says where a replay came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from concept_erase.diffusion.models.families import FAMILIES
from concept_erase.errors import ConceptEraseError, first_line
from concept_erase.validate import parse_seed

from ..prompts import PromptRow
from .structure import ATTACK_FILE, LEARNED_FILE, PLACEHOLDER, describe_structure, prefixed

if TYPE_CHECKING:
    import numpy as np

    from .core import Learned

# The keys of attack.json a replay needs, and their JSON types.
REQUIRED = {"attack": str, "budget": dict, "rows": list, "texts": list, "structure": dict, "tensors": dict}
# What each attack's learned.safetensors holds (the discrete UnlearnDiffAtk: ids; soft: vectors).
TENSORS = {"inversion": ("prefix.",), "unlearndiffatk": ("prefix_ids", "prefix."), "ringabell": ("offset.",),
           "embedding": ("conditioning.",), "textfree": ("latents",)}


class _Fault(Exception):
    """A fault of the saved attack; `check_saved_attack` names the folder in front of it."""


@dataclass(frozen=True)
class SavedAttack:
    """A saved attack checked whole, read without torch (its tensors as numpy arrays, through safetensors'
    numpy reader), so that `attack --replay` refuses a bad folder before `import torch`; `learned()` is the
    `Learned` a run replays."""

    meta: dict                          # attack.json, checked; rows as PromptRows
    arrays: dict[str, "np.ndarray"]    # learned.safetensors

    attack = property(lambda self: self.meta["attack"])
    structure = property(lambda self: self.meta["structure"])
    decoded = property(lambda self: self.meta.get("decoded"))
    rows = property(lambda self: self.meta["rows"])
    model = property(lambda self: self.meta.get("model") if isinstance(self.meta.get("model"), str) else None)

    def learned(self) -> "Learned":
        """The attack as a run replays it: its tensors in torch (imported here)."""
        import torch

        from concept_erase.diffusion.models.family import Conditioning

        from .core import Learned

        meta, tensors = self.meta, {k: torch.from_numpy(v.copy()) for k, v in self.arrays.items()}
        part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        conditioning = None
        if "conditioning.hidden" in tensors:
            conditioning = Conditioning(tensors["conditioning.hidden"], part("conditioning.added."))
        seconds = meta.get("seconds", 0.0)
        return Learned(meta["attack"], meta["budget"], meta["rows"], meta["texts"], part("prefix."),
                       tensors.get("prefix_ids"), part("offset."), conditioning, meta.get("decoded"),
                       meta.get("history", []), seconds if _finite(seconds) else 0.0, meta["structure"], self.model,
                       tensors.get("latents"))


def check_saved_attack(folder: str | Path) -> SavedAttack:
    """The attack saved in `folder`, checked whole without any model and without torch (the module docstring)."""
    folder = Path(folder)
    if not (folder / ATTACK_FILE).is_file() or not (folder / LEARNED_FILE).is_file():
        raise ConceptEraseError(f"{str(folder)!r} holds no saved attack ({ATTACK_FILE} + {LEARNED_FILE})")
    try:
        meta = _read_meta(folder / ATTACK_FILE)
        return SavedAttack(meta, _read_tensors(folder / LEARNED_FILE, meta))
    except _Fault as fault:
        raise ConceptEraseError(f"--replay {str(folder)!r}: {fault}") from None


def read_saved_attack(folder: str | Path) -> "Learned":
    """The attack saved in `folder`, checked whole (`check_saved_attack`), as a run replays it."""
    return check_saved_attack(folder).learned()


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


def _read_tensors(path: Path, meta: dict) -> dict[str, "np.ndarray"]:
    """The tensors, readable and finite, exactly those attack.json lists with its shapes, of the widths the
    recorded structure gives, one per row where per row."""
    import numpy as np
    from safetensors import safe_open

    try:  # the header is checked against the file's length first: a truncated file fails here
        with safe_open(str(path), framework="numpy") as f:
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors' own error type for truncated or foreign bytes, a dtype numpy lacks
        raise _Fault(f"{LEARNED_FILE} is not readable ({first_line(err)})") from None
    recorded = meta["tensors"]
    if set(arrays) != set(recorded):
        raise _Fault(f"{LEARNED_FILE} holds {sorted(arrays)}, but {ATTACK_FILE} lists {sorted(recorded)}")
    for name, array in arrays.items():
        if list(array.shape) != recorded[name]:
            raise _Fault(f"{LEARNED_FILE}'s {name} is {list(array.shape)}, but {ATTACK_FILE} records {recorded[name]}")
        if array.dtype.kind == "f" and not bool(np.isfinite(array).all()):
            raise _Fault(f"{LEARNED_FILE}'s {name} is not finite")
    attack = meta["attack"]
    if not any(name.startswith(TENSORS[attack]) for name in arrays):
        raise _Fault(f"{LEARNED_FILE} holds none of what a {attack} attack learns ({', '.join(TENSORS[attack])}...)")
    _check_widths(arrays, meta)
    return arrays


def _check_widths(arrays: dict[str, "np.ndarray"], meta: dict) -> None:
    structure, rows = meta["structure"], len(meta["rows"])
    k = None
    for name, array in arrays.items():
        kind, _, part = name.partition(".")
        if name == "prefix_ids":
            vocab = next(iter(structure["encoders"].values()))[0]
            if array.dtype.kind not in "iu" or array.ndim != 2 or array.shape[0] != rows:
                raise _Fault(f"{LEARNED_FILE}'s prefix_ids is not one row of token ids per prompt ({rows})")
            if array.size and not (0 <= int(array.min()) and int(array.max()) < vocab):
                raise _Fault(f"{LEARNED_FILE}'s prefix_ids are not ids of the {vocab}-token vocabulary")
            k = array.shape[1]
        elif kind == "prefix":
            width = structure["encoders"].get(part, [0, None])[1]
            if array.ndim != 3 or array.shape[0] not in (1, rows) or array.shape[2] != width:
                raise _Fault(f"{LEARNED_FILE}'s {name} {list(array.shape)} is not (1 or {rows} rows, tokens, "
                             f"{width}) for {describe_structure(structure)}")
            k = array.shape[1]
        elif name == "latents" and (array.ndim != 4 or array.shape[0] != rows):
            raise _Fault(f"{LEARNED_FILE}'s latents {list(array.shape)} are not one initial noise per row ({rows})")
        elif name in ("offset.hidden", "conditioning.hidden"):
            lead = (rows,) if kind == "conditioning" else ()
            if array.ndim != len(lead) + 2 or tuple(array.shape[:len(lead)]) != lead \
                    or array.shape[-1] != structure["conditioning"]:
                raise _Fault(f"{LEARNED_FILE}'s {name} {list(array.shape)} is not ({'rows, ' if lead else ''}"
                             f"tokens, {structure['conditioning']}) for {describe_structure(structure)}")
    texts = [prefixed(r.prompt, k or 0) for r in meta["rows"]]
    if meta["texts"] != texts:
        raise _Fault(f"{ATTACK_FILE}'s texts are not each row's prompt after the {k or 0} learned token(s)")


def check_replay_folder(folder: str | Path) -> dict[str, SavedAttack]:
    """The attacks saved in an attack output folder (one sub-folder per attack) or in one attack's folder, each
    checked whole without torch; they must share their rows (one image per row and seed)."""
    folder = Path(folder)
    if (folder / ATTACK_FILE).is_file():
        saved = check_saved_attack(folder)
        return {saved.attack: saved}
    found = [check_saved_attack(p) for p in sorted(folder.iterdir()) if (p / ATTACK_FILE).is_file()] \
        if folder.is_dir() else []
    if not found:
        raise ConceptEraseError(f"--replay {str(folder)!r} holds no saved attack (an attack output folder)")
    named = {}
    for saved in found:
        if saved.attack in named:
            raise ConceptEraseError(f"--replay {str(folder)!r} holds two saved {saved.attack} attacks")
        if [(r.prompt, r.seed) for r in saved.rows] != [(r.prompt, r.seed) for r in found[0].rows]:
            raise ConceptEraseError(f"--replay {str(folder)!r}: its {saved.attack} and {found[0].attack} attacks "
                                    "attacked different rows")
        named[saved.attack] = saved
    return named


def load_replay(folder: str | Path) -> dict[str, "Learned"]:
    """`check_replay_folder`'s attacks as a run replays them."""
    return {name: saved.learned() for name, saved in check_replay_folder(folder).items()}


def replay_info(saved, structure: dict, model: str) -> dict:
    """What the report says of replaying `saved` (a `SavedAttack` or `Learned`) on `model` of `structure`; a
    one-line refusal where it cannot replay there (a learned tensor on another structure). No torch."""
    info = {"from_model": saved.model, "from": describe_structure(saved.structure), "as": "learned tensors"}
    if saved.structure == structure:
        return info
    if saved.decoded is None:
        raise ConceptEraseError(
            f"cannot replay the {saved.attack} attack learned on {describe_structure(saved.structure)} on "
            f"{model}, which is {describe_structure(structure)}: what it learned fits that structure only; across "
            "structures only a text prompt transfers (unlearndiffatk --unlearndiffatk-variant discrete)")
    return {**info, "as": f"its text prompts (crossed to {describe_structure(structure)})"}


def fit_replay(learned: "Learned", structure: dict, model: str) -> tuple["Learned", dict]:
    """`learned` as it replays on `model` of `structure`, and what the report says of it (`replay_info`): as
    learned when the structures match; as its text prompts when they differ and it is a text prompt."""
    info = replay_info(learned, structure, model)
    return (learned if learned.structure == structure else learned.as_text()), info
