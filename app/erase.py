"""The Erase tab: SalUn on the app's base model, from a preset or a forget and a surrogate prompt.

The app trains nothing of its own. It checks what the browser sends against the `AppConfig` limits, builds
the config as `concept-erase erase` does (`EraseConfig.for_concept`: the preset's recipe, then the visitor's
steps and image counts; the forget and retain images sampled as the base model is everywhere else), runs the
library's erase job (`concept_erase.diffusion.training.job.run_erase`: images, saliency mask, SalUn, model +
card + mask written all or nothing) and loads what it wrote into the registry, where the Compare, Concept and
Evaluate tabs find it at once.

Each erase writes a new folder under `--erase-output` (a name already taken, by anything, is never reused).
Cancel stops the job at its next training step, or as training starts when the images and the mask are still
being made: before anything is saved, so nothing is left behind but cached images.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from concept_erase.errors import ConceptEraseError

from .checks import check_int, check_prompt
from .models import Model, ModelRegistry

# The preset menu's first entry: erase what the two prompt boxes say.
CUSTOM = "custom: the prompts below"
# What the visitor may set; everything else is the preset's recipe or erase's default.
SETTINGS = ("steps", "num_forget_images", "num_retain_images")
ERASED_FOLDER = "app-erased"  # under the cache folder, unless --erase-output says where


class Cancelled(Exception):
    """Raised inside the training loop (through its `on_step`) when the visitor cancels."""


def erase_presets(registry: ModelRegistry) -> list[str]:
    """The concept presets written for the app's base model (MiniSD: its digits and styles), as `erase`
    decides it (`check_concept_fits`)."""
    from concept_erase.concepts import get_concept, list_concepts
    from concept_erase.diffusion.models.defaults import check_concept_fits

    fitting = []
    for name in list_concepts():
        try:
            check_concept_fits(get_concept(name), registry.defaults)
        except ConceptEraseError:
            continue
        fitting.append(name)
    return fitting


def _check_preset(registry: ModelRegistry, preset) -> str | None:
    """The chosen preset, or None for custom prompts."""
    if preset in (None, "", CUSTOM):
        return None
    if preset not in erase_presets(registry):
        raise ConceptEraseError(f"unknown preset {preset!r} for this base model; choose one of "
                                f"{', '.join(erase_presets(registry))} or {CUSTOM!r}")
    return preset


def erase_defaults(registry: ModelRegistry, config, preset) -> dict[str, int]:
    """Steps and image counts the tab shows for `preset`: its recipe (custom prompts: `erase`'s defaults),
    each within the app's limits."""
    from concept_erase.concepts import get_concept
    from concept_erase.diffusion.training.config import EraseConfig

    preset = _check_preset(registry, preset)
    recipe = get_concept(preset).recipe if preset else {}
    values = {f.name: recipe.get(f.name, f.default) for f in fields(EraseConfig) if f.name in SETTINGS}
    limits = {"steps": config.max_erase_steps, "num_forget_images": config.max_erase_images,
              "num_retain_images": config.max_erase_images}
    return {k: min(v, limits[k]) for k, v in values.items()}


def preset_summary(registry: ModelRegistry, preset) -> str:
    """What a preset erases, into what, and its recipe (Markdown); for custom prompts, what they get."""
    from concept_erase.concepts import describe_recipe, get_concept
    from concept_erase.diffusion.training.config import EraseConfig

    preset = _check_preset(registry, preset)
    if preset is None:
        default = {f.name: f.default for f in fields(EraseConfig)}
        return ("Type what to forget and the surrogate it becomes; it runs with `erase`'s defaults "
                f"(lr {default['lr']:g}, batch {default['batch_size']}) and the steps and images below.")
    concept = get_concept(preset)
    few = lambda prompts: "; ".join(f"“{p}”" for p in prompts[:3]) + (" …" if len(prompts) > 3 else "")  # noqa: E731
    return (f"**{preset}** forgets {few(concept.forget_prompts)}, each steered to {few(concept.surrogate_prompts)}, "
            f"and keeps {len(concept.retain_prompts)} retain prompts. Recipe: {describe_recipe(concept.recipe)} "
            "(the steps and images below are capped by this app's limits).")


@dataclass(frozen=True)
class EraseRequest:
    """One Erase request, checked."""

    preset: str | None  # None: the custom prompts
    forget: str
    surrogate: str
    steps: int
    num_forget_images: int
    num_retain_images: int

    @property
    def model_name(self) -> str:
        """What the Compare tab calls the result (made unique by the registry)."""
        return f"without {self.preset or self.forget[:40]}"


def check_erase_request(registry: ModelRegistry, config, preset, forget, surrogate, steps, num_forget_images,
                        num_retain_images) -> EraseRequest:
    """Every input of the Erase tab checked, with one-line errors naming the bad value; and room for one
    more model (`--max-erasures`)."""
    preset = _check_preset(registry, preset)
    forget = check_prompt(forget, config.max_prompt_chars, "forget prompt").strip()
    surrogate = check_prompt(surrogate, config.max_prompt_chars, "surrogate prompt").strip()
    if preset and (forget or surrogate):
        raise ConceptEraseError(f"choose the preset {preset!r} or type prompts, not both "
                                f"(pick {CUSTOM!r} to erase your own prompts)")
    if not preset and not (forget and surrogate):
        raise ConceptEraseError("choose a preset, or type both a forget prompt and the surrogate it becomes")
    steps = check_int(steps, "steps", 1, config.max_erase_steps)
    num_forget_images = check_int(num_forget_images, "forget images", 1, config.max_erase_images)
    num_retain_images = check_int(num_retain_images, "retain images", 1, config.max_erase_images)
    if len(registry.added) >= config.max_erasures:
        raise ConceptEraseError(f"this app has made its {config.max_erasures} erased models (--max-erasures "
                                f"{config.max_erasures}); relaunch it to erase more")
    return EraseRequest(preset, forget, surrogate, steps, num_forget_images, num_retain_images)


def erase_root(config) -> Path:
    """Where the Erase tab's models go: --erase-output, else the cache folder's `app-erased/`."""
    from concept_erase.runtime import cache_root

    return Path(config.erase_output) if config.erase_output else cache_root() / ERASED_FOLDER


def output_folder(config, request: EraseRequest) -> Path:
    """A folder for the erased model that nothing has taken: `<slug>`, else `<slug>-2`, ... under `erase_root`."""
    root = erase_root(config)
    slug = re.sub(r"[^a-z0-9]+", "-", request.model_name.lower()).strip("-")[:60] or "erased"
    taken = lambda p: any(q.exists() or q.is_symlink() for q in  # noqa: E731
                          (p, p.with_name(p.name + ".lock"), p.with_name(p.name + ".checkpoints")))
    folder, i = root / slug, 2
    while taken(folder):
        folder, i = root / f"{slug}-{i}", i + 1
    return folder


def run_erase_request(registry: ModelRegistry, config, request: EraseRequest,
                      cancel: threading.Event | None = None,
                      progress: Callable[[float, str], None] | None = None) -> tuple[Model, dict]:
    """Erase from the base model with the library's job and add the result to the registry.
    Returns (the new model, the job's summary). Raises `Cancelled` when `cancel` is set during the run."""
    from concept_erase.diffusion.models.defaults import check_concept_fits
    from concept_erase.diffusion.training.config import EraseConfig
    from concept_erase.diffusion.training.job import run_erase

    concept = ({"concept": request.preset} if request.preset
               else {"forget": [request.forget], "surrogate": [request.surrogate]})
    folder = output_folder(config, request)
    erase_config = EraseConfig.for_concept(
        model=registry.get(registry.base_name).source, output=str(folder), method="salun", progress=False,
        steps=request.steps, num_forget_images=request.num_forget_images,
        num_retain_images=request.num_retain_images,
        # the images are sampled as the base is everywhere else (MiniSD: 25 steps, guidance 5), as `erase` does
        image_steps=registry.defaults.steps, image_guidance=registry.defaults.guidance, **concept)
    check_concept_fits(erase_config.get_concept(), registry.defaults)

    def on_step(done: int, total: int) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled at step {done} of {total}")
        if progress is not None:
            progress(done / total, f"SalUn step {done} of {total}")

    if progress is not None:
        progress(0.0, f"making {request.num_forget_images} forget and {request.num_retain_images} retain images "
                      "with the base model, then the saliency mask")
    summary = run_erase(erase_config, on_step=on_step)
    if progress is not None:
        progress(1.0, "loading the erased model")
    return registry.add(folder, request.model_name), summary


class EraseJobs:
    """The erase each page (gradio session) has asked for, and its cancel flag.

    A request is `announce`d when the button is pressed (so Cancel works while it still waits in the queue),
    `start`ed when the queue runs it, and `end`ed however it ends. One at a time per page."""

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: dict[str, tuple[threading.Event, bool]] = {}  # session -> (cancel flag, running)

    def announce(self, session: str) -> None:
        with self._lock:
            if self._jobs.get(session, (None, False))[1]:
                raise ConceptEraseError("this page is already erasing; wait for it or cancel it")
            self._jobs[session] = (threading.Event(), False)  # a stale announcement is replaced

    def start(self, session: str) -> threading.Event:
        with self._lock:
            flag, running = self._jobs.get(session, (threading.Event(), False))
            if running:
                raise ConceptEraseError("this page is already erasing; wait for it or cancel it")
            self._jobs[session] = (flag, True)
            return flag

    def cancel(self, session: str) -> bool:
        """Ask this page's erase to stop; False when it has none."""
        with self._lock:
            job = self._jobs.get(session)
        if job is not None:
            job[0].set()
        return job is not None

    def end(self, session: str) -> None:
        with self._lock:
            self._jobs.pop(session, None)


def erase(registry: ModelRegistry, config, jobs: EraseJobs, session: str, preset, forget, surrogate, steps,
          num_forget_images, num_retain_images,
          progress: Callable[[float, str], None] | None = None) -> tuple[str, Model | None]:
    """The Erase button's work for one page: check, run, and say what happened (Markdown).
    Returns (status, the new model, or None when cancelled)."""
    request = check_erase_request(registry, config, preset, forget, surrogate, steps, num_forget_images,
                                  num_retain_images)
    cancel = jobs.start(session)
    t0 = time.perf_counter()
    try:
        if cancel.is_set():  # cancelled while it waited in the queue
            raise Cancelled("cancelled before it started")
        model, summary = run_erase_request(registry, config, request, cancel, progress)
    except Cancelled as stop:
        return f"Erase {stop}: nothing was written.", None
    finally:
        jobs.end(session)
    what = request.preset or f"“{request.forget}” (into “{request.surrogate}”)"
    status = (f"Erased {what} from **{registry.base_name}** in {time.perf_counter() - t0:.0f} s "
              f"({summary['steps']} SalUn steps on {summary['forget_images']} forget and "
              f"{summary['retain_images']} retain images, {summary['keep']:.0%} of the UNet trainable). "
              f"**{model.name}** is now in the Compare, Concept and Evaluate tabs; written to "
              f"`{model.public_source}`.")
    return status, model
