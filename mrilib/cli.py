"""``python -m mrilib <command>``: the long runs, from a terminal.

Each command lives in ``mrilib/commands/<name>.py`` with ``add_parser(subparsers)``;
adding a command is one module and one entry in :data:`COMMANDS`. Heavy imports
happen inside each command's ``run`` so that ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .data import DataError

COMMANDS = ("data", "train", "bench", "synth", "cam", "grid", "report")


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        # Bad input or a failed remote service is the user's to fix: say what, no traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun resumes from it", file=sys.stderr)
        return 130
