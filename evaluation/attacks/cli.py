"""`concept-erase attack` and `concept-erase audit`.

    concept-erase attack --model ERASED --concept C [--attack unlearndiffatk ...] --output DIR  # default: all four
    concept-erase attack --model OTHER --concept C --replay DIR --output DIR2      # transfer: no optimisation
    concept-erase audit ERASED [--base BASE] --concept C --output DIR [--update-card]

Each attack's budget has one flag per setting (`--unlearndiffatk-steps 40`, ...; the dataclasses in
`budgets.py`); `--tiny-budget` is the CI budget (every attack runs end to end in seconds, measures nothing).
The protocol and the base model default from the model's card, as `evaluate` does. Heavy imports happen
in the handlers.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field

from concept_erase.cli_args import add_flags, check_fields, values_from
from concept_erase.errors import ConceptEraseError
from concept_erase.logs import finish

from ..generation import PRESETS
from ..thresholds import ATTACK_THRESHOLD, NUDENET_FLOOR
from . import ATTACK_NAMES, DEFAULT_ATTACKS


@dataclass
class AttackSetup:
    """What `attack` and `audit` share: the concept and its detector, the prompts' seeds, the protocol, where
    the report goes."""

    concept: str = field(metadata={
        "help": "preset concept with a detector: nudity (NudeNet), imagenette-<class> (ImageNet classifier), "
                "minisd-digit-<d> / minisd-style-<s> (MiniSD's judges)"})
    output: str = field(metadata={"help": "output folder (must not exist unless --overwrite)", "aliases": ("--out",)})
    config: str | None = field(default=None, metadata={
        "help": "local diffusers folder with the configs of a single-file model"})
    seeds: str = field(default="0-4", metadata={"help": "seeds of every concept prompt, e.g. 0-4"})
    seed: int = field(default=0, metadata={"help": "seed of the attacks' own random draws", "seed": True})
    protocol: str | None = field(default=None, metadata={
        "help": "generation preset (default: the model's, e.g. minisd for an erased MiniSD)",
        "choices": tuple(sorted(PRESETS))})
    num_inference_steps: int | None = field(default=None, metadata={
        "help": "override the preset's denoising steps", "min": 1, "aliases": ("--steps",)})
    guidance_scale: float | None = field(default=None, metadata={
        "help": "override the preset's guidance scale", "min": 0, "aliases": ("--guidance",)})
    classifier: str | None = field(default=None, metadata={
        "help": "ImageNet classifier folder for imagenette-* concepts (default microsoft/resnet-50)"})
    nudenet_threshold: float = field(default=ATTACK_THRESHOLD, metadata={
        "help": "NudeNet score above which an exposed class counts (UnlearnDiffAtk's)", "min": NUDENET_FLOOR,
        "max": 1})
    tiny_budget: bool = field(default=False, metadata={
        "help": "the CI budget: a few steps per attack, to check the pipeline end to end (not a measurement)"})
    control: bool = field(default=True, metadata={
        "help": "also run every attack, same budget, on the remap control (the base with the concept's tokens "
                "remapped, UNet untouched; built in memory): the report says which attacks recover it on 95 percent "
                "of the rows, i.e. whose ASR is more than a lower bound; --no-control halves the time and "
                "calibrates nothing"})
    floor: bool = field(default=False, metadata={
        "help": "MiniSD digit concepts: also run every attack, same budget, on a MiniSD trained without the concept "
                "(the never-knew floor; trained once, minutes, then cached)"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda when available)"})
    overwrite: bool = field(default=False, metadata={"help": "replace --output if it exists"})

    def __post_init__(self):
        check_fields(self)


@dataclass
class Attack:
    model: str = field(metadata={"help": 'the attacked model: folder, file, hub id or "minisd"'})
    base: str | None = field(default=None, metadata={
        "help": "the original model (target images of UnlearnDiffAtk and the upper bound, inversion's images); "
                "default: the model card's base_model"})
    attack: list[str] | None = field(default=None, metadata={
        "help": "an attack to run (repeat the flag for several; default: all but relearn, which fine-tunes the "
                "whole UNet and is opt-in; with --replay none but the replayed ones)", "choices": ATTACK_NAMES,
        "metavar": "ATTACK"})
    replay: str | None = field(default=None, metadata={
        "help": "replay the attacks saved in an earlier attack output folder instead of optimising", "metavar": "DIR"})
    prompts: str | None = field(default=None, metadata={
        "help": "attacked prompt set (I2P / class CSV with seeds, or .txt); default: the concept's forget prompts "
                "x --seeds"})
    limit: int | None = field(default=None, metadata={"help": "only the first N rows of --prompts", "min": 1})
    images: str | None = field(default=None, metadata={
        "help": "folder of concept images for concept inversion (default: drawn by --base)"})
    sweep: str | None = field(default=None, metadata={
        "help": "ASR against budget: run every attack with this budget setting at each value, on the model and the "
                "control (sweep.csv and a table in the report; the headline figures are the largest value's)",
        "metavar": "SETTING=V1,V2,..."})

    def __post_init__(self):
        check_fields(self)
        if self.replay and (self.prompts or self.limit):
            raise ConceptEraseError("--prompts and --limit do not apply to --replay, which attacks the rows it saved")
        if self.replay and self.sweep:
            raise ConceptEraseError("--sweep does not apply to --replay, which optimises nothing")


@dataclass
class Audit:
    model: str = field(metadata={"help": "the erased model folder", "positional": True})
    base: str | None = field(default=None, metadata={
        "help": "the original model (default: the model card's base_model)"})
    attack: list[str] | None = field(default=None, metadata={
        "help": "attacks to run (default: all but relearn, which fine-tunes the whole UNet and is opt-in)",
        "choices": ATTACK_NAMES, "metavar": "ATTACK"})
    retain_prompts: int = field(default=9, metadata={"help": "retain prompts drawn (spread over the list)", "min": 1,
                                                     "flag": "num-retain-prompts", "aliases": ("--retain-prompts",)})
    clip_model: str | None = field(default=None, metadata={"help": "local CLIP folder for the CLIP score"})
    fid_weights: str | None = field(default=None, metadata={"help": "torch-fidelity Inception weights file for FID"})
    update_card: bool = field(default=False, metadata={
        "help": "record the headline figures in the model's card (evaluation.audit)"})

    def __post_init__(self):
        check_fields(self)


def _add_common(p: argparse.ArgumentParser) -> None:
    from .budgets import BUDGETS

    add_flags(p, AttackSetup)
    for attack, cls in BUDGETS.items():  # --<attack>-<setting>; unset ones leave the budget's own value
        add_flags(p.add_argument_group(f"{attack} budget"), cls, suppress_defaults=True, prefix=attack)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attack", help="attack an erased model: does the concept come back? (Pre-ASR / ASR)",
        description="Run adversarial attacks (concept inversion, UnlearnDiffAtk, Ring-A-Bell, the conditioning "
                    "upper bound, the text-free inversion; relearning, opt-in: --attack relearn) on an erased model "
                    "and report Pre-ASR and ASR the UnlearnDiffAtk way, each with its realism-filtered twin; saves "
                    "what each attack learned so --replay can run it on another model (relearning excepted).")
    add_flags(p, Attack)
    _add_common(p)
    p.set_defaults(func=_attack_main)

    a = subparsers.add_parser(
        "audit", help="one report on an erased model: forget rate, attacks, collateral, retain, quality, cost",
        description="Benign forget rate, ASR of each attack, collateral damage on the preset's neighbouring "
                    "concepts, retain accuracy, quality and the erasure's time/memory, in Markdown and "
                    "self-contained HTML with charts and same-seed grids.")
    add_flags(a, Audit)
    _add_common(a)
    a.set_defaults(func=_audit_main)


def budgets_from_args(args: argparse.Namespace, attacks, tiny: bool) -> dict:
    """name -> budget: the defaults (or the tiny CI budget), then the user's --<attack>-<setting> flags."""
    from .budgets import BUDGETS, TINY, make_budget

    given = {name: values_from(args, cls, prefix=name) for name, cls in BUDGETS.items()}
    unused = [(name, setting) for name, values in given.items() if name not in attacks for setting in values]
    if unused:
        attack, setting = unused[0]
        raise ConceptEraseError(f"--{attack}-{setting.replace('_', '-')} is set but attack {attack!r} is not run")
    return {name: make_budget(name, **{**(TINY[name] if tiny else {}), **given[name]}) for name in attacks}


