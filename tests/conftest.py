"""Shared fixtures: the real dataset when it is there, tiny image folders made on the spot."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mrilib.paths import SHARED_DATA

os.environ.setdefault("MRILIB_PRESET", "quick")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may wait on the unreachable hub

import torch  # noqa: E402

# On a shared 2-core machine two OpenMP threads spin-wait on each other: one is faster.
torch.set_num_threads(1)


def real_data_path() -> Path | None:
    """The real dataset: $MRILIB_DATA if it exists, else ../shared/data/alzheimer_mri."""
    for candidate in (os.environ.get("MRILIB_DATA"), SHARED_DATA):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def mri_path() -> Path:
    path = real_data_path()
    if path is None:
        pytest.skip("real dataset not found (set MRILIB_DATA or put ../shared/data/alzheimer_mri beside the repo)")
    return path


@pytest.fixture(scope="session")
def mri(mri_path):
    """The real 6,400 slices at 128x128 (decoded once, then from cache/)."""
    from mrilib.data import load_mri
    return load_mri(mri_path)


def write_image_folder(root: Path, per_class: dict[str, int], size=(40, 40), mode="L",
                       fmt="PNG", seed: int = 0) -> Path:
    """A tiny Kaggle-layout folder of random images: ``root/<class>/<i>.<fmt>``."""
    rng = np.random.default_rng(seed)
    suffix = {"PNG": "png", "JPEG": "jpg"}[fmt]
    for c, (name, n) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
            arr[..., :4, :4] = c * 60  # a class-dependent corner so classes differ
            Image.fromarray(arr, mode=mode).save(root / name / f"{name}_{i}.{suffix}", format=fmt)
    return root


@pytest.fixture
def image_folder(tmp_path, monkeypatch):
    """Factory for tiny image folders; also points the cache at tmp_path."""
    import mrilib.data as data_mod
    monkeypatch.setattr(data_mod, "CACHE", tmp_path / "cache")

    def make(per_class=None, **kw):
        per_class = per_class or {"Mild_Demented": 6, "Moderate_Demented": 3,
                                  "Non_Demented": 10, "Very_Mild_Demented": 8}
        return write_image_folder(tmp_path / "mri", per_class, **kw)
    return make


@pytest.fixture(scope="session")
def grid_env(tmp_path_factory, mri_path):
    """The environment of a child ``python -m mrilib grid``: this checkout, the real data, a
    cache of its own (no generators: synthetic cells wait), one thread."""
    from mrilib.paths import ROOT

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                         os.environ.get("PYTHONPATH", "")]),
            "MRILIB_PRESET": "quick", "MRILIB_DATA": str(mri_path),
            "MRILIB_CACHE": str(tmp_path_factory.mktemp("grid-cache")),
            "OMP_NUM_THREADS": "1"}
