"""Class accuracy: label matching, top-1/top-5/UA on a stub with known guesses, a real (tiny, random)
transformers ResNet loaded from a folder, MiniSD's digit judge, and merging shards."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from concept_erase.errors import ConceptEraseError
from evaluation.classes import (
    ClassAccuracy, JudgeClassifier, load_classifier, match_label, prompt_classes, score_classes,
)

LABELS = ["tench, Tinca tinca", "goldfish, Carassius auratus", "cassette player", "golf ball", "parachute, chute", "church"]


class StubClassifier:
    labels = LABELS

    def __init__(self, guesses):
        self.guesses = guesses  # one top-5 row per image, in call order

    def topk(self, images, k=5):
        out, self.guesses = self.guesses[: len(images)], self.guesses[len(images):]
        return torch.tensor(out)[:, :k]


def test_match_label_synonyms_and_errors():
    assert match_label("Tinca tinca", LABELS) == 0 and match_label("golf ball", LABELS) == 3
    assert match_label("chute", LABELS) == 4 and match_label("5", LABELS) == 5
    with pytest.raises(ConceptEraseError, match="'airliner'"):
        match_label("airliner", LABELS)


def test_a_name_several_labels_share_needs_the_class_index():
    # ImageNet's "crane" is 134 (the bird) and 517 (the machine); "panda" a synonym of 387 and 388
    labels = ["tench, Tinca tinca", "crane", "giant panda, panda", "crane", "lesser panda, panda"]
    for name, candidates in (("crane", "1 ('crane'), 3 ('crane')"), ("Panda", "2 ('giant panda, panda'), 4")):
        message = f"class '{name}' matches several classifier labels: {candidates}"
        with pytest.raises(ConceptEraseError, match=re.escape(message)):
            match_label(name, labels)
    with pytest.raises(ConceptEraseError, match="'crane'"):
        prompt_classes(["tench", "crane"], labels)  # no index column: refused, not the first match
    # with the index column: grouped by index, so the cranes stay apart and "Tinca tinca" joins "tench"
    c = prompt_classes(["crane", "crane", "tench", "Tinca tinca", "giant panda"], labels, targets=[1, 3, 0, 0, None])
    assert c.names == ["crane (1)", "crane (3)", "tench", "giant panda"]
    assert (c.targets, c.groups) == ([1, 3, 0, 0, 2], [0, 1, 2, 2, 3])
    assert prompt_classes(["crane", "crane"], labels, targets=[1, 3], forget="3").forget == ["crane (3)"]
    assert prompt_classes(["tench", "Tinca tinca"], labels, targets=[0, 0], forget="tinca tinca").forget == ["tench"]
    message = "forgotten class 'crane' matches several prompt classes (crane (1), crane (3))"
    with pytest.raises(ConceptEraseError, match=re.escape(message)):
        prompt_classes(["crane", "crane"], labels, targets=[1, 3], forget="crane")
    with pytest.raises(ConceptEraseError, match="class index 7 of 'crane' is out of range for the classifier's 5 labels"):
        prompt_classes(["crane"], labels, targets=[7])
    guesses = [[3, 0, 1, 2, 4], [3, 0, 1, 2, 4]]  # the machine both times
    r = score_classes([Image.new("RGB", (8, 8))] * 2, ["crane", "crane"], StubClassifier(guesses), targets=[1, 3])
    assert r["classes"] == {"crane (1)": {"images": 1, "top1": 0.0, "top5": 100.0},
                            "crane (3)": {"images": 1, "top1": 100.0, "top5": 100.0}}


def test_top1_top5_and_unlearning_accuracy():
    images = [Image.new("RGB", (8, 8))] * 5
    labels = ["golf ball", "golf ball", "church", "church", "church"]
    guesses = [[3, 0, 1, 2, 4], [0, 3, 1, 2, 4], [5, 0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 5]]
    r = score_classes(images, labels, StubClassifier(guesses), forget="golf ball", batch_size=2)
    assert r["classes"]["golf ball"] == {"images": 2, "top1": 50.0, "top5": 100.0}
    assert r["classes"]["church"]["top1"] == pytest.approx(100 / 3) and r["classes"]["church"]["top5"] == pytest.approx(200 / 3)
    assert r["UA"] == 50.0 and r["retain_top1"] == pytest.approx(100 / 3) and r["forget"] == "golf ball"
    with pytest.raises(ConceptEraseError, match="'tench'"):
        score_classes(images[:1], ["golf ball"], StubClassifier(guesses), forget="tench")


def test_accuracy_merges_across_shards():
    topk = torch.tensor([[1, 2, 3, 4, 5], [2, 1, 3, 4, 5], [3, 1, 2, 4, 5], [9, 8, 7, 6, 5]])
    targets, groups = torch.tensor([1, 1, 3, 5]), torch.tensor([0, 0, 1, 2])
    whole, a, b = (ClassAccuracy(["x", "y", "z"], forget="x") for _ in range(3))
    whole.update(topk, targets, groups)
    a.update(topk[:3], targets[:3], groups[:3])
    b.update(topk[3:], targets[3:], groups[3:])
    a.merge_state(b)
    assert a.compute() == whole.compute() and whole.compute()["classes"]["z"] == {"images": 1, "top1": 0.0, "top5": 100.0}


def test_transformers_classifier_from_folder(tmp_path):
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=len(LABELS),
                          id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    ResNetForImageClassification(config).save_pretrained(tmp_path)
    ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(tmp_path)
    clf = load_classifier(str(tmp_path))
    assert clf.labels == LABELS
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(6)]
    labels = ["golf ball", "church"] * 3
    top = clf.topk(images, k=5)
    assert top.shape == (6, 5)
    # the same numbers by hand from the model's own guesses
    hand = {name: [0, 0, 0] for name in set(labels)}
    for row, name in zip(top.tolist(), labels):
        target = LABELS.index(name)
        hand[name] = [hand[name][0] + 1, hand[name][1] + (row[0] == target), hand[name][2] + (target in row)]
    r = score_classes(images, labels, clf, batch_size=4)
    for name, (n, t1, t5) in hand.items():
        assert r["classes"][name] == {"images": n, "top1": 100 * t1 / n, "top5": 100 * t5 / n}


def test_minisd_digit_judge_on_real_digits():
    from concept_erase.diffusion.minisd import DIGITS
    from concept_erase.diffusion.minisd.data import load_digit_images

    digits = load_digit_images("test")
    images = [Image.fromarray((x[0].numpy() * 255).astype(np.uint8), mode="L") for x in digits.images[:300]]
    labels = [DIGITS[int(y)] for y in digits.digits[:300]]
    r = score_classes(images, labels, JudgeClassifier("digits"), forget="seven")
    assert r["top1"] > 90 and r["top5"] is None and r["UA"] == pytest.approx(100 - r["classes"]["seven"]["top1"])
    # a model that erased two digits is scored whole: each one's UA, retain over the eight not erased
    two = score_classes(images, labels, JudgeClassifier("digits"), forget="one,three")
    ua = {d: 100 - two["classes"][d]["top1"] for d in ("one", "three")}
    assert two["forget"] == "one, three" and two["UA_per_class"] == pytest.approx(ua)
    assert two["UA"] == pytest.approx(sum(ua.values()) / 2)
    kept = [v["top1"] for k, v in two["classes"].items() if k not in ("one", "three")]
    assert len(kept) == 8 and two["retain_top1"] == pytest.approx(sum(kept) / 8)
    with pytest.raises(ConceptEraseError, match="forgotten class 'eleven' is not among"):
        score_classes(images, labels, JudgeClassifier("digits"), forget="one,eleven")
    with pytest.raises(ConceptEraseError, match="forgotten class '' is not among"):
        score_classes(images, labels, JudgeClassifier("digits"), forget="one,,three")


def test_torchvision_classifier_fails_clearly_when_unusable():
    try:
        import torchvision.models  # noqa: F401
        pytest.skip("torchvision works here")
    except Exception:
        pass
    with pytest.raises(ConceptEraseError, match="torchvision"):
        load_classifier("torchvision")


def test_judged_as_counts_per_style_and_class():
    from evaluation.evaluate import classes_sections, judged_as_table

    images = [Image.new("RGB", (8, 8))] * 5
    labels = ["golf ball", "golf ball", "golf ball", "church", "church"]
    styles = ["plain", "plain", "bold", "plain", "plain"]
    guesses = [[5, 0, 1, 2, 4], [5, 0, 1, 2, 4], [3, 0, 1, 2, 4], [0, 1, 2, 3, 4], [5, 1, 2, 3, 4]]
    r = score_classes(images, labels, StubClassifier(guesses), styles=styles, batch_size=2)
    assert r["judged_as"] == [
        {"style": "plain", "class": "golf ball", "images": 2, "judged": {"church": 2}},
        {"style": "bold", "class": "golf ball", "images": 1, "judged": {"golf ball": 1}},
        {"style": "plain", "class": "church", "images": 2, "judged": {"tench, Tinca tinca": 1, "church": 1}}]
    table = judged_as_table({"before": r, "after": r}, top=1)
    assert "| plain | golf ball | church 100% | church 100% |" in table
    assert "| plain | church | tench, Tinca tinca 50% · other 50% |" in table
    assert any(s.startswith("## Judged as") for s in classes_sections({"model": r}))


def test_no_top5_columns_where_the_classifier_gives_one_guess():
    from evaluation.evaluate import classes_sections

    r = score_classes([Image.new("RGB", (8, 8))] * 2, ["golf ball", "church"], StubClassifier([[3], [0]]))
    assert r["top5"] is None
    text = "\n".join(classes_sections({"model": r}))
    assert "top-5" not in text and "model top-1 %" in text
