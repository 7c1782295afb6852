"""`concept-erase evaluate nudity|classes|quality` and `concept-erase compare BEFORE AFTER [AFTER ...]`.

`evaluate` checks the scoring options, generates the prompt set's images into --output (resumable: run the
same command again after a kill), scores them on the main process and writes report.md, results.json,
chart.png and grid.png there.
Shard the generation with `accelerate launch --multi_gpu --num_processes N -m concept_erase evaluate ...`
(on a machine without CUDA this starts N gloo CPU processes). Heavy imports happen in the handlers.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field

from concept_erase.cli_args import add_flags, check_fields, values_from
from concept_erase.diffusion.models.families import family_field
from concept_erase.logs import finish, progress_field

from .generation import PRESETS, Protocol
from .thresholds import ATTACK_THRESHOLD, NUDENET_FLOOR, REPORT_THRESHOLD


def _describe_preset(name: str) -> str:
    """"paper = lms, 100 steps, guidance 7.5, 512 px": read from the preset, so the help cannot disagree."""
    p = PRESETS[name]
    sampler = "the model's scheduler" if p.scheduler == "model" else p.scheduler
    size = "native size" if p.resolution is None else f"{p.resolution} px"
    return f"{name} = {sampler}, {p.num_inference_steps} steps, guidance {p.guidance_scale:g}, {size}"


@dataclass
class EvaluationRun:
    """What `evaluate` generates from and where it writes. How images are sampled is `Protocol`."""

    model: str = field(metadata={
        "help": 'model: diffusers folder, .safetensors/.ckpt file, hub id, "minisd" or "minisd-xl". MiniSD(-XL), '
                'and every model whose model card says base_model: minisd(-xl), defaults to --protocol minisd and, '
                'for classes, --classifier minisd-digits; an SDXL model to --protocol sdxl'})
    prompts: str = field(metadata={
        "help": "prompt set: I2P / class / COCO CSV, a .txt file (one prompt per line) or a hub dataset id"})
    output: str = field(metadata={
        "help": "evaluation folder; an existing one is resumed (same protocol and model)", "aliases": ("--out",)})
    config: str | None = field(default=None, metadata={
        "help": "local diffusers folder with the configs of a single-file checkpoint"})
    family: str | None = family_field()
    protocol: str | None = field(default=None, metadata={
        "help": f"preset: {'; '.join(_describe_preset(name) for name in PRESETS)} (default: minisd for MiniSD "
                "and models erased from it, sdxl for SDXL, else paper at the model's native size)",
        "choices": tuple(sorted(PRESETS))})
    limit: int | None = field(default=None, metadata={"help": "only the first N rows of the prompt set", "min": 1})
    batch_size: int = field(default=8, metadata={"help": "images per generation batch", "min": 1})
    dtype: str | None = field(default=None, metadata={"help": "fp32 (default), fp16 or bf16 (CUDA only)"})
    device: str | None = field(default=None, metadata={
        "help": "torch device (default: this process's accelerate device)"})
    update_card: bool = field(default=False, metadata={
        "help": "also record the headline figures in --model's model card (README.md front matter, under "
                "evaluation.<kind>); --model must be a model folder with a card, e.g. an erase output"})
    progress: bool = progress_field()

    def __post_init__(self):
        check_fields(self)


@dataclass
class NudityScoring:
    threshold: float = field(default=REPORT_THRESHOLD, metadata={
        "help": f"NudeNet score threshold ({ATTACK_THRESHOLD} for attacks)", "min": NUDENET_FLOOR, "max": 1})
    nudenet_model: str | None = field(default=None, metadata={
        "help": "path to another NudeNet v3 ONNX model, e.g. 640m.onnx"})
    score_batch_size: int = field(default=16, metadata={"help": "images per NudeNet batch", "min": 1})

    def __post_init__(self):
        check_fields(self)


@dataclass
class ClassScoring:
    classifier: str | None = field(default=None, metadata={
        "help": 'transformers classifier folder or hub id, "torchvision" (ResNet-50, the paper\'s), "minisd-digits" '
                'or "minisd-styles" (default: minisd-digits for MiniSD and models erased from it, else microsoft/resnet-50)'})
    forget: str | None = field(default=None, metadata={
        "help": "the erased class (a prompt class name or its class index), or several separated by commas: "
                "UA = 100 - top-1 of each is reported, and retain over every class not erased"})
    score_batch_size: int = field(default=32, metadata={"help": "images per classifier batch", "min": 1})

    def __post_init__(self):
        check_fields(self)


@dataclass
class QualityScoring:
    reference: str | None = field(default=None, metadata={
        "help": "FID reference: the original model's evaluation folder on the same prompts, or an image folder"})
    clip_model: str | None = field(default=None, metadata={
        "help": "local CLIP folder (or hub id online) for the CLIP score"})
    fid_weights: str | None = field(default=None, metadata={
        "help": "torch-fidelity Inception weights file, for offline FID"})
    fid_size: int = field(default=299, metadata={"help": "resize images to this side before FID", "min": 1})
    score_batch_size: int = field(default=32, metadata={"help": "images per scoring batch", "min": 1})

    def __post_init__(self):
        check_fields(self)


SCORING = {"nudity": NudityScoring, "classes": ClassScoring, "quality": QualityScoring}


@dataclass
class Compare:
    before: str = field(metadata={"help": "evaluation folder of the original model", "positional": True})
    after: list[str] = field(metadata={
        "help": "evaluation folder(s) of the erased model(s), named by their folder when there are several",
        "positional": True})
    output: str = field(metadata={"help": "report folder (must not exist unless --overwrite)", "aliases": ("--out",)})
    overwrite: bool = field(default=False, metadata={"help": "replace files in --output"})


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    from prompts import prompt_set_names

    add_flags(p, EvaluationRun, help_override={"prompts": (
        "prompt set: I2P / class / COCO CSV, a .txt file (one prompt per line), a hub dataset id, or a set shipped "
        f"with concept-erase by name ({', '.join(prompt_set_names())})")})
    g = p.add_argument_group("generation protocol (docs/PROTOCOLS.md; each flag overrides the --protocol preset)")
    add_flags(g, Protocol, suppress_defaults=True)


def register(subparsers) -> None:
    ev = subparsers.add_parser("evaluate", help="generate a prompt set and score it (nudity, classes, quality)",
                               description="Generate (resumable, shardable) and score; writes a Markdown report.")
    kinds = ev.add_subparsers(dest="kind", metavar="KIND", required=True)
    helps = {"nudity": "NudeNet exposed-part counts on I2P-style prompts",
             "classes": "top-1/top-5 of the intended class on class prompts",
             "quality": "FID against a reference and CLIP score on generic prompts"}
    for kind, scoring in SCORING.items():
        p = kinds.add_parser(kind, help=helps[kind])
        _add_generation_args(p)
        add_flags(p.add_argument_group("scoring"), scoring)
        p.set_defaults(func=_evaluate)

    cmp = subparsers.add_parser("compare", help="before/after report from evaluation folders (a base and one or "
                                                "more erased models)",
                                description="Tables, a before/after bar chart and a grid of matched seeds, the "
                                            "erased concept first.")
    add_flags(cmp, Compare)
    cmp.set_defaults(func=_compare)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """`default_choices`, and the line saying what it chose printed."""
    from concept_erase.logs import announce

    chosen = default_choices(args)
    if chosen:
        announce(chosen)
    return args


def default_choices(args: argparse.Namespace) -> str | None:
    """Fill what the user left out from the model's own defaults (`concept_erase.diffusion.models.defaults`): an
    erased MiniSD is evaluated as MiniSD (its protocol and digit judge), any other model with the paper's
    protocol at its native size and an ImageNet classifier. Returns the line saying what it chose (None: nothing),
    for the caller to `announce` once the checks that need no torch have passed (announcing asks accelerate
    which process speaks, which imports torch); refuses a resolution that cannot suit the model (the paper's
    512 px on 16 px MiniSD)."""
    from concept_erase.diffusion.models.defaults import check_resolution, model_defaults

    defaults = model_defaults(args.model, args.config)
    chosen = []
    if not hasattr(args, "resolution"):  # protocol flags the user did not type are absent (suppressed)
        args.resolution = None
    if args.protocol is None:
        args.protocol = defaults.protocol
        chosen.append(f"--protocol {args.protocol}")
        preset = PRESETS[args.protocol].resolution
        native = defaults.native_resolution
        if args.resolution is None and preset is not None and native is not None and preset != native:
            args.resolution = native  # e.g. SDXL's 1024 px rather than the paper's SD 1.x 512 px
            chosen.append(f"--resolution {native} (the model's size)")
    if getattr(args, "classifier", "") is None:
        args.classifier = defaults.classifier
        chosen.append(f"--classifier {args.classifier}")
    resolution = args.resolution if args.resolution is not None else PRESETS[args.protocol].resolution
    check_resolution(resolution, defaults, "--resolution" if args.resolution is not None
                     else f"--protocol {args.protocol}'s resolution")
    return defaults.describe(*chosen) if chosen else None


def check_scoring(args: argparse.Namespace, prompt_kind: str, rows: list, samples: int) -> None:
    """The scoring options checked by the functions that score (the detector, the classifier, the FID features
    loaded; after `check_scoring_flags`), before generating (with the paper's protocol, hours of it): a bad one
    stops the command before --output is created."""
    from concept_erase.errors import ConceptEraseError

    if args.kind == "nudity":
        from .nudity import load_detector

        load_detector(args.nudenet_model)  # cached: scoring reuses it
    elif args.kind == "classes":
        from .classes import load_classifier, prompt_classes

        if prompt_kind != "classes":
            raise ConceptEraseError(f"prompt set {args.prompts!r} has no class column (class or label_str): "
                                    "a class evaluation needs one")
        labels = load_classifier(args.classifier).labels
        prompt_classes([r.label for r in rows], labels, targets=[r.target for r in rows], forget=args.forget)
    elif args.reference is not None:
        from .evaluate import reference_images
        from .quality import make_fid

        reference_images(args.reference, {(r.index, s) for r in rows for s in range(samples)})
        make_fid(weights_path=args.fid_weights)  # Inception (and its weights) usable here, not hours later


def check_scoring_flags(args: argparse.Namespace) -> None:
    """The scoring options checked from the flags and the files they name alone, before torch loads: the
    numbers' bounds, a NudeNet file that is no ONNX model, a missing CLIP folder or Inception weights file."""
    from concept_erase.errors import ConceptEraseError

    from .model_files import check_fid_weights, check_onnx_model, clip_folder

    SCORING[args.kind](**values_from(args, SCORING[args.kind]))  # the numbers' bounds
    if args.kind == "nudity" and args.nudenet_model is not None:
        check_onnx_model(args.nudenet_model)
    elif args.kind == "quality":
        if args.reference is None and args.clip_model is None:
            raise ConceptEraseError("quality needs --reference (for FID) and/or --clip-model (for CLIP score)")
        if args.fid_weights is not None and args.reference is None:
            raise ConceptEraseError(f"--fid-weights {args.fid_weights!r} is used only with --reference (FID)")
        if args.fid_weights is not None:
            check_fid_weights(args.fid_weights)
        if args.clip_model is not None:
            clip_folder(args.clip_model)


def check_destinations(args: argparse.Namespace) -> None:
    """--output (an existing folder is resumed, so it must be writable inside) and, with --update-card, the
    model's card: checked before anything is read or generated."""
    from pathlib import Path

    from concept_erase.io_utils import check_writable

    check_writable(args.output, flag="--output", into=True)
    if args.update_card and Path(args.model).is_dir():
        check_writable(Path(args.model) / "README.md", overwrite=True, kind="file", flag="--update-card")


def _evaluate(args: argparse.Namespace) -> int:
    from concept_erase.diffusion.data.generate import check_sampling
    from concept_erase.diffusion.models.facts import model_facts
    from concept_erase.logs import announce

    from .generation import make_protocol
    from .prompts import read_prompts

    EvaluationRun(**values_from(args, EvaluationRun))  # required flags and bounds, before anything runs
    check_destinations(args)
    # what needs no torch first (the prompt set, the defaults, the protocol's numbers, the scoring flags and
    # files), so that a bad input is refused at once; then torch, the scorers' own checks and the model
    prompt_kind, rows = read_prompts(args.prompts, limit=args.limit)
    check_scoring_flags(args)
    chosen = default_choices(args)
    protocol = make_protocol(args.protocol, **values_from(args, Protocol))  # only the flags the user typed
    check_sampling(model_facts(args.model, args.config), protocol.num_inference_steps, protocol.resolution,
                   protocol.resolution, size_flags=("--resolution", "--resolution"))  # from its config files
    if chosen:
        announce(chosen)
    check_scoring(args, prompt_kind, rows, protocol.samples_per_prompt)  # in every process: none is left waiting
    if args.update_card:
        from concept_erase.diffusion.models.card import read_model_card

        read_model_card(args.model)  # a folder with a card, or a one-line error now rather than after scoring
    from concept_erase.runtime import process_state

    from . import evaluate

    entries = evaluate.generate_for_evaluation(
        args.model, args.prompts, args.output, protocol, rows=rows, batch_size=args.batch_size,
        config=args.config, family=args.family, dtype=args.dtype, device=args.device, progress=args.progress,
    )  # score exactly these: a folder may hold more from an earlier run without --limit
    if not process_state().is_main_process:
        return 0
    if args.kind == "nudity":
        results = evaluate.evaluate_nudity(args.output, threshold=args.threshold, nudenet_model=args.nudenet_model,
                                           batch_size=args.score_batch_size, entries=entries)
        headline = f"{results['result']['total_exposed']} exposed parts, {results['result']['share_any']:.2f}% of images"
    elif args.kind == "classes":
        results = evaluate.evaluate_classes(args.output, classifier=args.classifier, forget=args.forget,
                                            batch_size=args.score_batch_size, entries=entries)
        r = results["result"]
        headline = f"mean top-1 {r['top1']:.2f}%" + (f", UA {r['UA']:.2f}%" if "UA" in r else "")
    else:
        results = evaluate.evaluate_quality(args.output, reference=args.reference, clip_model=args.clip_model,
                                            fid_weights=args.fid_weights, size=args.fid_size,
                                            batch_size=args.score_batch_size, entries=entries)
        headline = f"FID {results['result']['fid']}, CLIP score {results['result']['clip_score']}"
    lines = [f"{args.kind}: {headline}",
             f"wrote {args.output}/: report.md, results.json (the result as JSON), chart.png, grid.png"]
    if args.update_card:
        from concept_erase.diffusion.models.card import add_evaluation_to_card

        add_evaluation_to_card(args.model, args.kind, evaluate.card_summary(results))
        lines.append(f"model card updated: {args.model}/README.md")
    finish(args, lines, results, next_command=f"concept-erase compare BASE_EVALUATION {shlex.quote(args.output)} "
                                              "--output COMPARISON  (BASE_EVALUATION: the same evaluation of the "
                                              "model before erasure)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from concept_erase.io_utils import check_writable

    from .evaluate import compare

    job = Compare(**values_from(args, Compare))
    check_writable(job.output, job.overwrite, flag="--output")  # before reading the folders of images
    summary = compare([job.before, *job.after], job.output, overwrite=job.overwrite)
    for warning in summary["warnings"]:  # also in the report, but a before/after table must not mislead quietly
        print(f"concept-erase: warning: {warning}", file=sys.stderr)
    finish(args, f"wrote {job.output}/: report.md (the before/after tables), its chart and grid", summary)
    return 0
