"""Classifier accuracy on class prompts (docs/PROTOCOLS.md): "did the erased class stop appearing?"

A classifier turns images into top-k class indices over its own label list. Three kinds:
- `TransformersClassifier`: any transformers image classifier folder (default ResNet-50,
  "microsoft/resnet-50" when available locally);
- `TorchvisionResNet50`: the paper's protocol (torchvision ResNet-50, DEFAULT weights), when torchvision
  is installed (it is not by default: it breaks beside torch 2.13 CPU, docs/DEPENDENCIES.md);
- `JudgeClassifier`: MiniSD's digit or style judge (top-1 only).

`ClassAccuracy` is a sum-reduced metric: per prompt class, images, top-1 hits and top-5 hits. The forgotten
class's unlearning accuracy is UA = 100 - top-1; the other classes' top-1 is the retain accuracy.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torchmetrics import Metric

from concept_erase.errors import ConceptEraseError

from .model_files import local_folder


def load_image_processor(path: str | Path):
    """The image processor saved in `path`, PIL backend. transformers 5's AutoImageProcessor refuses to
    work without torchvision, so the class is picked from preprocessor_config.json ("<Type>Pil" first)."""
    import transformers

    config_file = Path(path) / "preprocessor_config.json"
    if not config_file.is_file():
        raise ConceptEraseError(f"{str(path)!r} has no preprocessor_config.json")
    name = json.loads(config_file.read_text())["image_processor_type"].removesuffix("Fast")
    cls = getattr(transformers, name.removesuffix("Pil") + "Pil", None) or getattr(transformers, name, None)
    if cls is None:
        raise ConceptEraseError(f"unknown image processor type {name!r} in {str(config_file)!r}")
    return cls.from_pretrained(str(path))


def match_label(name: str, labels: Sequence[str]) -> int:
    """The index of class `name` among a classifier's labels: a label or one of its comma-separated
    synonyms ("tench, Tinca tinca"), case-insensitive, or a bare integer index. A name several labels share
    (ImageNet's "crane" is 134 and 517) is an error naming them: first-match would pick one silently."""
    wanted = name.strip().lower()
    if wanted.isdigit() and int(wanted) < len(labels):
        return int(wanted)
    hits = [i for i, label in enumerate(labels)
            if wanted == label.lower() or wanted in (s.strip().lower() for s in label.split(","))]
    if len(hits) > 1:
        candidates = ", ".join(f"{i} ({labels[i]!r})" for i in hits)
        raise ConceptEraseError(f"class {name!r} matches several classifier labels: {candidates}; "
                                "give the class index (a label_idx column)")
    if not hits:
        raise ConceptEraseError(f"class {name!r} is not one of the classifier's {len(labels)} labels")
    return hits[0]


@dataclass
class PromptClasses:
    """A prompt set's classes resolved against a classifier's labels (see `prompt_classes`)."""

    names: list[str]  # per class: its first prompt label, plus " (index)" where two classes share it
    targets: list[int]  # per image: the classifier index it should get
    groups: list[int]  # per image: its class's position in `names`
    forget: list[str]  # the names of the forgotten classes (one per erased concept; empty: none)


def prompt_classes(labels: Sequence[str], classifier_labels: Sequence[str], *,
                   targets: Sequence[int | None] | None = None, forget: str | None = None) -> PromptClasses:
    """Resolve each image's intended class: the prompt set's class index (`targets[i]`, from label_idx)
    where given, else its name matched by `match_label`. Classes are grouped by that index, so "tench" and
    "Tinca tinca" rows are one class and ImageNet's two "crane"s are two. `forget` names the erased classes:
    a class name, one of its prompt labels or its index, or several of them separated by commas (a model that
    erased several concepts). Needs no images: the CLI runs it before generating."""
    targets = [None] * len(labels) if targets is None else list(targets)
    if len(targets) != len(labels):
        raise ConceptEraseError(f"{len(targets)} class indices for {len(labels)} labels")
    n = len(classifier_labels)
    index = {}
    for name, target in dict.fromkeys(zip(labels, targets)):  # each distinct pair once: 4,703 rows, 1,000 labels
        if target is not None and not 0 <= target < n:
            raise ConceptEraseError(f"class index {target} of {name!r} is out of range for the classifier's {n} labels")
        index[name, target] = match_label(name, classifier_labels) if target is None else target
    resolved = [index[pair] for pair in zip(labels, targets)]
    first: dict[int, str] = {}  # class index -> its first prompt label, in order of appearance
    aliases: dict[int, set[str]] = {}
    for name, target in zip(labels, resolved):
        first.setdefault(target, name)
        aliases.setdefault(target, {str(target)}).add(name.strip().lower())
    shared = Counter(first.values())
    names = [name if shared[name] == 1 else f"{name} ({target})" for target, name in first.items()]
    position = {target: g for g, target in enumerate(first)}
    def find(wanted: str) -> list[int]:
        wanted = wanted.strip().lower()
        return [g for g, target in enumerate(first) if wanted == names[g].lower() or wanted in aliases[target]]

    forgotten = []
    if forget is not None:
        # one class whose name has a comma, else a comma-separated list of classes
        for item in [forget] if find(forget) or "," not in forget else forget.split(","):
            hits = find(item)
            if not item.strip() or not hits:
                raise ConceptEraseError(f"forgotten class {item.strip()!r} is not among the prompt classes "
                                        f"({', '.join(names)})")
            if len(hits) > 1:
                raise ConceptEraseError(f"forgotten class {item.strip()!r} matches several prompt classes "
                                        f"({', '.join(names[g] for g in hits)}); give its class index")
            forgotten.append(names[hits[0]])
    return PromptClasses(names, resolved, [position[t] for t in resolved], list(dict.fromkeys(forgotten)))


class TransformersClassifier:
    """A transformers `AutoModelForImageClassification` with its image processor."""

    def __init__(self, model, processor, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = torch.device(device)
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "TransformersClassifier":
        from transformers import AutoModelForImageClassification

        if not Path(path).is_dir():
            raise ConceptEraseError(f"classifier folder {str(path)!r} does not exist (offline: give a local folder)")
        return cls(AutoModelForImageClassification.from_pretrained(str(path)), load_image_processor(path), device)

    @torch.no_grad()
    def topk(self, images: Sequence, k: int = 5) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        logits = self.model(pixel_values=pixels.to(self.device)).logits
        return logits.topk(min(k, logits.shape[-1]), dim=-1).indices.cpu()


class TorchvisionResNet50:
    """torchvision's ResNet-50 with DEFAULT (IMAGENET1K_V2) weights and their transforms: the paper's."""

    def __init__(self, device: str | torch.device = "cpu"):
        try:
            from torchvision.models import ResNet50_Weights, resnet50
        except Exception as err:  # ImportError, or torchvision's "operator torchvision::nms does not exist"
            raise ConceptEraseError(
                f"torchvision is not usable here ({type(err).__name__}); install a torchvision matching torch "
                "(e.g. torch==2.14.1 torchvision==0.29.1) or use --classifier with a transformers folder"
            ) from None
        weights = ResNet50_Weights.DEFAULT
        try:
            self.model = resnet50(weights=weights).eval().to(device)
        except Exception as err:  # weights not in the torch hub cache and no network
            raise ConceptEraseError(f"cannot load torchvision ResNet-50 weights offline ({type(err).__name__})") from None
        self.transform = weights.transforms()
        self.labels = list(weights.meta["categories"])
        self.device = torch.device(device)

    @torch.no_grad()
    def topk(self, images: Sequence, k: int = 5) -> torch.Tensor:
        x = torch.stack([self.transform(im.convert("RGB")) for im in images]).to(self.device)
        return self.model(x).topk(k, dim=-1).indices.cpu()


class JudgeClassifier:
    """MiniSD's judges as a classifier: labels DIGITS or STYLES, top-1 only (they return hard labels)."""

    def __init__(self, kind: str = "digits", judges=None):
        from concept_erase.diffusion.minisd import DIGITS, STYLES

        if kind not in ("digits", "styles"):
            raise ConceptEraseError(f"MiniSD judge kind must be 'digits' or 'styles', got {kind!r}")
        if judges is None:
            from concept_erase.diffusion.minisd.judge import load_judges

            judges = load_judges()
        self.judges, self.kind = judges, kind
        self.labels = list(DIGITS if kind == "digits" else STYLES)

    def topk(self, images: Sequence, k: int = 5) -> torch.Tensor:
        predict = self.judges.predict_digits if self.kind == "digits" else self.judges.predict_styles
        return torch.as_tensor(predict(list(images))).long().reshape(-1, 1)


def load_classifier(name: str, device: str | torch.device = "cpu"):
    """"torchvision" | "minisd-digits" | "minisd-styles" | a transformers classifier folder."""
    if name == "torchvision":
        return TorchvisionResNet50(device)
    if name in ("minisd-digits", "minisd-styles"):
        return JudgeClassifier(name.split("-")[1])
    try:
        return TransformersClassifier.from_pretrained(local_folder(name), device)
    except ConceptEraseError as err:  # e.g. the default ImageNet classifier, offline and not cached
        raise ConceptEraseError(f"{err}; --classifier takes a transformers image-classifier folder, a cached hub "
                                "id, 'torchvision', 'minisd-digits' or 'minisd-styles'") from None


class ClassAccuracy(Metric):
    """Per prompt class: images, top-1 hits, top-5 hits, and what the classifier judged each image to be
    (top-1 label counts per (style, class) row; sum-reduced, so shards merge).

    update(topk, targets, groups, rows): topk [N, k] classifier indices, targets [N] the intended classifier
    index, groups [N] the position of each image's class in `class_names`, rows [N] its position in
    `judged_rows` ((style or None, class name) pairs; default: one row per class).
    """

    full_state_update = False

    def __init__(self, class_names: Sequence[str], forget: str | Sequence[str] | None = None, *,
                 labels: Sequence[str] = (), judged_rows: Sequence[tuple[str | None, str]] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.class_names = list(class_names)
        self.forget = [forget] if isinstance(forget, str) else list(forget or [])
        for name in self.forget:
            if name not in self.class_names:
                raise ConceptEraseError(f"forgotten class {name!r} is not among the prompt classes "
                                        f"({', '.join(self.class_names)})")
        self.labels = list(labels)
        self.judged_rows = list(judged_rows) if judged_rows is not None else [(None, c) for c in self.class_names]
        n = len(self.class_names)
        for name in ("images", "top1", "top5"):
            self.add_state(name, torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        # images scored with fewer than 5 guesses (MiniSD judges): top-5 is then not reported
        self.add_state("short_k", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("judged", torch.zeros(len(self.judged_rows), max(1, len(self.labels)), dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, topk: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor,
               rows: torch.Tensor | None = None) -> None:
        topk, targets, groups = topk.long().cpu(), targets.long().cpu(), groups.long().cpu()
        hits = topk == targets[:, None]
        n = len(self.class_names)
        self.images += torch.bincount(groups, minlength=n)
        self.top1 += torch.bincount(groups, weights=hits[:, 0].double(), minlength=n).long()
        self.top5 += torch.bincount(groups, weights=hits[:, :5].any(1).double(), minlength=n).long()
        if topk.shape[1] < 5:
            self.short_k += len(groups)
        if self.labels:
            rows = groups if rows is None else rows.long().cpu()
            self.judged.index_put_((rows, topk[:, 0]), torch.ones(len(rows), dtype=torch.long), accumulate=True)

    def compute(self) -> dict:
        """{"classes": {name: {"images", "top1", "top5"}}, "top1", "top5" (mean over classes, %; top-5 None
        where the classifier gives fewer than 5 guesses), with forgotten classes: "forget" (their names, joined
        by ", "), "UA" = 100 - their mean top-1, "UA_per_class" (each one's), "retain_top1" = mean top-1 of
        every class not erased; with `labels`: "judged_as", one entry per (style,
        class) row: {"style", "class", "images", "judged": {label: images}} (most frequent first)."""
        has_top5 = int(self.short_k) == 0
        per = {}
        for i, name in enumerate(self.class_names):
            n = int(self.images[i])
            if n:
                per[name] = {"images": n, "top1": 100.0 * int(self.top1[i]) / n,
                             "top5": 100.0 * int(self.top5[i]) / n if has_top5 else None}
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        result = {"classes": per, "top1": mean([v["top1"] for v in per.values()]),
                  "top5": mean([v["top5"] for v in per.values()]) if has_top5 else None}
        forgotten = [name for name in self.forget if name in per]
        if forgotten:
            result["forget"] = ", ".join(forgotten)
            result["UA_per_class"] = {name: 100.0 - per[name]["top1"] for name in forgotten}
            result["UA"] = mean(list(result["UA_per_class"].values()))
            result["retain_top1"] = mean([v["top1"] for k, v in per.items() if k not in forgotten])
        if self.labels:
            result["judged_as"] = []
            for (style, name), counts in zip(self.judged_rows, self.judged.tolist()):
                if sum(counts):
                    order = sorted((c, -j) for j, c in enumerate(counts) if c)[::-1]
                    result["judged_as"].append({"style": style, "class": name, "images": sum(counts),
                                                "judged": {self.labels[-j]: c for c, j in order}})
        return result


def score_classes(images: Sequence, labels: Sequence[str], classifier, *, targets: Sequence[int | None] | None = None,
                  forget: str | None = None, batch_size: int = 32, styles: Sequence[str | None] | None = None) -> dict:
    """Top-1/top-5 of the intended class of every image (`labels[i]`, or the class index `targets[i]`
    where the prompt set has one), and what each (style, class) was judged as; see `prompt_classes` and
    `ClassAccuracy.compute`."""
    if len(images) != len(labels):
        raise ConceptEraseError(f"{len(labels)} labels for {len(images)} images")
    classes = prompt_classes(labels, classifier.labels, targets=targets, forget=forget)
    styles = list(styles) if styles is not None else [None] * len(labels)
    keys = [(style, classes.names[g]) for style, g in zip(styles, classes.groups)]
    judged_rows = list(dict.fromkeys(keys))
    rows = torch.tensor([judged_rows.index(k) for k in keys])
    targets_t, groups = torch.tensor(classes.targets), torch.tensor(classes.groups)
    metric = ClassAccuracy(classes.names, classes.forget, labels=classifier.labels, judged_rows=judged_rows,
                           sync_on_compute=False)  # all images are here: no gather
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        metric.update(classifier.topk(images[sl], k=5), targets_t[sl], groups[sl], rows[sl])
    return metric.compute()
