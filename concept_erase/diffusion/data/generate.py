"""Images from any loaded or erased pipeline, and the `concept-erase generate` command.

`generate_images` gives every image its own CPU `torch.Generator` seeded with that image's seed, so a
(prompt, seed) pair draws the same initial noise (and, for stochastic schedulers, the same step noise) at
any batch size and on any device. That is what lets an erased model be compared with its base image by image.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from ...cli_args import add_flags, check_fields, values_from
from ...concepts import read_prompt_list
from ...errors import ConceptEraseError
from ...logs import progress_field
from ..models.defaults import sampling_default
from ..models.families import family_field, family_of

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


def to_pil(images: "np.ndarray") -> list["Image.Image"]:
    """(N, H, W, C) floats in [0, 1] -> PIL images: C == 1 -> mode "L", C == 3 -> "RGB", C == 4 -> "RGBA"."""
    import numpy as np
    from PIL import Image

    array = (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    channels = array.shape[-1]
    if channels == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in array]
    if channels in (3, 4):
        return [Image.fromarray(a, mode="RGB" if channels == 3 else "RGBA") for a in array]
    raise ConceptEraseError(f"the VAE decodes {channels}-channel images; only 1, 3 or 4 channels can be saved")


@dataclass
class SamplingSettings:
    """How images are sampled: the `generate` command's sampling flags, and the forget/retain images' (part of
    their cache key, `images.ImageSet.generate`)."""

    num_inference_steps: int = field(default=25, metadata={
        "help": "denoising steps per image", "min": 1, "aliases": ("--steps",)})
    guidance_scale: float = field(default=7.5, metadata={
        "help": "classifier-free guidance scale", "min": 0, "aliases": ("--guidance",)})
    height: int | None = field(default=None, metadata={"help": "image height in pixels (default: the model's)", "min": 8})
    width: int | None = field(default=None, metadata={"help": "image width in pixels (default: the model's)", "min": 8})
    negative_prompt: str | None = field(default=None, metadata={"help": "negative prompt for every image"})

    def __post_init__(self):
        check_fields(self)
        if (self.height is None) != (self.width is None):  # one alone would silently fall back to the model's
            given = ("--height", self.height) if self.height is not None else ("--width", self.width)
            raise ConceptEraseError(f"{given[0]} {given[1]} needs {'--width' if given[0] == '--height' else '--height'}"
                                    " too (give both, or neither for the model's size)")


def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    batch_size: int = 8,
    progress: bool | str = False,
    warn_long_prompts: bool = True,
) -> list["Image.Image"]:
    """Generate one image per (prompts[i], seeds[i]), in batches of `batch_size`.

    `prompts` and `seeds` have the same length (repeat a prompt to get several seeds of it). The pipeline's
    own scheduler is used; no safety checker runs. Images come back in the VAE's channel layout (a 1-channel
    VAE gives mode "L" images). Prompts longer than the text encoder reads get one warning per call
    (`warn_long_prompts=False` for callers that warned once for a whole run). `progress`: a bar counting
    images; a string names what they are (e.g. "forget images").
    """
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise ConceptEraseError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    if batch_size < 1:
        raise ConceptEraseError(f"batch size must be at least 1, got {batch_size}")
    if num_inference_steps < 1:
        raise ConceptEraseError(f"number of inference steps must be at least 1, got {num_inference_steps}")
    if isinstance(negative_prompt, str) or negative_prompt is None:
        negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
    else:
        negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ConceptEraseError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")

    if warn_long_prompts:
        warn_if_prompts_are_cut(pipe, prompts)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=progress if isinstance(progress, str) else "images", unit="image")
    images: list = []
    # Our own bar counts images; the pipeline's per-step bar would print once per batch.
    saved_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    pipeline_logger = logging.getLogger(type(pipe).__module__)
    pipeline_logger.addFilter(_drop_truncation_warning)
    try:
        for start in range(0, len(prompts), batch_size):
            batch = _generate_batch(pipe, prompts[start:start + batch_size], seeds[start:start + batch_size],
                                    None if negatives is None else negatives[start:start + batch_size],
                                    num_inference_steps, guidance_scale, height, width)
            images.extend(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        pipe._progress_bar_config = saved_bar_config
        pipeline_logger.removeFilter(_drop_truncation_warning)
        if bar is not None:
            bar.close()
    return images


def _drop_truncation_warning(record: logging.LogRecord) -> bool:
    """diffusers logs every truncated batch with the cut-off text padded by up to 77 `<|endoftext|>` tokens;
    `warn_if_prompts_are_cut` says it once, with a count, instead."""
    return not record.getMessage().startswith("The following part of your input was truncated")


def warn_if_prompts_are_cut(pipe, prompts: Sequence[str]) -> None:
    """One warning for all prompts longer than the text encoder reads (77 tokens on SD 1.x, 16 on MiniSD):
    the pipeline keeps their first tokens, as every SD tool does."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None or not prompts:
        return
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False, verbose=False).input_ids]
    long = [i for i, n in enumerate(lengths) if n > limit]
    if long:
        warnings.warn(f"{len(long)} of {len(prompts)} prompts are longer than the text encoder's {limit} tokens "
                      f"(first: prompt {long[0]}, {lengths[long[0]]} tokens); each is cut to its first {limit}, "
                      f"as the pipeline does", stacklevel=2)


