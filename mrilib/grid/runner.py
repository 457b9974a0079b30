"""Train every missing run of a grid, one cell at a time, streaming one row per run.

The runner trains and records; when and where it runs is decided elsewhere. A ``pacer``
(default: none, every cell runs) may skip a cell that would not fit a time limit: see
:mod:`mrilib.grid.schedule` for time-limited GPU jobs.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection

from .. import paths
from .cells import IMAGENET_RESULTS, Cell, grid_cells
from .design import cell_design, grid_settings, repeat_seeds, run_key, train_overrides
from .load import export_csv
from .sets import (class_share_losses, generator_fraction, generator_needs, grid_data,
                   training_sets)
from .store import ResultsWriter, data_fingerprints, epoch_rows, read_runs, run_row


@dataclass
class GridProgress:
    """What a call to :func:`run_grid` did and what is left."""

    results: Path
    cells_total: int
    cells_done: int
    runs_written: int
    stopped_for_time: bool
    remaining: list[str]              # cell keys with repeats still missing
    blocked: dict[str, str]           # cell key -> why some repeats wait (a generator missing)


class Unpaced:
    """The default pace: every cell runs, generators train as long as they need."""

    skipped = False

    def fits(self, cell: Cell, repeats: int) -> bool:
        return True

    def generator_minutes(self, cell: Cell, repeats: int) -> float | None:
        return None

    def record(self, cell: Cell, seconds: float, repeats: int) -> None:
        pass


def run_grid(preset: str | None = None, results_path: str | os.PathLike | None = None,
             resume: bool = True, device=None, train_fn: Callable | None = None,
             synth_fn: Callable | None = None, data=None, split=None,
             clock: Callable[[], float] = time.monotonic, progress: bool = True,
             train_generators: bool = False, source=None, available_generators: bool = False,
             pacer=None, on_error: str = "raise", shard: str | None = None,
             only_cells: Collection[str] | None = None,
             only_repeats: Collection[int] | None = None, **overrides) -> GridProgress:
    """Train every missing run of ``preset``'s grid, one cell at a time, streaming rows.

    ``train_fn`` (default :func:`mrilib.train.train_replicates`) trains all missing
    repeats of a cell in one call; ``synth_fn`` (default :func:`training_sets`) builds
    their training sets. A synthetic cell whose generators are not trained is listed in
    ``blocked`` and skipped, unless ``train_generators`` (local backend): then the runner
    trains or resumes them first. ``available_generators``: such a cell runs the repeats
    whose generators exist (repeat r uses generator r mod G) and stays listed for the
    rest. ``pacer`` (:class:`Unpaced` by default; :func:`mrilib.grid.schedule.time_budget`)
    may skip cells that would not fit a time limit. ``resume=False`` refuses a folder
    that already holds runs. ``data`` defaults to ``load_mri(source)`` (its
    ``data_fraction``); each split kind is ``split_mri(data, kind)``, except ``split``'s
    kind when a split is passed. Data passed in is used as given; ``on_error="skip"`` loads
    past unreadable files (:func:`mrilib.data.load_mri`).

    A share of the grid (one cluster job's, :mod:`mrilib.grid.cluster`): ``only_cells``
    (cell keys) and ``only_repeats`` keep those runs; ``shard`` writes them to the results
    folder's shard of that name (:class:`ResultsWriter`), counting every shard's runs done.
    """
    from ..device import resolve_device

    resolve_device(device)  # a bad device says so before any folder or data is touched
    preset = preset or paths.preset_name()
    cfg = grid_settings(preset, **overrides)
    with paths.preset_env(preset):
        directory = grid_results_dir(cfg, results_path)
        with ResultsWriter(directory, shard, shards_too=True) as writer:
            if writer.runs and not resume:
                raise ValueError(f"{directory} already holds {len(writer.runs)} runs; pass "
                                 f"--resume (resume=True) to continue them, or give another "
                                 f"results folder")
            session = _Session(cfg, preset, writer, device, train_fn or _train_replicates,
                               synth_fn or training_sets, pacer or Unpaced(), clock,
                               train_generators, available_generators, progress, source,
                               on_error, data, {} if split is None else {split.kind: split},
                               only_repeats=only_repeats)
            cells = [c for c in grid_cells(preset, **overrides)
                     if only_cells is None or c.key in only_cells]
            try:
                return session.run(cells)
            finally:
                if writer.runs and shard is None:  # `grid --merge` exports a cluster's shards
                    export_csv(directory)


def grid_results_dir(cfg: dict, results_path: str | os.PathLike | None = None) -> Path:
    """``results_path``, else the preset's results folder, or its ``imagenet/`` sub-folder
    when ``cfg`` starts a model from ImageNet weights (one protocol per folder). Call it
    under :func:`mrilib.paths.preset_env`."""
    if results_path is not None:
        return Path(results_path)
    return paths.results_dir() / IMAGENET_RESULTS if cfg["imagenet"] else paths.results_dir()


def grid_state(preset: str, results_path=None, **overrides) -> tuple:
    """``(settings, cells, their designs, the run keys done)`` of ``preset``'s grid in its
    results folder (``results_path``, default the preset's), shards included."""
    cfg = grid_settings(preset, **overrides)
    cells = grid_cells(preset, **overrides)
    with paths.preset_env(preset):
        directory = grid_results_dir(cfg, results_path)
        designs = {c: cell_design(cfg, preset, c) for c in cells}
    return cfg, cells, designs, {r["run_key"] for r in read_runs(directory)}


def grid_status(preset: str | None = None, results_path: str | os.PathLike | None = None,
                **overrides):
    """A DataFrame: each cell of ``preset``'s grid with its finished and total repeats."""
    import pandas as pd

    preset = preset or paths.preset_name()
    cfg, cells, designs, done = grid_state(preset, results_path, **overrides)
    return pd.DataFrame([{"cell": c.key, "done": sum(run_key(c, r, designs[c]) in done
                                                      for r in range(cfg["repeats"])),
                          "repeats": cfg["repeats"]} for c in cells])


def _train_replicates(*args, **kwargs):
    from ..train import train_replicates
    return train_replicates(*args, **kwargs)


@dataclass
class _Session:
    """One call of :func:`run_grid`: what it trains with and where it writes."""

    cfg: dict
    preset: str
    writer: ResultsWriter
    device: object
    train_fn: Callable
    synth_fn: Callable
    pacer: object
    clock: Callable[[], float]
    train_generators: bool = False
    available_generators: bool = False
    progress: bool = True
    source: object = None
    on_error: str = "raise"
    data: object = None
    splits: dict = field(default_factory=dict)  # split kind -> Split
    only_repeats: Collection[int] | None = None    # None: every repeat
    notes: dict = field(default_factory=dict)   # split kind -> what its tables must say
    base: dict | None = None
    designs: dict = field(default_factory=dict)

    def design(self, cell: Cell) -> str:
        key = (cell.model, cell.synthetic != "none")
        if key not in self.designs:
            self.designs[key] = cell_design(self.cfg, self.preset, cell)
        return self.designs[key]

    def run(self, cells: list[Cell]) -> GridProgress:
        from tqdm.auto import tqdm

        repeats = [r for r in range(self.cfg["repeats"])
                   if self.only_repeats is None or r in self.only_repeats]
        todo = {c: [r for r in repeats if run_key(c, r, self.design(c)) not in self.writer.done]
                for c in cells}
        written, blocked = 0, {}
        with tqdm(total=len(cells), initial=sum(not t for t in todo.values()), unit="cell",
                  desc=f"grid ({self.preset})", disable=not self.progress) as bar:
            for cell in [c for c in cells if todo[c]]:
                self.ensure_data(cells)
                ready, generators, waiting = self.ready_repeats(cell, todo[cell])
                if waiting:  # listed before any time is judged: a wait is no time spent
                    blocked[cell.key] = waiting
                if not ready:
                    continue
                if not self.pacer.fits(cell, len(ready)):
                    if waiting:
                        blocked[cell.key] = (f"no time left this chunk for its {len(ready)} "
                                             f"ready repeat(s); {waiting}")
                    continue  # a shorter cell further on may still fit
                bar.set_postfix_str(cell.key)
                written += self.run_cell(cell, ready, generators)
                todo[cell] = [r for r in todo[cell] if r not in ready]
                bar.update(not todo[cell])
        remaining = [c.key for c in cells if todo[c]]
        return GridProgress(self.writer.directory, len(cells), len(cells) - len(remaining),
                            written, self.pacer.skipped, remaining, blocked)

    def ready_repeats(self, cell: Cell, repeats: list[int]
                      ) -> tuple[list[int], dict[int, Path], str | None]:
        """The ``repeats`` of ``cell`` that can train now, the generators they use, and why
        the others wait (None when none does). Trains missing generators first where asked."""
        needs = self.generator_needs(cell, repeats)
        if self.train_generators and any(n.path is None for n in needs.values()):
            self.train_missing(cell, needs, len(repeats))
            needs = self.generator_needs(cell, repeats)
        missing = [r for r in repeats if r in needs and needs[r].path is None]
        generators = {n.g: n.path for n in needs.values() if n.path is not None}
        if not missing:
            return repeats, generators, None
        why = needs[missing[0]].why
        if not self.available_generators or len(missing) == len(repeats):
            return [], {}, why
        return [r for r in repeats if r not in missing], generators, \
            f"{len(missing)} repeat(s) wait: {why}"

    def generator_needs(self, cell: Cell, repeats: list[int]) -> dict:
        """:func:`generator_needs`, for the default builder (another brings its own images)."""
        if self.synth_fn is not training_sets:
            return {}
        return generator_needs(self.data, self.split(cell), cell, repeats, self.cfg)

    def train_missing(self, cell: Cell, needs: dict, repeats: int) -> None:
        """Train or resume the missing generators of ``needs``, inside the pacer's minutes."""
        from ..synthetic.diffusion import train_for_sample

        for g in sorted({n.g for n in needs.values() if n.path is None}):
            minutes = self.pacer.generator_minutes(cell, repeats)
            if minutes is not None and minutes <= 0:
                return  # the next chunk resumes it
            train_for_sample(self.data, self.split(cell), generator_fraction(cell, self.cfg), g,
                             leaky=cell.leakage == "leaky", minutes=minutes,
                             device=self.device, progress=self.progress)

    def run_cell(self, cell: Cell, repeats: list[int], generators: dict[int, Path]) -> int:
        """Train ``repeats`` of ``cell`` in one call and append their rows; runs written."""
        start = self.clock()
        seeds = [repeat_seeds(r, self.cfg) for r in repeats]
        split = self.split(cell)
        sets = self.synth_fn(self.data, split, cell, seeds, self.cfg, self.device, generators)
        val = (self.data.images[split.val], self.data.labels[split.val])
        test = (self.data.images[split.test], self.data.labels[split.test])
        records = self.train_fn(cell.model, sets.bank_images, sets.bank_labels, sets.index,
                                val, test, [s.train_seed for s in seeds], aug=cell.aug,
                                device=self.device, **train_overrides(self.cfg, cell.model))
        if len(records) != len(seeds):
            raise ValueError(f"train_fn returned {len(records)} records for {len(seeds)} "
                             f"repeats of {cell.key}")
        seconds = self.clock() - start
        self.pacer.record(cell, seconds, len(seeds))
        design = self.design(cell)
        base = {**self.base, "split_seed": split.seed, "split_note": self.notes[cell.split]}
        shares = class_share_losses(sets, test[1], len(self.data.classes))
        return sum(self.writer.append(run_row(cell, s, record, base, design, info,
                                              int(sets.index.shape[1]), seconds, share),
                                      epoch_rows(cell, s, record, design))
                   for s, record, info, share in zip(seeds, records, sets.info, shares))

    def ensure_data(self, cells: list[Cell]) -> None:
        """Data and the rows' shared columns, loaded once a cell needs training."""
        from ..data import load_mri
        from ..provenance import provenance

        if self.data is None:
            loaded = load_mri(self.source, on_error=self.on_error)
            self.check_data_set(loaded)  # before the subset: a wrong source says so at once
            self.data = grid_data(loaded, self.cfg, any(c.split == "subject" for c in cells))
        if self.base is None:
            self.check_data_set(self.data)
            self.base = {"preset": self.preset,
                         **provenance(self.device), "data_fingerprint": self.data.fingerprint,
                         "n_images": len(self.data), "classes": list(self.data.classes),
                         "samples": self.cfg["samples"], "backend": self.cfg["backend"],
                         "config": self.cfg}

    def check_data_set(self, data) -> None:
        """Refuse to add runs of other data to a folder (``--source`` or ``MRILIB_DATA``
        changed since its runs were made): no table may pool two data sets."""
        held = data_fingerprints(self.writer.runs)
        other = [fp for fp in held if fp != data.fingerprint]
        if other:
            raise ValueError(f"{self.writer.directory} holds {held[other[0]]} runs made from "
                             f"data {other[0]}, but this grid loaded data "
                             f"{data.fingerprint} from {data.source}: pass the "
                             f"--source (or MRILIB_DATA) those runs used, or another "
                             f"--results folder")

    def split(self, cell: Cell):
        """The split of ``cell``'s kind, made once; nested samples checked before use."""
        from ..splits import check_nested, pool_class_sizes, split_mri
        from ..subjects import split_note

        if cell.split not in self.splits:
            split = split_mri(self.data, cell.split)
            if self.cfg.get("generator_fraction") is not None:  # generators serve larger X
                check_nested(pool_class_sizes(self.data, split),
                             {*self.cfg["fractions"], self.cfg["generator_fraction"]},
                             self.data.classes)
            self.splits[cell.split] = split
        if cell.split not in self.notes:
            self.notes[cell.split] = split_note(self.data, self.splits[cell.split])
        return self.splits[cell.split]
