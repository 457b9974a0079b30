"""Thesis chapter 7 as one declarative grid, and a resumable runner for it.

A **cell** is one training configuration: (model, augmentation policy, synthetic policy,
real fraction, generator mode). :func:`grid_cells` lists the cells of a preset,
:func:`run_grid` trains every repeat of every cell and streams one row per run into
``runs.jsonl`` (and one row per epoch into ``epochs.jsonl``) under
:func:`mrilib.paths.results_dir`; :func:`load_results` reads them back for
:mod:`mrilib.stats` and :mod:`mrilib.plots.results`.

Synthetic policies (``X`` = real fraction of the training pool):

* ``none``       X real, no synthetic images.
* ``fill``       X real + synthetic up to the full pool size, i.e. ``1 - X`` synthetic
  (the thesis's "30% real + 70% synthetic"; at X = 0.8 it is the table's "80% real /
  20% synthetic" row, so ``"80+20"`` is accepted as a name for that same cell).
* ``100+20mod``  the whole pool + 20% synthetic images of Moderate_Demented only.

Generator modes: ``sample`` (leak-free: the generator of repeat ``r`` learned only from
real images the classifier of repeat ``r`` sees) and ``leaky`` (the ablation:
generators trained on the whole training pool, so the synthetic images carry
information from real images the classifier was not given). Generators are trained by
:mod:`mrilib.synthetic.diffusion` (``python -m mrilib synth train``), or by the runner
itself with ``train_generators=True`` (``grid --train-generators``), inside the same
time budget, so one repeated command drives the whole grid on a time-limited GPU.

Sampling design (what makes comparisons between cells paired):

* ``G`` independent stratified real samples per real fraction (``G`` = the number of
  generators, ``n_generators`` of :mod:`mrilib.synthetic.diffusion`: 5, quick 2);
  sample ``g`` is drawn from the training pool with seed ``s_g = g``.
* Generator ``g`` learns from sample ``g`` at the *smallest* real fraction of the grid
  (``generator_fraction``, 30%) and serves every synthetic cell. This is leak-free at
  every fraction because samples are nested: :func:`mrilib.data.stratified_sample`
  permutes each class once per seed, so the 30% sample of seed ``s_g`` is a subset of
  its 40% sample, and so on, as long as no class's count falls as the fraction grows
  (:func:`mrilib.data.check_nested`, checked before a grid trains: it holds for this
  dataset's pool, full and quick, but rounding does not promise it for every size); :func:`mrilib.synthetic.mixing.mixed_training_set`
  checks it for every repeat (the generator's recorded training ids against the
  classifier's sample). It also mirrors the thesis, whose generator (DALL-E 2) was one
  fixed model for every fraction, and it trains G generators instead of G per fraction
  (5 instead of 40: the difference between one GPU session and eight). At larger X the
  generator has seen fewer images than the classifier, which if anything understates
  what synthetic images can add there; ``generator_fraction=None`` trains one set per
  fraction instead.
* Repeat ``r`` of **every** cell uses real sample ``g = r mod G`` (in synthetic cells
  also generator ``g``), training seed ``t_r = seeds.train + r`` and variation seed
  ``u_r = seeds.synthetic + r`` (so repeats ``r`` and ``r + G`` share real images and
  generator but not their synthetic images, nor their initial weights).
  So two cells at the same real fraction share their real images repeat by repeat
  (paired comparisons, :func:`mrilib.stats.compare_cells`).
* Repeats sharing ``g`` are clustered; :mod:`mrilib.stats` resamples clusters, then
  repeats. With ``samples == repeats`` every repeat has its own sample, as in the
  thesis (which drew a new sample and new Dall-E variations for each of 20 repeats).

Results are append-only and each row is flushed and fsync'd: an interrupted or
time-boxed run (``max_minutes``) resumes with no lost or duplicated rows, because each
run has a stable key (cell, repeat and everything in the grid settings that changes
what it trains) and finished keys are skipped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import paths
from .config import settings

MODELS = ("basic_cnn", "resnet18", "vit_tiny")       # thesis ch. 5
AUGS = ("none", "hflip", "autoaugment")               # thesis ch. 6.1, 6.2
GENERATORS = ("none", "sample", "leaky")
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
    # G, real samples per fraction; None = the generators per fraction of the local
    # backend (mrilib.synthetic.diffusion n_generators), which it must equal for "local".
    "samples": None,
    # Real fraction whose sample g generator g learns from; it serves every synthetic cell
    # at this fraction or above (samples are nested, see the module docstring). None: one
    # generator set per cell fraction (G x 8 generators instead of G).
    "generator_fraction": 0.3,
    # t_r, u_r = base + r (u_r = r: diffusion's rule); "data": seed of the data_fraction subset
    "seeds": {"train": 1000, "synthetic": 0, "data": 0},
    # Share of the 6,400 slices the runner loads (stratified, before the split); 1.0 = all.
    "data_fraction": 1.0,
    "backend": "local",                 # synthetic-image backend (mrilib.synthetic.BACKENDS)
    # Overrides passed to train_replicates. The test split only at each run's final and
    # best-validation epochs: all the rows, tables and figures use (per-epoch curves are
    # train and validation loss), the same records (tested on CPU and on an H100), and
    # less time: 17% of a basic-CNN run at 30% real, 3-9% of a ResNet-18 run, about 4%
    # of the grid (evaluation's measured shares; benchmarks/README.md).
    # Not part of a run's design: rows made testing every epoch stay current.
    "train": {"test_every_epoch": False},
    # None: each cell trains in its own call. {model: R}: a cell of that model trains
    # together with the later cells of its model and policy whose training sets have its
    # size (the fill cells at every real fraction and 100% real), up to R replicates in one
    # call and, on CUDA, in one vmap group (per model, as memory is: ResNet-18 took 27 GiB
    # for 20, ViT-Tiny 7.5). For a host-bound model (ViT-Tiny: its GPU was busy 42% of a
    # 20-replicate step) more replicates per launch are nearly free; off until a lease has
    # measured it (benchmarks/README.md). Each replicate keeps its own seeds and sample, so
    # a run's results do not depend on it beyond float rounding: not part of the design.
    # Cells so trained run earlier than the grid's order would have them.
    "merge_replicates": None,
    # Models that start from ImageNet weights, as the thesis fine-tuned ResNet-18 and the
    # ViT: {model: True} has timm fetch them from the Hugging Face hub, {model: PATH} reads
    # timm's three-channel state dict from a file (mrilib.models.build_model). Empty: every
    # model from scratch, as on the machines this project is built on, which cannot reach
    # the hub. It changes a run's design (its init and, by mrilib.train, its learning
    # rate), so such runs never count as runs of the from-scratch grid; without a results
    # folder of their own they go to <results>/imagenet (IMAGENET_RESULTS).
    "imagenet": {},
}
IMAGENET_RESULTS = "imagenet"
PRESETS = {
    # A few cells touching every code path (both generator modes, every synthetic
    # policy, two augmentations); tiny epochs come from mrilib.train's quick preset.
    "quick": {
        "cells": [
            {"model": "basic_cnn", "aug": "none", "synthetic": "none", "real_fraction": 0.3},
            {"model": "basic_cnn", "aug": "none", "synthetic": "none", "real_fraction": 1.0},
            {"model": "basic_cnn", "aug": "none", "synthetic": "fill", "real_fraction": 0.3},
            {"model": "basic_cnn", "aug": "none", "synthetic": "fill", "real_fraction": 0.3,
             "generator": "leaky"},
            {"model": "basic_cnn", "aug": "none", "synthetic": "100+20mod"},
            {"model": "basic_cnn", "aug": "hflip", "synthetic": "none", "real_fraction": 0.3},
        ],
        "repeats": 2,
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

RUNS_FILE, EPOCHS_FILE = "runs.jsonl", "epochs.jsonl"


# ----------------------------------------------------------------------------- cells

@dataclass(frozen=True)
class Cell:
    """One configuration of the grid; ``key`` names it in results and logs."""

    model: str
    aug: str
    synthetic: str
    real_fraction: float
    generator: str

    @property
    def key(self) -> str:
        return f"{self.model}/{self.aug}/{self.synthetic}/{self.real_fraction:g}/{self.generator}"

    @property
    def synthetic_fraction(self) -> float:
        return SYNTHETIC[self.synthetic].synthetic_fraction(self.real_fraction)

    @property
    def synthetic_classes(self) -> tuple[str, ...] | str:
        return SYNTHETIC[self.synthetic].classes


def make_cell(model: str, aug: str = "none", synthetic: str = "none",
              real_fraction: float | None = None, generator: str | None = None) -> Cell:
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
    generator = generator or ("none" if synthetic == "none" else "sample")
    if generator not in GENERATORS or (generator == "none") != (synthetic == "none"):
        raise ValueError(f"generator={generator!r} does not fit synthetic={synthetic!r}: "
                         f"real-only cells take 'none', synthetic ones 'sample' or 'leaky'")
    return Cell(model, aug, synthetic, real_fraction, generator)


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


# ----------------------------------------------------------------------------- seeds and keys

@dataclass(frozen=True)
class RepeatSeeds:
    """The seeds of repeat ``repeat``: real sample ``sample_index`` drawn with ``sample_seed``."""

    repeat: int
    sample_index: int
    sample_seed: int
    train_seed: int
    synth_seed: int


def repeat_seeds(repeat: int, cfg: dict) -> RepeatSeeds:
    """Seeds of one repeat under the sampling design in the module docstring."""
    g = repeat % cfg["samples"]
    s = cfg["seeds"]
    return RepeatSeeds(repeat, g, g, s["train"] + repeat, s["synthetic"] + repeat)


def grid_settings(preset: str | None = None, **overrides) -> dict:
    """The grid settings in force for ``preset``, with ``samples`` (G) resolved."""
    preset = preset or paths.preset_name()
    cfg = settings(DEFAULTS, PRESETS, preset, **overrides)
    if cfg["samples"] is None or cfg["backend"] == "local":
        with preset_env(preset):
            from .synthetic.diffusion import DEFAULTS as GEN, PRESETS as GEN_PRESETS
            generators = settings(GEN, GEN_PRESETS)["n_generators"]
        if cfg["samples"] not in (None, generators):
            raise ValueError(f"samples={cfg['samples']} but the local backend trains "
                             f"{generators} generators per real fraction (n_generators); "
                             f"leave samples unset or change n_generators")
        cfg["samples"] = generators
    if not isinstance(cfg["samples"], int) or cfg["samples"] < 1:
        raise ValueError(f"samples={cfg['samples']!r}: give a positive whole number")
    _check_imagenet(cfg["imagenet"])
    merge = cfg["merge_replicates"]
    if merge is not None and (not isinstance(merge, dict) or not all(
            model in MODELS and isinstance(limit, int) and not isinstance(limit, bool)
            and limit >= 1 for model, limit in merge.items())):
        raise ValueError(f"merge_replicates={merge!r}: give None or a whole number of "
                         f"replicates per model of {list(MODELS)}, e.g. {{'vit_tiny': 60}} "
                         f"(per model, as memory per replicate differs)")
    return cfg


def _check_imagenet(imagenet) -> None:
    """``imagenet`` names models with ImageNet weights, each True (the hub) or a file."""
    from .models import model_spec

    if not isinstance(imagenet, dict):
        raise ValueError(f"imagenet={imagenet!r}: give a dict such as {{'resnet18': True}} "
                         f"(weights from the hub) or {{'resnet18': 'path/to/model.safetensors'}}")
    for model, start in imagenet.items():
        if model not in MODELS:
            raise ValueError(f"imagenet names {model!r}, which is not a model of the grid "
                             f"({', '.join(MODELS)})")
        if model_spec(model).timm_name is None:
            raise ValueError(f"imagenet names {model!r}, which has no ImageNet weights: the "
                             f"thesis trains it from scratch; leave it out")
        if start is True:
            continue
        if isinstance(start, bool) or not isinstance(start, (str, os.PathLike)):
            raise ValueError(f"imagenet[{model!r}]={start!r}: give True (timm's weights from "
                             f"the hub) or the path of timm's state dict for {model}")
        if not Path(start).expanduser().is_file():
            raise ValueError(f"imagenet[{model!r}]: no weights file at {start}; download "
                             f"timm's model.safetensors for {model} on a machine with "
                             f"internet access and give its path")


def train_overrides(cfg: dict, model: str) -> dict:
    """What the grid passes to :func:`mrilib.train.train_replicates` for ``model``'s runs:
    its ``train`` overrides, with the model's ImageNet start where ``imagenet`` names one."""
    overrides = dict(cfg["train"])
    start = cfg.get("imagenet", {}).get(model)
    if start is True:
        overrides["pretrained"] = True
    elif start is not None:
        overrides["weights"] = str(Path(start).expanduser())
    return overrides


