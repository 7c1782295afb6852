"""Render a prompt set under a pinned protocol: sharded across processes, resumable, atomic.

Layout of an output folder:
    run.json                  protocol, model source and fingerprint, prompt set (written once; a resume
                              into a folder made with another protocol or model is refused)
    images/000123_00.png      row 123, sample 0 (file names depend only on the row and the sample)
    manifest.jsonl            one JSON line per finished image: prompt, seed, settings, model fingerprint

The images and manifests are a `concept_erase.diffusion.data.folder.ImageFolder`: an image counts as done
only once its PNG is in place AND its manifest line is written, so a run killed at any point resumes with
nothing half-done counted. While running, each process appends to its own `manifest-rank<r>.jsonl`; the main
process merges them into `manifest.jsonl` at the end.

Sharding: rows are split by position (`rows[rank::world]`), each process skips what any manifest already
lists, so N processes produce exactly the set one process would (docs/PROTOCOLS.md; accelerate's PartialState).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from concept_erase.cli_args import check_fields
from concept_erase.diffusion.data.folder import ImageFolder, shard_manifest
from concept_erase.fingerprints import pipeline_digest
from concept_erase.runtime import process_state
from concept_erase.diffusion.minisd import MINISD_GUIDANCE, MINISD_STEPS
from concept_erase.diffusion.models.families import FLUX, SDXL
from concept_erase.logs import announce, rough_duration
from concept_erase.errors import ConceptEraseError
from concept_erase.io_utils import atomic_file

from .prompts import PromptRow

SCHEDULERS = {
    "lms": "LMSDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "model": None,  # keep the pipeline's own scheduler
}


@dataclass(frozen=True)
class Protocol:
    """How images are generated. Printed at the top of every report (docs/PROTOCOLS.md)."""

    name: str = field(default="paper", metadata={"help": "preset this protocol started from", "cli": False})
    scheduler: str = field(default="lms", metadata={"help": "sampler", "choices": tuple(SCHEDULERS),
                                                    "default_from": lambda f: protocol_default(f)})
    num_inference_steps: int = field(default=100, metadata={
        "help": "denoising steps", "min": 1, "aliases": ("--steps",), "default_from": lambda f: protocol_default(f)})
    guidance_scale: float = field(default=7.5, metadata={
        "help": "classifier-free guidance scale", "min": 0, "aliases": ("--guidance",),
        "default_from": lambda f: protocol_default(f)})
    resolution: int | None = field(default=512, metadata={
        "help": "image side in pixels, a multiple of 8", "min": 8, "default_from": lambda f: protocol_default(f)})
    samples_per_prompt: int = field(default=1, metadata={
        "help": "images per prompt row; sample j uses seed + j", "min": 1, "aliases": ("--samples",)})
    row_guidance: bool = field(
        default=False, metadata={"help": "use the prompt set's evaluation_guidance column (I2P) where present"}
    )
    negative_prompt: str | None = field(default=None, metadata={"help": "negative prompt for every image"})
    overrides: tuple[str, ...] = field(default=(), metadata={"help": "fields changed from the preset", "cli": False})

    def __post_init__(self):
        check_fields(self)
        if self.resolution is not None and self.resolution % 8:
            raise ConceptEraseError(f"--resolution must be a multiple of 8, got {self.resolution}")

    def settings(self) -> dict:
        """The fields that change pixels (what a resume must match); the preset name and overrides don't."""
        d = dataclasses.asdict(self)
        d.pop("name")
        d.pop("overrides")
        return d

    def describe(self) -> dict:
        d = {"preset": self.name + (f" (overridden: {', '.join(self.overrides)})" if self.overrides else "")}
        d.update(self.settings())
        # Fixed by the code, not configurable, but pinned by docs/PROTOCOLS.md: GenerationJob.seed, generate_set.
        d["seed"] = "each row's evaluation_seed (rows without one, e.g. a .txt file: seed + row index); sample j: + j"
        d["safety checker"] = "none"
        return d


