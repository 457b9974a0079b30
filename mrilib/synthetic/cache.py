"""A resumable store of generated images: nothing made (or paid for) is made twice.

Layout, one folder per backend setting and run seed::

    cache/synthetic/<key>/key.json         what the key stands for (backend, params, seed)
    cache/synthetic/<key>/<id>_<k>.png     variation k of the source image with id <id>
    cache/synthetic/<key>/manifest.jsonl   one row per outcome, appended and fsync'd

``key`` hashes the backend name, its ``params()`` (model, prompt, checkpoint
fingerprint, ...; never a backend's ``RUN_ONLY`` settings such as timeouts, budgets or
batch sizes, so changing those reuses the images), the run seed and
:data:`CACHE_FORMAT`. It leaves out the package version on purpose: a new release must
not throw away images already paid for; bump :data:`CACHE_FORMAT` (or a backend's
params) when outputs would change.

Each image is written atomically and then its manifest row appended, so after any
interruption (Ctrl-C, kill -9, a failed API call) a rerun finds every finished image:
a PNG without its row (killed in between) is taken as done and its row added with
``"recovered": true``. Refusals live only in the manifest (status ``refused`` and the
reason) and are not asked again unless ``retry_refused=True``; the last row of a
(source id, k) pair is its state. A lock file keeps two runs off one folder.

In the returned tensor, an entry with no image (refused, or not reached because a
budget stopped the run) is all zeros and ``report["ok"]`` is False there: select with
``out[report["ok"]]``. Every other report value is JSON-able.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..config import settings
from ..locks import folder_lock
from ..paths import CACHE, atomic_write_bytes
from .base import SIZE, Backend, BudgetExceeded, Refused, check_batch, variation_seed

CACHE_FORMAT = 1  # bump when the layout or the meaning of stored images changes
MANIFEST = "manifest.jsonl"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

DEFAULTS = {
    # Images per generate() call for a backend without max_batch; a backend's max_batch
    # (local: 256 GPU, 4 CPU; OpenAI: 1) is the default and caps any batch_size given.
    "batch_size": 32,
    "retry_refused": False,  # ask again for images the backend refused (costs money)
}
PRESETS = {"quick": {"batch_size": 4}}


def cache_key(backend: Backend, seed: int) -> str:
    """16 hex digits naming everything that determines ``backend``'s images for ``seed``."""
    return hashlib.sha256(_key_json(backend, seed).encode()).hexdigest()[:16]


def cache_dir(backend: Backend, seed: int, cache_root: str | os.PathLike | None = None) -> Path:
    """The folder holding ``backend``'s images for ``seed`` (``cache/synthetic/<key>``)."""
    root = Path(cache_root) if cache_root is not None else CACHE / "synthetic"
    return root / cache_key(backend, seed)


