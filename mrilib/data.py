"""Load the Alzheimer MRI slices: from any source, decoded once, cached, checked.

Sources, in the order they are chosen (:func:`resolve_source`): an explicit argument,
the ``MRILIB_DATA`` environment variable, the folder ``../shared/data/alzheimer_mri``
beside the repository when it exists, the Hugging Face hub id ``HUB_ID``.
A source is a local image folder (one sub-folder per class), a local parquet file or
folder of parquet files, a ``datasets`` ``save_to_disk`` folder, or a hub id
(``owner/name`` or ``owner/name@revision``).

Whatever the source, :func:`load_mri` returns an :class:`MRIData` with uint8 images
``[N, 1, H, W]``, integer labels, the class names and a content hash per image, by which
:mod:`mrilib.splits` splits and samples them the same way on every machine.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .paths import CACHE, ROOT, SHARED_DATA, atomic_write_bytes

HUB_ID = "Falah/Alzheimer_MRI"
# The commit the hub's main branch pointed to for over a year (the owner's last, "update",
# README only): its data/ holds the train (5,120) and test (1,280) parquet files that make
# the 6,400 slices. The hub cannot be reached from the machines this project is built on,
# so the sha was read off the hub's public commit page, not checked by a download; a later
# README-only commit (3246c3a40a76e1a7fccadd1fdd86df788f5597d6) changed no data file.
# MRILIB_HUB_REVISION (or ``Falah/Alzheimer_MRI@<sha>`` as the source) chooses another;
# MRIData.source records the one used.
HUB_REVISION = (os.environ.get("MRILIB_HUB_REVISION")
                or "daac24f9597236b45837d82f7eb9c9ad1f8c60c8")
CLASSES = ("Mild_Demented", "Moderate_Demented", "Non_Demented", "Very_Mild_Demented")
SIZES = (128, 256)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
CACHE_FORMAT = 1  # bump when the cached tensor layout changes
# Files an operating system leaves in folders: skipped with a warning, never fatal.
CLUTTER = {"thumbs.db", "ehthumbs.db", "desktop.ini"}
CLUTTER_REASON = "system file, not an image"
# How to skip unreadable files, wherever the error is read.
SKIP_HINT = "--skip-unreadable on the command line, on_error='skip' in Python"

DEFAULTS = {
    "size": 128,          # pixels per side; the thesis used 128 (CNN) or 256
}
PRESETS: dict = {}


class DataError(ValueError):
    """Input data that cannot be used as it is; the message says what to do."""


@dataclass
class MRIData:
    """Decoded slices: ``images`` uint8 [N, 1, H, W], ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    ids: list[str]
    source: str
    fingerprint: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    subjects: torch.Tensor | None = None  # int64 [N] subject of every image, when known

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self, index: torch.Tensor | None = None) -> dict[str, int]:
        """Images per class name, over ``index`` (all images when None)."""
        labels = self.labels if index is None else self.labels[index]
        binc = torch.bincount(labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, binc))

    def subset(self, index: torch.Tensor) -> "MRIData":
        """The images at ``index``, same classes and source."""
        index = torch.as_tensor(index, dtype=torch.long)
        return MRIData(self.images[index], self.labels[index], self.classes,
                       [self.ids[i] for i in index.tolist()], self.source,
                       self.fingerprint, list(self.skipped),
                       None if self.subjects is None else self.subjects[index])


# ----------------------------------------------------------------------------- sources

def _how_to_provide(reason: str) -> DataError:
    return DataError(
        f"{reason}\nProvide the Alzheimer MRI data in one of three ways (or put it in "
        f"{SHARED_DATA}, where this project's machines keep it):\n"
        f"  1. pass it explicitly: load_mri('path/to/alzheimer_mri') or --source PATH\n"
        f"  2. set MRILIB_DATA=path/to/alzheimer_mri (an image folder with one sub-folder "
        f"per class, a parquet file/folder, or a save_to_disk folder)\n"
        f"  3. let mrilib download the hub dataset {HUB_ID} (needs internet access to "
        f"the Hugging Face hub)")


