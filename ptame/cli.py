"""``ptame`` command line: one subcommand per component, each living in its own module.

A command module exposes ``add_arguments(parser)`` and ``main(args) -> int`` and keeps heavy
imports (Ray, MLflow) inside ``main`` so that ``ptame --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "build_parser", "main"]

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "explain": ("ptame.commands.explain", "bulk-explain images into Parquet with Ray Data (resumable)"),
    "show": ("ptame.show", "render saliency overlays from an explanations dataset"),
    "serve": ("ptame.commands.serve", "serve a registered explainer over HTTP with Ray Serve"),
    "evaluate": ("ptame.commands.evaluate", "score an explainer and its peers on any images (metrics, paired differences, ROAD curves)"),
}


def build_parser() -> argparse.ArgumentParser:
    from ptame import __version__

    parser = argparse.ArgumentParser(
        prog="ptame",
        description="P-TAME: trained, single-pass saliency explanations for any image classifier.",
        epilog="Train, evaluate and register with `dvc repro` (see README.md).",
    )
    parser.add_argument("--version", action="version", version=f"ptame {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    from ptame.errors import REFUSALS, report_failure
    from ptame.process import exit_code, interrupted_message, stop_on_sigterm

    previous = stop_on_sigterm()  # SIGTERM ends a command like Ctrl-C: one line saying how far it got, no traceback
    try:
        return int(args._module.main(args) or 0)
    except KeyboardInterrupt as e:
        logging.getLogger("ptame").warning("%s", interrupted_message(e))
        return exit_code(e)
    except REFUSALS as e:  # one line for a refusal; a bug (or -v) keeps its traceback
        report_failure(logging.getLogger("ptame"), e, verbose=args.verbose)
        return 1
    finally:
        if previous is not None:  # called from Python (a stage, a test): give the caller its handler back
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
