"""The cells of the chapter-7 grid: which configurations a preset trains, in which order.

A **cell** is one training configuration: (split, model, augmentation policy, synthetic
policy, real fraction, leakage mode). Splits: ``slice`` (the thesis's: slices of one brain
on both sides, so its numbers are optimistic) and ``subject`` (whole brains on one side;
:mod:`mrilib.subjects`). Synthetic policies (``X`` = real fraction of the pool):

* ``none``       X real, no synthetic images.
* ``fill``       X real + synthetic up to the full pool size (the thesis's "30% real + 70%
  synthetic"; at X = 0.8 it is the table's "80% real / 20% synthetic" row, ``"80+20"``).
* ``100+20mod``  the whole pool + 20% synthetic images of Moderate_Demented only.

Leakage modes (``leakage``): ``none`` for real-only cells, ``sample`` (leak-free: repeat r's generator learned only from the real
images repeat r's classifier sees) and ``leaky`` (the ablation: generators trained on the
whole pool). The sampling design is described in :mod:`mrilib.grid`.

Cells run in tiers, the most important first: 1, the basic CNN's thesis cells on both
splits; 2, ResNet-18's and ViT-Tiny's core cells on the subject split; 3, the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..config import settings

MODELS = ("basic_cnn", "resnet18", "vit_tiny")       # thesis ch. 5
SPLITS = ("slice", "subject")                         # mrilib.splits.split_mri kinds
AUGS = ("none", "hflip", "autoaugment")               # thesis ch. 6.1, 6.2
LEAKAGE = ("none", "sample", "leaky")  # what a cell's generators learned from
FRACTIONS = tuple(round(0.3 + 0.1 * i, 1) for i in range(8))  # 0.3 .. 1.0, thesis 7.2
MODERATE = "Moderate_Demented"


@dataclass(frozen=True)
class SyntheticPolicy:
    """How many synthetic images a cell adds, of which classes, at which real fraction."""

    label: str                      # the thesis's wording, for tables
    fraction: float | None          # synthetic images / pool size; None: top up to the pool size
    fixed_real: float | None        # the real fraction the policy implies, if any
    classes: tuple[str, ...] | str  # "all" or the class names that get synthetic images

    def synthetic_fraction(self, real_fraction: float) -> float:
        """Synthetic images as a fraction of the full training-pool size."""
        return round(1.0 - real_fraction, 4) if self.fraction is None else self.fraction


SYNTHETIC = {
    "none": SyntheticPolicy("real only", 0.0, None, "all"),
    "fill": SyntheticPolicy("X% real + (100-X)% synthetic", None, None, "all"),
    "100+20mod": SyntheticPolicy("100% real + 20% synthetic (Moderate only)", 0.2, 1.0,
                                 (MODERATE,)),
}
ALIASES = {"80+20": ("fill", 0.8)}  # the table's 80/20 row is the fill cell at 80% real

DEFAULTS = {
    "models": list(MODELS),
    "splits": list(SPLITS),
    "augs": list(AUGS),                 # every policy for the table and Figure 7.2
    "sweep_augs": list(AUGS),           # policies for which the 30..100% sweep runs
    "fractions": list(FRACTIONS),       # real fractions of the training pool
    "leakage": [                        # cells that also run with the leaky generator
        {"model": m, "aug": "none", "real_fraction": 0.3} for m in MODELS],
    "moderate_only": True,              # run the 100% + 20% Moderate-only row
    "tier": None,                       # run the cells of tiers 1..tier only; None: all
    "cells": None,                      # explicit cell list: replaces the factorial above
    "repeats": 20,                      # thesis 7.1: every combination trained 20 times
    # G: independent real samples per fraction, each with its own generator (repeat r uses
    # sample and generator r mod G).
    "samples": 5,
    # Real fraction whose sample g generator g learns from; it serves every synthetic cell
    # at this fraction or above (samples are nested: mrilib.grid). None: one generator set
    # per cell fraction (G x 8 generators instead of G).
    "generator_fraction": 0.3,
    # "per_generator": one variation draw per generator g, shared by the repeats that use it
    # (r = g, g + G, ...: they already share its sample and weights); "per_repeat": each
    # repeat draws its own (u_r = synthetic + r), five times the sampling.
    "variations": "per_generator",
    # training seed t_r = train + r; variation seed synthetic + g (or + r, per_repeat);
    # "data": the data_fraction subset
    "seeds": {"train": 1000, "synthetic": 0, "data": 0},
    # Share of the 6,400 slices the runner loads (stratified, before the split); 1.0 = all.
    "data_fraction": 1.0,
    "backend": "local",                 # synthetic-image backend (mrilib.synthetic.BACKENDS)
    # Overrides passed to train_replicates: the test split only at each run's final and
    # best-validation epochs, all that rows and figures use (docs/decisions.md#grid).
    "train": {"test_every_epoch": False},
    # {model: True | PATH}: start from ImageNet weights (timm, hub or file), as the thesis
    # fine-tuned; empty: from scratch. A design change: such runs go to <results>/imagenet.
    "imagenet": {},
}
# Which cells a grid holds and how many repeats, not what any one run trains: outside the
# design hash (mrilib.grid.design). "train" and "imagenet" enter it as training settings.
RUN_ONLY = ("models", "splits", "augs", "sweep_augs", "fractions", "leakage", "moderate_only",
            "tier", "cells", "repeats")
IMAGENET_RESULTS = "imagenet"
PRESETS = {
    # A few cells touching every code path (both leakage modes, every synthetic
    # policy, two augmentations); tiny epochs come from mrilib.train's quick preset.
    "quick": {
        "cells": [
            {"split": "slice", "model": "basic_cnn", "synthetic": "none", "real_fraction": 0.3},
            {"split": "slice", "model": "basic_cnn", "synthetic": "none", "real_fraction": 1.0},
            {"split": "slice", "model": "basic_cnn", "synthetic": "fill", "real_fraction": 0.3},
            {"split": "slice", "model": "basic_cnn", "synthetic": "fill", "real_fraction": 0.3,
             "leakage": "leaky"},
            {"split": "slice", "model": "basic_cnn", "synthetic": "100+20mod"},
            {"split": "slice", "model": "basic_cnn", "aug": "hflip", "real_fraction": 0.3},
            {"split": "subject", "model": "basic_cnn", "synthetic": "none", "real_fraction": 0.3},
            {"split": "subject", "model": "basic_cnn", "synthetic": "fill", "real_fraction": 0.3},
        ],
        "repeats": 2,
        "samples": 2,
        # A stratified 10% of the brains (20 of 200, 640 slices): a cell then takes seconds
        # on a 2-core CPU instead of minutes; numbers are for testing the code only.
        "data_fraction": 0.1,
    },
    # The headline cell (30% real + 70% synthetic, basic CNN), e.g. for notebook 04.
    "cell": {
        "cells": [{"split": "subject", "model": "basic_cnn", "aug": "none", "synthetic": "fill",
                   "real_fraction": 0.3}],
        "repeats": 5,
    },
}


# ----------------------------------------------------------------------------- cells

@dataclass(frozen=True)
class Cell:
    """One configuration of the grid; ``key`` names it in results and logs."""

    split: str
    model: str
    aug: str
    synthetic: str
    real_fraction: float
    leakage: str

    @property
    def key(self) -> str:
        return (f"{self.split}/{self.model}/{self.aug}/{self.synthetic}/"
                f"{self.real_fraction:g}/{self.leakage}")

    @property
    def synthetic_fraction(self) -> float:
        return SYNTHETIC[self.synthetic].synthetic_fraction(self.real_fraction)

    @property
    def synthetic_classes(self) -> tuple[str, ...] | str:
        return SYNTHETIC[self.synthetic].classes


def make_cell(model: str, aug: str = "none", synthetic: str = "none",
              real_fraction: float | None = None, leakage: str | None = None,
              split: str = "subject") -> Cell:
    """A validated :class:`Cell`; names and fractions are checked, aliases resolved."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; the grid has {', '.join(MODELS)}")
    if aug not in AUGS:
        raise ValueError(f"unknown augmentation {aug!r}; choose one of {', '.join(AUGS)}")
    if synthetic in ALIASES:
        synthetic, implied = ALIASES[synthetic]
        real_fraction = implied if real_fraction is None else real_fraction
        if not math.isclose(real_fraction, implied):
            raise ValueError(f"'80+20' means 80% real; got real_fraction={real_fraction}")
    if synthetic not in SYNTHETIC:
        raise ValueError(f"unknown synthetic policy {synthetic!r}; choose one of "
                         f"{', '.join([*SYNTHETIC, *ALIASES])}")
    real_fraction = _checked_fraction(synthetic, real_fraction)
    leakage = leakage or ("none" if synthetic == "none" else "sample")
    if leakage not in LEAKAGE or (leakage == "none") != (synthetic == "none"):
        raise ValueError(f"leakage={leakage!r} does not fit synthetic={synthetic!r}: "
                         f"real-only cells take 'none', synthetic ones 'sample' or 'leaky'")
    return Cell(split, model, aug, synthetic, real_fraction, leakage)


