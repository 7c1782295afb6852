"""The evaluation jobs behind `concept-erase evaluate` and `compare`, callable from Python (the app uses them).

An evaluation folder is a generation folder (see `generation`) plus what scoring wrote into it:
`results.json` (the numbers and run info), `report.md`, `chart.png`, `grid.png`, and for nudity
`detections.jsonl` (per image, the adapter's record). `compare` reads two such folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Sequence

from concept_erase.errors import ConceptEraseError
from concept_erase.io_utils import atomic_file

from . import report
from .generation import Protocol, generate_set, read_manifest, read_run_info
from .prompts import PromptRow, read_prompts
from .thresholds import REPORT_THRESHOLD

GRID_PER_ROW = 4  # images per model in each grid row (the seeds of one prompt class, category or prompt)
GRID_MAX_ROWS = 12
FIGURES = "## Figures\n\n![chart](chart.png)\n\n![first images](grid.png)"


def generate_for_evaluation(model: str, prompts: str, out_dir: str | Path, protocol: Protocol, *,
                            limit: int | None = None, batch_size: int = 8, config: str | None = None,
                            family: str | None = None,
                            dtype: str | None = None, device: str | None = None, progress: bool = True,
                            pipe=None, rows: list[PromptRow] | None = None) -> list[dict]:
    """Read the prompt set (unless its `rows` are given), load the model (unless `pipe` is given) and
    generate what `out_dir` lacks. Runs in every process of an `accelerate launch`; returns the manifest
    entries of these rows."""
    from concept_erase.diffusion.models.loading import load_pipeline

    from concept_erase.runtime import process_state

    state = process_state()
    if rows is None:
        _, rows = read_prompts(prompts, limit=limit)
    if pipe is None:
        pipe = load_pipeline(model, config=config, dtype=dtype, device=device or state.device, family=family)
    # absolute paths in run.json: a report must not depend on the directory it was made from
    absolute = lambda s: str(Path(s).resolve()) if Path(s).exists() else str(s)  # noqa: E731
    return generate_set(pipe, rows, out_dir, protocol, batch_size=batch_size, model_source=absolute(model),
                        prompt_source=absolute(prompts), progress=progress, state=state)


class LazyImages(Sequence):
    """Image files read when indexed (int or slice), so scoring 4,703 I2P images at 512 px streams them
    batch by batch instead of holding gigabytes of pixels."""

    def __init__(self, files: list[Path]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        with Image.open(self.files[i]) as im:
            return im.convert("RGB") if im.mode not in ("RGB", "L") else im.copy()


def load_generated(out_dir: str | Path, entries: list[dict] | None = None) -> tuple[dict, list[dict], LazyImages]:
    """(run info, manifest entries, images read on demand) of a generation folder. `entries`: only these
    (what this run asked for, e.g. with --limit), else every finished image in the folder."""
    out_dir = Path(out_dir)
    info = read_run_info(out_dir)
    if entries is None:
        entries = read_manifest(out_dir)
    else:  # the report describes the rows scored, not those of the run that created the folder
        info = {**info, "rows": len({e["index"] for e in entries})}
    if not entries:
        raise ConceptEraseError(f"{str(out_dir)!r} holds no finished images")
    return info, entries, LazyImages([out_dir / "images" / e["file"] for e in entries])


def grid_groups(entries: list[dict], kind: str, forget: str | None = None) -> list[tuple[str, bool, list[dict]]]:
    """Entries grouped into grid rows, the erased concept first: (label, marked, entries). Classes: one row per
    prompt class, its images taken in turn from each style (so a row shows every style), the forgotten class
    marked; nudity: one row per I2P category set, "sexual" marked; quality: one row per prompt. At most
    GRID_MAX_ROWS rows of GRID_PER_ROW entries."""
    groups: dict[str, list[dict]] = {}
    for e in entries:
        if kind == "classes":
            key = str(e.get("label"))
        elif kind == "nudity":
            key = ", ".join(e.get("categories") or ()) or "no category"
        else:
            key = e["prompt"]
        groups.setdefault(key, []).append(e)

    def erased(first: dict) -> bool:
        if kind == "classes":
            label = str(first.get("label"))
            return forget is not None and (forget == label or forget.startswith(f"{label} ("))
        return kind == "nudity" and "sexual" in (first.get("categories") or ())

    rows = [(key + (": erased" if erased(es[0]) else ""), erased(es[0]), _by_style_in_turn(es)[:GRID_PER_ROW])
            for key, es in groups.items()]
    rows.sort(key=lambda row: not row[1])  # stable: the erased concept first, the rest in prompt-set order
    return rows[:GRID_MAX_ROWS]


def _by_style_in_turn(entries: list[dict]) -> list[dict]:
    """The entries reordered to take one of each style in turn (plain, bold, negative, plain, ...)."""
    styles: dict = {}
    for e in entries:
        styles.setdefault(e.get("style"), []).append(e)
    queues = list(styles.values())
    return [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]


def _chart(path: Path, kind: str, results: dict[str, dict], thresholds: Sequence[float] = ()) -> Path:
    bars, title, ylabel = chart_series(kind, results, thresholds)
    return report.bar_chart(path, bars, title=title, ylabel=ylabel)


def _write_grid(path: Path, models: Sequence[str], groups, load) -> Path:
    """`report.labelled_grid` of `grid_groups` rows; `load(model position, entry)` gives each image."""
    rows = [report.GridRow(label, {m: [load(i, e) for e in es] for i, m in enumerate(models)}, marked)
            for label, marked, es in groups]
    return report.labelled_grid(path, models, rows)


def _own_grid(out_dir: Path, name: str, kind: str, entries: list[dict], images, forget=None, change=None) -> Path:
    """The grid of one evaluation folder (`images` aligned with `entries`; `change(i, image)` e.g. blurs)."""
    position = {(e["index"], e["sample"]): i for i, e in enumerate(entries)}

    def load(_, e):
        i = position[(e["index"], e["sample"])]
        return images[i] if change is None else change(i, images[i])

    return _write_grid(out_dir / "grid.png", [name], grid_groups(entries, kind, forget), load)


def chart_series(kind: str, results: dict[str, dict], thresholds: Sequence[float] = ()) -> tuple[dict, str, str]:
    """(bars, title, y label) of the before/after chart: exposed parts per NudeNet class, top-1 per class,
    or FID and CLIP score; one series per result (name -> result). Shared by compare and the app."""
    if kind == "nudity":
        pretty = lambda c: c.replace("_EXPOSED", "").replace("_", " ").lower()  # noqa: E731
        bars = {n: {pretty(c): v for c, v in r["class_counts"].items()} for n, r in results.items()}
        at = (f"{thresholds[0]}" if len(set(thresholds)) == 1
              else ", ".join(f"{n} {t}" for n, t in zip(results, thresholds)))
        return bars, "NudeNet exposed parts" + (f" (score >= {at})" if thresholds else ""), "detections"
    if kind == "classes":
        bars = {n: {k: v["top1"] for k, v in r["classes"].items()} for n, r in results.items()}
        return bars, "Top-1 accuracy of the intended class", "top-1 (%)"
    return {n: _quality_bars(r) for n, r in results.items()}, "Image quality", "value"


# ------------------------------------------------------------------------------------------------ nudity


def evaluate_nudity(out_dir: str | Path, *, threshold: float = REPORT_THRESHOLD, nudenet_model: str | None = None,
                    batch_size: int = 16, detector=None, entries: list[dict] | None = None) -> dict:
    """NudeNet over a generation folder: counts, per-category breakdown, report, chart, blurred grid."""
    from .nudity import blur_exposed, score_nudity
    from .thresholds import BLUR_THRESHOLD, NUDENET_FLOOR

    out_dir = Path(out_dir)
    info, entries, images = load_generated(out_dir, entries)
    result, found = score_nudity(images, [e.get("categories") or () for e in entries], threshold=threshold,
                                 batch_size=batch_size, detector=detector, model_path=nudenet_model)
    with atomic_file(out_dir / "detections.jsonl", overwrite=True) as tmp:
        tmp.write_text("".join(json.dumps({"index": e["index"], "sample": e["sample"], **d.to_dict()}) + "\n"
                               for e, d in zip(entries, found)), encoding="utf-8")
    scoring = {"detector": "NudeNet v3 " + (nudenet_model or "320n (in the wheel)"), "threshold": threshold,
               "NudeNet's own floor": NUDENET_FLOOR}
    results = {"kind": "nudity", "run": info, "scoring": scoring, "result": result}
    _chart(out_dir / "chart.png", "nudity", {info.get("model", "model"): result}, [threshold])
    blurred = f"blurred >= {min(threshold, BLUR_THRESHOLD)}"  # found holds detections down to there
    _own_grid(out_dir, blurred, "nudity", entries, images, change=lambda i, im: blur_exposed(im, found[i]))
    report.write_report(out_dir, "Nudity evaluation", [report.protocol_block(info), _scoring_block(scoring),
                                                        *nudity_sections({"model": result}), FIGURES], results)
    return results


def _scoring_block(scoring: dict, title: str = "Scoring") -> str:
    return f"## {title}\n\n" + report.markdown_table(["setting", "value"], list(scoring.items()))


def nudity_sections(results: dict[str, dict]) -> list[str]:
    """Tables for one or more nudity results (name -> NudityCounts result), side by side."""
    from .nudity import EXPOSED_CLASSES

    names = list(results)
    rows = [(c, *(r["class_counts"][c] for r in results.values())) for c in EXPOSED_CLASSES]
    rows.append(("total (9 exposed classes)", *(r["total_exposed"] for r in results.values())))
    rows.append(("total (strict 6)", *(r["total_strict"] for r in results.values())))
    summary = [
        ("images", *(r["images"] for r in results.values())),
        ("images with any exposed part", *(r["images_any"] for r in results.values())),
        ("share with any exposed part (%)", *(r["share_any"] for r in results.values())),
        ("share with any strict part (%)", *(r["share_strict"] for r in results.values())),
    ]
    categories = list(dict.fromkeys(c for r in results.values() for c in r["categories"]))
    by_cat = [(c, *(fmt_share(r["categories"].get(c)) for r in results.values())) for c in categories]
    sections = [
        "## Exposed parts per NudeNet class\n\n" + report.markdown_table(["class", *names], rows),
        "## Images\n\n" + report.markdown_table(["", *names], summary),
    ]
    if by_cat:
        sections.append("## By I2P category (share of images with any exposed part, % of n)\n\n"
                        + report.markdown_table(["category", *names], by_cat))
    return sections


def fmt_share(summary: dict | None) -> str:
    if not summary:
        return "n/a"
    return f"{summary['share_any']:.2f} (n={summary['images']})"


# ----------------------------------------------------------------------------------------------- classes


def evaluate_classes(out_dir: str | Path, *, classifier="microsoft/resnet-50", forget: str | None = None,
                     batch_size: int = 32, device: str = "cpu", entries: list[dict] | None = None) -> dict:
    """Top-1/top-5 of the intended class per prompt class; UA for `forget`. `classifier`: a name for
    `classes.load_classifier` or a classifier object (with `.labels` and `.topk(images, k)`)."""
    from .classes import load_classifier, score_classes

    out_dir = Path(out_dir)
    info, entries, images = load_generated(out_dir, entries)
    labels = [e.get("label") for e in entries]
    if any(label is None for label in labels):
        raise ConceptEraseError(f"{str(out_dir)!r} was generated from prompts without a 'class' column")
    name = classifier if isinstance(classifier, str) else type(classifier).__name__
    model = load_classifier(classifier, device) if isinstance(classifier, str) else classifier
    result = score_classes(images, labels, model, targets=[e.get("target") for e in entries], forget=forget,
                           batch_size=batch_size, styles=[e.get("style") for e in entries])
    scoring = {"classifier": name, "forgotten class": forget or "none"}
    results = {"kind": "classes", "run": info, "scoring": scoring, "result": result}
    _chart(out_dir / "chart.png", "classes", {info.get("model", "model"): result})
    _own_grid(out_dir, "images", "classes", entries, images, forget=result.get("forget"))
    report.write_report(out_dir, "Class evaluation", [report.protocol_block(info), _scoring_block(scoring),
                                                       *classes_sections({"model": result}), FIGURES], results)
    return results


def classes_sections(results: dict[str, dict]) -> list[str]:
    """Accuracy per prompt class (top-5 only where the classifier gives 5 guesses), the summary, and what
    each (style, class) was judged as, for one or more class results (name -> ClassAccuracy result)."""
    names = list(results)
    classes = list(dict.fromkeys(c for r in results.values() for c in r["classes"]))
    metrics = [("top-1 %", "top1")] + ([("top-5 %", "top5")] if any(r["top5"] is not None for r in results.values())
                                       else [])
    rows = [(c, *(r["classes"].get(c, {}).get(k) for r in results.values() for _, k in metrics)) for c in classes]
    headers = ["class", *[f"{n} {m}" for n in names for m, _ in metrics]]
    overall = [(f"mean {m[:-2]}(%)", *(r[k] for r in results.values())) for m, k in metrics]
    if any("UA" in r for r in results.values()):
        overall += [("forgotten classes", *(r.get("forget") for r in results.values())),
                    ("UA = 100 - top-1 of forgotten (%; mean over them)", *(r.get("UA") for r in results.values())),
                    ("retain top-1, classes not erased (%)", *(r.get("retain_top1") for r in results.values()))]
        several = list(dict.fromkeys(c for r in results.values() if len(r.get("UA_per_class", {})) > 1
                                     for c in r["UA_per_class"]))
        overall += [(f"UA of {c} (%)", *(r.get("UA_per_class", {}).get(c) for r in results.values())) for c in several]
    sections = ["## Accuracy per prompt class\n\n" + report.markdown_table(headers, rows),
                "## Summary\n\n" + report.markdown_table(["", *names], overall)]
    judged = judged_as_table(results)
    if judged:
        sections.append("## Judged as (the classifier's top-1 answer, share of the images of each prompt "
                        "class)\n\n" + judged)
    return sections


def judged_as_table(results: dict[str, dict], top: int = 3) -> str:
    """Markdown: one row per (style, prompt class), one column per result, each cell its `top` most frequent
    judged labels with their share, e.g. "five 60% · three 30% · other 10%". Empty when none has any."""
    keyed = {n: {(j["style"], j["class"]): j for j in r.get("judged_as", [])} for n, r in results.items()}
    keys = list(dict.fromkeys(k for per in keyed.values() for k in per))
    if not keys:
        return ""

    def cell(j: dict | None) -> str:
        if j is None:
            return "n/a"
        shares = [(label, 100.0 * n / j["images"]) for label, n in j["judged"].items()]
        parts = [f"{label} {share:.0f}%" for label, share in shares[:top]]
        rest = sum(share for _, share in shares[top:])
        return " · ".join(parts + ([f"other {rest:.0f}%"] if rest else []))

    with_style = any(style is not None for style, _ in keys)
    headers = (["style"] if with_style else []) + ["prompt class", *results]
    rows = [([style or ""] if with_style else []) + [name, *(cell(per.get((style, name))) for per in keyed.values())]
            for style, name in keys]
    return report.markdown_table(headers, rows)


def card_summary(results: dict) -> dict:
    """The headline figures of an evaluation, with what they were measured on, for a model card."""
    run, scoring, r = results["run"], results["scoring"], results["result"]
    summary = {"prompts": Path(str(run.get("prompts"))).name, "protocol": run["protocol"]["preset"]}
    if results["kind"] == "nudity":
        summary.update(images=r["images"], threshold=scoring["threshold"], exposed_parts=r["total_exposed"],
                       images_with_exposed_parts_pct=round(r["share_any"], 2))
    elif results["kind"] == "classes":
        summary.update(classifier=scoring["classifier"], top1_pct=round(r["top1"], 2))
        if "UA" in r:
            summary.update(forgotten_class=r["forget"], UA_pct=round(r["UA"], 2),
                           retain_top1_pct=round(r["retain_top1"], 2))
    else:
        summary.update(images=r["images"], fid=r["fid"], fid_reference=scoring["FID reference"],
                       clip_score=r["clip_score"])
    return summary


# ----------------------------------------------------------------------------------------------- quality


def reference_images(path: str | Path, keys: set[tuple[int, int]] | None = None) -> LazyImages:
    """FID reference images: those of an evaluation folder with the (row, sample) `keys` that are scored
    (all its images when `keys` is None), or every .png/.jpg of a plain folder (name order)."""
    path = Path(path)
    if not path.is_dir():
        raise ConceptEraseError(f"reference {str(path)!r} is not a folder")
    if (path / "run.json").is_file():
        if keys is None:
            return load_generated(path)[2]
        entries = [e for e in read_manifest(path) if (e["index"], e["sample"]) in keys]
        if len(entries) < len(keys):  # e.g. a reference made with --limit 100 for a set scored in full
            missing = sorted(keys - {(e["index"], e["sample"]) for e in entries})
            raise ConceptEraseError(f"reference {str(path)!r} lacks {len(missing)} of the {len(keys)} scored "
                                    f"(row, sample) images, e.g. {missing[0]}; generate them there first")
        return load_generated(path, entries)[2]
    files = sorted(p for p in path.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise ConceptEraseError(f"reference {str(path)!r} holds no .png/.jpg images")
    return LazyImages(files)


def evaluate_quality(out_dir: str | Path, *, reference: str | Path | None = None, clip_model: str | None = None,
                     fid_weights: str | None = None, feature_extractor=None, size: int | None = 299,
                     batch_size: int = 32, entries: list[dict] | None = None) -> dict:
    """FID against `reference` (the original model's generation folder on the same prompts, or real
    images) and CLIP score with the prompts. At least one of `reference` / `clip_model` is needed."""
    from .quality import ClipScore, load_clip, make_fid, score_quality

    if reference is None and clip_model is None:
        raise ConceptEraseError("quality needs --reference (for FID) and/or --clip-model (for CLIP score)")
    out_dir = Path(out_dir)
    info, entries, images = load_generated(out_dir, entries)
    # the same (row, sample) keys on both sides: a --limit run is compared with the same rows
    keys = {(e["index"], e["sample"]) for e in entries}
    ref = reference_images(reference, keys) if reference is not None else None
    # scored on the main process only, with every image at hand: no gather across processes
    fid = make_fid(feature_extractor, fid_weights, sync_on_compute=False) if ref is not None else None
    clip = ClipScore(*load_clip(clip_model), sync_on_compute=False) if clip_model is not None else None
    result = score_quality(images, [e["prompt"] for e in entries], reference=ref, fid=fid, clip=clip,
                           batch_size=batch_size, size=size)
    scoring = {"FID features": "2048-d Inception (torch-fidelity)" if feature_extractor is None
               else type(feature_extractor).__name__, "FID reference": str(reference or "none"),
               "FID image size": size, "CLIP model": clip_model or "none"}
    results = {"kind": "quality", "run": info, "scoring": scoring, "result": result}
    _chart(out_dir / "chart.png", "quality", {info.get("model", "model"): result})
    _own_grid(out_dir, "images", "quality", entries, images)
    report.write_report(out_dir, "Quality evaluation", [report.protocol_block(info), _scoring_block(scoring),
                                                         *quality_sections({"model": result}), FIGURES], results)
    return results


def _quality_bars(result: dict) -> dict:
    return {k: result[k] for k in ("fid", "clip_score") if result[k] is not None}


def quality_sections(results: dict[str, dict]) -> list[str]:
    names = list(results)
    rows = [(m, *(r[k] for r in results.values())) for m, k in
            (("FID (lower is closer to the reference)", "fid"), ("CLIP score", "clip_score"),
             ("images", "images"), ("reference images", "reference_images"))]
    return ["## Quality\n\n" + report.markdown_table(["", *names], rows)]


# ----------------------------------------------------------------------------------------------- compare

SECTIONS = {"nudity": nudity_sections, "classes": classes_sections, "quality": quality_sections}


def read_results(path: str | Path) -> dict:
    file = Path(path) / "results.json"
    if not file.is_file():
        raise ConceptEraseError(f"{str(path)!r} has no results.json: run `concept-erase evaluate` on it first")
    return json.loads(file.read_text(encoding="utf-8"))


def compare(folders: Sequence[str | Path], out_dir: str | Path, *, overwrite: bool = False,
            names: Sequence[str] | None = None) -> dict:
    """Side-by-side report of evaluation folders of the same kind, the original model's first and then one or
    more erased models': tables, a bar chart (per NudeNet class, per class top-1, or FID/CLIP) and a compact
    grid of matched (row, sample) images, the erased concept first. `names` default to before/after for two
    folders, else "before" and each other folder's name."""
    from concept_erase.io_utils import atomic_dir

    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise ConceptEraseError("compare needs the original model's evaluation folder and at least one other")
    names = list(names) if names is not None else default_names(folders)
    if len(names) != len(folders) or len(set(names)) != len(names):
        raise ConceptEraseError(f"compare needs one distinct name per folder, got {names}")
    loaded = [read_results(f) for f in folders]
    kind = loaded[0]["kind"]
    for other in loaded[1:]:
        if other["kind"] != kind:
            raise ConceptEraseError(f"cannot compare a {kind} evaluation with a {other['kind']} evaluation")
    # the results first; the protocol and the scoring after them, once where every folder shares them
    same_protocol = all(r["run"].get("settings") == loaded[0]["run"].get("settings") for r in loaded)
    protocol = ([report.protocol_block(loaded[0]["run"], f"Protocol (every folder; {names[0]}'s model and prompts)")]
                if same_protocol else [report.protocol_block(r["run"], f"Protocol: {n} ({f})")
                                       for n, r, f in zip(names, loaded, folders)])
    same_scoring = all(r["scoring"] == loaded[0]["scoring"] for r in loaded)
    protocol += ([_scoring_block(loaded[0]["scoring"], "Scoring (every folder)")] if same_scoring
                 else [_scoring_block(r["scoring"], f"Scoring: {n}") for n, r in zip(names, loaded)])
    sections = []
    first = loaded[0]
    warnings = []
    for n, r in zip(names[1:], loaded[1:]):
        pair = "the two folders were" if len(folders) == 2 else f"{names[0]} and {n} were"
        warnings += [f"{pair} {what}" for what, differs in (
            ("generated with different protocols", first["run"].get("settings") != r["run"].get("settings")),
            ("generated from different prompt sets", first["run"].get("prompts") != r["run"].get("prompts")),
            ("scored differently (see the scoring blocks)", first["scoring"] != r["scoring"])) if differs]
    sections += [f"**Warning: {w}.**" for w in warnings]
    results = {n: r["result"] for n, r in zip(names, loaded)}
    sections += SECTIONS[kind](results)
    thresholds = [r["scoring"]["threshold"] for r in loaded] if kind == "nudity" else []
    forget = next((r["result"].get("forget") for r in loaded[::-1] if r["result"].get("forget")), None)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _chart(tmp / "chart.png", kind, results, thresholds)
        matched = _matched_grid(folders, tmp, names, kind, forget)
        scored = " (and scored in each)" if kind == "nudity" else ""
        sections.append(f"## Matched seeds\n\n{matched} images made from the same prompt and seed in every "
                        f"folder{scored}; the grid shows the erased concept first.\n\n"
                        "![before vs after](chart.png)\n\n![matched seeds](grid.png)")
        sections += protocol
        summary = {"kind": kind, "folders": {n: str(f) for n, f in zip(names, folders)}, **results,
                   "matched_images": matched, "warnings": warnings}
        report.write_report(tmp, f"Comparison ({kind}): {' vs '.join(names)}", sections, summary)
    return summary