def _file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:16]}"


def design_hash(cfg: dict, preset: str, model: str) -> str:
    """8 hex digits over everything that changes what a run of ``model`` trains.

    The grid settings (samples, seeds, backend, data share, train overrides), the preset,
    and the training settings in force for ``model`` (:func:`mrilib.train.model_settings`),
    so that a changed default retrains instead of mixing two protocols in one table.
    Synthetic cells also depend on how their images are made: :func:`cell_design`.
    Call it under :func:`preset_env`, as the training engine reads the preset too.
    """
    from .train import model_settings

    # How a run is batched, which epochs it tests and how its stem convolution is summed,
    # not what it learns.
    run_only = ("max_parallel", "eval_batch_size", "test_every_epoch", "im2col_stem")
    training = {k: v for k, v in model_settings(model, **train_overrides(cfg, model)).items()
                if k not in run_only}
    if training.get("weights") is not None:  # the weights, wherever the file lies
        training["weights"] = _file_digest(training["weights"])
    relevant = {k: cfg[k] for k in ("samples", "seeds", "backend", "data_fraction",
                                    "generator_fraction")}
    relevant.update(preset=preset, training=training)
    return _hash8(relevant)


def generator_hash(cfg: dict) -> str:
    """8 hex digits over what the grid's synthetic images depend on (:func:`generator_settings`)."""
    return _hash8(generator_settings(cfg["backend"]))


def cell_design(cfg: dict, preset: str, cell: "Cell") -> str:
    """The design of ``cell``'s runs, as their run keys carry it.

    Real-only cells: :func:`design_hash`. Synthetic cells: ``<design_hash>+<generator_hash>``,
    so that a new generator recipe (or sampling setting) retrains the synthetic cells, while
    the real-only cells, which do not depend on it, keep their runs. Rows store the two
    parts as ``design`` and ``generator_design`` (:func:`run_row`).
    """
    design = design_hash(cfg, preset, cell.model)
    return design if cell.synthetic == "none" else f"{design}+{generator_hash(cfg)}"


