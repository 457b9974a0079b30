"""The mixing policy (thesis ch. 6.3) on a small made-up pool, with a cheap dummy backend."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from mrilib.data import CLASSES, MRIData
from mrilib.splits import split_mri
from mrilib.synthetic.base import Backend, BudgetExceeded, Refused, variation_seed
from mrilib.synthetic.mixing import (allocate, mixed_training_set, real_sample, round_robin,
                                     stack_repeats)

# Class shares close to the thesis's pool (Mild 14%, Moderate 1%, Non 50%, VeryMild 35%).
PER_CLASS = (24, 6, 84, 60)


class ShiftBackend(Backend):
    """Variation = source + (seed mod 251), mod 256: cheap, deterministic, traceable."""

    name = "shift"

    def __init__(self, refuse_every: int | None = None, budget: int | None = None,
                 sample_seed: int | None = None):
        self.refuse_every, self.budget, self.made = refuse_every, budget, 0
        self.max_batch = 1 if refuse_every else None
        if sample_seed is not None:
            self.sample_seed = sample_seed

    def params(self) -> dict:
        return {"rule": "add seed mod 251", "refuse_every": self.refuse_every}

    def generate(self, images, labels, seeds):
        if self.budget is not None and self.made + len(images) > self.budget:
            raise BudgetExceeded(f"budget of {self.budget} images reached")
        if self.refuse_every and seeds[0] % self.refuse_every == 0:
            raise Refused("content policy (test)")
        self.made += len(images)
        shift = torch.tensor([s % 251 for s in seeds], dtype=torch.int16)[:, None, None, None]
        return ((images.to(torch.int16) + shift) % 256).to(torch.uint8)


class RecordBackend(ShiftBackend):
    """A backend that says which real images it learned from, like the local generator."""

    def __init__(self, train_ids, leaky=False):
        super().__init__()
        self.training_record = {"train_ids": sorted(train_ids), "n_images": len(train_ids),
                                "leaky": leaky}


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(PER_CLASS)])
    images = torch.from_numpy(rng.integers(0, 256, (len(labels), 1, 128, 128), dtype=np.uint8))
    ids = [f"{i:04d}{rng.integers(1 << 30):08x}" for i in range(len(labels))]
    data = MRIData(images, labels, CLASSES, ids, "made-up", "fp")
    return data, split_mri(data)


@pytest.fixture
def cache_root(tmp_path):
    return tmp_path / "synthetic"


def mix(pool, cache_root, x, y, classes="all", seed=0, backend=None, **kw):
    data, split = pool
    backend = ShiftBackend() if backend is None else backend
    return mixed_training_set(data, split, x, y, classes, seed=seed, backend=backend,
                              cache_root=cache_root, progress=False, **kw)


@pytest.mark.parametrize("x, y, classes", [
    (0.3, 0.7, "all"),                   # thesis: 30% real + 70% synthetic = the pool's size
    (0.8, 0.2, "all"),
    (1.0, 0.2, ["Moderate_Demented"]),  # thesis: 100% real + 20% synthetic, Moderate only
])
def test_counts_per_class(pool, cache_root, x, y, classes):
    data, split = pool
    images, labels, index, info = mix(pool, cache_root, x, y, classes)
    pool_counts = np.array([data.counts(split.train)[c] for c in CLASSES])
    n_pool = len(split.train)

    real_counts = np.array([info["counts"]["real"][c] for c in CLASSES])
    assert real_counts.sum() == info["n_real"] == round(x * n_pool)
    assert np.all(np.abs(real_counts - x * pool_counts) <= 1)  # stratified

    syn = np.array([info["counts"]["synthetic"][c] for c in CLASSES])
    assert syn.sum() == info["n_synthetic"] == round(y * n_pool)
    if classes == "all":
        assert syn.tolist() == allocate(round(y * n_pool), pool_counts).tolist()
    else:
        assert syn.tolist() == [0, round(y * n_pool), 0, 0]
    if (x, y) == (0.3, 0.7):
        assert abs(len(labels) - n_pool) <= 1

    assert images.dtype == torch.uint8 and images.shape == (len(labels), 1, 128, 128)
    assert index.shape == (1, len(labels))
    assert torch.bincount(labels, minlength=4).tolist() == (real_counts + syn).tolist()

    # round-robin: within a class, sources differ by at most one variation
    per_source = Counter(info["synthetic_sources"])
    label_of = dict(zip(data.ids, data.labels.tolist()))
    for c in range(4):
        counts = [per_source[sid] for sid in info["real_ids"] if label_of[sid] == c]
        if syn[c]:
            assert sum(counts) == syn[c] and max(counts) - min(counts) <= 1


def test_sources_are_sample_images_only(pool, cache_root):
    data, split = pool
    images, labels, _, info = mix(pool, cache_root, 0.3, 0.3, seed=3)
    held_out = {data.ids[i] for i in torch.cat([split.val, split.test]).tolist()}
    sample = set(info["real_ids"])
    assert sample <= {data.ids[i] for i in split.train.tolist()}
    assert not sample & held_out
    assert set(info["synthetic_sources"]) <= sample
    row_of = {u: i for i, u in enumerate(data.ids)}
    n_real = info["n_real"]
    for j, sid in enumerate(info["synthetic_sources"]):
        src = data.images[row_of[sid]]
        diff = (images[n_real + j].to(torch.int16) - src.to(torch.int16)) % 256
        assert diff.unique().numel() == 1, "a synthetic image must be a variation of its source"
        assert labels[n_real + j] == data.labels[row_of[sid]]


def test_seeds(pool, cache_root):
    a = mix(pool, cache_root, 0.3, 0.2, seed=1)
    b = mix(pool, cache_root, 0.3, 0.2, seed=2)
    again = mix(pool, cache_root, 0.3, 0.2, seed=1)
    assert set(a[3]["real_ids"]) != set(b[3]["real_ids"])  # a new sample per repeat
    assert torch.equal(a[0], again[0]) and a[3]["real_ids"] == again[3]["real_ids"]
    assert again[3]["cache"]["generated"] == 0 and again[3]["cache"]["cached"] > 0

    # Same sample (shared generator), different seeds: new variations of the same images.
    c = mix(pool, cache_root, 0.3, 0.2, seed=1, sample_seed=7)
    d = mix(pool, cache_root, 0.3, 0.2, seed=2, sample_seed=7)
    assert c[3]["real_ids"] == d[3]["real_ids"]
    n_real = c[3]["n_real"]
    assert not torch.equal(c[0][n_real:], d[0][n_real:])


def test_sample_seed_comes_from_backend(pool, cache_root):
    data, split = pool
    info = mix(pool, cache_root, 0.3, 0.2, seed=9, backend=ShiftBackend(sample_seed=4))[3]
    assert info["sample_seed"] == 4 and info["seed"] == 9
    expected = real_sample(data, split, 0.3, 4)
    assert info["real_ids"] == [data.ids[i] for i in expected.tolist()]
    same = mix(pool, cache_root, 0.3, 0.2, seed=9, backend=ShiftBackend(sample_seed=4),
               sample_seed=4)[3]
    assert same["real_ids"] == info["real_ids"]
    with pytest.raises(ValueError, match="sample_seed=1, but the backend's generator belongs "
                                         "to sample 4"):
        mix(pool, cache_root, 1.0, 0.2, seed=9, backend=ShiftBackend(sample_seed=4),
            sample_seed=1)


def test_no_synthetic_needs_no_backend(pool, cache_root):
    data, split = pool
    images, labels, index, info = mixed_training_set(data, split, 0.5, 0.0, seed=0)
    assert info["n_synthetic"] == 0
    assert len(labels) == info["n_real"] == round(0.5 * len(split.train))


@pytest.mark.parametrize("kwargs, match", [
    ({"real_fraction": 0.0}, "real_fraction"),
    ({"synthetic_fraction": -0.1}, "synthetic_fraction"),
    ({"classes": ["ModerateDemented"]}, "Moderate_Demented"),
    ({"backend": None}, "needs a backend"),
])
def test_bad_input_names_the_value(pool, kwargs, match):
    data, split = pool
    args = {"real_fraction": 0.3, "synthetic_fraction": 0.7, "classes": "all",
            "backend": ShiftBackend()} | kwargs
    with pytest.raises(ValueError, match=match):
        mixed_training_set(data, split, args["real_fraction"], args["synthetic_fraction"],
                           args["classes"], seed=0, backend=args["backend"])


def test_leakage_is_refused(pool, cache_root):
    data, split = pool
    from mrilib.synthetic.diffusion import LeakageError

    sample = real_sample(data, split, 0.3, 0)
    own = [data.ids[i] for i in sample.tolist()]
    ok = mix(pool, cache_root, 0.3, 0.1, seed=0, backend=RecordBackend(own))
    assert ok[3]["leaky"] is False

    other = [data.ids[i] for i in real_sample(data, split, 0.3, 1).tolist()]
    with pytest.raises(LeakageError, match="outside"):
        mix(pool, cache_root, 0.3, 0.1, seed=0, backend=RecordBackend(other))

    pool_ids = [data.ids[i] for i in split.train.tolist()]
    with pytest.raises(LeakageError, match="allow_leaky"):
        mix(pool, cache_root, 0.3, 0.1, seed=0, backend=RecordBackend(pool_ids, leaky=True))
    leaky = mix(pool, cache_root, 0.3, 0.1, seed=0, backend=RecordBackend(pool_ids, leaky=True),
                allow_leaky=True)
    assert leaky[3]["leaky"] is True
    test_id = data.ids[int(split.test[0])]
    with pytest.raises(LeakageError):  # even the ablation may not have seen a test image
        mix(pool, cache_root, 0.3, 0.1, seed=0, allow_leaky=True,
            backend=RecordBackend(pool_ids + [test_id], leaky=True))


def test_refusals_are_replaced(pool, cache_root):
    backend = ShiftBackend(refuse_every=5)
    _, labels, _, info = mix(pool, cache_root, 0.3, 0.2, seed=0, backend=backend)
    assert info["cache"]["refused"] > 0
    assert info["n_synthetic"] == round(0.2 * len(pool[1].train))


def test_budget_stop_is_an_error(pool, cache_root):
    with pytest.raises(ValueError, match="budget"):
        mix(pool, cache_root, 0.3, 0.2, seed=0, backend=ShiftBackend(budget=5))


def test_stack_repeats(pool, cache_root):
    sets = [mix(pool, cache_root, 0.8, 0.1, seed=r) for r in range(3)]
    bank, labels, index, infos = stack_repeats(sets)
    n = sets[0][2].shape[1]
    assert index.shape == (3, n) and index.dtype == torch.long
    for k, (images_k, labels_k, _, _) in enumerate(sets):
        assert torch.equal(bank[index[k]], images_k)
        assert torch.equal(labels[index[k]], labels_k)
    assert len(bank) < sum(len(s[1]) for s in sets)  # shared real images stored once
    assert len(infos) == 3
    smaller = mix(pool, cache_root, 0.3, 0.2, seed=0)
    with pytest.raises(ValueError, match="different sizes"):
        stack_repeats(sets + [smaller])


@pytest.mark.parametrize("total, weights", [(10, [1, 1, 1]), (7, list(PER_CLASS)), (0, [1, 2])])
def test_allocate_sums_and_follows_weights(total, weights):
    counts = allocate(total, weights)
    assert counts.sum() == total
    exact = total * np.array(weights) / sum(weights)
    assert np.all(np.abs(counts - exact) < 1)


def test_round_robin():
    counts = round_robin(4, 10, np.random.default_rng(0))
    assert sorted(counts.tolist()) == [2, 2, 3, 3]
    assert round_robin(3, 2, np.random.default_rng(0)).sum() == 2


def test_variation_seeds_are_the_caches(pool, cache_root):
    """Variation k of a source in the bank is the backend's output for variation_seed(seed, id, k)."""
    data, split = pool
    images, _, _, info = mix(pool, cache_root, 1.0, 0.2, ["Moderate_Demented"], seed=5)
    n_real = info["n_real"]
    first = info["synthetic_sources"][0]
    row = data.ids.index(first)
    seeds = [variation_seed(5, first, k) for k in range(info["synthetic_sources"].count(first))]
    expected = ShiftBackend().generate(data.images[[row] * len(seeds)],
                                       data.labels[[row] * len(seeds)], seeds)
    got = images[n_real:][[i for i, s in enumerate(info["synthetic_sources"]) if s == first]]
    assert torch.equal(got, expected)
