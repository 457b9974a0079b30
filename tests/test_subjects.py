"""mrilib.subjects: brains recovered from the slices, subject splits, the random-label check."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mrilib.subjects as subjects_mod
from mrilib.data import CLASSES, DataError, MRIData
from mrilib.splits import check_nested, pool_class_sizes, pool_sample, split_mri, stratified_sample
from mrilib.subjects import (check_disjoint, random_label_check, recover_subjects,
                             split_note, subject_counts, subject_ids, subject_recovery)

OASIS = {"Mild_Demented": 28, "Moderate_Demented": 2, "Non_Demented": 100,
         "Very_Mild_Demented": 70}  # OASIS-1's CDR 1, CDR 2, 100 of its CDR 0, CDR 0.5


def fake_brains(per_class=(3, 2, 4, 3), slices: int = 16, seed: int = 0) -> MRIData:
    """Tiny stacks that have the structure: every slice turns a brain's two random smooth
    patterns a little further, so a slice's nearest neighbours are the slices beside it."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c, n in enumerate(per_class):
        for _ in range(n):
            a, b = (torch.nn.functional.interpolate(torch.rand(1, 1, 6, 6, generator=g) - 0.5,
                                                    size=128, mode="bicubic") for _ in "ab")
            t = torch.arange(slices).view(-1, 1, 1, 1) * 0.08
            images.append((128 + 200 * (a * t.cos() + b * t.sin())).clamp(0, 255).byte())
            labels += [c] * slices
    images = torch.cat(images)
    ids = [f"{i * 7919 % 10007:05d}" for i in range(len(images))]  # ids not in load order
    return MRIData(images, torch.tensor(labels), CLASSES, ids, "fake", "f" * 16)


def pixel_shuffled(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Every image's pixels in its own random order: the intensities stay, the anatomy goes."""
    flat = images.flatten(1)
    order = torch.argsort(torch.rand(flat.shape, generator=torch.Generator().manual_seed(seed)))
    return torch.gather(flat, 1, order).view_as(images)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(subjects_mod, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


# ----------------------------------------------------------------------------- recovery

def test_real_data_are_200_brains_of_32_slices(mri):
    rec = recover_subjects(mri.images, mri.labels, mri.ids)
    assert rec.found, rec.reason
    assert rec.n_groups == 200 and rec.sizes.tolist() == [32] * 200
    assert rec.purity == 1.0 and rec.pure_groups == 200
    assert rec.by_class(mri.classes) == OASIS
    assert rec.reason == "200 groups of 32 images, every group of one class"
    assert rec.groups.min() == 0 and rec.groups[int(np.argmin(mri.ids))] == 0  # first member


def test_real_recovery_is_independent_of_image_order(mri):
    perm = torch.randperm(len(mri), generator=torch.Generator().manual_seed(5))
    shuffled = mri.subset(perm)
    a = recover_subjects(mri.images, mri.labels, mri.ids).groups
    b = recover_subjects(shuffled.images, shuffled.labels, shuffled.ids).groups
    assert torch.equal(b, a[perm])


@pytest.mark.parametrize("spoil, fails", [
    ("shuffled labels", "groups mix classes"),
    ("pixel-shuffled slices", "hold fewer than 8 images"),
    ("random images", "hold fewer than 8 images"),
])
def test_no_structure_is_said_not_invented(mri, spoil, fails):
    part = mri.subset(torch.arange(1600))  # a quarter of the slices keeps the test quick
    g = torch.Generator().manual_seed(1)
    images, labels = part.images, part.labels
    if spoil == "shuffled labels":
        labels = labels[torch.randperm(len(labels), generator=g)]
    elif spoil == "pixel-shuffled slices":
        images = pixel_shuffled(images)
    else:
        images = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=g)
    rec = recover_subjects(images, labels, part.ids)
    assert not rec.found
    assert rec.reason.startswith("no subject structure") and fails in rec.reason


def test_fake_brains_are_found_in_any_order():
    data = fake_brains()
    rec = recover_subjects(data.images, data.labels, data.ids)
    assert rec.found, rec.reason
    assert rec.n_groups == 12 and set(rec.sizes.tolist()) == {16}
    assert rec.class_groups == (3, 2, 4, 3)
    truth = torch.arange(12).repeat_interleave(16)
    assert all(len(torch.unique(truth[rec.groups == g])) == 1 for g in range(12))
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    again = recover_subjects(data.images[perm], data.labels[perm], [data.ids[i] for i in perm])
    assert torch.equal(again.groups, rec.groups[perm])


@pytest.mark.parametrize("override, fails", [({"min_slices": 17}, "fewer than 17"),
                                             ({"min_groups": 13}, "only 12 group(s)")])
def test_each_threshold_is_tested(override, fails):
    data = fake_brains()
    rec = recover_subjects(data.images, data.labels, data.ids, **override)
    assert not rec.found and fails in rec.reason


def test_subject_ids_are_cached_by_content_and_order_free(tmp_cache):
    data = fake_brains()
    first = subject_ids(data)
    assert len(list((tmp_cache / "subjects").glob("*.pt"))) == 1
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(2))
    assert torch.equal(subject_ids(data.subset(perm)), first[perm])  # read back from cache
    assert len(list((tmp_cache / "subjects").glob("*.pt"))) == 1
    subject_ids(data, k=3)  # other settings, other entry
    assert len(list((tmp_cache / "subjects").glob("*.pt"))) == 2