# The paper's scripts (ESD / SalUn generate-images): LMS, 100 steps, guidance 7.5, 512 px, seed per row.
PRESETS: dict[str, Protocol] = {
    "paper": Protocol(),
    # MiniSD and tiny pipelines: their native size, the DDIM schedule they were trained and checked with.
    "minisd": Protocol(name="minisd", scheduler="ddim", num_inference_steps=MINISD_STEPS,
                       guidance_scale=MINISD_GUIDANCE, resolution=None),
    # MiniSD-Flux: the same steps and guidance (true classifier-free guidance) on its own flow-matching scheduler
    # (a DDPM-family scheduler cannot sample a rectified-flow model).
    "minisd-flux": Protocol(name="minisd-flux", scheduler="model", num_inference_steps=MINISD_STEPS,
                            guidance_scale=MINISD_GUIDANCE, resolution=None),
    "quick": Protocol(name="quick", scheduler="model", num_inference_steps=4, resolution=None),
    # SDXL base as released: its own scheduler (Euler discrete, scheduler_config.json of stable-diffusion-xl-base-1.0)
    # and diffusers' StableDiffusionXLPipeline defaults (50 steps, guidance 5.0, 1024 px = sample_size 128 x 8);
    # the SDXL report (Podell et al. 2023) samples at 1024 px.
    "sdxl": Protocol(name=SDXL.evaluation_protocol, scheduler="euler", num_inference_steps=50,
                     guidance_scale=SDXL.sampling_guidance, resolution=SDXL.default_resolution),
    # FLUX.1 on its own flow-matching scheduler at the model's size (FLUX.1: 1024 px), T5 at the family's length
    # (`FluxFamily.t5_length`): dev at diffusers' FluxPipeline defaults (28 steps, guidance 3.5); schnell as
    # diffusers' Flux docs sample it (4 steps, guidance 0).
    "flux": Protocol(name=FLUX.evaluation_protocol, scheduler="model", num_inference_steps=FLUX.sampling_steps,
                     guidance_scale=FLUX.sampling_guidance, resolution=None),
    "flux-schnell": Protocol(name=FLUX.schnell_protocol, scheduler="model", num_inference_steps=FLUX.schnell_steps,
                             guidance_scale=FLUX.schnell_guidance, resolution=None),
}


def protocol_default(f) -> str:
    """A protocol field's default in --help (`cli_args`' `default_from`), from `PRESETS`: "the --protocol's (paper:
    lms; minisd: ddim; ...)"; --protocol itself defaults from the model (evaluation/cli.py's `resolve_defaults`)."""
    def shown(value):
        return "the model's" if value in (None, "model") else f"{value:g}" if isinstance(value, float) else str(value)

    return f"the --protocol's ({'; '.join(f'{name}: {shown(getattr(p, f.name))}' for name, p in PRESETS.items())})"


def make_protocol(preset: str = "paper", **overrides) -> Protocol:
    """A preset with some fields replaced; `None` values mean "keep the preset's"."""
    if preset not in PRESETS:
        raise ConceptEraseError(f"unknown protocol preset {preset!r} (choose from {', '.join(PRESETS)})")
    base = PRESETS[preset]
    changed = {k: v for k, v in overrides.items() if v is not None and getattr(base, k) != v}
    return dataclasses.replace(base, **changed, overrides=tuple(sorted(changed)))


def apply_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for the protocol's, built from the same config (betas, offsets)."""
    cls_name = SCHEDULERS[name]
    if cls_name is None or type(pipe.scheduler).__name__ == cls_name:
        return
    if type(pipe.scheduler).__name__.startswith("FlowMatch"):
        raise ConceptEraseError(f"scheduler {name!r} cannot sample a rectified-flow model ({type(pipe).__name__}); "
                                "use a protocol that keeps the model's own scheduler (minisd-flux, flux, "
                                "flux-schnell, quick) or --scheduler model")
    import diffusers

    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config)


