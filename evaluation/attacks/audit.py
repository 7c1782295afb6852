"""`concept-erase audit`: one report on an erased model, every axis beside the others.

1. benign forget rate: the concept's own prompts, base vs erased, same seeds, scored by the concept's detector;
2. attacks: Pre-ASR and ASR of each attack at one printed budget (`run.run_attacks`);
3. collateral damage: the preset's neighbouring concepts (`Concept.neighbours`), base vs erased, same seeds:
   the share of images whose detector label (class, digit, exposed or not) is unchanged;
4. retain accuracy: the concept's retain prompts, judged against what they ask for (MiniSD: digit and
   style judges; object classes: the ImageNet classifier); nudity's retain prompts name no class (n/a);
5. quality: MiniSD's judge-feature Frechet distance (base vs erased, retain prompts), CLIP score with
   --clip-model, FID with --fid-weights (where those are available);
6. the erasure's time and memory, from the model's erase_summary.json.

Writes report.md, report.html (self-contained: charts and grids inlined), results.json, PNG charts and grids.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from concept_erase.errors import ConceptEraseError

from .. import report
from ..prompts import PromptRow
from .run import ASR_RULE, attack_sections, draw, run_attacks, same_seed_grid

GRID_ROWS = 6


def _rows(prompts, seeds, start: int = 0) -> list[PromptRow]:
    return [PromptRow(start + i, p, int(s)) for i, (p, s) in enumerate((p, s) for p in prompts for s in seeds)]


def _spread(prompts: list[str], n: int) -> list[str]:
    """At most n prompts spread evenly over the list (every digit, not the first few)."""
    if n >= len(prompts):
        return list(prompts)
    return [prompts[round(i * (len(prompts) - 1) / max(n - 1, 1))] for i in range(n)]


def retain_accuracy(concept, prompts: list[str], images: list, classifier: str | None = None) -> dict | None:
    """Share of retain images that show what their prompt asks for; None when the prompts name nothing a
    judge can check (nudity)."""
    import numpy as np

    name = concept.name
    if name.startswith("minisd-"):
        from concept_erase.diffusion.minisd import DIGITS, STYLES, minisd_prompt
        from concept_erase.diffusion.minisd.judge import load_judges

        wanted = {minisd_prompt(d, s): (d, s) for d in range(len(DIGITS)) for s in range(len(STYLES))}
        judges = load_judges()
        asked = np.array([wanted[p] for p in prompts])
        digit_ok = judges.predict_digits(images) == asked[:, 0]
        style_ok = judges.predict_styles(images) == asked[:, 1]
        return {"digit": 100.0 * float(digit_ok.mean()), "style": 100.0 * float(style_ok.mean()),
                "judge": "MiniSD digit and style judges"}
    if name.startswith("imagenette-"):
        from ..classes import load_classifier, score_classes

        model = load_classifier(classifier or "microsoft/resnet-50")
        labels = [p.removeprefix("an image of a ") for p in prompts]
        return {"top1": score_classes(images, labels, model)["top1"], "judge": f"{classifier or 'microsoft/resnet-50'} top-1"}
    return None


def quality(concept, base_images: list, erased_images: list, prompts: list[str], *, clip_model: str | None = None,
            fid_weights: str | None = None) -> dict:
    """What quality figures this setup can give: MiniSD's judge-feature Frechet distance, CLIP, FID."""
    out: dict = {}
    if concept.name.startswith("minisd-"):
        from concept_erase.diffusion.minisd.judge import load_judges

        from ..quality import frechet_distance, make_fid

        fid = make_fid(feature_extractor=load_judges().fid_features())
        out["judge_frechet"] = frechet_distance(fid, base_images, erased_images)
        out["judge_frechet_note"] = (
            f"FID's formula on the MiniSD digit judge's 128-d features, erased vs base images of {len(prompts)} "
            "retain prompts x seeds; with fewer images than features the covariances are rank-deficient, so "
            "compare it only between models audited with the same settings")
    if clip_model or fid_weights:
        from ..quality import ClipScore, load_clip, make_fid, score_quality

        clip = ClipScore(*load_clip(clip_model), sync_on_compute=False) if clip_model else None
        fid = make_fid(weights_path=fid_weights) if fid_weights else None
        scored = score_quality(erased_images, prompts, reference=base_images if fid else None, fid=fid, clip=clip)
        out["fid"], out["clip_score"] = scored["fid"], scored["clip_score"]
    return out