def resolve_source(source: str | os.PathLike | None = None) -> str:
    """The data source to read: ``source``, else ``$MRILIB_DATA``, else the dataset folder
    beside the repository (``../shared/data/alzheimer_mri``, where this project's
    machines keep it) when it exists, else the hub id."""
    if source is not None and str(source) != "":
        chosen, origin = str(source), "the source argument"
    elif os.environ.get("MRILIB_DATA"):
        chosen, origin = os.environ["MRILIB_DATA"], "MRILIB_DATA"
    elif SHARED_DATA.is_dir():
        return str(SHARED_DATA.resolve())
    else:
        return f"{HUB_ID}@{HUB_REVISION}"
    for candidate in (Path(chosen).expanduser(), ROOT / chosen):
        # Relative paths are tried from the project root too: notebooks run in notebooks/.
        if candidate.exists():
            return str(candidate.resolve())
    if _looks_like_hub_id(chosen):  # the bare id of this dataset means its pinned commit
        return f"{HUB_ID}@{HUB_REVISION}" if chosen == HUB_ID else chosen
    raise _how_to_provide(f"The data path {chosen!r} given by {origin} does not exist.")


def _looks_like_hub_id(source: str) -> bool:
    name = source.split("@", 1)[0]
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))
            and not Path(parts[0]).exists())


def _source_kind(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet"
        raise DataError(f"{path} is a file but not a parquet file; give an image folder "
                        f"(one sub-folder per class), a parquet file, or a save_to_disk folder.")
    if any((path / marker).exists() for marker in
           ("dataset_info.json", "state.json", "dataset_dict.json")):
        return "saved"
    if any(path.rglob("*.parquet")):
        return "parquet"
    return "folder"


# ----------------------------------------------------------------------------- decoding

def as_gray_square(img: Image.Image, size: int) -> tuple[np.ndarray, str]:
    """(uint8 [size, size] slice, content id) for any PIL image mode and shape."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float scans: stretch to 0..255 instead of letting PIL clip at 255.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    elif img.mode != "L":
        img = img.convert("L")
    native = np.asarray(img, dtype=np.uint8)
    h, w = native.shape
    uid = hashlib.sha1(f"{h}x{w}".encode() + native.tobytes()).hexdigest()[:16]
    if h != w:
        # Pad to square rather than stretch: the anatomy keeps its proportions.
        side = max(h, w)
        canvas = np.zeros((side, side), dtype=np.uint8)
        canvas[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = native
        img = Image.fromarray(canvas, mode="L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8), uid


def read_image(path: Path, size: int) -> tuple[np.ndarray, str]:
    """(uint8 [size, size] slice, content id) of one image file, or a DataError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return as_gray_square(img, size)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {err}. Replace or remove the "
                        f"file.") from err


