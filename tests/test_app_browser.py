"""The app in a real browser: Debian's chromium, headless, driven by playwright's Python API.

Never `playwright install`: the test uses /usr/bin/chromium. Without it the test skips, unless
CONCEPT_ERASE_REQUIRE_BROWSER=1 (set by .ci/run, which installs chromium), where a missing browser fails.
The screenshot is saved under the test's tmp folder (printed on failure) so a person can look at it.
"""

import contextlib
import os
import re
import shutil
import socket

import pytest

pytest.importorskip("gradio")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000
# The smallest erase that visibly works on MiniSD (measured: "three" then judged five on every seed, the other
# digits kept): 8 SalUn steps on 27 forget and 27 retain images, about 25 s on 2 busy cores.
ERASE_STEPS, ERASE_IMAGES = 8, 27


def _need_browser():
    if os.path.exists(CHROMIUM):
        return
    if os.environ.get("CONCEPT_ERASE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"chromium not found at {CHROMIUM} and CONCEPT_ERASE_REQUIRE_BROWSER=1")
    pytest.skip("chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def page():
    _need_browser()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CONCEPT_ERASE_REQUIRE_BROWSER") == "1":
            pytest.fail("playwright is not installed and CONCEPT_ERASE_REQUIRE_BROWSER=1")
        pytest.skip("playwright is not installed")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 1000})
        finally:
            browser.close()


@pytest.fixture(scope="module")
def erased_dir(tmp_path_factory):
    """Where the app's Erase tab writes its models."""
    return tmp_path_factory.mktemp("app-erased")


def _cache(tmp_path_factory) -> str:
    """The same cache as test_app.py's `demo_cache`: MiniSD's erased demo model is made once per session."""
    return os.environ.get("CONCEPT_ERASE_CACHE") or str(tmp_path_factory.getbasetemp() / "concept-erase-cache")


@contextlib.contextmanager
def _launched(tmp_path_factory, *argv):
    """`concept-erase app ARGV` on a free loopback port, with MiniSD's erased demo model cached for the session
    under the same folder as test_app.py's (so the demo erasure runs once); yields the Blocks."""
    from app.cli import launch
    from concept_erase.cli import build_parser

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONCEPT_ERASE_CACHE", _cache(tmp_path_factory))
        demo = launch(build_parser("app").parse_args(["app", "--port", str(port), "--default-steps", "10", *argv]),
                      block=False)
        try:
            yield demo
        finally:
            demo.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory, erased_dir):
    """`concept-erase app` with no model arguments: MiniSD and its erased demo model, and the Erase tab's
    limits at the smallest erase that works (its images go to the same cache)."""
    from app.cli import demo_model_name

    with _launched(tmp_path_factory, "--max-erase-steps", str(ERASE_STEPS), "--max-erase-images", str(ERASE_IMAGES),
                   "--erase-output", str(erased_dir)) as demo:
        yield demo.local_url, demo_model_name()  # what the app calls the demo model


def _uploaded(page, name):
    """The File component's row for an uploaded file. Its visible name is split into stem and suffix
    elements, so a text match only ever catches the short-lived upload-progress line; the row's
    accessible label is the whole name once the upload has finished."""
    return page.locator("#eval-csv").get_by_label(name, exact=True)


def test_generate_in_browser(page, app, tmp_path):
    url, erased = app
    page.goto(url)
    page.locator("#prompt textarea").fill("a handwritten digit seven in bold strokes")
    page.locator("#prompt textarea").press("Enter")  # Enter generates; it does not add a line
    for gallery in ("#gallery-0", "#gallery-1"):  # base, erased
        page.locator(f"{gallery} img").first.wait_for(timeout=TIMEOUT_MS)
    shot = tmp_path / "compare.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    base_text, erased_text = page.locator("#gallery-0").inner_text(), page.locator("#gallery-1").inner_text()
    assert page.locator("#prompt textarea").input_value() == "a handwritten digit seven in bold strokes"
    for seed in ("seed 0", "seed 1", "seed 2", "seed 3"):  # 4 images by default, identical seeds
        assert f"{seed} · judged seven, bold" in base_text and f"{seed} · judged" in erased_text
    assert "nothing detected" not in base_text + erased_text  # MiniSD's judges speak, not NudeNet
    assert base_text.startswith("base") and erased_text.startswith(erased) and erased == "without seven"
    assert page.locator("#gallery-0 img").count() >= 4 and page.locator("#gallery-1 img").count() >= 4
    assert "Safe preview" in page.content() and page.locator("#safe-preview input").is_checked()


