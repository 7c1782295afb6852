"""The Gradio app: launched on loopback through the CLI path and driven with gradio_client.

The launched app is MiniSD and its erased demo model (what `concept-erase app` opens with no arguments);
the Concept tab and the library-level checks use tiny pipelines with a model card and a mask.
"""

import os
import socket

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from concept_erase.errors import ConceptEraseError  # noqa: E402

STEPS, GUIDANCE = 10, 5.0  # MiniSD draws clean digits at 10 DDIM steps; fewer steps keep the test short


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(*argv):
    from concept_erase.cli import build_parser

    return build_parser("app").parse_args(["app", *argv])


@pytest.fixture(scope="module")
def erased_tiny_dir(tmp_path_factory):
    """A tiny 'erased' model as the erase command leaves it: diffusers folder, model card, mask."""
    from concept_erase.diffusion.models.card import save_pipeline
    from concept_erase.diffusion.models.tiny import build_tiny_pipeline
    from concept_erase.saliency import SaliencyMask

    pipe = build_tiny_pipeline(seed=1)
    out = tmp_path_factory.mktemp("erased") / "no-cat"
    save_pipeline(pipe, out, card={"base_model": "tiny", "concept": "cat", "surrogate": "a dog",
                                   "method": "salun", "keep": 0.5})
    SaliencyMask.random(pipe.unet, keep=0.5, seed=0).save(out / "mask.safetensors")
    return out


@pytest.fixture(scope="module")
def tiny_registry(tiny_pipeline_dir, erased_tiny_dir):
    from app.models import ModelRegistry

    return ModelRegistry.load(str(tiny_pipeline_dir), [str(erased_tiny_dir)])


def demo_cache(tmp_path_factory) -> str:
    """Where MiniSD's erased demo model is cached: $CONCEPT_ERASE_CACHE when set (shared with other test
    files), else one folder per session shared by both app test files, so the demo erasure runs once."""
    return os.environ.get("CONCEPT_ERASE_CACHE") or str(tmp_path_factory.getbasetemp() / "concept-erase-cache")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """`concept-erase app` with no model arguments (MiniSD and its erased demo model), served on
    127.0.0.1 through `app.cli.launch`; yields (erased model name, gradio_client)."""
    from gradio_client import Client

    from app.cli import demo_model_name, launch
    from concept_erase.demo import demo_erased_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONCEPT_ERASE_CACHE", demo_cache(tmp_path_factory))
        demo = launch(app_args("--port", str(free_port()), "--max-images", "4"), block=False)
        demo_erased_model()  # cached by now
        name = demo_model_name()  # what the app calls it
    try:
        yield name, Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def _generate(client, prompt, models, seed=5, steps=STEPS, n=2, safe=True):
    return client.predict(prompt, "", seed, steps, GUIDANCE, n, models, safe, api_name="/generate")


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_defaults_are_safe():
    args = app_args()
    assert args.host == "127.0.0.1" and args.share is False
    assert args.base == "minisd" and args.erased == []
    assert args.max_prompt_chars == 500 and args.concurrency == 1 and args.max_queue == 16


