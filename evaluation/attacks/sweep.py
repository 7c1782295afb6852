"""ASR against budget (`concept-erase attack --sweep steps=25,50,100,200,400`; docs/PROTOCOLS.md, "ASR against
budget").

One ASR at one budget cannot tell "gone" from "not found yet": a method that only delays an attack shows up as a
curve that rises late. The sweep runs every attack whose budget has the swept setting once per value (the other
settings as given), on the erased model AND on the remap control (and the never-knew floor with --floor), the
same rows and seeds each time, and records each point's ASR and its optimisation time (the curve against
wall-clock time). The headline report is the run at the largest value; every other value is run here.
Attacks whose budget lacks the setting (Ring-A-Bell has no steps) run once, in the headline run.

A sweep of the relearning attack's steps with the floor (`--attack relearn --sweep steps=... --floor`) also
gives the relearning ratio (`relearning_ratio`): the steps the erased model needs to get back to the base
model's rate, against the steps the model that never knew the concept needs.
"""

from __future__ import annotations

import csv
from dataclasses import fields, replace

from concept_erase.errors import ConceptEraseError

# One line per (attack, value) in sweep.csv and the report's table.
COLUMNS = ("attack", "setting", "value", "asr", "asr_real", "attack_alone", "pre_asr", "control_asr",
           "control_asr_real", "calibrated", "floor_asr", "floor_asr_real", "seconds")


def _parse_value(text: str, setting: str, default, spec: str):
    """`text` as the type of the budget setting whose default is `default`; a one-line error names a bad one."""
    kind = type(default)
    try:
        if kind is bool:
            if text not in ("true", "false"):
                raise ValueError
            return text == "true"
        return kind(text)
    except ValueError:
        raise ConceptEraseError(f"--sweep {spec!r}: {text!r} is not a valid {setting} ({kind.__name__})") from None


def parse_sweep(spec: str, budgets: dict) -> tuple[str, list]:
    """'steps=25,50,100' -> ("steps", [25, 50, 100]), checked against `budgets` (name -> budget) before any model
    loads: some attack run has the setting, every value makes a valid budget of each (the budgets' own bounds),
    no value twice."""
    setting, _, listed = spec.partition("=")
    setting = setting.strip().replace("-", "_")
    swept = {name: b for name, b in budgets.items() if setting in {f.name for f in fields(b)}}
    if not swept:
        raise ConceptEraseError(f"--sweep {spec!r}: no attack run has a budget setting {setting!r} (the attacks run: "
                                f"{', '.join(budgets) or 'none'})")
    first = next(iter(swept.values()))
    values = [_parse_value(v.strip(), setting, getattr(first, setting), spec) for v in listed.split(",") if v.strip()]
    if len(values) < 2 or len(set(values)) < len(values):
        raise ConceptEraseError(f"--sweep {spec!r}: give two or more distinct values, e.g. {setting}=25,100,400")
    for value in values:
        swept_budgets(budgets, setting, value)  # each point is a budget the attack accepts, or a one-line error
    return setting, sorted(values)


def swept_budgets(budgets: dict, setting: str, value) -> dict:
    """The budgets of the attacks that have `setting`, with it set to `value` (re-checked: its flag's bounds)."""
    return {name: replace(b, **{setting: value}) for name, b in budgets.items()
            if setting in {f.name for f in fields(b)}}


def points(summary: dict, setting: str, value, names) -> list[dict]:
    """The sweep's lines for the attacks `names` of one run's summary (`AttackRun.summary()`)."""
    out = []
    for name in names:
        a = summary["attacks"][name]
        out.append({"setting": setting, "value": value, "attack": name,
                    **{k: a.get(k) for k in COLUMNS if k not in ("attack", "setting", "value")}})
    return out


def run_sweep(pipe, concept, rows, budgets: dict, detector, setting: str, values: list, headline: dict, *,
              log=print, **run_kwargs) -> dict:
    """Run every value of the sweep but the largest (whose figures are the headline run's, `headline` its
    summary) with `run.run_attacks` (`run_kwargs`: protocol, base, control, floor, ...). Returns
    {"setting", "values", "headline_value", "points": [one dict per attack and value, COLUMNS]}."""
    from .run import run_attacks

    out = []
    for value in values[:-1]:
        log(f"sweep: {setting}={value}")
        run = run_attacks(pipe, concept, rows, swept_budgets(budgets, setting, value), detector,
                          log=lambda line, v=value: log(f"sweep {setting}={v}: {line}"), **run_kwargs)
        summary = run.summary()
        out += points(summary, setting, value, summary["attacks"])
    out += points(headline, setting, values[-1], swept_budgets(budgets, setting, values[-1]))
    out.sort(key=lambda p: (list(budgets).index(p["attack"]), p["value"]))
    sweep = {"setting": setting, "values": values, "headline_value": values[-1], "points": out}
    ratio = relearning_ratio(out, headline["base_detected"])
    return sweep | ({"relearning": ratio} if ratio else {})


