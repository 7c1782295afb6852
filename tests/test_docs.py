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