def _checked_fraction(synthetic: str, real_fraction: float | None) -> float:
    fixed = SYNTHETIC[synthetic].fixed_real
    if real_fraction is None:
        if fixed is None:
            raise ValueError(f"synthetic policy {synthetic!r} needs a real_fraction, e.g. 0.3")
        return fixed
    real_fraction = round(float(real_fraction), 4)
    if fixed is not None and not math.isclose(real_fraction, fixed):
        raise ValueError(f"synthetic policy {synthetic!r} implies real_fraction={fixed}, "
                         f"got {real_fraction}")
    if not 0 < real_fraction <= 1:
        raise ValueError(f"real_fraction={real_fraction}: give a fraction in (0, 1], e.g. 0.3")
    if synthetic == "fill" and real_fraction >= 1:
        raise ValueError("'fill' at 100% real adds no synthetic images; use synthetic='none'")
    return real_fraction


def grid_cells(preset: str | None = None, **overrides) -> list[Cell]:
    """The cells of ``preset`` in the order they run: tier by tier, the most important first.

    Tier 1, the basic CNN on the slice split (the thesis replicated), then on the subject
    split (its question asked honestly): the headline cells (30% and 100% real, 30% real +
    70% synthetic, the leakage ablation), the results table, Figure 7.2 and the sweep
    without augmentation. Tier 2: ResNet-18's and ViT-Tiny's headline cells and results
    table on the subject split. Tier 3: everything else. ``tier`` keeps tiers 1..tier.
    """
    return list(cell_tiers(preset, **overrides))


