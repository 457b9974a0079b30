"""What a run of the grid is: its seeds, its settings and the key that names it.

A run's key is ``<cell key>/r<repeat>@<design>``. The design hashes everything that
changes what the run trains (:func:`design_hash`); synthetic cells add their generator's
(:func:`generator_hash`). A changed default so retrains instead of mixing two protocols
in one table, and settings that only change how a run is batched or timed (each module's
``RUN_ONLY``) leave the key as it was.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..config import settings
from .cells import DEFAULTS, MODELS, PRESETS, RUN_ONLY, Cell


@dataclass(frozen=True)
class RepeatSeeds:
    """The seeds of repeat ``repeat``: real sample ``sample_index`` drawn with ``sample_seed``."""

    repeat: int
    sample_index: int
    sample_seed: int
    train_seed: int
    synth_seed: int


def repeat_seeds(repeat: int, cfg: dict) -> RepeatSeeds:
    """Seeds of one repeat under the sampling design of :mod:`mrilib.grid`."""
    g = repeat % cfg["samples"]
    s = cfg["seeds"]
    draw = g if cfg["variations"] == "per_generator" else repeat
    return RepeatSeeds(repeat, g, g, s["train"] + repeat, s["synthetic"] + draw)


def grid_settings(preset: str | None = None, **overrides) -> dict:
    """The grid settings in force for ``preset``, checked."""
    cfg = settings(DEFAULTS, PRESETS, preset or paths.preset_name(), **overrides)
    if cfg["variations"] not in ("per_generator", "per_repeat"):
        raise ValueError(f"variations={cfg['variations']!r}: give 'per_generator' (one draw "
                         f"per generator, shared by its repeats) or 'per_repeat'")
    if isinstance(cfg["samples"], bool) or not isinstance(cfg["samples"], int) \
            or cfg["samples"] < 1:
        raise ValueError(f"samples={cfg['samples']!r}: give a positive whole number of real "
                         f"samples (and generators) per fraction, e.g. 5")
    _check_imagenet(cfg["imagenet"])
    return cfg


def _check_imagenet(imagenet) -> None:
    """``imagenet`` names models with ImageNet weights, each True (the hub) or a file."""
    from ..models import model_spec

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


def design_hash(cfg: dict, preset: str, model: str) -> str:
    """8 hex digits over everything that changes what a run of ``model`` trains.

    The grid settings outside its ``RUN_ONLY``, the preset, the splits' settings
    (:func:`mrilib.splits.design_settings`) and the training settings of ``model``
    (:func:`mrilib.train.design_settings`). Call it under :func:`mrilib.paths.preset_env`,
    as the training engine reads the preset too.
    """
    from ..config import design_view, hash8
    from ..splits import design_settings as data_design
    from ..train import design_settings

    relevant = design_view(cfg, RUN_ONLY + ("train", "imagenet"))
    relevant.update(preset=preset, data=data_design(),
                    training=design_settings(model, **train_overrides(cfg, model)))
    return hash8(relevant)


def generator_hash(cfg: dict) -> str:
    """8 hex digits over what the grid's synthetic images depend on (the backend's
    ``design_settings``, as in force now)."""
    from ..config import hash8

    return hash8(generator_settings(cfg["backend"]))


def generator_settings(backend: str) -> dict:
    """What the synthetic images of ``backend`` depend on: its module's ``design_settings``."""
    if backend == "local":
        from ..synthetic.diffusion import design_settings
    elif backend == "openai":
        from ..synthetic.openai_backend import design_settings
    else:
        raise ValueError(f"backend={backend!r}: the grid knows the generator settings of "
                         f"'local' and 'openai' only")
    return design_settings()


def cell_design(cfg: dict, preset: str, cell: Cell) -> str:
    """The design of ``cell``'s runs: :func:`design_hash`, and for synthetic cells
    ``<design_hash>+<generator_hash>``, so that a new generator recipe retrains the
    synthetic cells while the real-only cells keep their runs. Rows store the two parts as
    ``design`` and ``generator_design``."""
    design = design_hash(cfg, preset, cell.model)
    return design if cell.synthetic == "none" else f"{design}+{generator_hash(cfg)}"


def run_key(cell: Cell, repeat: int, design: str) -> str:
    """The stable id of one run: ``<cell key>/r<repeat>@<design>`` (:func:`cell_design`)."""
    return f"{cell.key}/r{repeat:02d}@{design}"
