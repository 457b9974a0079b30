"""``python -m mrilib data``: what a data source holds, per class and split, and its subjects."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="per-class counts of a data source, its splits and subjects")
    p.add_argument("--source", default=None,
                   help="image folder, parquet, save_to_disk folder or hub id "
                        "(default: $MRILIB_DATA, else ../shared/data/alzheimer_mri beside the repo, else the hub dataset)")
    p.add_argument("--size", type=int, default=128, choices=(128, 256), help="pixels per side")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="skip unreadable or non-image files (listed) instead of stopping")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _recovery(rec, classes) -> dict:
    sizes = rec.sizes.tolist()
    return {"found": rec.found, "reason": rec.reason, "n_groups": rec.n_groups,
            "sizes": {str(s): sizes.count(s) for s in sorted(set(sizes))},
            "class_groups": rec.by_class(classes), "purity": rec.purity,
            "pure_groups": rec.pure_groups,
            "settings": rec.settings}


def _subject_split(data) -> dict | None:
    """Subjects and slices per class and part of the subject split; None without subjects."""
    from ..splits import split_counts, split_mri
    from ..subjects import split_note, subject_counts

    split = split_mri(data, kind="subject")
    return {"subjects": subject_counts(data, split), "slices": split_counts(data, split),
            "note": split_note(data, split)}


def summary(source=None, size: int = 128, on_error: str = "raise") -> dict:
    """Counts per class over all images and per split, the recovered subjects and the
    subject split, size, fingerprint, skipped files."""
    from ..data import load_mri
    from ..splits import split_mri
    from ..subjects import subject_recovery

    data = load_mri(source, size=size, on_error=on_error)
    split = split_mri(data, kind="slice")
    rec = subject_recovery(data)
    return {
        "source": data.source,
        "fingerprint": data.fingerprint,
        "size": size,
        "n_images": len(data),
        "classes": list(data.classes),
        "counts": data.counts(),
        "train_counts": data.counts(split.train),
        "val_counts": data.counts(split.val),
        "test_counts": data.counts(split.test),
        "split_seed": split.seed,
        "subjects": _recovery(rec, data.classes),
        "subject_split": _subject_split(data) if rec.found else None,
        "skipped": [{"path": p, "reason": r} for p, r in data.skipped],
    }


def _print_subjects(info: dict) -> None:
    subj, split = info["subjects"], info["subject_split"]
    print(f"\nsubjects recovered from the images: {subj['reason']}")
    if split is None:
        print("Only the slice-level split is available for these data.")
        return
    print(f"\nsubject-level split (whole brains on one side; split='subject'): "
          f"subjects / slices")
    print(f"{'class':<22}{'brains':>8}{'train':>11}{'val':>11}{'test':>11}")
    for c in info["classes"]:
        parts = [f"{split['subjects'][p][c]}/{split['slices'][p][c]}"
                 for p in ("train", "val", "test")]
        print(f"{c:<22}{subj['class_groups'][c]:>8}" + "".join(f"{x:>11}" for x in parts))
    if split["note"]:
        print(f"note: {split['note']}")


def run(args) -> int:
    info = summary(args.source, args.size, "skip" if args.skip_unreadable else "raise")
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"source       {info['source']}")
    print(f"fingerprint  {info['fingerprint']}   size {info['size']}x{info['size']}   "
          f"images {info['n_images']}")
    print("\nslice-level split (the thesis's; split='slice'): slices, one brain's on both sides")
    print(f"{'class':<22}{'all':>7}{'train':>7}{'val':>7}{'test':>7}")
    for c in info["classes"]:
        print(f"{c:<22}{info['counts'][c]:>7}{info['train_counts'][c]:>7}"
              f"{info['val_counts'][c]:>7}{info['test_counts'][c]:>7}")
    _print_subjects(info)
    if info["skipped"]:
        print(f"skipped {len(info['skipped'])} file(s):")
        for s in info["skipped"]:
            print(f"  {s['path']}: {s['reason']}")
    print("\nAccuracy on a slice-level split is optimistic: its test slices come from brains "
          "seen in training.")
    return 0