def _generate_batch(pipe, prompts, seeds, negatives, num_inference_steps, guidance_scale, height, width, **inputs):
    import numpy as np
    import torch

    # CPU generators: the same noise on every device (diffusers draws on CPU, then moves).
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    # the family's call defaults (a transformer's size and T5 length), then the size asked for
    family = family_of(pipe)
    call = family.sampling_kwargs(pipe) | {k: v for k, v in (("height", height), ("width", width)) if v}
    call |= family.guidance_kwargs(pipe, guidance_scale, negatives, len(seeds))
    with torch.no_grad():
        out = pipe(prompt=prompts, num_inference_steps=num_inference_steps, generator=generators,
                   output_type="np", **call, **inputs)
    if not np.isfinite(out.images).all():  # NaN pixels would become black images, cached and scored as drawings
        raise ConceptEraseError(f"the model drew non-finite (NaN) pixels at guidance scale {guidance_scale:g} with "
                                f"{num_inference_steps} steps (seeds {seeds[0]}..{seeds[-1]}); lower the guidance scale")
    return to_pil(out.images)


def generate_from_conditioning(pipe, cond, seeds: Sequence[int], *, num_inference_steps: int = 25,
                               guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                               batch_size: int = 8, latents=None) -> list["Image.Image"]:
    """`generate_images` for UNet conditioning instead of prompt text (`family.Conditioning`, one item per
    seed): what an attack's adversarial embeddings draw. The negative side is the empty prompt, as usual.
    `latents`: one initial noise per item instead of the seeds' (the text-free attack's inverted noise)."""
    seeds = [int(s) for s in seeds]
    if len(cond) != len(seeds):
        raise ConceptEraseError(f"{len(cond)} conditionings but {len(seeds)} seeds: give one seed per item")
    images: list = []
    saved_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        for start in range(0, len(seeds), batch_size):
            part = cond[start:start + batch_size].to(pipe.unet.device)
            inputs = {"prompt_embeds": part.hidden.to(pipe.unet.dtype)}
            if "text_embeds" in part.added:  # SDXL's pooled text embedding (the size ids come from height/width)
                inputs["pooled_prompt_embeds"] = part.added["text_embeds"].to(pipe.unet.dtype)
            if latents is not None:
                inputs["latents"] = latents[start:start + batch_size].to(pipe.unet.device, pipe.unet.dtype)
            images.extend(_generate_batch(pipe, None, seeds[start:start + batch_size], None, num_inference_steps,
                                          guidance_scale, height, width, **inputs))
    finally:
        pipe._progress_bar_config = saved_bar_config
    return images


def check_sampling(pipe, num_inference_steps: int | None, height: int | None = None, width: int | None = None, *,
                   steps_flag: str = "--num-inference-steps", size_flags: tuple[str, str] = ("--height", "--width"),
                   ) -> None:
    """What only the model can tell, checked before any image or folder is made: no more denoising steps than
    the timesteps its scheduler was trained with, and an image size that is a multiple of the VAE's
    downsampling factor (the latent grid must come out whole) and of 8 (diffusers' SD pipelines demand it).
    `pipe`: the loaded pipeline, or before it loads the model's `facts.ModelFacts` (what it leaves unsaid, a
    hub id's, waits for the loaded pipeline)."""
    from ..models.facts import ModelFacts

    if isinstance(pipe, ModelFacts):
        trained, factor = pipe.timesteps, pipe.vae_factor
    else:
        trained = getattr(pipe.scheduler.config, "num_train_timesteps", None)
        factor = getattr(pipe, "vae_scale_factor", None)
    if num_inference_steps is not None and trained and num_inference_steps > trained:
        raise ConceptEraseError(f"{steps_flag} {num_inference_steps} is more than the {trained} timesteps the "
                                "model's scheduler was trained with")
    check_image_size(dict(zip(size_flags, (height, width))), factor or 8)


