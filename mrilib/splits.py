"""Split the slices and sample them as the thesis does: by slice, or by whole brain.

Splits and samples are drawn over images sorted by their content hash, so the same seed
gives the same split on every machine and whatever order the source lists its files in.
The dataset holds 32 axial slices of each of 200 brains and no subject ids. A slice-level
split (``kind="slice"``, the thesis's) puts slices of one brain on both sides and is
optimistic; ``kind="subject"`` keeps every brain on one side, the brains recovered from
the images by :mod:`mrilib.subjects`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .config import settings
from .data import DataError, MRIData

DEFAULTS = {
    "test_frac": 0.2,     # of all images: 1,280 of 6,400, fixed for every experiment
    "val_frac": 0.1,      # of the rest: 512 images for early stopping / model selection
    "split_seed": 2024,   # one fixed split; repeats vary the training sample, not the test set
    "split": "slice",     # "slice" (the thesis's) or "subject" (whole brains on one side)
}
SPLIT_KINDS = ("slice", "subject")
PRESETS: dict = {}
# The default split kind only: a grid cell names its own, so it is outside a run's design.
RUN_ONLY = ("split",)


@dataclass(frozen=True)
class Split:
    """Indices into an :class:`MRIData`: training pool, validation and test."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    seed: int
    kind: str = "slice"                  # "slice" or "subject"
    groups: torch.Tensor | None = None   # subject of every image (subject splits only)


def design_settings(**overrides) -> dict:
    """What the splits of a run depend on: image size, split settings, subject recovery."""
    from .config import design_view
    from .data import DEFAULTS as DATA
    from .subjects import recovery_settings

    return {"size": DATA["size"],
            **design_view(settings(DEFAULTS, PRESETS, **overrides), RUN_ONLY),
            "subjects": recovery_settings()}


def _order_by_id(ids: Sequence[str], index: np.ndarray) -> np.ndarray:
    """``index`` sorted by content id, so splits do not depend on the source's file order."""
    return index[np.argsort([ids[i] for i in index], kind="stable")]


