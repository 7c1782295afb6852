"""ASR against budget (`concept-erase attack --sweep steps=25,50,100,200,400`; docs/PROTOCOLS.md, "ASR against
budget").

One ASR at one budget cannot tell "gone" from "not found yet": a method that only delays an attack shows up as a
curve that rises late. The sweep runs every attack whose budget has the swept setting once per value (the other
settings as given), on the erased model AND on the remap control (and the never-knew floor with --floor), the
same rows and seeds each time, and records each point's ASR and its optimisation time (the curve against
wall-clock time). The headline report is the run at the largest value; every other value is run here.
Attacks whose budget lacks the setting (Ring-A-Bell has no steps) run once, in the headline run.
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
    return {"setting": setting, "values": values, "headline_value": values[-1], "points": out}


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
            "largest value means the attack was not done: the headline ASR is a lower bound.\n\n" + table)


def sweep_lines(sweep: dict) -> list[str]:
    """The human summary: one line per attack, its ASR (and the control's) at each value."""
    by_attack: dict[str, list] = {}
    for p in sweep["points"]:
        by_attack.setdefault(p["attack"], []).append(p)
    return [f"sweep {name}: " + ", ".join(
        f"{sweep['setting']}={p['value']} ASR {p['asr']:.1f}%"
        + ("" if p["control_asr"] is None else f" (control {p['control_asr']:.1f}%)") for p in pts)
        for name, pts in by_attack.items()]
