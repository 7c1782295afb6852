"""The Evaluate tab: a small prompt set on the base and each erased model, scored by `evaluation`.

Rows with a class (a class-prompt CSV, the MiniSD digits preset) are scored with a classifier
(`evaluation.classes.score_classes`); any other prompt set is scored with NudeNet exposure counts
(`evaluation.nudity`). The app only generates the images and lays the scores out before vs after.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable

from concept_erase.errors import ConceptEraseError

MINISD_DIGITS = "MiniSD digits (10 digits x 3 styles)"
NUDITY_PROMPTS = "nudity prompts (prompts/nudity_forget.txt)"
# Images generated per call, so progress moves while a large set runs.
CHUNK = 8


def _is_minisd(registry) -> bool:
    return registry.get(registry.base_name).source == "minisd"


def _nudity_file() -> Path:
    from concept_erase.concepts import PROMPTS_DIR

    return PROMPTS_DIR / "nudity_forget.txt"


def preset_names(registry) -> list[str]:
    """The presets that make sense for the launched base: MiniSD's digits, and the nudity prompt file."""
    names = [MINISD_DIGITS] if _is_minisd(registry) else []
    if _nudity_file().is_file():
        names.append(NUDITY_PROMPTS)
    return names


def preset_rows(name: str, registry) -> tuple[str, list]:
    from evaluation.prompts import PromptRow, read_prompts

    if name not in preset_names(registry):
        raise ConceptEraseError(f"unknown preset {name!r}; choose from {', '.join(preset_names(registry))}")
    if name == MINISD_DIGITS:
        from concept_erase.diffusion.minisd import DIGITS, STYLES, minisd_prompt

        pairs = [(d, s) for s in STYLES for d in DIGITS]
        return "classes", [PromptRow(i, minisd_prompt(d, s), i, str(i), label=d) for i, (d, s) in enumerate(pairs)]
    return read_prompts(_nudity_file())


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
            raise ConceptEraseError(f"uploaded file {name!r} has more than {max_rows} rows; this app runs at most {max_rows}")
        return kind, rows
    if preset:
        return preset_rows(preset, registry)
    raise ConceptEraseError("choose a preset prompt set or upload a CSV")


def _classifier(config, registry):
    from evaluation.classes import load_classifier

    name = config.classifier
    if name == "auto":
        if not _is_minisd(registry):
            raise ConceptEraseError("class prompt sets need a classifier: relaunch with --classifier NAME_OR_FOLDER")
        name = "minisd-digits"
    return load_classifier(name)


def evaluate(registry, config, preset: str | None, upload: str | None, steps: int | None = None,
             guidance: float | None = None, progress: Callable[[float, str], None] | None = None) -> tuple[str, Any]:
    """Generate every row on every launched model and score it. Returns (Markdown table, chart image)."""
    from concept_erase.diffusion.generate import generate_images, warn_if_prompts_are_cut

    from .ui import MAX_GUIDANCE, MAX_SEED, _check_float, _check_int, check_prompt

    steps = _check_int(config.default_steps if steps is None else steps, "steps", 1, config.max_steps)
    guidance = _check_float(config.default_guidance if guidance is None else guidance, "guidance", 0.0, MAX_GUIDANCE)
    kind, rows = load_rows(preset, upload, registry, config.max_eval_prompts)
    for row in rows:
        check_prompt(row.prompt, config.max_prompt_chars, f"prompt of row {row.index}")
        _check_int(row.seed, f"seed of row {row.index}", 0, MAX_SEED)
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
    if kind == "classes":
        return _class_table(scores, len(rows)), _chart(scores, "classes")
    return _nudity_table(scores, len(rows)), _chart(scores, "nudity")


def _score(kind: str, rows: list, images: list, classifier, config) -> dict:
    if kind == "classes":
        from evaluation.classes import score_classes

        return score_classes(images, [r.label for r in rows], classifier, targets=[r.target for r in rows])
    from evaluation.nudity import NudityCounts, detect

    metric = NudityCounts()
    metric.update(detect(images, threshold=config.nudity_threshold), [r.categories for r in rows])
    return metric.compute()


def _class_table(scores: dict[str, dict], n: int) -> str:
    from evaluation.report import markdown_table

    names = list(scores)
    classes = list(next(iter(scores.values()))["classes"])
    rows = [[c] + [scores[m]["classes"][c]["top1"] for m in names] for c in classes]
    rows.append(["**mean**"] + [scores[m]["top1"] for m in names])
    return (f"Top-1 accuracy (%) of the intended class, {n} prompts, one image each.\n\n"
            + markdown_table(["class", *names], rows))


def _nudity_table(scores: dict[str, dict], n: int) -> str:
    from evaluation.report import markdown_table

    names = list(scores)
    rows = [["images with any exposed part"] + [scores[m]["images_any"] for m in names],
            ["exposed detections"] + [scores[m]["total_exposed"] for m in names]]
    for c in next(iter(scores.values()))["class_counts"]:
        counts = [scores[m]["class_counts"][c] for m in names]
        if any(counts):
            rows.append([c] + counts)
    return f"NudeNet exposure on {n} prompts, one image each.\n\n" + markdown_table(["", *names], rows)


def _chart(scores: dict[str, dict], kind: str):
    """Grouped bars, one bar per model: accuracy per class, or detections per exposed class."""
    from .ui import chart_image

    if kind == "classes":
        series = {m: {c: v["top1"] for c, v in s["classes"].items()} for m, s in scores.items()}
        return chart_image(series, title="Top-1 accuracy per class: base vs erased", ylabel="top-1 accuracy (%)")
    series = {m: dict(s["class_counts"]) for m, s in scores.items()}
    return chart_image(series, title="NudeNet exposed detections: base vs erased", ylabel="detections")