def cell_tiers(preset: str | None = None, **overrides) -> dict[Cell, int]:
    """Each cell of ``preset``'s grid, in running order, with its tier (1 for an explicit
    ``cells`` list)."""
    cfg = settings(DEFAULTS, PRESETS, preset, **overrides)
    if cfg["cells"]:  # an explicit list, of the models and splits in force (grid --imagenet,
        cells = (make_cell(**c) for c in cfg["cells"])  # grid --split)
        return {c: 1 for c in cells if c.model in cfg["models"] and c.split in cfg["splits"]}
    tiers: dict[Cell, int] = {}
    for tier, cells in enumerate((_tier1(cfg), _tier2(cfg), _tier3(cfg)), start=1):
        for cell in cells:
            tiers.setdefault(cell, tier)
    return {c: t for c, t in tiers.items() if cfg["tier"] is None or t <= cfg["tier"]}


def _tier1(cfg: dict) -> list[Cell]:
    if "basic_cnn" not in cfg["models"]:
        return []
    return [c for split in cfg["splits"] for c in _core_cells("basic_cnn", split, cfg)]


def _tier2(cfg: dict) -> list[Cell]:
    if "subject" not in cfg["splits"]:
        return []
    return [c for model in cfg["models"] if model != "basic_cnn"
            for c in _headline_cells(model, "subject", cfg, leaky=False)
            + _table_cells(model, "subject", cfg)]


def _tier3(cfg: dict) -> list[Cell]:
    cells = [c for model in cfg["models"] for split in cfg["splits"]
             for c in _core_cells(model, split, cfg)]
    return cells + [c for model in cfg["models"] for split in cfg["splits"]
                    for aug in cfg["sweep_augs"]
                    for c in _sweep_cells(model, split, aug, cfg["fractions"])]


def _headline_cells(model: str, split: str, cfg: dict, leaky: bool = True) -> list[Cell]:
    cells = [make_cell(model, "none", "none", 0.3, split=split),
             make_cell(model, "none", "none", 1.0, split=split),
             make_cell(model, "none", "fill", 0.3, split=split)]
    return cells + [make_cell(model, c.get("aug", "none"), "fill", c["real_fraction"], "leaky",
                              split=split)
                    for c in cfg["leakage"] if leaky and c["model"] == model]


def _table_cells(model: str, split: str, cfg: dict) -> list[Cell]:
    """The results table's rows under each policy: 100/0, 80/20, 100/20 Moderate only."""
    cells = []
    for aug in cfg["augs"]:
        cells += [make_cell(model, aug, "none", 1.0, split=split),
                  make_cell(model, aug, "80+20", split=split)]
        if cfg["moderate_only"]:
            cells.append(make_cell(model, aug, "100+20mod", split=split))
    return cells


def _core_cells(model: str, split: str, cfg: dict) -> list[Cell]:
    cells = _headline_cells(model, split, cfg) + _table_cells(model, split, cfg)
    for aug in cfg["augs"]:  # Figure 7.2
        cells += [make_cell(model, aug, "none", 0.3, split=split),
                  make_cell(model, aug, "fill", 0.3, split=split)]
    if "none" in cfg["sweep_augs"]:
        cells += _sweep_cells(model, split, "none", cfg["fractions"])
    return cells


def _sweep_cells(model: str, split: str, aug: str, fractions: Sequence[float]) -> list[Cell]:
    cells = []
    for x in fractions:
        cells.append(make_cell(model, aug, "none", x, split=split))
        if x < 1:
            cells.append(make_cell(model, aug, "fill", x, split=split))
    return cells
