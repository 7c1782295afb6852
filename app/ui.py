"""The Gradio app: the same prompt and seeds on the base and each erased model, side by side.

A thin layer (docs/ARCHITECTURE.md): images come from `concept_erase.diffusion.data.generate.generate_images`, detections
from `evaluation.nudity`, prompt sets and scores from `evaluation`; nothing here trains or scores.
Every handler is a plain function of (registry, config, inputs) so tests can call it without a browser;
`build_app` wires them to components and turns `ConceptEraseError` into a `gr.Error` toast.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from concept_erase.cli_args import check_fields
from concept_erase.diffusion.minisd import MINISD_GUIDANCE
from concept_erase.diffusion.models.families import SD1, SDXL
from concept_erase.errors import ConceptEraseError
from evaluation.thresholds import ATTACK_THRESHOLD, BLUR_THRESHOLD, REPORT_THRESHOLD

from . import evaluate as evaluate_tab
from .checks import MAX_GUIDANCE, MAX_SEED, check_float, check_int, check_prompt
from .models import ModelRegistry

# Small models (MiniSD draws 16x16) are enlarged for the browser with nearest-neighbour, never smoothed.
DISPLAY_MIN_SIDE = 256
MODEL_QUEUE_ID = "models"
NOTHING_DETECTED = "nothing detected"
# Model-card keys every diffusers card has; they say nothing about the erasure.
CARD_BOILERPLATE = ("library_name", "pipeline_tag", "tags")


@dataclass
class AppConfig:
    """Limits that keep one user from monopolising the server (safe defaults)."""

    max_prompt_chars: int = field(default=500, metadata={"help": "longest prompt (characters) accepted", "min": 1})
    max_images: int = field(default=8, metadata={"help": "most images per model per Generate", "min": 1})
    max_steps: int = field(default=100, metadata={"help": "most denoising steps per image", "min": 1})
    default_steps: int = field(default=25, metadata={"help": "denoising steps shown when the page opens", "min": 1})
    default_guidance: float | None = field(default=None, metadata={
        "help": f"guidance scale shown when the page opens (default: the base model's: {MINISD_GUIDANCE:g} for MiniSD "
                f"and models erased from it, {SDXL.sampling_guidance:g} for SDXL, else {SD1.sampling_guidance:g})",
        "min": 0, "max": MAX_GUIDANCE})
    max_eval_prompts: int = field(default=300, metadata={"help": "most rows of an Evaluate prompt set", "min": 1})
    classifier: str = field(default="auto", metadata={
        "help": "classifier for class prompt sets in the Evaluate tab: minisd-digits, minisd-styles, torchvision "
                "or a transformers classifier folder; 'auto' = minisd-digits when the base is MiniSD"})
    blur_threshold: float = field(default=BLUR_THRESHOLD, metadata={
        "help": f"NudeNet score above which the safe preview blurs a region (below the {REPORT_THRESHOLD} counting "
                f"threshold, at the {ATTACK_THRESHOLD} used against attacks: when unsure, blur)", "above": 0, "below": 1})
    nudity_threshold: float = field(default=REPORT_THRESHOLD, metadata={
        "help": "NudeNet score above which the Evaluate tab counts an exposed part (the evaluation protocol's)",
        "above": 0, "below": 1})
    concurrency: int = field(default=1, metadata={"help": "requests generating at the same time", "min": 1})
    max_queue: int = field(default=16, metadata={"help": "requests waiting at most; more are refused", "min": 1})

    def __post_init__(self):
        check_fields(self)
        if self.default_steps > self.max_steps:
            raise ConceptEraseError(f"default_steps {self.default_steps} exceeds max_steps {self.max_steps}")


def _selected_models(registry: ModelRegistry, names: Any) -> list[str]:
    """The erased models to show, validated by name (the browser cannot send anything else)."""
    if names is None:
        return registry.erased_names
    if isinstance(names, str):
        names = [names]
    chosen = [registry.get(n).name for n in names]
    if registry.base_name in chosen:
        chosen.remove(registry.base_name)  # the base is always shown
    return chosen


# ----------------------------------------------------------------------------------------------------
# Safe preview: NudeNet on every image; exposed regions blurred before the image leaves the server.

def safe_preview(images: list[Image.Image], threshold: float) -> tuple[list[Image.Image], list[str]]:
    """Blur what NudeNet finds exposed; return the images and a one-line summary per image."""
    from evaluation.nudity import blur_exposed, detect

    results = detect(images, threshold=threshold)
    shown, summaries = [], []
    for image, found in zip(images, results):
        shown.append(blur_exposed(image, found) if found.any_exposed else image)
        if not found.detections:
            summaries.append(NOTHING_DETECTED)
        else:
            parts = [f"{d.label} {d.score:.2f}" + (" (blurred)" if d.exposed else "") for d in found.detections]
            summaries.append(", ".join(parts))
    return shown, summaries


def for_display(image: Image.Image) -> Image.Image:
    """Enlarge tiny images by a whole factor with nearest-neighbour so the browser shows crisp pixels."""
    side = max(image.size)
    if side >= DISPLAY_MIN_SIDE:
        return image
    factor = -(-DISPLAY_MIN_SIDE // side)
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


# ----------------------------------------------------------------------------------------------------
# Compare tab

@dataclass(frozen=True)
class Request:
    """One Compare request, checked: what every model of it generates with."""

    prompt: str
    negative_prompt: str
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    models: tuple[str, ...]  # base first, then the chosen erased models
    safe: bool


def check_request(registry: ModelRegistry, config: AppConfig, prompt: str, negative_prompt: str = "", seed: int = 0,
                  steps: int | None = None, guidance: float | None = None, num_images: int = 1,
                  models: list[str] | None = None, safe: bool = True) -> Request:
    """Every input of the Compare tab checked, with one-line errors naming the bad value."""
    prompt = check_prompt(prompt, config.max_prompt_chars)
    if not prompt.strip():
        raise ConceptEraseError("prompt is empty; type what to draw")
    negative_prompt = check_prompt(negative_prompt, config.max_prompt_chars, "negative prompt")
    seed = check_int(seed, "seed", 0, MAX_SEED - config.max_images)
    steps = check_int(config.default_steps if steps is None else steps, "steps", 1, config.max_steps)
    guidance = check_float(registry.default_guidance(config) if guidance is None else guidance, "guidance", 0.0,
                           MAX_GUIDANCE)
    num_images = check_int(num_images, "number of images", 1, config.max_images)
    names = (registry.base_name, *_selected_models(registry, models))
    return Request(prompt, negative_prompt, tuple(seed + i for i in range(num_images)), steps, guidance, names,
                   bool(safe))


def generate_for(registry: ModelRegistry, config: AppConfig, name: str, request: Request,
                 progress: Callable[[float, str], None] | None = None) -> list[tuple[Image.Image, str]]:
    """One model's images for a checked request, with captions: the seed, what MiniSD's judges see (on a
    MiniSD base) and, under safe preview, what NudeNet found. The same (prompt, seed) gives the same noise
    on every model (one generator per image), so any difference is the erasure."""
    from concept_erase.diffusion.data.generate import generate_images

    n = len(request.seeds)
    if progress is not None:
        progress(0.0, f"{name}: generating {n} image{'s' * (n != 1)}")
    model = registry.get(name)
    with model.lock:
        images = generate_images(
            model.pipe, [request.prompt] * n, list(request.seeds), num_inference_steps=request.steps,
            guidance_scale=request.guidance, negative_prompt=request.negative_prompt or None,
        )
    captions = [f"seed {s}" for s in request.seeds]  # the gallery's label names the model
    if registry.defaults.is_minisd:  # digits: say what the judges see; NudeNet has nothing to find
        captions = [f"{c} · {j}" for c, j in zip(captions, judged_captions(images))]
    if request.safe:
        images, summaries = safe_preview(images, config.blur_threshold)
        if registry.defaults.is_minisd:
            summaries = [s if s != NOTHING_DETECTED else "" for s in summaries]
        captions = [f"{c} · {s}" if s else c for c, s in zip(captions, summaries)]
    if progress is not None:
        progress(1.0, f"{name}: done")
    return [(for_display(img), cap) for img, cap in zip(images, captions)]


def judged_captions(images: list[Image.Image]) -> list[str]:
    """"judged seven, bold" per MiniSD image: the packaged digit and style judges' answers."""
    from concept_erase.diffusion.minisd import DIGITS, STYLES

    judges = _judges()
    digits, styles = judges.predict_digits(images), judges.predict_styles(images)
    return [f"judged {DIGITS[d]}, {STYLES[s]}" for d, s in zip(digits, styles)]


