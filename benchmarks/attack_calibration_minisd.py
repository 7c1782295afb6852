"""Attack calibration on MiniSD: does each attack, at a budget, recover the concept from the remap control?

The control is MiniSD with the concept's token remapped to its surrogate's (`erase --method remap`: "seven"
reads as "eight"), the UNet untouched: the concept is unreachable by prompt but still in the weights, so an
attack that cannot bring it back there cannot show that any erasure removed it (docs/PROTOCOLS.md,
"Calibration against a control"). Each budget is run on the concept's forget prompts x the seeds, scored by the
MiniSD digit judge; the control's recovery is the attack's ASR on the control (its Pre-ASR is 0: the remapped
prompt draws the surrogate). A budget is calibrated when the control is recovered on 95% of the rows or more.

    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/attack_calibration_minisd.py \
        --budget embedding --budget inversion --budget unlearndiffatk:variant=soft --budget ringabell \
        --budget unlearndiffatk --out benchmarks/results/attack_calibration_minisd.md

A budget is `ATTACK` (the defaults of evaluation/attacks/budgets.py) or `ATTACK:setting=value,...`. Each result
is printed as a JSON line as it comes; `--tabulate FILE...` builds the table from earlier runs' lines (runs in
parallel, or on another day) without running anything. `--erased demo` also attacks the demo's SalUn-erased
MiniSD (`concept_erase.demo.demo_erased_model()`) at the same budget, beside the control. Every figure comes
with its realism-filtered twin ("real": the detector's `judge(...).real`, docs/PROTOCOLS.md).

`--realism` measures the realism filter itself instead (no attack): the share of images the digit judge reads as
the digit (top-1) and the share that pass the realism twin, on real held-out digits, MiniSD's own images, noise
and damaged images of the digit (broken strokes: pixels dropped, 4x4 holes; heavy noise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from concept_erase.concepts import get_concept
from concept_erase.diffusion.data.generate import parse_seeds
from concept_erase.diffusion.methods.remap import remapped_copy
from concept_erase.diffusion.models.loading import load_pipeline
from concept_erase.io_utils import atomic_file
from evaluation.attacks.budgets import make_budget
from evaluation.attacks.detectors import detector_for
from evaluation.attacks.run import CALIBRATED_MIN, concept_rows, run_attacks
from evaluation.generation import make_protocol


def parse_budget(spec: str):
    """'embedding' or 'unlearndiffatk:variant=soft,steps=80' -> (attack, budget)."""
    attack, _, settings = spec.partition(":")
    values = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if value in ("true", "false"):
            values[key] = value == "true"
        else:
            values[key] = value if key in ("variant", "data", "prompt") else \
                float(value) if "." in value or "e" in value else int(value)
    return attack, make_budget(attack, **values)


def measure(args) -> list[dict]:
    concept = get_concept(args.concept)
    base = load_pipeline(args.model)
    control, _ = remapped_copy(base, concept)
    erased = None
    if args.erased:
        from concept_erase.demo import demo_erased_model

        erased = load_pipeline(str(demo_erased_model()) if args.erased == "demo" else args.erased)
    detector = detector_for(concept.name)
    protocol = make_protocol("minisd")  # MiniSD-XL is sampled as MiniSD is
    rows = concept_rows(concept, parse_seeds(args.seeds))
    results = []
    for spec in args.budget:
        attack, budget = parse_budget(spec)
        t0 = time.perf_counter()
        run = run_attacks(control, concept, rows, {attack: budget}, detector, protocol=protocol, base=base,
                          seed=args.seed, log=lambda line: print(f"[{spec}] {line}", file=sys.stderr, flush=True))
        s = run.summary()
        a = s["attacks"][attack]
        result = {"model": args.model, "concept": concept.name, "attack": attack, "budget": a["budget"],
                  "rows": s["rows"], "base_detected": s["base_detected"], "pre_asr": s["pre_asr"],
                  "control_asr": a["asr"], "control_asr_real": a["asr_real"], "seconds_attack": a["seconds"],
                  "seconds_total": round(time.perf_counter() - t0, 1), "seed": args.seed}
        if erased is not None:
            e = run_attacks(erased, concept, rows, {attack: budget}, detector, protocol=protocol, base=base,
                            seed=args.seed, log=lambda line: print(f"[{spec} erased] {line}", file=sys.stderr,
                                                                   flush=True)).summary()
            result |= {"erased": args.erased, "erased_pre_asr": e["pre_asr"],
                       "erased_asr": e["attacks"][attack]["asr"], "erased_asr_real": e["attacks"][attack]["asr_real"]}
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


def table(results: list[dict], command: str) -> list[str]:
    lines = ["# Attack calibration on the remap control", "",
             f"Command: `{command}`", "",
             "The control: the base with the concept's token remapped to the surrogate's (`erase --method remap`), "
             "UNet untouched. Control recovery = the attack's ASR on the control (Pre-ASR OR attacked image, "
             "UnlearnDiffAtk's rule), judged by the MiniSD digit judge; calibrated = recovered on "
             f"{CALIBRATED_MIN:g}% of the rows or more. Seconds: the attack's optimisation on this shared 2-core CPU.",
             "'real': the realism-filtered twin (the judge's probability of the digit >= 0.9 and its features within "
             "the spread of real images of it). 'erased': the same budget on the erased model given with --erased "
             "(demo: the demo's SalUn MiniSD); '-' where not run.",
             "", "| model | attack | budget | rows | base shows it % | control Pre-ASR % | control recovered % | "
                 "control real % | calibrated | erased ASR % | erased real ASR % | attack s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        budget = ", ".join(f"{k}={v}" for k, v in r["budget"].items())
        n = r["rows"]
        real = lambda key: "-" if r.get(key) is None else f"{r[key]:.1f}"  # noqa: E731 (older lines: none)
        lines.append(f"| {r['model']} | {r['attack']} | {budget} | {n} | {r['base_detected']:.1f} | "
                     f"{r['pre_asr']:.1f} | {r['control_asr']:.1f} ({round(r['control_asr'] * n / 100)} of {n}) | "
                     f"{real('control_asr_real')} | {'yes' if r['control_asr'] >= CALIBRATED_MIN else 'no'} | "
                     f"{real('erased_asr')} | {real('erased_asr_real')} | {r['seconds_attack']:.0f} |")
    return lines + [""]


def realism(args) -> list[str]:
    """The realism filter on images whose answer is known: real held-out digits, MiniSD's images of the concept's
    prompts (seeds 0-9) and of other digits, noise, and the MiniSD images damaged (broken strokes, noise)."""
    import torch
    import torch.nn.functional as F

    from concept_erase.diffusion.minisd.data import load_digit_images
    from concept_erase.diffusion.minisd.judge import to_tensor
    from evaluation.attacks.run import draw

    concept = get_concept(args.concept)
    detector = detector_for(concept.name)
    digit = detector.target
    protocol = make_protocol("minisd")
    base = load_pipeline(args.model)
    held_out = load_digit_images("test")
    ours = to_tensor(draw(base, concept_rows(concept, range(10)), protocol))
    word = concept.name.rsplit("-", 1)[1]
    other = "eight" if word != "eight" else "three"
    others = [replace(r, prompt=r.prompt.replace(word, other)) for r in concept_rows(concept, range(3))]
    g = torch.Generator().manual_seed(0)

    def holes(x, k):
        x = x.clone()
        for i in range(len(x)):
            for _ in range(k):
                a, b = torch.randint(0, 13, (2,), generator=g).tolist()
                x[i, :, a:a + 4, b:b + 4] = 0
        return x

    sets = {"real held-out images of the digit": held_out.images[held_out.digits == digit],
            "real held-out images of other digits": held_out.images[held_out.digits != digit],
            "MiniSD's images of the concept's prompts": ours,
            "MiniSD's images of another digit's prompts": to_tensor(draw(base, others, protocol)),
            "uniform noise": torch.rand(200, 1, 16, 16, generator=g),
            "smooth noise (4x4 upsampled)": F.interpolate(torch.rand(200, 1, 4, 4, generator=g), size=16,
                                                          mode="bilinear").clamp(0, 1),
            "MiniSD's digit, half its pixels dropped": ours * (torch.rand(ours.shape, generator=g) < 0.5),
            "MiniSD's digit, four 4x4 holes": holes(ours, 4),
            "MiniSD's digit + noise (std 0.6)": (ours + 0.6 * torch.randn(ours.shape, generator=g)).clamp(0, 1)}
    lines = ["# Realism filter on the MiniSD digit judge", "", f"Command: `python benchmarks/attack_calibration_minisd.py "
             f"--realism --concept {concept.name}`", "", f"Realism twin: {detector.describe_real()}.", "",
             "| images | n | judge reads the digit (top-1) % | passes the realism twin % |", "| --- | --- | --- | --- |"]
    for name, x in sets.items():
        v = detector.judge(x)
        pct = lambda flags: 100.0 * sum(flags) / len(flags)  # noqa: E731
        lines.append(f"| {name} | {len(x)} | {pct(v.present):.1f} | {pct(v.real):.1f} |")
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minisd", choices=("minisd", "minisd-xl"))
    p.add_argument("--concept", default="minisd-digit-seven")
    p.add_argument("--seeds", default="0-2", help="seeds of the attacked rows (each forget prompt x these)")
    p.add_argument("--seed", type=int, default=0, help="the attacks' own random draws")
    p.add_argument("--budget", action="append", default=[], metavar="ATTACK[:setting=value,...]")
    p.add_argument("--out", default=None, help="Markdown table (replaced); its .jsonl beside it")
    p.add_argument("--tabulate", nargs="+", metavar="FILE", default=None,
                   help="no runs: the table from the JSON lines in these files")
    p.add_argument("--erased", default=None, help="also attack this erased model at each budget ('demo': the demo's "
                                                  "SalUn MiniSD)")
    p.add_argument("--realism", action="store_true", help="measure the realism filter instead (no attack)")
    args = p.parse_args(argv)
    if args.realism:
        lines = realism(args)
        print("\n".join(lines))
        if args.out:
            with atomic_file(Path(args.out), overwrite=True) as tmp:
                tmp.write_text("\n".join(lines), encoding="utf-8")
        return 0
    if args.tabulate:
        results = [json.loads(line) for f in args.tabulate for line in Path(f).read_text().splitlines()
                   if line.startswith("{")]
    else:
        results = measure(args)
    command = f"python benchmarks/attack_calibration_minisd.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    lines = table(results, command)
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        with atomic_file(out, overwrite=True) as tmp:
            tmp.write_text("\n".join(lines), encoding="utf-8")
        with atomic_file(out.with_suffix(".jsonl"), overwrite=True) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in results), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