def check_image_size(sizes: dict[str, int | None], vae_factor: int) -> None:
    """Each size (flag -> pixels) a multiple of the VAE's downsampling factor (the latent grid must come out
    whole) and of 8 (diffusers' SD pipelines demand it); `plan` asks it with the factor from the configs."""
    factor = math.lcm(8, vae_factor)
    for flag, value in sizes.items():
        if value is not None and value % factor:
            raise ConceptEraseError(f"{flag} {value} is not a multiple of {factor} (what the pipeline and its VAE "
                                    "can draw)")


# ----------------------------------------------------------------------------------------------- the CLI


MAX_SEEDS = 100_000  # a typo such as 0-4294967295 must not try to build a list of billions


def parse_seeds(text: str) -> list[int]:
    """"0-3,10" -> [0, 1, 2, 3, 10]; a bare "8" is the single seed 8. Seeds follow `validate.parse_seed`."""
    from ...validate import parse_seed

    seeds: list[int] = []
    for part in text.replace(" ", ",").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if part and (match is None or (match[2] is not None and int(match[2]) < int(match[1]))):
            raise ConceptEraseError(f"bad seed list {text!r}: use non-negative integers and ranges like 0-7,12")
        if match:
            lo, hi = (parse_seed(n, "--seeds") for n in (match[1], match[2] or match[1]))
            if len(seeds) + hi - lo + 1 > MAX_SEEDS:
                raise ConceptEraseError(f"--seeds {text!r} asks for more than {MAX_SEEDS} seeds")
            seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise ConceptEraseError(f"bad seed list {text!r}: no seeds")
    return seeds


@dataclass
class GenerateConfig:
    """`concept-erase generate`: what to generate from and where to. How to sample is `SamplingSettings`."""

    model: str = field(metadata={
        "help": 'model: a diffusers folder, a .safetensors/.ckpt file, a hub id, "minisd" or "minisd-xl"'})
    output: str = field(metadata={"help": "output folder (must not exist unless --overwrite)", "aliases": ("--out",)})
    config: str | None = field(default=None, metadata={
        "help": "local diffusers folder giving the configs of a single-file checkpoint"})
    family: str | None = family_field()
    prompt: list[str] | None = field(default=None, metadata={
        "help": "a prompt (repeat the flag for several; or --prompts)", "metavar": "PROMPT"})
    prompts: str | None = field(default=None, metadata={
        "help": "a text file with one prompt per line (or --prompt)", "metavar": "FILE"})
    seeds: str = field(default="0", metadata={"help": "seeds for every prompt: integers and ranges, e.g. 0-3,10"})
    batch_size: int = field(default=8, metadata={"help": "images per forward pass", "min": 1})
    dtype: str | None = field(default=None, metadata={"help": "fp32 (default on CPU), fp16 or bf16 (CUDA only)"})
    device: str | None = field(default=None, metadata={
        "help": "torch device, e.g. cuda or cpu (default: cuda when available)"})
    overwrite: bool = field(default=False, metadata={"help": "replace --output if it exists"})
    progress: bool = progress_field()

    def __post_init__(self):
        check_fields(self)
        if (self.prompt is None) == (self.prompts is None):
            raise ConceptEraseError("give prompts with --prompt (repeatable) or --prompts FILE, not both")


def register(subparsers) -> None:
    from prompts import prompt_set_names

    p = subparsers.add_parser(
        "generate",
        help="generate images from a base or erased model",
        description="Generate every prompt with every seed; writes PNGs, an index.jsonl (prompt, seed, file) and "
                    "contact_sheet.png (one row per prompt, one column per seed).",
    )
    add_flags(p, GenerateConfig, help_override={"prompts": (
        "a text file with one prompt per line, a CSV with a prompt column, or a prompt set shipped with "
        f"concept-erase by name ({', '.join(prompt_set_names())}); or --prompt")})
    add_flags(p.add_argument_group("sampling"), SamplingSettings, suppress_defaults=True, help_override=FROM_MODEL)
    p.set_defaults(func=_main)


# The sampling flags whose default comes from the model (`defaults.model_defaults`), not the dataclass.
FROM_MODEL = {
    "num_inference_steps": f"denoising steps per image (default: {sampling_default(0)})",
    "guidance_scale": f"classifier-free guidance scale (default: {sampling_default(1)})"}


