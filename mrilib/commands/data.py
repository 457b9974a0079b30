"""``python -m mrilib data``: what a data source holds, per class and split."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="per-class counts of a data source and its splits")
    p.add_argument("--source", default=None,
                   help="image folder, parquet, save_to_disk folder or hub id "
                        "(default: $MRILIB_DATA, else ../shared/data/alzheimer_mri beside the repo, else the hub dataset)")
    p.add_argument("--size", type=int, default=128, choices=(128, 256), help="pixels per side")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="skip unreadable or non-image files (listed) instead of stopping")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def summary(source=None, size: int = 128, on_error: str = "raise") -> dict:
    """Counts per class over all images and per split, size, fingerprint, skipped files."""
    from ..data import load_mri, split_mri

    data = load_mri(source, size=size, on_error=on_error)
    split = split_mri(data)
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
        "skipped": [{"path": p, "reason": r} for p, r in data.skipped],
    }


def run(args) -> int:
    info = summary(args.source, args.size, "skip" if args.skip_unreadable else "raise")
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"source       {info['source']}")
    print(f"fingerprint  {info['fingerprint']}   size {info['size']}x{info['size']}   "
          f"images {info['n_images']}")
    print(f"{'class':<22}{'all':>7}{'train':>7}{'val':>7}{'test':>7}")
    for c in info["classes"]:
        print(f"{c:<22}{info['counts'][c]:>7}{info['train_counts'][c]:>7}"
              f"{info['val_counts'][c]:>7}{info['test_counts'][c]:>7}")
    if info["skipped"]:
        print(f"skipped {len(info['skipped'])} file(s):")
        for s in info["skipped"]:
            print(f"  {s['path']}: {s['reason']}")
    print("Splits are slice-level (about 32 slices per subject, no subject ids): accuracy "
          "on them is optimistic compared with a subject-level split.")
    return 0
