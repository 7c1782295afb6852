"""The `concept-erase` command. Each subcommand lives with its layer and is imported only when used.

A subcommand module exposes `register(subparsers)` (or names another function, `module:function`, as an entry
point does), which adds its parser(s) and sets `func` (a callable taking the parsed namespace and returning an
exit code). Building a parser and checking the flags imports no torch (`import torch` alone takes longer than
a refusal should, docs/ARCHITECTURE.md); the work imports it inside `func`, after the checks.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .cli_args import Parser
from .errors import ConceptEraseError
from .logs import apply_output, show_logs
from .threads import Threads, configure_threads, threads_from_argv

# The library's own commands: name -> module holding its `register` (or `module:function`). Several names may
# share one function; `export` and `apply` have their own so that their parsers never build erase's config, and
# `plan` its own so that erase's and mask's parsers never import the planner (which imports torch).
SUBCOMMANDS: dict[str, str] = {
    "classify": "concept_erase.classification.cli",
    "concepts": "concept_erase.concepts",
    "mask": "concept_erase.diffusion.cli",
    "erase": "concept_erase.diffusion.cli",
    "generate": "concept_erase.diffusion.data.generate",
    "export": "concept_erase.diffusion.cli:register_export",
    "apply": "concept_erase.diffusion.cli:register_export",
    "plan": "concept_erase.diffusion.cli:register_plan",
    "minisd": "concept_erase.diffusion.minisd.cli",
    "demo": "concept_erase.demo",
}
# The layers built on the library (the evaluation suite, the app) register their commands as entry points of
# this group in their package metadata (pyproject.toml: name = "module"), so the library never names them.
ENTRY_POINT_GROUP = "concept_erase.commands"


def commands() -> dict[str, str]:
    """Every command: the library's, then the registered ones (name -> module holding its `register`)."""
    from importlib.metadata import entry_points

    found = dict(SUBCOMMANDS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concept-erase",
        description="Erase a concept from a Stable Diffusion checkpoint with SalUn, and measure it.",
    )
    parser.add_argument("--version", action="version", version=f"concept-erase {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    seen: set[str] = set()
    known = commands()
    modules = [known[only]] if only in known else list(dict.fromkeys(known.values()))
    for target in modules:
        if target in seen:
            continue
        seen.add(target)
        module_name, _, function = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # an optional layer whose extra is not installed
            if only is not None:
                raise ConceptEraseError(f"command {only!r} needs a missing package: {err.name}") from err
            continue
        getattr(module, function or "register")(sub)
    for leaf in _leaf_parsers(parser):
        _add_common_flags(leaf)
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser):
    """The parsers that run a command (`evaluate nudity`, `erase`, ...), below every level of subcommands."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            yield from _leaf_parsers(child)


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every command has: --threads and the output flags (`logs.Output`). A command may carry one in its
    own config (classify's `--threads 0` = auto; erase's `--progress`, from the same `logs.progress_field`)."""
    from dataclasses import fields

    from .cli_args import add_flags, flag_name
    from .logs import Output
    from .threads import Threads

    if "--threads" not in parser._option_string_actions:
        add_flags(parser, Threads)
    group = parser.add_argument_group("output")
    add_flags(group, Output, [f.name for f in fields(Output) if flag_name(f) not in parser._option_string_actions])


def _drop_torchvision_fallback_notice(record: logging.LogRecord) -> bool:
    """transformers >= 5 says, on every run without torchvision, that `CLIPImageProcessor` falls back to its
    PIL twin. That fallback is what we want (the CPU torch has no working torchvision, docs/DEPENDENCIES.md, and the
    image processor only feeds the safety checker, which never runs here), so the notice is noise."""
    return "requires torchvision (not installed); falling back to" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before any command module imports torch: libgomp reads its environment once, when torch loads it.
    configure_threads(threads_from_argv(argv))
    logging.getLogger("transformers.utils.import_utils").addFilter(_drop_torchvision_fallback_notice)
    show_logs()  # the library's INFO records on stderr, as `concept-erase: ...`
    # Import only the requested subcommand's module, so `concept-erase classify` never imports diffusers.
    first = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(first if first in commands() else None)
        args = parser.parse_args(argv)
        configure_threads(Threads(threads=args.threads or None).threads)  # classify's own --threads: 0 = auto
        apply_output(args)
        return int(args.func(args) or 0)
    except ConceptEraseError as err:
        print(f"concept-erase: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # A file system refusal outside an atomic write (reading a missing or unreadable file, a full disk, a
        # file size limit): one line and exit 2 like any bad input, not a traceback.
        from .io_utils import describe_os_error, is_write_failure

        if not (isinstance(err, OSError) or is_write_failure(err)):
            raise
        print(f"concept-erase: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("concept-erase: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
