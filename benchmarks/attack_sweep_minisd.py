"""ASR against budget on MiniSD, between the never-knew floor and the remap control's ceiling.

Each `--run ATTACKS:SETTING=V1,V2,...` is one `concept-erase attack --sweep SETTING=V1,...` on the demo's
SalUn-erased MiniSD (`concept_erase.demo.demo_erased_model()`: 50 steps of SalUn on "seven"), on the forget
prompts x `--seeds`: every attack of ATTACKS with the setting runs at each value on the erased model and on the
remap control (the ceiling: the concept still in the UNet, unreachable by prompt); attacks without the setting
(textfree) run once, in the largest value's run. The floor (the MiniSD trained without sevens: docs/PROTOCOLS.md,
"The never-knew floor") is the same sweep with that model as `--model` and MiniSD as `--base`, which is what
`attack --floor` runs on it (same base, budgets, rows and seed), in a process of its own so that the two parts
can run side by side or at different times (`--only`). Each run's output folder and log go under `--work`; the
table per attack reads sweep.csv (ASR) and the log (each point's realism twin, which sweep.csv does not hold;
the ASR logged is checked against sweep.csv's).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/attack_sweep_minisd.py \
        --seeds 0-4 --run inversion,textfree:steps=75,150,300 --run embedding:steps=25,50,100,200 \
        --work /tmp/sweeps --out benchmarks/results/attack_sweep_minisd.md
    python benchmarks/attack_sweep_minisd.py --tabulate /tmp/sweeps/inversion+textfree /tmp/sweeps/embedding
    python benchmarks/attack_sweep_minisd.py --floor-check --seeds 0-2   # does the floor model draw its digits?

The floor model is trained once (MiniSD's own recipe: slow on a shared CPU) by the first `attack --floor`; this
script refuses to attack it while it is not cached rather than train it inside a benchmark.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

PARTS = ("erased", "floor")
# run_attacks' progress line, with the prefixes `sweep.run_sweep` ("sweep steps=25: ") and the control's run
# ("control: ") put in front of it.
LINE = re.compile(r"^(?:sweep \w+=(?P<value>\S+): )?(?:(?P<model>control): )?(?P<attack>\w+): Pre-ASR "
                  r"(?P<pre>[\d.]+)%  ASR (?P<asr>[\d.]+)%  real ASR (?P<real>[\d.]+)%  \(attack alone [\d.]+%, "
                  r"(?P<rows>\d+) prompts, (?P<seconds>[\d.]+) s\)")


def floor_ready() -> Path:
    from evaluation.attacks.floor import never_knew_path

    path = never_knew_path("seven")
    if not (path / "model_index.json").is_file():
        sys.exit(f"the never-knew model is not cached at {path}: build it first (the first `concept-erase attack "
                 "--floor` does, once); this benchmark does not train it")
    return path


def run(spec: str, seeds: str, work: Path, part: str) -> Path:
    """One sweep, ATTACKS:SWEEP, as `attack --sweep` runs: `part` "erased" (the erased model, with the control) ->
    WORK/<attacks joined by +>/, "floor" (the never-knew model, attacked as `--floor` attacks it: same base,
    budgets, rows and seed) -> WORK/<...>-floor/; each with its .log."""
    from concept_erase.demo import demo_erased_model

    head, *flags = spec.split()  # flags: more `attack` flags, e.g. --unlearndiffatk-variant soft
    attacks, _, sweep = head.partition(":")
    name = attacks.replace(",", "+") + "".join(f"-{f}" for f in flags if not f.startswith("--"))
    out = work / (name + ("-floor" if part == "floor" else ""))
    if out.exists() or out.with_suffix(".log").exists():
        sys.exit(f"{out} (or its .log) exists: choose another --work")
    model = ["--model", str(floor_ready()), "--base", "minisd", "--protocol", "minisd", "--no-control"] \
        if part == "floor" else ["--model", str(demo_erased_model())]
    command = [sys.executable, "-m", "concept_erase", "attack", *model, "--concept", "minisd-digit-seven",
               "--seeds", seeds, "--sweep", sweep, "--no-progress", "--output", str(out),
               *[f"--attack={a}" for a in attacks.split(",")], *flags]
    print("$ concept-erase " + " ".join(command[3:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w", encoding="utf-8") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"{out}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def figures(out: Path) -> tuple[dict, list[dict], dict]:
    """One run's results.json, sweep.csv and its log's progress lines ((model, attack, value) -> match; model
    "erased" or "control"), each logged ASR checked against sweep.csv's."""
    summary = json.loads((out / "results.json").read_text())
    points = list(csv.DictReader(open(out / "sweep.csv", encoding="utf-8")))
    headline = max(float(p["value"]) for p in points)
    logged = {}
    for line in out.with_suffix(".log").read_text(encoding="utf-8").splitlines():
        m = LINE.match(line)
        if m:
            logged[(m["model"] or "erased", m["attack"], float(m["value"]) if m["value"] else headline)] = m
    for p in points:
        for model, key in (("erased", "asr"), ("control", "control_asr")):
            m = logged.get((model, p["attack"], float(p["value"])))
            if p[key] and (m is None or abs(float(m["asr"]) - float(p[key])) > 0.05):
                raise SystemExit(f"{out}: the log's {model} ASR of {p['attack']} at {p['value']} is missing or not "
                                 "sweep.csv's (has run_attacks' progress line changed? see LINE)")
    return summary, points, logged


