"""What the CLI's own threading settings (`concept_erase.threads`) buy on a deliberately loaded CPU.

The same MiniSD generation runs in fresh processes, alternating in every repeat, while `--hogs` processes
spin on the CPU (default: one per available core, i.e. a machine whose cores are all busy elsewhere):

- before: torch's defaults, as the CLI ran before (OpenMP's spinning wait policy, one thread per core);
- after: `configure_threads()` first, as every `concept-erase` command now does (passive wait, the cores
  this process may use);
- after, --threads 1: the same with one thread.

Each variant's process gets an environment without OMP_* / MKL_* variables, so only the code path differs.
The table gives the median seconds and the ratio to "before". Example:
    HF_HUB_OFFLINE=1 python benchmarks/cli_threading.py --images 16 --repeats 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys

WORKLOAD = """
import sys, time
configure = sys.argv[1]
if configure != "none":
    from concept_erase.threads import configure_threads
    configure_threads(None if configure == "auto" else int(configure))
import torch
from concept_erase.diffusion.data.generate import generate_images
from concept_erase.diffusion.models.loading import load_pipeline
pipe = load_pipeline("minisd")
n = int(sys.argv[2])
start = time.perf_counter()
generate_images(pipe, ["a handwritten digit seven"] * n, list(range(n)), num_inference_steps=25,
                guidance_scale=5.0, batch_size=8)
print(time.perf_counter() - start, torch.get_num_threads())
"""

VARIANTS = {"before (torch defaults)": "none", "after (CLI defaults)": "auto", "after, --threads 1": "1"}


def _spin() -> None:
    while True:
        pass


def _run(configure: str, images: int) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "GOMP_"))}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", WORKLOAD, configure, str(images)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[-2]), int(out[-1])


def main() -> None:
    from concept_erase.threads import available_cores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="MiniSD images per measurement (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats; the median is shown (default 3)")
    parser.add_argument("--hogs", type=int, default=None,
                        help="CPU-spinning processes started for the run (default: one per available core)")
    args = parser.parse_args()
    hogs = available_cores() if args.hogs is None else args.hogs

    workers = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(hogs)]
    for w in workers:
        w.start()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    threads: dict[str, int] = {}
    try:
        for r in range(args.repeats):
            names = list(VARIANTS)[r % len(VARIANTS):] + list(VARIANTS)[:r % len(VARIANTS)]  # rotate the order
            for name in names:
                seconds, threads[name] = _run(VARIANTS[name], args.images)
                times[name].append(seconds)
                print(f"repeat {r + 1}: {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    finally:
        for w in workers:
            w.terminate()
    before = statistics.median(times["before (torch defaults)"])
    print(f"\nMiniSD generation, {args.images} images x 25 DDIM steps, {hogs} CPU-spinning processes beside it, "
          f"{available_cores()} available cores, median of {args.repeats}\n")
    print("| variant | torch threads | seconds (median) | speed-up vs before |")
    print("| --- | --- | --- | --- |")
    for name in VARIANTS:
        t = statistics.median(times[name])
        print(f"| {name} | {threads[name]} | {t:.1f} | {before / t:.2f}x |")


if __name__ == "__main__":
    main()