def _hash8(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


def generator_settings(backend: str) -> dict:
    """What the synthetic images of ``backend`` depend on, as in force now (see design_hash).

    Local: :func:`mrilib.synthetic.diffusion.design_settings`. OpenAI: the route, model,
    prompt and sizes (not its timeouts, retries or budget, which change what a run may
    spend, not the images it asks for).
    """
    if backend == "local":
        from .synthetic.diffusion import design_settings
        return design_settings()
    if backend == "openai":
        from .synthetic.openai_backend import DEFAULTS as OPENAI, PRESETS as OPENAI_PRESETS
        cfg = settings(OPENAI, OPENAI_PRESETS)
        return {k: cfg[k] for k in ("route", "model", "prompt", "size", "quality",
                                    "upload_size")}
    raise ValueError(f"backend={backend!r}: the grid knows the generator settings of 'local' "
                     f"and 'openai' only")


def run_key(cell: Cell, repeat: int, design: str) -> str:
    """The stable id of one run: ``<cell key>/r<repeat>@<design>`` (:func:`cell_design`)."""
    return f"{cell.key}/r{repeat:02d}@{design}"


# ----------------------------------------------------------------------------- provenance

def provenance(device=None) -> dict:
    """Git commit and dirty flag, package versions and device name, for every row."""
    return {**_git_state(), **package_versions(), "device_name": device_name(device),
            "host": platform.node()}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(paths.ROOT), *args], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _git_state() -> dict:
    if os.environ.get("MRILIB_GIT_COMMIT"):
        # A copy of the tree on a lent GPU machine: tools/gpu/prepare.sh recorded the
        # checkout's state and session.sh passes it on. It wins over any .git there: the
        # copy's .git was seen to hold an older HEAD than the tree it came with.
        dirty = os.environ.get("MRILIB_GIT_DIRTY")
        return {"git_commit": os.environ["MRILIB_GIT_COMMIT"],
                "git_dirty": None if dirty is None else dirty == "1", "git_diff_sha1": None}
    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    # Results and figures are what the run writes; they do not make its code dirty.
    status = _git("status", "--porcelain", "--", ".", ":(exclude)results", ":(exclude)figures")
    diff = _git("diff", "HEAD", "--", "mrilib") if commit else None
    return {"git_commit": commit or "uncommitted",
            "git_dirty": bool(status and status.strip()) if status is not None else None,
            "git_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None}


def package_versions() -> dict:
    """Versions of the packages a result depends on (None where not installed)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "diffusers", "numpy", "mrilib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device=None) -> str:
    """The accelerator's name (e.g. ``NVIDIA H100 80GB HBM3``) or the CPU's."""
    import torch

    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} asked for, but torch sees no CUDA device "
                             f"here; use --device cpu or run on a machine with a GPU")
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ----------------------------------------------------------------------------- training sets

@dataclass
class TrainingSets:
    """K repeats' training sets in one bank: ``index[k]`` picks repeat k's images."""

    bank_images: object   # uint8 [M, 1, H, W]: real and synthetic images pooled
    bank_labels: object   # int64 [M]
    index: object         # int64 [K, n]
    info: list[dict]      # one JSON-able dict per repeat (counts, generator, cache keys)


def training_sets(data, split, cell: Cell, seeds: Sequence[RepeatSeeds], cfg: dict,
                  device=None) -> TrainingSets:
    """The training sets of ``seeds``'s repeats of ``cell``: real sample g, plus synthetic.

    Synthetic cells need their generators trained (``python -m mrilib synth train``);
    a missing one raises FileNotFoundError naming the command, and the runner moves on.
    """
    if cell.synthetic == "none":
        from .train import real_fraction_index

        index = real_fraction_index(data.labels, split.train, cell.real_fraction,
                                    [s.sample_seed for s in seeds], data.ids)
        info = [{"n_real": int(index.shape[1]), "n_synthetic": 0} for _ in seeds]
        return TrainingSets(data.images, data.labels, index, info)
    from .synthetic.mixing import mixed_training_set, stack_repeats

    if cfg["backend"] == "local":
        _check_generators(data, split, cell, seeds, cfg)
    sets = [mixed_training_set(data, split, cell.real_fraction, cell.synthetic_fraction,
                               classes=cell.synthetic_classes, seed=s.synth_seed,
                               backend=_backend(cfg["backend"], data, split, cell, s, device,
                                                cfg),
                               sample_seed=s.sample_seed, allow_leaky=cell.generator == "leaky",
                               progress=False)
            for s in seeds]
    bank_images, bank_labels, index, infos = stack_repeats(sets)
    return TrainingSets(bank_images, bank_labels, index, [_brief(i) for i in infos])


def _check_generators(data, split, cell: Cell, seeds: Sequence[RepeatSeeds], cfg: dict) -> None:
    """FileNotFoundError naming the first generator ``seeds``'s repeats lack, before sampling.

    Checked up front because the repeats are sampled in turn: a cell whose generator 1
    is missing would otherwise first make all of generator 0's variations (seen: 45 s
    of an H200 lease) and then stop anyway.
    """
    from .synthetic.diffusion import repeat_generator, trained_generator

    for g in sorted({repeat_generator(s.repeat) for s in seeds}):
        trained_generator(data, split, generator_fraction(cell, cfg), g,
                          leaky=cell.generator == "leaky")


def generator_fraction(cell: Cell, cfg: dict) -> float:
    """The real fraction whose sample the generators of ``cell`` learned from.

    ``cfg["generator_fraction"]`` (30%: one generator set for the whole grid), or the
    cell's own fraction when that is None. A generator trained on more real images than
    the cell's sample would leak, so a larger value is refused.
    """
    fraction = cfg.get("generator_fraction")
    if fraction is None:
        return cell.real_fraction
    if fraction > cell.real_fraction + 1e-9:
        raise ValueError(f"generator_fraction={fraction:g} is above {cell.key}'s real fraction "
                         f"{cell.real_fraction:g}: its generators would have learned from real "
                         f"images the classifier does not see. Give the smallest real "
                         f"fraction of the grid, or None")
    return fraction


def _backend(name: str, data, split, cell: Cell, seeds: RepeatSeeds, device, cfg: dict):
    if name == "local":
        from .synthetic.diffusion import LocalDiffusion

        return LocalDiffusion.for_repeat(data, split, generator_fraction(cell, cfg), seeds.repeat,
                                         leaky=cell.generator == "leaky", device=device)
    if cell.generator == "leaky":
        raise ValueError(f"the leaky ablation needs a generator trained on the pool; backend "
                         f"{name!r} learns nothing from our data. Use backend='local'")
    from .synthetic import get_backend
    return get_backend(name)


def _brief(info: dict) -> dict:
    """A mixing info dict without its per-image id lists (kept as one hash)."""
    out = {k: v for k, v in info.items() if k not in ("real_ids", "synthetic_sources")}
    ids = "\n".join(info.get("real_ids", [])) + "|" + "\n".join(info.get("synthetic_sources", []))
    out["ids_sha1"] = hashlib.sha1(ids.encode()).hexdigest()[:16]
    return out


def _train_replicates(*args, **kwargs):
    from .train import train_replicates
    return train_replicates(*args, **kwargs)


# ----------------------------------------------------------------------------- results files

def _jsonable(value):
    """Plain JSON types from tensors, arrays, numpy scalars, tuples and paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Rows of ``path`` and the byte length of its intact part.

    Bytes after the last newline, or a last line that does not parse, are a row cut by
    a kill: they are dropped (the caller truncates them away). A bad line in the middle
    is damage nobody should paper over, and raises.
    """
    if not path.exists():
        return [], 0
    complete = path.read_bytes().rpartition(b"\n")[0]
    lines = complete.split(b"\n") if complete else []
    rows, good = [], 0
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path} line {i + 1} is not valid JSON ({err}); repair or "
                             f"remove that line, then rerun with --resume") from None
        good += len(line) + 1
    return rows, good


def _repaired_rows(path: Path) -> list[dict]:
    """The intact rows of ``path``, cutting a torn last line off the file itself."""
    rows, good = _read_jsonl(path)
    if path.exists() and path.stat().st_size != good:
        paths.atomic_write_bytes(path, path.read_bytes()[:good])
    return rows


class ResultsWriter:
    """Append-only runs and epochs tables in one folder, resumable by run key."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.runs_path = self.directory / RUNS_FILE
        self.epochs_path = self.directory / EPOCHS_FILE
        self.runs = _repaired_rows(self.runs_path)
        self.done = {r["run_key"] for r in self.runs}
        self._drop_orphan_epochs()

    def _drop_orphan_epochs(self) -> None:
        """Epoch rows of runs whose run row never landed (killed in between) go."""
        rows = _repaired_rows(self.epochs_path)
        seen, kept = set(), []
        for row in rows:
            ident = (row["run_key"], row["epoch"])
            if row["run_key"] in self.done and ident not in seen:
                seen.add(ident)
                kept.append(row)
        if len(kept) != len(rows):
            blob = "".join(json.dumps(r) + "\n" for r in kept).encode()
            paths.atomic_write_bytes(self.epochs_path, blob)

    def append(self, run_row: dict, epoch_rows: Iterable[dict]) -> None:
        """Write one run: its epoch rows first, then the run row that marks it done."""
        if run_row["run_key"] in self.done:
            raise ValueError(f"run {run_row['run_key']} is already in {self.runs_path}")
        _append_lines(self.epochs_path, epoch_rows)
        _append_lines(self.runs_path, [run_row])
        self.runs.append(run_row)
        self.done.add(run_row["run_key"])


def _append_lines(path: Path, rows: Iterable[dict]) -> None:
    blob = "".join(json.dumps(_jsonable(r)) + "\n" for r in rows)
    if not blob:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def merge_results(source: str | os.PathLike, target: str | os.PathLike, check_only: bool = False
                  ) -> tuple[int, int]:
    """Append to ``target`` the runs of ``source`` it lacks, each with its epoch rows.

    For rows a lent GPU sends back (``tools/gpu/collect.sh``): a run both folders hold
    must be the same row in both, else this raises before writing anything, naming the
    run (two leases trained it differently: keep both files and decide by hand). Runs
    only ``target`` holds stay. ``check_only``: raise or not, write nothing. Returns
    (runs ``target`` held, runs added).
    """
    source, target = Path(source), Path(target)
    have = {r["run_key"]: r for r in _read_jsonl(target / RUNS_FILE)[0]}
    got: dict[str, dict] = {}
    for row in _read_jsonl(source / RUNS_FILE)[0]:
        key = row["run_key"]
        for other, where in ((got.get(key), f"twice in {source}"), (have.get(key), "here")):
            if other is not None and other != row:
                field = next(k for k in sorted(set(row) | set(other))
                             if row.get(k) != other.get(k))
                raise ValueError(f"run {key} differs between {source} and {where} in "
                                 f"{field} ({row.get(field)} there, {other.get(field)} "
                                 f"{'here' if where == 'here' else 'in its other copy'}): "
                                 f"trained apart; nothing was merged, both files are as "
                                 f"they were")
        got[key] = row
    new = [r for r in got.values() if r["run_key"] not in have]
    if check_only or not new:
        return len(have), len(new)
    epochs: dict[str, list[dict]] = {}
    for row in _read_jsonl(source / EPOCHS_FILE)[0]:
        epochs.setdefault(row["run_key"], []).append(row)
    writer = ResultsWriter(target)
    for row in new:
        writer.append(row, epochs.get(row["run_key"], []))
    return len(have), len(new)


class MixedDesignsWarning(UserWarning):
    """A results folder holds runs of several designs; :func:`load_results` set some aside."""


