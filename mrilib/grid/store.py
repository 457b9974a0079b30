"""The results store: append-only ``runs.jsonl`` and ``epochs.jsonl`` in one folder.

Each run is one fsync'd row, written after its epoch rows, so a run killed at any point
either is complete or leaves nothing a reader counts: an interrupted grid resumes with no
lost or duplicated rows. :func:`run_row` and :func:`epoch_rows` say what a row holds.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from .. import paths
from ..locks import FolderBusy, folder_lock
from .cells import Cell
from .design import RepeatSeeds, run_key

RUNS_FILE, EPOCHS_FILE = "runs.jsonl", "epochs.jsonl"
SHARDS = "shards"  # <results>/shards/<job>/: one cluster job's rows, merged by `grid --merge`


def _jsonable(value):
    """Plain JSON types from tensors, arrays, numpy scalars, tuples and paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Rows of ``path`` and the byte length of its intact part.

    Bytes after the last newline, or a last line that does not parse, are a row cut by
    a kill: they are dropped (the caller truncates them away). A bad line in the middle
    is damage nobody should paper over, and raises.
    """
    try:
        blob = path.read_bytes()
    except FileNotFoundError:  # never written, or a shard `grid --merge` just folded in
        return [], 0
    complete = blob.rpartition(b"\n")[0]
    lines = complete.split(b"\n") if complete else []
    rows, good = [], 0
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path} line {i + 1} is not valid JSON ({err}); repair or "
                             f"remove that line, then rerun with --resume") from None
        good += len(line) + 1
    return rows, good


def repaired_rows(path: Path) -> list[dict]:
    """The intact rows of ``path``, cutting a torn last line off the file itself."""
    rows, good = read_jsonl(path)
    if path.exists() and path.stat().st_size != good:
        paths.atomic_write_bytes(path, path.read_bytes()[:good])
    return rows


def read_runs(directory: str | os.PathLike) -> list[dict]:
    """The run rows of a results folder and its shards, each run key once.

    ``runs.jsonl`` first, then each shard's (:func:`shard_folders`) in name order. A run
    written twice as one identical row counts once; two rows of one key that differ
    (trained twice) raise a ValueError naming the key, both lines and the first field
    they differ in.
    """
    return folded_runs(f / RUNS_FILE for f in [Path(directory), *shard_folders(directory)])


def shard_folders(directory: str | os.PathLike) -> list[Path]:
    """The shards of a results folder: ``shards/<name>/``, each one cluster job's
    ``runs.jsonl`` and ``epochs.jsonl`` (folded into the folder's own by ``grid --merge``)."""
    root = Path(directory) / SHARDS
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def folded_runs(files: Iterable[Path]) -> list[dict]:
    """The rows of ``files`` (JSONL, read in turn), each run key once (:func:`read_runs`)."""
    first: dict[str, tuple[dict, str]] = {}
    for path in files:
        for line, row in enumerate(read_jsonl(path)[0], start=1):
            where = f"{path} line {line}"
            seen = first.setdefault(row["run_key"], (row, where))
            if seen[0] != row:
                field = first_difference(seen[0], row)
                raise ValueError(f"run {row['run_key']} is in {seen[1]} and {where} with "
                                 f"different {field} ({seen[0].get(field)!r} and "
                                 f"{row.get(field)!r}): it was trained twice; delete one of "
                                 f"the two lines (nothing else), then rerun")
    return [row for row, _ in first.values()]


def read_epochs(directory: str | os.PathLike, run_keys: set[str]) -> list[dict]:
    """The epoch rows of ``run_keys`` in a results folder, each (run, epoch) once."""
    return folded_epochs((f / EPOCHS_FILE for f in [Path(directory), *shard_folders(directory)]),
                         run_keys)


def folded_epochs(files: Iterable[Path], run_keys: set[str]) -> list[dict]:
    """The epoch rows of ``run_keys`` in ``files``, each (run key, epoch) once, first kept."""
    seen, kept = set(), []
    for path in files:
        for row in read_jsonl(path)[0]:
            ident = (row["run_key"], row["epoch"])
            if row["run_key"] in run_keys and ident not in seen:
                seen.add(ident)
                kept.append(row)
    return kept


def first_difference(a: dict, b: dict) -> str:
    """The first field, in sorted order, whose value differs between rows ``a`` and ``b``."""
    return next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def data_fingerprints(rows: Iterable[dict]) -> Counter:
    """Runs per data fingerprint among ``rows`` (rows that name none are left out)."""
    return Counter(r["data_fingerprint"] for r in rows if r.get("data_fingerprint"))


class ResultsWriter:
    """Append-only runs and epochs tables in one folder, resumable by run key.

    It holds the folder's lock from construction to :meth:`close` (or the end of a
    ``with`` block): a second writer on the folder is turned away at once, naming the
    process that holds it, before it repairs or writes anything. With ``shard`` it writes
    that shard of the folder instead (a cluster job's, :func:`shard_folders`), locking
    only the shard. ``runs`` and ``done``: the runs of the folder and all its shards.
    """

    BUSY = ("{folder} is being written by another grid or merge (pid {pid}); wait for it "
            "to finish or stop it, or pass another --results folder (the lock, {lock}, "
            "frees itself when that process ends)")

    JOB_BUSY = ("{folder} is being written by a cluster job (pid {pid}); a grid in this "
                "process would train its runs again: wait for the jobs to end and run "
                "`grid --merge`, or pass another --results folder")

    def __init__(self, directory: str | os.PathLike, shard: str | None = None,
                 shards_too: bool = False):
        """``shards_too``: also hold every shard's lock (a grid writing the folder itself
        must not run beside cluster jobs; a merge may, and leaves busy shards alone)."""
        self.directory = Path(directory)
        self.folder = self.directory if shard is None else self.directory / SHARDS / shard
        self.runs_path = self.folder / RUNS_FILE
        self.epochs_path = self.folder / EPOCHS_FILE
        self._lock = ExitStack()
        self._lock.enter_context(folder_lock(
            self.folder, self.BUSY.replace("{folder}", str(self.folder))))
        for job in shard_folders(self.directory) if shards_too and shard is None else []:
            try:
                self._lock.enter_context(folder_lock(
                    job, self.JOB_BUSY.replace("{folder}", str(job))))
            except BaseException:
                self.close()
                raise
        try:
            repaired_rows(self.runs_path)
            self._read_runs()
            self._drop_orphan_epochs()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._lock.close()

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read_runs(self) -> None:
        self.runs = read_runs(self.directory)
        self.done = {r["run_key"] for r in self.runs}
        self.written = {r["run_key"] for r in folded_runs([self.runs_path])}  # in our file
        self._size = self.runs_path.stat().st_size if self.runs_path.exists() else 0

    def _drop_orphan_epochs(self) -> None:
        """Epoch rows of runs whose run row never landed (killed in between) go."""
        rows = repaired_rows(self.epochs_path)
        kept = folded_epochs([self.epochs_path], self.written)
        if len(kept) != len(rows):
            blob = "".join(json.dumps(r) + "\n" for r in kept).encode()
            paths.atomic_write_bytes(self.epochs_path, blob)

    def append(self, run_row: dict, epoch_rows: Iterable[dict]) -> bool:
        """Write one run: its epoch rows first, then the run row that marks it done.

        False, writing nothing, when our file holds the run already: the file is read
        again first if it grew since this writer last looked (a writer that ignored the lock).
        """
        size = self.runs_path.stat().st_size if self.runs_path.exists() else 0
        if size != self._size:
            self._read_runs()
        if run_row["run_key"] in self.written:
            return False
        append_lines(self.epochs_path, epoch_rows)
        append_lines(self.runs_path, [run_row])
        self.runs.append(run_row)
        self.done.add(run_row["run_key"])
        self.written.add(run_row["run_key"])
        self._size = self.runs_path.stat().st_size
        return True


def append_lines(path: Path, rows: Iterable[dict]) -> None:
    blob = "".join(json.dumps(_jsonable(r)) + "\n" for r in rows)
    if not blob:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def merge_results(source: str | os.PathLike, target: str | os.PathLike, check_only: bool = False
                  ) -> tuple[int, int]:
    """Append to ``target`` the runs of ``source`` it lacks, each with its epoch rows.

    For rows trained elsewhere (a remote GPU job's, ``tools/gpu/collect.sh``; a cluster
    job's shard): a run both folders hold must be the same row in both, else this raises
    before writing anything, naming the run (trained twice, differently: keep both files
    and decide by hand). Runs only ``target`` holds stay. ``check_only``: raise or not,
    write nothing. Returns (runs ``target`` held, runs added).
    """
    source, target = Path(source), Path(target)
    have = {r["run_key"]: r for r in folded_runs([target / RUNS_FILE])}
    new = runs_to_add(source, have)
    if check_only or not new:
        return len(have), len(new)
    with ResultsWriter(target) as writer:
        append_runs(source, new, writer)
    return len(have), len(new)


def runs_to_add(source: Path, have: dict[str, dict]) -> list[dict]:
    """The run rows of ``source`` missing from ``have`` (run key -> row); raises on a run
    held as two different rows (:func:`merge_results`)."""
    got: dict[str, dict] = {}
    for row in read_jsonl(source / RUNS_FILE)[0]:
        key = row["run_key"]
        for other, where in ((got.get(key), f"twice in {source}"), (have.get(key), "here")):
            if other is not None and other != row:
                field = first_difference(row, other)
                raise ValueError(f"run {key} differs between {source} and {where} in "
                                 f"{field} ({row.get(field)} there, {other.get(field)} "
                                 f"{'here' if where == 'here' else 'in its other copy'}): "
                                 f"trained apart; nothing was merged, both files are as "
                                 f"they were")
        got[key] = row
    return [r for r in got.values() if r["run_key"] not in have]


def append_runs(source: Path, rows: list[dict], writer: "ResultsWriter") -> None:
    """Write ``rows`` (runs of ``source``) through ``writer``, each with its epoch rows."""
    epochs: dict[str, list[dict]] = {}
    for row in read_jsonl(source / EPOCHS_FILE)[0]:
        epochs.setdefault(row["run_key"], []).append(row)
    for row in rows:
        writer.append(row, epochs.get(row["run_key"], []))


def merge_shards(directory: str | os.PathLike) -> tuple[int, list[str]]:
    """Fold each finished shard of ``directory`` into its ``runs.jsonl``, then remove it.

    Holds the folder's lock throughout (one merge at a time, no in-process grid meanwhile;
    jobs writing shards go on). A shard a job still writes (its lock held) is left for a
    later merge; a run that a shard and the folder hold as two different rows stops the
    merge there, that shard untouched. Returns (runs added, names of the shards left).
    """
    directory, added, left = Path(directory), 0, []
    with ResultsWriter(directory) as writer:
        for shard in shard_folders(directory):
            try:
                with folder_lock(shard, "busy"):
                    have = {r["run_key"]: r for r in folded_runs([writer.runs_path])}
                    new = runs_to_add(shard, have)
                    append_runs(shard, new, writer)
                    added += len(new)
                    shutil.rmtree(shard)  # its rows are in runs.jsonl now
            except FolderBusy:
                left.append(shard.name)
    return added, left


# ----------------------------------------------------------------------------- rows

_STAGE_KEYS = ("epoch", "val_loss", "val_acc", "test_loss", "test_acc", "test_confusion",
               "val_confusion")
_RECORD_KEYS = {"history", "final", "best", "seconds", "device", "init", "stopped_epoch"}


def run_row(cell: Cell, seeds: RepeatSeeds, record: dict, base: dict, design: str, info: dict,
            n_train: int, cell_seconds: float, class_share_loss: float | None = None) -> dict:
    """The results row of one run: cell, seeds, metrics, provenance, config.

    ``design``: :func:`cell_design`, stored as ``design`` (training) and
    ``generator_design`` (synthetic cells; None for real-only ones).
    """
    training, _, generator = design.partition("+")
    row = {"run_key": run_key(cell, seeds.repeat, design), "cell_key": cell.key,
           "design": training, "generator_design": generator or None,
           **asdict(cell), "synthetic_fraction": cell.synthetic_fraction,
           "synthetic_classes": cell.synthetic_classes, **asdict(seeds),
           "init": record.get("init"), "n_train": n_train, "synthetic_info": info}
    for stage in ("final", "best"):
        for key in _STAGE_KEYS:
            row[f"{stage}_{key}"] = record[stage].get(key)
    row.update({"class_share_test_loss": class_share_loss,  # the no-learning baseline
                "stopped_epoch": record.get("stopped_epoch"),  # = final_epoch; None: older rows
                "seconds": record.get("seconds"), "cell_seconds": cell_seconds,
                "device": str(record.get("device")),
                "train_settings": {k: v for k, v in record.items() if k not in _RECORD_KEYS},
                **{k: v for k, v in base.items()},
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return row


def epoch_rows(cell: Cell, seeds: RepeatSeeds, record: dict, design: str) -> list[dict]:
    """One row per epoch of one run, for loss curves."""
    key = run_key(cell, seeds.repeat, design)
    return [{"run_key": key, **asdict(cell), "repeat": seeds.repeat,
             "sample_index": seeds.sample_index, "init": record.get("init"), **h}
            for h in record["history"]]


def brief(info: dict) -> dict:
    """A mixing info dict without its per-image id lists (kept as one hash)."""
    out = {k: v for k, v in info.items() if k not in ("real_ids", "synthetic_sources")}
    ids = "\n".join(info.get("real_ids", [])) + "|" + "\n".join(info.get("synthetic_sources", []))
    out["ids_sha1"] = hashlib.sha1(ids.encode()).hexdigest()[:16]
    return out
