"""The Gradio app: launched on loopback through the CLI path and driven with gradio_client.

The launched app is MiniSD and its erased demo model (what `concept-erase app` opens with no arguments);
the Concept tab, the Erase tab's job and the library-level checks use tiny pipelines with a model card and a mask.
"""

import os
import re
import socket
from pathlib import Path

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


def _raw_call(url: str, endpoint: str, data: list) -> str:
    """The raw HTTP API, as a script without gradio_client calls it: POST the inputs, read the event stream."""
    import json as _json
    import urllib.request

    post = urllib.request.Request(f"{url.rstrip('/')}/gradio_api/call/{endpoint}", method="POST",
                                  data=_json.dumps({"data": data}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=60) as answer:
        event = _json.loads(answer.read())["event_id"]
    with urllib.request.urlopen(f"{url.rstrip('/')}/gradio_api/call/{endpoint}/{event}", timeout=120) as stream:
        return stream.read().decode()


def test_a_malformed_raw_api_call_gets_its_reason(launched):
    """Malformed inputs (a seed that is not a number, a missing argument) are answered with why, never with
    {"error": null}."""
    _, client = launched
    for data in (["a handwritten digit seven", "", "five", 2, 5.0, 1, None, True], ["a handwritten digit seven"]):
        answer = _raw_call(client.src, "generate", data)
        assert "event: error" in answer, answer
        payload = answer.split("event: error", 1)[1].split("data:", 1)[1].strip().splitlines()[0]
        assert payload not in ("null", "") and "null" != payload.strip(), answer


def _generate(client, prompt, models, seed=5, steps=STEPS, n=2, safe=True):
    return client.predict(prompt, "", seed, steps, GUIDANCE, n, models, safe, api_name="/generate")


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_defaults_are_safe():
    args = app_args()
    assert args.host == "127.0.0.1" and args.share is False
    assert args.base == "minisd" and args.erased == []
    assert args.max_prompt_chars == 500 and args.concurrency == 1 and args.max_queue == 16
    assert args.max_erasures == 4 and args.max_erase_steps == 100 and args.max_erase_images == 256
    assert args.erase_output is None  # the cache folder's app-erased/


def test_cli_refuses_missing_models(tmp_path, tiny_pipeline_dir, capsys, monkeypatch):
    from concept_erase.cli import main

    monkeypatch.setenv("CONCEPT_ERASE_CACHE", str(tmp_path / "cache"))  # what --erase-output defaults under

    missing = tmp_path / "nope"
    assert main(["app", "--base", str(tiny_pipeline_dir), "--erased", str(missing)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["app", "--base", str(tiny_pipeline_dir)]) == 2
    assert "--erased" in capsys.readouterr().err
    assert main(["app", "--base", str(tiny_pipeline_dir), "--erased", str(tiny_pipeline_dir), "--max-images", "0"]) == 2
    assert main(["app", "--base", str(tiny_pipeline_dir), "--erased", str(tiny_pipeline_dir),
                 "--max-erase-steps", "0"]) == 2
    assert "--max-erase-steps must be >= 1, got 0" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("not a folder")
    assert main(["app", "--base", str(tiny_pipeline_dir), "--erased", str(tiny_pipeline_dir),
                 "--erase-output", str(tmp_path / "a-file" / "models")]) == 2
    assert "--erase-output" in capsys.readouterr().err


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
    base, erased, *unused = _generate(client, prompt, [name], seed=5, n=2)
    assert unused == [[]] * 4  # the galleries kept for the Erase tab's models (--max-erasures 4), empty
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
    raw, *_ = _generate(client, prompt, [name], seed=5, n=1, safe=False)
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


def test_the_tabs_do_not_import_the_ui():
    """No app/ui.py <-> app/evaluate.py (or app/erase.py) cycle: neither imports anything from app.ui, anywhere."""
    import ast

    import app.erase
    import app.evaluate

    for module in (app.evaluate, app.erase):
        tree = ast.parse(open(module.__file__, encoding="utf-8").read())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        assert "checks" in imported and not imported & {"ui", "app.ui"}


def test_each_gallery_fills_under_its_own_progress(tiny_registry):
    """The page's Generate runs one event per model, each with only its own gallery as output."""
    from app.ui import AppConfig, build_app

    demo = build_app(tiny_registry, AppConfig(max_erasures=2))
    steps = [[(o.label, o.visible) for o in fn.outputs] for fn in demo.fns.values() if fn.name == "run"]
    # then the galleries kept for the Erase tab's models, hidden until one is made
    assert steps == [[("base", True)], [("no-cat", True)], [("", False)], [("", False)]]
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


def test_app_compares_sdxl_models(tmp_path, tiny_sdxl_pipeline_dir, monkeypatch):
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
    monkeypatch.setenv("CONCEPT_ERASE_CACHE", str(tmp_path / "cache"))  # what --erase-output defaults under
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


# ------------------------------------------------------------------------------------------- Erase tab


@pytest.fixture
def fresh_registry(tiny_pipeline_dir, erased_tiny_dir, tmp_path, monkeypatch):
    """A registry of its own (an erase adds to it) and a cache folder of its own for the erase's images."""
    from app.models import ModelRegistry

    monkeypatch.setenv("CONCEPT_ERASE_CACHE", str(tmp_path / "cache"))
    return ModelRegistry.load(str(tiny_pipeline_dir), [str(erased_tiny_dir)])


def _minisd_registry(name="minisd"):
    from app.models import Model, ModelRegistry

    return ModelRegistry([Model("base", name, None), Model("erased", "x", None)])


def test_example_prompts_speak_the_base_models_language(tiny_registry):
    from app.ui import GENERIC_EXAMPLES, example_prompts

    for base in ("minisd", "minisd-xl"):
        examples = example_prompts(_minisd_registry(base))
        assert "a handwritten digit seven" in examples and "a handwritten digit three in bold strokes" in examples
    assert example_prompts(tiny_registry) == list(GENERIC_EXAMPLES)


def test_erase_presets_are_the_ones_written_for_the_base():
    from app.erase import CUSTOM, erase_defaults, erase_presets, preset_summary
    from app.ui import AppConfig

    for base in ("minisd", "minisd-xl"):
        presets = erase_presets(_minisd_registry(base))
        assert len(presets) == 12 and "minisd-digit-three" in presets and "minisd-style-bold" in presets
        assert not [p for p in presets if not p.startswith("minisd-")]  # no nudity, Imagenette or artists
    minisd = _minisd_registry()
    # the preset's recipe (MiniSD's: 50 steps, 48 forget and 216 retain images), within the app's limits
    assert erase_defaults(minisd, AppConfig(), "minisd-digit-three") == {
        "steps": 50, "num_forget_images": 48, "num_retain_images": 216}
    assert erase_defaults(minisd, AppConfig(max_erase_steps=8, max_erase_images=27), "minisd-digit-three") == {
        "steps": 8, "num_forget_images": 27, "num_retain_images": 27}
    assert erase_defaults(minisd, AppConfig(), CUSTOM) == {"steps": 100, "num_forget_images": 64,
                                                           "num_retain_images": 64}  # erase's own defaults
    assert "a handwritten digit four" in preset_summary(minisd, "minisd-digit-three")
    with pytest.raises(ConceptEraseError, match="unknown preset 'nudity' for this base model"):
        erase_defaults(minisd, AppConfig(), "nudity")


def test_erase_request_is_checked_against_the_limits():
    from app.erase import CUSTOM, check_erase_request
    from app.ui import AppConfig

    minisd, config = _minisd_registry(), AppConfig(max_erase_steps=10, max_erase_images=30, max_prompt_chars=20)
    ok = check_erase_request(minisd, config, "minisd-digit-three", "", "", 10, 30, 27)
    assert (ok.preset, ok.steps, ok.num_forget_images, ok.model_name) == ("minisd-digit-three", 10, 30,
                                                                          "without minisd-digit-three")
    custom = check_erase_request(minisd, config, CUSTOM, " a cat ", "a dog", 1, 1, 1)
    assert (custom.preset, custom.forget, custom.model_name) == (None, "a cat", "without a cat")
    bad = [(("style-van-gogh", "", "", 5, 5, 5), "unknown preset 'style-van-gogh'"),
           (("minisd-digit-three", "a cat", "", 5, 5, 5), "choose the preset 'minisd-digit-three' or type prompts"),
           ((CUSTOM, "a cat", "", 5, 5, 5), "type both a forget prompt and the surrogate"),
           ((CUSTOM, "x" * 21, "a dog", 5, 5, 5), "forget prompt is 21 characters long; the limit is 20"),
           (("minisd-digit-three", "", "", 11, 5, 5), "steps must be a whole number from 1 to 10, got 11"),
           (("minisd-digit-three", "", "", 2.5, 5, 5), "steps must be a whole number from 1 to 10, got 2.5"),
           (("minisd-digit-three", "", "", 5, 0, 5), "forget images must be a whole number from 1 to 30, got 0"),
           (("minisd-digit-three", "", "", 5, 5, 31), "retain images must be a whole number from 1 to 30, got 31")]
    for values, message in bad:
        with pytest.raises(ConceptEraseError, match=re.escape(message)):
            check_erase_request(minisd, config, *values)
    minisd.added.extend(["a", "b"])
    with pytest.raises(ConceptEraseError, match=r"made its 2 erased models \(--max-erasures 2\)"):
        check_erase_request(minisd, AppConfig(max_erasures=2), "minisd-digit-three", "", "", 5, 5, 5)


def test_erase_joins_the_registry_and_never_overwrites(fresh_registry, tmp_path):
    """The Erase tab's job on a tiny model: the library's erase, its progress step by step, a new folder
    beside a user's folder of the same name (untouched), and the model at once in Compare and Concept."""
    from app.erase import CUSTOM, EraseJobs, erase
    from app.ui import AppConfig, compare, concept_summary

    out = tmp_path / "erased"
    (out / "without-a-cat").mkdir(parents=True)
    (out / "without-a-cat" / "mine.txt").write_text("a user's file")
    seen = []
    status, model = erase(fresh_registry, AppConfig(erase_output=str(out)), EraseJobs(), "page", CUSTOM, "a cat",
                          "a dog", 3, 2, 2, progress=lambda f, desc: seen.append((round(f, 2), desc)))
    assert [d for _, d in seen if d.startswith("SalUn")] == [f"SalUn step {k} of 3" for k in range(4)]
    assert [f for f, d in seen if d.startswith("SalUn")] == [0, 0.33, 0.67, 1.0]
    assert seen[0][1].startswith("making 2 forget and 2 retain images") and seen[-1][1] == "loading the erased model"
    assert fresh_registry.names == ["base", "no-cat", "without a cat"] and fresh_registry.added == ["without a cat"]
    assert Path(model.source) == out / "without-a-cat-2" and model.mask_path is not None
    assert (out / "without-a-cat" / "mine.txt").read_text() == "a user's file"
    assert sorted(p.name for p in out.iterdir()) == ["without-a-cat", "without-a-cat-2"]  # no lock, no temporaries
    assert "3 SalUn steps on 2 forget and 2 retain images" in status and "`without-a-cat-2`" in status
    assert str(tmp_path) not in status  # the server's paths stay on the server
    assert model.card["concept"] == "custom: a cat" and model.card["method"] == "salun"
    out_images = compare(fresh_registry, AppConfig(), "a cat", seed=1, steps=2, safe=False)
    assert list(out_images) == ["base", "no-cat", "without a cat"]
    assert not np.array_equal(np.asarray(out_images["base"][0][0]), np.asarray(out_images["without a cat"][0][0]))
    text, figure = concept_summary(fresh_registry, "without a cat")
    assert "| concept | custom: a cat |" in text and "50.0%" in text and figure is not None


def test_cancel_stops_the_erase_and_writes_nothing(fresh_registry, tmp_path):
    from app.erase import CUSTOM, EraseJobs, erase
    from app.ui import AppConfig

    out, jobs = tmp_path / "erased", EraseJobs()
    config = AppConfig(erase_output=str(out))

    def cancel_after_one(f, desc):
        if desc == "SalUn step 1 of 5":
            assert jobs.cancel("page")  # the page's Cancel button, while its erase trains
    status, model = erase(fresh_registry, config, jobs, "page", CUSTOM, "a cat", "a dog", 5, 2, 2,
                          progress=cancel_after_one)
    assert model is None and status == "Erase cancelled at step 2 of 5: nothing was written."
    assert not out.exists() or not list(out.iterdir())  # no model, no checkpoints, no lock, no temporaries
    assert fresh_registry.names == ["base", "no-cat"]
    jobs.announce("page")  # pressed, then cancelled while it waits in the queue
    assert jobs.cancel("page") and not jobs.cancel("another page")
    status, model = erase(fresh_registry, config, jobs, "page", CUSTOM, "a cat", "a dog", 5, 2, 2)
    assert model is None and status == "Erase cancelled before it started: nothing was written."
    jobs.start("page")  # one erase at a time per page
    with pytest.raises(ConceptEraseError, match="already erasing"):
        jobs.announce("page")
    jobs.end("page")
    jobs.announce("page")  # and the page can erase again once it has ended


def test_erase_tab_is_queued_alone_and_bounded(tiny_registry):
    from app.ui import ERASE_QUEUE_ID, AppConfig, build_app

    demo = build_app(tiny_registry, AppConfig(max_erasures=3, max_erase_steps=7, max_erase_images=9))
    erasing = [fn for fn in demo.fns.values() if fn.concurrency_id == ERASE_QUEUE_ID]
    assert [(fn.name, fn.concurrency_limit, fn.api_visibility) for fn in erasing] == [("on_erase", 1, "private")]
    sliders = {o.label: o.maximum for fn in demo.fns.values() if fn.name == "on_preset" for o in fn.outputs[3:]}
    assert sliders == {"SalUn steps": 7, "Forget images": 9, "Retain images": 9}
    assert len([fn for fn in demo.fns.values() if fn.name == "run"]) == 2 + 3  # a gallery per model to come
    demo.close()
    demo = build_app(tiny_registry, AppConfig(max_erasures=0))  # no Erase tab, no room kept
    assert not [fn for fn in demo.fns.values() if fn.concurrency_id == ERASE_QUEUE_ID]
    assert len([fn for fn in demo.fns.values() if fn.name == "run"]) == 2
    demo.close()


def test_a_model_made_later_is_offered_to_the_api(tiny_pipeline_dir, erased_tiny_dir):
    """What a page is offered after an erase (or on load) holds for API callers too: the new model can be
    compared and described by name."""
    from gradio_client import Client

    from app.models import ModelRegistry
    from app.ui import AppConfig, build_app

    registry = ModelRegistry.load(str(tiny_pipeline_dir), [str(erased_tiny_dir)])
    demo = build_app(registry, AppConfig(max_erasures=1))
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        registry.add(erased_tiny_dir, "later")
        with pytest.raises(Exception, match="not in the list of choices"):
            client.predict("later", api_name="/concept")
        offer = next(fn for fn in demo.fns.values() if fn.name == "offer_models")
        offer.fn()  # what a page's load (or an erase) runs
        galleries = client.predict("a cat", "", 0, 2, 5.0, 1, ["later"], False, api_name="/generate")
        assert [len(g) for g in galleries] == [1, 0, 1]  # base, no-cat (not chosen), later
        assert "### later" in client.predict("later", api_name="/concept")[0]
    finally:
        demo.close()


def test_an_erasure_file_is_shown_at_the_strength_the_page_sets(tiny_pipeline_dir, tmp_path):
    """`app --erasure F`: the base plus a LoRA file, at the slider's strength; the weights at each strength are
    exactly what `concept-erase apply --strength` writes, strength 0 draws the base's images, and going back
    to a strength gives the same weights again (no drift)."""
    import copy

    import torch

    from app.models import ModelRegistry
    from app.ui import AppConfig, check_request, generate_for
    from concept_erase.diffusion.models.apply import apply_erasure, read_erasure
    from concept_erase.diffusion.models.loading import load_pipeline
    from concept_erase.diffusion.models.lora import export_erasure

    base = load_pipeline(str(tiny_pipeline_dir))
    erased = copy.deepcopy(base)
    with torch.no_grad():
        for p in erased.unet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    lora = tmp_path / "no-cat.safetensors"
    export_erasure(base, erased, lora, rank=4, info={"concept": "cat"})

    registry = ModelRegistry.load(str(tiny_pipeline_dir), [], erasures=[str(lora)])
    name = registry.erased_names[0]
    model = registry.get(name)
    assert registry.has_strength and name == "no-cat @ strength" and model.card["concept"] == "cat"
    assert model.card["transfer"].startswith("no")  # made on this very base
    config = AppConfig(max_steps=2, default_steps=2)

    def weights():
        return {k: v.clone() for k, v in model.pipe.unet.state_dict().items()}

    def applied(strength):
        pipe = load_pipeline(str(tiny_pipeline_dir))
        apply_erasure(pipe, read_erasure(lora), strength)
        return pipe.unet.state_dict()

    images = {}
    for strength in (1.0, 0.0, 0.5, 1.0):
        request = check_request(registry, config, "a cat", seed=3, steps=2, strength=strength)
        images[strength] = generate_for(registry, config, name, request)
        assert f"strength {strength:g} ·" in images[strength][0][1]
        got, want = weights(), applied(strength)
        assert all(torch.equal(got[k], want[k]) for k in want), strength
    base_images = generate_for(registry, config, registry.base_name, check_request(registry, config, "a cat", seed=3,
                                                                                   steps=2))
    assert (np.asarray(images[0.0][0][0]) == np.asarray(base_images[0][0])).all()
    assert not (np.asarray(images[1.0][0][0]) == np.asarray(base_images[0][0])).all()
    with pytest.raises(ConceptEraseError, match="strength"):
        check_request(registry, config, "a cat", strength=2.0)


def test_a_delta_on_another_base_is_refused_in_one_line(tiny_pipeline_dir, other_pipeline, tmp_path):
    import copy

    from app.models import ModelRegistry
    from concept_erase.diffusion.models.delta import save_delta

    erased = copy.deepcopy(other_pipeline)
    delta = save_delta(other_pipeline.unet, erased.unet, None, tmp_path / "delta")
    with pytest.raises(ConceptEraseError, match="another base"):
        ModelRegistry.load(str(tiny_pipeline_dir), [], erasures=[str(delta)])