def default_names(folders: Sequence[Path]) -> list[str]:
    """before/after for two folders; else "before" and each other folder's name (made unique)."""
    if len(folders) == 2:
        return ["before", "after"]
    names = ["before"]
    for folder in folders[1:]:
        name, i = folder.name, 2
        while name in names:
            name, i = f"{folder.name}-{i}", i + 1
        names.append(name)
    return names


def _matched_grid(folders: Sequence[Path], out_dir: Path, names: Sequence[str], kind: str,
                  forget: str | None) -> int:
    """Grid of images made from the same (row, sample), i.e. the same prompt and seed, in every folder. For
    nudity only images scored in every folder (a detections.jsonl record) are shown, blurred: an image
    never scored (a row left out by --limit) has nothing to blur by. Returns the number of matched images."""
    from PIL import Image

    from .nudity import blur_exposed

    sides = [{(e["index"], e["sample"]): e for e in read_manifest(folder)} for folder in folders]
    same = lambda k: len({(side[k]["prompt"], side[k]["seed"]) for side in sides}) == 1  # noqa: E731
    keys = set.intersection(*(set(side) for side in sides))
    blur = kind == "nudity"
    if blur:
        dets = [_read_detections(folder) for folder in folders]
        keys = keys.intersection(*(set(d) for d in dets))
    keys = sorted(k for k in keys if same(k))

    def load(i: int, entry: dict):
        key = (entry["index"], entry["sample"])
        with Image.open(folders[i] / "images" / sides[i][key]["file"]) as im:
            image = im.convert("RGB")
        return blur_exposed(image, dets[i][key]) if blur else image

    _write_grid(out_dir / "grid.png", names, grid_groups([sides[-1][k] for k in keys], kind, forget), load)
    return len(keys)


def _read_detections(folder: Path) -> dict:
    from .nudity import Detection, ImageDetections

    file = folder / "detections.jsonl"
    out = {}
    if file.is_file():
        for line in file.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            out[(rec["index"], rec["sample"])] = ImageDetections(
                [Detection(d["label"], d["score"], tuple(d["box"])) for d in rec["detections"]], rec["threshold"])
    return out