def erase_cost(model: str) -> dict | None:
    """Time and memory of the erasure, from its erase_summary.json (None when the model has none)."""
    path = Path(model) / "erase_summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text(encoding="utf-8"))
    keep = ("method", "steps", "seconds_total", "seconds_mask", "seconds_per_step", "peak_memory_bytes",
            "processes", "batch_size", "lr")
    return {k: s[k] for k in keep if k in s}


def run_audit(pipe, base, concept, detector, *, budgets: dict, seeds, protocol, model: str,
              classifier: str | None = None, retain_prompts: int = 9, clip_model: str | None = None,
              fid_weights: str | None = None, seed: int = 0, log=print) -> tuple[dict, dict]:
    """Measure everything; returns (results, images for the grids)."""
    rows = _rows(concept.forget_prompts, seeds)
    log(f"audit: {len(rows)} concept prompts x seeds, attacks: {', '.join(budgets)}")
    attack_run = run_attacks(pipe, concept, rows, budgets, detector, protocol=protocol, base=base, seed=seed, log=log)
    summary = attack_run.summary()
    n = len(rows)
    base_rate, erased_rate = summary["base_detected"], summary["pre_asr"]
    results = {"model": model, "concept": concept.name, "detector": summary["detector"], "protocol": summary["protocol"],
               "seeds": list(seeds), "rule": ASR_RULE,
               "forget": {"prompts": n, "base_detected": base_rate, "erased_detected": erased_rate,
                          "forget_rate": 100.0 - erased_rate},
               "attacks": summary["attacks"]}
    images = {"attacks": attack_run.images, "attack_captions": [f"s{r.seed}: {r.prompt}" for r in rows]}

    if concept.neighbours:
        nrows = _rows(concept.neighbours, seeds)
        b, e = draw(base, nrows, protocol), draw(pipe, nrows, protocol)
        lb, le = detector.label(b), detector.label(e)
        per = {}
        for r, x, y in zip(nrows, lb, le):
            per.setdefault(r.prompt, []).append(x == y)
        results["neighbours"] = {
            "prompts": len(concept.neighbours), "images": len(nrows),
            "unchanged": 100.0 * sum(x == y for x, y in zip(lb, le)) / len(nrows),
            "per_prompt": {p: 100.0 * sum(v) / len(v) for p, v in per.items()},
            "rule": "share of neighbour images whose detector label (same prompt, same seed) is the base model's"}
        images["neighbours"] = {"base": detector.show(b[:GRID_ROWS]), "erased": detector.show(e[:GRID_ROWS])}
        images["neighbour_captions"] = [f"s{r.seed}: {r.prompt}" for r in nrows[:GRID_ROWS]]

    kept = _spread(list(concept.retain_prompts), retain_prompts)
    rrows = _rows(kept, seeds)
    rb, re_ = draw(base, rrows, protocol), draw(pipe, rrows, protocol)
    prompts = [r.prompt for r in rrows]
    results["retain"] = {"prompts": len(kept), "images": len(rrows),
                         "base": retain_accuracy(concept, prompts, rb, classifier),
                         "erased": retain_accuracy(concept, prompts, re_, classifier)}
    results["quality"] = quality(concept, rb, re_, prompts, clip_model=clip_model, fid_weights=fid_weights)
    results["erasure"] = erase_cost(model)
    return results, images


def headline(results: dict) -> dict:
    """The figures a model card records."""
    attacks = {name: round(a["asr"], 2) for name, a in results["attacks"].items()}
    out = {"concept": results["concept"], "forget_rate": round(results["forget"]["forget_rate"], 2),
           "asr": attacks, "max_asr": max(attacks.values()) if attacks else None,
           "prompts": results["forget"]["prompts"], "detector": results["detector"],
           "budgets": {name: a["budget"] for name, a in results["attacks"].items()}}
    if "neighbours" in results:
        out["neighbours_unchanged"] = round(results["neighbours"]["unchanged"], 2)
    erased = results["retain"]["erased"]
    if erased:
        out["retain"] = {k: round(v, 2) for k, v in erased.items() if isinstance(v, float)}
    return out


# ------------------------------------------------------------------------------------------ writing


