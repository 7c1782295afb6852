"""`concept-erase evaluate` checks every scoring option before generating anything, MiniSD gets its own
defaults, and ImageNet's class-index column disambiguates names that several labels share."""

import json
import shutil

import pytest
import torch
from PIL import Image

from concept_erase.cli import build_parser, main
from evaluation.cli import resolve_defaults

I2P = "prompt,categories,evaluation_seed\na red square,sexual,11\n"
CLASSES = "prompt,evaluation_seed,class\nImage of church,1,church\nImage of crane,2,crane\n"
# ESD's imagenet_prompts.csv layout: the class index beside the name; "crane" is two ImageNet classes
IMAGENET = """,case_number,evaluation_seed,prompt,label_idx,label_str
0,0,1,image of crane,1,crane
1,1,2,image of crane,3,crane
2,2,3,image of tench,0,tench
3,3,4,image of  Tinca tinca,0, Tinca tinca
"""
LABELS = ["tench, Tinca tinca", "crane", "church", "crane"]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random transformers ResNet whose labels contain one name twice, like ImageNet's."""
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf")
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4,
                                              id2label=dict(enumerate(LABELS)))).save_pretrained(path)
    ConvNextImageProcessorPil(size={"shortest_edge": 32}).save_pretrained(path)
    return path


@pytest.fixture
def files(tmp_path):
    for name, text in (("i2p.csv", I2P), ("classes.csv", CLASSES), ("imagenet.csv", IMAGENET)):
        (tmp_path / name).write_text(text)
    (tmp_path / "real").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "real" / f"{i}.png")
    return tmp_path


BAD = {  # id -> (kind, prompt file, options, what the one-line error must name)
    "threshold": ("nudity", "i2p.csv", ["--threshold", "1.5"], "1.5"),
    "nudenet-model": ("nudity", "i2p.csv", ["--nudenet-model", "{tmp}/missing-640m.onnx"], "missing-640m.onnx"),
    "score-batch-size": ("nudity", "i2p.csv", ["--score-batch-size", "0"], "--score-batch-size must be >= 1, got 0"),
    "classifier": ("classes", "classes.csv", ["--classifier", "{tmp}/no-such-classifier"],
                   "no-such-classifier' does not exist (offline: give a local folder); --classifier takes"),
    "forget-unknown": ("classes", "imagenet.csv", ["--classifier", "{clf}", "--forget", "golf ball"], "'golf ball'"),
    "forget-ambiguous": ("classes", "imagenet.csv", ["--classifier", "{clf}", "--forget", "crane"], "crane (1), crane (3)"),
    "class-ambiguous": ("classes", "classes.csv", ["--classifier", "{clf}"],
                        "class 'crane' matches several classifier labels: 1 ('crane'), 3 ('crane')"),
    "no-class-column": ("classes", "i2p.csv", ["--classifier", "{clf}"], "i2p.csv' has no class column"),
    "reference": ("quality", "i2p.csv", ["--reference", "{tmp}/no-reference"], "no-reference"),
    "clip-model": ("quality", "i2p.csv", ["--clip-model", "{tmp}/no-clip"], "no-clip"),
    "fid-weights": ("quality", "i2p.csv", ["--reference", "{tmp}/real", "--fid-weights", "{tmp}/no-inception.pth"],
                    "no-inception.pth"),
    "fid-weights-alone": ("quality", "i2p.csv", ["--clip-model", "{tmp}/real", "--fid-weights", "{tmp}/w.pth"],
                          "w.pth' is used only with --reference"),
}


@pytest.mark.parametrize("kind, prompts, options, named", BAD.values(), ids=BAD.keys())
def test_bad_scoring_options_fail_before_generating(kind, prompts, options, named, files, classifier_dir, capsys):
    out = files / "out"
    options = [o.format(tmp=files, clf=classifier_dir) for o in options]
    # The model is an empty folder: had loading started, the error would say it is no pipeline instead.
    (files / "not-a-pipeline").mkdir()
    code = main(["evaluate", kind, "--model", str(files / "not-a-pipeline"), "--prompts", str(files / prompts),
                 "--out", str(out), *options])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("concept-erase: error")]
    assert code == 2 and len(errors) == 1 and named in errors[0], errors
    assert not out.exists()