def test_bad_input_in_browser(page, app, tmp_path):
    url, _ = app
    page.goto(url)
    page.locator("#prompt textarea").fill("x" * 700)
    page.locator("#generate").click()
    page.get_by_text("700 characters long; the limit is 500").first.wait_for(timeout=TIMEOUT_MS)

    bad = tmp_path / "notes.csv"
    bad.write_text("title,body\nhello,world\n")
    page.get_by_role("tab", name="Evaluate").click()
    page.locator("#eval-csv input[type=file]").set_input_files(str(bad))
    _uploaded(page, "notes.csv").first.wait_for(timeout=TIMEOUT_MS)
    page.locator("#evaluate").click()
    page.get_by_text("'notes.csv' is not a prompt set").first.wait_for(timeout=TIMEOUT_MS)
    page.screenshot(path=str(tmp_path / "bad-csv.png"), full_page=True)


def test_a_failed_evaluation_clears_the_old_table(page, app, tmp_path):
    url, erased = app
    page.goto(url)
    page.get_by_role("tab", name="Evaluate").click()
    good = tmp_path / "digits.csv"
    good.write_text("prompt,evaluation_seed,class\na handwritten digit seven,1,seven\na handwritten digit one,2,one\n")
    page.locator("#eval-csv input[type=file]").set_input_files(str(good))
    _uploaded(page, "digits.csv").first.wait_for(timeout=TIMEOUT_MS)
    page.locator("#evaluate").click()
    page.locator("#eval-table").get_by_text("Judged as").first.wait_for(timeout=TIMEOUT_MS)
    assert f"{erased} top-1 %" in page.locator("#eval-table").inner_text()
    page.screenshot(path=str(tmp_path / "evaluate.png"), full_page=True)
    bad = tmp_path / "notes.csv"
    bad.write_text("title,body\nhello,world\n")
    page.locator("#eval-csv button[aria-label='Clear']").first.click()
    # The File component re-renders its drop zone after Clear: upload only once the new input is there.
    _uploaded(page, "digits.csv").first.wait_for(state="detached", timeout=TIMEOUT_MS)
    page.locator("#eval-csv input[type=file]").wait_for(state="attached", timeout=TIMEOUT_MS)
    page.locator("#eval-csv input[type=file]").set_input_files(str(bad))
    _uploaded(page, "notes.csv").first.wait_for(timeout=TIMEOUT_MS)
    page.locator("#evaluate").click()
    page.get_by_text("'notes.csv' is not a prompt set").first.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_function("!document.querySelector('#eval-table').innerText.includes('Judged as')",
                           timeout=TIMEOUT_MS)