def image_name(index: int, sample: int) -> str:
    return f"{index:06d}_{sample:02d}.png"


@dataclass
class GenerationJob:
    """One image to make: a row and a sample number."""

    row: PromptRow
    sample: int

    @property
    def seed(self) -> int:
        return self.row.seed + self.sample

    @property
    def file(self) -> str:
        return image_name(self.row.index, self.sample)


def _job_key(entry: dict) -> tuple[int, int]:
    return entry["index"], entry["sample"]


def read_manifest(out_dir: str | Path) -> list[dict]:
    """Every finished image of a generation folder, sorted by (row, sample); shard files included, torn
    lines and entries whose PNG is missing skipped, duplicates collapsed."""
    done = ImageFolder(out_dir, "images").done(_job_key)
    return [done[k] for k in sorted(done)]


def read_run_info(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "run.json"
    if not path.is_file():
        raise ConceptEraseError(f"{str(out_dir)!r} is not a generation folder (no run.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_or_write_run_info(out_dir: Path, info: dict, is_main: bool) -> None:
    path = out_dir / "run.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key in ("settings", "fingerprint"):
            if old.get(key) != info[key]:
                raise ConceptEraseError(
                    f"{str(out_dir)!r} holds images made with another {'protocol' if key == 'settings' else 'model'}"
                    f" ({key} {old.get(key)} != {info[key]}); choose another output folder"
                )
        return
    if is_main:  # atomic_file creates out_dir: run.json is the first thing in it
        with atomic_file(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(info, indent=2), encoding="utf-8")


def generate_set(
    pipe,
    rows: list[PromptRow],
    out_dir: str | Path,
    protocol: Protocol,
    *,
    batch_size: int = 8,
    model_source: str = "",
    prompt_source: str = "",
    progress: bool = True,
    state=None,
    on_image: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Generate every (row, sample) image that `out_dir` does not hold yet; return the manifest entries of
    `rows` (all of them, old and new). The pipeline's scheduler is replaced by the protocol's.

    `state` is an accelerate `PartialState` (default: `process_state()`), so `accelerate launch` / `torchrun`
    shard the work; the caller has already put `pipe` on `state.device`. `on_image(entry)` runs after
    each image is committed (progress reporting, tests).
    """
    from tqdm.auto import tqdm

    from concept_erase.diffusion.data import generate as generate_module
    from concept_erase.diffusion.data.generate import check_sampling

    if batch_size < 1:
        raise ConceptEraseError(f"batch_size must be >= 1, got {batch_size}")
    state = state or process_state()
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / "run.json").is_file() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # Resuming our own folder is the point; writing images and reports into someone else's is not.
        raise ConceptEraseError(f"{str(out_dir)!r} exists and is not an evaluation folder (no run.json); "
                                "choose another output folder")
    if getattr(pipe, "safety_checker", None) is not None:  # it blacks out what a nudity evaluation counts
        raise ConceptEraseError(f"the pipeline has a safety checker ({type(pipe.safety_checker).__name__}); "
                                "the protocol generates without one (load it with safety_checker=None)")
    apply_scheduler(pipe, protocol.scheduler)
    check_sampling(pipe, protocol.num_inference_steps, protocol.resolution, protocol.resolution,
                   size_flags=("--resolution", "--resolution"))
    state.wait_for_everyone()  # every process has checked before the main one creates anything
    # The weights' digest (the scheduler is the protocol's); seconds on SD: a kill here must leave nothing behind
    fingerprint = pipeline_digest(pipe, scheduler=False)[:16]
    settings = protocol.settings()
    info = {
        "protocol": protocol.describe(), "settings": settings, "fingerprint": fingerprint,
        "model": model_source, "prompts": prompt_source, "rows": len(rows),
    }
    # run.json first, then images/: a folder killed at any point is empty or holds run.json, so it resumes
    _check_or_write_run_info(out_dir, info, state.is_main_process)
    state.wait_for_everyone()  # run.json is on disk before any process writes an image
    (out_dir / "images").mkdir(exist_ok=True)

    folder = ImageFolder(out_dir, "images")
    done = {_job_key(e): e for e in read_manifest(out_dir)}
    by_index = {r.index: r for r in rows}
    for (index, _), entry in done.items():
        row = by_index.get(index)
        if row is not None and (entry["prompt"], entry["seed"] - entry["sample"]) != (row.prompt, row.seed):
            raise ConceptEraseError(
                f"{str(out_dir)!r} row {index} was made from another prompt ({entry['prompt'][:40]!r}); "
                "choose another output folder"
            )
    my_rows = rows[state.process_index :: state.num_processes]
    jobs = deque(
        GenerationJob(row, s) for row in my_rows for s in range(protocol.samples_per_prompt)
        if (row.index, s) not in done
    )
    shard = shard_manifest(state.process_index)
    if state.is_main_process:  # once per run for the whole prompt set, not per batch or per process
        generate_module.warn_if_prompts_are_cut(pipe, [r.prompt for r in rows])
    total, started, timed = len(jobs), time.perf_counter(), False
    bar = tqdm(total=total, desc="evaluation images", unit="image", disable=not (progress and state.is_main_process))
    # Batches never mix guidance scales (generate_images takes one); without row_guidance that is all rows.
    while jobs:
        guidance = _guidance(jobs[0].row, protocol)
        batch = [jobs.popleft()]
        while jobs and len(batch) < batch_size and _guidance(jobs[0].row, protocol) == guidance:
            batch.append(jobs.popleft())
        images = generate_module.generate_images(
            pipe, [j.row.prompt for j in batch], [j.seed for j in batch],
            num_inference_steps=protocol.num_inference_steps, guidance_scale=guidance,
            height=protocol.resolution, width=protocol.resolution,
            negative_prompt=protocol.negative_prompt, batch_size=len(batch), warn_long_prompts=False,
        )
        for job, image in zip(batch, images):
            entry = {
                "index": job.row.index, "sample": job.sample, "file": job.file, "prompt": job.row.prompt,
                "seed": job.seed, "key": job.row.key, "categories": list(job.row.categories),
                "label": job.row.label, "target": job.row.target, "style": job.row.style, "guidance_scale": guidance, "settings": settings,
                "fingerprint": fingerprint, "process": state.process_index,
            }
            folder.add(image, entry, manifest=shard)
            if on_image is not None:
                on_image(entry)
            bar.update(1)
        if not timed and state.is_main_process and len(batch) < total:  # said with or without the bar
            timed = True  # the first batch is timed: say what the whole set will take
            each = (time.perf_counter() - started) / len(batch)
            size = f"{protocol.resolution} px" if protocol.resolution else "the model's own size"
            announce(f"evaluation images: generating {total} images here ({protocol.num_inference_steps} "
                     f"{protocol.scheduler} steps each, {size}); about "
                     f"{rough_duration(each * total)} at {each:.2f} s per image (an interrupted run resumes)")
    bar.close()

    state.wait_for_everyone()
    if state.is_main_process:
        folder.merge(_job_key)
    state.wait_for_everyone()
    wanted = {(r.index, s) for r in rows for s in range(protocol.samples_per_prompt)}
    entries = [e for e in read_manifest(out_dir) if (e["index"], e["sample"]) in wanted]
    if len(entries) != len(wanted):
        raise ConceptEraseError(f"{str(out_dir)!r}: {len(wanted) - len(entries)} of {len(wanted)} images are "
                                "missing after generation; run the command again to finish them")
    return entries


def _guidance(row: PromptRow, protocol: Protocol) -> float:
    return row.guidance if protocol.row_guidance and row.guidance is not None else protocol.guidance_scale
