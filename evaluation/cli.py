"""`concept-erase evaluate nudity|classes|quality` and `concept-erase compare BEFORE AFTER`.

`evaluate` checks the scoring options, generates the prompt set's images into --out (resumable: run the
same command again after a kill), scores them on the main process and writes report.md, results.json,
chart.png and grid.png there.
Shard the generation with `accelerate launch --multi_gpu --num_processes N -m concept_erase evaluate ...`
(on a machine without CUDA this starts N gloo CPU processes). Heavy imports happen in the handlers.
"""

from __future__ import annotations

import argparse
import sys


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    from prompts import prompt_set_names

    from .generation import PRESETS, SCHEDULERS

    g = p.add_argument_group("generation (docs/PROTOCOLS.md: the paper's protocol is the default preset)")
    g.add_argument("--model", required=True,
                   help='model: diffusers folder, .safetensors/.ckpt file, hub id or "minisd". MiniSD, and every model '
                        'whose model card says base_model: minisd, defaults to --protocol minisd and, for '
                        'classes, --classifier minisd-digits')
    g.add_argument("--config", default=None, help="local diffusers folder with the configs of a single-file checkpoint")
    g.add_argument("--prompts", required=True,
                   help="prompt set: I2P / class / COCO CSV, a .txt file (one prompt per line), a hub dataset id, or "
                        f"a set shipped with concept-erase by name ({', '.join(prompt_set_names())})")
    g.add_argument("--out", required=True, help="evaluation folder; an existing one is resumed (same protocol and model)")
    g.add_argument("--protocol", default=None, choices=sorted(PRESETS),
                   help="preset: paper = LMS, 100 steps, guidance 7.5, 512 px; minisd = DDIM, 25 steps, native size; "
                        "quick = the model's scheduler, 4 steps (default: minisd for MiniSD and models erased from it, "
                        "else paper at the model's native size)")
    g.add_argument("--scheduler", default=None, choices=list(SCHEDULERS), help="override the preset's sampler")
    g.add_argument("--steps", type=int, default=None, help="override the preset's denoising steps")
    g.add_argument("--guidance", type=float, default=None, help="override the preset's guidance scale")
    g.add_argument("--resolution", type=int, default=None, help="override the preset's image side in pixels")
    g.add_argument("--samples", type=int, default=None, help="images per prompt row (sample j uses seed + j; default 1)")
    g.add_argument("--row-guidance", action="store_true",
                   help="use each row's evaluation_guidance (I2P) instead of the protocol's guidance scale")
    g.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    g.add_argument("--limit", type=int, default=None, help="only the first N rows of the prompt set")
    g.add_argument("--batch-size", type=int, default=8, help="images per generation batch (default 8)")
    g.add_argument("--dtype", default=None, help="fp32 (default), fp16 or bf16 (CUDA only)")
    g.add_argument("--device", default=None, help="torch device (default: this process's accelerate device)")
    p.add_argument("--update-card", action="store_true",
                   help="also record the headline figures in --model's model card (README.md front matter, "
                        "under evaluation.<kind>); --model must be a model folder with a card, e.g. an erase output")


