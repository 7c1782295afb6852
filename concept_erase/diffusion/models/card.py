"""The model card: a diffusers folder's README.md with YAML front matter that says what was erased, how, and
what the evaluations measured. `save_pipeline` writes a pipeline with its card; `read_model_card` and
`add_evaluation_to_card` read and extend it. Every write is atomic (`concept_erase.io_utils`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ...errors import ConceptEraseError, first_line
from ...io_utils import atomic_dir, atomic_file


def save_pipeline(pipe, out_dir: str | os.PathLike, *, card: dict | None = None, overwrite: bool = False) -> Path:
    """Write `pipe` as a diffusers folder (safetensors weights) with a README.md model card made from `card`:
    base_model, concept, surrogate, method, keep, steps, evaluation (a dict of figures), any extra keys, and
    the model family (`model_family`: sd1, sd2, sd2-v or sdxl), which tools reading the card rely on."""
    from .families import family_of

    card = {**(card or {}), "model_family": family_of(pipe).name}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(model_card(card), encoding="utf-8")
    return out_dir


def _plain(value: Any) -> Any:
    """Tensors, numpy scalars, paths and tuples -> YAML-safe builtins."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def model_card(card: dict) -> str:
    """A Hugging Face model card: YAML front matter (machine-readable) + a short human-readable body."""
    import yaml

    card = _plain(dict(card))
    tags = ["stable-diffusion", "text-to-image", "diffusers", "concept-erasure"]
    if card.get("method"):
        tags.append(str(card["method"]))
    front = {"base_model": card.pop("base_model", None), "library_name": "diffusers",
             "pipeline_tag": "text-to-image",
             "tags": list(dict.fromkeys(tags + [str(t) for t in card.pop("tags", [])]))}
    front.update(card)
    front = {k: v for k, v in front.items() if v is not None}
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    concept = front.get("concept")
    lines.append(f"# {front.get('base_model', 'Stable Diffusion')} without {concept!r}" if concept else "# Erased model")
    lines.append("")
    what = f"The concept {concept!r} was erased" if concept else "A concept was erased"
    how = f" with {front['method']}" if front.get("method") else ""
    saliency = " (SalUn weight saliency, arXiv 2310.12508)" if str(front.get("method", "")).startswith("salun") else ""
    lines.append(f"{what}{how}{saliency} using concept-erase.")
    for key, label in (("surrogate", "Surrogate prompt"), ("keep", "Kept (trainable) weight fraction"),
                       ("steps", "Training steps")):
        if key in front:
            lines.append(f"- {label}: {front[key]}")
    if isinstance(front.get("evaluation"), dict):
        lines += ["", "## Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in _flatten(front["evaluation"]).items()]
    lines += ["", "## Use", "", *use_snippet(front), ""]
    return "\n".join(lines)


# What a card's snippets name: the test runs them with these replaced by real paths.
THIS_FOLDER, SINGLE_FILE = "<this folder>", "<single file>.safetensors"


def use_snippet(front: dict) -> list[str]:
    """The card's "Use" section: the family's own diffusers pipeline class, from this folder and from a single
    file exported from it (`config=` this folder, so nothing is downloaded), and one image of the erased
    prompt."""
    from .families import FAMILIES, SD1

    cls = FAMILIES.get(front.get("model_family"), SD1).pipeline_class
    prompts = front.get("forget_prompts") or ["a photo"]
    return ["```python", f"from diffusers import {cls}", "",
            f'pipe = {cls}.from_pretrained("{THIS_FOLDER}")',
            "# or the single file exported with --export-single-file (config: this folder, offline)",
            f'pipe = {cls}.from_single_file("{SINGLE_FILE}", config="{THIS_FOLDER}")',
            f"image = pipe({str(prompts[0])!r}).images[0]  # the erased concept's prompt", "```"]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_model_card(path: str | os.PathLike) -> dict:
    """The YAML front matter of a model card (a README.md, or a folder holding one)."""
    import yaml

    path = Path(path)
    readme = path / "README.md" if path.is_dir() else path
    if not readme.is_file():
        raise ConceptEraseError(f"no model card at {str(readme)!r}")
    text = readme.read_text(encoding="utf-8")
    match = re.match(r"---\r?\n(.*?)\r?\n---\r?\n", text, re.DOTALL)
    if match is None:
        raise ConceptEraseError(f"model card {str(readme)!r} has no YAML front matter")
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        raise ConceptEraseError(f"model card {str(readme)!r} has broken YAML: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise ConceptEraseError(f"model card {str(readme)!r} front matter is not a mapping")
    return data


def add_evaluation_to_card(folder: str | os.PathLike, name: str, summary: dict) -> dict:
    """Record an evaluation's headline figures in an erased model's card: `evaluation.<name>` in the front
    matter (and its table in the body), README.md rewritten atomically. Returns the new front matter."""
    front = read_model_card(folder)
    evaluation = front.get("evaluation") if isinstance(front.get("evaluation"), dict) else {}
    front["evaluation"] = {**evaluation, name: _plain(summary)}
    with atomic_file(Path(folder) / "README.md", overwrite=True) as tmp:
        tmp.write_text(model_card(front), encoding="utf-8")
    return front
