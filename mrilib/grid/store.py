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
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from .. import paths
from .cells import Cell
from .design import RepeatSeeds, run_key

RUNS_FILE, EPOCHS_FILE = "runs.jsonl", "epochs.jsonl"


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
    if not path.exists():
        return [], 0
    complete = path.read_bytes().rpartition(b"\n")[0]
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


class ResultsWriter:
    """Append-only runs and epochs tables in one folder, resumable by run key."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.runs_path = self.directory / RUNS_FILE
        self.epochs_path = self.directory / EPOCHS_FILE
        self.runs = repaired_rows(self.runs_path)
        self.done = {r["run_key"] for r in self.runs}
        self._drop_orphan_epochs()

    def _drop_orphan_epochs(self) -> None:
        """Epoch rows of runs whose run row never landed (killed in between) go."""
        rows = repaired_rows(self.epochs_path)
        seen, kept = set(), []
        for row in rows:
            ident = (row["run_key"], row["epoch"])
            if row["run_key"] in self.done and ident not in seen:
                seen.add(ident)
                kept.append(row)
        if len(kept) != len(rows):
            blob = "".join(json.dumps(r) + "\n" for r in kept).encode()
            paths.atomic_write_bytes(self.epochs_path, blob)

    def append(self, run_row: dict, epoch_rows: Iterable[dict]) -> None:
        """Write one run: its epoch rows first, then the run row that marks it done."""
        if run_row["run_key"] in self.done:
            raise ValueError(f"run {run_row['run_key']} is already in {self.runs_path}")
        append_lines(self.epochs_path, epoch_rows)
        append_lines(self.runs_path, [run_row])
        self.runs.append(run_row)
        self.done.add(run_row["run_key"])


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
    and decide by hand). Runs only ``target`` holds stay. ``check_only``: raise or not, write nothing. Returns
    (runs ``target`` held, runs added).
    """
    source, target = Path(source), Path(target)
    have = {r["run_key"]: r for r in read_jsonl(target / RUNS_FILE)[0]}
    got: dict[str, dict] = {}
    for row in read_jsonl(source / RUNS_FILE)[0]:
        key = row["run_key"]
        for other, where in ((got.get(key), f"twice in {source}"), (have.get(key), "here")):
            if other is not None and other != row:
                field = next(k for k in sorted(set(row) | set(other))
                             if row.get(k) != other.get(k))
                raise ValueError(f"run {key} differs between {source} and {where} in "
                                 f"{field} ({row.get(field)} there, {other.get(field)} "
                                 f"{'here' if where == 'here' else 'in its other copy'}): "
                                 f"trained apart; nothing was merged, both files are as "
                                 f"they were")
        got[key] = row
    new = [r for r in got.values() if r["run_key"] not in have]
    if check_only or not new:
        return len(have), len(new)
    epochs: dict[str, list[dict]] = {}
    for row in read_jsonl(source / EPOCHS_FILE)[0]:
        epochs.setdefault(row["run_key"], []).append(row)
    writer = ResultsWriter(target)
    for row in new:
        writer.append(row, epochs.get(row["run_key"], []))
    return len(have), len(new)


# ----------------------------------------------------------------------------- rows

_STAGE_KEYS = ("epoch", "val_loss", "val_acc", "test_loss", "test_acc", "test_confusion",
               "val_confusion")
_RECORD_KEYS = {"history", "final", "best", "seconds", "device", "init"}


def run_row(cell: Cell, seeds: RepeatSeeds, record: dict, base: dict, design: str, info: dict,
            n_train: int, cell_seconds: float) -> dict:
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
    row.update({"seconds": record.get("seconds"), "cell_seconds": cell_seconds,
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
