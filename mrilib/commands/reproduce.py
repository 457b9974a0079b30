"""``python -m mrilib reproduce``: every chapter that committed results allow (make reproduce)."""
from __future__ import annotations

from ..config import KNOWN_PRESETS


def add_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="run the grid (where a GPU is), every notebook and the "
                                         "report; what waits for a GPU is said and left out")
    p.add_argument("--preset", choices=KNOWN_PRESETS, default=None,
                   help="default: $MRILIB_PRESET, else thesis")
    p.add_argument("--train", action="store_true",
                   help="train what is missing even without a GPU (the thesis preset: many "
                        "hours on a CPU); the quick preset always trains (CPU minutes)")
    p.add_argument("--dry-run", action="store_true", help="say what would run, run nothing")
    p.add_argument("--out", default="build/notebooks", help="folder for the executed notebooks")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..reproduce import plan, run as reproduce

    train = True if args.train else None
    if args.dry_run:
        for step in plan(args.preset, train):
            print(f"{step.name}: {'runs' if step.run else 'left out'} ({step.why})")
        return 0
    return reproduce(args.preset, train, args.out)
