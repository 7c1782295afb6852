"""The Gradio app: the same prompt and seeds on the base and each erased model, side by side.

A thin layer (docs/ARCHITECTURE.md): images come from `concept_erase.diffusion.data.generate.generate_images`, detections
from `evaluation.nudity`, prompt sets and scores from `evaluation`, and the Erase tab's models from the library's
erase job (`erase.py`); nothing here trains or scores on its own.
Every handler is a plain function of (registry, config, inputs) so tests can call it without a browser;
`build_app` wires them to components and turns `ConceptEraseError` into a `gr.Error` toast.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from concept_erase.cli_args import check_fields
from concept_erase.diffusion.minisd import MINISD_GUIDANCE
from concept_erase.diffusion.models.families import SD1, SDXL
from concept_erase.errors import ConceptEraseError
from evaluation.thresholds import ATTACK_THRESHOLD, BLUR_THRESHOLD, REPORT_THRESHOLD

from . import erase as erase_tab
from . import evaluate as evaluate_tab
from .checks import MAX_GUIDANCE, MAX_SEED, MAX_STRENGTH, check_float, check_int, check_prompt
from .models import ModelRegistry

# Small models (MiniSD draws 16x16) are enlarged for the browser with nearest-neighbour, never smoothed.
DISPLAY_MIN_SIDE = 256
MODEL_QUEUE_ID = "models"
ERASE_QUEUE_ID = "erase"  # one erase at a time on the server; the others wait in the queue
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
    max_erasures: int = field(default=4, metadata={
        "help": "models the Erase tab may make while the app runs (each stays in memory; 0: no Erase tab)",
        "min": 0})
    max_erase_steps: int = field(default=100, metadata={
        "help": "most SalUn optimizer steps of one erase in the Erase tab (MiniSD's presets: 50)", "min": 1})
    max_erase_images: int = field(default=256, metadata={
        "help": "most forget images, and most retain images, one erase generates with the base model "
                "(MiniSD's presets: 48 and 216)", "min": 1})
    erase_output: str | None = field(default=None, metadata={
        "help": "folder the Erase tab writes its models into, each in a new folder of its own (default: "
                "$CONCEPT_ERASE_CACHE or ~/.cache/concept-erase, under app-erased/)", "metavar": "DIR"})

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
    strength: float = 1.0  # of every erasure file applied to the base (`--erasure`)


def check_request(registry: ModelRegistry, config: AppConfig, prompt: str, negative_prompt: str = "", seed: int = 0,
                  steps: int | None = None, guidance: float | None = None, num_images: int = 1,
                  models: list[str] | None = None, safe: bool = True, strength: float = 1.0) -> Request:
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
    strength = check_float(1.0 if strength is None else strength, "strength", 0.0, MAX_STRENGTH)
    return Request(prompt, negative_prompt, tuple(seed + i for i in range(num_images)), steps, guidance, names,
                   bool(safe), strength)


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
        if model.strength is not None:
            model.strength.set(model.pipe, request.strength)
        images = generate_images(
            model.pipe, [request.prompt] * n, list(request.seeds), num_inference_steps=request.steps,
            guidance_scale=request.guidance, negative_prompt=request.negative_prompt or None,
        )
    captions = [f"seed {s}" for s in request.seeds]  # the gallery's label names the model
    if model.strength is not None:
        captions = [f"{c} · strength {request.strength:g}" for c in captions]
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
            models: list[str] | None = None, safe: bool = True, strength: float = 1.0,
            progress: Callable[[float, str], None] | None = None) -> dict[str, list[tuple[Image.Image, str]]]:
    """Generate `num_images` images (seeds seed, seed+1, ...) for the base and each chosen erased model (an
    erasure file's at `strength`). Returns {model name: [(image, caption), ...]} with the base first (see
    `generate_for`)."""
    request = check_request(registry, config, prompt, negative_prompt, seed, steps, guidance, num_images, models, safe,
                            strength)
    results = {}
    for i, name in enumerate(request.models):
        step = None if progress is None else (lambda f, desc, i=i: progress((i + f) / len(request.models), desc))
        results[name] = generate_for(registry, config, name, request, step)
    return results


# Example prompts for a base that is not MiniSD: everyday subjects any Stable Diffusion draws.
GENERIC_EXAMPLES = ("a photo of a cat on a sofa", "a church in a snowy village", "a painting of a lighthouse at dusk")


def example_prompts(registry: ModelRegistry) -> list[str]:
    """The Compare tab's example prompts: MiniSD's own wording on a MiniSD base (a digit in each style),
    else a few generic prompts."""
    if not registry.defaults.is_minisd:
        return list(GENERIC_EXAMPLES)
    from concept_erase.diffusion.minisd import minisd_prompt

    return [minisd_prompt(d, s) for d, s in (("seven", "plain"), ("three", "bold"), ("one", "negative"),
                                             ("eight", "plain"))]


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
    """The gr.Blocks: Compare, Concept, Evaluate and Erase tabs over the registry's models. Queue settings applied."""
    import gradio as gr

    config = config or AppConfig()
    # One gallery per model: those launched, then room for the ones the Erase tab makes (hidden until then).
    slots = len(registry.names) + config.max_erasures
    # Generate (button or Enter) and Evaluate share one slot pool: at most `concurrency` of them run the
    # models at a time, the rest wait in the queue (at most `max_queue`), whatever button started them.
    model_queue = {"concurrency_id": MODEL_QUEUE_ID, "concurrency_limit": config.concurrency}

    with gr.Blocks(title="concept-erase: before and after", analytics_enabled=False) as demo:
        header = gr.Markdown(_header(registry))
        with gr.Tab("Compare"):
            with gr.Row():
                with gr.Column(scale=3):
                    # lines=1: Enter generates (a multi-line box takes Enter as a newline); long prompts wrap
                    prompt = gr.Textbox(label="Prompt", lines=1, max_lines=4, elem_id="prompt",
                                        info=f"at most {config.max_prompt_chars} characters; Enter generates")
                    negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                    gr.Examples([[p] for p in example_prompts(registry)], inputs=[prompt], label="Example prompts",
                                elem_id="examples")
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
                # base + strength x the erasure file's difference (`concept-erase apply --strength`); shown only
                # when the app was launched with --erasure
                strength = gr.Slider(0.0, MAX_STRENGTH, value=1.0, step=0.05, label="Erasure strength",
                                     visible=registry.has_strength, elem_id="strength",
                                     info="0: the base as it is; 1: the erasure as made; above 1: pushed further")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            galleries = []
            with gr.Row():
                for i, name in enumerate(_slot_names(registry, slots)):  # ids by position: names need not be CSS ids
                    galleries.append(gr.Gallery(label=name, visible=bool(name), columns=2, height="auto",
                                                format="png", elem_id=f"gallery-{i}",
                                                buttons=["download", "download_all", "fullscreen"]))

            inputs = [prompt, negative, seed, steps, guidance, num_images, chosen, safe, strength]

            def on_generate(*values, progress=gr.Progress()):  # the API's /generate: every gallery at once
                out = compare(registry, config, *values, progress=lambda f, desc: progress(f, desc=desc))
                return [out.get(name, []) for name in _slot_names(registry, slots)]

            def on_check(*values):  # the page's first step: a bad input stops here; old images go
                check_request(registry, config, *values)
                return [[] for _ in galleries]

            def one_model(i):  # each gallery then fills in turn, under its own progress text
                def run(*values, progress=gr.Progress()):
                    request = check_request(registry, config, *values)
                    name = _slot_names(registry, slots)[i]
                    if name not in request.models:
                        return []
                    return generate_for(registry, config, name, request, lambda f, desc: progress(f, desc=desc))
                return _ui_errors(run)

            event = gr.on([generate.click, prompt.submit], _ui_errors(on_check), inputs=inputs, outputs=galleries,
                          api_visibility="private", show_progress="hidden", concurrency_limit=None)
            for i, gallery in enumerate(galleries):
                event = event.success(one_model(i), inputs=inputs, outputs=[gallery], api_visibility="private",
                                      **model_queue)
            api = gr.Button(visible=False)  # no page element starts it: it only carries the API endpoint
            api.click(_ui_errors(on_generate), inputs=inputs, outputs=galleries, api_name="generate", **model_queue)

        with gr.Tab("Concept"):
            which = gr.Dropdown(registry.erased_names, value=registry.erased_names[0], label="Erased model")
            card_md = gr.Markdown()
            mask_plot = gr.Image(label="Saliency mask", type="pil", format="png", elem_id="mask-chart")
            show = _ui_errors(lambda name: concept_summary(registry, name))
            which.change(show, inputs=which, outputs=[card_md, mask_plot], api_name="concept")
            demo.load(show, inputs=which, outputs=[card_md, mask_plot], api_visibility="private")

        _evaluate_tab(registry, config)

        def offer_models():  # every page shows the registry as it is now: on load, and after each erase
            _offer_models(registry, chosen, which)
            return ([gr.Gallery(label=name, visible=bool(name)) for name in _slot_names(registry, slots)]
                    + [gr.CheckboxGroup(choices=registry.erased_names, value=registry.erased_names),
                       gr.Dropdown(choices=registry.erased_names), _header(registry)])

        offered = [*galleries, chosen, which, header]
        demo.load(offer_models, outputs=offered, api_visibility="private", show_progress="hidden")
        if config.max_erasures:
            _erase_tab(demo, registry, config, offer_models, offered)

    demo.queue(default_concurrency_limit=config.concurrency, max_size=config.max_queue)
    return demo