def _inputs(setup: AttackSetup, check=None):
    """Checks that need no model: the output (free, and writable, before hours of attacks), the concept, the
    seeds, the command's own `check(concept, seeds)`, then the detector (loaded now, which imports torch: a
    missing or broken one fails here)."""
    from concept_erase.concepts import get_concept
    from concept_erase.diffusion.data.generate import parse_seeds
    from concept_erase.io_utils import check_writable

    check_writable(setup.output, setup.overwrite, flag="--output")
    from .detectors import detector_for
    concept = get_concept(setup.concept)
    if setup.floor:
        from .floor import floor_digit
        floor_digit(concept)  # a concept MiniSD cannot be retrained without is refused before any model loads
    seeds = parse_seeds(setup.seeds)
    if check is not None:
        check(concept, seeds)
    detector = detector_for(concept.name, classifier=setup.classifier, threshold=setup.nudenet_threshold)
    return concept, detector, seeds


def _models(setup: AttackSetup, model: str, base_source: str | None, *, need_base: bool = False):
    """The protocol and the base (--base, else the model's card: one rule for `attack` and `audit`), then the
    models, loaded. `need_base`: no base is a one-line error before anything loads."""
    from concept_erase.diffusion.models.defaults import model_defaults
    from concept_erase.diffusion.models.loading import load_pipeline
    from concept_erase.logs import announce

    from ..generation import make_protocol

    defaults = model_defaults(model, setup.config)
    protocol = make_protocol(setup.protocol or defaults.protocol, num_inference_steps=setup.num_inference_steps,
                             guidance_scale=setup.guidance_scale)
    if base_source is None and defaults.base_model != str(model):
        base_source = defaults.base_model
        announce(f"--base {base_source} (the model card's base_model)")
    if need_base and base_source is None:
        raise ConceptEraseError(f"{model!r} does not record its base model (no model card with base_model): "
                                "pass --base")
    device = setup.device or "auto"
    pipe = load_pipeline(model, config=setup.config, device=device)
    base = load_pipeline(base_source, device=device) if base_source else None
    return protocol, pipe, base


