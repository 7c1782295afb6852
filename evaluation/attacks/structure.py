"""What a saved attack fits, without torch: the attacked model's structure (its family, each text encoder's input
embeddings [vocabulary, width] and the UNet's conditioning width), from a loaded pipeline (`structure_of`) or
from a model folder's configs (`model_structure`, before any weight loads), and the names of a saved attack's
files. `replay.py` checks a saved attack against it before `import torch` (seconds, docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json

from concept_erase.diffusion.models.facts import configs_folder
from concept_erase.diffusion.models.families import family_from_config, family_of
from concept_erase.errors import ConceptEraseError

# The placeholder word standing for one learned token. Any word the tokenizer makes ONE token works; "*" is
# one in CLIP's vocabulary and in the byte-level tokenizers of MiniSD and the tiny test pipelines.
PLACEHOLDER = "*"
LEARNED_FILE = "learned.safetensors"
ATTACK_FILE = "attack.json"


def prefixed(prompt: str, k: int) -> str:
    """`prompt` with k placeholder words in front: what the text encoder reads for a token-prefix attack."""
    return " ".join([PLACEHOLDER] * k + [prompt]) if k else prompt


def structure_of(pipe) -> dict:
    """What a saved attack's tensors fit: the family, each text encoder's input embeddings [vocabulary, width]
    and the UNet's conditioning width. Recorded in attack.json; a replay checks it against the attacked model
    (`model_structure` reads the same from its configs, before it loads)."""
    family = family_of(pipe)
    encoders = {name: list(enc.get_input_embeddings().weight.shape) for name, enc in family.text_modules(pipe).items()}
    return {"family": family.name, "encoders": encoders, "conditioning": _width(pipe.unet.config.cross_attention_dim)}


def _width(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)  # a per-block list repeats one width


def model_structure(model: str, config: str | None = None) -> dict | None:
    """`structure_of` the model `model` read from its config files (model_index.json, each text encoder's and
    the UNet's config.json), no weights loaded; None when they are not at hand (a hub id, a single file without
    --config): the replay is then checked once the model loads."""
    folder = configs_folder(model, config)
    if folder is None:
        return None
    try:
        family = family_from_config(folder)
        encoders = {}
        for name in family.text_encoders:
            cfg = json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
            encoders[name] = [int(cfg["vocab_size"]), int(cfg["hidden_size"])]
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        return {"family": family.name, "encoders": encoders, "conditioning": _width(unet["cross_attention_dim"])}
    except (ConceptEraseError, OSError, ValueError, KeyError, TypeError):
        return None


def describe_structure(structure: dict) -> str:
    """'sd1 (text_encoder 32 wide, conditioning 32)': how a refusal names a model's structure."""
    widths = ", ".join(f"{name} {shape[1]} wide" for name, shape in structure["encoders"].items())
    return f"{structure['family']} ({widths}, conditioning {structure['conditioning']})"