def _header(registry: ModelRegistry) -> str:
    return ("# concept-erase: the same seed before and after\n"
            f"Base model: **{registry.base_name}** (`{registry.get(registry.base_name).public_source}`). "
            f"Erased: {', '.join(f'**{n}**' for n in registry.erased_names)}.")


def _slot_names(registry: ModelRegistry, slots: int) -> list[str]:
    """The model each Compare gallery shows, by position ("" for a gallery not in use yet)."""
    names = registry.names[:slots]
    return names + [""] * (slots - len(names))


def _offer_models(registry: ModelRegistry, *menus) -> None:
    """Make the menus' own choices (what a call that never received a page's update is checked against: the
    API's) the registry's erased models."""
    for menu in menus:
        menu.choices = [(name, name) for name in registry.erased_names]


def _erase_tab(demo, registry: ModelRegistry, config: AppConfig, offer_models: Callable, offered: list) -> None:
    """Erase tab: SalUn from a preset or two prompts with the library's job (`erase.py`), one at a time on the
    server, with progress and Cancel; the new model then joins every page's menus (`offer_models`)."""
    import gradio as gr

    jobs = erase_tab.EraseJobs()
    presets = erase_tab.erase_presets(registry)
    first = presets[0] if presets else erase_tab.CUSTOM
    opening = erase_tab.erase_defaults(registry, config, first)
    with gr.Tab("Erase"):
        gr.Markdown(
            f"Erase a concept from **{registry.base_name}** with SalUn (a saliency mask, then fine-tuning of the "
            "masked weights): pick a preset or type your own prompts. The base model draws the training images "
            f"first. The new model joins the Compare, Concept and Evaluate tabs; this app makes at most "
            f"{config.max_erasures}.")
        page = gr.State()  # this page's own name, so Cancel stops this page's erase and no other
        demo.load(lambda: secrets.token_hex(8), outputs=page, api_visibility="private", show_progress="hidden")
        with gr.Row():
            preset = gr.Dropdown([erase_tab.CUSTOM, *presets], value=first, label="Preset", elem_id="erase-preset")
            forget = gr.Textbox(label="Forget prompt", lines=1, elem_id="erase-forget", interactive=not presets,
                                placeholder=example_prompts(registry)[0])
            surrogate = gr.Textbox(label="Surrogate prompt (what it becomes)", lines=1, elem_id="erase-surrogate",
                                   interactive=not presets, placeholder=example_prompts(registry)[-1])
        about = gr.Markdown(erase_tab.preset_summary(registry, first), elem_id="erase-about")
        with gr.Row():
            steps = gr.Slider(1, config.max_erase_steps, value=opening["steps"], step=1, label="SalUn steps",
                              elem_id="erase-steps")
            num_forget = gr.Slider(1, config.max_erase_images, value=opening["num_forget_images"], step=1,
                                   label="Forget images", elem_id="erase-forget-images")
            num_retain = gr.Slider(1, config.max_erase_images, value=opening["num_retain_images"], step=1,
                                   label="Retain images", elem_id="erase-retain-images")
        with gr.Row():
            run = gr.Button("Erase", variant="primary", elem_id="erase")
            cancel = gr.Button("Cancel", variant="stop", elem_id="erase-cancel")
        status = gr.Markdown(elem_id="erase-status")
        card_md = gr.Markdown(elem_id="erase-card")
        mask_plot = gr.Image(label="Saliency mask", type="pil", format="png", elem_id="erase-mask")

        def on_preset(name):  # a preset brings its recipe; custom prompts open the two boxes
            values = erase_tab.erase_defaults(registry, config, name)
            custom = name == erase_tab.CUSTOM
            return (erase_tab.preset_summary(registry, name), gr.Textbox(value="", interactive=custom),
                    gr.Textbox(value="", interactive=custom), values["steps"], values["num_forget_images"],
                    values["num_retain_images"])

        preset.change(_ui_errors(on_preset), inputs=preset, outputs=[about, forget, surrogate, steps, num_forget,
                                                                     num_retain],
                      api_visibility="private", show_progress="hidden", concurrency_limit=None)
        settings = [preset, forget, surrogate, steps, num_forget, num_retain]

        def on_announce(page, *values):  # checked at once, so a bad input never waits in the queue
            erase_tab.check_erase_request(registry, config, *values)
            jobs.announce(page)
            return "Waiting for the erase queue…", "", None

        def on_erase(page, *values, progress=gr.Progress()):
            text, model = erase_tab.erase(registry, config, jobs, page, *values,
                                          progress=lambda f, desc: progress(f, desc=desc))
            if model is None:
                return text, "", None
            card, figure = concept_summary(registry, model.name)
            return text, card, figure

        def on_cancel(page):
            if jobs.cancel(page):
                gr.Info("Cancelling: the erase stops at its next step and writes nothing")

        started = run.click(_ui_errors(on_announce), inputs=[page, *settings], outputs=[status, card_md, mask_plot],
                            api_visibility="private", show_progress="hidden", concurrency_limit=None)
        erased = started.success(_ui_errors(on_erase), inputs=[page, *settings], outputs=[status, card_md, mask_plot],
                                 api_visibility="private", show_progress_on=[status], concurrency_id=ERASE_QUEUE_ID,
                                 concurrency_limit=1)
        erased.success(offer_models, outputs=offered, api_visibility="private", show_progress="hidden",
                       concurrency_limit=None)
        cancel.click(on_cancel, inputs=page, api_visibility="private", concurrency_limit=None, show_progress="hidden")


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
