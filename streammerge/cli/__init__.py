"""Command line: one module per subcommand (``merge``, ``batch``, ``verify``, ``decompress``,
``inspect``); logging, ``--json``, exit codes. The only package that prints."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from ..errors import StreamMergeError
from ..version import __version__
from . import batch, decompress, inspect, merge, verify
from .common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE

EPILOG = """\
exit codes:
  0    success
  1    streammerge error: bad input, adapter/base mismatch, non-finite values, I/O failure
  2    usage error (bad arguments)
  130  interrupted (Ctrl-C, SIGTERM); nothing is left at OUT; continue with --resume

examples:
  streammerge merge ./Llama-3-8B ./my-lora ./Llama-3-8B-merged
  streammerge merge ./base ./lora ./out --dtype bf16 --shard-size 2GB --json
  streammerge merge ./base ./lora-a:0.7 ./out --adapter ./lora-b:0.3
  streammerge merge ./base ./lora ./out --dry-run
  streammerge merge ./base ./lora ./out --resume      # after a crash, Ctrl-C or a full disk
  streammerge verify ./out --base ./base --adapter ./lora --sample 20
  streammerge batch ./base ./merged 'runs/*/checkpoint-*'   # one pass over the base for all of them
  streammerge inspect ./my-lora
"""
COMMANDS = {"merge": merge, "batch": batch, "verify": verify, "decompress": decompress, "inspect": inspect}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streammerge",
        description="Merge LoRA adapters into safetensors checkpoints out of core, exactly as PEFT does.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"streammerge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    merge.add_parser(sub, EPILOG)
    for name in ("batch", "verify", "decompress", "inspect"):
        COMMANDS[name].add_parser(sub)
    return p


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def entry() -> None:
    """The ``streammerge`` command: :func:`main`, then a quick exit. Tearing down the interpreter
    after torch was imported takes about 0.5 s; by the time ``main`` returns the output is fsynced
    and published, so the process flushes its streams and leaves without it (unless Ray is loaded:
    its exit hooks stop the processes it started)."""
    code = main()
    if "ray" in sys.modules:
        raise SystemExit(code)
    logging.shutdown()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None when the process was started with it closed
                stream.flush()
    except OSError:  # e.g. stdout was a pipe closed early
        code = code or EXIT_ERROR
    os._exit(code)


def _logging(args) -> logging.Logger:
    level = logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="streammerge: %(levelname)s: %(message)s", stream=sys.stderr, force=True)
    if not args.verbose:  # bitsandbytes logs optional-kernel notices at WARNING on import
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return logging.getLogger("streammerge")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    log = _logging(args)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)  # a polite kill stops like Ctrl-C: resumable, exit 130
    try:
        return COMMANDS[args.command].run(args, log)
    except StreamMergeError as e:
        log.error(str(e))
        return e.exit_code
    except ValueError as e:
        log.error(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        log.error("interrupted: nothing was published at the output; rerun with --resume to continue a merge")
        for note in getattr(e, "__notes__", ()):
            log.error(note)
        return EXIT_INTERRUPTED