def test_erase_in_browser_then_compare(page, app, erased_dir, tmp_path):
    """Erase "three" in the Erase tab with live progress, see the mask, then the new model in Compare: the same
    seeds, and the base's threes are no longer threes. A second erase, cancelled at once, writes nothing."""
    url, _ = app
    page.goto(url)
    page.get_by_role("tab", name="Erase").click()
    page.locator("#erase-preset input").click()
    page.get_by_role("option", name="minisd-digit-three", exact=True).click()
    page.locator("#erase-about").get_by_text("minisd-digit-three").first.wait_for(timeout=TIMEOUT_MS)
    page.locator("#erase").click()
    # live progress: the training steps counted as they run (the status shows the tracker while it works)
    page.get_by_text(re.compile(rf"SalUn step \d+ of {ERASE_STEPS}")).first.wait_for(timeout=2 * TIMEOUT_MS)
    page.locator("#erase-status").get_by_text("is now in the Compare").wait_for(timeout=2 * TIMEOUT_MS)
    status = page.locator("#erase-status").inner_text()
    assert f"{ERASE_STEPS} SalUn steps on {ERASE_IMAGES} forget and {ERASE_IMAGES} retain images" in status
    assert str(erased_dir) not in status  # the folder by its name only
    page.locator("#erase-mask img").wait_for(timeout=TIMEOUT_MS)
    card = page.locator("#erase-card").inner_text()  # the new model's card and its mask, as the Concept tab shows them
    assert "minisd-digit-three" in card and "of the UNet's weights were trainable" in card
    page.screenshot(path=str(tmp_path / "erase.png"), full_page=True)
    assert [p.name for p in erased_dir.iterdir()] == ["without-minisd-digit-three"]

    page.get_by_role("tab", name="Compare").click()
    page.locator("#gallery-2").wait_for(state="visible", timeout=TIMEOUT_MS)
    page.locator("#examples").get_by_text("a handwritten digit three in bold strokes").click()  # MiniSD's wording
    page.wait_for_function("document.querySelector('#prompt textarea').value.endsWith('in bold strokes')",
                           timeout=TIMEOUT_MS)
    page.locator("#prompt textarea").fill("a handwritten digit three")
    page.locator("#prompt textarea").press("Enter")
    for gallery in ("#gallery-0", "#gallery-1", "#gallery-2"):  # base, the demo model, the new model
        page.locator(f"{gallery} img").first.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_function("document.querySelectorAll('#gallery-2 img').length >= 4", timeout=TIMEOUT_MS)
    base, new = page.locator("#gallery-0").inner_text(), page.locator("#gallery-2").inner_text()
    page.screenshot(path=str(tmp_path / "erase-compare.png"), full_page=True)
    assert new.startswith("without minisd-digit-three")
    assert all(f"seed {s} · judged three" in base for s in range(4))
    assert all(f"seed {s} · judged" in new for s in range(4)) and new.count("judged three") <= 1

    page.get_by_role("tab", name="Erase").click()
    page.locator("#erase").click()
    # Cancel once the erase shows its progress (so it has been taken): its images are cached by now, and it
    # stops as training starts, seconds before the 8 steps could finish.
    page.locator("#erase-status").get_by_text(re.compile("making|SalUn step")).first.wait_for(timeout=TIMEOUT_MS)
    page.locator("#erase-cancel").click()
    page.locator("#erase-status").get_by_text("nothing was written").wait_for(timeout=2 * TIMEOUT_MS)
    assert [p.name for p in erased_dir.iterdir()] == ["without-minisd-digit-three"]


@pytest.fixture(scope="module")
def lora_app(tmp_path_factory):
    """`concept-erase app --erasure F`: MiniSD plus the demo erasure exported as a rank-16 kohya LoRA, at the
    strength the page's slider sets."""
    from concept_erase.demo import demo_erased_model
    from concept_erase.diffusion.models.loading import load_pipeline
    from concept_erase.diffusion.models.lora import export_erasure

    lora = tmp_path_factory.mktemp("lora") / "no-seven.safetensors"
    with pytest.MonkeyPatch.context() as mp:  # the demo model from the shared cache, as `_launched` sets it
        mp.setenv("CONCEPT_ERASE_CACHE", _cache(tmp_path_factory))
        export_erasure(load_pipeline("minisd"), load_pipeline(str(demo_erased_model())), lora, rank=16)
    with _launched(tmp_path_factory, "--erasure", str(lora), "--max-erasures", "0") as demo:
        yield demo.local_url


def test_an_erasure_file_at_the_sliders_strength(page, lora_app, tmp_path):
    """Strength 1 draws no seven; the slider at 0 brings the base's sevens back, on the same seeds."""
    page.goto(lora_app)
    texts = {}
    for strength in ("1", "0"):
        page.locator("#strength input[type=number]").fill(strength)
        page.locator("#strength input[type=number]").press("Enter")
        page.locator("#prompt textarea").fill("a handwritten digit seven in bold strokes")
        page.locator("#prompt textarea").press("Enter")
        page.get_by_text(f"strength {strength} ·").first.wait_for(timeout=TIMEOUT_MS)
        page.locator("#gallery-1 img").first.wait_for(timeout=TIMEOUT_MS)
        texts[strength] = page.locator("#gallery-1").inner_text()
        page.screenshot(path=str(tmp_path / f"strength-{strength}.png"), full_page=True)
    assert texts["1"].startswith("no-seven @ strength") and "Erasure strength" in page.content()
    seeds = [f"seed {i}" for i in range(4)]
    assert all(f"{s} · strength 1 · judged seven" not in texts["1"] for s in seeds), texts["1"]
    assert all(f"{s} · strength 0 · judged seven" in texts["0"] for s in seeds), texts["0"]
