"""One logging style: library code logs through `logging.getLogger(__name__)` (accelerate's `get_logger` in
the training loop, so that only the main process speaks), never `print`. What a command prints on stdout is
its result (a JSON summary, a table, "wrote ..."); everything said along the way is a log record.

`show_logs()` is how the `concept-erase` CLI (and the tests) show this project's INFO records on stderr as
`concept-erase: message`; a program that imports the library configures logging its own way. `announce` is
how a command says what it chose or is about to do, once however many processes run it.
"""

from __future__ import annotations

import logging
import sys

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


def hide_library_bars() -> None:
    """Hide diffusers' and transformers' own progress bars ("Loading weights", "Writing model shards") for the
    rest of the process: what `--no-progress` promises covers the libraries' bars too."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

