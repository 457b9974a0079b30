"""``python -m mrilib train``: K replicates of one model on a stratified real fraction."""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

SLICE_NOTE = ("Splits are slice-level (about 32 slices per subject, no subject ids): accuracy "
              "on them is optimistic compared with a subject-level split.")
HANDFUL = 5  # fewer training images of a class than this: its numbers mean little


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train K replicates of a model and report val/test metrics")
    add_training_arguments(p)
    p.add_argument("--weights", default=None,
                   help="local ImageNet weights for resnet18/vit_* (timm state dict, "
                        "safetensors or .pth); without it those models train from scratch")
    p.add_argument("--pretrained", action="store_true",
                   help="ImageNet weights from the Hugging Face hub (needs the hub or its cache)")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write each replicate's checkpoint at its best validation epoch (the "
                        "one scored) to DIR (checked before training starts)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="skip unreadable or non-image files (counted in a warning) instead of "
                        "stopping")
    p.add_argument("--json", action="store_true", help='print one JSON object {"runs": [...]}')
    p.set_defaults(func=run)


def add_training_arguments(p) -> None:
    """The options ``train`` and ``bench train`` share."""
    p.add_argument("--model", default="basic_cnn",
                   help="basic_cnn, resnet18, vit_tiny or vit_small (default basic_cnn)")
    p.add_argument("--aug", default="none", help="augmentation policy: none, hflip, autoaugment")
    p.add_argument("--real-frac", type=float, default=0.3,
                   help="stratified fraction of the training pool each replicate trains on "
                        "(default 0.3, the thesis's headline case)")
    p.add_argument("--replicates", type=int, default=20, help="K independent runs (default 20)")
    p.add_argument("--seed", type=int, default=0,
                   help="replicate k uses seed SEED+k for its sample, init, order and draws")
    p.add_argument("--epochs", type=int, default=None,
                   help="the most epochs a replicate trains (default: the model's, mrilib.train)")
    p.add_argument("--patience", type=patience_value, default=None,
                   help="stop a replicate after this many epochs without a lower validation "
                        "loss, or 'off' (default: the model's)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the model's")
    p.add_argument("--lr", type=float, default=None, help="default: the model's")
    p.add_argument("--max-parallel", type=int, default=None,
                   help="replicates trained at once (lower it if the GPU runs out of memory)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if present)")
    p.add_argument("--source", default=None,
                   help="image folder, parquet, save_to_disk folder or hub id "
                        "(default: $MRILIB_DATA, else ../shared/data/alzheimer_mri beside the repo, else the hub dataset)")
    p.add_argument("--split", default=None, choices=("slice", "subject"),
                   help="slice (the thesis's; optimistic) or subject (whole brains on one side; "
                        "the real fraction is made of whole brains) (default: slice)")
    p.add_argument("--size", type=int, default=128, choices=(128, 256), help="pixels per side")


def overrides_from(args) -> dict:
    """The ``mrilib.train`` settings the command line changes (None = the model's default)."""
    out = {"epochs": args.epochs, "patience": getattr(args, "patience", None),
           "batch_size": args.batch_size, "lr": args.lr,
           "max_parallel": args.max_parallel}
    if getattr(args, "weights", None):
        out["weights"] = args.weights
    if getattr(args, "pretrained", False):
        out["pretrained"] = True
    return {k: v for k, v in out.items() if v is not None}


def patience_value(text: str):
    """``--patience``: a whole number of epochs, or 'off'."""
    if text == "off":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a whole number of epochs, or 'off'") from None


def checked_seed(value: int | None, flag: str = "--seed") -> int | None:
    """``value`` unless it is negative (numpy's generators take no negative seed)."""
    if value is not None and value < 0:
        raise ValueError(f"{flag} {value}: give a seed of 0 or more")
    return value


def checked_fraction(value: float | None, flag: str = "--real-frac") -> float | None:
    """``value`` unless it lies outside (0, 1]."""
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"{flag} {value:g}: give a fraction in (0, 1], e.g. 0.3 for 30% of "
                         f"the training pool")
    return value


def warn_few_per_class(data, index, what: str) -> None:
    """A warning when a class has fewer than :data:`HANDFUL` images in ``index`` (one
    sample): a stratified sample keeps one image of each class however small the fraction."""
    counts = data.counts(index)
    few = {c: n for c, n in counts.items() if n < HANDFUL}
    if few:
        listed = ", ".join(f"{c} {n}" for c, n in few.items())
        warnings.warn(f"{what} gives few images of some classes ({listed}; fewer than "
                      f"{HANDFUL}): their numbers mean little; use a larger fraction",
                      stacklevel=2)


def loaded(args, size: int = 128):
    """``load_mri`` of ``args.source``, skipping unreadable files under --skip-unreadable
    with a warning that counts them (the data command lists them)."""
    from ..data import CLUTTER_REASON, load_mri

    skip = getattr(args, "skip_unreadable", False)
    data = load_mri(args.source, size=size, on_error="skip" if skip else "raise")
    bad = [p for p, why in data.skipped if why != CLUTTER_REASON]
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable or non-image file(s), e.g. {bad[0]} "
                      f"(`python -m mrilib data --skip-unreadable` lists them)", stacklevel=2)
    return data


