"""How long each bad input of `tests/test_bad_inputs.py` takes to be refused, as a user meets it.

Every case of that test's table (`CASES`, the one list of refused inputs) runs as its own `concept-erase`
command line in a fresh process, in its own empty folder (the test's `{tmp}`, `{file}`, `{in:...}`,
`{replay:...}`, `{locked:...}` and `{tiny}` placeholders filled the same way), and the table gives the wall
seconds from the process's start to its exit: Python, the imports, the checks and the refusal. It also says
whether a model was loaded (`loading.load_pipeline` called) before the refusal, and checks that each case
still exits 2 with its expected line. Two floors put the figures in scale: `concept-erase --version` (Python
and the parser alone) and `import torch` (what a command that checks with torch pays first).

Example (the committed table, benchmarks/results/refusal_latency.md):
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/refusal_latency.py > benchmarks/results/refusal_latency.md
    python benchmarks/refusal_latency.py --only plan     # the cases whose name contains "plan"
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs `concept_erase.cli.main(argv)` and reports on stderr whether a pipeline was loaded before it returned:
# `load_pipeline` is wrapped the moment its module is imported (every command imports it lazily), so the
# wrapper adds nothing to a command that never imports it.
RUN = """
import importlib.abc, importlib.machinery, sys

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "concept_erase.diffusion.models.loading":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            load = module.load_pipeline

            def watched(*args, **kwargs):
                sys.stderr.write("refusal-latency: model loaded\\n")
                return load(*args, **kwargs)

            module.load_pipeline = watched
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Watch())
from concept_erase.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cases():
    sys.path.insert(0, str(ROOT / "tests"))
    import test_bad_inputs  # the one table of refused inputs

    return test_bad_inputs.CASES, test_bad_inputs._fill


def _run(argv: list[str], folder: Path, env: dict) -> tuple[float, int, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUN, *argv], cwd=folder, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode, done.stderr


def _floor(code: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *code], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="run the cases whose name contains this text")
    args = p.parse_args()

    from concept_erase.diffusion.models.tiny import build_tiny_pipeline
    from concept_erase.threads import available_cores

    cases, fill = _cases()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tiny = scratch / "tiny"
        build_tiny_pipeline(seed=0).save_pretrained(tiny)
        load_before = os.getloadavg()[0]
        floors = {"`concept-erase --version`": _floor(["-m", "concept_erase.cli", "--version"], env),
                  "`python -c 'import torch'`": _floor(["-c", "import torch"], env)}
        rows = []
        for i, (name, (argv, expected)) in enumerate(cases.items()):
            if args.only not in name:
                continue
            folder = scratch / f"case{i}"
            folder.mkdir()
            (folder / "file").write_text("a user's file")
            filled = [fill(a, folder, tiny) for a in argv]
            seconds, code, err = _run(filled, folder, {**env, "CONCEPT_ERASE_CACHE": str(folder / "cache")})
            refused = code == 2 and fill(expected, folder) in err
            rows.append((name, seconds, "yes" if "refusal-latency: model loaded" in err else "no",
                         "yes" if refused else f"NO (exit {code})"))
            print(f"{seconds:6.2f} s  {name}", file=sys.stderr)
        load_after = os.getloadavg()[0]

    print("# How long a bad input takes to be refused\n")
    print(f"Command: `HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/refusal_latency.py"
          f"{' --only ' + args.only if args.only else ''}`. Machine: {platform.machine()}, "
          f"{os.cpu_count()} CPUs ({available_cores()} available to this process), Python "
          f"{platform.python_version()}; load average {load_before:.1f} at the start, {load_after:.1f} at the end "
          "(other engineers' runs share the machine). Wall seconds of one fresh `concept-erase` process per case, "
          "start to exit.\n")
    print("| floor | seconds |\n| --- | ---: |")
    for name, seconds in floors.items():
        print(f"| {name} | {seconds:.2f} |")
    print("\n| case (tests/test_bad_inputs.py) | seconds | model loaded first | refused as expected |")
    print("| --- | ---: | --- | --- |")
    for name, seconds, loaded, refused in rows:
        print(f"| {name} | {seconds:.2f} | {loaded} | {refused} |")
    times = sorted(r[1] for r in rows)
    if times:
        print(f"\n{len(rows)} cases: median {times[len(times) // 2]:.2f} s, slowest {times[-1]:.2f} s; "
              f"{sum(t < 1 for t in times)} under 1 s; {sum(r[2] == 'yes' for r in rows)} loaded a model first.")


if __name__ == "__main__":
    main()