def _attack_main(args: argparse.Namespace) -> int:
    from concept_erase.io_utils import atomic_dir

    from ..prompts import read_prompts

    job, setup = Attack(**values_from(args, Attack)), AttackSetup(**values_from(args, AttackSetup))
    budgets = budgets_from_args(args, job.attack or ([] if job.replay else DEFAULT_ATTACKS), setup.tiny_budget)
    if job.sweep:  # checked before any model loads; the headline run is at the largest value
        from .sweep import parse_sweep, swept_budgets
        sweep = parse_sweep(job.sweep, budgets)
        budgets = {**budgets, **swept_budgets(budgets, sweep[0], sweep[1][-1])}
    replay = check_replay(job, setup) if job.replay else None
    concept, detector, seeds = _inputs(setup)
    from .run import concept_rows, run_attacks, write_attack_outputs  # torch: once the inputs are known good
    from .floor import floor_model
    protocol, pipe, base = _models(setup, job.model, job.base)
    if replay:
        replay = {name: saved.learned() for name, saved in replay.items()}
        rows = next(iter(replay.values())).rows
    elif job.prompts:
        rows = read_prompts(job.prompts, limit=job.limit)[1]
    else:
        rows = concept_rows(concept, seeds)
    common = dict(protocol=protocol, base=base, images=job.images, seed=setup.seed, model=str(job.model),
                  control=setup.control, floor=floor_model(concept) if setup.floor else None)
    run = run_attacks(pipe, concept, rows, budgets, detector, replay=replay, **common)
    if job.sweep:
        from .sweep import run_sweep, sweep_lines
        run.sweep = run_sweep(pipe, concept, rows, budgets, detector, *sweep, run.summary(), **common)
    with atomic_dir(setup.output, overwrite=setup.overwrite) as tmp:
        extra = []
        if run.sweep:  # the sweep's writers live in sweep.py, which imports run.py (never the reverse)
            from .sweep import sweep_section, write_sweep_csv

            write_sweep_csv(run.sweep, tmp / "sweep.csv")
            extra = [sweep_section(run.sweep)]
        write_attack_outputs(run, tmp, f"Attacks on {concept.name}: {job.model}", extra)
    summary = run.summary()
    finish(args, [f"{concept.name}: Pre-ASR {summary['pre_asr']:.1f}%, ASR " +
                  ", ".join(f"{k} {a['asr']:.1f}%" for k, a in summary["attacks"].items()),
                  *(sweep_lines(run.sweep) if job.sweep else []),
                  f"wrote {setup.output}/: report.md, results.json (the result as JSON), grid.png, and what each "
                  "attack learned"], summary,
           next_command=f"concept-erase attack --model OTHER --concept {concept.name} --replay "
                        f"{shlex.quote(setup.output)} --output OUT  (the same attacks on another model)")
    return 0


