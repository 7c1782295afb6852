"""The `concept-erase app` subcommand: load the named models, then serve the Gradio app.

With no arguments it opens on MiniSD and its erased demo model, so it works right after install, offline. The
Erase tab adds models while it runs (`app/erase.py`), within the limits of `AppConfig`.
Safe defaults: binds 127.0.0.1 unless --host says otherwise; no public share link unless --share.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field

from concept_erase.cli_args import add_flags, check_fields, values_from
from concept_erase.errors import ConceptEraseError
from concept_erase.logs import finish

logger = logging.getLogger(__name__)

DEFAULT_BASE = "minisd"


@dataclass
class Serve:
    """Which models the app compares and where it listens."""

    base: str = field(default=DEFAULT_BASE, metadata={
        "help": "base model: 'minisd', 'minisd-xl', a diffusers folder (SD 1.x, 2.x or SDXL), a .safetensors/.ckpt "
                "file or a hub id"})
    erased: list[str] = field(default_factory=list, metadata={
        "help": "an erased model folder or file; repeat to compare several "
                "(default with --base minisd: the MiniSD erased demo model)", "metavar": "PATH"})
    erasure: list[str] = field(default_factory=list, metadata={
        "help": "a LoRA / LyCORIS file or delta folder (from `export` or `erase --save-delta`) to apply to --base "
                "at the strength the Compare tab's slider sets (0 to 1.5): e.g. an erasure made on SD 1.5 shown on "
                "a community fine-tune of it; repeat for several", "metavar": "PATH"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to bind (127.0.0.1: this machine only; 0.0.0.0 exposes it)"})
    port: int = field(default=7860, metadata={
        "help": "port to serve on (0: the first free port from 7860)", "min": 0, "max": 65535})
    share: bool = field(default=False, metadata={
        "help": "also create a public gradio.live link (needs the internet)"})
    device: str = field(default="cpu", metadata={"help": "torch device for the models: cpu, cuda or auto"})
    dtype: str | None = field(default=None, metadata={"help": "weights: fp32 (default), fp16 or bf16 (CUDA only)"})

    def __post_init__(self):
        check_fields(self)


def register(subparsers) -> None:
    from .ui import AppConfig

    p = subparsers.add_parser(
        "app", help="serve the before/after Gradio app",
        description="Compare a base model with erased models on the same prompts and seeds, in the browser. "
                    "With no arguments: MiniSD and its erased demo model.",
    )
    add_flags(p, Serve)
    add_flags(p.add_argument_group("limits"), AppConfig)  # the app's limits, one flag per AppConfig field
    p.set_defaults(func=run)


def demo_model_name() -> str:
    """What the app calls MiniSD's erased demo model: "without seven"."""
    from concept_erase.demo import DemoConfig

    return f"without {DemoConfig().digit}"


def run(args: argparse.Namespace) -> int:
    launch(args, block=True)
    return 0


def launch(args: argparse.Namespace, *, block: bool = True):
    """Load the models named by `args`, build the app and serve it; returns the Blocks (when not blocking)."""
    from .models import ModelRegistry
    from .ui import AppConfig, build_app

    Serve(**values_from(args, Serve))  # checks the port, before any model loads
    config = AppConfig(**values_from(args, AppConfig))
    if config.max_erasures:  # where the Erase tab writes, checked before any model loads
        from concept_erase.io_utils import check_writable

        from .erase import erase_root

        check_writable(erase_root(config), flag="--erase-output", into=True)
    erased, names = list(args.erased or []), None
    if not erased and not args.erasure:
        if args.base != DEFAULT_BASE:
            raise ConceptEraseError(f"--base {args.base!r} needs at least one --erased model or --erasure file "
                                    "to compare")
        from concept_erase.demo import demo_erased_model

        logger.info("preparing the MiniSD erased demo model (made once, then cached)...")  # stdout: the summary
        erased = [str(demo_erased_model())]
        names = [demo_model_name()]  # its cache folder's name ends in a hash
    registry = ModelRegistry.load(args.base, erased, device=args.device, dtype=args.dtype, names=names,
                                  erasures=list(args.erasure or []))
    demo = build_app(registry, config)
    # max_file_size: an Evaluate CSV of a few hundred rows is far below it; anything larger is refused.
    try:
        # show_error: a malformed raw API call gets its reason back, not {"error": null} (the handlers' own
        # refusals are gr.Error already; the server is loopback unless --host says otherwise)
        demo.launch(server_name=args.host, server_port=args.port or None, share=args.share, inbrowser=False,
                    prevent_thread_lock=True, max_file_size="2mb", quiet=True, show_error=True)
    except OSError as err:  # gradio: "Cannot find empty port in range ..." or a bad --host
        if "empty port" in str(err):
            raise ConceptEraseError(f"port {args.port} on {args.host} is in use; choose another with --port") from None
        raise ConceptEraseError(f"cannot serve on {args.host}:{args.port}: {str(err).splitlines()[0]}") from None
    # Its launch line is the app's summary; with --json, the record a script needs to reach it (it then serves on).
    where = "this machine only; --host 0.0.0.0 to expose it" if args.host == "127.0.0.1" else f"bound to {args.host}"
    lines = [f"concept-erase app: {demo.local_url} ({where})"]
    if demo.share_url:
        lines.append(f"concept-erase app: public link {demo.share_url}")
    finish(args, lines, {"url": demo.local_url, "share_url": demo.share_url, "base": registry.base_name,
                         "models": registry.names},
           next_command=f"open {demo.local_url} in a browser (Ctrl-C stops the app)")
    sys.stdout.flush()  # a script waiting for the URL reads it now, while the app serves on
    if block:
        demo.block_thread()  # until Ctrl-C
    return demo
