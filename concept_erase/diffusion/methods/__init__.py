"""The erasure methods, one module each, and their registry (docs/ALGORITHMS.md 2).

The registry is this explicit table: importing a method module registers nothing. A run resolves its
method once, in the run config (`method_class`, `build_method()`), and passes the object on; see `base.py`
for what a method owns. Each method's own flags are the fields of its options dataclass, in its module; the
run config (`training/config.py`) is composed of them.
"""

from __future__ import annotations

from ...errors import ConceptEraseError
from .ant import ANT, ANTOptions
from .base import Method
from .ca import CAOptions, ConceptAblation
from .erasediff import EraseDiff, EraseDiffOptions
from .fmn import FMN, FMNOptions
from .mace import MACE, MACEOptions
from .scissorhands import ScissorHands
from .esd import ESDU, ESDX, ESDOptions
from .salun import RL, SalUn
from .salun_adv import ADVERSARIAL_VARIANTS, AdversarialOptions, SalUnAdv
from .rece import RECE, RECEOptions
from .remap import Remap
from .safree import SAFREE, SAFREEOptions
from .uce import UCE, UCEOptions

METHODS: dict[str, type[Method]] = {m.name: m for m in (SalUn, RL, ESDX, ESDU, ConceptAblation, UCE, SalUnAdv, RECE,
                                                        SAFREE, FMN, ScissorHands, EraseDiff, ANT, Remap, MACE)}
# The options dataclasses of every method: the run config inherits their fields (and so their flags).
OPTIONS = (ESDOptions, CAOptions, UCEOptions, AdversarialOptions, RECEOptions, SAFREEOptions, FMNOptions,
           EraseDiffOptions, ANTOptions, MACEOptions)
# Every field some method reads; the rest of a run config (model, output, concept, ...) belongs to the run.
ALL_METHOD_FIELDS = frozenset().union(*(m.fields for m in METHODS.values()))
# The names --method takes; an adversarial variant is chosen with --adversarial instead.
METHOD_CHOICES = tuple(name for name in METHODS if name not in ADVERSARIAL_VARIANTS.values())


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConceptEraseError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name]