def load_results(directory: str | os.PathLike | None = None, design: str | None = "current"):
    """``(runs, epochs)`` DataFrames from a results folder (default: :func:`results_dir`).

    ``runs`` has one row per training run, ``epochs`` one per run and epoch; both carry
    the cell columns, so ``runs.groupby(list(mrilib.stats.CELL_COLUMNS))`` gives cells.

    A folder can hold runs of several designs (:func:`design_hash`: the training protocol
    and grid settings a run was trained under), e.g. after a default changed and
    ``grid --resume`` retrained under the new one. Medians over repeats must not mix two
    protocols, so by default (``design="current"``) one design is kept per (preset,
    model), the granularity at which :func:`design_hash` is defined:

    1. the design the current code computes for that preset's own settings
       (``design_hash(grid_settings(preset), preset, model)``, what ``grid --resume`` and
       :func:`grid_status` count as done) when the folder holds rows of it: the rule for
       the committed full run and the presets' grids; else
    2. the design of the (preset, model)'s most recently written row: rows made with
       explicit settings (``train={...}``, ``seeds=...``, ``samples=...`` passed to
       :func:`run_grid`; ``cells=``/``repeats=`` do not change the design) or under older
       defaults that no current run replaces. A folder of one design per (preset, model)
       is read whole; the newest experiment wins over older ones, whatever their size.

    The same rule then keeps one generator (``generator_design``, :func:`cell_design`)
    among the synthetic rows of each (preset, model): a synthetic median never mixes
    images of two generator recipes, and every synthetic row kept shares its training
    protocol with the real-only rows it is compared with.

    Rows set aside are reported with a :class:`MixedDesignsWarning` (folder, count, the
    designs kept and set aside) and in ``runs.attrs["set_aside"]`` (None when nothing
    was). ``design=None`` keeps every row; ``design="a1b2c3d4"`` keeps that one training
    design (one generator chosen as above), ``"a1b2c3d4+e5f6a7b8"`` that design's
    real-only runs and its synthetic runs of that generator (``+unrecorded``: synthetic
    rows written before rows named their generator); a ValueError lists the folder's
    designs when it holds none of it. ``epochs``
    always holds the epochs of the runs kept.
    """
    import pandas as pd

    directory = Path(directory) if directory is not None else paths.results_dir()
    runs_path = directory / RUNS_FILE
    if not runs_path.exists():
        raise FileNotFoundError(f"no results at {runs_path}; run the grid first "
                                f"(python -m mrilib grid --preset ...) or point at the "
                                f"folder that holds {RUNS_FILE}")
    runs, _ = _read_jsonl(runs_path)
    runs, aside = _one_design(runs, design, directory)
    epochs, _ = _read_jsonl(directory / EPOCHS_FILE)
    done = {r["run_key"] for r in runs}
    epochs = [e for e in epochs if e["run_key"] in done]
    if aside is not None:
        warnings.warn(aside["message"], MixedDesignsWarning, stacklevel=2)
    runs = pd.DataFrame(runs)
    runs.attrs["set_aside"] = aside
    return runs, pd.DataFrame(epochs)


def _one_design(rows: list[dict], design: str | None, directory: Path
                ) -> tuple[list[dict], dict | None]:
    """``rows`` of the design(s) :func:`load_results` keeps, and what was set aside.

    Two choices, each per (preset, model): the training design (``design``), then, among
    the synthetic rows kept, the generator (``generator_design``), so that real-only and
    synthetic cells compared with each other share one training protocol.
    """
    from collections import Counter

    if design is None or not rows:
        return rows, None
    if design != "current":
        held = Counter(r.get("design") for r in rows)
        held.update(_full_design(r) for r in rows if _generator_of(r) is not None)
        if design not in held:
            listed = ", ".join(f"{d} ({n} runs)" for d, n in held.items())
            raise ValueError(f"{_shown(directory)}/{RUNS_FILE} holds no runs of design "
                             f"{design!r}; it holds {listed}. Pass one of those, "
                             f"design='current' or design=None (every row)")
        training, _, generator = design.partition("+")
        rows = [r for r in rows if r.get("design") == training]
        if generator:  # that generator's synthetic runs, with the real-only runs beside them
            return [r for r in rows if _generator_of(r) in (None, generator)], None
        keep, parts = [True] * len(rows), []
    else:
        keep, parts = _choose(rows, lambda r: r.get("design"), _current_design, "design")
    trained = [r for r, k in zip(rows, keep) if k]
    synthetic = [r for r in trained if _generator_of(r) is not None]
    keep_gen, gen_parts = _choose(synthetic, _generator_of,
                                  lambda preset, model: _current_generator(preset),
                                  "generator")
    other_generator = {id(r) for r, k in zip(synthetic, keep_gen) if not k}
    kept = [r for r in trained if id(r) not in other_generator]
    if len(kept) == len(rows):
        return rows, None
    dropped = [r for r, k in zip(rows, keep) if not k]  # another training design
    set_aside = Counter(r.get("design") for r in dropped)
    set_aside.update(_full_design(r) for r in synthetic if id(r) in other_generator)
    folder = _shown(directory)
    example = next(iter(set_aside))
    n_dropped = len(rows) - len(kept)
    message = (f"{folder}/{RUNS_FILE}: {n_dropped} of {len(rows)} runs set aside so that "
               f"no cell mixes two training protocols or two generators; "
               + "; ".join(parts + gen_parts) + ". Read them anyway with "
               f"load_results({folder!r}, design=None) (every row) or design={example!r} "
               f"(one design).")
    short = (f"{n_dropped} runs of another design ("
             + ", ".join(str(d) for d in set_aside) + ") set aside; "
             "load_results(..., design=None) reads them.")
    return kept, {"dropped": n_dropped, "kept": sorted({str(_full_design(r)) for r in kept}),
                  "set_aside": {str(d): n for d, n in set_aside.items()},
                  "message": message, "short": short}


def _choose(rows: list[dict], value: Callable[[dict], str], current: Callable, what: str
            ) -> tuple[list[bool], list[str]]:
    """Which ``rows`` keep the one ``value`` chosen per (preset, model), and why (text).

    The value the current code gives the group (``current(preset, model)``) where the
    group holds rows of it, else the value of its most recently written row.
    """
    from collections import Counter

    groups: dict[tuple, list] = {}
    for r in rows:  # file order is the order the runs were written in
        groups.setdefault((r.get("preset"), r.get("model")), []).append(value(r))
    chosen, parts = {}, []
    for (preset, model), values in groups.items():
        now = current(preset, model) if len(set(values)) > 1 else None
        chosen[preset, model] = now if now in values else values[-1]
        others = Counter(v for v in values if v != chosen[preset, model])
        if others:
            why = "the current code's" if now in values else "the newest"
            parts.append(f"{model} ({preset} preset): kept {what} {chosen[preset, model]} "
                         f"({why}, {values.count(chosen[preset, model])} runs), set aside "
                         + ", ".join(f"{d} ({n} runs)" for d, n in others.items()))
    return [value(r) == chosen[r.get("preset"), r.get("model")] for r in rows], parts


def _generator_of(row: dict) -> str | None:
    """A synthetic row's generator design; ``"unrecorded"`` for rows written before run
    keys carried it (their images came from some earlier recipe); None for real-only rows."""
    if row.get("synthetic", "none") == "none":
        return None
    return row.get("generator_design") or "unrecorded"


def _full_design(row: dict) -> str:
    """A row's design with its generator's (:func:`cell_design`'s form)."""
    generator = _generator_of(row)
    return row.get("design") if generator is None else f"{row.get('design')}+{generator}"


def _current_design(preset, model) -> str | None:
    """The design the current code gives ``model``'s runs under ``preset``'s own settings."""
    if preset is None or model is None:
        return None
    try:
        cfg = grid_settings(preset)
        with preset_env(preset):
            return design_hash(cfg, preset, model)
    except (ValueError, TypeError, KeyError):  # a preset or model this code no longer has
        return None


def _current_generator(preset) -> str | None:
    """The generator design the current code gives ``preset``'s synthetic cells."""
    if preset is None:
        return None
    try:
        cfg = grid_settings(preset)
        with preset_env(preset):
            return generator_hash(cfg)
    except (ValueError, TypeError, KeyError):
        return None


def export_csv(directory: str | os.PathLike | None = None) -> list[Path]:
    """``runs.csv`` and ``epochs.csv`` beside the JSONL files (nested values as JSON)."""
    directory = Path(directory) if directory is not None else paths.results_dir()
    runs, epochs = load_results(directory, design=None)  # a faithful copy: every design
    written = []
    for name, frame in (("runs.csv", runs), ("epochs.csv", epochs)):
        flat = frame.copy()
        for col in flat.columns:
            if flat[col].map(lambda v: isinstance(v, (list, dict))).any():
                flat[col] = flat[col].map(json.dumps)
        written.append(paths.atomic_write_bytes(directory / name,
                                                flat.to_csv(index=False).encode()))
    return written


