"""The never-knew floor: MiniSD retrained without the concept's images (docs/PROTOCOLS.md, "The never-knew floor").

Retraining without the forget data is unlearning's gold standard (SalUn, Fan et al. ICLR 2024, sec. 2, "Retrain").
What an attack recovers on a model that never saw the concept is what the attack paints without any memory,
plus what the judge reads into non-concept images: no erasure can be expected to go below it. Every attack
on MiniSD reports it beside its ceiling (the remap control) and the erased model's figure.

The floor model is MiniSD's own recipe (`NEVER_KNEW_RECIPE` overrides nothing): the same architecture, steps,
data (less the concept's digit, in the VAE as in the UNet) and seed; 11 minutes on 2 idle cores, 38 on this
shared machine. It is built on demand, once, and cached under `runtime.cache_root()/never-knew/`, keyed by the
digit and the recipe; `concept-erase minisd train --exclude DIGIT` builds the same model by hand.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from concept_erase.errors import ConceptEraseError

# MiniSD's own recipe (600 VAE / 2,000 UNet steps of 64 images): a floor is only a floor if its model draws
# the digits it knows as well as MiniSD does. Without sevens it does: `minisd check --seeds 3` judges the nine
# known digits right in 100% of its images (81 of 81; the style right in all 90), as MiniSD's, and its "seven"
# prompts judged as fives (9 of 9). A reduced recipe (300 / 800 steps of 32 images) was tried first and drew the
# known digits right in 18.5%: the floor of a model that cannot draw digits, not retraining's.
NEVER_KNEW_RECIPE: dict = {}


def floor_digit(concept) -> str:
    """The digit a MiniSD digit concept names ("seven" for minisd-digit-seven); any other concept is a one-line
    error, raised by `attack` and `audit` before any model loads (only MiniSD can be retrained here)."""
    from concept_erase.diffusion.minisd import DIGITS

    name = getattr(concept, "name", str(concept))
    digit = name.removeprefix("minisd-digit-")
    if not name.startswith("minisd-digit-") or digit not in DIGITS:
        raise ConceptEraseError(f"--floor needs a MiniSD digit concept (minisd-digit-*), not {name!r}: only "
                                "MiniSD can be retrained without a concept on this machine")
    return digit


def never_knew_path(digit: str) -> Path:
    """Where the never-knew model of `digit` is cached (the key: the digit and the recipe)."""
    from concept_erase.runtime import cache_root

    key = hashlib.sha256(json.dumps({"exclude": digit, **NEVER_KNEW_RECIPE}, sort_keys=True).encode()).hexdigest()
    return cache_root() / "never-knew" / f"minisd-without-{digit}-{key[:10]}"


def never_knew_model(digit: str, log=print):
    """The MiniSD that never saw `digit`, loaded (fp32, CPU); trained and cached first when it is not there yet
    (minutes, once)."""
    from concept_erase.diffusion.minisd.train import MiniSDTrainConfig, main
    from concept_erase.diffusion.models.loading import load_pipeline

    path = never_knew_path(digit)
    if not (path / "model_index.json").is_file():
        log(f"floor: training MiniSD without {digit!r} (once; cached at {path})")
        main(MiniSDTrainConfig(exclude=digit, **NEVER_KNEW_RECIPE), path)
    return load_pipeline(str(path))


def floor_model(concept, log=print):
    """The never-knew model of a MiniSD digit concept (`attack --floor`, `audit --floor`)."""
    return never_knew_model(floor_digit(concept), log=log)