def test_minisd_defaults_to_its_protocol_and_judge():
    parser = build_parser("evaluate")
    common = ["--prompts", "p.csv", "--out", "o"]
    args = resolve_defaults(parser.parse_args(["evaluate", "classes", "--model", "minisd", *common]))
    assert (args.protocol, args.classifier) == ("minisd", "minisd-digits")
    args = resolve_defaults(parser.parse_args(["evaluate", "classes", "--model", "minisd", "--protocol", "quick",
                                               "--classifier", "minisd-styles", *common]))
    assert (args.protocol, args.classifier) == ("quick", "minisd-styles")  # what the user asked for wins
    args = resolve_defaults(parser.parse_args(["evaluate", "classes", "--model", "some-org/sd15", *common]))
    assert (args.protocol, args.classifier) == ("paper", "microsoft/resnet-50")
    args = resolve_defaults(parser.parse_args(["evaluate", "nudity", "--model", "minisd", *common]))
    assert args.protocol == "minisd" and not hasattr(args, "classifier")


def test_class_index_column_scores_ambiguous_names(tiny_pipeline_dir, classifier_dir, files):
    out = files / "out"
    assert main(["evaluate", "classes", "--model", str(tiny_pipeline_dir), "--prompts", str(files / "imagenet.csv"),
                 "--out", str(out), "--classifier", str(classifier_dir), "--forget", "3",
                 "--protocol", "quick", "--steps", "2"]) == 0
    assert [e["target"] for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())] == [1, 3, 0, 0]
    r = json.loads((out / "results.json").read_text())["result"]
    # one class per index: the two cranes apart, tench and its synonym together
    assert {k: v["images"] for k, v in r["classes"].items()} == {"crane (1)": 1, "crane (3)": 1, "tench": 2}
    assert r["forget"] == "crane (3)" and r["UA"] == 100 - r["classes"]["crane (3)"]["top1"]


def test_an_erased_minisd_is_evaluated_as_minisd_and_says_so(tmp_path, capsys):
    from concept_erase.diffusion.models.card import model_card
    from concept_erase.diffusion.minisd import minisd_path

    erased = tmp_path / "erased"
    shutil.copytree(minisd_path(), erased, ignore=shutil.ignore_patterns("*.safetensors"))
    (erased / "README.md").write_text(model_card({"base_model": "minisd", "concept": "minisd-digit-three"}))
    common = ["--prompts", "p.csv", "--out", "o"]
    args = resolve_defaults(build_parser("evaluate").parse_args(["evaluate", "classes", "--model", str(erased), *common]))
    assert (args.protocol, args.classifier) == ("minisd", "minisd-digits")
    assert "model card base_model: minisd): --protocol minisd, --classifier minisd-digits" in capsys.readouterr().err
    # the paper's 512 px protocol on a 16 px model is refused before anything runs
    assert main(["evaluate", "classes", "--model", str(erased), "--protocol", "paper", "--prompts", "minisd-digits",
                 "--out", str(tmp_path / "o")]) == 2
    assert "512 px does not suit" in capsys.readouterr().err


def test_a_defaulted_paper_protocol_draws_at_the_models_size(tiny_pipeline_dir):
    from concept_erase.diffusion.models.defaults import native_resolution

    args = resolve_defaults(build_parser("evaluate").parse_args(
        ["evaluate", "nudity", "--model", str(tiny_pipeline_dir), "--prompts", "p.csv", "--out", "o"]))
    assert args.protocol == "paper" and args.resolution == native_resolution(str(tiny_pipeline_dir)) != 512
