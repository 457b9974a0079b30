"""``python -m mrilib bench train``: mrilib's training against the usual notebook loop."""
from __future__ import annotations

import json
import re
from pathlib import Path


# Flags that set one mrilib.train setting for (b) and (c): the setting, its value, the
# file name's suffix, the help.
SETTING_FLAGS = {
    "--nondeterministic": ("deterministic", False, "nondet",
                           "allow non-deterministic cuDNN algorithms and attention kernels "
                           "(no autotuning), to measure what bit-for-bit reproducibility costs"),
    "--test-at-ends": ("test_every_epoch", False, "testends",
                       "test only the final and each replicate's best-validation epoch, as "
                       "the grid does, to measure what testing every epoch costs"),
    "--im2col-stem": ("im2col_stem", True, "im2col",
                      "run one-input-channel convolutions (the stems) as unfold + matmul "
                      "instead of vmap's depthwise path"),
    "--compile-step": ("compile_step", True, "compile",
                       "run each training step's forward and loss through torch.compile "
                       "(compiled in the warm-up, at the timed shapes)"),
    "--cuda-graph": ("cuda_graph", True, "graph",
                     "replay each full training step, backward and Adam included, as one "
                     "CUDA graph (CUDA only)"),
    "--replicate-loop": ("replicate_loop", True, "loop",
                         "run each replicate with its own dense kernels, one after another, "
                         "instead of one vmap of grouped ones"),
    "--replicate-streams": ("replicate_streams", True, "streams",
                            "with --replicate-loop: each replicate on a CUDA stream of its "
                            "own, so that their small kernels overlap (CUDA only)"),
}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time mrilib against the usual training loop")
    what = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    t = what.add_parser("train", help="seconds per replicate: notebook loop vs mrilib "
                                      "(one at a time, and K at once)")
    t.add_argument("--model", default="basic_cnn",
                   help="basic_cnn, resnet18, vit_tiny, vit_small, or a comma-separated "
                        "list run one after another (default basic_cnn)")
    t.add_argument("--aug", default="none", help="none, hflip or autoaugment (default none)")
    t.add_argument("--replicates", type=int, default=None,
                   help="replicates trained at once by mrilib (default 20; quick preset 4)")
    t.add_argument("--naive-replicates", type=int, default=None,
                   help="notebook-loop replicates timed (default 3; quick preset 1; 0: not "
                        "timed, for a row read against the default row of the same card)")
    t.add_argument("--serial-replicates", type=int, default=None,
                   help="mrilib one-at-a-time replicates timed (default 3; quick preset 1; "
                        "0: not timed)")
    t.add_argument("--naive-workers", type=int, default=None,
                   help="DataLoader workers of the notebook loop (default 2)")
    t.add_argument("--real-frac", type=float, default=None, help="default 0.3")
    t.add_argument("--seed", type=int, default=None, help="replicate k uses seed+k (default 0)")
    t.add_argument("--epochs", type=int, default=None,
                   help="epochs every replicate trains, no early stopping (default 10; "
                        "quick preset 1)")
    t.add_argument("--batch-size", type=int, default=None, help="default: the model's")
    t.add_argument("--lr", type=float, default=None, help="default: the model's")
    t.add_argument("--device", default=None, help="cpu, cuda... (default: cuda if present)")
    t.add_argument("--source", default=None,
                   help="the image folder (default: $MRILIB_DATA); the notebook loop reads it "
                        "with torchvision's ImageFolder")
    t.add_argument("--size", type=int, default=128, choices=(128, 256), help="pixels per side")
    for flag, (_, _, _, text) in SETTING_FLAGS.items():
        t.add_argument(flag, action="store_true", help=text)
    t.add_argument("--profile", action="store_true",
                   help="after the timings, run one epoch of (c) under torch.profiler and "
                        "report host vs device time per step and the costliest kernels")
    t.add_argument("--out", default=None, metavar="DIR",
                   help="also write bench-train-<model>-<aug>-<device>[-k<K>][-<size>px]"
                        "[-nondet][-testends][-im2col][-compile][-graph][-loop][-streams][-no-naive]"
                        "[-no-serial][-profile]"
                        ".{txt,json} to DIR (K when "
                        "--replicates is given)")
    t.add_argument("--json", action="store_true", help='print one JSON object {"results": [...]}')
    t.set_defaults(func=run)
    c = what.add_parser("cost", help="what the tier-1 grid (the basic CNN's cells) costs in "
                                     "GPU windows, from a card's committed benchmarks "
                                     "(mrilib.grid.cost)")
    c.add_argument("--card", default="H100",
                   help="the card whose benchmarks/ rows are read, by part of its name "
                        "(default H100)")
    c.add_argument("--split", choices=("slice", "subject"), default=None,
                   help="one split's cells only (default: both)")
    c.add_argument("--window-minutes", type=float, default=None,
                   help="minutes of work a window holds (default 9.5)")
    c.add_argument("--source", default=None,
                   help="the image folder (default: $MRILIB_DATA): the splits and samples "
                        "decide how many variations each generator draws")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=run_cost)