def first_reaching(points: list[dict], key: str, rate: float):
    """The smallest swept value whose `key` (an ASR column) is at `rate` or above; None: not within the sweep."""
    return next((p["value"] for p in sorted(points, key=lambda p: p["value"]) if p[key] >= rate), None)


def relearning_ratio(points: list[dict], base_rate: float | None) -> dict | None:
    """The relearning ratio of a sweep of the relearning attack's steps run with the floor (None otherwise): the
    smallest swept step count at which the erased model's ASR reaches `base_rate` (the base model's own rate of
    showing the concept on the same rows, `base_detected`), the same for the never-knew floor, and erased / floor.
    Relearning is SPQR's test (arXiv 2511.19558); retraining without the data is unlearning's gold standard (SalUn,
    Fan et al. ICLR 2024), so 1 relearns as a model that never knew the concept, below 1 faster: something of it
    was left in the weights. Each count is known to the sweep's grid: the true count lies between the value below
    and the one named. {"base_rate", "erased_steps", "floor_steps", "ratio"} (a count None: not reached within the
    sweep, and no ratio), or {"note": why there is none} when the base's rate is unknown or zero."""
    relearn = [p for p in points if p["attack"] == "relearn" and p["setting"] == "steps"]
    if not relearn or any(p["floor_asr"] is None for p in relearn):
        return None
    if not base_rate:  # None (no base) or 0 (nothing to get back to): every step count would "reach" it
        why = "no base model was given" if base_rate is None else "the base model shows the concept on no row"
        return {"note": f"no relearning ratio: {why}"}
    erased, floor = first_reaching(relearn, "asr", base_rate), first_reaching(relearn, "floor_asr", base_rate)
    return {"base_rate": base_rate, "erased_steps": erased, "floor_steps": floor,
            "ratio": None if erased is None or floor is None else round(erased / floor, 3)}


def relearning_line(ratio: dict) -> str:
    """The relearning ratio in one sentence."""
    if "note" in ratio:
        return f"Relearning ratio: {ratio['note']}."
    at = lambda steps: "not within the sweep" if steps is None else f"at {steps} steps"  # noqa: E731
    verdict = ("not measured: a model did not get back within the sweep (sweep further)" if ratio["ratio"] is None
               else f"{ratio['ratio']:.2f} (1: as fast as a model that never knew the concept; below 1: faster)")
    return (f"Relearning ratio: the erased model gets back to the base model's rate ({ratio['base_rate']:.1f}% of "
            f"the rows) {at(ratio['erased_steps'])}, the never-knew floor {at(ratio['floor_steps'])} (each the "
            f"first swept value that does); erased / floor = {verdict}.")


def write_sweep_csv(sweep: dict, path) -> None:
    """sweep.csv: one line per attack and value (COLUMNS); empty cells where there was no control or floor."""
    from concept_erase.io_utils import atomic_file

    with atomic_file(path, overwrite=True) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for p in sweep["points"]:
            writer.writerow({k: "" if p[k] is None else p[k] for k in COLUMNS})


def sweep_section(sweep: dict) -> str:
    """Markdown: the ASR-against-budget table, and which value the headline figures are at."""
    from ..report import markdown_table

    show = lambda v: "-" if v is None else v  # noqa: E731
    table = markdown_table(
        ["attack", sweep["setting"], "ASR %", "attack alone %", "control recovered %", "never-knew floor %",
         "seconds"],
        [(p["attack"], p["value"], p["asr"], p["attack_alone"], show(p["control_asr"]), show(p["floor_asr"]),
          p["seconds"]) for p in sweep["points"]])
    return (f"## ASR against budget ({sweep['setting']})\n\nEach attack with a `{sweep['setting']}` setting, run at "
            f"each value on the same rows and seeds (sweep.csv). The headline figures above are the run at "
            f"{sweep['setting']}={sweep['headline_value']}, the largest value swept. A curve still rising at the "
            "largest value means the attack was not done: the headline ASR is a lower bound.\n\n" + table
            + (f"\n\n{relearning_line(sweep['relearning'])}" if "relearning" in sweep else ""))


def sweep_lines(sweep: dict) -> list[str]:
    """The human summary: one line per attack, its ASR (and the control's) at each value."""
    by_attack: dict[str, list] = {}
    for p in sweep["points"]:
        by_attack.setdefault(p["attack"], []).append(p)
    return [f"sweep {name}: " + ", ".join(
        f"{sweep['setting']}={p['value']} ASR {p['asr']:.1f}%"
        + ("" if p["control_asr"] is None else f" (control {p['control_asr']:.1f}%)") for p in pts)
        for name, pts in by_attack.items()] + ([relearning_line(sweep["relearning"])] if "relearning" in sweep else [])
