"""``python -m mrilib grid``: train the chapter-7 grid, resumably, in time-boxed chunks."""
from __future__ import annotations

from ..config import KNOWN_PRESETS


def add_parser(sub) -> None:
    p = sub.add_parser("grid", help="train the chapter-7 grid (resumable, time-boxed chunks)")
    p.add_argument("--preset", choices=KNOWN_PRESETS, default=None,
                   help="thesis: the full grid; quick: a few cells on a CPU; cell: one cell "
                        "(default: $MRILIB_PRESET, else thesis)")
    p.add_argument("--tier", type=int, choices=(1, 2, 3), default=None,
                   help="train the cells of tiers 1..N only: 1, the basic CNN's thesis cells on "
                        "both splits; 2, + ResNet-18's and ViT-Tiny's core cells on the subject "
                        "split; 3, everything (default)")
    p.add_argument("--split", choices=("slice", "subject"), default=None,
                   help="train the cells of one split only (default: both)")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs already in the results folder (needed once it "
                        "holds any)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="skip each cell that would not finish within M minutes (shorter ones "
                        "further on still run); a rerun with --resume does the rest")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if present)")
    p.add_argument("--train-generators", action="store_true",
                   help="train (or resume) missing generators of the local backend inside "
                        "the time budget, instead of listing their cells as blocked")
    p.add_argument("--available-generators", action="store_true",
                   help="run the repeats of a synthetic cell whose generators are trained "
                        "(repeat r uses generator r mod G) and leave the rest for later")
    p.add_argument("--source", default=None,
                   help="image folder, parquet, save_to_disk folder or hub id "
                        "(default: $MRILIB_DATA, else ../shared/data/alzheimer_mri beside "
                        "the repo, else the hub dataset)")
    p.add_argument("--results", default=None,
                   help="results folder (default: results/ for thesis, cache/<preset>/results/)")
    p.add_argument("--imagenet", default=None, metavar="MODEL[=PATH][,MODEL[=PATH]]",
                   help="start these models from ImageNet weights and train only them: "
                        "MODEL fetches timm's weights from the Hugging Face hub, MODEL=PATH "
                        "reads timm's state dict from a file, e.g. resnet18,vit_tiny; rows "
                        "go to <results>/imagenet unless --results is given")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="skip unreadable or non-image files (counted in a warning) instead of "
                        "stopping; the grid then trains on the readable images")
    p.add_argument("--list", action="store_true",
                   help="print every cell with its finished repeats and train nothing")
    p.set_defaults(func=run)


def imagenet_starts(text: str) -> dict:
    """``--imagenet resnet18,vit_tiny=PATH``: {model: True (the hub) or the weights' path}."""
    out = {}
    for part in text.split(","):
        model, sep, path = (x.strip() for x in part.partition("="))
        if not model or (sep and not path):
            raise ValueError(f"--imagenet {text!r}: give MODEL or MODEL=PATH, comma-separated, "
                             f"e.g. resnet18,vit_tiny or resnet18=weights/resnet18.safetensors")
        out[model] = path if sep else True
    return out


def run(args) -> int:
    from ..grid import grid_status, run_grid
    from ..paths import check_writable

    if args.results is not None:  # before any work: a file there fails only at the first row
        check_writable(args.results, "--results")
    overrides = {}
    if args.tier is not None:
        overrides["tier"] = args.tier
    if args.split is not None:
        overrides["splits"] = [args.split]
    if args.imagenet is not None:
        starts = imagenet_starts(args.imagenet)
        overrides.update(imagenet=starts, models=list(starts))
    if args.list:
        status = grid_status(args.preset, args.results, **overrides)
        print(status.to_string(index=False))
        print(f"{int((status['done'] == status['repeats']).sum())} of {len(status)} cells "
              f"complete; {int(status['done'].sum())} of {int(status['repeats'].sum())} runs")
        return 0
    pacer = None
    if args.max_minutes is not None:
        from ..grid.schedule import time_budget

        pacer = time_budget(args.max_minutes, args.preset, args.results, args.device,
                            **overrides)
    progress = run_grid(args.preset, args.results, resume=args.resume, device=args.device,
                        train_generators=args.train_generators, source=args.source,
                        available_generators=args.available_generators, pacer=pacer,
                        on_error="skip" if args.skip_unreadable else "raise", **overrides)
    print(f"results  {progress.results}")
    print(f"cells    {progress.cells_done} of {progress.cells_total} complete; "
          f"{progress.runs_written} runs written by this call")
    for key, why in progress.blocked.items():
        print(f"blocked  {key}: {why}")
    if progress.stopped_for_time:
        print(f"skipped  cells that would not have finished within {args.max_minutes} minutes")
    if progress.remaining:
        preset = f" --preset {args.preset}" if args.preset else ""
        again = "".join(f" --{flag} {value}" for flag, value in
                        (("results", args.results), ("imagenet", args.imagenet)) if value)
        print(f"{len(progress.remaining)} cell(s) left: rerun `python -m mrilib grid{preset} "
              f"--resume{again}` to continue where this stopped")
    return 0
