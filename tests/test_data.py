"""mrilib.data: sources, decoding, bad input, splits, duplicates, the `data` command."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mrilib import cli
from mrilib.data import CLASSES, SKIP_HINT, DataError, load_mri, resolve_source
from mrilib.splits import split_mri, stratified_sample
from mrilib.subjects import duplicate_report

TINY = {"Mild_Demented": 6, "Moderate_Demented": 3, "Non_Demented": 10, "Very_Mild_Demented": 8}
ONE_EACH = {c: 1 for c in CLASSES}


# ----------------------------------------------------------------------------- real data

def test_real_folder_counts_and_layout(mri):
    assert mri.images.shape == (6400, 1, 128, 128) and mri.images.dtype == torch.uint8
    assert mri.classes == CLASSES
    assert mri.counts() == {"Mild_Demented": 896, "Moderate_Demented": 64,
                            "Non_Demented": 3200, "Very_Mild_Demented": 2240}
    assert len(set(mri.ids)) == len(mri) and not mri.skipped


def test_real_split_sizes_and_stratification(mri):
    split = split_mri(mri)
    assert len(split.test) == 1280 and len(split.val) == 512 and len(split.train) == 4608
    assert mri.counts(split.test) == {"Mild_Demented": 179, "Moderate_Demented": 13,
                                      "Non_Demented": 640, "Very_Mild_Demented": 448}
    parts = [set(split.train.tolist()), set(split.val.tolist()), set(split.test.tolist())]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 6400


def test_real_cli_json(mri_path, capsys):
    assert cli.main(["data", "--source", str(mri_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"classes", "counts", "train_counts", "test_counts", "size"} <= set(out)
    assert out["size"] == 128 and sum(out["counts"].values()) == 6400
    assert [out["counts"][c] for c in CLASSES] == [896, 64, 3200, 2240]
    assert sum(out["test_counts"].values()) == 1280
    subjects = out["subjects"]  # the bar: 200 groups of 32 slices, all label-pure
    assert subjects["found"] and subjects["n_groups"] == 200 and subjects["sizes"] == {"32": 200}
    assert subjects["pure_groups"] == 200 and subjects["purity"] == 1.0
    assert out["subject_split"]["subjects"]["test"]["Moderate_Demented"] == 1
    assert "Moderate_Demented is 2 brains" in out["subject_split"]["note"]


def test_cli_table_names_both_splits(image_folder, capsys, monkeypatch, tmp_path):
    import mrilib.subjects as subjects_mod
    monkeypatch.setattr(subjects_mod, "CACHE", tmp_path / "cache")
    assert cli.main(["data", "--source", str(image_folder())]) == 0
    out = capsys.readouterr().out
    assert "slice-level split" in out and "no subject structure" in out
    assert "Only the slice-level split is available" in out


# ----------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("image_size", [(40, 40), (150, 90)])
@pytest.mark.parametrize("size", [128, 256])
def test_tiny_folder_any_mode_format_and_size(image_folder, mode, fmt, image_size, size):
    root = image_folder(TINY, size=image_size, mode=mode, fmt=fmt)
    data = load_mri(root, size=size)
    assert data.images.shape == (27, 1, size, size) and data.images.dtype == torch.uint8
    assert data.classes == CLASSES
    assert data.counts() == TINY
    assert data.labels.dtype == torch.long


def test_non_square_images_are_padded_not_stretched(image_folder):
    root = image_folder(ONE_EACH, size=(64, 32))
    for f in root.rglob("*.png"):
        Image.fromarray(np.full((32, 64), 200, np.uint8)).save(f)
    img = load_mri(root, size=128).images[0, 0]
    assert img[64, 64] == 200 and img[5, 64] == 0  # padding above and below the band


def test_sixteen_bit_images_are_stretched_not_clipped(image_folder):
    root = image_folder(ONE_EACH)
    arr = np.linspace(0, 4000, 40 * 40).reshape(40, 40).astype(np.uint16)
    for f in root.rglob("*.png"):
        Image.fromarray(arr).save(f)
    img = load_mri(root, size=128).images[0, 0]
    assert img.max() >= 250 and img.min() <= 5 and (img < 128).float().mean() > 0.3


def test_cache_returns_identical_data(image_folder, tmp_path):
    root = image_folder()
    first = load_mri(root)
    assert list((tmp_path / "cache" / "data").glob("*.pt"))
    second = load_mri(root)
    assert torch.equal(first.images, second.images) and first.ids == second.ids


def test_cache_key_follows_content(image_folder):
    root = image_folder()
    first = load_mri(root)
    victim = next((root / "Non_Demented").iterdir())
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(victim)
    second = load_mri(root)
    assert first.fingerprint != second.fingerprint


def test_parquet_and_save_to_disk_give_the_same_data(image_folder, tmp_path):
    datasets = pytest.importorskip("datasets")
    root = image_folder()
    folder = load_mri(root)
    rows = [{"image": str(p), "label": CLASSES.index(p.parent.name)}
            for p in sorted(root.rglob("*.png"))]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(CLASSES))})
    ds = datasets.Dataset.from_list(rows, features=features)
    dd = datasets.DatasetDict({"train": ds.select(range(20)), "test": ds.select(range(20, 27))})
    dd.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    for source in (tmp_path / "saved", tmp_path / "pq", tmp_path / "pq" / "train.parquet"):
        other = load_mri(source)
        assert other.fingerprint == folder.fingerprint, source
        assert sorted(other.ids) == sorted(folder.ids)



def test_hub_source_loads_the_pinned_revision(image_folder, monkeypatch):
    """The hub path as far as it runs here: ``datasets.load_dataset`` gets the hub id and
    the pinned commit, and whatever it serves decodes as the same folder would."""
    datasets = pytest.importorskip("datasets")
    import mrilib.data as data_mod

    root = image_folder()
    rows = [{"image": str(p), "label": CLASSES.index(p.parent.name)}
            for p in sorted(root.rglob("*.png"))]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(CLASSES))})
    ds = datasets.Dataset.from_list(rows, features=features)
    served = datasets.DatasetDict({"train": ds.select(range(20)),
                                   "test": ds.select(range(20, 27))})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda repo, revision=None: calls.append((repo, revision)) or served)
    monkeypatch.delenv("MRILIB_DATA", raising=False)
    monkeypatch.setattr(data_mod, "SHARED_DATA", root.parent / "absent")
    assert len(data_mod.HUB_REVISION) == 40  # a commit sha, not a branch that can move
    hub = load_mri(None, cache=False)
    assert calls == [("Falah/Alzheimer_MRI", data_mod.HUB_REVISION)]
    assert hub.source == f"Falah/Alzheimer_MRI@{data_mod.HUB_REVISION}"
    assert hub.fingerprint == load_mri(root, cache=False).fingerprint
    assert load_mri("Falah/Alzheimer_MRI", cache=False).source == hub.source  # the bare id
    assert calls[-1] == ("Falah/Alzheimer_MRI", data_mod.HUB_REVISION)
    load_mri("Falah/Alzheimer_MRI@0123abc", cache=False)
    assert calls[-1] == ("Falah/Alzheimer_MRI", "0123abc")

# ----------------------------------------------------------------------------- bad input

def test_missing_path_lists_the_three_ways(tmp_path):
    with pytest.raises(DataError) as err:
        load_mri(tmp_path / "nowhere")
    msg = str(err.value)
    assert "nowhere" in msg and "MRILIB_DATA" in msg and "Falah/Alzheimer_MRI" in msg


def test_unreachable_hub_lists_the_three_ways(monkeypatch, tmp_path):
    import mrilib.data as data_mod

    monkeypatch.delenv("MRILIB_DATA", raising=False)
    monkeypatch.setattr(data_mod, "SHARED_DATA", tmp_path / "absent")  # no folder beside
    with pytest.raises(DataError) as err:
        load_mri(None)
    assert "three ways" in str(err.value) and "MRILIB_DATA" in str(err.value)


def test_source_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MRILIB_DATA", str(tmp_path))
    assert resolve_source(None) == str(tmp_path.resolve())
    assert resolve_source("Falah/Alzheimer_MRI@abc") == "Falah/Alzheimer_MRI@abc"
    monkeypatch.delenv("MRILIB_DATA")
    import mrilib.data as data_mod
    beside = tmp_path / "shared" / "data" / "alzheimer_mri"
    beside.mkdir(parents=True)
    monkeypatch.setattr(data_mod, "SHARED_DATA", beside)  # the folder beside the repo
    assert resolve_source(None) == str(beside.resolve())
    monkeypatch.setattr(data_mod, "SHARED_DATA", tmp_path / "absent")
    assert resolve_source(None).startswith("Falah/Alzheimer_MRI@")


def test_empty_class_folder_is_named(image_folder):
    root = image_folder()
    shutil.rmtree(root / "Moderate_Demented")
    (root / "Moderate_Demented").mkdir()
    with pytest.raises(DataError, match="Moderate_Demented.*holds no images"):
        load_mri(root)


def test_corrupt_image_is_named_then_skippable(image_folder):
    root = image_folder()
    bad = root / "Non_Demented" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg") as err:
        load_mri(root)
    assert SKIP_HINT in str(err.value)  # the flag and the argument, wherever it is read
    data = load_mri(root, on_error="skip")
    assert len(data) == 27 and [p for p, _ in data.skipped] == [str(bad)]


def test_non_image_file_is_named_then_skippable(image_folder):
    root = image_folder()
    notes = root / "Mild_Demented" / "notes.txt"
    notes.write_text("scanner settings")
    with pytest.raises(DataError, match="notes.txt") as err:
        load_mri(root)
    assert "--skip-unreadable on the command line, on_error='skip' in Python" in str(err.value)
    data = load_mri(root, on_error="skip")
    assert len(data) == 27 and str(notes) in [p for p, _ in data.skipped]


def test_files_an_os_leaves_behind_are_skipped_with_a_warning(image_folder):
    root = image_folder()
    litter = [root / "Non_Demented" / "Thumbs.db", root / "desktop.ini",
              root / "Mild_Demented" / ".DS_Store"]
    for f in litter:
        f.write_bytes(b"\x00\x01 not an image")
    with pytest.warns(UserWarning, match="skipped 2 system file"):
        data = load_mri(root)
    assert len(data) == 27
    assert sorted(p for p, _ in data.skipped) == sorted(str(f) for f in litter[:2])


def test_a_corrupt_cache_entry_is_rebuilt_with_a_warning(image_folder, tmp_path):
    root = image_folder()
    first = load_mri(root)
    [entry] = (tmp_path / "cache" / "data").glob("*.pt")
    entry.write_bytes(entry.read_bytes()[:100])  # cut short, as by a full disk
    with pytest.warns(UserWarning, match=f"cache entry {re.escape(str(entry))} is unreadable "
                                         f".*rebuilding it"):
        again = load_mri(root)
    assert torch.equal(again.images, first.images) and again.ids == first.ids
    assert torch.load(entry, weights_only=True)["ids"] == first.ids  # rewritten whole


@pytest.mark.parametrize("folders, problem", [
    ({**TINY, "Unsure": 2}, "not one of them: Unsure$"),
    ({"Non_Demented": 4}, "missing: Mild_Demented, Moderate_Demented, Very_Mild_Demented$"),
    ({**TINY, "NonDemented": 2}, "named twice: Non_Demented$"),
    ({"CN": 2, "EMCI": 2, "LMCI": 2, "AD": 2}, "not one of them: AD, CN, EMCI, LMCI; missing"),
])
def test_class_folders_other_than_the_four_are_refused_at_load_time(image_folder, folders,
                                                                    problem):
    with pytest.raises(DataError) as err:
        load_mri(image_folder(folders))
    message = str(err.value)
    found = ", ".join(sorted(folders))
    assert f"has the classes {found}, but mrilib needs the thesis's four: " \
           f"{', '.join(CLASSES)}" in message
    assert re.search(problem, message.split(". Move")[0])


def test_the_kaggle_spelling_of_the_class_folders_is_the_same_classes(image_folder):
    kaggle = {"MildDemented": 6, "ModerateDemented": 3, "NonDemented": 10, "VeryMildDemented": 8}
    data = load_mri(image_folder(kaggle))
    assert data.classes == CLASSES and data.counts() == TINY


def test_no_class_folders(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / "a.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_mri(flat)


@pytest.mark.parametrize("kwargs, match", [({"size": 64}, "size=64"),
                                           ({"on_error": "ignore"}, "on_error")])
def test_bad_arguments(image_folder, kwargs, match):
    with pytest.raises(DataError, match=match):
        load_mri(image_folder(), **kwargs)


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert cli.main(["data", "--source", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- splits

def _labels(per_class):
    return torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.8, 1.0])
def test_stratified_sample_keeps_class_shares(fraction):
    labels = _labels([896, 64, 3200, 2240])
    idx = stratified_sample(labels, fraction, seed=1)
    got = torch.bincount(labels[idx], minlength=4).numpy()
    assert np.all(np.abs(got - fraction * np.array([896, 64, 3200, 2240])) <= 1)
    assert len(idx) == len(set(idx.tolist()))


def test_stratified_sample_seeds_and_pool():
    labels = _labels([50, 5, 200, 140])
    pool = torch.arange(0, len(labels), 2)
    a, b = (stratified_sample(labels, 0.3, s, pool=pool) for s in (1, 2))
    assert set(a.tolist()) <= set(pool.tolist()) and not torch.equal(a, b)
    assert torch.equal(a, stratified_sample(labels, 0.3, 1, pool=pool))
    assert (labels[stratified_sample(labels, 0.01, 0)] == 1).sum() == 1  # every class kept


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_stratified_sample_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        stratified_sample(_labels([5, 5]), fraction, 0)


def test_split_is_independent_of_load_order(image_folder):
    data = load_mri(image_folder())
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))
    shuffled = data.subset(perm)
    for name in ("train", "val", "test"):
        original = {data.ids[i] for i in getattr(split_mri(data), name).tolist()}
        reordered = {shuffled.ids[i] for i in getattr(split_mri(shuffled), name).tolist()}
        assert original == reordered, name


def test_split_seed_changes_split(image_folder):
    data = load_mri(image_folder())
    assert not torch.equal(split_mri(data, seed=1).test, split_mri(data, seed=2).test)
    assert torch.equal(split_mri(data, seed=1).test, split_mri(data, seed=1).test)


# ----------------------------------------------------------------------------- duplicates

def test_duplicate_report_finds_copies_across_splits(image_folder):
    root = image_folder()
    data = load_mri(root)
    split = split_mri(data)
    held = split.test[0].item()
    copy = data.images.clone()
    copy[split.train[0]] = copy[held]  # plant an exact copy of a test slice in train
    ids = list(data.ids)
    ids[split.train[0].item()] = ids[held]
    planted = type(data)(copy, data.labels, data.classes, ids, data.source, data.fingerprint)
    report = duplicate_report(planted, split)
    assert report["exact_across_splits"] == [sorted([held, split.train[0].item()])]
    assert report["near_heldout_to_train"] >= 1
    assert report["closest_pairs"][0][:2] == (held, split.train[0].item())
    assert duplicate_report(data, split)["exact_groups"] == []


def test_nesting_holds_for_this_pool_and_is_checked_where_rounding_breaks_it():
    from mrilib.splits import check_nested
    from mrilib.grid import FRACTIONS

    check_nested([645, 46, 2304, 1613], FRACTIONS)  # the training pool's classes
    with pytest.raises(ValueError, match=r"class a \(4 images\) gets 2 at fraction 0.3 "
                                         r"but 1 at 0.4"):
        check_nested([4, 7, 34], FRACTIONS, classes=["a", "b", "c"])