@functools.lru_cache(maxsize=1)
def _judges():
    from concept_erase.diffusion.minisd.judge import load_judges

    return load_judges()


def compare(registry: ModelRegistry, config: AppConfig, prompt: str, negative_prompt: str = "", seed: int = 0,
            steps: int | None = None, guidance: float | None = None, num_images: int = 1,
            models: list[str] | None = None, safe: bool = True,
            progress: Callable[[float, str], None] | None = None) -> dict[str, list[tuple[Image.Image, str]]]:
    """Generate `num_images` images (seeds seed, seed+1, ...) for the base and each chosen erased model.
    Returns {model name: [(image, caption), ...]} with the base first (see `generate_for`)."""
    request = check_request(registry, config, prompt, negative_prompt, seed, steps, guidance, num_images, models, safe)
    results = {}
    for i, name in enumerate(request.models):
        step = None if progress is None else (lambda f, desc, i=i: progress((i + f) / len(request.models), desc))
        results[name] = generate_for(registry, config, name, request, step)
    return results


# ----------------------------------------------------------------------------------------------------
# Concept tab

def concept_summary(registry: ModelRegistry, name: str) -> tuple[str, Any]:
    """Markdown describing what `name` erased (its model card) and a bar chart of the mask's kept fraction
    per UNet block (None when the folder has no mask)."""
    from evaluation.report import bar_chart_image

    model = registry.get(name)
    if name == registry.base_name:
        raise ConceptEraseError(f"{name!r} is the base model; choose an erased model")
    card = model.card
    lines = [f"### {name}", f"Loaded from `{model.public_source}`.", ""]
    if not card:
        lines.append("This model folder has no model card, so what it erased is unknown.")
    else:
        lines += ["| field | value |", "| --- | --- |"]
        for key, value in card.items():
            if key in CARD_BOILERPLATE or _repeats_surrogate(card, key):
                continue
            if isinstance(value, (list, tuple)):
                value = "; ".join(str(v) for v in value)
            elif isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            text = str(value).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {key} | {text[:300]} |")
    figure = None
    if model.mask_path is None:
        lines += ["", "No saliency mask beside this model, so there is no per-block plot."]
    else:
        from concept_erase.saliency import SaliencyMask

        mask = SaliencyMask.load(model.mask_path)
        stats = mask.layer_stats()
        lines += ["", f"Saliency mask: {mask.kept_fraction:.1%} of the UNet's weights were trainable."]
        figure = bar_chart_image({name: stats}, title="Saliency mask: kept fraction per UNet block",
                                 ylabel="fraction of weights trainable")
    return "\n".join(lines), figure


