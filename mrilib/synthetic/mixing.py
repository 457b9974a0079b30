"""The thesis's mixing policy (ch. 6.3): a real stratified sample plus variations of it.

One mixed training set is a stratified sample of X of the training pool and synthetic
variations of those same sampled slices (never of other slices), in the amount Y of the
pool's size. The training engine takes a bank of uint8 images with labels and one row of
bank indices per replicate: :func:`mixed_training_set` makes one such set and
:func:`stack_repeats` puts the K repeats of a cell into one bank with an index [K, n].
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..config import settings
from ..data import MRIData
from ..splits import Split, pool_sample
from .base import Backend
from .cache import generate_cached

DEFAULTS = {
    # Rounds of asking a refusing backend (a content filter) for more variations of the same
    # sources, so a refused image is replaced; one refused three rounds running is an error.
    "topup_rounds": 3,
}
PRESETS: dict = {}


def real_sample(data: MRIData, split: Split, real_fraction: float,
                sample_seed: int) -> torch.Tensor:
    """Indices into ``data`` of the stratified ``real_fraction`` of the training pool
    (whole subjects for a subject split: :func:`mrilib.splits.pool_sample`).

    The same (data, split, X, sample_seed) gives the same sample on every machine (it is
    drawn over ids), so a generator trained on it and a classifier fed it agree.
    """
    return pool_sample(data, split, real_fraction, sample_seed)


def allocate(total: int, weights: Sequence[float]) -> np.ndarray:
    """``total`` split in proportion to ``weights`` by largest remainder (sums to ``total``)."""
    weights = np.asarray(weights, dtype=float)
    if not weights.sum() > 0:
        raise ValueError(f"cannot split {total} images over weights {weights.tolist()}: "
                         f"the chosen classes have no images in the training pool")
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for c in np.argsort(-(exact - counts), kind="stable")[:total - counts.sum()]:
        counts[c] += 1
    return counts


def round_robin(n_sources: int, n_variations: int, rng: np.random.Generator) -> np.ndarray:
    """Variations per source when ``n_variations`` are dealt round-robin over a shuffled order.

    Every source gets ``n_variations // n_sources``, and a random ``n_variations %
    n_sources`` of them one more.
    """
    counts = np.full(n_sources, n_variations // n_sources, dtype=int)
    counts[rng.permutation(n_sources)[:n_variations % n_sources]] += 1
    return counts


def class_ids(data: MRIData, classes) -> list[int]:
    """Class ids given as "all" or class names, checked against ``data.classes``."""
    if isinstance(classes, str) and classes == "all":
        return list(range(len(data.classes)))
    names = [classes] if isinstance(classes, str) else list(classes)
    unknown = [c for c in names if c not in data.classes]
    if unknown or not names:
        raise ValueError(f"classes={classes!r}: give 'all' or a list of class names from "
                         f"{list(data.classes)}")
    return sorted(data.classes.index(c) for c in names)


def mixed_training_set(data: MRIData, split: Split, real_fraction: float,
                       synthetic_fraction: float, classes="all", seed: int = 0,
                       backend: Backend | None = None, sample_seed: int | None = None,
                       allow_leaky: bool = False, cache_root=None, progress: bool = True):
    """One mixed training set: ``(bank_images, bank_labels, index, info)``.

    Definitions (P = the training pool ``split.train``, |P| its size):

    * Real part: the stratified sample of X = ``real_fraction`` of P drawn with
      ``sample_seed`` (:func:`real_sample`): round(X |P|) images in P's class shares
      (largest remainder; at least one per class).
    * Synthetic part: S = round(Y |P|) variations, Y = ``synthetic_fraction`` (so Y is a
      share of the *pool*, not of the real sample: X = 0.3, Y = 0.7 gives as many images
      as the full pool; X = 1, Y = 0.2 adds a fifth). With ``classes="all"`` S is split
      over the classes in P's shares (largest remainder); with a list of class names, over
      those classes only, in their shares of P (["Moderate_Demented"]: all S of that class).
    * Within class c, its S_c variations are dealt round-robin over the class's n_c sampled
      images in a random order: each source gets floor(S_c / n_c) variations, and
      S_c mod n_c of them (drawn with ``seed``) one more.

    Only sampled real images are ever sources, so no validation or test image and no
    pool image outside the sample enters the set, not even through a generator: a
    backend that learned from real images (``training_record``, the local diffusion
    model) is checked with :func:`~mrilib.synthetic.diffusion.assert_no_leakage` against
    the sample's ids, or, for the leaky ablation generator (refused unless
    ``allow_leaky=True``), against the pool's.

    ``seed`` seeds the variations (and the round-robin extras); ``sample_seed`` the real
    sample, by default the backend's own (``backend.sample_seed``: generator g of the
    local model learned from sample g) or else ``seed``. Each repeat therefore gets new
    variations, and a new sample unless its generator is shared (see
    :mod:`mrilib.synthetic.diffusion`). Variations come from the resumable cache
    (:func:`~mrilib.synthetic.cache.generate_cached`).

    Returns uint8 ``bank_images`` [M, 1, 128, 128] (real rows first, then synthetic),
    int64 ``bank_labels`` [M], ``index`` [1, M] (the one replicate's rows), and ``info``:
    counts per class (real / synthetic), the real ids, each synthetic image's source id,
    seeds, the backend's params and generator checkpoint, and the cache report.
    """
    if not 0.0 < real_fraction <= 1.0:
        raise ValueError(f"real_fraction={real_fraction}: give a fraction in (0, 1], e.g. 0.3")
    if not synthetic_fraction >= 0.0:
        raise ValueError(f"synthetic_fraction={synthetic_fraction}: give a share >= 0 of the "
                         f"pool size, e.g. 0.7")
    chosen = class_ids(data, classes)
    n_synth = int(round(synthetic_fraction * len(split.train)))
    if n_synth and backend is None:
        raise ValueError(f"synthetic_fraction={synthetic_fraction} needs a backend; pass one "
                         f"(e.g. LocalDiffusion(generator_path(data, split, X, g), sample_seed=g) "
                         f"or get_backend('openai'))")
    own = getattr(backend, "sample_seed", None)
    asked = sample_seed
    if sample_seed is None:
        sample_seed = seed if own is None else own
    real = real_sample(data, split, real_fraction, sample_seed)
    real_ids = [data.ids[i] for i in real.tolist()]
    leak = _check_leakage(backend, real_ids, [data.ids[i] for i in split.train.tolist()],
                          allow_leaky) if backend is not None else None
    if asked is not None and own is not None and int(own) != int(asked):
        # No leak (checked above: at 100% real the generator's sample always lies inside
        # this one), but the run would record generator `own` as sample `asked`'s.
        raise ValueError(f"sample_seed={asked}, but the backend's generator belongs to "
                         f"sample {own}; use generator {asked} for this sample "
                         f"or leave sample_seed out to use the generator's own")

    sources, per_source = synthetic_plan(data, split, real, chosen, n_synth, seed)
    synth_images, synth_sources, report = _variations(backend, data, sources, per_source, seed,
                                                      cache_root, progress)
    synth_labels = data.labels[synth_sources] if len(synth_sources) else data.labels[:0]

    bank_images = torch.cat([data.images[real], synth_images])
    bank_labels = torch.cat([data.labels[real], synth_labels])
    info = {
        "real_fraction": real_fraction, "synthetic_fraction": synthetic_fraction,
        "synthetic_classes": [data.classes[c] for c in chosen],
        "seed": int(seed), "sample_seed": int(sample_seed), "pool_size": len(split.train),
        "n_real": len(real), "n_synthetic": len(synth_sources),
        "counts": {"real": data.counts(real), "synthetic": data.counts(synth_sources)},
        "real_ids": real_ids,
        "synthetic_sources": [data.ids[i] for i in synth_sources.tolist()],
        "backend": None if backend is None else backend.name,
        "backend_params": None if backend is None else backend.params(),
        "generator_checkpoint": None if backend is None else
        (str(backend.path) if hasattr(backend, "path") else None),
        "leaky": leak, "cache": report,
    }
    return bank_images, bank_labels, torch.arange(len(bank_labels))[None], info


def synthetic_plan(data: MRIData, split: Split, real: torch.Tensor, chosen: list[int],
                   n_synth: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(source indices into ``data``, variations per source) for ``n_synth`` variations.

    Split over the ``chosen`` classes in their shares of the pool, then round-robin over
    each class's sampled images (see :func:`mixed_training_set`).
    """
    pool_counts = torch.bincount(data.labels[split.train], minlength=len(data.classes)).numpy()
    per_class = np.zeros(len(data.classes), dtype=int)
    if n_synth:
        per_class[chosen] = allocate(n_synth, pool_counts[chosen])
    # A stream of its own: the sample is drawn from ``sample_seed`` alone.
    rng = np.random.default_rng([int(seed), 63])
    sources, per_source = [real[:0]], [np.zeros(0, dtype=int)]
    for c in np.flatnonzero(per_class):
        members = real[data.labels[real] == c]
        if not len(members):
            raise ValueError(f"class {data.classes[c]} has no image in the real sample to "
                             f"make variations of")
        sources.append(members)
        per_source.append(round_robin(len(members), int(per_class[c]), rng))
    return torch.cat(sources), np.concatenate(per_source)


def _check_leakage(backend: Backend, sample_ids: list[str], pool_ids: list[str],
                   allow_leaky: bool) -> bool | None:
    """Whether the backend's generator is the leaky ablation; raises if it saw too much."""
    record = getattr(backend, "training_record", None)
    if record is None:
        return None  # a backend that did not learn from this data (e.g. the OpenAI API)
    from .diffusion import LeakageError, assert_no_leakage

    leaky = bool(record.get("leaky"))
    if leaky and not allow_leaky:
        raise LeakageError("this generator is the leaky ablation (trained on the whole "
                           "training pool); pass allow_leaky=True to use it on purpose")
    assert_no_leakage(record, pool_ids if leaky else sample_ids)
    return leaky


def _variations(backend, data: MRIData, sources: torch.Tensor, counts: np.ndarray, seed: int,
                cache_root, progress) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``counts[j]`` variations of each ``sources[j]`` (data indices), topping up refusals.

    Returns (images [S,1,128,128], source index per image [S], summed cache report).
    Variation k of a source is the same image in every call (the cache keys it by source
    id and k), so asking for more per source only adds images.
    """
    cfg = settings(DEFAULTS, PRESETS)
    total = {"generated": 0, "seconds": 0.0, "dirs": []}
    if not len(sources):
        return data.images[:0], sources, total | {"cached": 0, "refused": 0}
    asked = counts.copy()
    for _ in range(cfg["topup_rounds"] + 1):
        got, refused = {}, 0  # this round asks again for every earlier (id, k): the cache answers
        for per_image in sorted(set(asked[asked > 0].tolist())):
            js = np.flatnonzero(asked == per_image)
            idx = sources[torch.from_numpy(js)]
            out, rep = generate_cached(
                backend, data.images[idx], data.labels[idx], [data.ids[i] for i in idx.tolist()],
                per_image, seed, cache_root=cache_root, progress=progress,
                batch_size=getattr(backend, "max_batch", None))
            total["generated"] += rep["generated"]
            total["seconds"] += rep["seconds"]
            total["dirs"] = sorted(set(total["dirs"]) | {rep["dir"]})
            refused += rep["refused"]
            if rep["stopped"]:
                raise ValueError(f"generation stopped before the set was complete: "
                                 f"{rep['stopped']}; raise the budget or rerun (made images "
                                 f"are kept in {rep['dir']})")
            for row, j in enumerate(js):
                got[j] = out[row][rep["ok"][row]]
        short = np.array([counts[j] - len(got[j]) if counts[j] else 0
                          for j in range(len(sources))])
        if not short.clip(min=0).any():
            break
        asked = np.where(short > 0, asked + short, asked)
    else:
        raise ValueError(f"{int(short.clip(min=0).sum())} variation(s) still refused after "
                         f"{cfg['topup_rounds']} rounds of replacements; see the manifests in "
                         f"{total['dirs']}")
    total["refused"] = int(refused)
    total["cached"] = int(sum(len(v) for v in got.values())) - total["generated"]
    images = torch.cat([got[j][:counts[j]] for j in range(len(sources)) if counts[j]])
    owner = torch.cat([sources[j].repeat(int(counts[j])) for j in range(len(sources))
                       if counts[j]])
    return images, owner, total


def stack_repeats(sets: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """K mixed sets as one bank: ``(bank_images, bank_labels, index [K, n], infos)``.

    Real images shared by repeats are stored once (keyed by id and label); each repeat's
    synthetic images are its own. All repeats of a cell have the same size n (the sample
    and synthetic counts depend only on X, Y and the pool); different sizes are an error.
    """
    if not sets:
        raise ValueError("stack_repeats needs at least one mixed set")
    sizes = {s[2].shape[-1] for s in sets}
    if len(sizes) != 1:
        raise ValueError(f"repeats have different sizes {sorted(sizes)}; stack only the "
                         f"repeats of one cell (same X, Y and classes)")
    rows_of: dict[tuple[str, int], int] = {}
    chunks_img, chunks_lab, index = [], [], []
    n_rows = 0
    for images, labels, idx, info in sets:
        n_real = info["n_real"]
        keys = list(zip(info["real_ids"], labels[:n_real].tolist()))
        new = []
        for j, key in enumerate(keys):
            if key not in rows_of:
                rows_of[key] = n_rows + len(new)
                new.append(j)
        new_t = torch.tensor(new, dtype=torch.long)
        chunks_img += [images[new_t], images[n_real:]]
        chunks_lab += [labels[new_t], labels[n_real:]]
        synth_start = n_rows + len(new)
        n_rows = synth_start + len(labels) - n_real
        row = [rows_of[k] for k in keys] + list(range(synth_start, n_rows))
        index.append(torch.tensor(row, dtype=torch.long)[idx[0]])
    return (torch.cat(chunks_img), torch.cat(chunks_lab), torch.stack(index),
            [s[3] for s in sets])
