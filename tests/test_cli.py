"""The `concept-erase` entry point: the library names only its own commands, the layers built on it register
theirs as entry points, and building a command's parser stays import-light."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import concept_erase.cli as cli

ROOT = Path(__file__).resolve().parents[1]


def test_layers_register_their_commands_and_the_library_names_none_of_them():
    registered = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][cli.ENTRY_POINT_GROUP]
    assert set(registered) == {"evaluate", "compare", "attack", "audit", "app"}
    assert {n: cli.commands()[n] for n in registered} == registered  # found through the installed metadata
    assert not set(registered) & set(cli.SUBCOMMANDS)
    source = Path(cli.__file__).read_text()
    assert re.search(r"[\"'](evaluation|app)[.\"']", source) is None  # no module path of theirs


# Building these parsers imports torch for their dataclasses (EraseConfig, MiniSDTrainConfig); no parser imports
# diffusers, transformers, accelerate, gradio or NudeNet (docs/ARCHITECTURE.md).
TORCH_PARSERS = ("mask", "erase", "export", "plan", "minisd")  # diffusion/cli.py and minisd/cli.py
CHECK = """
import sys
from concept_erase.cli import build_parser, commands
heavy = ("diffusers", "transformers", "accelerate", "gradio", "nudenet", "onnxruntime")
torch_ok = set(sys.argv[1:])
for name in sorted(commands(), key=lambda n: n in torch_ok):  # the torch-free ones first
    build_parser(name)
    loaded = [m for m in heavy + (() if name in torch_ok else ("torch",)) if m in sys.modules]
    assert not loaded, (name, loaded)
print("ok")
"""


def test_building_a_parser_is_import_light():
    run = subprocess.run([sys.executable, "-c", CHECK, *TORCH_PARSERS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_import_direction():
    """app -> evaluation -> concept_erase: the library imports neither layer, evaluation never imports app
    (at module level or inside functions; docstrings and comments may name them)."""
    import ast

    forbidden = {"concept_erase": ("evaluation", "app"), "evaluation": ("app",)}
    for package, names in forbidden.items():
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    targets = [node.module or ""]
                else:
                    continue
                bad = [t for t in targets if t.split(".")[0] in names]
                assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
