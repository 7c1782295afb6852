"""The dataclass-to-flags helper: metadata becomes flags and checks, old spellings stay as hidden aliases, and
every command speaks one vocabulary."""

import argparse
import importlib.util
from dataclasses import dataclass, field

import pytest

from concept_erase.cli import build_parser, commands, main
from concept_erase.cli_args import Parser, add_flags, check_fields, resume_free, values_from
from concept_erase.errors import ConceptEraseError
from concept_erase.validate import SEED_MAX


@dataclass
class Example:
    output: str = field(metadata={"help": "where", "aliases": ("--out",)})
    steps: int = field(default=3, metadata={"help": "steps", "min": 1, "aliases": ("--n",)})
    lr: float = field(default=0.1, metadata={"help": "rate", "above": 0})
    keep: float | None = field(default=None, metadata={"help": "share", "above": 0, "max": 1})
    seed: int = field(default=0, metadata={"help": "seed", "seed": True})
    kind: str = field(default="a", metadata={"help": "kind", "choices": ("a", "b")})
    loud: bool = field(default=False, metadata={"help": "loud"})
    prompt: list[str] | None = field(default=None, metadata={"help": "prompt"})

    def __post_init__(self):
        check_fields(self)


def parse(argv, suppress=False):
    parser = Parser(prog="x")
    add_flags(parser, Example, suppress_defaults=suppress)
    return parser, parser.parse_args(argv)


def test_fields_become_flags_with_types_defaults_and_hidden_aliases():
    parser, args = parse(["--out", "o", "--n", "5", "--loud", "--prompt", "p", "--prompt", "q"])
    config = Example(**values_from(args, Example))
    assert (config.output, config.steps, config.loud, config.prompt, config.lr) == ("o", 5, True, ["p", "q"], 0.1)
    shown = parser.format_help()
    assert "--output" in shown and "--steps" in shown and "(default: 3)" in shown
    assert "--out " not in shown and "--n " not in shown  # old spellings work but are not advertised
    _, args = parse(["--output", "o"], suppress=True)
    assert values_from(args, Example) == {"output": "o"}  # suppressed: only what was typed


def test_usage_shows_a_required_flag_as_required_even_with_a_hidden_alias_and_names_values_by_their_flag():
    @dataclass
    class Budget:
        steps: int = field(default=1, metadata={"help": "steps"})
        image_steps: int = field(default=1, metadata={"help": "steps", "flag": "num-inference-steps"})

    parser, _ = parse(["--output", "o"])
    add_flags(parser, Budget, prefix="inversion")
    usage = " ".join(parser.format_usage().split())
    assert " --output OUTPUT " in usage and "[--output" not in usage  # `--out` may give it, so argparse cannot
    assert "[--prompt PROMPT]" in usage  # a list's value is named by its flag, not "VALUE"
    assert "[--inversion-steps STEPS]" in usage and "[--inversion-num-inference-steps NUM_INFERENCE_STEPS]" in usage
    assert parse(["--out", "o"])[1].output == "o"  # the alias still satisfies it


def test_a_required_flag_given_by_none_of_its_spellings_is_a_one_line_error():
    _, args = parse([])
    with pytest.raises(ConceptEraseError, match="^--output is required$"):
        values_from(args, Example)


BAD = {  # field value -> the one-line message
    "steps": (0, "--steps must be >= 1, got 0"),
    "lr": (0.0, "--lr must be > 0, got 0.0"),
    "lr-nan": (float("nan"), "--lr must be a finite number, got nan"),
    "lr-inf": (float("inf"), "--lr must be a finite number, got inf"),
    "keep": (1.5, "--keep must be <= 1, got 1.5"),
    "seed-negative": (-1, f"--seed -1 is out of range: seeds are whole numbers from 0 to {SEED_MAX}"),
    "seed-large": (SEED_MAX + 1, f"--seed {SEED_MAX + 1} is out of range"),
    "kind": ("c", "--kind must be one of a, b, got 'c'"),
}


@pytest.mark.parametrize("name, value, message", [(k.split("-")[0], *v) for k, v in BAD.items()], ids=BAD.keys())
def test_bounds_are_checked_from_metadata(name, value, message):
    with pytest.raises(ConceptEraseError) as err:
        Example(output="o", **{name: value})
    assert message in str(err.value) and "\n" not in str(err.value)
    assert Example(output="o", keep=1.0, seed=SEED_MAX).seed == SEED_MAX  # the bounds themselves pass


def test_resume_free_comes_from_the_fields():
    from concept_erase.diffusion.training.config import EraseConfig

    assert resume_free(EraseConfig) == {
        "steps", "checkpointing_steps", "checkpoints_total_limit", "output", "cache_dir", "checkpoint_dir", "resume",
        "export_single_file", "save_delta", "overwrite", "progress", "grad_release"}


