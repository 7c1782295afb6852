"""One logging style: library code logs through `logging.getLogger(__name__)` (accelerate's `get_logger` in
the training loop, so that only the main process speaks), never `print`. What a command prints on stdout is
its result; everything said along the way (status lines) is a log record on stderr.

`show_logs()` is how the `concept-erase` CLI (and the tests) show this project's INFO records on stderr as
`concept-erase: message`; a program that imports the library configures logging its own way. `announce` is
how a command says what it chose or is about to do, once however many processes run it.

`Output` is the output flags every command takes (`concept_erase.cli` adds them to each): --no-progress
hides progress bars (ours and the libraries'), never status lines; --quiet silences status lines (and bars);
--json prints the result as JSON on stdout. `finish` is how every command ends: a summary for a person (what
was written where, the next command to run), or with --json the result itself.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

PROJECT_LOGGERS = ("concept_erase", "evaluation", "app")

logger = logging.getLogger(__name__)


class _CurrentStderr(logging.Handler):
    """Writes each record to whatever sys.stderr is at the time (pytest and gradio swap it), above any tqdm
    progress bar rather than through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def show_logs(level: int = logging.INFO) -> None:
    """Show this project's log records at `level` and above on stderr, prefixed "concept-erase: ". Idempotent."""
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
            handler = _CurrentStderr()
            handler.setFormatter(logging.Formatter("concept-erase: %(message)s"))
            logger.addHandler(handler)
        logger.propagate = False  # shown once, here, whatever the root logger does


def announce(line: str) -> None:
    """Log a line about what a command chose or is about to do, once per `accelerate launch` world (by its
    main process)."""
    from .runtime import process_state  # imports torch and accelerate: only when a command speaks

    if process_state().is_main_process:
        logger.info(line)


def rough_duration(seconds: float) -> str:
    """"40 s", "3 min", "2.5 h": a rough duration for a person."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# The switch huggingface_hub reads for its download bars, and transformers for its own ("Loading weights",
# "Writing model shards"), each when first imported; diffusers reads no variable ("Loading pipeline components").
PROGRESS_SWITCH = "HF_HUB_DISABLE_PROGRESS_BARS"


def hide_library_bars() -> None:
    """Hide the libraries' own progress bars for the rest of the process, without importing them (the CLI sets
    this before any validation, which must stay fast): the switch, for the libraries not yet imported, and the
    libraries already imported now. Where models load, `follow_progress_switch` carries it to diffusers."""
    os.environ[PROGRESS_SWITCH] = "1"
    follow_progress_switch()


def follow_progress_switch() -> None:
    """With the libraries' bars switched off (`hide_library_bars`, or the variable set by the user), switch off
    those of the libraries already imported: diffusers has no variable of its own, and a library imported before
    the switch was set read it too early. Called where models load (`load_pipeline`); imports nothing."""
    if os.environ.get(PROGRESS_SWITCH, "").strip().upper() not in ("1", "ON", "YES", "TRUE"):
        return
    for name, disable in (("diffusers.utils.logging", "disable_progress_bar"),
                          ("transformers.utils.logging", "disable_progress_bar"),
                          ("huggingface_hub.utils", "disable_progress_bars")):
        module = sys.modules.get(name)
        if module is not None:
            getattr(module, disable)()


def progress_field():
    """The --progress/--no-progress flag: one definition for `Output` and for the configs that carry it into
    the Python API (`EraseConfig`, generate's and evaluate's), so every command spells and explains it alike."""
    return field(default=True, metadata={
        "help": "progress bars, ours and the libraries' (--no-progress hides them; status lines stay: --quiet)",
        "resume_free": True})


@dataclass
class Output:
    """The output flags of every command (`concept_erase.cli` adds each one a command does not carry itself)."""

    progress: bool = progress_field()
    quiet: bool = field(default=False, metadata={
        "help": "no status lines on stderr, and no bars (errors and warnings still show; the summary still prints)"})
    json: bool = field(default=False, metadata={
        "help": "print the result as JSON on stdout instead of the summary (which then goes to stderr)"})


def apply_output(args) -> None:
    """What the parsed output flags change for the rest of the process: --quiet keeps only warnings and errors
    (and implies --no-progress), --no-progress hides the libraries' bars too (imports none of them)."""
    if getattr(args, "quiet", False):
        show_logs(logging.WARNING)
        args.progress = False  # a command's config reads it from here
    if not getattr(args, "progress", True):
        hide_library_bars()


def finish(args, summary, result: dict | None = None, *, next_command: str | None = None) -> None:
    """How every command ends. `summary`: a line or lines for a person, saying what was written where;
    `next_command`: the command to run next. Without --json they go to stdout; with it, `result` (the same
    record a command writes to its output folder, where it has one) goes to stdout as JSON and the summary
    to stderr as status lines (so --quiet silences it)."""
    lines = [summary] if isinstance(summary, str) else list(summary)
    if next_command:
        lines.append(f"next: {next_command}")
    if getattr(args, "json", False):
        print(json.dumps(result if result is not None else {}, default=str))
        for line in lines:
            logger.info(line)
    else:
        print("\n".join(lines))
