"""The erasure methods, one module each, and their registry (docs/ALGORITHMS.md 2).

The registry is this explicit table: importing a method module registers nothing. Each entry is a method's
spec (`options.py`: its flags, the fields it reads, its defaults and help; no torch, so `erase` refuses a bad
flag before torch loads) and where the class that runs it lives, "module:Class" in this package, imported only
by `get_method`. A run resolves its method once, in the run config (`spec`, `build_method()`), and passes the
object on; see `base.py` for what a method owns. The run config (`training/config.py`) is composed of the
options dataclasses (`options.OPTIONS`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ...errors import ConceptEraseError
from .options import (ADVERSARIAL_VARIANTS, ANTSpec, CASpec, EraseDiffSpec, ESDUSpec, ESDXSpec, FMNSpec,
                      MACESpec, MethodSpec, RECESpec, RemapSpec, RLSpec, SAFREESpec, SalUnAdvSpec, SalUnSpec,
                      ScissorHandsSpec, UCESpec)

if TYPE_CHECKING:
    from .base import Method

# name -> (its spec, the "module:Class" that runs it, a subclass of that spec)
REGISTRY: dict[str, tuple[type[MethodSpec], str]] = {spec.name: (spec, where) for spec, where in (
    (SalUnSpec, "salun:SalUn"), (RLSpec, "salun:RL"), (ESDXSpec, "esd:ESDX"), (ESDUSpec, "esd:ESDU"),
    (CASpec, "ca:ConceptAblation"), (UCESpec, "uce:UCE"), (SalUnAdvSpec, "salun_adv:SalUnAdv"),
    (RECESpec, "rece:RECE"), (SAFREESpec, "safree:SAFREE"), (FMNSpec, "fmn:FMN"),
    (ScissorHandsSpec, "scissorhands:ScissorHands"), (EraseDiffSpec, "erasediff:EraseDiff"),
    (ANTSpec, "ant:ANT"), (RemapSpec, "remap:Remap"), (MACESpec, "mace:MACE"))}
METHODS: dict[str, type[MethodSpec]] = {name: spec for name, (spec, _) in REGISTRY.items()}
# Every field some method reads; the rest of a run config (model, output, concept, ...) belongs to the run.
ALL_METHOD_FIELDS = frozenset().union(*(spec.fields for spec in METHODS.values()))
# The names --method takes; an adversarial variant is chosen with --adversarial instead.
METHOD_CHOICES = tuple(name for name in METHODS if name not in ADVERSARIAL_VARIANTS.values())


def method_spec(name: str) -> type[MethodSpec]:
    """What method `name` is before it runs (no torch)."""
    if name not in METHODS:
        raise ConceptEraseError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name]


def get_method(name: str) -> type[Method]:
    """The class that runs method `name` (importing it imports torch)."""
    method_spec(name)
    module, _, cls = REGISTRY[name][1].partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