def _squash(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


def class_order(names: Sequence[str], where) -> list[int]:
    """The :data:`CLASSES` index of each of ``names`` (case, '_', '-' and spaces aside, so
    the Kaggle spelling MildDemented is Mild_Demented), or a DataError naming them all.

    The thesis's four classes, each once: a fifth folder, or one missing, is refused here
    rather than by the training code later.
    """
    known = {_squash(c): i for i, c in enumerate(CLASSES)}
    order = [known.get(_squash(n)) for n in names]
    if None not in order and sorted(order) == list(range(len(CLASSES))):
        return order
    unknown = [n for n, i in zip(names, order) if i is None]
    missing = [c for i, c in enumerate(CLASSES) if i not in order]
    twice = sorted({CLASSES[i] for i in order if i is not None and order.count(i) > 1})
    problems = "; ".join(p for p in (
        f"not one of them: {', '.join(unknown)}" if unknown else "",
        f"missing: {', '.join(missing)}" if missing else "",
        f"named twice: {', '.join(twice)}" if twice else "") if p)
    raise DataError(f"{where} has the classes {', '.join(names)}, but mrilib needs the "
                    f"thesis's four: {', '.join(CLASSES)} (case, '_', '-' and spaces aside, "
                    f"e.g. MildDemented); {problems}. Move other folders out of it, and name "
                    f"a folder after the class its images belong to.")


def _folder_files(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[str, str]]]:
    """Class names, (file, label) pairs, and non-image files found, for an image folder."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} has no class sub-folders; an image folder needs one "
                        f"sub-folder per class (Mild_Demented/, Non_Demented/, ...).")
    order = class_order([d.name for d in class_dirs], root)
    stray = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    files, non_images = [], [(p, "file beside the class folders") for p in stray]
    for cdir, label in zip(class_dirs, order):
        found = sorted(p for p in cdir.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
        non_images += [(p, "not an image file") for p in found if p not in images]
        if not images:
            raise DataError(f"class folder {cdir} holds no images; add its images or "
                            f"remove the folder.")
        files += [(p, label) for p in images]
    non_images = [(str(p), CLUTTER_REASON if p.name.lower() in CLUTTER else why)
                  for p, why in non_images]
    return list(CLASSES), files, non_images


def _fingerprint_files(paths: Iterable[Path], root: Path) -> str:
    h = hashlib.sha1()
    for p in paths:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _load_folder(root: Path, size: int, on_error: str):
    classes, files, non_images = _folder_files(root)
    foreign = [(p, why) for p, why in non_images if why != CLUTTER_REASON]
    if foreign and on_error == "raise":
        listed = "\n  ".join(f"{p} ({why})" for p, why in foreign[:10])
        raise DataError(f"{root} holds {len(foreign)} file(s) that are not images:\n  "
                        f"{listed}\nMove them out, or skip them ({SKIP_HINT}).")

    def decode(item):
        path, label = item
        try:
            arr, uid = read_image(path, size)
            return arr, uid, label, None
        except DataError as err:
            if on_error == "raise":
                raise DataError(f"{err} Or skip unreadable files ({SKIP_HINT}).") from err
            return None, None, label, (str(path), str(err.__cause__ or err))

    # PIL releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        decoded = list(pool.map(decode, files))
    skipped = non_images + [bad for *_, bad in decoded if bad]
    kept = [(a, u, lab) for a, u, lab, bad in decoded if bad is None]
    return classes, kept, skipped


def _load_hf(source: str, kind: str, size: int, on_error: str):
    """Decode a ``datasets`` dataset (hub, parquet or save_to_disk): all splits pooled."""
    import datasets

    try:
        if kind == "hub":
            repo, _, rev = source.partition("@")
            ds = datasets.load_dataset(repo, revision=rev or None)
        elif kind == "parquet":
            p = Path(source)
            data_files = [str(p)] if p.is_file() else sorted(str(f) for f in p.rglob("*.parquet"))
            ds = datasets.load_dataset("parquet", data_files=data_files)
        else:
            ds = datasets.load_from_disk(source)
    except DataError:
        raise
    except Exception as err:  # the hub's many network errors all mean the same here
        if kind == "hub":
            raise _how_to_provide(f"Could not read the hub dataset {source}: "
                                  f"{type(err).__name__}: {err}") from err
        raise DataError(f"could not read {source} as a {kind} dataset: {err}") from err
    splits = [ds[k] for k in sorted(ds.keys())] if isinstance(ds, datasets.DatasetDict) else [ds]
    feats = splits[0].features
    img_col = next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
    lab_col = next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    if img_col is None or lab_col is None:
        raise DataError(f"{source} needs an Image column and a ClassLabel column; "
                        f"it has {dict(feats)}.")
    order = class_order(list(feats[lab_col].names), source)
    kept, skipped = [], []
    for split in splits:
        for i, row in enumerate(split.cast_column(img_col, datasets.Image(decode=False))):
            where = f"{source} row {i}"
            try:
                blob = row[img_col]
                raw = blob["bytes"] if blob.get("bytes") else Path(blob["path"]).read_bytes()
                with Image.open(io.BytesIO(raw)) as img:
                    img.load()
                    arr, uid = as_gray_square(img, size)
                kept.append((arr, uid, order[int(row[lab_col])]))
            except (UnidentifiedImageError, OSError, ValueError, TypeError) as err:
                if on_error == "raise":
                    raise DataError(f"cannot read image at {where}: {err}. Skip unreadable "
                                    f"rows with {SKIP_HINT}.") from err
                skipped.append((where, str(err)))
    return list(CLASSES), kept, skipped


# ----------------------------------------------------------------------------- public API

def _source_key(source: str, kind: str) -> str:
    """A cheap fingerprint of what the source holds, for the decode cache."""
    if kind == "hub":
        return hashlib.sha1(source.encode()).hexdigest()[:16]
    root = Path(source)
    if root.is_file():
        return _fingerprint_files([root], root.parent)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return _fingerprint_files(files, root)


def content_fingerprint(ids: Sequence[str], labels: Sequence[int], classes: Sequence[str]) -> str:
    """A hash of which images carry which class name, independent of source and order."""
    pairs = sorted(f"{u}:{classes[lab]}" for u, lab in zip(ids, labels))
    return hashlib.sha1("\n".join(pairs).encode()).hexdigest()[:16]


def load_mri(source: str | os.PathLike | None = None, size: int = DEFAULTS["size"],
             on_error: str = "raise", cache: bool = True) -> MRIData:
    """Decode every slice of ``source`` to uint8 ``[N, 1, size, size]`` (cached in ``cache/``).

    ``on_error='skip'`` skips unreadable and non-image files and lists them in
    ``MRIData.skipped``; the default raises on the first one, naming it. Files an
    operating system leaves behind (``Thumbs.db``, ``desktop.ini``; hidden files such as
    ``.DS_Store`` are never read) are skipped either way, with a warning. The classes
    must be the thesis's four (:func:`class_order`); labels follow :data:`CLASSES`.
    """
    if size not in SIZES:
        raise DataError(f"size={size} is not supported; use one of {SIZES} (the thesis's sizes).")
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error={on_error!r}; use 'raise' or 'skip'.")
    source = resolve_source(source)
    kind = "hub" if not Path(source).exists() else _source_kind(Path(source))
    key = f"{_source_key(source, kind)}-{size}-{on_error}-v{CACHE_FORMAT}"
    cache_file = CACHE / "data" / f"{key}.pt"
    data = _cached(cache_file, source) if cache else None
    if data is None:
        data = _decoded(source, kind, size, on_error)
        if cache:
            _write_cache(cache_file, data)
    _warn_clutter(data.skipped)
    return data


def _cached(cache_file: Path, source: str) -> MRIData | None:
    """The decoded data stored in ``cache_file``; None when there is none to use.

    The entry is derived, so an unreadable one (cut short by a full disk or a killed copy)
    is rebuilt with a warning, and one written before class names were checked is rebuilt
    under the check.
    """
    if not cache_file.exists():
        return None
    try:
        blob = torch.load(cache_file, weights_only=True)
        data = MRIData(blob["images"], blob["labels"], tuple(blob["classes"]), blob["ids"],
                       source, blob["fingerprint"], [tuple(s) for s in blob["skipped"]])
    except Exception as err:  # truncated, not a torch file, keys missing: all mean rebuild
        warnings.warn(f"decoded-data cache entry {cache_file} is unreadable "
                      f"({type(err).__name__}); rebuilding it from {source}", stacklevel=3)
        return None
    return data if data.classes == CLASSES else None


def _warn_clutter(skipped: Sequence[tuple[str, str]]) -> None:
    clutter = [p for p, why in skipped if why == CLUTTER_REASON]
    if clutter:
        warnings.warn(f"skipped {len(clutter)} system file(s) that are not images: "
                      f"{', '.join(clutter[:5])}{' ...' if len(clutter) > 5 else ''}",
                      stacklevel=3)


def _decoded(source: str, kind: str, size: int, on_error: str) -> MRIData:
    """Every readable slice of ``source``, decoded (no cache)."""
    if kind == "folder":
        classes, kept, skipped = _load_folder(Path(source), size, on_error)
    else:
        classes, kept, skipped = _load_hf(source, kind, size, on_error)
    if not kept:
        raise DataError(f"no readable images in {source}.")
    labels = [lab for *_, lab in kept]
    if len(set(labels)) < 2:
        raise DataError(f"{source} has images of a single class only; a classifier needs two.")
    images = torch.from_numpy(np.stack([a for a, *_ in kept]))[:, None]
    ids = [u for _, u, _ in kept]
    return MRIData(images, torch.tensor(labels, dtype=torch.long), tuple(classes), ids,
                   source, content_fingerprint(ids, labels, classes), skipped)


def _write_cache(cache_file: Path, data: MRIData) -> None:
    buf = io.BytesIO()
    torch.save({"images": data.images, "labels": data.labels, "classes": list(data.classes),
                "ids": data.ids, "fingerprint": data.fingerprint,
                "skipped": [list(s) for s in data.skipped]}, buf)
    atomic_write_bytes(cache_file, buf.getvalue())


# ----------------------------------------------------------------------------- neighbours

def _thumbnails(images: torch.Tensor) -> torch.Tensor:
    """[N, 1024] float thumbnails (4x4 mean-pooled to 32x32) for cheap near-duplicate search."""
    side = images.shape[-1]
    return torch.nn.functional.avg_pool2d(images.float(), side // 32).flatten(1)


def nearest_neighbours(query: torch.Tensor, reference: torch.Tensor, same: bool = False,
                       chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMS distance, index) of each query image's nearest reference image, in gray levels.

    ``same=True`` when query and reference are the same images, so an image is not its
    own neighbour. Chunked to keep memory at chunk x len(reference) floats.
    """
    q, r = _thumbnails(query), _thumbnails(reference)
    dists, idx = [], []
    for start in range(0, len(q), chunk):
        d = torch.cdist(q[start:start + chunk], r) / q.shape[1] ** 0.5
        if same:
            rows = torch.arange(d.shape[0])
            d[rows, rows + start] = float("inf")
        best = d.min(dim=1)
        dists.append(best.values)
        idx.append(best.indices)
    return torch.cat(dists), torch.cat(idx)