def _overrides(args) -> dict:
    names = {"replicates": args.replicates, "naive_replicates": args.naive_replicates,
             "serial_replicates": args.serial_replicates, "naive_workers": args.naive_workers,
             "real_frac": args.real_frac, "seed": args.seed, "epochs": args.epochs,
             "batch_size": args.batch_size, "lr": args.lr,
             **{key: value for flag, (key, value, _, _) in SETTING_FLAGS.items()
                if getattr(args, _dest(flag))}}
    return {k: v for k, v in names.items() if v is not None}


def file_stem(model: str, args, device: str) -> str:
    """bench-train-<model>-<aug>-<device>, plus what differs from the default protocol."""
    extra = (f"-k{args.replicates}" if args.replicates is not None else "") + \
        (f"-{args.size}px" if args.size != 128 else "") + \
        "".join(f"-{suffix}" for flag, (_, _, suffix, _) in SETTING_FLAGS.items()
                if getattr(args, _dest(flag))) + \
        ("-no-naive" if args.naive_replicates == 0 else "") + \
        ("-no-serial" if args.serial_replicates == 0 else "") + \
        ("-profile" if args.profile else "")
    return _slug(f"bench-train-{model}-{args.aug}-{device}{extra}")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()


def _checked_start(args) -> None:
    """Numbers, device and --out, checked before the timings: a late failure loses them."""
    from ..device import resolve_device
    from ..paths import check_writable
    from .train import checked_fraction, checked_seed

    checked_seed(args.seed)
    checked_fraction(args.real_frac)
    resolve_device(args.device)
    if args.out:
        check_writable(args.out, "--out")


def run(args) -> int:
    from ..bench import bench_train, report
    from ..paths import atomic_write_bytes

    _checked_start(args)

    def save(model, result):
        if args.out:
            stem = file_stem(model, args, result["device"])
            atomic_write_bytes(Path(args.out) / f"{stem}.txt", (report(result) + "\n").encode())
            atomic_write_bytes(Path(args.out) / f"{stem}.json",
                               (json.dumps(result, indent=2) + "\n").encode())

    results = []
    for model in [m.strip() for m in args.model.split(",") if m.strip()]:
        # Saved once timed and again with the profile: a cut-off profile loses no timing.
        result = bench_train(model, args.aug, args.source, args.device, args.size,
                             profile=args.profile, on_timed=lambda r, m=model: save(m, r),
                             **_overrides(args))
        results.append(result)
        if not args.json:
            print(report(result), flush=True)
            print()
        save(model, result)
    if args.json:
        print(json.dumps({"results": results}, indent=2))
    return 0


def run_cost(args) -> int:
    from ..data import load_mri
    from ..grid.cost import card_speeds, cost_table, tier_cost

    if args.window_minutes is not None and not args.window_minutes > 0:
        raise ValueError(f"--window-minutes {args.window_minutes}: give a positive number")
    speeds = card_speeds(args.card)
    overrides = {} if args.window_minutes is None else {"window_minutes": args.window_minutes}
    cost = tier_cost(load_mri(args.source), speeds, split=args.split, **overrides)
    print(json.dumps({"card": speeds["card"], **cost}, indent=2) if args.json
          else cost_table(cost, speeds["card"]))
    return 0
