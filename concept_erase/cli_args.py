"""Dataclass configs as command-line flags: the one helper every command builds its parser with.

A config is a dataclass whose fields carry their command-line facts in `field(metadata=...)`:

    help         the flag's help text (required)
    choices      the allowed values
    min, max     inclusive bounds of a number;  above, below: exclusive bounds (lr: above=0)
    seed         True: a seed (`validate.parse_seed`: a whole number from 0 to 2**32 - 1)
    flag         the flag's name when it is not the field's (`image_steps` -> "num-inference-steps")
    aliases      old spellings, accepted but hidden from --help (kept for one release)
    positional   True: a positional argument instead of a flag
    metavar      the value's name in --help (default: the flag's own spelling, `--num-inference-steps
                 NUM_INFERENCE_STEPS`; a prefixed flag's without its prefix, `--inversion-steps STEPS`)
    required     True: a required flag whose default is None because another spelling may give it (export's
                 old positional OUT); a field without a default is required anyway. Usage shows both as required
    resume_free  True: a resumed run may change it (how long it runs, where it writes, how it shows)
    default_from what decides the value when the user does not (a preset's recipe, a protocol): a function of the
                 field giving the help's "(default: ...)" from the same table the run reads, so --help cannot
                 show a stale number (called when the parser is built)
    cli          False: not a flag at all (a value the code fills in)

`add_flags(parser, Config)` adds one flag per field; `values_from(args, Config)` collects what was parsed;
`check_fields(config)` (called from each config's `__post_init__`, so the Python API gets the same checks)
enforces choices and bounds with a one-line `ConceptEraseError` that names the flag and the bad value, by the
rules of `concept_erase.validate`: every number must be finite (nan and inf are refused whatever the bounds),
and a seed is a whole number from 0 to 2**32 - 1 for every command.

This module imports nothing heavy: building a parser must stay cheap (`concept-erase --help`).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import MISSING, Field, fields

from .errors import ConceptEraseError
from .validate import check_number, parse_seed

# What a value starting with "-" looks like when it is a number (with a unit or not: "-5GB", "-1e-5", "-inf",
# "-nan"), so `--lr -inf` gives the flag that value and its check names it. argparse's own rule takes only
# "-5" and "-.5", and would read the rest as an unknown flag ("expected one argument").
NEGATIVE_VALUE = re.compile(r"^-(?:\.?\d|(?:inf|infinity|nan)$)", re.IGNORECASE)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose optional positionals may come after flags (`export SRC --to diffusers OUT`, the
    old spelling of `--output OUT`): Python 3.11's argparse fills an optional positional with nothing at the
    first positional it sees, so such a parser parses intermixed. A negative number is a value, not a flag
    (`NEGATIVE_VALUE`). `concept_erase.cli` makes every command's parser one of these."""

    _intermixing = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_VALUE

    def format_usage(self):
        return self._showing_required(super().format_usage)

    def format_help(self):
        return self._showing_required(super().format_help)

    def _showing_required(self, format_text):
        """Usage shows a required flag as required even where argparse cannot enforce it (a hidden alias or an
        old positional may give it instead, and `values_from` checks it): `--output OUTPUT`, not `[--output
        OUTPUT]`. argparse's usage formatter reads `required` alone, so it is set while the text is made."""
        shown = [a for a in self._actions if getattr(a, "shown_required", False) and not a.required]
        for action in shown:
            action.required = True
        try:
            return format_text()
        finally:
            for action in shown:
                action.required = False

    def parse_known_args(self, args=None, namespace=None):
        late = any(a.option_strings == [] and a.nargs in ("?", "*") for a in self._actions)
        if self._intermixing or not late:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls back into parse_known_args
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def flag_name(f: Field, prefix: str | None = None) -> str:
    """The flag of a field, e.g. "--num-inference-steps" (with a prefix: "--unlearndiffatk-steps")."""
    return "--" + (f"{prefix}-" if prefix else "") + f.metadata.get("flag", f.name.replace("_", "-"))


def _kind(f: Field) -> str:
    """"bool", "int", "float", "list" or "str", from the annotation (a string under `from __future__`)."""
    text = str(f.type).replace("typing.", "").replace("Optional[", "").replace(" | None", "").strip()
    for kind in ("bool", "int", "float"):
        if text in (kind, f"<class '{kind}'>"):
            return kind
    return "list" if text.startswith(("list", "tuple")) else "str"


def _metavar(f: Field) -> str:
    """The value's name in --help: the field's `metavar`, else the flag's own spelling (without a prefix: the
    prefix is in the flag already), never the internal field name (`image_steps` is `--num-inference-steps`)."""
    return f.metadata.get("metavar", f.metadata.get("flag", f.name).replace("-", "_").upper())


def _required(f: Field) -> bool:
    return _default(f) is MISSING or bool(f.metadata.get("required"))


