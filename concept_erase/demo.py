"""`make demo` / `concept-erase demo`: erase the digit "seven" from MiniSD with SalUn, on a CPU, in minutes.

1. Load MiniSD (packaged, offline) and the digit/style judges.
2. Generate 48 images of "seven" (plain, bold, negative) and 216 of the other nine digits with MiniSD itself.
3. Saliency mask (top 50% of UNet weights by |grad| of the forget loss, docs/ALGORITHMS.md 1).
4. SalUn: each "seven" prompt is steered to "eight" in the same style; the retain loss keeps the others.
5. Judge 10 images per (digit, style) before and after on the SAME seeds; print the table; write
   `outputs/demo/` (replaced on each run): report.md, grid.png (before/after, same seeds), summary.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cli_args import add_flags, check_fields, values_from
from .errors import ConceptEraseError
from .io_utils import atomic_dir, check_writable
from .runtime import cache_root


@dataclass
class DemoConfig:
    digit: str = field(default="seven", metadata={"help": "the digit to erase"})
    surrogate: str | None = field(default=None, metadata={"help": "the digit it becomes (default: the next one)"})
    steps: int = field(default=50, metadata={"help": "SalUn optimizer steps", "min": 1})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate", "above": 0})
    batch_size: int = field(default=16, metadata={"help": "forget (and retain) images per step", "min": 1})
    alpha: float = field(default=0.5, metadata={"help": "retain-loss weight", "min": 0})
    keep: float = field(default=0.5, metadata={
        "help": "fraction of UNet weights the mask leaves trainable", "above": 0, "max": 1})
    num_forget: int = field(default=48, metadata={
        "help": "generated forget images (spread over the 3 styles)", "min": 1,
        "flag": "num-forget-images", "aliases": ("--num-forget",)})
    num_retain: int = field(default=216, metadata={
        "help": "generated retain images (the other 9 digits x 3 styles)", "min": 1,
        "flag": "num-retain-images", "aliases": ("--num-retain",)})
    eval_seeds: int = field(default=10, metadata={
        "help": "judged images per (digit, style), same seeds before/after", "min": 1})
    seed: int = field(default=0, metadata={
        "help": "seed of the training images, mask noise and training draws", "seed": True})

    def __post_init__(self):
        from .diffusion.minisd import DIGITS

        if self.digit not in DIGITS:
            raise ConceptEraseError(f"unknown digit {self.digit!r}; choose one of {', '.join(DIGITS)}")
        if self.surrogate is not None and (self.surrogate not in DIGITS or self.surrogate == self.digit):
            raise ConceptEraseError(f"bad surrogate digit {self.surrogate!r} (another of {', '.join(DIGITS)})")
        check_fields(self)


def erase_demo(config: DemoConfig, pipe=None, progress: bool = False):
    """Run the demo's erasure in memory. Returns (erased pipe, base UNet state, mask, timings dict)."""
    import copy

    import torch

    from .diffusion.training.config import TrainConfig

    from .diffusion.training.loop import train_unet

    from .diffusion.training.mask_pass import compute_mask
    from .diffusion.models.loading import load_pipeline
    from .diffusion.minisd.experiment import MASK_BATCH_SIZE, make_latent_sets
    from .diffusion.minisd.presets import digit_concept

    torch.manual_seed(config.seed)
    pipe = pipe if pipe is not None else load_pipeline("minisd")
    base_unet = copy.deepcopy(pipe.unet)
    concept = digit_concept(config.digit, config.surrogate)
    timings = {}
    t0 = time.perf_counter()
    forget, retain = make_latent_sets(pipe, concept, config.num_forget, config.num_retain, seed=config.seed)
    timings["data_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mask = compute_mask(pipe, forget, config.keep, batch_size=MASK_BATCH_SIZE, seed=config.seed, concept=concept.name)
    timings["mask_s"] = time.perf_counter() - t0
    train = TrainConfig(method="salun", steps=config.steps, lr=config.lr, batch_size=config.batch_size,
                        alpha=config.alpha, seed=config.seed)
    t0 = time.perf_counter()
    result = train_unet(pipe, forget, retain, train, mask=mask, progress=progress)
    timings["erase_s"] = time.perf_counter() - t0
    timings["seconds_per_step"] = result.seconds_per_step
    return pipe, base_unet, mask, concept, timings


def _table(before: dict, after: dict, digit: str, timings: dict) -> list[tuple[str, str, str]]:
    """(metric, before, after) rows: the forgotten digit per style, the other nine, styles, time."""
    from .diffusion.minisd import STYLES

    pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731
    rows = [(f'"{digit}" judged {digit} ({s})', pct(before["per_cell"][f"{digit}/{s}"]),
             pct(after["per_cell"][f"{digit}/{s}"])) for s in STYLES]
    rows.append(("other nine digits judged correct", pct(other_accuracy(before, digit)),
                 pct(other_accuracy(after, digit))))
    rows.append(("style judged correct (all prompts)", pct(before["style_accuracy"]), pct(after["style_accuracy"])))
    rows.append(("time: data + mask + erase", "",
                 f"{timings['data_s']:.0f} s + {timings['mask_s']:.1f} s + {timings['erase_s']:.0f} s"))
    return rows


def other_accuracy(scores: dict, digit: str) -> float:
    """Mean judged digit accuracy over the other nine digits (all styles)."""
    others = [v["digit"] for d, v in scores["per_digit"].items() if d != digit]
    return sum(others) / len(others)


def grid_image(before: list, after: list, digits: list[int], styles: list[int], scale: int = 4,
               erased: int | None = None):
    """A PNG grid: the ten digits as columns (named on top; the `erased` one's name in red, its column
    framed), and for each style a "before" row and an "after" row (same seeds)."""
    from PIL import Image, ImageDraw

    from .diffusion.minisd import DIGITS, STYLES

    cell = 16 * scale
    label_w, header = 120, 18
    red = (200, 30, 30)
    cols = sorted(set(digits))
    rows = [(s, tag) for s in sorted(set(styles)) for tag in ("before", "after")]
    grid = Image.new("RGB", (label_w + cell * len(cols), header + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    index = {(d, s): i for i, (d, s) in enumerate(zip(digits, styles))}
    for c, d in enumerate(cols):
        name = DIGITS[d] + (" (erased)" if d == erased else "")
        draw.text((label_w + c * cell + 2, 3), name if draw.textlength(name) < cell else DIGITS[d],
                  fill=red if d == erased else "black")
    for r, (s, tag) in enumerate(rows):
        draw.text((4, header + r * cell + cell // 2 - 6), f"{STYLES[s]} {tag}", fill="black")
        for c, d in enumerate(cols):
            im = (before if tag == "before" else after)[index[(d, s)]]
            grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + c * cell, header + r * cell))
    if erased in cols:
        x = label_w + cols.index(erased) * cell
        draw.rectangle((x, header, x + cell - 1, grid.height - 1), outline=red, width=2)
    return grid


def run_demo(config: DemoConfig, out: str | Path = "outputs/demo", progress: bool = True) -> dict:
    """Everything `concept-erase demo` does; returns the summary dict (also written to summary.json)."""
    from .diffusion.minisd import DIGITS, MINISD_GUIDANCE, MINISD_STEPS

    out = Path(out)
    if out.exists() and not (out / "summary.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        # Replacing a previous demo report is expected; replacing anything else would lose a user's files.
        raise ConceptEraseError(f"--output {str(out)!r} exists and is not a demo report folder; choose another")
    check_writable(out, overwrite=True, flag="--output")
    # torch, diffusers: only once the destination is known to be good
    from .diffusion.models.loading import load_pipeline
    from .diffusion.minisd.judge import generate_digit_set, load_judges, score_set

    start = time.perf_counter()
    judges = load_judges()
    pipe = load_pipeline("minisd")
    seeds = range(config.eval_seeds)
    gen_before = generate_digit_set(pipe, seeds=seeds)
    before = score_set(judges, gen_before)
    pipe, _, mask, concept, timings = erase_demo(config, pipe, progress=progress)
    gen_after = generate_digit_set(pipe, seeds=seeds)
    after = score_set(judges, gen_after)
    total = time.perf_counter() - start
    rows = _table(before, after, config.digit, timings)
    summary = {"config": asdict(config), "concept": concept.to_card(), "before": before, "after": after,
               "timings": {**timings, "total_s": total}, "mask_kept_fraction": mask.kept_fraction}

    first = [i for i, s in enumerate(gen_before.seeds) if s == 0]
    grid = grid_image([gen_before.images[i] for i in first], [gen_after.images[i] for i in first],
                      [int(gen_before.digits[i]) for i in first], [int(gen_before.styles[i]) for i in first],
                      erased=DIGITS.index(config.digit))
    md = [f"# MiniSD demo: SalUn erases \"{config.digit}\"", "",
          f"Forget prompts: {', '.join(concept.forget_prompts)}.",
          f"Surrogates: {', '.join(concept.surrogate_prompts)}.",
          f"Settings: {config.steps} steps, lr {config.lr}, batch {config.batch_size}+{config.batch_size}, "
          f"alpha {config.alpha}, mask keep {config.keep}; {config.num_forget} forget / {config.num_retain} "
          f"retain images generated by MiniSD; judged on {config.eval_seeds} seeds per (digit, style), "
          f"{MINISD_STEPS} DDIM steps, guidance {MINISD_GUIDANCE:g}.", "",
          "| metric | before | after |", "| --- | --- | --- |"]
    md += [f"| {n} | {b} | {a} |" for n, b, a in rows]
    md += ["", f"Total wall time: {total:.0f} s.", "", "![before/after, seed 0](grid.png)", ""]
    with atomic_dir(out, overwrite=True) as tmp:
        grid.save(tmp / "grid.png")
        (tmp / "report.md").write_text("\n".join(md), encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    summary["table"] = _text_table(config, rows, total)  # what the command prints
    return summary


def _text_table(config: DemoConfig, rows, total: float) -> str:
    """The before/after table the `demo` command prints."""
    width = max(len(r[0]) for r in rows)
    lines = [f"SalUn erased {config.digit!r} from MiniSD ({config.steps} steps, lr {config.lr}, keep {config.keep}); "
             f"{config.eval_seeds} images per (digit, style), same seeds:",
             f"{'':{width}}  {'before':>8}  {'after':>8}"]
    lines += [f"{name:{width}}  {b:>8}  {a:>8}" for name, b, a in rows]
    return "\n".join(lines + [f"total {total:.0f} s"])


def demo_erased_model(cache_dir: str | Path | None = None, config: DemoConfig | None = None) -> Path:
    """The demo's erased MiniSD as a diffusers folder (for the app): made deterministically on first use
    (about a minute on 2 cores) and cached under `cache_dir` (default: $CONCEPT_ERASE_CACHE or
    ~/.cache/concept-erase) in a folder named by the base weights and the demo settings (`config`,
    default: the demo's)."""
    from .diffusion.models.card import save_pipeline
    from .diffusion.minisd import minisd_path

    config = config or DemoConfig()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    base = minisd_path()
    key = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()
                         + (base / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:12]
    path = root / "demo-models" / f"minisd-without-{config.digit}-{key}"
    if (path / "model_index.json").is_file() and (path / "mask.safetensors").is_file():
        return path  # complete: the mask is written last
    pipe, _, mask, concept, timings = erase_demo(config)
    card = {"base_model": "minisd", "method": "salun", "keep": config.keep, "steps": config.steps,
            "surrogate": concept.surrogate_prompts, "tags": ["minisd"], **concept.to_card()}
    save_pipeline(pipe, path, card=card, overwrite=True)
    mask.save(path / "mask.safetensors", overwrite=True)  # beside the card, as `erase` does: the app plots it
    return path


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help='erase the digit "seven" from MiniSD and show before/after',
                              description=__doc__.split("\n\n")[0])
    add_flags(p, DemoConfig)
    add_flags(p, DemoOutput)
    p.set_defaults(func=_main)


@dataclass
class DemoOutput:
    output: str = field(default="outputs/demo", metadata={
        "help": "report folder; a previous demo report there is replaced", "aliases": ("--out",)})


def _main(args: argparse.Namespace) -> int:
    config = DemoConfig(**values_from(args, DemoConfig))
    out = values_from(args, DemoOutput)["output"]
    summary = run_demo(config, out)
    table = summary.pop("table")
    from .logs import finish

    finish(args, ["", table, f"wrote {out}/: report.md, grid.png and summary.json (the result as JSON)"], summary,
           next_command="concept-erase app  (the base and the erased demo model side by side)")
    return 0
