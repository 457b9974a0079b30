"""Every key of a result ignores exactly its module's RUN_ONLY settings.

For each module that keys a result (a classifier's design and cache file, a generator's
folder and design, the OpenAI backend's design, the synthetic image cache), changing any
run-only setting leaves the key as it was and changing any other setting changes it. The
changes below cover every setting of each module's DEFAULTS, so a new setting must be
placed on one side or the other here.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from mrilib import train
from mrilib.config import design_view, hash8
from mrilib.synthetic import cache_key
from mrilib.synthetic import diffusion
from mrilib.synthetic import openai_backend as openai_mod


def _changed(value):
    """Another valid-looking value of the same kind as ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, str):
        return value + " changed"
    if isinstance(value, tuple):
        return value + value[-1:]
    raise TypeError(f"no automatic change for {value!r}; give one in the test's table")


def _changes(defaults: dict, explicit: dict) -> dict:
    return {key: explicit[key] if key in explicit else _changed(value)
            for key, value in defaults.items()}


# ----------------------------------------------------------------------------- config helpers

def test_design_view_is_json_stable_and_leaves_out_what_it_is_told():
    view = design_view({"b": (1, 2), "a": {"y": (3,), "x": 1}, "skip": 5}, ("skip",))
    assert view == {"a": {"x": 1, "y": [3]}, "b": [1, 2]}
    assert list(view) == ["a", "b"] and list(view["a"]) == ["x", "y"]
    assert hash8(view) == hash8({"b": [1, 2], "a": {"y": [3], "x": 1}})
    assert len(hash8(view)) == 8 and hash8(view) != hash8({**view, "b": [2, 1]})


# ----------------------------------------------------------------------------- the classifier

TRAIN_MODEL = "resnet18"  # has ImageNet learning rates, so pretrained and weights apply


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "imagenet.pth"
    path.write_bytes(b"some weights")
    return path


def _train_changes(weights_file) -> dict:
    per_model = copy.deepcopy(train.PER_MODEL)
    per_model[TRAIN_MODEL]["batch_size"] += 1  # epochs would be hidden by the quick preset
    return _changes(train.DEFAULTS, {
        "epochs": 3, "patience": 3, "batch_size": 7, "lr": 0.5, "schedule": "cosine",
        "warmup_epochs": 2,
        "per_model": per_model, "weights": str(weights_file), "max_parallel": 3, "amp": "bf16",
        "num_classes": 3})


def _classifier_key(**overrides):
    data = SimpleNamespace(ids=[f"img{i}" for i in range(6)], images=torch.zeros(6, 1, 32, 32))
    return train._classifier_path(data, SimpleNamespace(seed=0), torch.arange(6), TRAIN_MODEL,
                                  0, "none", "cpu", **overrides).name


TRAIN_KEYS = {"design_settings": lambda **kw: hash8(train.design_settings(TRAIN_MODEL, **kw)),
              "trained_classifier": _classifier_key}


@pytest.mark.parametrize("key", list(train.DEFAULTS))
@pytest.mark.parametrize("keyed", list(TRAIN_KEYS))
def test_a_classifier_key_ignores_run_only_settings_only(keyed, key, weights_file):
    value = _train_changes(weights_file)[key]
    same = TRAIN_KEYS[keyed]() == TRAIN_KEYS[keyed](**{key: value})
    assert same == (key in train.RUN_ONLY), (keyed, key)


def test_a_weights_file_is_keyed_by_its_content_not_its_place(weights_file, tmp_path):
    moved = tmp_path / "elsewhere.pth"
    moved.write_bytes(weights_file.read_bytes())
    first = train.design_settings(TRAIN_MODEL, weights=str(weights_file))
    assert first == train.design_settings(TRAIN_MODEL, weights=str(moved))
    assert first["weights"].startswith("sha256:")
    moved.write_bytes(b"other weights")
    assert first != train.design_settings(TRAIN_MODEL, weights=str(moved))


# ----------------------------------------------------------------------------- the local generator

IDS = [f"img{i}" for i in range(8)]


def _generator_weights_key(**overrides):
    return diffusion.generator_dir(IDS, torch.arange(8) % 4, 0.3, 0, **overrides).name


def _generator_design(**overrides):
    return hash8(diffusion.design_settings(**overrides))


@pytest.mark.parametrize("key", list(diffusion.DEFAULTS))
def test_a_generator_folder_ignores_run_only_sampling_and_steps(key):
    value = _changed(diffusion.DEFAULTS[key])
    same = _generator_weights_key() == _generator_weights_key(**{key: value})
    assert same == (key in (*diffusion.RUN_ONLY, *diffusion.SAMPLING, "steps")), key


@pytest.mark.parametrize("key", list(diffusion.DEFAULTS))
def test_a_generator_design_ignores_run_only_settings_only(key):
    value = _changed(diffusion.DEFAULTS[key])
    same = _generator_design() == _generator_design(**{key: value})
    assert same == (key in diffusion.RUN_ONLY), key


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    rng = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 1, 128, 128), dtype=torch.uint8, generator=rng)
    return diffusion.train_generator(images, torch.arange(8) % 4, 0,
                                     tmp_path_factory.mktemp("generator"), ids=IDS,
                                     progress=False)


# LocalDiffusion's arguments that are settings of diffusion's DEFAULTS
LOCAL_ARGUMENTS = {"strength": 0.3, "ddim_steps": 3, "guidance_scale": 2.0,
                   "guidance_rescale": 0.2, "sample_batch": 3, "compile_sample": True}


@pytest.mark.parametrize("key", list(LOCAL_ARGUMENTS))
def test_the_local_image_cache_ignores_run_only_settings_only(key, tiny_generator):
    base = diffusion.LocalDiffusion(tiny_generator, device="cpu")
    other = diffusion.LocalDiffusion(tiny_generator, device="cpu", **{key: LOCAL_ARGUMENTS[key]})
    assert (cache_key(base, 0) == cache_key(other, 0)) == (key in diffusion.RUN_ONLY), key


# ----------------------------------------------------------------------------- the OpenAI backend

OPENAI_EXPLICIT = {"route": "variation", "max_images": 5, "max_cost": 5.0,
                   "usd_per_image": 0.5, "price_table": {"gpt-image-2": {"low": 0.5}}}


@pytest.mark.parametrize("key", list(openai_mod.DEFAULTS))
def test_the_openai_design_ignores_run_only_settings_only(key):
    value = _changes(openai_mod.DEFAULTS, OPENAI_EXPLICIT)[key]
    same = openai_mod.design_settings() == openai_mod.design_settings(**{key: value})
    assert same == (key in openai_mod.RUN_ONLY), key


@pytest.mark.parametrize("key", list(openai_mod.DEFAULTS))
def test_the_openai_image_cache_ignores_run_only_settings_only(key, monkeypatch):
    pytest.importorskip("openai")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    base = {"usd_per_image": 0.02, "base_url": "http://127.0.0.1:9"}  # nothing is sent
    value = _changes(openai_mod.DEFAULTS, OPENAI_EXPLICIT)[key]
    same = (cache_key(openai_mod.OpenAIBackend(**base), 0)
            == cache_key(openai_mod.OpenAIBackend(**{**base, key: value}), 0))
    assert same == (key in openai_mod.RUN_ONLY), key