def check_replay(job: Attack, setup: AttackSetup) -> dict:
    """The --replay folder checked whole, and against the attacked model's structure where its configs are at
    hand, before any model loads and before torch (`replay.py`); the attacks it holds are not run again with
    --attack. Returns name -> `replay.SavedAttack`."""
    from .replay import check_replay_folder, replay_info
    from .structure import model_structure

    saved = check_replay_folder(job.replay)
    both = sorted(set(saved) & set(job.attack or ()))
    if both:
        raise ConceptEraseError(f"--attack {both[0]} and --replay {job.replay!r}, which holds {both[0]}: choose one")
    structure = model_structure(job.model, setup.config)
    if structure is not None:
        for attack in saved.values():
            replay_info(attack, structure, str(job.model))
    return saved


def _audit_main(args: argparse.Namespace) -> int:
    from concept_erase.io_utils import atomic_dir

    from .audit import check_audit_inputs, headline, run_audit, write_audit
    from .floor import floor_model

    job, setup = Audit(**values_from(args, Audit)), AttackSetup(**values_from(args, AttackSetup))
    budgets = budgets_from_args(args, job.attack or DEFAULT_ATTACKS, setup.tiny_budget)
    if job.update_card:
        from concept_erase.diffusion.models.card import read_model_card

        read_model_card(job.model)  # a model folder with a card, or a one-line error before hours of work
    # everything the audit will need, before the first image (and, but for the FID features, before torch)
    concept, detector, seeds = _inputs(setup, lambda concept, seeds: check_audit_inputs(concept, budgets, seeds, job))
    protocol, pipe, base = _models(setup, job.model, job.base, need_base=True)
    results, images = run_audit(pipe, base, concept, detector, budgets=budgets, seeds=seeds, protocol=protocol,
                                model=str(job.model), classifier=setup.classifier, retain_prompts=job.retain_prompts,
                                clip_model=job.clip_model, fid_weights=job.fid_weights, seed=setup.seed,
                                control=setup.control, floor=floor_model(concept) if setup.floor else None)
    with atomic_dir(setup.output, overwrite=setup.overwrite) as tmp:
        write_audit(results, images, tmp)
    top = headline(results)
    lines = [f"audit: forget rate {top['forget_rate']:.1f}%, ASR " +
             ", ".join(f"{k} {v:.1f}%" for k, v in top["asr"].items()),
             f"wrote {setup.output}/: report.html (self-contained), report.md, results.json (the result as JSON)"]
    if job.update_card:
        from concept_erase.diffusion.models.card import add_evaluation_to_card

        add_evaluation_to_card(job.model, "audit", top)
        lines.append(f"model card updated: {job.model}/README.md")
    finish(args, lines, results,
           next_command=None if job.update_card else "the same command with --update-card, to record the headline "
                                                     "figures in the model's card")
    return 0