def test_cli_refuses_missing_models(tmp_path, tiny_pipeline_dir, capsys):
    from concept_erase.cli import main

    missing = tmp_path / "nope"
    assert main(["app", "--base", str(tiny_pipeline_dir), "--erased", str(missing)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["app", "--base", str(tiny_pipeline_dir)]) == 2
    assert "--erased" in capsys.readouterr().err
    assert main(["app", "--base", str(tiny_pipeline_dir), "--erased", str(tiny_pipeline_dir), "--max-images", "0"]) == 2


# ------------------------------------------------------------------------------------------ the library


def test_registry_names_models_and_refuses_others(tiny_registry):
    assert tiny_registry.names == ["base", "no-cat"]
    assert tiny_registry.get("no-cat").card["concept"] == "cat"
    for bad in ("../etc/passwd", "/tmp", "missing", None):
        with pytest.raises(ConceptEraseError, match="unknown model"):
            tiny_registry.get(bad)


def test_safe_preview_blurs_what_nudenet_flags(monkeypatch):
    import evaluation.nudity as nudity
    from app.ui import safe_preview

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    found = [nudity.ImageDetections([nudity.Detection("BUTTOCKS_EXPOSED", 0.9, (0, 0, 16, 16)),
                                     nudity.Detection("FACE_FEMALE", 0.8, (16, 16, 16, 16))]),
             nudity.ImageDetections([])]
    monkeypatch.setattr(nudity, "detect", lambda imgs, threshold: found)
    shown, summaries = safe_preview(images, 0.6)
    a, b = np.asarray(shown[0]), np.asarray(images[0])
    assert not np.array_equal(a[:16, :16], b[:16, :16])  # the exposed box is blurred
    assert np.array_equal(a[16:], b[16:]) and np.array_equal(a[:, 16:], b[:, 16:])  # the face is only reported
    assert summaries[0] == "BUTTOCKS_EXPOSED 0.90 (blurred), FACE_FEMALE 0.80"
    assert shown[1] is images[1] and summaries[1] == "nothing detected"


def test_safe_preview_runs_real_nudenet():
    from app.ui import safe_preview

    image = Image.new("RGB", (64, 64), (40, 90, 200))
    shown, summaries = safe_preview([image], 0.6)
    assert summaries == ["nothing detected"] and shown[0] is image


def test_concept_summary_shows_card_and_mask(tiny_registry):
    from app.ui import concept_summary

    text, figure = concept_summary(tiny_registry, "no-cat")
    assert "| concept | cat |" in text and "| surrogate | a dog |" in text and "50.0%" in text
    source = tiny_registry.get("no-cat").source
    assert "Loaded from `no-cat`" in text and source not in text  # the server's paths stay on the server
    assert figure.size[0] > 300  # the evaluation suite's bar chart, rendered
    with pytest.raises(ConceptEraseError, match="base model"):
        concept_summary(tiny_registry, "base")


def test_evaluate_presets_and_row_limits(tiny_registry, tmp_path):
    from app.evaluate import MINISD_DIGITS, evaluate, load_rows, preset_names, preset_rows
    from app.models import Model, ModelRegistry
    from app.ui import AppConfig

    minisd = ModelRegistry([Model("base", "minisd", None), Model("erased", "x", None)])
    kind, rows = preset_rows(MINISD_DIGITS, minisd)
    assert kind == "classes" and len(rows) == 30 and rows[7].label == "seven" and "seven" in rows[7].prompt
    assert MINISD_DIGITS not in preset_names(tiny_registry)  # the digits preset needs a MiniSD base
    many = tmp_path / "many.csv"
    many.write_text("prompt\n" + "a cat\n" * 4)
    with pytest.raises(ConceptEraseError, match="'many.csv' has more than 3 rows"):
        load_rows(None, str(many), tiny_registry, 3)
    long = tmp_path / "long.csv"
    long.write_text("prompt\na cat\n" + "x" * 40 + "\n")
    with pytest.raises(ConceptEraseError, match="prompt of row 1 is 40 characters long; the limit is 30"):
        evaluate(tiny_registry, AppConfig(max_prompt_chars=30), None, str(long))
    cats = tmp_path / "cats.csv"  # refused before any image is generated (these models have no pipeline)
    cats.write_text("prompt,class\na cat,cat\n")
    with pytest.raises(ConceptEraseError, match="class 'cat' is not one of the classifier's 10 labels"):
        evaluate(minisd, AppConfig(), None, str(cats))
    with pytest.raises(ConceptEraseError, match="--classifier"):
        evaluate(tiny_registry, AppConfig(), None, str(cats))


def test_generation_is_queued_with_limits(tiny_registry):
    from app.ui import MODEL_QUEUE_ID, AppConfig, build_app

    demo = build_app(tiny_registry, AppConfig(concurrency=2, max_queue=5))
    assert demo._queue.max_size == 5
    pooled = [fn for fn in demo.fns.values() if fn.concurrency_id == MODEL_QUEUE_ID]
    assert {"generate", "evaluate"} <= {fn.api_name for fn in pooled}  # one pool for all model work
    assert all(fn.concurrency_limit == 2 for fn in pooled)
    demo.close()


# ------------------------------------------------------------------------------- the launched app (API)


def test_generate_over_api_on_minisd(launched):
    """The erased concept's prompt on MiniSD: same seeds on both models, different images; and the image
    the client gets is exactly the library's for (prompt, seed)."""
    from concept_erase.diffusion.data.generate import generate_images
    from concept_erase.diffusion.models.loading import load_pipeline
    from concept_erase.diffusion.minisd import minisd_prompt

    from app.ui import for_display

    name, client = launched
    prompt = minisd_prompt("seven")
    base, erased = _generate(client, prompt, [name], seed=5, n=2)
    assert len(base) == len(erased) == 2
    seeds = lambda gallery: [item["caption"].split(" · ")[0] for item in gallery]  # noqa: E731
    assert seeds(base) == seeds(erased) == ["seed 5", "seed 6"]
    # MiniSD: the judges' reading, not NudeNet's "nothing detected" on a 16 px digit
    assert all(" · judged " in item["caption"] and "nothing detected" not in item["caption"] for item in base + erased)
    assert all(item["caption"].endswith("judged seven, plain") for item in base)
    pixels = [[np.asarray(Image.open(item["image"])) for item in g] for g in (base, erased)]
    for before, after in zip(*pixels):
        assert np.abs(before.astype(int) - after.astype(int)).mean() > 5  # the erased model draws something else
    expected = generate_images(load_pipeline("minisd"), [prompt] * 2, [5, 6], num_inference_steps=STEPS,
                               guidance_scale=GUIDANCE)
    for got, want in zip(pixels[0], expected):
        assert np.array_equal(got, np.asarray(for_display(want)))
    # Safe preview off: no NudeNet summary, and the same pixels (nothing was blurred).
    raw, _ = _generate(client, prompt, [name], seed=5, n=1, safe=False)
    assert raw[0]["caption"] == base[0]["caption"]  # nothing was found, so safe preview adds nothing
    assert np.array_equal(np.asarray(Image.open(raw[0]["image"])), pixels[0][0])


def test_bad_input_over_api(launched, tmp_path):
    from gradio_client import handle_file

    name, client = launched
    with pytest.raises(Exception, match="601 characters long; the limit is 500"):
        _generate(client, "x" * 601, [name])
    with pytest.raises(Exception, match="not in the list of choices"):
        _generate(client, "a handwritten digit one", ["../../etc"])
    bad = tmp_path / "bad.csv"
    bad.write_text("name,value\nfoo,1\n")
    with pytest.raises(Exception, match="'bad.csv' is not a prompt set.*no 'prompt' column"):
        client.predict(None, handle_file(str(bad)), STEPS, GUIDANCE, api_name="/evaluate")
    bad.write_text("prompt,evaluation_seed\na cat,abc\n")  # row-level: named by its file name, not the upload path
    with pytest.raises(Exception, match="'bad.csv' is not a prompt set: bad.csv row 0: evaluation_seed 'abc'"):
        client.predict(None, handle_file(str(bad)), STEPS, GUIDANCE, api_name="/evaluate")
    bad.write_text("prompt,evaluation_seed\na cat,99999999999999999999\n")
    with pytest.raises(Exception, match="bad.csv row 0: evaluation_seed '99999999999999999999' is out of range"):
        client.predict(None, handle_file(str(bad)), STEPS, GUIDANCE, api_name="/evaluate")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(Exception, match="'binary.csv' is not a prompt set: prompt set 'binary.csv' is binary data"):
        client.predict(None, handle_file(str(binary)), STEPS, GUIDANCE, api_name="/evaluate")
    with pytest.raises(Exception, match="choose a preset prompt set or upload a CSV"):
        client.predict(None, None, STEPS, GUIDANCE, api_name="/evaluate")


def test_unknown_model_name_in_the_handlers(tiny_registry):
    """The handlers check names themselves too, whatever the component in front of them accepts."""
    from app.ui import AppConfig, compare, concept_summary

    with pytest.raises(ConceptEraseError, match="unknown model '/etc/passwd'"):
        compare(tiny_registry, AppConfig(), "a cat", models=["/etc/passwd"], steps=1)
    with pytest.raises(ConceptEraseError, match="unknown model 'x'"):
        concept_summary(tiny_registry, "x")


def test_evaluate_over_api_on_minisd(launched, tmp_path):
    """A class-prompt CSV on MiniSD: judged digit accuracy per class, base vs erased, with the chart."""
    from gradio_client import handle_file

    from concept_erase.diffusion.minisd import minisd_prompt

    name, client = launched
    csv = tmp_path / "digits.csv"
    rows = [(minisd_prompt(d), s, d) for d in ("seven", "one") for s in range(3)]
    csv.write_text("prompt,evaluation_seed,class\n" + "".join(f"{p},{s},{d}\n" for p, s, d in rows))
    table, chart = client.predict(None, handle_file(str(csv)), STEPS, GUIDANCE, api_name="/evaluate")
    assert "6 prompts, one image each" in table and "## Judged as" in table  # the evaluation suite's tables
    assert f"| class | base top-1 % | {name} top-1 % |" in table and "| seven |" in table and "| one |" in table
    assert Image.open(chart).size[0] > 300


def test_concept_over_api(launched):
    name, client = launched
    text, chart = client.predict(name, api_name="/concept")
    assert f"### {name}" in text and "| method | salun |" in text
    assert "Saliency mask: 50.0% of the UNet's weights were trainable" in text and Image.open(chart).size[0] > 300


def test_the_evaluate_tab_does_not_import_the_ui():
    """No app/ui.py <-> app/evaluate.py cycle: app.evaluate imports nothing from app.ui, anywhere in it."""
    import ast

    import app.evaluate

    tree = ast.parse(open(app.evaluate.__file__, encoding="utf-8").read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert "checks" in imported and not imported & {"ui", "app.ui"}


def test_each_gallery_fills_under_its_own_progress(tiny_registry):
    """The page's Generate runs one event per model, each with only its own gallery as output."""
    from app.ui import AppConfig, build_app

    demo = build_app(tiny_registry, AppConfig())
    steps = [[o.label for o in fn.outputs] for fn in demo.fns.values() if fn.name == "run"]
    assert steps == [["base"], ["no-cat"]]
    assert {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"} == {"generate", "concept", "evaluate"}
    demo.close()


def test_card_surrogate_once_and_mask_names_as_written(tiny_registry):
    from app.models import Model, ModelRegistry
    from app.ui import concept_summary
    from evaluation.report import bar_figure

    erased = tiny_registry.get("no-cat")
    card = {"concept": "cat", "surrogate": ["a dog"], "surrogate_prompts": ["a dog"]}
    registry = ModelRegistry([tiny_registry.get("base"), Model("twice", erased.source, None, card, erased.mask_path)])
    text, _ = concept_summary(registry, "twice")
    assert text.count("a dog") == 1
    fig = bar_figure({"m": {"conv_in.weight": 0.5, "down_blocks.0": 0.4}}, title="t", ylabel="y")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["conv_in.weight", "down_blocks.0"]


def test_app_compares_sdxl_models(tmp_path, tiny_sdxl_pipeline_dir):
    """`concept-erase app --base <sdxl> --erased <sdxl-erased folder> --erased <its single file>`: the CLI
    path serves it, and the same prompt and seed run through every SDXL pipeline."""
    from app.cli import launch
    from app.models import ModelRegistry
    from app.ui import AppConfig, compare, concept_summary
    from concept_erase.diffusion.models.card import save_pipeline
    from concept_erase.diffusion.models.single_file import export_single_file
    from concept_erase.diffusion.models.tiny import build_tiny_sdxl_pipeline
    from concept_erase.saliency import SaliencyMask

    pipe = build_tiny_sdxl_pipeline(seed=1, layers_per_block=2, transformer_layers=(1, 2))
    folder = tmp_path / "xl-no-cat"
    save_pipeline(pipe, folder, card={"base_model": str(tiny_sdxl_pipeline_dir), "concept": "cat", "method": "salun"})
    SaliencyMask.random(pipe.unet, keep=0.5, seed=0).save(folder / "mask.safetensors")
    single = export_single_file(pipe, tmp_path / "xl-no-cat.safetensors")
    args = ["--base", str(tiny_sdxl_pipeline_dir), "--erased", str(folder), "--erased", str(single)]
    demo = launch(app_args(*args, "--port", str(free_port())), block=False)
    demo.close()
    registry = ModelRegistry.load(str(tiny_sdxl_pipeline_dir), [str(folder), str(single)])
    assert {type(registry.get(n).pipe).__name__ for n in registry.names} == {"StableDiffusionXLPipeline"}
    out = compare(registry, AppConfig(), "a cat", seed=3, steps=2, guidance=5.0, safe=False)
    assert len(out) == 3 and list(out)[0] == registry.base_name
    images = [np.asarray(gallery[0][0]) for gallery in out.values()]
    assert np.array_equal(images[1], images[2])  # the folder and its single file are the same model
    assert not np.array_equal(images[0], images[1])
    assert "| model_family | sdxl |" in concept_summary(registry, "xl-no-cat")[0]