def test_subject_ids_refuse_data_without_structure(tmp_cache):
    data = fake_brains()
    data.images = pixel_shuffled(data.images)
    with pytest.raises(DataError, match=r"no subject structure.*Only split='slice'"):
        subject_ids(data)
    with pytest.raises(DataError, match="split='slice'"):
        split_mri(data, kind="subject")
    assert not subject_recovery(data).found


# ----------------------------------------------------------------------------- subject splits

def parts_of(split):
    return [set(split.groups[getattr(split, p)].tolist()) for p in ("train", "val", "test")]


def test_real_subject_split_counts_and_moderate_rule(mri):
    split = split_mri(mri, kind="subject")
    assert split.kind == "subject" and split.groups is not None
    train, val, test = parts_of(split)
    assert not (train & val or train & test or val & test) and len(train | val | test) == 200
    assert subject_counts(mri, split) == {
        "train": {"Mild_Demented": 20, "Moderate_Demented": 1, "Non_Demented": 72,
                  "Very_Mild_Demented": 50},
        "val": {"Mild_Demented": 2, "Moderate_Demented": 0, "Non_Demented": 8,
                "Very_Mild_Demented": 6},
        "test": {"Mild_Demented": 6, "Moderate_Demented": 1, "Non_Demented": 20,
                 "Very_Mild_Demented": 14}}
    assert len(split.test) == 41 * 32 and len(split.val) == 16 * 32
    assert split_note(mri, split) == (
        "Moderate_Demented is 2 brains: 1 in test, 1 in the training pool, none in "
        "validation (its test scores rest on one brain)")
    assert split_note(mri, split_mri(mri)) is None


@pytest.mark.parametrize("n_subjects, parts", [(1, (1, 0, 0)), (2, (1, 0, 1)), (3, (1, 1, 1)),
                                               (10, (7, 1, 2))])
