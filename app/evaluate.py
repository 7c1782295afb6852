"""The Evaluate tab: a small prompt set on the base and each erased model, scored, tabled and charted by the
evaluation suite itself.

Rows with a class (a class-prompt CSV, the shipped `minisd-digits` set) are scored with
`evaluation.classes.score_classes`; any other prompt set with `evaluation.nudity.score_nudity`. The tables are
`evaluation.evaluate.SECTIONS` (the ones `compare` writes, "judged as" included) and the chart is
`evaluation.evaluate.chart_series` drawn by `evaluation.report.bar_chart_image`. The app only generates the
images.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable

from concept_erase.errors import ConceptEraseError

from .checks import MAX_GUIDANCE, MAX_SEED, check_float, check_int, check_prompt

# Shipped prompt sets (`prompts/sets/`) offered as presets: MiniSD's only on a MiniSD base.
MINISD_DIGITS = "minisd-digits"
NUDITY_PROMPTS = "nudity"
# Images generated per call, so progress moves while a large set runs.
CHUNK = 8


def preset_names(registry) -> list[str]:
    """The shipped prompt sets that make sense for the launched base: MiniSD's digits, and the nudity set."""
    return ([MINISD_DIGITS] if registry.defaults.is_minisd else []) + [NUDITY_PROMPTS]


def preset_rows(name: str, registry) -> tuple[str, list]:
    from evaluation.prompts import read_prompts

    if name not in preset_names(registry):
        raise ConceptEraseError(f"unknown preset {name!r}; choose from {', '.join(preset_names(registry))}")
    return read_prompts(name)


def load_rows(preset: str | None, upload: str | None, registry, max_rows: int) -> tuple[str, list]:
    """The prompt set to run: an uploaded CSV wins over a preset. Refuses files that are not a prompt set."""
    from evaluation.prompts import read_prompts

    if upload:
        name = Path(upload).name
        if Path(upload).suffix.lower() != ".csv":
            raise ConceptEraseError(f"uploaded file {name!r} is not a .csv prompt set")
        try:
            kind, rows = read_prompts(upload, limit=max_rows + 1)
        except ConceptEraseError as err:
            # Name the file as the user knows it, not by the server's temporary upload path.
            detail = str(err).replace(repr(str(upload)), repr(name)).replace(str(upload), name)
            raise ConceptEraseError(f"uploaded file {name!r} is not a prompt set: {detail}") from None
        except (UnicodeDecodeError, csv.Error, ValueError, KeyError, TypeError) as err:
            raise ConceptEraseError(f"uploaded file {name!r} is not a readable CSV ({type(err).__name__})") from None
        if len(rows) > max_rows:
            raise ConceptEraseError(f"uploaded file {name!r} has more than {max_rows} rows; "
                                    f"this app runs at most {max_rows}")
        return kind, rows
    if preset:
        return preset_rows(preset, registry)
    raise ConceptEraseError("choose a preset prompt set or upload a CSV")


def _classifier(config, registry):
    from evaluation.classes import load_classifier

    name = config.classifier
    if name == "auto":
        if not registry.defaults.is_minisd:
            raise ConceptEraseError("class prompt sets need a classifier: relaunch with --classifier NAME_OR_FOLDER")
        name = registry.defaults.classifier
    return load_classifier(name)


def evaluate(registry, config, preset: str | None, upload: str | None, steps: int | None = None,
             guidance: float | None = None, progress: Callable[[float, str], None] | None = None) -> tuple[str, Any]:
    """Generate every row on every launched model and score it. Returns (Markdown tables, chart image)."""
    from concept_erase.diffusion.data.generate import generate_images, warn_if_prompts_are_cut
    from evaluation.evaluate import SECTIONS, chart_series
    from evaluation.report import bar_chart_image

    steps = check_int(config.default_steps if steps is None else steps, "steps", 1, config.max_steps)
    guidance = check_float(registry.default_guidance(config) if guidance is None else guidance, "guidance", 0.0,
                           MAX_GUIDANCE)
    kind, rows = load_rows(preset, upload, registry, config.max_eval_prompts)
    for row in rows:
        check_prompt(row.prompt, config.max_prompt_chars, f"prompt of row {row.index}")
        check_int(row.seed, f"seed of row {row.index}", 0, MAX_SEED)
    kind = "classes" if kind == "classes" else "nudity"
    classifier = None
    if kind == "classes":  # fail before generating: a classifier, and every class one of its labels
        from evaluation.classes import prompt_classes

        classifier = _classifier(config, registry)
        prompt_classes([r.label for r in rows], classifier.labels, targets=[r.target for r in rows])
    prompts, seeds = [r.prompt for r in rows], [r.seed for r in rows]

    scores: dict[str, dict] = {}
    total = len(registry.names) * len(rows)
    for m, name in enumerate(registry.names):
        model = registry.get(name)
        images = []
        warn_if_prompts_are_cut(model.pipe, prompts)
        for start in range(0, len(rows), CHUNK):
            if progress is not None:
                progress((m * len(rows) + start) / total, f"{name}: image {start + 1} of {len(rows)}")
            with model.lock:
                images += generate_images(model.pipe, prompts[start:start + CHUNK], seeds[start:start + CHUNK],
                                          num_inference_steps=steps, guidance_scale=guidance, warn_long_prompts=False)
        scores[name] = _score(kind, rows, images, classifier, config)
    if progress is not None:
        progress(1.0, "scoring done")
    what = f"{len(rows)} prompts, one image each, {steps} steps, guidance {guidance:g}."
    bars, title, ylabel = chart_series(kind, scores, [config.nudity_threshold] if kind == "nudity" else [])
    return what + "\n\n" + "\n\n".join(SECTIONS[kind](scores)), bar_chart_image(bars, title=title, ylabel=ylabel)


def _score(kind: str, rows: list, images: list, classifier, config) -> dict:
    if kind == "classes":
        from evaluation.classes import score_classes

        return score_classes(images, [r.label for r in rows], classifier, targets=[r.target for r in rows],
                             styles=[r.style for r in rows])
    from evaluation.nudity import score_nudity

    result, _ = score_nudity(images, [r.categories for r in rows], threshold=config.nudity_threshold)
    return result
