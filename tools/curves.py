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

MODEL = "basic_cnn"


def arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    return {"model": MODEL, "split": split.kind, "split_seed": split.seed, "policy": policy,
            "real_fraction": args.real_frac, "repeat": seeds.repeat,
            "sample_seed": seeds.sample_seed, "train_seed": seeds.train_seed,
            "n_train": record["n_train"], "epochs": args.epochs,
            "seconds": record["seconds"], **base,
            "curve": [{k: e[k] for k in ("epoch", "train_loss", "val_loss", "val_acc")}
                      for e in record["history"]]}


def main(argv=None) -> int:
    args = arguments(argv)
    import torch

    from mrilib.data import load_mri
    from mrilib.grid.design import grid_settings, repeat_seeds
    from mrilib.provenance import provenance
    from mrilib.splits import split_mri
    from mrilib.synthetic.mixing import real_sample
    from mrilib.train import design_settings, train_replicates

    data = load_mri(args.source)
    grid = grid_settings("thesis")
    # The CPU's test pass is a third of an epoch's time; the curves need validation only.
    overrides = {"epochs": args.epochs, "test_every_epoch": False}
    base = {"settings": design_settings(MODEL, **overrides), "data_fingerprint": data.fingerprint,
            **provenance(args.device), "torch_threads": torch.get_num_threads()}
    splits = {kind: split_mri(data, kind) for kind in args.splits}
    for repeat in range(args.repeats):
        seeds = repeat_seeds(repeat, grid)
        for kind, split in splits.items():
            path = Path(args.out) / f"{MODEL}-{kind}.jsonl"
            done = done_runs(path)
            val = (data.images[split.val], data.labels[split.val])
            test = (data.images[split.test], data.labels[split.test])
            index = real_sample(data, split, args.real_frac, seeds.sample_seed)[None]
            for policy in args.policies:
                if (policy, repeat) in done:
                    continue
                start = time.perf_counter()
                (record,) = train_replicates(MODEL, data.images, data.labels, index, val, test,
                                             [seeds.train_seed], aug=policy, device=args.device,
                                             **overrides)
                append_row(path, curve_row(record, split, policy, seeds, args, base))
                print(f"{kind}/{policy}/r{repeat}: best epoch "
                      f"{record['best']['epoch']} ({time.perf_counter() - start:.0f} s)",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