def read_manifest(directory: str | os.PathLike) -> list[dict]:
    """The manifest rows of a cache folder, oldest first; a torn last line is skipped."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a row cut by kill -9; its image (if any) is recovered from the PNG
    return rows


def generate_cached(backend: Backend, images: torch.Tensor, labels: torch.Tensor,
                    ids: Sequence[str], per_image: int, seed: int,
                    cache_root: str | os.PathLike | None = None, batch_size: int | None = None,
                    progress: bool = True,
                    retry_refused: bool | None = None) -> tuple[torch.Tensor, dict]:
    """``per_image`` variations of each image, uint8 [B, per_image, 1, 128, 128], and a report.

    Makes only what the cache lacks. The report holds ``generated`` (this run),
    ``cached`` (entries filled from images stored before, repeats included), ``refused``,
    ``missing`` (entries with no image: refused or not reached),
    ``seconds``, ``key``, ``dir``, ``stopped`` (why a budget stopped the run, or None),
    ``cost_estimate`` and ``ok`` (bool [B, per_image]: which entries hold an image).
    """
    start = time.perf_counter()
    overrides = {k: v for k, v in (("batch_size", batch_size), ("retry_refused", retry_refused))
                 if v is not None}
    cfg = settings(DEFAULTS, PRESETS, **overrides)
    if batch_size is None and getattr(backend, "max_batch", None):
        cfg["batch_size"] = backend.max_batch
    images, labels = check_batch(images, labels)
    ids = _checked_ids(ids, len(images))
    if int(per_image) < 1:
        raise ValueError(f"per_image={per_image}: ask for at least one variation per image")
    directory = cache_dir(backend, seed, cache_root)
    with _locked(directory):
        _write_key_file(directory, backend, seed)
        state = _recovered_state(directory, backend, labels, ids, seed)
        todo = _todo(ids, per_image, state, cfg["retry_refused"])
        estimate = backend.announce(len(todo)) if todo else None
        made, stopped = _generate_missing(backend, directory, todo, images, labels, ids, seed,
                                          cfg["batch_size"], progress)
        state.update(made)
        out, ok = _load(directory, ids, per_image, state)
    refused = sum(state.get((i, k)) == "refused" for i in ids for k in range(per_image))
    generated = sum(v == "ok" for v in made.values())
    return out, {
        "generated": generated,
        "cached": int(ok.sum()) - generated,
        "refused": refused,
        "missing": int((~ok).sum()),
        "seconds": round(time.perf_counter() - start, 3),
        "key": directory.name,
        "dir": str(directory),
        "stopped": stopped,
        "cost_estimate": estimate,
        "ok": ok,
    }


# ----------------------------------------------------------------------------- state

def _key_json(backend: Backend, seed: int) -> str:
    spec = {"backend": backend.name, "params": backend.params(), "seed": int(seed),
            "format": CACHE_FORMAT}
    try:
        return json.dumps(spec, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"backend {backend.name!r}: params() must be JSON-able to key the "
                         f"cache ({err}); return strings/numbers/lists/dicts") from None


def _write_key_file(directory: Path, backend: Backend, seed: int) -> None:
    path = directory / "key.json"
    if not path.exists():
        spec = json.loads(_key_json(backend, seed))
        atomic_write_bytes(path, json.dumps({"key": directory.name, **spec}, indent=2).encode())


def _checked_ids(ids: Sequence[str], n: int) -> list[str]:
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} ids for {n} images; give one id per image "
                         f"(MRIData.ids)")
    bad = [i for i in ids if not _SAFE_ID.fullmatch(i)]
    if bad:
        raise ValueError(f"source id {bad[0]!r} cannot name a file; ids must be letters, "
                         f"digits, '.', '_' or '-' (MRIData.ids are content hashes)")
    return ids


def _image_name(source_id: str, k: int) -> str:
    return f"{source_id}_{k}.png"


def _recovered_state(directory: Path, backend: Backend, labels, ids, seed) -> dict:
    """{(id, k): "ok" | "refused"} from the manifest, with rows added for orphan PNGs.

    An "ok" whose PNG was deleted is dropped, so that image is made again.
    """
    state = {(r["source_id"], int(r["k"])): r["status"] for r in read_manifest(directory)}
    state = {key: v for key, v in state.items()
             if v != "ok" or (directory / _image_name(*key)).exists()}
    row_of = {i: n for n, i in enumerate(ids)}
    for png in directory.glob("*.png"):
        source_id, _, k = png.stem.rpartition("_")
        if not k.isdigit() or state.get((source_id, int(k))) == "ok":
            continue
        n = row_of.get(source_id)
        label = int(labels[n]) if n is not None else None
        _append_row(directory, _row(backend, source_id, int(k), label,
                                    variation_seed(seed, source_id, int(k)), "ok", None,
                                    recovered=True))
        state[(source_id, int(k))] = "ok"
    return state


def _todo(ids: list[str], per_image: int, state: dict,
          retry_refused: bool) -> list[tuple[int, int]]:
    """(image index, k) pairs still to make, each (id, k) once even if an id repeats."""
    wanted, seen = [], set()
    for n, source_id in enumerate(ids):
        for k in range(per_image):
            status = state.get((source_id, k))
            if (source_id, k) in seen or status == "ok" or (status == "refused"
                                                            and not retry_refused):
                continue
            seen.add((source_id, k))
            wanted.append((n, k))
    return wanted


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s lock for the block; a second run on it is told to wait."""
    busy = (f"another run is generating into {directory} (pid {{pid}}); wait for it to "
            f"finish (the lock frees itself when that process ends)")
    with folder_lock(directory, busy):
        for tmp in directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)  # half-written by a killed run; we hold the lock
        yield


