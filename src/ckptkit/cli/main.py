"""Entry point of ``ckpt``: one subcommand per operation, one-line errors, distinct exit codes.

The exit codes are one table for every command (``EXIT_CODES``, shown by ``ckpt --help``);
each error class carries its code (``errors.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from .. import __version__
from ..safe_text import printable
from ..threads import let_idle_threads_sleep
from . import (
    batch_cmd,
    convert_cmd,
    generate_cmd,
    hash_cmd,
    inspect_cmd,
    library_cmd,
    lora_cmd,
    merge_cmd,
    parts_cmd,
    prune_cmd,
    quantize_cmd,
    sample_cmd,
    scan_cmd,
)
from .failure import exit_code, report_failure

COMMANDS = (inspect_cmd, convert_cmd, scan_cmd, sample_cmd, parts_cmd, prune_cmd, merge_cmd,
            lora_cmd, generate_cmd, quantize_cmd, hash_cmd, library_cmd, batch_cmd)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, like every other usage error
        self.exit(2, f"ckpt: error: {message} (see ckpt --help)\n")


EXIT_CODES = """exit codes (every command):
  0    success (scan: nothing unsafe or unreadable)
  1    lora check, lora bake: some modules apply to nothing in the model given
  2    bad usage
  3    an input is not a readable checkpoint
  4    an input is unsafe: it would run code when loaded
  5    the output could not be written
  70   internal error, a bug (CKPT_DEBUG=1 shows the traceback)
  130  interrupted"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ckpt", description="Inspect, convert and take apart "
                     "image-generation model checkpoints, safely and in bounded memory.",
                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ckptkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    for module in COMMANDS:
        module.add_parser(commands)
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class _Notes(logging.Handler):
    """Prints what the library says through the ``ckptkit`` logger (an output replacing an
    existing file) as a note on stderr, on a line of its own where a progress bar is being
    drawn; sys.stderr is looked up at each note, as it may have been replaced (tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        clear = "\r\033[K" if sys.stderr.isatty() else ""
        print(f"{clear}note: {printable(record.getMessage())}", file=sys.stderr)


_NOTES = _Notes(logging.INFO)


def _show_notes() -> None:
    logger = logging.getLogger("ckptkit")
    logger.setLevel(logging.INFO)
    if _NOTES not in logger.handlers:
        logger.addHandler(_NOTES)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    let_idle_threads_sleep()  # before any command loads torch
    _show_notes()
    signal.signal(signal.SIGTERM, _interrupt)  # so that temporary outputs are cleaned up
    try:
        return args.run(args)
    except BrokenPipeError:  # the reader of our output went away: nothing left to say, and
        sys.stderr.close()  # the output could not be written (1 is in no table)
        return 5
    except (Exception, KeyboardInterrupt) as exc:
        if exit_code(exc) == 70 and os.environ.get("CKPT_DEBUG"):
            raise
        return report_failure(exc, getattr(args, "json", False))


if __name__ == "__main__":
    sys.exit(main())