def _sampling(args: argparse.Namespace, config: GenerateConfig):
    """The user's sampling flags; steps and guidance they did not give come from the model's base
    (`defaults.model_defaults`), printed. A size or a step count the model cannot draw with is refused before
it is loaded (`models/facts.py`)."""
    from ...logs import announce
    from ..models.defaults import check_resolution, model_defaults
    from ..models.facts import model_facts

    values = values_from(args, SamplingSettings)
    SamplingSettings(**values)  # the user's numbers, checked before the model's defaults are looked up
    defaults = model_defaults(config.model, config.config)
    chosen = {k: v for k, v in (("num_inference_steps", defaults.steps), ("guidance_scale", defaults.guidance))
              if k not in values}
    check_resolution(values.get("height"), defaults, "--height")
    check_resolution(values.get("width"), defaults, "--width")
    # what the model's files say, before `announce` (which imports torch) and the load (checked again on it)
    check_sampling(model_facts(config.model, config.config), *(values.get(k) for k in ("num_inference_steps",
                                                                                       "height", "width")))
    if chosen:
        announce(defaults.describe(*(f"--{k.replace('_', '-')} {v:g}" for k, v in chosen.items())))
    return SamplingSettings(**chosen, **values)


CONTACT_SHEET = "contact_sheet.png"
CONTACT_SHEET_SEEDS = 8  # columns shown; the PNGs hold every seed


def contact_sheet(path, prompts: list[str], seeds: list[int], images: list) -> None:
    """One row per prompt (labelled), one column per seed (named on top), from `images` in (prompt, seed)
    order; at most CONTACT_SHEET_SEEDS columns and 64 px cells, so a glance shows the whole run."""
    from ...grid import GridRow, labelled_grid

    shown = seeds[:CONTACT_SHEET_SEEDS]
    columns = [f"seed {s}" for s in shown]
    rows = [GridRow(prompt, {c: [images[p * len(seeds) + j]] for j, c in enumerate(columns)})
            for p, prompt in enumerate(prompts)]
    labelled_grid(path, columns, rows, gap=2)


def _main(args: argparse.Namespace) -> int:
    from ...io_utils import atomic_dir, atomic_file, check_writable
    from ..models.loading import load_pipeline

    config = GenerateConfig(**values_from(args, GenerateConfig))
    check_writable(config.output, config.overwrite, flag="--output")  # fail before loading a model
    prompts = config.prompt if config.prompt else read_prompt_list(config.prompts)
    if any(not p.strip() for p in prompts):
        raise ConceptEraseError("empty --prompt")
    seeds = parse_seeds(config.seeds)
    sampling = _sampling(args, config)
    pipe = load_pipeline(config.model, config=config.config, dtype=config.dtype, device=config.device or "auto",
                         family=config.family)
    check_sampling(pipe, sampling.num_inference_steps, sampling.height, sampling.width)
    pairs = [(p, s) for p in prompts for s in seeds]
    images = generate_images(
        pipe, [p for p, _ in pairs], [s for _, s in pairs], num_inference_steps=sampling.num_inference_steps,
        guidance_scale=sampling.guidance_scale, height=sampling.height, width=sampling.width,
        negative_prompt=sampling.negative_prompt, batch_size=config.batch_size,
        progress=config.progress and f"images ({len(prompts)} prompts x {len(seeds)} seeds)",
    )
    with atomic_dir(config.output, overwrite=config.overwrite) as tmp:
        rows = []
        for i, ((prompt, seed), image) in enumerate(zip(pairs, images)):
            name = f"{i:05d}.png"
            image.save(tmp / name)
            rows.append({"file": name, "prompt": prompt, "seed": seed})
        settings = {"model": config.model, "steps": sampling.num_inference_steps, "guidance": sampling.guidance_scale,
                    "negative_prompt": sampling.negative_prompt}
        with atomic_file(tmp / "index.jsonl") as f:
            f.write_text("".join(json.dumps({**row, **settings}) + "\n" for row in rows), encoding="utf-8")
        contact_sheet(tmp / CONTACT_SHEET, prompts, seeds, images)
    from ...logs import finish

    finish(args, f"wrote {config.output}/: {len(images)} images, index.jsonl (prompt, seed and settings of each) "
                 f"and {CONTACT_SHEET}", {"output": config.output, "images": rows, "settings": settings})
    return 0