# ----------------------------------------------------------------------------- making

def _generate_missing(backend, directory, todo, images, labels, ids, seed, batch_size,
                      progress) -> tuple[dict, str | None]:
    """Make ``todo``, storing each outcome as it arrives; (states made, budget stop or None)."""
    made: dict = {}
    step = max(1, min(int(batch_size), backend.max_batch or int(batch_size)))
    bar = tqdm(total=len(todo), disable=not progress or not todo, unit="img",
               desc=f"synthetic/{backend.name}")
    try:
        for a in range(0, len(todo), step):
            chunk = todo[a:a + step]
            try:
                _make_chunk(backend, directory, chunk, images, labels, ids, seed, made)
            except BudgetExceeded as err:
                return made, str(err)
            bar.update(len(chunk))
            bar.set_postfix(refused=sum(v == "refused" for v in made.values()))
    finally:
        bar.close()
    return made, None


def _make_chunk(backend, directory, chunk, images, labels, ids, seed, made: dict) -> None:
    index = torch.tensor([n for n, _ in chunk])
    seeds = [variation_seed(seed, ids[n], k) for n, k in chunk]
    try:
        out = backend.generate(images[index], labels[index], seeds)
    except Refused as err:
        if len(chunk) > 1:
            # One image was refused but the batch says not which: ask one at a time.
            for item in chunk:
                _make_chunk(backend, directory, [item], images, labels, ids, seed, made)
            return
        n, k = chunk[0]
        _append_row(directory, _row(backend, ids[n], k, int(labels[n]),
                                    seeds[0], "refused", err.reason))
        made[(ids[n], k)] = "refused"
        return
    _check_output(backend, out, len(chunk))
    for (n, k), image, s in zip(chunk, out, seeds):
        name = _image_name(ids[n], k)
        atomic_write_bytes(directory / name, _png(image))
        _append_row(directory, _row(backend, ids[n], k, int(labels[n]), s, "ok", None, file=name))
        made[(ids[n], k)] = "ok"


def _check_output(backend: Backend, out, n: int) -> None:
    if (not isinstance(out, torch.Tensor) or out.dtype != torch.uint8
            or tuple(out.shape) != (n, 1, SIZE, SIZE)):
        got = (f"{out.dtype} {list(out.shape)}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"backend {backend.name!r} returned {got} for {n} inputs; "
                         f"generate() must return uint8 [{n}, 1, {SIZE}, {SIZE}]")


def _row(backend: Backend, source_id: str, k: int, label: int | None, seed: int, status: str,
         reason: str | None, file: str | None = None, recovered: bool = False) -> dict:
    from .. import __version__  # at call time: mrilib/__init__ may import this module

    row = {"source_id": source_id, "k": k, "class": label, "backend": backend.name,
           "params": backend.params(), "seed": seed, "status": status, "reason": reason,
           "file": file or (_image_name(source_id, k) if status == "ok" else None),
           "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "mrilib": __version__}
    if recovered:
        row["recovered"] = True  # the PNG was stored but the process died before this row
    return row


def _append_row(directory: Path, row: dict) -> None:
    """Append one JSON line and fsync; a torn earlier line gets its own line ended first."""
    path = directory / MANIFEST
    line = json.dumps(row, sort_keys=True).encode() + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size and _last_byte(path) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[0].cpu().numpy(), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _load(directory: Path, ids: list[str], per_image: int,
          state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, ok mask) for every (id, k); zeros where there is no image."""
    out = torch.zeros(len(ids), per_image, 1, SIZE, SIZE, dtype=torch.uint8)
    ok = torch.zeros(len(ids), per_image, dtype=torch.bool)
    for n, source_id in enumerate(ids):
        for k in range(per_image):
            if state.get((source_id, k)) != "ok":
                continue
            path = directory / _image_name(source_id, k)
            try:
                with Image.open(path) as img:
                    gray = np.asarray(img.convert("L"), dtype=np.uint8)
                out[n, k, 0] = torch.from_numpy(gray.copy())
            except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
                raise ValueError(f"cached image {path} is unreadable ({err}); delete it and "
                                 f"rerun to make it again") from None
            ok[n, k] = True
    return out, ok