# ----------------------------------------------------------------------------- rows

_STAGE_KEYS = ("epoch", "val_loss", "val_acc", "test_loss", "test_acc", "test_confusion",
               "val_confusion")
_RECORD_KEYS = {"history", "final", "best", "seconds", "device", "init"}


def run_row(cell: Cell, seeds: RepeatSeeds, record: dict, base: dict, design: str, info: dict,
            n_train: int, cell_seconds: float) -> dict:
    """The results row of one run: cell, seeds, metrics, provenance, config.

    ``design``: :func:`cell_design`, stored as ``design`` (training) and
    ``generator_design`` (synthetic cells; None for real-only ones).
    """
    training, _, generator = design.partition("+")
    row = {"run_key": run_key(cell, seeds.repeat, design), "cell_key": cell.key,
           "design": training, "generator_design": generator or None,
           **asdict(cell), "synthetic_fraction": cell.synthetic_fraction,
           "synthetic_classes": cell.synthetic_classes, **asdict(seeds),
           "init": record.get("init"), "n_train": n_train, "synthetic_info": info}
    for stage in ("final", "best"):
        for key in _STAGE_KEYS:
            row[f"{stage}_{key}"] = record[stage].get(key)
    row.update({"seconds": record.get("seconds"), "cell_seconds": cell_seconds,
                "device": str(record.get("device")),
                "train_settings": {k: v for k, v in record.items() if k not in _RECORD_KEYS},
                **{k: v for k, v in base.items()},
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return row


def epoch_rows(cell: Cell, seeds: RepeatSeeds, record: dict, design: str) -> list[dict]:
    """One row per epoch of one run, for loss curves."""
    key = run_key(cell, seeds.repeat, design)
    return [{"run_key": key, **asdict(cell), "repeat": seeds.repeat,
             "sample_index": seeds.sample_index, "init": record.get("init"), **h}
            for h in record["history"]]


# ----------------------------------------------------------------------------- runner

@contextlib.contextmanager
def preset_env(preset: str):
    """``MRILIB_PRESET=preset`` for the duration: every module reads the same preset."""
    before = os.environ.get("MRILIB_PRESET")
    os.environ["MRILIB_PRESET"] = preset
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MRILIB_PRESET", None)
        else:
            os.environ["MRILIB_PRESET"] = before


@dataclass
class GridProgress:
    """What a call to :func:`run_grid` did and what is left."""

    results: Path
    cells_total: int
    cells_done: int
    runs_written: int
    stopped_for_time: bool
    remaining: list[str]              # cell keys with repeats still missing
    blocked: dict[str, str]           # cell key -> why it could not start (a generator missing)


class _Budget:
    """Judges before each cell whether it would finish inside ``max_minutes``.

    A cell's time is judged by the last cell of the same model (from earlier chunks'
    rows, then this chunk's), scaled up, never down, by how many more vmap groups its
    repeats fill (``group_size(model)`` replicates train at once: 4 and 20 repeats are
    one group each on a GPU) and how many more images each has (real + synthetic
    fraction): training time grows with both, and an over-estimate only leaves a little
    of the budget unused, where an under-estimate (say a 100% cell judged by a 30% one)
    runs into the hard stop and loses the whole cell. A model with no cell yet is judged
    by ``priors`` (:func:`bench_priors`: this device's committed benchmark, scaled the
    same way and by 1.25 for what it did not time, such as augmentation), else not at all.
    """

    def __init__(self, max_minutes: float | None, clock: Callable[[], float], history: list[dict],
                 group_size: Callable[[str], int] = lambda model: 1,
                 priors: dict[str, dict] | None = None):
        if max_minutes is not None and max_minutes <= 0:
            raise ValueError(f"max_minutes={max_minutes}: give a positive number of minutes")
        self.limit = None if max_minutes is None else 60.0 * max_minutes
        self.clock, self.start, self.group_size = clock, clock(), group_size
        self.priors = priors or {}
        # Per model, the last cell call seen: its seconds, repeats and training-set size.
        # Rows of one call share cell_key and cell_seconds, and are written together.
        self.seen: dict[str, dict] = {}
        for row in history:
            # A call that trained several cells together is faster per cell than a cell
            # alone, which it would so under-estimate: such rows are no evidence here.
            if row.get("cell_seconds") is None or (row.get("train_settings") or {}).get(
                    "trained_with"):
                continue
            last = self.seen.get(row["model"])
            if last and (last["cell"], last["seconds"]) == (row.get("cell_key"),
                                                            float(row["cell_seconds"])):
                last["repeats"] += 1
            else:
                self.seen[row["model"]] = {
                    "cell": row.get("cell_key"), "seconds": float(row["cell_seconds"]),
                    "repeats": 1, "size": _set_size(row["real_fraction"],
                                                    row.get("synthetic_fraction"))}

    def expected(self, cell: Cell, repeats: int) -> float:
        """Seconds ``repeats`` repeats of ``cell`` are expected to take (0 if unknown)."""
        last = self.seen.get(cell.model) or self._prior(cell.model)
        if last is None:
            return 0.0
        size = _set_size(cell.real_fraction, cell.synthetic_fraction)
        group = max(1, int(self.group_size(cell.model)))
        groups = math.ceil(repeats / group) / math.ceil(last["repeats"] / group)
        return last["seconds"] * max(1.0, groups) * max(1.0, size / last["size"])

    def _prior(self, model: str) -> dict | None:
        """A benchmark as if it were a cell seen: one vmap group of its replicates."""
        p = self.priors.get(model)
        if p is None:
            return None
        return {"cell": None, "seconds": PRIOR_MARGIN * p["group_seconds"],
                "repeats": p["replicates"], "size": p["real_fraction"]}

    def allows(self, cell: Cell, repeats: int, also: float = 0.0) -> bool:
        """Whether ``repeats`` of ``cell`` fit in what is left, after ``also`` seconds more."""
        if self.limit is None:
            return True
        return self.clock() - self.start + also + self.expected(cell, repeats) <= self.limit

    def minutes_for_generators(self, cell: Cell, repeats: int) -> float | None:
        """Minutes left for generator training, keeping back the cell's own time."""
        if self.limit is None:
            return None
        left = self.limit - (self.clock() - self.start) - self.expected(cell, repeats)
        return max(left, 0.0) / 60.0

    def record(self, cell: Cell, seconds: float, repeats: int) -> None:
        self.seen[cell.model] = {"cell": cell.key, "seconds": seconds, "repeats": repeats,
                                 "size": _set_size(cell.real_fraction, cell.synthetic_fraction)}


PRIOR_MARGIN = 1.25  # a benchmark times no augmentation and no synthetic-set building


def bench_priors(device: str, cfg: dict, directory: str | os.PathLike | None = None
                 ) -> dict[str, dict]:
    """Per model, how long one vmap group took in this device's committed benchmarks.

    Read from ``benchmarks/bench-train-*.json`` (``python -m mrilib bench train``): rows
    of the default protocol on a device of this name (its 20 replicates in one group,
    128 px, stems as convolutions), the slowest where several are, with their seconds
    scaled to the grid's epochs for the model (call it under :func:`preset_env`, as
    :func:`run_grid` does: the epochs are the preset's). Empty where none match (another
    card, a CPU).
    """
    from .bench import DEFAULTS as BENCH_DEFAULTS
    from .train import model_settings

    directory = paths.ROOT / "benchmarks" if directory is None else Path(directory)
    priors: dict[str, dict] = {}
    for path in sorted(directory.glob("bench-train-*.json")):
        try:
            r = json.loads(path.read_text())
            s, p = r["settings"], r["parallel"]
            if (r["device"] != device or s["img_size"] != 128 or s.get("im2col_stem_mrilib")
                    or r["model"] not in MODELS
                    or p["replicates"] != BENCH_DEFAULTS["replicates"]):
                continue
            epochs = model_settings(r["model"], **train_overrides(cfg, r["model"]))["epochs"]
            seconds = p["seconds_per_replicate"] * p["replicates"] * epochs / s["epochs"]
            fraction = float(s["real_frac"])
            if not (seconds > 0 and 0 < fraction <= 1):
                continue
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            continue  # not a benchmark of this shape: no prior from it
        if seconds > priors.get(r["model"], {}).get("group_seconds", 0.0):
            priors[r["model"]] = {"group_seconds": seconds, "replicates": int(p["replicates"]),
                                  "real_fraction": fraction, "file": path.name}
    return priors


def _priors(cfg: dict, device, train_fn) -> dict[str, dict]:
    """:func:`bench_priors` for the device the grid trains on (none for another train_fn)."""
    if train_fn is not None:
        return {}
    try:
        return bench_priors(device_name(device), cfg)
    except ValueError:  # no such device: the training reports it
        return {}


def _group_sizes(cfg: dict, device, train_fn) -> Callable[[str], int]:
    """Replicates per vmap group of each model, as :func:`mrilib.train.train_replicates`
    will form them on ``device`` (1 for another ``train_fn``: nothing known about it)."""
    if train_fn is not None:
        return lambda model: 1

    def size(model: str) -> int:
        from .train import _group_size, model_settings, resolve_device

        return _group_size(model_settings(model, **train_overrides(cfg, model))["max_parallel"],
                           resolve_device(device))
    return size


def _set_size(real_fraction: float, synthetic_fraction: float | None) -> float:
    """A training set's size as a fraction of the pool (real + synthetic), for timing."""
    return max(float(real_fraction) + float(synthetic_fraction or 0.0), 1e-6)


def run_grid(preset: str | None = None, results_path: str | os.PathLike | None = None,
             resume: bool = True, max_minutes: float | None = None, device=None,
             train_fn: Callable | None = None, synth_fn: Callable | None = None,
             data=None, split=None, clock: Callable[[], float] = time.monotonic,
             progress: bool = True, train_generators: bool = False, source=None,
             available_generators: bool = False, **overrides) -> GridProgress:
    """Train every missing run of ``preset``'s grid, one cell at a time, streaming rows.

    ``train_fn`` (default :func:`mrilib.train.train_replicates`) trains all missing
    repeats of a cell in one call; ``synth_fn`` (default :func:`training_sets`) builds
    their training sets. ``max_minutes`` skips each cell that would not finish in the
    time left, judged by the last cell of the same model, scaled up by its training set's
    size and vmap groups (:class:`_Budget`); a shorter cell further on may still run. A
    cell whose generator is not trained yet is skipped and listed in ``blocked`` before
    its time is judged, unless
    ``train_generators`` (local backend): then the runner trains (or resumes) the
    generators it needs within the time left and runs the cell once they are done.
    ``available_generators``: a synthetic cell whose generators are only partly trained
    runs the repeats that have theirs (repeat ``r`` uses generator ``r mod G``) and stays
    listed, with the repeats that wait, for a later chunk. A lease that trains generator
    g can so run every synthetic cell's repeats g, g + G, ... without the other
    generators, which need not travel to it. Intervals of a cell that holds one sample's
    repeats only miss the variation between samples: the report's ``clusters`` column
    says how many samples each median rests on. With ``max_minutes``, a model with no
    cell yet is judged by this device's committed benchmark (:func:`bench_priors`).
    ``merge_replicates={model: R}`` (in ``overrides``) trains a cell with the later cells
    of its model, policy and training-set size in one call (:meth:`_Session.run_cell`).
    ``resume=False`` refuses to touch a
    folder that already holds runs. ``data`` defaults
    to ``load_mri(source)`` (a stratified ``data_fraction`` of it) and ``split`` to its
    fixed split; data passed in is used as given.
    """
    preset = preset or paths.preset_name()
    cfg = grid_settings(preset, **overrides)
    with preset_env(preset):
        directory = grid_results_dir(cfg, results_path)
        writer = ResultsWriter(directory)
        if writer.runs and not resume:
            raise ValueError(f"{directory} already holds {len(writer.runs)} runs; pass "
                             f"--resume (resume=True) to continue them, or give another "
                             f"results folder")
        session = _Session(cfg, preset, writer, device,
                           train_fn or _train_replicates, synth_fn or training_sets,
                           _Budget(max_minutes, clock, writer.runs,
                                   _group_sizes(cfg, device, train_fn),
                                   _priors(cfg, device, train_fn)), train_generators,
                           progress, source, data, split, available_generators)
        try:
            return session.run(grid_cells(preset, **overrides))
        finally:
            if writer.runs:
                export_csv(directory)


def grid_results_dir(cfg: dict, results_path: str | os.PathLike | None = None) -> Path:
    """``results_path``, else the preset's results folder, or its ``imagenet/`` sub-folder
    when ``cfg`` starts a model from ImageNet weights (one protocol per folder). Call it
    under :func:`preset_env`."""
    if results_path is not None:
        return Path(results_path)
    return paths.results_dir() / IMAGENET_RESULTS if cfg["imagenet"] else paths.results_dir()


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def grid_data(data, cfg: dict):
    """``data``, or its stratified ``data_fraction`` subset (the quick preset's 10%)."""
    if cfg["data_fraction"] >= 1.0:
        return data
    from .data import stratified_sample

    keep = stratified_sample(data.labels, cfg["data_fraction"], cfg["seeds"]["data"],
                             ids=data.ids)
    return data.subset(keep)


@dataclass
class _Session:
    """One call of :func:`run_grid`: what it trains with and where it writes."""

    cfg: dict
    preset: str
    writer: ResultsWriter
    device: object
    train_fn: Callable
    synth_fn: Callable
    budget: _Budget
    train_generators: bool = False
    progress: bool = True
    source: object = None
    data: object = None
    split: object = None
    available_generators: bool = False
    base: dict | None = None
    designs: dict = field(default_factory=dict)

    def design(self, cell: Cell) -> str:
        key = (cell.model, cell.synthetic != "none")
        if key not in self.designs:
            self.designs[key] = cell_design(self.cfg, self.preset, cell)
        return self.designs[key]

    def run(self, cells: list[Cell]) -> GridProgress:
        from tqdm.auto import tqdm

        todo = {c: [r for r in range(self.cfg["repeats"])
                    if run_key(c, r, self.design(c)) not in self.writer.done]
                for c in cells}
        written, stopped, blocked = 0, False, {}
        with tqdm(total=len(cells), initial=sum(not m for m in todo.values()), unit="cell",
                  desc=f"grid ({self.preset})", disable=not self.progress) as bar:
            for cell in [c for c in cells if todo[c]]:
                if not todo[cell]:
                    continue  # trained together with an earlier cell
                waiting = self._waiting_for_generators(cell, todo, blocked)
                if waiting:
                    # listed as blocked before any time is judged, so a lease without
                    # generators is not stopped at a synthetic cell it would skip anyway;
                    # with available_generators the other repeats run if they fit
                    ready = [r for r in todo[cell] if r not in waiting] \
                        if self.available_generators else []
                    if ready and not self._fits(cell, len(ready), stopped):
                        stopped = True
                        blocked[cell.key] = f"no time left this chunk for its {len(ready)} " \
                                            f"ready repeat(s); {blocked[cell.key]}"
                    elif ready:
                        written += self.run_cell(cell, ready)[0]
                        todo[cell] = waiting
                    continue
                if not self._fits(cell, len(todo[cell]), stopped):
                    stopped = True
                    continue  # a smaller cell further on may still fit
                bar.set_postfix_str(cell.key)
                self._ensure_data()  # outside the try: a missing dataset is no missing generator
                try:
                    n, merged = self.run_cell(cell, todo[cell], self.partners(cell, cells, todo))
                    written += n
                    for other in merged:
                        todo[other] = []
                        bar.update(1)
                except FileNotFoundError as err:
                    if cell.synthetic == "none":
                        raise
                    if not (self.train_generators and self.trained_generators(cell, todo[cell])):
                        ready = self.ready_repeats(cell, todo[cell])
                        if ready:  # the repeats whose generators exist run now
                            written += self.run_cell(cell, ready)[0]
                            todo[cell] = [r for r in todo[cell] if r not in ready]
                            err = f"{len(todo[cell])} repeat(s) wait: {err}"
                        blocked[cell.key] = str(err)  # its generator is not trained yet
                        continue
                    written += self.run_cell(cell, todo[cell])[0]
                todo[cell] = []
                bar.update(1)
        remaining = [c.key for c in cells if todo[c]]
        return GridProgress(self.writer.directory, len(cells), len(cells) - len(remaining),
                            written, stopped, remaining, blocked)

    def partners(self, cell: Cell, cells: list[Cell], todo: dict) -> list[tuple[Cell, list[int]]]:
        """Later cells that may train with ``cell`` (``merge_replicates``): same model and
        policy, training sets of its size, up to that many replicates in all."""
        limit = (self.cfg.get("merge_replicates") or {}).get(cell.model)
        if not limit:
            return []
        size = _set_size(cell.real_fraction, cell.synthetic_fraction)
        out, total = [], len(todo[cell])
        for other in cells[cells.index(cell) + 1:]:
            if (other.model, other.aug) != (cell.model, cell.aug) or not todo[other] or \
                    not math.isclose(_set_size(other.real_fraction, other.synthetic_fraction),
                                     size, rel_tol=1e-9):
                continue
            if total + len(todo[other]) > limit:
                break
            out.append((other, todo[other]))
            total += len(todo[other])
        return out

    def run_cell(self, cell: Cell, repeats: list[int],
                 partners: Sequence[tuple[Cell, list[int]]] = ()) -> tuple[int, list[Cell]]:
        """Train the missing ``repeats`` of ``cell`` in one call; append their rows.

        ``partners``: other cells' missing repeats to train in the same call, those whose
        training sets can be built now (generators trained), have ``cell``'s size and fit
        the time left. Returns the runs written and the partners trained with it.
        """
        start = self.budget.clock()
        seeds = [repeat_seeds(r, self.cfg) for r in repeats]
        sets = self.synth_fn(self.data, self.split, cell, seeds, self.cfg, self.device)
        group = [(cell, seeds, sets)]
        expected = self.budget.expected(cell, len(repeats))
        # A call cut off by the hard stop loses every cell in it: with a time limit, only
        # cells whose time can be judged (a cell seen, or a benchmark) are added.
        judged = self.budget.limit is None or expected > 0
        for other, more in partners if judged else ():
            if not self.budget.allows(other, len(more), also=expected):
                break
            other_seeds = [repeat_seeds(r, self.cfg) for r in more]
            try:
                other_sets = self.synth_fn(self.data, self.split, other, other_seeds, self.cfg,
                                           self.device)
            except Exception as err:  # noqa: BLE001 - its own turn reports it, as unmerged
                warnings.warn(f"{other.key} trains on its own later: its training sets "
                              f"could not be built now ({type(err).__name__}: {err})")
                continue
            if other_sets.index.shape[1] == sets.index.shape[1]:
                group.append((other, other_seeds, other_sets))
                expected += self.budget.expected(other, len(more))
        try:
            records = self._train_together(group)
        except Exception as err:  # noqa: BLE001 - out of memory: each cell alone instead
            if len(group) == 1 or type(err).__name__ != "OutOfMemoryError":
                raise
            warnings.warn(f"{len(group)} cells did not fit in memory together ({err}); "
                          f"{cell.key} trains alone, the others on their own turns")
            _free_device_memory()
            group = group[:1]
            records = self._train_together(group)
        seconds = self.budget.clock() - start
        n_all = sum(len(s) for _, s, _ in group)
        together = [c.key for c, _, _ in group] if len(group) > 1 else None
        for (c, cell_seeds, cell_sets), cell_records in zip(group, records):
            share = seconds * len(cell_seeds) / n_all  # the call's time, shared by replicates
            if not together:  # (see _Budget: a shared call is no evidence for a cell alone)
                self.budget.record(c, share, len(cell_seeds))
            design = self.design(c)
            for j, (s, record, info) in enumerate(zip(cell_seeds, cell_records, cell_sets.info)):
                if together:  # which call it shared, and its place among the cell's own
                    record = {**record, "replicate": j, "trained_with": together}
                self.writer.append(
                    run_row(c, s, record, self.base, design, info,
                            int(cell_sets.index.shape[1]), share),
                    epoch_rows(c, s, record, design))
        return n_all, [c for c, _, _ in group[1:]]

    def _train_together(self, group: list) -> list[list[dict]]:
        """One train_fn call for every (cell, seeds, sets) of ``group``; records per cell."""
        import torch

        cell = group[0][0]
        val = (self.data.images[self.split.val], self.data.labels[self.split.val])
        test = (self.data.images[self.split.test], self.data.labels[self.split.test])
        overrides = train_overrides(self.cfg, cell.model)
        if len(group) == 1:
            bank_images, bank_labels, index = group[0][2].bank_images, group[0][2].bank_labels, \
                group[0][2].index
        else:  # one bank: each cell's rows offset by the banks before it
            offsets = [sum(len(s.bank_labels) for _, _, s in group[:k]) for k in range(len(group))]
            bank_images = torch.cat([s.bank_images for _, _, s in group])
            bank_labels = torch.cat([s.bank_labels for _, _, s in group])
            index = torch.cat([torch.as_tensor(s.index) + int(o)
                               for (_, _, s), o in zip(group, offsets)])
            from .train import model_settings

            parallel = model_settings(cell.model, **overrides)["max_parallel"]
            parallel = dict(parallel) if isinstance(parallel, dict) else {"cpu": parallel}
            overrides["max_parallel"] = {**parallel, "cuda": sum(len(s) for _, s, _ in group)}
        seeds = [s.train_seed for _, cell_seeds, _ in group for s in cell_seeds]
        records = self.train_fn(cell.model, bank_images, bank_labels, index, val, test, seeds,
                                aug=cell.aug, device=self.device, **overrides)
        if len(records) != len(seeds):
            raise ValueError(f"train_fn returned {len(records)} records for {len(seeds)} "
                             f"repeats of {', '.join(c.key for c, _, _ in group)}")
        out, at = [], 0
        for _, cell_seeds, _ in group:
            out.append(records[at:at + len(cell_seeds)])
            at += len(cell_seeds)
        return out

    def _fits(self, cell: Cell, repeats: int, skipped: bool) -> bool:
        """Whether ``repeats`` of ``cell`` fit the time left. Once a cell has been skipped
        for time, a cell whose time cannot be judged (no cell of its model seen, no
        benchmark of this card) is skipped too: little time is left, and the hard stop
        would lose it whole."""
        if not self.budget.allows(cell, repeats):
            return False
        return not (skipped and self.budget.limit is not None
                    and self.budget.expected(cell, repeats) <= 0)

    def _waiting_for_generators(self, cell: Cell, todo: dict, blocked: dict) -> list[int]:
        """The repeats of ``cell`` that need a generator not trained and not to be trained
        in this call; where there are some, ``blocked`` says which and how to train it."""
        from .synthetic.diffusion import trained_generator

        if (cell.synthetic == "none" or self.train_generators or self.cfg["backend"] != "local"
                or self.synth_fn is not training_sets):  # another builder finds its own images
            return []
        self._ensure_data()
        missing: dict[int, str] = {}  # generator -> why, each looked up once
        for g in sorted({repeat_seeds(r, self.cfg).sample_index for r in todo[cell]}):
            try:
                trained_generator(self.data, self.split, generator_fraction(cell, self.cfg), g,
                                  leaky=cell.generator == "leaky")
            except FileNotFoundError as err:
                missing[g] = str(err)
        waiting = [r for r in todo[cell] if repeat_seeds(r, self.cfg).sample_index in missing]
        if waiting:
            why = next(iter(missing.values()))
            blocked[cell.key] = (f"{len(waiting)} repeat(s) wait: {why}"
                                 if self.available_generators and len(waiting) < len(todo[cell])
                                 else why)
        return waiting

    def ready_repeats(self, cell: Cell, repeats: list[int]) -> list[int]:
        """With ``available_generators``: the ``repeats`` whose generator is trained."""
        from .synthetic.diffusion import trained_generator

        if not self.available_generators or self.cfg["backend"] != "local":
            return []
        ready = {}
        for g in sorted({repeat_seeds(r, self.cfg).sample_index for r in repeats}):
            try:
                trained_generator(self.data, self.split, generator_fraction(cell, self.cfg), g,
                                  leaky=cell.generator == "leaky")
                ready[g] = True
            except FileNotFoundError:
                ready[g] = False
        return [r for r in repeats if ready[repeat_seeds(r, self.cfg).sample_index]]

    def trained_generators(self, cell: Cell, repeats: list[int]) -> bool:
        """Train or resume the generators ``repeats`` of ``cell`` use; True once all are done."""
        from .synthetic.diffusion import train_for_sample, trained_generator

        if self.cfg["backend"] != "local":
            return False  # other backends learn nothing here: nothing to train
        leaky = cell.generator == "leaky"
        for g in sorted({repeat_seeds(r, self.cfg).sample_index for r in repeats}):
            minutes = self.budget.minutes_for_generators(cell, len(repeats))
            if minutes is not None and minutes <= 0:
                return False
            fraction = generator_fraction(cell, self.cfg)
            train_for_sample(self.data, self.split, fraction, g, leaky=leaky,
                             minutes=minutes, device=self.device, progress=self.progress)
            try:
                trained_generator(self.data, self.split, fraction, g, leaky=leaky)
            except FileNotFoundError:
                return False  # stopped by the time budget; the next chunk resumes it
        return True

    def _ensure_data(self) -> None:
        """Data, split and the shared columns, loaded only once a cell needs training."""
        import torch

        from .data import check_nested, load_mri, split_mri

        if self.data is None:
            self.data = grid_data(load_mri(self.source), self.cfg)
        if self.split is None:
            self.split = split_mri(self.data)
            if self.cfg.get("generator_fraction") is not None:  # generators serve larger X
                sizes = torch.bincount(self.data.labels[self.split.train],
                                       minlength=len(self.data.classes))
                check_nested(sizes.numpy(), {*self.cfg["fractions"],
                                             self.cfg["generator_fraction"]}, self.data.classes)
        if self.base is None:
            self.base = {"preset": self.preset,
                         **provenance(self.device), "data_fingerprint": self.data.fingerprint,
                         "n_images": len(self.data),
                         "split_seed": self.split.seed, "classes": list(self.data.classes),
                         "samples": self.cfg["samples"], "backend": self.cfg["backend"],
                         "config": self.cfg}


def grid_status(preset: str | None = None, results_path: str | os.PathLike | None = None,
                **overrides):
    """A DataFrame: each cell of ``preset``'s grid with its finished and total repeats."""
    import pandas as pd

    preset = preset or paths.preset_name()
    cfg = grid_settings(preset, **overrides)
    cells = grid_cells(preset, **overrides)
    with preset_env(preset):
        directory = grid_results_dir(cfg, results_path)
        designs = {c: cell_design(cfg, preset, c) for c in cells}
    runs, _ = _read_jsonl(directory / RUNS_FILE)
    done = {r["run_key"] for r in runs}
    return pd.DataFrame([{"cell": c.key, "done": sum(run_key(c, r, designs[c]) in done
                                                      for r in range(cfg["repeats"])),
                          "repeats": cfg["repeats"]} for c in cells])


# ----------------------------------------------------------------------------- the chapter's runs

TRAIN_ON_DEMAND = ("quick",)  # presets whose grid chapter_results trains itself: CPU minutes


@dataclass
class ChapterResults:
    """The runs chapter 7 is drawn from, and a line that says where they came from."""

    runs: object          # pandas DataFrame, one row per training run (load_results)
    epochs: object        # pandas DataFrame, one row per run and epoch
    directory: Path       # the folder holding their runs.jsonl
    description: str      # committed full run, or a small CPU grid whose numbers mean nothing
    committed: bool       # True when read from the repository's results/
    note: str | None      # for figures: what the numbers are not (None for the full protocol)


def committed_results_dir() -> Path:
    """``results/`` of the repository: the committed rows of the full (thesis) GPU run."""
    return paths.ROOT / "results"


def chapter_results(preset: str | None = None, train: bool = True, progress: bool = True,
                    **grid_kwargs) -> ChapterResults:
    """The runs chapter 7 reads, by one rule for notebooks, ``report`` and ``make reproduce``.

    1. The committed ``results/`` holds runs: use them, whatever the preset (reading them
       takes seconds; figures still go to the preset's :func:`mrilib.paths.figures_dir`).
    2. Otherwise, in a preset of :data:`TRAIN_ON_DEMAND` (quick), run or resume that
       preset's grid with its generators (:func:`run_grid`, ``grid_kwargs`` passed on)
       into ``cache/<preset>/results`` and use it; ``train=False`` only reads it.
    3. Otherwise use the preset's own results folder if it holds runs (e.g. ``cell``),
       else raise FileNotFoundError with the commands that make them.

    Either folder is read by :func:`load_results`, one design per (preset, model): runs
    of a superseded design are set aside (with a :class:`MixedDesignsWarning`), and
    ``description`` says how many.
    """
    preset = preset or paths.preset_name()
    committed = committed_results_dir()
    if _run_count(committed):
        runs, epochs = load_results(committed)
        return ChapterResults(runs, epochs, committed,
                              _with_set_aside(_committed_line(runs, preset), runs), True,
                              preset_note(runs))
    with preset_env(preset):
        directory = paths.results_dir()
    if train and preset in TRAIN_ON_DEMAND:
        run_grid(preset, train_generators=True, resume=True, progress=progress, **grid_kwargs)
    if not _run_count(directory):
        also = "" if directory == committed else \
            f", nor does {_shown(directory)}/ for the {preset!r} preset"
        raise FileNotFoundError(
            f"{_shown(committed)}/ holds no runs yet (the full GPU grid has not been run and "
            f"committed){also}. On a GPU run "
            f"`python -m mrilib grid --preset {preset} --train-generators --resume` (again "
            f"after any interruption; --max-minutes M time-boxes a chunk) and rerun; or see "
            f"the chapter on a small CPU grid with MRILIB_PRESET=quick (numbers test the "
            f"code only)")
    runs, epochs = load_results(directory)
    return ChapterResults(runs, epochs, directory,
                          _with_set_aside(_local_line(runs, preset, directory), runs), False,
                          preset_note(runs))


def _with_set_aside(line: str, runs) -> str:
    """``line`` plus what :func:`load_results` set aside to keep one design per model."""
    aside = runs.attrs.get("set_aside")
    return line if not aside else f"{line} {aside['short']}"


def needs_grid(preset: str | None = None) -> bool:
    """Whether ``make reproduce`` must train ``preset``'s grid before the notebooks.

    Not when :func:`chapter_results` would read the committed ``results/`` anyway: in
    the thesis preset once they hold every run of the grid under the current training
    protocol (counted by run key, as ``grid --resume`` counts them, so runs of an older
    design do not count; a partial committed run is resumed), in the other presets once
    they hold any runs.
    """
    preset = preset or paths.preset_name()
    if preset != "thesis":
        return not _read_jsonl(committed_results_dir() / RUNS_FILE)[0]
    status = grid_status("thesis", committed_results_dir())
    return bool((status["done"] < status["repeats"]).any())


def preset_note(runs) -> str | None:
    """What runs of a reduced preset are not (a line for figures); None for the thesis's."""
    presets = sorted({str(p) for p in runs["preset"].dropna()}) if "preset" in runs else []
    if not presets or presets == ["thesis"]:
        return None
    return (f"{'/'.join(presets)} preset: {_epochs_of(runs)}-epoch models on "
            f"{_values(runs, 'n_images')} of the 6,400 slices; the numbers test the code only.")


def _run_count(directory: Path) -> int:
    return len(_read_jsonl(Path(directory) / RUNS_FILE)[0])


def _complete_cells(rows: Iterable[dict], preset: str, **overrides) -> tuple[int, int]:
    """(cells of ``preset``'s grid with all repeats, cells with any) among ``rows``, by cell key."""
    from collections import Counter

    counts = Counter(r["cell_key"] for r in rows)
    repeats = settings(DEFAULTS, PRESETS, preset)["repeats"]
    keys = [c.key for c in grid_cells(preset, **overrides)]
    return sum(counts[k] >= repeats for k in keys), sum(counts[k] > 0 for k in keys)


def _shown(directory: Path) -> str:
    """``directory`` relative to the repository where it lies inside it."""
    directory = Path(directory).resolve()
    root = paths.ROOT.resolve()
    return str(directory.relative_to(root)) if directory.is_relative_to(root) else str(directory)


def _values(runs, column: str) -> str:
    if column not in runs:
        return "unknown"
    return ", ".join(sorted({str(v) for v in runs[column].dropna()})) or "unknown"


def _epochs_of(runs) -> str:
    settings_ = runs["train_settings"] if "train_settings" in runs else []
    epochs = sorted({int(s["epochs"]) for s in settings_ if isinstance(s, dict) and "epochs" in s})
    return "/".join(map(str, epochs)) or "?"


def _committed_line(runs, preset: str) -> str:
    complete, started = _complete_cells(runs.to_dict("records"), "thesis")
    total = len(grid_cells("thesis"))
    state = ("complete" if complete == total
             else f"partial: {complete} of {total} cells complete, {started} started")
    commits = ", ".join(c[:10] for c in _values(runs, "git_commit").split(", "))
    where = ("" if preset == "thesis" else f"; read under the {preset} preset, figures go to "
             f"{_shown(paths.CACHE / preset / 'figures')}/")
    return (f"Committed full run ({_shown(committed_results_dir())}/, {state}): {len(runs)} "
            f"runs on {_values(runs, 'device_name')}, commit {commits}{where}.")


def folder_line(runs, directory: Path) -> str:
    """What a results folder named explicitly holds of its grid: a report's first line."""
    presets = sorted({str(p) for p in runs["preset"].dropna()}) if "preset" in runs else []
    line = f"Runs read from {_shown(directory)}/: {len(runs)} runs"
    models = [m for m in MODELS if "model" in runs and (runs["model"] == m).any()]
    if len(presets) == 1 and models:
        try:
            complete, started = _complete_cells(runs.to_dict("records"), presets[0],
                                                models=models)
            line += (f", {complete} of {len(grid_cells(presets[0], models=models))} cells of "
                     f"the {presets[0]} grid's {', '.join(models)} complete, {started} started")
        except (KeyError, ValueError):  # a preset this code no longer has
            pass
    return _with_set_aside(line + ".", runs)


def _local_line(runs, preset: str, directory: Path) -> str:
    complete, _ = _complete_cells(runs.to_dict("records"), preset)
    kind = "Quick CPU grid" if preset == "quick" else f"The {preset!r} preset's grid"
    line = (f"{kind} ({_shown(directory)}/): {len(runs)} runs, {complete} of "
            f"{len(grid_cells(preset))} cells complete, {_epochs_of(runs)} epoch(s) on "
            f"{_values(runs, 'n_images')} of the 6,400 slices")
    return line + (": numbers test the code only, not the thesis." if preset == "quick" else ".")