def replicate_inputs(args):
    """``(data, split, train_index, val, test, seeds)`` for ``args``' protocol on the real split."""
    from ..splits import split_mri

    if args.replicates < 1:
        raise ValueError(f"--replicates {args.replicates}: give at least 1")
    checked_seed(args.seed)
    checked_fraction(args.real_frac)
    data = loaded(args, args.size)
    split = split_mri(data, getattr(args, "split", None))
    seeds = [args.seed + k for k in range(args.replicates)]
    index = sample_rows(data, split, args.real_frac, seeds)
    warn_few_per_class(data, index[0], f"--real-frac {args.real_frac:g}")
    val = (data.images[split.val], data.labels[split.val])
    test = (data.images[split.test], data.labels[split.test])
    return data, split, index, val, test, seeds


def sample_rows(data, split, fraction: float, seeds):
    """``[K, n]`` training rows, one stratified sample per seed: slices, or whole subjects."""
    import torch

    from ..splits import pool_sample
    from ..train import real_fraction_index

    if split.kind == "slice":
        return real_fraction_index(data.labels, split.train, fraction, seeds, data.ids)
    rows = [pool_sample(data, split, fraction, s) for s in seeds]
    if len({len(r) for r in rows}) > 1:  # brains of unequal slice counts: no [K, n] stack
        raise ValueError(f"--real-frac {fraction:g} draws samples of different sizes "
                         f"({sorted({len(r) for r in rows})} slices) on this data's subjects; "
                         f"use --replicates 1 or --split slice")
    return torch.stack(rows)


def split_note(split) -> str:
    """What the split means for the numbers printed."""
    if split.kind == "slice":
        return SLICE_NOTE
    return ("Subject-level split: every brain's slices lie on one side of train/validation/test "
            "(recovered subjects, mrilib.subjects); no slice-level optimism.")


def run(args) -> int:
    from ..device import resolve_device
    from ..paths import check_writable
    from ..train import train_replicates

    # Checked before the work: a bad device or --save folder found after training loses it.
    resolve_device(args.device)
    if args.save:
        check_writable(args.save, "--save")
    data, split, index, val, test, seeds = replicate_inputs(args)
    records, checkpoints = train_replicates(
        args.model, data.images, data.labels, index, val, test, seeds, aug=args.aug,
        device=args.device, return_models=True, models_at="best", **overrides_from(args))
    for rec in records:
        rec.update(real_frac=args.real_frac, split=split.kind, source=data.source, fingerprint=data.fingerprint)
    for _, config in checkpoints:
        config["classes"] = list(data.classes)  # Grad-CAM names the classes from the checkpoint
    saved = save_all(args.save, checkpoints) if args.save else []
    if args.json:
        print(json.dumps({"runs": records, "checkpoints": [str(p) for p in saved],
                          "note": split_note(split)}, indent=2))
        return 0
    print(table(records))
    for path in saved:
        print(f"saved {path}")
    print(split_note(split))
    return 0


def save_all(directory: str, checkpoints) -> list[Path]:
    """One checkpoint file per replicate under ``directory``."""
    from ..checkpoints import save_checkpoint

    out = []
    for state, config in checkpoints:
        name = f"{config['model']}-{config['aug']}-seed{config['seed']}.pt"
        out.append(save_checkpoint(Path(directory) / name, state, config))
    return out


def model_title(rec: dict) -> str:
    """The model as tables name it, saying when a thesis-pretrained model was not."""
    if rec["model"] == "basic_cnn":
        return "basic_cnn (from scratch, as in the thesis)"
    if rec["init"] == "scratch":
        return f"{rec['model']} (FROM SCRATCH; the thesis fine-tuned ImageNet weights)"
    return f"{rec['model']} (ImageNet weights, fine-tuned)"


def epochs_said(rec: dict) -> str:
    """The epoch budget of a record: fixed, or a most with early stopping."""
    if rec.get("patience") is None:
        return f"{rec['epochs']} epochs"
    return (f"up to {rec['epochs']} epochs, stopping after {rec['patience']} without a lower "
            f"validation loss")


def table(records: list[dict]) -> str:
    """Per-replicate final and best-validation-epoch metrics, then the medians."""
    import numpy as np

    first = records[0]
    lines = [f"{model_title(first)}, aug {first['aug']}, {first['n_train']} training images "
             f"per replicate, {epochs_said(first)}, batch {first['batch_size']}, "
             f"lr {first['lr']:g}, device {first['device']}",
             f"{'':>14}{'----- last epoch (stopped) -----':>36}"
             f"{'---- best validation epoch ----':>42}",
             f"{'rep':>4}{'seed':>6}{'last':>5}{'val CE':>8}{'val acc':>9}{'test CE':>9}{'test acc':>9}"
             f"{'epoch':>8}{'val CE':>9}{'val acc':>9}{'test CE':>9}{'test acc':>9}{'seconds':>9}"]
    cols = ("val_loss", "val_acc", "test_loss", "test_acc")
    for r in records:
        f, b = r["final"], r["best"]
        lines.append(f"{r['replicate']:>4}{r['seed']:>6}{f['epoch']:>4}"
                     + "".join(f"{f[c]:>9.4f}" for c in cols) + f"{b['epoch']:>8}"
                     + "".join(f"{b[c]:>9.4f}" for c in cols) + f"{r['seconds']:>9.2f}")
    med = {f"{part}.{c}": float(np.median([r[part][c] for r in records]))
           for part in ("final", "best") for c in cols}
    lines.append(f"{'median':>10}{'':4}" + "".join(f"{med['final.' + c]:>9.4f}" for c in cols)
                 + f"{'':>8}" + "".join(f"{med['best.' + c]:>9.4f}" for c in cols)
                 + f"{float(np.median([r['seconds'] for r in records])):>9.2f}")
    lines.append("CE = cross-entropy; seconds = each vmap group's wall time / its replicates.")
    return "\n".join(lines)
