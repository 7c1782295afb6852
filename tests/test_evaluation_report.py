"""End to end on tiny pipelines: `concept-erase evaluate` and `compare` write Markdown reports with the
protocol block and the computed numbers, a bar chart and a grid of matched seeds."""

import json
import shutil

import pytest
import torch
from PIL import Image

from concept_erase.cli import main
from concept_erase.errors import ConceptEraseError
from evaluation import evaluate
from evaluation.report import fmt

I2P = """prompt,categories,evaluation_seed,evaluation_guidance,case_number
a red square,sexual,11,7,0
a blue circle,"sexual, hate",12,7,1
a green line,violence,13,7,2
"""
CLASSES = """case_number,prompt,evaluation_seed,class
0,Image of golf ball,1,golf ball
1,Image of church,2,church
2,Image of golf ball,3,golf ball
"""
GENERATION = ["--protocol", "quick", "--steps", "2", "--batch-size", "4"]


class KnownDetector:
    """A NudeNet stand-in: a BELLY_EXPOSED box on every image; a second, weak one where red dominates."""

    def detect_batch(self, arrays, batch_size=4):
        out = []
        for a in arrays:
            boxes = [{"class": "BELLY_EXPOSED", "score": 0.9, "box": [0, 0, 8, 8]}]
            if a[..., 2].mean() > a[..., 0].mean():
                boxes.append({"class": "FEET_EXPOSED", "score": 0.7, "box": [8, 8, 8, 8]})
            out.append(boxes)
        return out


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    from concept_erase.diffusion.models.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("after") / "pipe"
    build_tiny_pipeline(seed=1).save_pretrained(path)
    return path


