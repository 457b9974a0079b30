"""The training sets of a cell's repeats, and the generators they need.

:func:`generator_needs` is the one place that says which generator a repeat needs and
whether it is trained; the runner decides from it whether to run, train or wait, and
:func:`training_sets` builds the sets from the generators it names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .cells import Cell
from .design import RepeatSeeds, repeat_seeds
from .store import brief


@dataclass
class TrainingSets:
    """K repeats' training sets in one bank: ``index[k]`` picks repeat k's images."""

    bank_images: object   # uint8 [M, 1, H, W]: real and synthetic images pooled
    bank_labels: object   # int64 [M]
    index: object         # int64 [K, n]
    info: list[dict]      # one JSON-able dict per repeat (counts, generator, cache keys)


@dataclass(frozen=True)
class GeneratorNeed:
    """The generator a repeat needs: its index ``g``, its file once trained, else how to
    train it (``why``)."""

    g: int
    path: Path | None
    why: str | None = None


def class_share_losses(sets: TrainingSets, test_labels, num_classes: int) -> list[float]:
    """Per repeat: the test cross-entropy of predicting its training set's class shares
    for every image, without looking at one (add-one smoothed, so a class absent from
    training costs a finite loss). A classifier must beat it to have learned anything."""
    import torch

    out = []
    for rows in sets.index:
        counts = torch.bincount(sets.bank_labels[rows].cpu(), minlength=num_classes) + 1.0
        log_p = (counts / counts.sum()).log()
        out.append(float(-log_p[test_labels.cpu()].mean()))
    return out


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


def generator_needs(data, split, cell: Cell, repeats: Sequence[int], cfg: dict
                    ) -> dict[int, GeneratorNeed]:
    """Per repeat of ``cell``, the generator it needs and whether it is trained.

    Empty where the images need no generator of ours: real-only cells, and backends that
    learn nothing from our data (OpenAI). Each generator is looked up once.
    """
    from ..synthetic.diffusion import generator_path

    if cell.synthetic == "none" or cfg["backend"] != "local":
        return {}
    fraction, leaky = generator_fraction(cell, cfg), cell.leakage == "leaky"
    found: dict[int, GeneratorNeed] = {}
    for g in sorted({repeat_seeds(r, cfg).sample_index for r in repeats}):
        try:
            found[g] = GeneratorNeed(g, generator_path(data, split, fraction, g, leaky=leaky))
        except FileNotFoundError as err:
            found[g] = GeneratorNeed(g, None, str(err) + _subset_note(cfg))
    return {r: found[repeat_seeds(r, cfg).sample_index] for r in repeats}


def _subset_note(cfg: dict) -> str:
    """Where the grid runs on a subset (the quick preset), `synth train` (all the data) cannot
    make its generators: say which command does."""
    if cfg["data_fraction"] >= 1.0:
        return ""
    return (f" (this grid runs on a {cfg['data_fraction']:.0%} subset of the data, whose "
            f"generators `python -m mrilib grid --train-generators` trains, with this grid's "
            f"preset and options)")


def training_sets(data, split, cell: Cell, seeds: Sequence[RepeatSeeds], cfg: dict,
                  device=None, generators: dict[int, Path] | None = None) -> TrainingSets:
    """The training sets of ``seeds``'s repeats of ``cell``: real sample g, plus synthetic.

    ``generators`` maps g to the generator file of sample g (the runner passes what
    :func:`generator_needs` found); None looks them up, and a missing one raises
    FileNotFoundError saying how to train it.
    """
    if cell.synthetic == "none":
        from ..synthetic.mixing import real_sample

        index = _stacked([real_sample(data, split, cell.real_fraction, s.sample_seed)
                          for s in seeds], cell)
        info = [{"n_real": int(index.shape[1]), "n_synthetic": 0} for _ in seeds]
        return TrainingSets(data.images, data.labels, index, info)
    from ..synthetic.mixing import mixed_training_set, stack_repeats

    if generators is None:
        needs = generator_needs(data, split, cell, [s.repeat for s in seeds], cfg)
        missing = [n.why for n in needs.values() if n.path is None]
        if missing:
            raise FileNotFoundError(missing[0])
        generators = {n.g: n.path for n in needs.values()}
    sets = [mixed_training_set(data, split, cell.real_fraction, cell.synthetic_fraction,
                               classes=cell.synthetic_classes, seed=s.synth_seed,
                               backend=_backend(cfg["backend"], cell, s, generators, device),
                               sample_seed=s.sample_seed, allow_leaky=cell.leakage == "leaky",
                               progress=False)
            for s in seeds]
    bank_images, bank_labels, index, infos = stack_repeats(sets)
    return TrainingSets(bank_images, bank_labels, index, [brief(i) for i in infos])


def _stacked(samples: list, cell: Cell):
    """``samples`` as one ``[K, n]`` index; samples of whole subjects must have one size."""
    import torch

    sizes = sorted({len(s) for s in samples})
    if len(sizes) > 1:
        raise ValueError(f"{cell.key}: the repeats' real samples hold {sizes} images; the "
                         f"training engine needs one size for a cell's repeats, which whole "
                         f"subjects of unequal slice counts do not give")
    return torch.stack(samples)


def _backend(name: str, cell: Cell, seeds: RepeatSeeds, generators: dict, device):
    if name == "local":
        from ..synthetic.diffusion import LocalDiffusion

        g = seeds.sample_index
        return LocalDiffusion(generators[g], sample_seed=g, device=device)
    if cell.leakage == "leaky":
        raise ValueError(f"the leaky ablation needs a generator trained on the pool; backend "
                         f"{name!r} learns nothing from our data. Use backend='local'")
    from ..synthetic import get_backend
    return get_backend(name)


def grid_data(data, cfg: dict, by_subject: bool = False):
    """``data``, or its stratified ``data_fraction`` subset (the quick preset's 10%): of whole
    subjects when ``by_subject`` (a grid with subject-split cells), else of slices."""
    if cfg["data_fraction"] >= 1.0:
        return data
    from ..splits import stratified_sample

    if by_subject:  # the subset keeps each image's subject: its fragments are not recoverable
        from dataclasses import replace

        from ..subjects import subject_ids

        data = replace(data, subjects=subject_ids(data))
    keep = stratified_sample(data.labels, cfg["data_fraction"], cfg["seeds"]["data"],
                             ids=data.ids, groups=data.subjects if by_subject else None)
    return data.subset(keep)
