"""The `concept-erase` entry point: the library names only its own commands, the layers built on it register
theirs as entry points, and building a command's parser stays import-light."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import concept_erase.cli as cli

ROOT = Path(__file__).resolve().parents[1]


def test_layers_register_their_commands_and_the_library_names_none_of_them():
    registered = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][cli.ENTRY_POINT_GROUP]
    assert set(registered) == {"evaluate", "compare", "attack", "audit", "app"}
    assert {n: cli.commands()[n] for n in registered} == registered  # found through the installed metadata
    assert not set(registered) & set(cli.SUBCOMMANDS)
    source = Path(cli.__file__).read_text()
    assert re.search(r"[\"'](evaluation|app)[.\"']", source) is None  # no module path of theirs


# No parser imports torch, diffusers, transformers, accelerate, gradio or NudeNet (docs/ARCHITECTURE.md); a
# command named here may import torch when its parser is built.
TORCH_PARSERS: tuple[str, ...] = ()
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


# A bad invocation is refused by the parser and the checks alone: `import torch` (seconds) comes after them.
REFUSE_WITHOUT_TORCH = """
import sys
from concept_erase.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print(code, loaded)
"""
ERASE = ["erase", "--model", "minisd", "--forget", "a", "--surrogate", "b", "--output", "o"]
MASK = ["mask", "--model", "minisd", "--forget", "a", "--surrogate", "b", "--output"]
NO_TORCH_CASES = {  # argv, the error it must give
    "export energy above 1": (["export", "minisd", "--to", "lora", "--energy", "1.5", "--output", "l.safetensors"],
                              "--energy"),
    "export not .safetensors": (["export", "minisd", "--to", "single-file", "--output", "m.ckpt"],
                                "must end in .safetensors"),
    "apply strength above 1.5": (["apply", "e.safetensors", "--model", "minisd", "--strength", "2", "--output", "o"],
                                 "--strength"),
    "apply output under a file": (["apply", "e.safetensors", "--model", "minisd", "--output", "file/o"], "file/o"),
    "classify output under a file": (["classify", "--output", "file/o"], "file/o"),
    "demo output under a file": (["demo", "--output", "file/o"], "file/o"),
    # erase and mask: the method specs (methods/options.py) and EraseConfig's checks before the model loads
    "erase alpha nan": ([*ERASE, "--alpha", "nan"], "--alpha must be a finite number, got nan"),
    "erase flag its method does not read": ([*ERASE, "--method", "esd-x", "--keep", "0.3"],
                                            "--keep is not used by --method esd-x"),
    "erase save-delta is the output": ([*ERASE, "--save-delta", "o"], "--save-delta and --output are the same path"),
    "erase forget images below the prompts": (
        ["erase", "--model", "minisd", "--forget", "a", "--forget", "b", "--forget", "c", "--surrogate", "s",
         "--num-forget-images", "2", "--output", "o"], "--num-forget-images 2 is fewer than the 3 prompts"),
    "mask output not .safetensors": ([*MASK, "m.pt"], "--output 'm.pt' must end in .safetensors"),
    "mask output under a file": ([*MASK, "file/m.safetensors"], "file/m.safetensors"),
    # what the model's files say (models/facts.py: its configs and safetensors headers, no weights read)
    "mask keep of no weight": ([*MASK, "m.safetensors", "--keep", "1e-12"], "keeps none of the 3,141,700 weights"),
    "erase resolution not a multiple of 8": ([*ERASE, "--resolution", "12"], "--resolution 12 is not a multiple of 8"),
    "erase esd steps above the scheduler's": ([*ERASE, "--method", "esd-x", "--esd-ddim-steps", "5000"],
                                              "--esd-ddim-steps 5000 is more than the 1000 timesteps"),
    "generate steps above the scheduler's": (["generate", "--model", "minisd-xl", "--prompt", "a", "--output", "g",
                                              "--num-inference-steps", "5000"], "more than the 1000 timesteps"),
    "generate height not a multiple of 8": (["generate", "--model", "minisd", "--prompt", "a", "--output", "g",
                                             "--height", "20", "--width", "16"], "--height 20 is not a multiple of 8"),
    "erase into a locked output": (["erase", "--model", "minisd", "--forget", "a", "--surrogate", "b", "--output",
                                    "held"], "--output 'held' is being written by run 1 on another machine"),
    "export of random bytes": (["export", "random.ckpt", "--config", "minisd", "--to", "diffusers", "out"],
                               "is not a checkpoint (or is damaged): unreadable pickle data"),
    # plan: its config is torch-free (plan_config.py), its estimate imports torch after the checks
    "plan resolution not a multiple of 8": (["plan", "--resolution", "12"], "--resolution 12 is not a multiple of 8"),
    "plan keep of no weight": (["plan", "--keep", "1e-12"], "keeps none of the 3,141,700 weights"),
    "plan budget without a unit": (["plan", "--memory-budget", "0.4"], "--memory-budget '0.4' is not a size"),
    "minisd train-judges not .safetensors": (["minisd", "train-judges", "--output", "j.pt"], "must end in .safetensors"),
    # a MiniSD digit preset builds without torch (its neighbours are a table, minisd/presets.py)
    "bad flag beside a minisd digit preset": (["erase", "--model", "minisd", "--concept", "minisd-digit-seven",
                                               "--output", "o", "--alpha", "nan"], "--alpha must be a finite number"),
}
# Files a case finds in its folder beside `file` (and leaves as they were).
CASE_FILES = {"held.lock": "1 0000beef\n",  # pid 1 of another host: held, whatever its age
              "random.ckpt": bytes(range(7, 247))}  # neither a zip archive nor a pickle


@pytest.mark.parametrize("case", list(NO_TORCH_CASES))
def test_a_bad_invocation_is_refused_before_torch_is_imported(case, tmp_path):
    (tmp_path / "file").write_text("a user's file")
    for name, content in CASE_FILES.items():
        (tmp_path / name).write_bytes(content.encode() if isinstance(content, str) else content)
    argv, expected = NO_TORCH_CASES[case]
    run = subprocess.run([sys.executable, "-c", REFUSE_WITHOUT_TORCH, *argv], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    errors = [line for line in run.stderr.splitlines() if line.startswith("concept-erase: error: ")]
    assert len(errors) == 1 and run.stderr.strip().splitlines()[-1] == errors[0], run.stderr[-2000:]  # one line
    assert expected in errors[0], errors
    assert run.stdout.split("\n")[-2] == "2 []", (run.stdout, run.stderr[-2000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["file", *CASE_FILES])  # nothing written


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


def _project_imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at module level or inside functions (a lazy import still
    ties two files together), read from the source; `if TYPE_CHECKING:` blocks are left out."""
    import ast

    files = {}
    for package in ("concept_erase", "evaluation", "app", "prompts"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
        edges = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from package import submodule` imports the submodule; `from module import name` the module
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != module}
        graph[module] = edges
    return graph


def test_no_import_circles():
    """No two project modules import each other, directly or through others (lazy imports included)."""
    graph = _project_imports()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_the_circle_check_sees_lazy_and_relative_imports():
    """The check above is only as good as its graph: it must see a relative import inside a function."""
    graph = _project_imports()
    assert "concept_erase.diffusion.methods.base" in graph["concept_erase.diffusion.methods.salun"]
    assert "concept_erase.diffusion.models.card" in graph["concept_erase.diffusion.training.job"]  # lazy


def test_version(capsys):
    import pytest

    from concept_erase import __version__

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"concept-erase {__version__}"
