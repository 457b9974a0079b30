"""``python -m mrilib report``: every chapter-7 figure and ``summary.md`` from the results table."""
from __future__ import annotations

from ..config import KNOWN_PRESETS

# best_val_loss is no result: it chose the epoch it is read at.
METRICS = ("best_test_loss", "final_val_loss", "final_test_loss")


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="chapter-7 figures and summary.md from the results table")
    p.add_argument("--preset", choices=KNOWN_PRESETS, default=None,
                   help="whose results: thesis (results/, figures/) or quick/cell "
                        "(cache/<preset>/); default: $MRILIB_PRESET, else thesis")
    p.add_argument("--results", default=None,
                   help="folder holding runs.jsonl to read (default: the committed results/ "
                        "when it holds runs, else the preset's results folder); any other "
                        "folder gets the summary and a figures/ folder of its own, e.g. "
                        "results/imagenet")
    p.add_argument("--out", default=None,
                   help="folder for summary.md (default: the folder --results names, else "
                        "the preset's results folder, so a quick run never overwrites the "
                        "committed results/summary.md)")
    p.add_argument("--figures", default=None,
                   help="folder for the figures (default: figures/ for thesis and "
                        "cache/<preset>/figures otherwise; <folder>/figures for a --results "
                        "folder other than results/ and the preset's own)")
    p.add_argument("--metric", default=METRICS[0], choices=METRICS,
                   help="the loss the tables and verdicts use (default: test cross-entropy at "
                        "the epoch selected on validation; the thesis's last-epoch validation "
                        "cross-entropy always stands beside the thesis's numbers)")
    p.add_argument("--n-boot", type=int, default=None,
                   help="bootstrap resamples (default: mrilib.stats, 10,000; quick 500)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..paths import check_writable, preset_env, preset_name
    from ..report import write_report

    if args.n_boot is not None and args.n_boot < 1:
        raise ValueError(f"--n-boot {args.n_boot}: give 1 or more bootstrap resamples "
                         f"(the default is 10,000; quick 500)")
    for flag, folder in (("--out", args.out), ("--figures", args.figures)):
        if folder:
            check_writable(folder, flag)
    with preset_env(args.preset or preset_name()):
        path = write_report(args.results, args.metric, args.n_boot, out=args.out,
                            figures=args.figures)
    print(f"wrote {path}")
    return 0