def test_nudity_evaluate_and_compare(tiny_pipeline_dir, second_model, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "i2p.csv"
    prompts.write_text(I2P)
    folders = []
    for name, model in (("before", tiny_pipeline_dir), ("after", second_model)):
        out = tmp_path / name
        assert main(["evaluate", "nudity", "--model", str(model), "--prompts", str(prompts), "--out", str(out), *GENERATION]) == 0
        for f in ("report.md", "results.json", "chart.png", "grid.png", "detections.jsonl", "manifest.jsonl"):
            assert (out / f).is_file(), f
        text = (out / "report.md").read_text()
        assert "## Protocol" in text and "| num_inference_steps | 2 |" in text and "quick (overridden: num_inference_steps)" in text
        # docs/PROTOCOLS.md pins these too, though no option changes them
        assert "| seed | each row's evaluation_seed (rows without one" in text and "| safety checker | none |" in text
        # re-score with a detector whose findings are known, through the same adapter and report code
        results = evaluate.evaluate_nudity(out, detector=KnownDetector())
        r = results["result"]
        assert r["class_counts"]["BELLY_EXPOSED"] == 3 and r["share_any"] == 100.0
        assert f"| BELLY_EXPOSED | {r['class_counts']['BELLY_EXPOSED']} |" in (out / "report.md").read_text()
        assert f"| FEET_EXPOSED | {r['class_counts']['FEET_EXPOSED']} |" in (out / "report.md").read_text()
        folders.append((out, r))
    # --limit on a folder holding more: only the rows asked for are scored and reported
    out = tmp_path / "before"
    assert main(["evaluate", "nudity", "--model", str(tiny_pipeline_dir), "--prompts", str(prompts), "--out", str(out),
                 *GENERATION, "--limit", "1", "--no-progress"]) == 0  # every command takes --no-progress
    limited = json.loads((out / "results.json").read_text())
    assert limited["result"]["images"] == 1 and limited["run"]["rows"] == 1
    folders[0] = (out, evaluate.evaluate_nudity(out, detector=KnownDetector())["result"])  # all 3 again
    report_dir = tmp_path / "cmp"
    assert main(["compare", str(folders[0][0]), str(folders[1][0]), "--out", str(report_dir)]) == 0
    text = (report_dir / "report.md").read_text()
    (_, a), (_, b) = folders
    assert f"| FEET_EXPOSED | {a['class_counts']['FEET_EXPOSED']} | {b['class_counts']['FEET_EXPOSED']} |" in text
    assert f"| total (9 exposed classes) | {a['total_exposed']} | {b['total_exposed']} |" in text
    assert "| sexual | 100.00 (n=2) | 100.00 (n=2) |" in text and "3 images made from the same prompt and seed" in text
    # one protocol block and one scoring block where the folders share them, after the results
    assert text.count("| scheduler | model |") == 1 and text.count("| threshold | 0.60 |") == 1
    assert text.index("## Exposed parts") < text.index("## Protocol (every folder") < text.index("## Scoring (every")
    assert "Warning" not in text
    assert Image.open(report_dir / "chart.png").size[0] > 100 and Image.open(report_dir / "grid.png").size[1] >= 3 * 64  # a row per category
    assert main(["compare", str(folders[0][0]), str(folders[1][0]), "--out", str(report_dir)]) == 2  # no overwrite
    # scored at another threshold: both scoring blocks, a warning in the report and on stderr, both in the title
    evaluate.evaluate_nudity(folders[1][0], threshold=0.45, detector=KnownDetector())
    titles = []
    real_chart = evaluate.report.bar_chart
    monkeypatch.setattr(evaluate.report, "bar_chart", lambda path, series, title, ylabel: titles.append(title)
                        or real_chart(path, series, title=title, ylabel=ylabel))
    capsys.readouterr()
    assert main(["compare", str(folders[0][0]), str(folders[1][0]), "--out", str(report_dir), "--overwrite"]) == 0
    text = (report_dir / "report.md").read_text()
    assert "| threshold | 0.60 |" in text and "| threshold | 0.45 |" in text
    assert "**Warning: the two folders were scored differently (see the scoring blocks).**" in text
    assert "warning: the two folders were scored differently" in capsys.readouterr().err
    assert titles == ["NudeNet exposed parts (score >= before 0.6, after 0.45)"]


def test_update_card_records_the_evaluation(tiny_pipeline, tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    from concept_erase.diffusion.models.card import read_model_card, save_pipeline
    from evaluation import nudity

    monkeypatch.setattr(nudity, "load_detector", lambda model_path=None, resolution=None: KnownDetector())
    model = save_pipeline(tiny_pipeline, tmp_path / "erased", card={"base_model": "tiny", "concept": "cat"})
    prompts = tmp_path / "i2p.csv"
    prompts.write_text(I2P)
    out = tmp_path / "ev"
    assert main(["evaluate", "nudity", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
                 *GENERATION, "--update-card"]) == 0
    r = json.loads((out / "results.json").read_text())["result"]
    card = read_model_card(model)
    assert card["concept"] == "cat" and card["evaluation"]["nudity"] == {
        "prompts": "i2p.csv", "protocol": "quick (overridden: num_inference_steps)", "images": 3, "threshold": 0.6,
        "exposed_parts": r["total_exposed"], "images_with_exposed_parts_pct": 100.0}
    assert f"| nudity.exposed_parts | {r['total_exposed']} |" in (model / "README.md").read_text()
    # a model without a card: refused before anything is generated
    capsys.readouterr()
    assert main(["evaluate", "nudity", "--model", str(tiny_pipeline_dir), "--prompts", str(prompts),
                 "--out", str(tmp_path / "ev2"), *GENERATION, "--update-card"]) == 2
    assert "no model card" in capsys.readouterr().err and not (tmp_path / "ev2").exists()


class HalfSureDetector:
    """An exposed part on every image at 0.5: not counted at 0.6, but a report must still blur it."""

    def detect_batch(self, arrays, batch_size=4):
        return [[{"class": "BELLY_EXPOSED", "score": 0.5, "box": [0, 0, 8, 8]}] for _ in arrays]


def test_grids_blur_from_045_and_show_only_scored_images(tiny_pipeline_dir, second_model, tmp_path, monkeypatch):
    import evaluation.nudity as nudity
    from evaluation.generation import make_protocol

    prompts = tmp_path / "i2p.csv"
    prompts.write_text(I2P)
    protocol = make_protocol("quick", num_inference_steps=2)
    sides = [tmp_path / "before", tmp_path / "after"]
    for out, model in zip(sides, (tiny_pipeline_dir, second_model)):
        entries = evaluate.generate_for_evaluation(str(model), str(prompts), out, protocol, progress=False)
    blurred = []
    real_blur = nudity.blur_exposed
    monkeypatch.setattr(nudity, "blur_exposed", lambda image, found: blurred.append(found) or real_blur(image, found))
    r = evaluate.evaluate_nudity(sides[0], detector=HalfSureDetector())["result"]  # all 3 rows
    assert r["total_exposed"] == 0 and len(blurred) == 3
    assert all([(d.label, d.score) for d in found.detections] == [("BELLY_EXPOSED", 0.5)] for found in blurred)
    evaluate.evaluate_nudity(sides[1], detector=HalfSureDetector(), entries=entries[:1])  # as with --limit 1
    blurred.clear()
    summary = evaluate.compare(sides, tmp_path / "cmp")
    # rows 1 and 2 were never scored on the after side: left out of the grid rather than shown unblurred
    assert summary["matched_images"] == 1 and len(blurred) == 2 and all(found.detections for found in blurred)


def test_classes_and_quality_reports(tiny_pipeline_dir, tmp_path):
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    labels = ["golf ball", "church", "parachute"]
    clf = tmp_path / "clf"
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
                                              id2label=dict(enumerate(labels)))).save_pretrained(clf)
    ConvNextImageProcessorPil(size={"shortest_edge": 32}).save_pretrained(clf)
    prompts = tmp_path / "classes.csv"
    prompts.write_text(CLASSES)
    out = tmp_path / "classes"
    assert main(["evaluate", "classes", "--model", str(tiny_pipeline_dir), "--prompts", str(prompts), "--out", str(out),
                 "--classifier", str(clf), "--forget", "golf ball", *GENERATION]) == 0
    r = json.loads((out / "results.json").read_text())["result"]
    text = (out / "report.md").read_text()
    assert "## Protocol" in text and f"| golf ball | {fmt(r['classes']['golf ball']['top1'])} |" in text
    assert f"| UA = 100 - top-1 of forgotten (%; mean over them) | {fmt(r['UA'])} |" in text and r["UA"] == 100 - r["classes"]["golf ball"]["top1"]

    class Features(torch.nn.Module):
        num_features = 12

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)

    q = evaluate.evaluate_quality(out, reference=out, feature_extractor=Features(), size=32)["result"]
    assert q["fid"] == pytest.approx(0, abs=1e-6)
    assert f"| FID (lower is closer to the reference) | {fmt(q['fid'])} |" in (out / "report.md").read_text()
    # the reference is cut to the scored (row, sample) images, as --limit 2 scores only 2 rows
    entries = evaluate.read_manifest(out)
    q = evaluate.evaluate_quality(out, reference=out, feature_extractor=Features(), size=32, entries=entries[:2])["result"]
    assert (q["images"], q["reference_images"]) == (2, 2) and q["fid"] == pytest.approx(0, abs=1e-6)
    short = tmp_path / "short-reference"
    shutil.copytree(out, short)
    (short / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries[:2]))
    with pytest.raises(ConceptEraseError, match=r"lacks 1 of the 3 scored \(row, sample\) images, e.g. \(2, 0\)"):
        evaluate.evaluate_quality(out, reference=short, feature_extractor=Features(), size=32)
    assert main(["evaluate", "quality", "--model", str(tiny_pipeline_dir), "--prompts", str(prompts),
                 "--out", str(out), *GENERATION]) == 2  # neither --reference nor --clip-model


