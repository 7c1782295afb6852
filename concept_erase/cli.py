"""The `concept-erase` command. Each subcommand lives with its layer and is imported only when used.

A subcommand module exposes `register(subparsers)`, which adds its parser(s) and sets `func` (a callable
taking the parsed namespace and returning an exit code). Parser construction must stay import-light.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .cli_args import Parser
from .errors import ConceptEraseError
from .logs import show_logs
from .threads import Threads, configure_threads, threads_from_argv

# The library's own commands: name -> module holding its `register`. Several names may share one module.
SUBCOMMANDS: dict[str, str] = {
    "classify": "concept_erase.classification.cli",
    "concepts": "concept_erase.concepts",
    "mask": "concept_erase.diffusion.cli",
    "erase": "concept_erase.diffusion.cli",
    "generate": "concept_erase.diffusion.data.generate",
    "export": "concept_erase.diffusion.cli",
    "apply": "concept_erase.diffusion.cli",
    "plan": "concept_erase.diffusion.cli",
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
    for module_name in modules:
        if module_name in seen:
            continue
        seen.add(module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # an optional layer whose extra is not installed
            if only is not None:
                raise ConceptEraseError(f"command {only!r} needs a missing package: {err.name}") from err
            continue
        module.register(sub)
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
    """Flags every command has (a command may define its own, e.g. classify's `--threads 0` = auto)."""
    from .cli_args import add_flags
    from .threads import Threads

    if "--threads" not in parser._option_string_actions:
        add_flags(parser, Threads)


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
