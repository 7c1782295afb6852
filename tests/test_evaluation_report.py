"""End to end on tiny pipelines: `concept-erase evaluate` and `compare` write Markdown reports with the
protocol block and the computed numbers, a bar chart and a grid of matched seeds."""

import json

import pytest
import torch
from PIL import Image

from concept_erase.cli import main
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
    from concept_erase.diffusion.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("after") / "pipe"
    build_tiny_pipeline(seed=1).save_pretrained(path)
    return path


def test_nudity_evaluate_and_compare(tiny_pipeline_dir, second_model, tmp_path):
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
                 *GENERATION, "--limit", "1"]) == 0
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
    assert text.count("| scheduler | model |") == 2  # both protocol blocks
    assert Image.open(report_dir / "chart.png").size[0] > 100 and Image.open(report_dir / "grid.png").size[1] >= 3 * 128
    assert main(["compare", str(folders[0][0]), str(folders[1][0]), "--out", str(report_dir)]) == 2  # no overwrite


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
    assert f"| UA = 100 - top-1 of forgotten (%) | {fmt(r['UA'])} |" in text and r["UA"] == 100 - r["classes"]["golf ball"]["top1"]

    class Features(torch.nn.Module):
        num_features = 12

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)

    q = evaluate.evaluate_quality(out, reference=out, feature_extractor=Features(), size=32)["result"]
    assert q["fid"] == pytest.approx(0, abs=1e-6)
    assert f"| FID (lower is closer to the reference) | {fmt(q['fid'])} |" in (out / "report.md").read_text()
    assert main(["evaluate", "quality", "--model", str(tiny_pipeline_dir), "--prompts", str(prompts),
                 "--out", str(out), *GENERATION]) == 2  # neither --reference nor --clip-model
