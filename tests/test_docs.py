"""The docs live in the repository: code and docs cite `docs/` files that exist (and papers), never a design
note outside the repository or an issue number."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked_text_files():
    names = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.toml", "*.txt", "Makefile"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def test_citations_stay_inside_the_repository():
    outside = re.compile(r"DESIGN\.md|\.\./shared/docs|\bissues? #?\d+\b", re.IGNORECASE)
    this = Path(__file__).resolve()
    found = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}" for path in _tracked_text_files() if path != this
             for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert not found, "\n".join(found[:20])


def test_cited_docs_exist():
    cited = {m for path in _tracked_text_files() for m in re.findall(r"docs/([A-Z_]+\.md)", path.read_text(errors="replace"))}
    assert cited and all((ROOT / "docs" / name).is_file() for name in cited), sorted(cited)


def test_the_readmes_python_snippets_run_as_written(tmp_path, tiny_pipeline_dir, tiny_sdxl_pipeline_dir):
    """Every Python block of the README runs, with each model name it uses standing for a real folder or file
    of the same kind (tiny pipelines of the same classes): a snippet that names an unknown model, the wrong
    pipeline class or an inconsistent file fails here."""
    import torch

    from concept_erase.diffusion.models.card import save_pipeline
    from concept_erase.diffusion.models.delta import save_delta
    from concept_erase.diffusion.models.loading import load_pipeline
    from concept_erase.diffusion.models.single_file import export_single_file

    base, base_xl = load_pipeline(str(tiny_pipeline_dir)), load_pipeline(str(tiny_sdxl_pipeline_dir))
    erased = load_pipeline(str(tiny_pipeline_dir))
    with torch.no_grad():
        next(erased.unet.parameters()).add_(0.01)  # a change for the delta to carry
    stand_ins = {
        "runwayml/stable-diffusion-v1-5": tiny_pipeline_dir, "./sd15": tiny_pipeline_dir,
        "./sdxl-base": tiny_sdxl_pipeline_dir,
        "sd15-no-nudity": save_pipeline(erased, tmp_path / "erased"),
        "sd15-no-nudity.safetensors": export_single_file(erased, tmp_path / "erased.safetensors"),
        "sd15-no-nudity-delta": save_delta(base.unet, erased.unet, None, tmp_path / "delta"),
        "sdxl-no-nudity.safetensors": export_single_file(base_xl, tmp_path / "erased-xl.safetensors"),
    }
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert blocks
    for code in blocks:
        names = set(re.findall(r'"([^"]+)"', code))
        unknown = {n for n in names if n not in stand_ins and ("/" in n or n.endswith(".safetensors") or "-" in n)}
        assert not unknown, f"a README snippet names {unknown}: give it a stand-in here"
        for name, path in stand_ins.items():
            code = code.replace(f'"{name}"', repr(str(path)))
        exec(compile(code, "README snippet", "exec"), {})
