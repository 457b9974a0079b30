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
    cluster = p.add_argument_group("on a cluster (mrilib.grid.cluster)")
    cluster.add_argument("--executor", choices=("local", "slurm", "submitit-local"),
                         default="local",
                         help="local: train in this process (default); slurm: submit the "
                              "remaining work as a job array, one job per split and generator "
                              "plus real-only jobs, each writing its own shard of the results "
                              "folder; submitit-local: the same jobs as processes of this "
                              "machine, waited for")
    cluster.add_argument("--partition", default=None, help="SLURM partition (default: the "
                         "cluster's)")
    cluster.add_argument("--gpus-per-job", type=int, default=None,
                         help="GPUs per SLURM job (default 1)")
    cluster.add_argument("--max-jobs", type=int, default=None,
                         help="SLURM jobs running at once (default: all)")
    cluster.add_argument("--timeout-min", type=int, default=None,
                         help="a job's time limit in minutes (default 240); a job stopped by "
                              "it or preempted is requeued and resumes from its finished runs")
    cluster.add_argument("--merge", action="store_true",
                         help="fold the jobs' finished shards into the results folder's "
                              "runs.jsonl (for committing) and train nothing")
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
    if args.merge:
        return merge(args, overrides)
    if args.executor != "local":
        return submit(args, overrides)
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


def merge(args, overrides: dict) -> int:
    """``grid --merge``: the finished shards into ``runs.jsonl``."""
    from ..grid import export_csv, grid_results_dir, grid_settings
    from ..grid.store import merge_shards
    from ..paths import preset_env, preset_name

    preset = args.preset or preset_name()
    with preset_env(preset):
        directory = grid_results_dir(grid_settings(preset, **overrides), args.results)
    added, left = merge_shards(directory)
    print(f"merged   {added} runs into {directory}/runs.jsonl")
    if left:
        print(f"left     {len(left)} shard(s) a job still writes ({', '.join(left)}); run "
              f"grid --merge again once they finish")
    if (directory / "runs.jsonl").exists():
        export_csv(directory)
    return 0


def submit(args, overrides: dict) -> int:
    """``grid --executor slurm|submitit-local``: the remaining work as jobs."""
    from ..grid.cluster import submit_grid, wait_for
    from ..paths import preset_name

    if args.max_minutes is not None or args.list:
        raise ValueError(f"--executor {args.executor} takes --timeout-min for a job's time "
                         f"limit, not --max-minutes or --list; run those with --executor local")
    cluster = {k: v for k, v in (("partition", args.partition), ("max_jobs", args.max_jobs),
                                 ("gpus_per_job", args.gpus_per_job),
                                 ("timeout_min", args.timeout_min)) if v is not None}
    options = {"device": args.device, "source": args.source,
               "train_generators": args.train_generators,
               "available_generators": args.available_generators,
               "on_error": "skip" if args.skip_unreadable else "raise"}
    preset = args.preset or preset_name()
    submitted = submit_grid(args.executor, preset, args.results, args.resume, options,
                            overrides, **cluster)
    if not submitted:
        print("nothing left to train: every run of the grid is in the results folder")
        return 0
    for unit, job in submitted:
        print(f"job      {job.job_id}  {unit.name}: {len(unit.cells)} cell(s)", flush=True)
    if args.executor == "slurm":
        print(f"{len(submitted)} jobs submitted; once they finish, `python -m mrilib grid "
              f"--merge` folds their shards into runs.jsonl (report reads them unmerged too)")
        return 0
    notes = wait_for(submitted)
    for line in notes:
        print(line)
    failed = [line for line in notes if line.startswith("failed")]
    print(f"{len(submitted) - len(failed)} of {len(submitted)} jobs finished; `python -m "
          f"mrilib grid --merge` folds their shards into runs.jsonl"
          + ("; rerun with --resume to resubmit what is left" if failed else ""))
    return 1 if failed else 0