def test_grid_rows_put_the_erased_concept_first():
    entries = [{"index": i, "sample": 0, "prompt": p, "label": c, "style": s}
               for i, (p, c, s) in enumerate([("a 1", "one", "plain"), ("a 7", "seven", "plain"), ("a 7 b", "seven", "bold"),
                                              ("a 1", "one", "plain")])]
    rows = evaluate.grid_groups(entries, "classes", forget="seven")
    assert [(label, marked, [e["index"] for e in es]) for label, marked, es in rows] == [
        ("seven: erased", True, [1, 2]), ("one", False, [0, 3])]  # a row per class, its styles in turn
    nudity = [{"index": 0, "sample": 0, "prompt": "x", "categories": ["violence"]},
              {"index": 1, "sample": 0, "prompt": "y", "categories": ["sexual"]}]
    assert [r[:2] for r in evaluate.grid_groups(nudity, "nudity")] == [("sexual: erased", True), ("violence", False)]


def test_compare_takes_several_erased_models(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "base"
    digits = tmp_path / "digits.csv"
    digits.write_text("prompt,evaluation_seed,class,style\nseven,1,seven,plain\none,2,one,plain\nseven,3,seven,bold\n")
    assert main(["evaluate", "classes", "--model", str(tiny_pipeline_dir), "--prompts", str(digits), "--out", str(out),
                 "--classifier", "minisd-digits", "--forget", "seven", *GENERATION]) == 0
    for name in ("erased-a", "erased-b"):
        shutil.copytree(out, tmp_path / name)
    report_dir = tmp_path / "report"
    assert main(["compare", str(out), str(tmp_path / "erased-a"), str(tmp_path / "erased-b"), "--out", str(report_dir)]) == 0
    text = (report_dir / "report.md").read_text()
    assert "# Comparison (classes): before vs erased-a vs erased-b" in text
    assert "| style | prompt class | before | erased-a | erased-b |" in text  # the judged-as table
    assert text.count("## Protocol") == 1 and "Warning" not in text
    assert "3 images made from the same prompt and seed in every folder" in text
    grid = Image.open(report_dir / "grid.png")
    assert grid.size == (150 + 3 * (2 * 64 + 8), 20 + 2 * 64)  # 3 models side by side; a row per class, its styles
    assert grid.getpixel((2, 20 + 2)) == (255, 255, 255) and grid.getpixel((150, 21)) == (200, 30, 30)  # marked


def test_chart_legend_never_covers_a_bar():
    import matplotlib.pyplot as plt

    from evaluation.report import bar_figure

    series = {"before": {"a": 100.0, "b": 100.0}, "after": {"a": 100.0, "b": 0.0}, "other": {"a": 90.0, "b": 95.0}}
    fig = bar_figure(series, title="t", ylabel="y")
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert not any(legend.overlaps(bar.get_window_extent()) for bar in ax.patches)
    plt.close(fig)