def _leaf_parsers(parser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser.prog, parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(child)


def test_one_flag_vocabulary_across_commands():
    """Outputs are --output, denoising steps --num-inference-steps, guidance --guidance-scale, the forget-image
    count --num-forget-images; the old spellings parse but no command's --help shows them."""
    old = {"--out", "--image-steps", "--image-guidance", "--guidance", "--num-forget", "--samples", "--model-config"}
    seen = set()
    for name in commands():
        if name == "app":
            pytest.importorskip("gradio")
        for prog, leaf in _leaf_parsers(build_parser(name)):
            shown = {s for a in leaf._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
            assert not shown & old, (prog, shown & old)
            seen |= shown
    assert {"--output", "--num-inference-steps", "--guidance-scale", "--num-forget-images"} <= seen


# Plain nouns a metavar may use when the flag's own words would say less (`--prompts FILE`, `--erased PATH`).
METAVAR_NOUNS = {"PROMPT", "FILE", "DIR", "PATH"}
# Metavars that show the value's shape, where a word would not (`attack --sweep steps=25,100,400`).
METAVAR_FORMS = {"SETTING=V1,V2,..."}


def _every_leaf():
    if importlib.util.find_spec("gradio") is None:
        pytest.skip("the app's parser needs gradio")
    return list(_leaf_parsers(build_parser()))


def test_every_parser_names_values_readably_and_shows_required_flags_as_required():
    """Walks every command's parser: no metavar is an internal name (`INVERSION__STEPS`, `IMAGE_STEPS` for
    --num-inference-steps, `MODEL_CONFIG` for --config) or a placeholder (`VALUE`), and the usage line shows every
    required flag without brackets (argparse enforces some; `values_from` the ones an old spelling may give)."""
    for prog, leaf in _every_leaf():
        usage = " ".join(leaf.format_usage().split())
        for action in leaf._actions:
            if action.help == argparse.SUPPRESS or action.nargs == 0:
                continue
            metavar = action.metavar
            if metavar is None and action.choices is not None and action.option_strings:
                continue  # shown as {a,b,c}
            assert metavar and "__" not in metavar and metavar == metavar.upper(), (prog, action.dest, metavar)
            for flag in action.option_strings:
                words = set(flag.lstrip("-").upper().split("-"))
                assert set(metavar.split("_")) <= words or metavar in METAVAR_NOUNS | METAVAR_FORMS, (
                    prog, flag, metavar)
                required = action.required or getattr(action, "shown_required", False)
                assert (f"[{flag} " not in usage and f" {flag} " in usage) if required else f"[{flag} " in usage, (
                    prog, flag, usage)
    shown = {prog: " ".join(leaf.format_usage().split()) for prog, leaf in _every_leaf()}
    for prog in ("erase", "mask", "export", "generate", "evaluate nudity", "attack", "compare", "minisd train"):
        assert " --output OUTPUT " in shown[f"concept-erase {prog}"], prog  # the example: never optional


def test_each_flag_name_means_one_kind_of_value_across_commands():
    """A flag spelled alike takes the same kind of value everywhere: `--retain-prompts` is a file (erase),
    so audit's count is `--num-retain-prompts`; `--seeds` is a seed list (generate, attack, audit), so the
    counts of classify and `minisd check` are `--num-seeds`. The old spellings still parse, hidden."""
    kinds: dict[str, dict[str, str]] = {}
    for prog, leaf in _every_leaf():
        for action in leaf._actions:
            if action.help == argparse.SUPPRESS:
                continue
            kind = "switch" if action.nargs == 0 else getattr(action.type, "__name__", "str")
            for flag in action.option_strings:
                kinds.setdefault(flag, {})[prog] = kind
    mixed = {flag: by for flag, by in kinds.items() if len(set(by.values())) > 1}
    assert not mixed, mixed
    parser = build_parser()
    assert parser.parse_args(["audit", "m", "--base", "b", "--concept", "c", "--output", "o",
                              "--retain-prompts", "3"]).retain_prompts == 3
    assert parser.parse_args(["classify", "--seeds", "2"]).seeds == 2
    assert parser.parse_args(["minisd", "check", "--seeds", "2"]).seeds == 2


def test_export_keeps_its_old_positional_output(tmp_path, tiny_pipeline_dir, capsys):
    for argv in (["--to", "diffusers", str(tmp_path / "a")], [str(tmp_path / "b"), "--to", "diffusers"],
                 ["--to", "diffusers", "--out", str(tmp_path / "c")], ["--to", "diffusers", "--output", str(tmp_path / "d")]):
        assert main(["export", str(tiny_pipeline_dir), *argv]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "d"]
    assert main(["export", str(tiny_pipeline_dir), "--to", "diffusers"]) == 2
    assert capsys.readouterr().err.strip().endswith("--output is required")