def _sections(results: dict) -> list[str]:
    t = report.markdown_table
    f = results["forget"]
    secs = [
        "## Protocol\n\n" + t(["setting", "value"], list(results["protocol"].items())
                              + [("seeds", ", ".join(map(str, results["seeds"])))]),
        f"## Benign forget rate\n\nThe concept's {f['prompts']} prompt x seed rows, plain prompts. "
        f"Detector: {results['detector']}.\n\n"
        + t(["", "base", "erased"], [("concept detected (%)", f["base_detected"], f["erased_detected"])])
        + f"\n\nForget rate (erased images without the concept): **{f['forget_rate']:.1f}%**.",
        *attack_sections({"attacks": results["attacks"], "rows": f["prompts"], "detector": results["detector"],
                          "base_detected": f["base_detected"]}),
        "![attack success](asr.png)\n\n![same seed: base, erased, each attack](grid_attacks.png)",
    ]
    if "neighbours" in results:
        nb = results["neighbours"]
        secs.append(f"## Collateral damage on neighbouring concepts\n\n{nb['rule']}: **{nb['unchanged']:.1f}%** "
                    f"over {nb['images']} images.\n\n"
                    + t(["neighbour prompt", "unchanged (%)"], list(nb["per_prompt"].items()))
                    + "\n\n![neighbours, same seed](grid_neighbours.png)")
    r = results["retain"]
    if r["erased"] is None:
        secs.append("## Retain accuracy\n\nn/a: this concept's retain prompts name nothing a judge can check "
                    "(see quality).")
    else:
        keys = [k for k in r["erased"] if k != "judge"]
        secs.append(f"## Retain accuracy\n\n{r['prompts']} retain prompts x seeds ({r['images']} images), "
                    f"judged by {r['erased']['judge']}.\n\n"
                    + t(["accuracy (%)", "base", "erased"], [(k, r["base"][k], r["erased"][k]) for k in keys]))
    q = results["quality"]
    qrows = [(k, v) for k, v in q.items() if not k.endswith("_note")]
    secs.append("## Quality\n\n" + (t(["figure", "value"], qrows) if qrows else "n/a: give --clip-model and/or "
                                   "--fid-weights for CLIP score and FID")
                + "".join(f"\n\n{v}" for k, v in q.items() if k.endswith("_note"))
                + ("\n\nCLIP score is 100 x cosine (torchmetrics' scale)." if q.get("clip_score") is not None else ""))
    e = results["erasure"]
    secs.append("## The erasure's cost\n\n" + (t(["", "value"], list(e.items())) if e else
                                                "n/a: the model folder has no erase_summary.json"))
    return secs


def _markdown_to_html(text: str, folder: Path) -> str:
    """The report's own Markdown subset (headings, tables, images, bold, paragraphs) as HTML, with every
    image inlined as a data URI so the file stands alone."""
    out, lines, i = [], text.splitlines(), 0

    def inline(s: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(s))

    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, body = block[0], block[2:]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in body)
                       + "</table>")
            continue
        elif line.startswith("!["):
            for alt, name in re.findall(r"!\[([^\]]*)\]\(([^)]+)\)", line):
                data = base64.b64encode((folder / name).read_bytes()).decode()
                out.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{html.escape(alt)}</figcaption></figure>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}"
             "img{max-width:100%}figure{margin:1em 0}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>\n" \
           + "\n".join(out) + "\n</body></html>\n"


def write_audit(results: dict, images: dict, out: Path) -> Path:
    """report.md, report.html, results.json, asr.png, grid_attacks.png, grid_neighbours.png in `out`."""
    from concept_erase.io_utils import atomic_file

    attacks = results["attacks"]
    report.bar_chart(out / "asr.png", {"Pre-ASR": {n: a["pre_asr"] for n, a in attacks.items()},
                                       "ASR": {n: a["asr"] for n, a in attacks.items()}},
                     title=f"Attack success on {results['concept']}", ylabel="% of prompts")
    same_seed_grid(out / "grid_attacks.png", images["attacks"], images["attack_captions"], GRID_ROWS)
    if "neighbours" in images:
        same_seed_grid(out / "grid_neighbours.png", images["neighbours"], images["neighbour_captions"], GRID_ROWS)
    title = f"Erasure audit: {results['concept']} in {results['model']}"
    path = report.write_report(out, title, _sections(results), results)
    with atomic_file(out / "report.html", overwrite=True) as tmp:
        tmp.write_text(_markdown_to_html(path.read_text(encoding="utf-8"), out), encoding="utf-8")
    return path


def check_audit_inputs(concept, budgets: dict) -> None:
    if not budgets:
        raise ConceptEraseError("the audit needs at least one attack")
    if not concept.forget_prompts:
        raise ConceptEraseError(f"concept {concept.name!r} has no prompts to audit")
