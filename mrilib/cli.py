"""``python -m mrilib <command>``: the long runs, from a terminal.

Each command lives in ``mrilib/commands/<name>.py`` with ``add_parser(subparsers)``;
adding a command is one module and one entry in :data:`COMMANDS`. Heavy imports
happen inside each command's ``run`` so that ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .data import DataError

COMMANDS = ("data", "train", "bench", "synth", "cam", "grid", "report", "reproduce")

# What Ctrl-C leaves behind, per command: only grid and synth resume.
INTERRUPTED = {
    "data": "nothing was kept (the decoded images are cached only once all are read)",
    "train": "nothing was kept: train writes its results and checkpoints (--save) only at "
             "the end, so a rerun starts over",
    "bench": "nothing was kept but the files of models already timed (--out); a rerun "
             "times everything again",
    "cam": "nothing was written",
    "report": "summary.md was not written; a rerun reads the results again and writes it all",
    "grid": "every finished run is saved in the results folder; rerun with --resume to "
            "continue from them",
    "synth train": "the generator was checkpointed; rerun the same command to resume",
    "synth generate": "every image made is cached; rerun the same command to resume "
                      "(nothing is asked for twice)",
    "synth sweep": "the variations made are cached; a rerun reuses them",
    "synth bench": "nothing was kept; a rerun times everything again",
    "reproduce": "finished grid runs and executed notebooks are kept; a rerun resumes the "
                 "grid and runs the notebooks again",
}


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (DataError, FileNotFoundError, ValueError)
    api = sys.modules.get("mrilib.synthetic.openai_backend")
    return errors + ((api.APIFailure,) if api is not None else ())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mrilib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"mrilib.commands.{name}").add_parser(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A warning meant for the user reads like an error line, without the source location.
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def interrupted_note(args) -> str:
    """What an interrupted command keeps, in a line."""
    name = " ".join(x for x in (args.command, getattr(args, "action", None)) if x)
    return f"interrupted; {INTERRUPTED.get(name, 'nothing was kept')}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return int(args.func(args) or 0)
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        # Bad input or a failed remote service is the user's to fix: say what, no traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_note(args), file=sys.stderr)
        return 130
