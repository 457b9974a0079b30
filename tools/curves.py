"""Validation-loss curves of the basic CNN, to choose its maximum epochs and patience.

Trains the grid's first repeats of the 30%-real cells (no synthetic images) for a fixed
number of epochs without early stopping, on each split kind and augmentation policy,
and appends one JSON line per run to ``results/curves/basic_cnn-<split>.jsonl``: the
per-epoch train and validation loss, the seeds, the training settings and provenance
(commit, package versions, device). Resumable: a (split, policy, repeat) already in its
file is skipped. Runs go repeat by repeat over every split and policy, so a run cut
short still has every condition. docs/decisions.md (*Epochs and early stopping*) reads
the files.

    python tools/curves.py --epochs 40 --repeats 3 --device cpu
    python tools/curves.py --summary    # each patience against every curve kept

``--summary`` reads the curves and the per-epoch rows of the archived fixed-budget grid
(results/archive/*/epochs.jsonl) and prints, per split, policy and patience, how many
runs would stop before reaching their lowest validation loss, and at which epoch they
would stop (the evidence for the patience in mrilib.train.PER_MODEL).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATIENCES = (2, 3, 4, 5, 6)


def arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="basic_cnn")
    p.add_argument("--summary", action="store_true", help="print the patience table and stop")
    p.add_argument("--epochs", type=int, default=40, help="epochs per run (default 40)")
    p.add_argument("--repeats", type=int, default=3, help="grid repeats 0..R-1 (default 3)")
    p.add_argument("--real-frac", type=float, default=0.3, help="real fraction (default 0.3)")
    p.add_argument("--splits", nargs="+", default=["slice", "subject"])
    p.add_argument("--policies", nargs="+", default=["none", "hflip", "autoaugment"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--source", default=None, help="the data (default: as load_mri finds it)")
    p.add_argument("--out", default=str(ROOT / "results" / "curves"))
    return p.parse_args(argv)


def done_runs(path: Path) -> set[tuple[str, int]]:
    """(policy, repeat) of the runs already in ``path``."""
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["policy"], r["repeat"]) for r in rows}


def append_row(path: Path, row: dict) -> None:
    """One line, flushed to disk before the next run starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def curve_row(record: dict, split, policy: str, seeds, args, base: dict) -> dict:
    """The JSON line of one run: its seeds, curve and what made it."""
    return {"model": args.model, "split": split.kind, "split_seed": split.seed, "policy": policy,
            "real_fraction": args.real_frac, "repeat": seeds.repeat,
            "sample_seed": seeds.sample_seed, "train_seed": seeds.train_seed,
            "n_train": record["n_train"], "epochs": args.epochs,
            "seconds": record["seconds"], **base,
            "curve": [{k: e[k] for k in ("epoch", "train_loss", "val_loss", "val_acc")}
                      for e in record["history"]]}


def kept_curves(folder: Path, model: str) -> dict[tuple, list[list[float]]]:
    """Validation-loss curves by (source, split, policy, real fraction): this tool's files,
    and the archived grids' per-epoch rows (runs of a fixed budget, slice split)."""
    from collections import defaultdict

    out = defaultdict(list)
    for path in sorted(folder.glob(f"{model}-*.jsonl")):
        for row in map(json.loads, path.read_text().splitlines()):
            out[("curves", row["split"], row["policy"], row["real_fraction"])].append(
                [e["val_loss"] for e in row["curve"]])
    for path in sorted((ROOT / "results" / "archive").glob("*/epochs.jsonl")):
        runs = defaultdict(list)
        for row in map(json.loads, path.read_text().splitlines()):
            if row["model"] == model:
                runs[(row.get("split", "slice"), row["aug"], row["synthetic"],
                      row["real_fraction"], row["repeat"])].append((row["epoch"], row["val_loss"]))
        for (split, aug, synthetic, fraction, _), epochs in runs.items():
            out[(path.parent.name, split, f"{aug}/{synthetic}", fraction)].append(
                [loss for _, loss in sorted(epochs)])
    return dict(out)


def stop_epoch(curve: list[float], patience: int) -> tuple[int, int]:
    """(last epoch, best epoch), from 1, of ``curve`` under mrilib.stopping's rule."""
    best = 0
    for e in range(1, len(curve)):
        if curve[e] < curve[best]:
            best = e
        elif e - best >= patience:
            return e + 1, best + 1
    return len(curve), best + 1


def patience_table(curves: dict) -> str:
    """Per condition: runs, epoch of the lowest validation loss, and per patience the runs
    that would stop before it (and by how much validation loss) and the latest stop."""
    lines = ["source | split | policy | real | runs | epochs | lowest at (median, max) | "
             + " | ".join(f"p{p}: missed, +loss, latest stop" for p in PATIENCES)]
    for key, runs in sorted(curves.items(), key=lambda kv: tuple(map(str, kv[0]))):
        lowest = sorted(min(range(len(c)), key=c.__getitem__) + 1 for c in runs)
        cols = []
        for p in PATIENCES:
            stops = [stop_epoch(c, p) for c in runs]
            lost = [c[b - 1] - min(c) for c, (_, b) in zip(runs, stops)]
            cols.append(f"{sum(x > 0 for x in lost)}, +{max(lost):.3f}, "
                        f"{max(s for s, _ in stops)}")
        lines.append(" | ".join([*map(str, key), str(len(runs)), str(len(runs[0])),
                                 f"{lowest[len(lowest) // 2]}, {lowest[-1]}", *cols]))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = arguments(argv)
    if args.summary:
        print(patience_table(kept_curves(Path(args.out), args.model)))
        return 0
    import torch

    from mrilib.data import load_mri
    from mrilib.grid.design import grid_settings, repeat_seeds
    from mrilib.provenance import provenance
    from mrilib.splits import split_mri
    from mrilib.synthetic.mixing import real_sample
    from mrilib.train import design_settings, train_replicates

    data = load_mri(args.source)
    grid = grid_settings("thesis")
    # Whole curves, no stopping; the CPU's test pass is a third of an epoch's time, and the
    # curves need validation only.
    overrides = {"epochs": args.epochs, "patience": "off", "test_every_epoch": False}
    base = {"settings": design_settings(args.model, **overrides), "data_fingerprint": data.fingerprint,
            **provenance(args.device), "torch_threads": torch.get_num_threads()}
    splits = {kind: split_mri(data, kind) for kind in args.splits}
    for repeat in range(args.repeats):
        seeds = repeat_seeds(repeat, grid)
        for kind, split in splits.items():
            path = Path(args.out) / f"{args.model}-{kind}.jsonl"
            done = done_runs(path)
            val = (data.images[split.val], data.labels[split.val])
            test = (data.images[split.test], data.labels[split.test])
            index = real_sample(data, split, args.real_frac, seeds.sample_seed)[None]
            for policy in args.policies:
                if (policy, repeat) in done:
                    continue
                start = time.perf_counter()
                (record,) = train_replicates(args.model, data.images, data.labels, index, val, test,
                                             [seeds.train_seed], aug=policy, device=args.device,
                                             **overrides)
                append_row(path, curve_row(record, split, policy, seeds, args, base))
                print(f"{kind}/{policy}/r{repeat}: best epoch "
                      f"{record['best']['epoch']} ({time.perf_counter() - start:.0f} s)",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
