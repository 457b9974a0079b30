"""The cells of the chapter-7 grid: which configurations a preset trains, in which order.

A **cell** is one training configuration: (model, augmentation policy, synthetic policy,
real fraction, leakage mode). Synthetic policies (``X`` = real fraction of the pool):

* ``none``       X real, no synthetic images.
* ``fill``       X real + synthetic up to the full pool size (the thesis's "30% real + 70%
  synthetic"; at X = 0.8 it is the table's "80% real / 20% synthetic" row, ``"80+20"``).
* ``100+20mod``  the whole pool + 20% synthetic images of Moderate_Demented only.

Leakage modes (``leakage``): ``none`` for real-only cells, ``sample`` (leak-free: repeat r's generator learned only from the real
images repeat r's classifier sees) and ``leaky`` (the ablation: generators trained on the
whole pool). The sampling design is described in :mod:`mrilib.grid`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..config import settings

MODELS = ("basic_cnn", "resnet18", "vit_tiny")       # thesis ch. 5
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
    "augs": list(AUGS),                 # every policy for the table and Figure 7.2
    "sweep_augs": list(AUGS),           # policies for which the 30..100% sweep runs
    "fractions": list(FRACTIONS),       # real fractions of the training pool
    "leakage": [                        # cells that also run with the leaky generator
        {"model": m, "aug": "none", "real_fraction": 0.3} for m in MODELS],
    "moderate_only": True,              # run the 100% + 20% Moderate-only row
    "cells": None,                      # explicit cell list: replaces the factorial above
    "repeats": 20,                      # thesis 7.1: every combination trained 20 times
    # G: independent real samples per fraction, each with its own generator (repeat r uses
    # sample and generator r mod G).
    "samples": 5,
    # Real fraction whose sample g generator g learns from; it serves every synthetic cell
    # at this fraction or above (samples are nested: mrilib.grid). None: one generator set
    # per cell fraction (G x 8 generators instead of G).
    "generator_fraction": 0.3,
    # training seed t_r and variation seed u_r = base + r; "data": the data_fraction subset
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
RUN_ONLY = ("models", "augs", "sweep_augs", "fractions", "leakage", "moderate_only", "cells",
            "repeats")
IMAGENET_RESULTS = "imagenet"
PRESETS = {
    # A few cells touching every code path (both leakage modes, every synthetic
    # policy, two augmentations); tiny epochs come from mrilib.train's quick preset.
    "quick": {
        "cells": [
            {"model": "basic_cnn", "aug": "none", "synthetic": "none", "real_fraction": 0.3},
            {"model": "basic_cnn", "aug": "none", "synthetic": "none", "real_fraction": 1.0},
            {"model": "basic_cnn", "aug": "none", "synthetic": "fill", "real_fraction": 0.3},
            {"model": "basic_cnn", "aug": "none", "synthetic": "fill", "real_fraction": 0.3,
             "leakage": "leaky"},
            {"model": "basic_cnn", "aug": "none", "synthetic": "100+20mod"},
            {"model": "basic_cnn", "aug": "hflip", "synthetic": "none", "real_fraction": 0.3},
        ],
        "repeats": 2,
        "samples": 2,
        # A stratified 10% of the slices (460 in the pool): one 1-epoch cell then takes
        # seconds on a 2-core CPU instead of minutes; numbers are for testing the code only.
        "data_fraction": 0.1,
    },
    # The headline cell (30% real + 70% synthetic, basic CNN), e.g. for notebook 04.
    "cell": {
        "cells": [{"model": "basic_cnn", "aug": "none", "synthetic": "fill",
                   "real_fraction": 0.3}],
        "repeats": 5,
    },
}


# ----------------------------------------------------------------------------- cells

@dataclass(frozen=True)
class Cell:
    """One configuration of the grid; ``key`` names it in results and logs."""

    model: str
    aug: str
    synthetic: str
    real_fraction: float
    leakage: str

    @property
    def key(self) -> str:
        return f"{self.model}/{self.aug}/{self.synthetic}/{self.real_fraction:g}/{self.leakage}"

    @property
    def synthetic_fraction(self) -> float:
        return SYNTHETIC[self.synthetic].synthetic_fraction(self.real_fraction)

    @property
    def synthetic_classes(self) -> tuple[str, ...] | str:
        return SYNTHETIC[self.synthetic].classes


def make_cell(model: str, aug: str = "none", synthetic: str = "none",
              real_fraction: float | None = None, leakage: str | None = None) -> Cell:
    """A validated :class:`Cell`; names and fractions are checked, aliases resolved."""
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
    return Cell(model, aug, synthetic, real_fraction, leakage)


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
    """The cells of ``preset`` in the order they run: the most important first.

    Per model (basic CNN first): the thesis's headline cells (30% and 100% real, 30%
    real + 70% synthetic, the leakage ablation), its results table, Figure 7.2 (every
    augmentation at 30% real), the real-fraction sweep without augmentation; then the
    sweeps with the other augmentation policies. A partial run is then most useful.
    """
    cfg = settings(DEFAULTS, PRESETS, preset, **overrides)
    if cfg["cells"]:  # an explicit list, of the models in force (grid --imagenet names some)
        cells = (make_cell(**c) for c in cfg["cells"])
        return list(dict.fromkeys(c for c in cells if c.model in cfg["models"]))
    cells: list[Cell] = []
    for model in cfg["models"]:
        cells += _core_cells(model, cfg)
    for model in cfg["models"]:
        for aug in cfg["sweep_augs"]:
            cells += _sweep_cells(model, aug, cfg["fractions"])
    return list(dict.fromkeys(cells))


def _core_cells(model: str, cfg: dict) -> list[Cell]:
    leaky = [make_cell(model, c.get("aug", "none"), "fill", c["real_fraction"], "leaky")
             for c in cfg["leakage"] if c["model"] == model]
    cells = [make_cell(model, "none", "none", 0.3), make_cell(model, "none", "none", 1.0),
             make_cell(model, "none", "fill", 0.3), *leaky]
    for aug in cfg["augs"]:  # the results table: 100/0, 80/20, 100/20 Moderate only
        cells += [make_cell(model, aug, "none", 1.0), make_cell(model, aug, "80+20")]
        if cfg["moderate_only"]:
            cells.append(make_cell(model, aug, "100+20mod"))
    for aug in cfg["augs"]:  # Figure 7.2
        cells += [make_cell(model, aug, "none", 0.3), make_cell(model, aug, "fill", 0.3)]
    if "none" in cfg["sweep_augs"]:
        cells += _sweep_cells(model, "none", cfg["fractions"])
    return cells


def _sweep_cells(model: str, aug: str, fractions: Sequence[float]) -> list[Cell]:
    cells = []
    for x in fractions:
        cells.append(make_cell(model, aug, "none", x))
        if x < 1:
            cells.append(make_cell(model, aug, "fill", x))
    return cells