def test_classes_of_few_subjects_keep_one_for_training_first(n_subjects, parts):
    labels = torch.tensor([0] * 10 + [1] * n_subjects + [2] * 10).repeat_interleave(4)
    data = MRIData(torch.zeros(len(labels), 1, 8, 8, dtype=torch.uint8), labels,
                   ("a", "b", "c"), [f"{i:04d}" for i in range(len(labels))], "toy", "t" * 16,
                   subjects=torch.arange(len(labels) // 4).repeat_interleave(4))
    split = split_mri(data, kind="subject")
    counts = subject_counts(data, split)
    assert tuple(counts[p]["b"] for p in ("train", "val", "test")) == parts
    note = split_note(data, split)
    assert (note is not None) == (n_subjects < 3)
    if note:
        assert note.startswith(f"b is {n_subjects} brain")


def test_subject_split_is_independent_of_load_order():
    data = fake_brains(per_class=(5, 3, 8, 6), slices=4)
    data.subjects = torch.arange(len(data) // 4).repeat_interleave(4)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))
    shuffled = data.subset(perm)
    for name in ("train", "val", "test"):
        a = {data.ids[i] for i in getattr(split_mri(data, kind="subject"), name).tolist()}
        b = {shuffled.ids[i] for i in getattr(split_mri(shuffled, kind="subject"), name).tolist()}
        assert a == b, name


def test_leaky_split_and_mixed_subjects_are_refused():
    data = fake_brains(slices=4)
    data.subjects = torch.arange(len(data) // 4).repeat_interleave(4)
    split = split_mri(data, kind="subject")
    leaky = type(split)(torch.cat([split.train, split.test[:1]]), split.val, split.test,
                        split.seed, "subject", split.groups)
    with pytest.raises(ValueError, match="has images in both train and test"):
        check_disjoint(leaky)
    data.labels = data.labels.clone()
    data.labels[0] = 3 - data.labels[0]
    with pytest.raises(DataError, match="several classes"):
        split_mri(data, kind="subject")
    with pytest.raises(ValueError, match="split kind 'brain'"):
        split_mri(data, kind="brain")


# ----------------------------------------------------------------------------- pool samples

def test_pool_sample_of_a_slice_split_is_todays_sample(mri):
    split = split_mri(mri)
    for fraction, seed in ((0.3, 0), (0.7, 4), (1.0, 2)):
        assert torch.equal(pool_sample(mri, split, fraction, seed),
                           stratified_sample(mri.labels, fraction, seed, pool=split.train,
                                             ids=mri.ids))


@pytest.mark.parametrize("seed", [0, 7])
def test_pool_sample_of_a_subject_split_is_whole_nested_subjects(mri, seed):
    from mrilib.grid import FRACTIONS

    split = split_mri(mri, kind="subject")
    sizes = pool_class_sizes(mri, split)
    assert sizes.tolist() == [20, 1, 72, 50]
    check_nested(sizes, FRACTIONS, mri.classes)
    previous = set()
    for fraction in FRACTIONS:
        index = pool_sample(mri, split, fraction, seed)
        chosen = torch.unique(split.groups[index])
        assert torch.equal(torch.isin(split.groups, chosen).nonzero().flatten(), index)
        assert set(index.tolist()) <= set(split.train.tolist())
        assert previous <= set(chosen.tolist())
        previous = set(chosen.tolist())
        per_class = torch.bincount(mri.labels[index], minlength=4) // 32
        assert np.all(np.abs(per_class.numpy() - fraction * sizes) <= 1)
    assert previous == set(split.groups[split.train].tolist())


def test_group_sample_order_free_and_seeded():
    labels = torch.tensor([0] * 6 + [1] * 6).repeat_interleave(3)
    groups = torch.arange(12).repeat_interleave(3)
    ids = [f"{(i * 37) % 101:03d}" for i in range(36)]
    a = stratified_sample(labels, 0.5, 1, ids=ids, groups=groups)
    perm = torch.randperm(36, generator=torch.Generator().manual_seed(0))
    b = stratified_sample(labels[perm], 0.5, 1, ids=[ids[i] for i in perm], groups=groups[perm])
    assert {ids[i] for i in a.tolist()} == {ids[perm[i]] for i in b.tolist()}
    assert len(a) == 18 and torch.bincount(labels[a]).tolist() == [9, 9]
    others = [stratified_sample(labels, 0.5, s, ids=ids, groups=groups) for s in range(2, 6)]
    assert any(not torch.equal(a, o) for o in others)


# ----------------------------------------------------------------------------- random labels

def test_random_labels_score_above_chance_only_on_a_slice_split(mri):
    """The basic CNN on random brain labels (16 brains, 6 epochs; about 30 s): above chance
    when test slices' brains were trained on, at chance when the split keeps them apart."""
    small = dict(subjects=16, test_frac=0.5, epochs=6, batch_size=16, seeds=(0,), label_seed=0)
    by_slice = random_label_check(mri, "slice", **small)
    by_subject = random_label_check(mri, "subject", **small)
    assert by_slice["test_subjects_in_train"] == 16 and by_subject["test_subjects_in_train"] == 0
    assert by_subject["test_subjects"] == 8
    slice_acc, subject_acc = by_slice["test_acc"][0], by_subject["test_acc"][0]
    assert slice_acc > 0.5, by_slice
    # 8 test brains guessed at chance get 5 or more right with probability 3%
    assert subject_acc < 0.6 and slice_acc - subject_acc > 0.2, (by_slice, by_subject)


def test_a_corrupt_recovery_cache_entry_is_recovered_again_with_a_warning(tmp_path, monkeypatch):
    import mrilib.subjects as subjects
    from mrilib.data import CLASSES, MRIData

    monkeypatch.setattr(subjects, "CACHE", tmp_path)
    images = torch.randint(0, 256, (24, 1, 128, 128), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    data = MRIData(images, torch.arange(24) % 4, CLASSES, [f"{i:03d}" for i in range(24)],
                   "made", "fp")
    first = subjects.subject_recovery(data)
    (entry,) = (tmp_path / "subjects").glob("*.pt")
    entry.write_bytes(entry.read_bytes()[:40])  # cut short, as by a full disk
    with pytest.warns(UserWarning, match="unreadable.*recovering the subjects again"):
        again = subjects.subject_recovery(data)
    assert torch.equal(again.groups, first.groups) and again.found == first.found


def test_a_kept_random_label_check_is_read_not_retrained(mri, tmp_path, monkeypatch):
    """Chapter 1 reads the committed check; other settings or another split train anew."""
    small = dict(subjects=8, test_frac=0.5, epochs=1, batch_size=16, seeds=(0,), label_seed=0)
    path = tmp_path / "random_labels.json"
    first = subjects_mod.kept_random_label_check(mri, "slice", path, **small)
    assert {"git_commit", "torch", "device_name", "finished_at"} <= set(first)  # provenance
    monkeypatch.setattr(subjects_mod, "random_label_check",
                        lambda *a, **k: pytest.fail("a kept result was trained again"))
    assert subjects_mod.kept_random_label_check(mri, "slice", path, **small) == first
    trained = []
    monkeypatch.setattr(subjects_mod, "random_label_check",
                        lambda data, kind, **k: trained.append(kind) or {"kind": kind})
    subjects_mod.kept_random_label_check(mri, "subject", path, **small)
    subjects_mod.kept_random_label_check(mri, "slice", path, **{**small, "label_seed": 1})
    assert trained == ["subject", "slice"] and len(__import__("json").loads(path.read_text())) == 3