def table(out: Path) -> list[str]:
    """One Markdown table per attack of one sweep (OUT and OUT-floor): each swept value's ASR and realism twin
    on the erased model, the control and the floor, and the erased model's optimisation seconds."""
    summary, points, logged = figures(out)
    floor_out = out.with_name(out.name + "-floor")
    floor_summary, _, floor_logged = figures(floor_out) if floor_out.is_dir() else ({"pre_asr": None}, [], {})
    headline = max(float(p["value"]) for p in points)
    floor_pre = "not run" if floor_summary["pre_asr"] is None else f"{floor_summary['pre_asr']:.1f}%"
    lines = [f"Rows: {summary['rows']}. Pre-ASR (plain prompts): erased {summary['pre_asr']:.1f}%, control "
             f"{summary['control']['pre_asr']:.1f}%, floor {floor_pre}.", ""]
    for name, a in summary["attacks"].items():
        mine = [p for p in points if p["attack"] == name]
        setting = points[0]["setting"]

        def cell(found, model, v):
            m = found.get((model, name, v))
            if m is None:
                return "not run"
            return f"{float(m['asr']):.1f} ({float(m['real']):.1f})"

        lines += [f"**{name}**", "", f"| {setting} | erased ASR % (real) | control recovered % (real) | "
                  "never-knew floor % (real) | erased attack s |", "| --- | --- | --- | --- | --- |"]
        for p in mine or [{"value": f"(no {setting}: run once)", "seconds": a["seconds"]}]:
            v = float(p["value"]) if mine else headline
            lines.append(f"| {p['value']} | {cell(logged, 'erased', v)} | {cell(logged, 'control', v)} | "
                         f"{cell(floor_logged, 'erased', v)} | {float(p['seconds']):.0f} |")
        lines.append("")
    return lines


def floor_check(seeds: str) -> list[str]:
    """`minisd check`'s images (every digit x style x seed) on MiniSD and on the never-knew model, judged: each
    model's share of the nine known digits drawn right, and what its "seven" prompts draw."""
    import numpy as np

    from concept_erase.diffusion.data.generate import parse_seeds
    from concept_erase.diffusion.minisd import DIGITS
    from concept_erase.diffusion.minisd.judge import generate_digit_set, load_judges
    from concept_erase.diffusion.models.loading import load_pipeline

    judges, seven = load_judges(), DIGITS.index("seven")
    lines = ["| model | images | nine known digits drawn right % | worst known digit % | style right % | "
             "\"seven\" prompts judged as seven % | what the \"seven\" prompts are judged as |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, source in (("MiniSD", "minisd"), ("never-knew (no seven)", str(floor_ready()))):
        gen = generate_digit_set(load_pipeline(source), seeds=parse_seeds(seeds))
        digits, styles = judges.predict_digits(gen.images), judges.predict_styles(gen.images)
        known = gen.digits != seven
        worst = min((digits[gen.digits == d] == d).mean() for d in range(len(DIGITS)) if d != seven)
        asked = digits[~known]
        judged = ", ".join(f"{DIGITS[d]} {100 * np.mean(asked == d):.0f}%" for d in np.unique(asked))
        lines.append(f"| {name} | {len(digits)} | {100 * (digits[known] == gen.digits[known]).mean():.1f} | "
                     f"{100 * worst:.1f} | {100 * (styles == gen.styles).mean():.1f} | "
                     f"{100 * (asked == seven).mean():.1f} | {judged} |")
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", default=[], metavar="ATTACKS:SETTING=V1,V2,...",
                   help="attacks (comma-separated) and the sweep, e.g. embedding:steps=25,50,100,200, then any "
                        "other `attack` flags: 'unlearndiffatk:steps=50,100,200 --unlearndiffatk-variant soft'")
    p.add_argument("--seeds", default="0-4", help="seeds of each forget prompt (attacked rows), or of --floor-check")
    p.add_argument("--work", type=Path, default=Path("attack-sweeps"), help="the runs' output folders and logs")
    p.add_argument("--tabulate", nargs="+", type=Path, default=[], metavar="DIR", help="no runs: tables of these")
    p.add_argument("--only", choices=PARTS, help="run one part of each --run (tabulate later)")
    p.add_argument("--floor-check", action="store_true", help="judge the floor model's digits instead")
    p.add_argument("--out", type=Path, help="also write the Markdown here (replaced)")
    args = p.parse_args(argv)
    if args.floor_check:
        lines = floor_check(args.seeds)
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        folders = []
        for spec in args.run:
            done = [run(spec, args.seeds, args.work, part) for part in ([args.only] if args.only else PARTS)]
            folders.append(done[0])
        if args.only:
            return 0  # the other part is still to run: tabulate once both are there
        folders += args.tabulate
        lines = [line for out in folders for line in [f"### {out.name}", "", *table(out)]]
    print("\n".join(lines))
    if args.out:
        from concept_erase.io_utils import atomic_file

        with atomic_file(args.out, overwrite=True) as tmp:
            tmp.write_text("\n".join(lines), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