def _per_class_counts(class_sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Largest-remainder allocation of round(fraction * total) across classes, >= 1 each."""
    exact = class_sizes * fraction
    counts = np.floor(exact).astype(int)
    short = int(round(fraction * class_sizes.sum())) - counts.sum()
    for c in np.argsort(-(exact - counts), kind="stable")[:max(short, 0)]:
        counts[c] += 1
    if fraction > 0:  # a stratified sample with a class missing is not stratified
        counts = np.maximum(counts, np.minimum(1, class_sizes))
    return np.minimum(counts, class_sizes)


def check_nested(class_sizes, fractions, classes: Sequence[str] | None = None) -> None:
    """A ValueError unless every class's sample count rises (or stays) with the fraction.

    :func:`stratified_sample` takes the first n_c images of one permutation per class
    and seed, so the sample of a smaller fraction lies inside that of a larger one
    exactly when no n_c falls as the fraction grows. Largest-remainder rounding does not
    promise that for every set of class sizes (sizes 4, 7, 34 give 2, 2, 10 images at
    30% but 1, 3, 14 at 40%); for this dataset's pool it holds at the grid's fractions.
    Generators that serve larger fractions rely on it (see :mod:`mrilib.grid`).
    """
    sizes = np.asarray(class_sizes, dtype=int)
    names = list(classes) if classes is not None else [str(c) for c in range(len(sizes))]
    fractions = sorted(float(f) for f in fractions)
    for small, large in zip(fractions, fractions[1:]):
        a, b = _per_class_counts(sizes, small), _per_class_counts(sizes, large)
        fell = np.flatnonzero(b < a)
        if len(fell):
            c = fell[0]
            raise ValueError(f"class {names[c]} ({sizes[c]} images) gets {a[c]} at fraction "
                             f"{small:g} but {b[c]} at {large:g}: the samples would not be "
                             f"nested, and a generator of the smaller sample would leak into "
                             f"the larger one's cells. Use other fractions, or "
                             f"generator_fraction=None (one generator set per fraction)")


def _units(labels: np.ndarray, pool: np.ndarray, groups: torch.Tensor | None):
    """(sampling units in pool order, their labels): images, or groups by first member."""
    if groups is None:
        return pool, labels[pool]
    g = groups.numpy()[pool]
    units, first = np.unique(g, return_index=True)
    units = units[np.argsort(first, kind="stable")]
    unit_label = np.full(int(g.max()) + 1, -1)
    unit_label[g] = labels[pool]
    if np.any(unit_label[g] != labels[pool]):
        raise DataError("groups holds a group whose images have several classes; sample "
                        "whole groups only when each group has one class.")
    return units, unit_label[units]


def stratified_sample(labels: torch.Tensor, fraction: float, seed: int,
                      pool: torch.Tensor | None = None, ids: Sequence[str] | None = None,
                      groups: torch.Tensor | None = None, keep: int = 0) -> torch.Tensor:
    """Indices of a stratified random ``fraction`` of ``pool`` (all indices when None).

    Every class keeps its share (rounded by largest remainder, at least one unit per
    class). Pass ``ids`` to make the draw independent of the order images were loaded in.
    With ``groups`` (a group per image) the units are whole groups, ordered by their
    smallest id, and the indices are their images in ``pool``. ``keep`` units of every
    class stay out of the sample (a split keeps one subject per class for the next part).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: give a fraction in (0, 1], e.g. 0.3 for 30%.")
    labels_np = labels.numpy()
    pool_np = np.arange(len(labels_np)) if pool is None else np.asarray(pool, dtype=np.int64)
    if ids is not None:
        pool_np = _order_by_id(ids, pool_np)
    units, unit_labels = _units(labels_np, pool_np, groups)
    rng = np.random.default_rng(seed)
    members = [units[unit_labels == c] for c in np.unique(unit_labels)]
    sizes = np.array([len(m) for m in members])
    counts = np.minimum(_per_class_counts(sizes, fraction), np.maximum(sizes - keep, 0))
    chosen = np.concatenate([rng.permutation(m)[:k] for m, k in zip(members, counts)])
    if groups is not None:
        chosen = pool_np[np.isin(groups.numpy()[pool_np], chosen)]
    return torch.from_numpy(np.sort(chosen)).long()


def pool_sample(data: MRIData, split: Split, fraction: float, seed: int) -> torch.Tensor:
    """Indices of the stratified ``fraction`` of ``split``'s training pool: whole subjects
    for a subject split, slices for a slice split (nested across fractions for one seed)."""
    return stratified_sample(data.labels, fraction, seed, pool=split.train, ids=data.ids,
                             groups=split.groups)


def pool_class_sizes(data: MRIData, split: Split) -> np.ndarray:
    """Sampling units (subjects, or slices) per class in the training pool, for
    :func:`check_nested`."""
    index = split.train
    if split.groups is not None:  # one image per subject
        index = index[np.unique(split.groups[index].numpy(), return_index=True)[1]]
    return np.array(list(data.counts(index).values()))


def split_mri(data: MRIData, kind: str | None = None, test_frac: float | None = None,
              val_frac: float | None = None, seed: int | None = None) -> Split:
    """The fixed stratified test split, a validation split from the rest, and the pool.

    Defaults come from :data:`DEFAULTS` (slice-level; 20% test, 10% of the rest for
    validation). ``kind="subject"`` draws whole subjects (:mod:`mrilib.subjects`).
    """
    cfg = settings(DEFAULTS, PRESETS, **{k: v for k, v in
                                         dict(test_frac=test_frac, val_frac=val_frac,
                                              split_seed=seed, split=kind).items()
                                         if v is not None})
    if cfg["split"] not in SPLIT_KINDS:
        raise ValueError(f"split kind {cfg['split']!r}; use one of {', '.join(SPLIT_KINDS)}")
    if cfg["split"] == "subject":
        from .subjects import split_by_subject
        return split_by_subject(data, cfg["test_frac"], cfg["val_frac"], cfg["split_seed"])
    everything = torch.arange(len(data))
    test = stratified_sample(data.labels, cfg["test_frac"], cfg["split_seed"], ids=data.ids)
    rest = everything[~torch.isin(everything, test)]
    val = stratified_sample(data.labels, cfg["val_frac"], cfg["split_seed"] + 1, pool=rest,
                            ids=data.ids)
    train = rest[~torch.isin(rest, val)]
    return Split(train=train, val=val, test=test, seed=cfg["split_seed"])


def split_counts(data: MRIData, split: Split) -> dict[str, dict[str, int]]:
    """Images per class in each part of ``split`` (the thesis's Table 2.1 and more)."""
    return {name: data.counts(getattr(split, name)) for name in ("train", "val", "test")}