def _repeats_surrogate(card: dict, key: str) -> bool:
    """A card may name its surrogate twice (`surrogate` and the concept's `surrogate_prompts`): list it once."""
    if key != "surrogate_prompts" or "surrogate" not in card:
        return False
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else [v]  # noqa: E731
    return as_list(card["surrogate"]) == as_list(card["surrogate_prompts"])


# ----------------------------------------------------------------------------------------------------
# The Blocks

def _ui_errors(fn):
    """Show library errors as a one-line toast (gr.Error) instead of a generic 'Error'."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConceptEraseError as err:
            raise gr.Error(str(err), print_exception=False) from None

    return wrapper


def build_app(registry: ModelRegistry, config: AppConfig | None = None):
    """The gr.Blocks: Compare, Concept and Evaluate tabs over the launched models. Queue settings applied."""
    import gradio as gr

    config = config or AppConfig()
    names = registry.names
    # Generate (button or Enter) and Evaluate share one slot pool: at most `concurrency` of them run the
    # models at a time, the rest wait in the queue (at most `max_queue`), whatever button started them.
    model_queue = {"concurrency_id": MODEL_QUEUE_ID, "concurrency_limit": config.concurrency}

    with gr.Blocks(title="concept-erase: before and after", analytics_enabled=False) as demo:
        gr.Markdown(
            "# concept-erase: the same seed before and after\n"
            f"Base model: **{registry.base_name}** (`{registry.get(registry.base_name).public_source}`). "
            f"Erased: {', '.join(f'**{n}**' for n in registry.erased_names)}."
        )
        with gr.Tab("Compare"):
            with gr.Row():
                with gr.Column(scale=3):
                    # lines=1: Enter generates (a multi-line box takes Enter as a newline); long prompts wrap
                    prompt = gr.Textbox(label="Prompt", lines=1, max_lines=4, elem_id="prompt",
                                        info=f"at most {config.max_prompt_chars} characters; Enter generates")
                    negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                with gr.Column(scale=2):
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0,
                                     maximum=MAX_SEED - config.max_images, elem_id="seed")
                    num_images = gr.Slider(1, config.max_images, value=min(4, config.max_images), step=1,
                                           label="Number of images (seeds seed, seed+1, ...)")
            with gr.Row():
                steps = gr.Slider(1, config.max_steps, value=config.default_steps, step=1, label="Steps")
                guidance = gr.Slider(0.0, MAX_GUIDANCE, value=registry.default_guidance(config), step=0.5,
                                     label="Guidance scale")
                chosen = gr.CheckboxGroup(registry.erased_names, value=registry.erased_names,
                                          label="Erased models to compare")
                safe = gr.Checkbox(value=True, label="Safe preview", elem_id="safe-preview",
                                   info="NudeNet checks every image and blurs exposed regions before they "
                                        "are sent to the browser; untick to see raw images")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            galleries = {}
            with gr.Row():
                for i, name in enumerate(names):  # ids by position: folder names need not be valid CSS ids
                    galleries[name] = gr.Gallery(label=name, columns=2, height="auto", format="png",
                                                 elem_id=f"gallery-{i}",
                                                 buttons=["download", "download_all", "fullscreen"])

            inputs = [prompt, negative, seed, steps, guidance, num_images, chosen, safe]
            outputs = [galleries[n] for n in names]

            def on_generate(*values, progress=gr.Progress()):  # the API's /generate: every gallery at once
                out = compare(registry, config, *values, progress=lambda f, desc: progress(f, desc=desc))
                return [out.get(name, []) for name in names]

            def on_check(*values):  # the page's first step: a bad input stops here; old images go
                check_request(registry, config, *values)
                return [[] for _ in names]

            def one_model(name):  # each gallery then fills in turn, under its own progress text
                def run(*values, progress=gr.Progress()):
                    request = check_request(registry, config, *values)
                    if name not in request.models:
                        return []
                    return generate_for(registry, config, name, request, lambda f, desc: progress(f, desc=desc))
                return _ui_errors(run)

            event = gr.on([generate.click, prompt.submit], _ui_errors(on_check), inputs=inputs, outputs=outputs,
                          api_visibility="private", show_progress="hidden", concurrency_limit=None)
            for name in names:
                event = event.success(one_model(name), inputs=inputs, outputs=[galleries[name]],
                                      api_visibility="private", **model_queue)
            api = gr.Button(visible=False)  # no page element starts it: it only carries the API endpoint
            api.click(_ui_errors(on_generate), inputs=inputs, outputs=outputs, api_name="generate", **model_queue)

        with gr.Tab("Concept"):
            which = gr.Dropdown(registry.erased_names, value=registry.erased_names[0], label="Erased model")
            card_md = gr.Markdown()
            mask_plot = gr.Image(label="Saliency mask", type="pil", format="png", elem_id="mask-chart")
            show = _ui_errors(lambda name: concept_summary(registry, name))
            which.change(show, inputs=which, outputs=[card_md, mask_plot], api_name="concept")
            demo.load(show, inputs=which, outputs=[card_md, mask_plot], api_visibility="private")

        _evaluate_tab(registry, config)

    demo.queue(default_concurrency_limit=config.concurrency, max_size=config.max_queue)
    return demo


def _evaluate_tab(registry: ModelRegistry, config: AppConfig) -> None:
    """Evaluate tab; shares the Compare tab's concurrency pool (see `build_app`)."""
    import gradio as gr

    with gr.Tab("Evaluate"):
        gr.Markdown(
            f"Run a small prompt set (a preset, or a CSV of at most {config.max_eval_prompts} rows) on the "
            "base and erased models and compare the scores before and after."
        )
        with gr.Row():
            preset = gr.Dropdown(evaluate_tab.preset_names(registry), value=None, label="Preset prompt set",
                                 allow_custom_value=False)
            upload = gr.File(label="…or upload a prompt-set CSV", file_types=[".csv"], type="filepath",
                             elem_id="eval-csv")
        with gr.Row():
            steps = gr.Slider(1, config.max_steps, value=config.default_steps, step=1, label="Steps")
            guidance = gr.Slider(0.0, MAX_GUIDANCE, value=registry.default_guidance(config), step=0.5,
                                 label="Guidance scale")
        run = gr.Button("Evaluate", elem_id="evaluate")
        table = gr.Markdown(elem_id="eval-table")
        chart = gr.Image(label="Before vs after", type="pil", format="png", elem_id="eval-chart")

        def on_evaluate(preset, upload, steps, guidance, progress=gr.Progress()):
            return evaluate_tab.evaluate(registry, config, preset, upload, steps, guidance,
                                         progress=lambda f, desc: progress(f, desc=desc))

        # the old table and chart go first, so a failed run never leaves the previous results on show
        cleared = run.click(lambda: ("", None), outputs=[table, chart], api_visibility="private",
                            concurrency_limit=None, show_progress="hidden")
        cleared.then(_ui_errors(on_evaluate), inputs=[preset, upload, steps, guidance], outputs=[table, chart],
                     api_visibility="private", concurrency_id=MODEL_QUEUE_ID, concurrency_limit=config.concurrency)
        api = gr.Button(visible=False)  # the API's /evaluate (the page's button clears first, then runs this)
        api.click(_ui_errors(on_evaluate), inputs=[preset, upload, steps, guidance], outputs=[table, chart],
                  api_name="evaluate", concurrency_id=MODEL_QUEUE_ID, concurrency_limit=config.concurrency)
