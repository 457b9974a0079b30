"""Subjects recovered from the images alone, and splits that keep every subject on one side.

The dataset has no subject ids, but it is 200 brains of 32 axial slices each, and the slices
of one brain look more alike than slices of two brains. :func:`recover_subjects` shrinks
every slice to a thumbnail, centres it and scales it to unit norm, links each slice to those
of its ``k`` most cosine-similar slices that have it among their own ``k`` (mutual nearest
neighbours), and returns the connected components. ``found`` says whether those groups look
like subjects (big enough, of similar size, one class each); on random images, shuffled
pixels or shuffled labels it is False and ``reason`` says what failed.
Reasoning and figures: docs/decisions.md, "Subjects and splits".
"""
from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import settings
from .data import DataError, MRIData, content_fingerprint, nearest_neighbours
from .splits import Split, stratified_sample
from .paths import CACHE, atomic_write_bytes

DEFAULTS = {
    "thumb": 32,            # pixels per thumbnail side: coarse enough to ignore noise and JPEG
                            # artefacts, fine enough to tell brains apart
    "k": 2,                 # neighbours per slice: in a stack each slice has one above, one below
    "min_slices": 8,        # images in the smallest group: fewer is a fragment, not a brain
                            # (a brain here is 32 slices; random images give mostly 1-7)
    "max_size_ratio": 2.0,  # largest / smallest group: one scan protocol gives every brain
                            # about as many slices; a bigger spread means merged or broken chains
    "min_purity": 1.0,      # share of images whose label is their group's: a brain has one
                            # diagnosis, so a mixed group is not a brain (or labels are wrong)
    "min_groups": 3,        # groups at least: fewer cannot fill test, validation and pool
    # The random-label check (random_label_check): the basic CNN on random brain labels.
    "random_labels": {
        "subjects": None,   # brains used (the first n by group number); None: all
        "test_frac": 0.2,   # the real split's test share
        # A fixed budget, no early stopping: memorisation is what it measures, and its
        # validation labels are random too. 10: the budget its numbers were measured at.
        "epochs": 10,
        "batch_size": None,
        "seeds": (0, 1, 2),  # training seeds: the spread over seeds is part of the answer
        "label_seed": 0,    # which random labels
    },
}
PRESETS = {
    # CPU, about 30 s: 16 brains, half of them held out (8 test brains, not 3); 6 epochs of
    # batch 16 is the least training at which the slice split learns the brains here
    "quick": {"random_labels": {"subjects": 16, "test_frac": 0.5, "epochs": 6,
                                "batch_size": 16, "seeds": (0,)}},
}
CHUNK = 1024        # rows of the similarity matrix at once: 1,024 x 6,400 floats = 26 MB
CACHE_FORMAT = 1    # bump when the cached layout changes
MIN_SUBJECTS = 3    # subjects a class needs to appear in test, validation and training pool
# OASIS-1 (Marcus et al. 2007): subjects per Clinical Dementia Rating, the likely source of
# the slices; its CDR 0 group is larger, and 100 of those subjects match Non_Demented here.
OASIS1_SUBJECTS = {"Mild_Demented": ("CDR 1", 28), "Moderate_Demented": ("CDR 2", 2),
                   "Non_Demented": ("CDR 0 (a subset)", 100),
                   "Very_Mild_Demented": ("CDR 0.5", 70)}
NEAR_DUPLICATE_RMS = 2.0  # gray levels on 32x32 thumbnails; the closest distinct slices here are ~4.5


@dataclass(frozen=True)
class SubjectRecovery:
    """Groups of slices found by :func:`recover_subjects`, and whether they look like subjects."""

    groups: torch.Tensor        # int64 [N]: the group of every image, numbered by first member
    sizes: torch.Tensor         # int64 [n_groups]: images per group
    n_groups: int
    class_groups: tuple[int, ...]  # groups per class id (a group's class: its majority label)
    purity: float               # share of images whose label is their group's majority label
    pure_groups: int            # groups whose images all have one label
    found: bool
    reason: str
    settings: dict

    def by_class(self, classes: Sequence[str]) -> dict[str, int]:
        """Groups per class name."""
        return dict(zip(classes, self.class_groups))


# ----------------------------------------------------------------------------- recovery

def _unit_thumbnails(images: torch.Tensor, side: int) -> torch.Tensor:
    """[N, side*side] thumbnails, each mean-centred and scaled to unit norm."""
    x = torch.nn.functional.adaptive_avg_pool2d(images.float(), side).flatten(1)
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)