def _default(f: Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def cli_fields(cls, names=None) -> list[Field]:
    """The fields of `cls` that are flags, in `names` order when given."""
    by_name = {f.name: f for f in fields(cls) if f.init and f.metadata.get("cli", True)}
    return [by_name[n] for n in names] if names is not None else list(by_name.values())


def add_flags(parser, cls, names=None, *, suppress_defaults: bool = False, help_override: dict | None = None,
              prefix: str | None = None) -> None:
    """One flag per field of the dataclass `cls` (or of `names`, in that order).

    suppress_defaults: leave a flag the user did not type out of the namespace, so that something else (a
    preset concept's recipe, a protocol preset) supplies the value; `values_from` then returns only what
    was typed (--help still shows the dataclass's default). A field without a default is a required flag.
    prefix: one dataclass for several things (an attack's budget): `--<prefix>-<field>` into `<prefix>__<field>`."""
    for f in cli_fields(cls, names):
        m = f.metadata
        kind = _kind(f)
        default = _default(f)
        help_text = (help_override or {}).get(f.name, m.get("help", ""))
        kwargs: dict = {"dest": _dest(f, prefix)}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if kind == "list":
                kwargs["action"] = "append"
            else:
                kwargs["type"] = {"int": int, "float": float}.get(kind, str)
            if "choices" in m:
                kwargs["choices"] = m["choices"]
            if "metavar" in m or "choices" not in m:  # argparse shows choices as {a,b}
                kwargs["metavar"] = _metavar(f)
        if default is MISSING:
            # argparse would demand this exact spelling and refuse an alias: `values_from` checks it instead
            kwargs["required"] = not m.get("aliases")
        elif "default_from" in m:
            help_text = f"{help_text} (default: {m['default_from'](f)})"
        elif kind == "bool":
            help_text = f"{help_text} (default: {'on' if default else 'off'})"
        elif default not in (None, (), []) and "(default" not in help_text:
            help_text = f"{help_text} (default: {default})"
        kwargs["default"] = argparse.SUPPRESS if suppress_defaults or default is MISSING else default
        kwargs["help"] = help_text
        if m.get("positional"):
            kwargs.pop("dest")
            kwargs.pop("required", None)
            if kind == "list":
                kwargs.pop("action")
                kwargs["nargs"] = "+" if default is MISSING else "*"
            elif default is not MISSING:
                kwargs["nargs"] = "?"
            parser.add_argument(f.name, **kwargs)
        else:
            action = parser.add_argument(flag_name(f, prefix), **kwargs)
            action.shown_required = _required(f)  # `Parser` shows it so where argparse does not enforce it
        for alias in m.get("aliases", ()):
            add_hidden_alias(parser, alias, kwargs["dest"], kwargs)


def _dest(f: Field, prefix: str | None) -> str:
    return f"{prefix}__{f.name}" if prefix else f.name


def add_hidden_alias(parser, alias: str, dest: str, kwargs: dict | None = None) -> None:
    """`alias` (a flag, or a bare name for an optional positional) sets `dest` too, and --help does not show it."""
    kwargs = {k: v for k, v in (kwargs or {}).items() if k in ("type", "choices", "action", "metavar")}
    kwargs.update(default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    if alias.startswith("-"):
        parser.add_argument(alias, dest=dest, **kwargs)
    else:  # an old positional: optional now, so that the flag can replace it
        parser.add_argument(alias, nargs="?", **kwargs)


def values_from(args: argparse.Namespace, cls, names=None, *, prefix: str | None = None) -> dict:
    """The parsed values of `cls`'s flags that are in `args` (a suppressed flag the user did not type is not).
    A required flag that is missing (given by none of its spellings) is a one-line error."""
    chosen = cli_fields(cls, names)
    missing = [flag_name(f, prefix) for f in chosen
               if _required(f) and getattr(args, _dest(f, prefix), None) is None]
    if missing:
        raise ConceptEraseError(f"{missing[0]} is required")
    return {f.name: getattr(args, _dest(f, prefix)) for f in chosen if hasattr(args, _dest(f, prefix))}


def resume_free(cls) -> set[str]:
    """The fields of `cls` marked `resume_free`: what a resumed run may change."""
    return {f.name for f in fields(cls) if f.metadata.get("resume_free")}


def check_fields(config, prefix: str | None = None) -> None:
    """Choices and bounds of every field of the dataclass instance `config`, from its metadata, by the rules of
    `concept_erase.validate`. None means "unset" and passes; a bool is never a number here. `prefix`: the
    flags' prefix (`add_flags(..., prefix=)`), so an error names the flag the user typed."""
    for f in fields(config):
        value = getattr(config, f.name)
        if value is None or isinstance(value, bool):
            continue
        m = f.metadata
        name = flag_name(f, prefix)
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if "choices" in m and item not in m["choices"]:
                raise ConceptEraseError(f"{name} must be one of {', '.join(map(str, m['choices']))}, got {item!r}")
        if not isinstance(value, (int, float)):
            continue
        if m.get("seed"):
            parse_seed(value, name)
            continue
        check_number(value, name, minimum=m.get("min"), above=m.get("above"), maximum=m.get("max"))
        if "below" in m and not value < m["below"]:
            raise ConceptEraseError(f"{name} must be < {m['below']:g}, got {value!r}")