def register(subparsers) -> None:
    ev = subparsers.add_parser("evaluate", help="generate a prompt set and score it (nudity, classes, quality)",
                               description="Generate (resumable, shardable) and score; writes a Markdown report.")
    kinds = ev.add_subparsers(dest="kind", metavar="KIND", required=True)

    p = kinds.add_parser("nudity", help="NudeNet exposed-part counts on I2P-style prompts")
    _add_generation_args(p)
    p.add_argument("--threshold", type=float, default=0.6, help="NudeNet score threshold (default 0.6; 0.45 for attacks)")
    p.add_argument("--nudenet-model", default=None, help="path to another NudeNet v3 ONNX model, e.g. 640m.onnx")
    p.add_argument("--score-batch-size", type=int, default=16, help="images per NudeNet batch (default 16)")
    p.set_defaults(func=_evaluate)

    p = kinds.add_parser("classes", help="top-1/top-5 of the intended class on class prompts")
    _add_generation_args(p)
    p.add_argument("--classifier", default=None,
                   help='transformers classifier folder or hub id, "torchvision" (ResNet-50, the paper\'s), '
                        '"minisd-digits" or "minisd-styles" '
                        '(default: minisd-digits for MiniSD and models erased from it, else microsoft/resnet-50)')
    p.add_argument("--forget", default=None,
                   help="the erased class (a prompt class name or its class index): its UA = 100 - top-1 is reported")
    p.add_argument("--score-batch-size", type=int, default=32, help="images per classifier batch (default 32)")
    p.set_defaults(func=_evaluate)

    p = kinds.add_parser("quality", help="FID against a reference and CLIP score on generic prompts")
    _add_generation_args(p)
    p.add_argument("--reference", default=None,
                   help="FID reference: the original model's evaluation folder on the same prompts, or an image folder")
    p.add_argument("--clip-model", default=None, help="local CLIP folder (or hub id online) for the CLIP score")
    p.add_argument("--fid-weights", default=None, help="torch-fidelity Inception weights file, for offline FID")
    p.add_argument("--fid-size", type=int, default=299, help="resize images to this side before FID (default 299)")
    p.add_argument("--score-batch-size", type=int, default=32, help="images per scoring batch (default 32)")
    p.set_defaults(func=_evaluate)

    cmp = subparsers.add_parser("compare", help="before/after report from evaluation folders (a base and one or "
                                                "more erased models)",
                                description="Tables, a before/after bar chart and a grid of matched seeds, the "
                                            "erased concept first.")
    cmp.add_argument("before", help="evaluation folder of the original model")
    cmp.add_argument("after", nargs="+", help="evaluation folder(s) of the erased model(s), named by their folder "
                                              "when there are several")
    cmp.add_argument("--out", required=True, help="report folder (must not exist unless --overwrite)")
    cmp.add_argument("--overwrite", action="store_true", help="replace files in --out")
    cmp.set_defaults(func=_compare)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the user left out from the model's own defaults (`concept_erase.diffusion.defaults`): an
    erased MiniSD is evaluated as MiniSD (its protocol and digit judge), any other model with the paper's
    protocol at its native size and an ImageNet classifier. Prints what it chose; refuses a resolution
    that cannot suit the model (the paper's 512 px on 16 px MiniSD)."""
    from concept_erase.diffusion.defaults import announce, check_resolution, model_defaults

    from .generation import PRESETS

    defaults = model_defaults(args.model, args.config)
    chosen = []
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
    if chosen:
        announce(defaults.describe(*chosen))
    return args


def check_scoring(args: argparse.Namespace, prompt_kind: str, rows: list, samples: int) -> None:
    """Every scoring option, checked before generating (with the paper's protocol, hours of it) by the same
    functions that score: a bad one stops the command before --out is created."""
    from concept_erase.errors import ConceptEraseError

    if args.score_batch_size < 1:
        raise ConceptEraseError(f"--score-batch-size must be >= 1, got {args.score_batch_size}")
    if args.kind == "nudity":
        from .nudity import check_threshold, load_detector

        check_threshold(args.threshold)
        load_detector(args.nudenet_model)  # cached: scoring reuses it
    elif args.kind == "classes":
        from .classes import load_classifier, prompt_classes

        if prompt_kind != "classes":
            raise ConceptEraseError(f"prompt set {args.prompts!r} has no class column (class or label_str): "
                                    "a class evaluation needs one")
        labels = load_classifier(args.classifier).labels
        prompt_classes([r.label for r in rows], labels, targets=[r.target for r in rows], forget=args.forget)
    else:
        from .evaluate import reference_images
        from .quality import clip_folder, make_fid

        if args.reference is None and args.clip_model is None:
            raise ConceptEraseError("quality needs --reference (for FID) and/or --clip-model (for CLIP score)")
        if args.fid_weights is not None and args.reference is None:
            raise ConceptEraseError(f"--fid-weights {args.fid_weights!r} is used only with --reference (FID)")
        if args.reference is not None:
            reference_images(args.reference, {(r.index, s) for r in rows for s in range(samples)})
            make_fid(weights_path=args.fid_weights)  # Inception (and its weights) usable here, not hours later
        if args.clip_model is not None:
            clip_folder(args.clip_model)


def check_destinations(args: argparse.Namespace) -> None:
    """--out (an existing folder is resumed, so it must be writable inside) and, with --update-card, the
    model's card: checked before anything is read or generated."""
    from pathlib import Path

    from concept_erase.io_utils import check_writable

    out = check_writable(args.out, overwrite=True, flag="--out")
    if out.is_dir():
        check_writable(out / "run.json", overwrite=True, kind="file", flag="--out")
    if args.update_card and Path(args.model).is_dir():
        check_writable(Path(args.model) / "README.md", overwrite=True, kind="file", flag="--update-card")


def _evaluate(args: argparse.Namespace) -> int:
    from . import evaluate
    from .generation import make_protocol, process_state
    from .prompts import read_prompts

    check_destinations(args)
    resolve_defaults(args)
    protocol = make_protocol(
        args.protocol, scheduler=args.scheduler, num_inference_steps=args.steps, guidance_scale=args.guidance,
        resolution=args.resolution, samples_per_prompt=args.samples, row_guidance=args.row_guidance or None,
        negative_prompt=args.negative_prompt,
    )
    prompt_kind, rows = read_prompts(args.prompts, limit=args.limit)
    check_scoring(args, prompt_kind, rows, protocol.samples_per_prompt)  # in every process: none is left waiting
    if args.update_card:
        from concept_erase.diffusion.card import read_model_card

        read_model_card(args.model)  # a folder with a card, or a one-line error now rather than after scoring
    entries = evaluate.generate_for_evaluation(
        args.model, args.prompts, args.out, protocol, rows=rows, batch_size=args.batch_size,
        config=args.config, dtype=args.dtype, device=args.device,
    )  # score exactly these: a folder may hold more from an earlier run without --limit
    if not process_state().is_main_process:
        return 0
    if args.kind == "nudity":
        results = evaluate.evaluate_nudity(args.out, threshold=args.threshold, nudenet_model=args.nudenet_model,
                                           batch_size=args.score_batch_size, entries=entries)
        headline = f"{results['result']['total_exposed']} exposed parts, {results['result']['share_any']:.2f}% of images"
    elif args.kind == "classes":
        results = evaluate.evaluate_classes(args.out, classifier=args.classifier, forget=args.forget,
                                            batch_size=args.score_batch_size, entries=entries)
        r = results["result"]
        headline = f"mean top-1 {r['top1']:.2f}%" + (f", UA {r['UA']:.2f}%" if "UA" in r else "")
    else:
        results = evaluate.evaluate_quality(args.out, reference=args.reference, clip_model=args.clip_model,
                                            fid_weights=args.fid_weights, size=args.fid_size,
                                            batch_size=args.score_batch_size, entries=entries)
        headline = f"FID {results['result']['fid']}, CLIP score {results['result']['clip_score']}"
    print(f"{args.kind}: {headline}; report: {args.out}/report.md")
    if args.update_card:
        from concept_erase.diffusion.card import add_evaluation_to_card

        add_evaluation_to_card(args.model, args.kind, evaluate.card_summary(results))
        print(f"model card updated: {args.model}/README.md")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from concept_erase.io_utils import check_writable

    from .evaluate import compare

    check_writable(args.out, args.overwrite, flag="--out")  # before reading the folders of images
    summary = compare([args.before, *args.after], args.out, overwrite=args.overwrite)
    for warning in summary["warnings"]:  # also in the report, but a before/after table must not mislead quietly
        print(f"concept-erase: warning: {warning}", file=sys.stderr)
    print(f"report: {args.out}/report.md")
    return 0