def _nearest(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] indices of each row's k most cosine-similar other rows (chunked)."""
    out = []
    for start in range(0, len(x), CHUNK):
        sim = x[start:start + CHUNK] @ x.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -float("inf")  # a slice is not its own neighbour
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def _components(n: int, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """[n] the smallest node index of each node's connected component (symmetric edges)."""
    root = torch.arange(n)
    while True:
        new = root.scatter_reduce(0, src, root[dst], reduce="amin")
        new = new[new]  # pointer jumping: chains of 32 settle in a few rounds
        if torch.equal(new, root):
            return root
        root = new


def _mutual_groups(images: torch.Tensor, side: int, k: int) -> torch.Tensor:
    """[N] connected components of the mutual k-nearest-neighbour graph, numbered 0.. by
    their first member."""
    n = len(images)
    nb = _nearest(_unit_thumbnails(images, side), min(k, n - 1))
    src = torch.arange(n).repeat_interleave(nb.shape[1])
    dst = nb.flatten()
    mutual = (nb[dst] == src[:, None]).any(dim=1)
    root = _components(n, src[mutual], dst[mutual])
    return torch.unique(root, return_inverse=True)[1]


def _majority(groups: torch.Tensor, labels: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[n_groups] the most frequent label of every group (the smallest on ties)."""
    n_classes = int(labels.max()) + 1
    table = torch.zeros(n_groups * n_classes, dtype=torch.long)
    table.index_add_(0, groups * n_classes + labels, torch.ones_like(labels))
    return table.view(n_groups, n_classes).argmax(dim=1)


def recovery_settings(**overrides) -> dict:
    """The recovery's settings in force (the cache key), without the random-label check's."""
    cfg = settings(DEFAULTS, PRESETS, **overrides)
    cfg.pop("random_labels")
    return cfg


def _verdict(sizes: torch.Tensor, purity: float | None, cfg: dict) -> tuple[bool, str]:
    """(found, reason): whether groups of these sizes and purity look like subjects."""
    n, small, large = len(sizes), int(sizes.min()), int(sizes.max())
    of = f"{small}" if small == large else f"{small}-{large}"
    failed = []
    if n < cfg["min_groups"]:
        failed.append(f"only {n} group(s), need {cfg['min_groups']}")
    tiny = int((sizes < cfg["min_slices"]).sum())
    if tiny:
        failed.append(f"{tiny} of {n} groups hold fewer than {cfg['min_slices']} images")
    if large > cfg["max_size_ratio"] * small:
        failed.append(f"sizes {of} differ more than {cfg['max_size_ratio']:g}x")
    if purity is not None and purity < cfg["min_purity"]:
        failed.append(f"groups mix classes ({purity:.1%} of images carry their group's "
                      f"class, need {cfg['min_purity']:.0%})")
    head = f"{n} groups of {of} images"
    if failed:
        return False, f"no subject structure: {head}; " + "; ".join(failed)
    return True, head + ("" if purity is None else ", every group of one class")


def recover_subjects(images: torch.Tensor, labels: torch.Tensor | None = None,
                     ids: Sequence[str] | None = None, **overrides) -> SubjectRecovery:
    """Groups of slices that belong together (see the module docstring), and the verdict.

    Deterministic and independent of image order when ``ids`` (content ids) are given:
    images are compared in id order and groups numbered by their first member in it.
    ``overrides`` are :data:`DEFAULTS` keys.
    """
    cfg = recovery_settings(**overrides)
    if images.ndim != 4 or len(images) < 2:
        raise DataError(f"images of shape {tuple(images.shape)}: give [N, 1, H, W] with N >= 2")
    order = (torch.arange(len(images)) if ids is None else
             torch.from_numpy(np.argsort(np.asarray(ids), kind="stable")))
    in_order = _mutual_groups(images[order], cfg["thumb"], cfg["k"])
    groups = torch.empty_like(in_order)
    groups[order] = in_order
    sizes = torch.bincount(groups)
    purity, pure, class_groups = None, len(sizes), ()
    if labels is not None:
        major = _majority(groups, labels, len(sizes))
        agree = major[groups] == labels
        purity = float(agree.float().mean())
        pure = len(sizes) - len(torch.unique(groups[~agree]))
        class_groups = tuple(torch.bincount(major, minlength=int(labels.max()) + 1).tolist())
    found, reason = _verdict(sizes, purity, cfg)
    return SubjectRecovery(groups, sizes, len(sizes), class_groups,
                           1.0 if purity is None else purity, pure, found, reason, cfg)


def slice_order(images: torch.Tensor, side: int = DEFAULTS["thumb"]) -> torch.Tensor:
    """Indices of one subject's slices in stack order: a greedy walk to the most similar
    unvisited slice, from the slice whose second neighbour is least alike (a stack's end)."""
    x = _unit_thumbnails(images, side)
    sim = x @ x.T
    sim.fill_diagonal_(-float("inf"))
    order = [int(sim.topk(min(2, len(x) - 1), dim=1).values[:, -1].argmin())]
    for _ in range(len(x) - 1):
        sim[:, order[-1]] = -float("inf")
        order.append(int(sim[order[-1]].argmax()))
    return torch.tensor(order)


def _cache_key(data: MRIData, cfg: dict) -> str:
    """Everything the recovery depends on: which images with which labels, size, settings."""
    content = content_fingerprint(data.ids, data.labels.tolist(), data.classes)
    blob = json.dumps([content, list(data.images.shape[-2:]), cfg, CACHE_FORMAT], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def subject_recovery(data: MRIData, **overrides) -> SubjectRecovery:
    """:func:`recover_subjects` of ``data``, cached under ``cache/subjects/``."""
    cfg = recovery_settings(**overrides)
    path = CACHE / "subjects" / f"{_cache_key(data, cfg)}.pt"
    order = torch.from_numpy(np.argsort(np.asarray(data.ids), kind="stable"))
    cached = _cached_recovery(path, order, cfg)
    if cached is not None:
        return cached
    rec = recover_subjects(data.images, data.labels, data.ids, **overrides)
    buf = io.BytesIO()
    torch.save({"groups": rec.groups[order], "sizes": rec.sizes,
                "class_groups": list(rec.class_groups), "purity": rec.purity,
                "pure_groups": rec.pure_groups, "found": rec.found, "reason": rec.reason}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return rec


def _cached_recovery(path, order: torch.Tensor, cfg: dict) -> SubjectRecovery | None:
    """The recovery stored at ``path``; None when there is none or it is unreadable (it is
    derived: recomputed in seconds, with a warning)."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        groups = torch.empty_like(blob["groups"])
        groups[order] = blob["groups"]  # stored in id order: any load order reads it back
        return SubjectRecovery(groups, blob["sizes"], len(blob["sizes"]),
                               tuple(blob["class_groups"]), blob["purity"],
                               blob["pure_groups"], blob["found"], blob["reason"], cfg)
    except Exception as err:  # truncated, not a torch file, keys missing: all mean rebuild
        warnings.warn(f"subject-recovery cache entry {path} is unreadable "
                      f"({type(err).__name__}); recovering the subjects again", stacklevel=3)
        return None


def subject_ids(data: MRIData, **overrides) -> torch.Tensor:
    """[N] the recovered subject of every image of ``data`` (cached), or a DataError."""
    rec = subject_recovery(data, **overrides)
    if not rec.found:
        raise DataError(f"cannot recover subjects from {data.source}: {rec.reason}. "
                        f"Only split='slice' is available for such data (or set "
                        f"MRIData.subjects from known subject ids).")
    return rec.groups


# ----------------------------------------------------------------------------- splits

def _checked_groups(data: MRIData) -> torch.Tensor:
    """The subject of every image (given or recovered), checked to hold one class each."""
    groups = data.subjects if data.subjects is not None else subject_ids(data)
    groups = torch.as_tensor(groups, dtype=torch.long)
    if groups.shape != data.labels.shape:
        raise DataError(f"subjects has shape {tuple(groups.shape)} but there are {len(data)} "
                        f"images; give one subject id per image.")
    major = _majority(groups, data.labels, int(groups.max()) + 1)
    mixed = torch.unique(groups[major[groups] != data.labels])
    if len(mixed):
        raise DataError(f"subject {int(mixed[0])} (and {len(mixed) - 1} more) holds slices of "
                        f"several classes; a subject split needs one class per subject.")
    return groups


def split_by_subject(data: MRIData, test_frac: float, val_frac: float, seed: int) -> Split:
    """Whole subjects, stratified by class: ``test_frac`` test, ``val_frac`` of the rest
    validation, the rest the training pool. A class keeps one subject in the pool before
    test, and one in test before validation (:data:`MIN_SUBJECTS`)."""
    groups = _checked_groups(data)
    everything = torch.arange(len(data))
    test = stratified_sample(data.labels, test_frac, seed, ids=data.ids, groups=groups, keep=1)
    rest = everything[~torch.isin(everything, test)]
    val = stratified_sample(data.labels, val_frac, seed + 1, pool=rest, ids=data.ids,
                            groups=groups, keep=1)
    split = Split(train=rest[~torch.isin(rest, val)], val=val, test=test, seed=seed,
                  kind="subject", groups=groups)
    check_disjoint(split)
    return split


def check_disjoint(split: Split) -> None:
    """A ValueError if a subject of a subject split has images in two of its parts."""
    if split.groups is None:
        return
    parts = {name: set(split.groups[getattr(split, name)].tolist())
             for name in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = parts[a] & parts[b]
        if shared:
            raise ValueError(f"subject {min(shared)} has images in both {a} and {b}: the split "
                             f"leaks subjects; rebuild it with split_mri(data, kind='subject')")


def subject_counts(data: MRIData, split: Split) -> dict[str, dict[str, int]]:
    """Subjects per class in each part of a subject split."""
    if split.groups is None:
        raise ValueError("subject_counts needs a subject split (split_mri(data, kind='subject'))")
    out = {}
    for name in ("train", "val", "test"):
        index = getattr(split, name)
        first = np.unique(split.groups[index].numpy(), return_index=True)[1]
        out[name] = data.counts(index[first])  # one image per subject
    return out


def _brains(n: int) -> str:
    return f"{n} brain" + ("" if n == 1 else "s")


def split_note(data: MRIData, split: Split) -> str | None:
    """One line for every table of a subject split that holds a class of few subjects
    (fewer than :data:`MIN_SUBJECTS`); None when there is none or the split is slice-level."""
    if split.kind != "subject":
        return None
    counts = subject_counts(data, split)
    notes = []
    for c in data.classes:
        t, v, p = (counts[part][c] for part in ("test", "val", "train"))
        if t + v + p < MIN_SUBJECTS:
            scores = {0: "no test score", 1: "its test scores rest on one brain"}.get(
                t, f"its test scores rest on {t} brains")
            notes.append(f"{c} is {_brains(t + v + p)}: {t} in test, {p} in the training pool, "
                         f"{v or 'none'} in validation ({scores})")
    return "; ".join(notes) or None


# ----------------------------------------------------------------------------- duplicates

def duplicate_report(data: MRIData, split: Split, threshold: float = NEAR_DUPLICATE_RMS) -> dict:
    """Exact (same content id) and near (thumbnail RMS < ``threshold``) duplicates.

    Within the training pool and between the test/validation splits and the training
    pool, plus the nearest-neighbour distances that show how close held-out slices sit
    to training slices (adjacent slices of one subject are the usual reason).
    """
    part_of = {}
    for name in ("train", "val", "test"):
        for i in getattr(split, name).tolist():
            part_of[i] = name
    by_id: dict[str, list[int]] = {}
    for i, uid in enumerate(data.ids):
        by_id.setdefault(uid, []).append(i)
    exact = [sorted(ix) for ix in by_id.values() if len(ix) > 1]
    exact_across = [g for g in exact if len({part_of[i] for i in g}) > 1]

    train_imgs = data.images[split.train]
    within_d, within_i = nearest_neighbours(train_imgs, train_imgs, same=True)
    held = torch.cat([split.val, split.test])
    across_d, across_i = nearest_neighbours(data.images[held], train_imgs)
    return {
        "threshold": threshold,
        "exact_groups": exact,
        "exact_across_splits": exact_across,
        "near_within_train": int((within_d < threshold).sum()),
        "near_heldout_to_train": int((across_d < threshold).sum()),
        "nn_within_train": within_d,
        "nn_heldout_to_train": across_d,
        # closest held-out/train pairs as global indices, nearest first
        "closest_pairs": [(int(held[j]), int(split.train[across_i[j]]), float(across_d[j]))
                          for j in torch.argsort(across_d)[:8].tolist()],
    }


# ----------------------------------------------------------------------------- random labels

def random_subject_labels(data: MRIData, seed: int) -> MRIData:
    """``data`` with every subject given a random class, equal shares per class (all its
    slices alike), so that no image carries information on its label."""
    groups = torch.unique(_checked_groups(data), return_inverse=True)[1]
    balanced = np.arange(int(groups.max()) + 1) % len(data.classes)
    new = torch.from_numpy(np.random.default_rng(seed).permutation(balanced)).long()[groups]
    return MRIData(data.images, new, data.classes, data.ids, data.source,
                   content_fingerprint(data.ids, new.tolist(), data.classes),
                   list(data.skipped), subjects=groups)


def random_label_check(data: MRIData, kind: str, **overrides) -> dict:
    """Test accuracy of the basic CNN trained on random subject labels (see
    :func:`random_subject_labels`) of ``kind``'s training pool, one per seed.

    ``overrides`` are keys of ``DEFAULTS["random_labels"]``. Chance is 0.25 by accuracy
    and by balanced accuracy alike (equal class shares). A split that keeps subjects apart
    scores at chance; one that does not scores above it, because a test slice's brain was
    seen in training with that same random label.
    """
    from .splits import split_mri
    from .train import train_replicates

    unknown = set(overrides) - set(DEFAULTS["random_labels"])
    if unknown:
        raise TypeError(f"unknown setting(s) {sorted(unknown)}; known: "
                        f"{sorted(DEFAULTS['random_labels'])}")
    cfg = settings(DEFAULTS, PRESETS, random_labels=overrides)["random_labels"]
    data = replace(data, subjects=_checked_groups(data))
    if cfg["subjects"] is not None:
        data = data.subset(torch.nonzero(data.subjects < cfg["subjects"]).flatten())
    shuffled = random_subject_labels(data, cfg["label_seed"])
    split = split_mri(shuffled, kind=kind, test_frac=cfg["test_frac"])
    seeds = [int(s) for s in cfg["seeds"]]
    train = random_label_training(cfg)
    records = train_replicates("basic_cnn", shuffled.images, shuffled.labels,
                               split.train.repeat(len(seeds), 1),
                               *[(shuffled.images[i], shuffled.labels[i])
                                 for i in (split.val, split.test)],
                               seeds=seeds, test_every_epoch=False, **train)
    conf = torch.tensor([r["final"]["test_confusion"] for r in records], dtype=torch.float)
    present = conf.sum(dim=2) > 0
    recall = conf.diagonal(dim1=1, dim2=2) / conf.sum(dim=2).clamp_min(1)
    subjects = [set(shuffled.subjects[i].tolist()) for i in (split.train, split.test)]
    return {"kind": kind, **cfg, "seeds": seeds, "n_train": len(split.train),
            "n_test": len(split.test), "test_subjects": len(subjects[1]),
            "test_subjects_in_train": len(subjects[0] & subjects[1]),
            "chance": 1 / len(data.classes), "test_acc": [r["final"]["test_acc"] for r in records],
            "balanced_acc": ((recall * present).sum(1) / present.sum(1)).tolist()}


def random_label_training(cfg: dict) -> dict:
    """The basic CNN's overrides for the random-label check ``cfg``: its fixed epochs."""
    return {"patience": "off", **{k: cfg[k] for k in ("epochs", "batch_size")
                                  if cfg[k] is not None}}


def kept_random_label_check(data: MRIData, kind: str, path=None, **overrides) -> dict:
    """:func:`random_label_check`, read from ``path`` when a result of the same data, split,
    settings and training design is kept there, else run and kept there.

    ``path`` defaults to the preset's results folder (``results/random_labels.json`` in the
    thesis preset, committed): without it a CPU would retrain the check (most of an hour)
    each time chapter 1 runs. The result carries ``"key"``.
    """
    from .paths import results_dir
    from .train import design_settings

    path = Path(path) if path is not None else results_dir() / "random_labels.json"
    cfg = settings(DEFAULTS, PRESETS, random_labels=overrides)["random_labels"]
    blob = json.dumps({"data": data.fingerprint, "kind": kind, "settings": cfg,
                       "train": design_settings("basic_cnn", **random_label_training(cfg))},
                      sort_keys=True, default=list)
    key = hashlib.sha1(blob.encode()).hexdigest()[:12]
    kept = json.loads(path.read_text()) if path.exists() else {}
    if key not in kept:
        from .provenance import provenance

        kept[key] = {**random_label_check(data, kind, **overrides), "key": key,
                     **provenance(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime())}
        atomic_write_bytes(path, (json.dumps(kept, indent=1, sort_keys=True) + "\n").encode())
    return kept[key]
