"""The grid as cluster jobs: the remaining work cut into units, each submitted through submitit.

A unit is one split's generator g with every repeat that uses it (r with r mod G = g,
synthetic cells: the job trains or loads g and its leaky twin, draws their variations
once and trains those repeats), or one split's real-only cells of one model. No two units
need the same generator, so no generator is trained twice; the reasoning is in
docs/decisions.md, "The unit of cluster work". Each job writes its own shard of the results
folder (:func:`mrilib.grid.store.shard_folders`), which readers merge and ``grid --merge``
folds into ``runs.jsonl``. A preempted or timed-out job is requeued by submitit and resumes
from the runs its shard holds. The runner knows nothing of this module.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from .cells import Cell
from .design import grid_settings, repeat_seeds, run_key
from .runner import grid_results_dir, grid_state, run_grid
from .store import read_runs

EXECUTORS = ("local", "slurm", "submitit-local")  # local: in this process, no submitit
DEFAULTS = {
    "timeout_min": 240,     # a job's time limit; a job stopped by it is requeued and resumes
    "gpus_per_job": 1,      # on SLURM; submitit-local: as many as this machine has, at most
    "max_jobs": None,       # jobs running at once (SLURM array parallelism); None: all
    "partition": None,      # SLURM partition; None: the cluster's default
    "jobs_folder": "jobs",  # under the results folder: submitit's pickles and job logs
    # A job that finds its shard or a generator held by another process (a merge folding
    # the shard, a job training the generator) tries again this often, at most this long.
    "busy_wait_s": 30.0,
    "busy_max_min": 15.0,
}


@dataclass(frozen=True)
class Unit:
    """One job's share of the grid: ``repeats`` (None: all) of ``cells`` (keys)."""

    name: str
    cells: tuple[str, ...]
    repeats: tuple[int, ...] | None


def work_units(preset: str, results: str | os.PathLike | None = None, **overrides
               ) -> list[Unit]:
    """The units of ``preset``'s grid that still miss runs in ``results`` (shards included)."""
    cfg, cells, designs, done = grid_state(preset, results, **overrides)

    def missing(cell: Cell, repeats) -> bool:
        return any(run_key(cell, r, designs[cell]) not in done for r in repeats)

    units, everyone = [], range(cfg["repeats"])
    for split in dict.fromkeys(c.split for c in cells):
        synthetic = [c for c in cells if c.split == split and c.synthetic != "none"]
        for g in range(cfg["samples"]):
            uses_g = tuple(r for r in everyone if repeat_seeds(r, cfg).sample_index == g)
            todo = tuple(c.key for c in synthetic if missing(c, uses_g))
            if todo and uses_g:
                units.append(Unit(f"{split}-g{g}", todo, uses_g))
        real = [c for c in cells if c.split == split and c.synthetic == "none"]
        for model in dict.fromkeys(c.model for c in real):
            todo = tuple(c.key for c in real if c.model == model and missing(c, everyone))
            if todo:
                units.append(Unit(f"{split}-{model}-real", todo, None))
    return units


@dataclass
class GridJob:
    """One unit run as a job: :func:`run_grid` on its share, into its shard."""

    unit: Unit
    preset: str
    results: str
    options: dict       # run_grid's keywords: device, source, train_generators, ...
    overrides: dict     # grid settings (tier, splits, imagenet, models)
    busy_wait_s: float = DEFAULTS["busy_wait_s"]
    busy_max_min: float = DEFAULTS["busy_max_min"]

    def __call__(self) -> dict:
        import time

        from ..locks import FolderBusy

        give_up = time.monotonic() + 60 * self.busy_max_min
        while True:
            try:  # resumes from the shard: what a try wrote is not trained again
                progress = run_grid(self.preset, self.results, resume=True, progress=False,
                                    shard=self.unit.name, only_cells=self.unit.cells,
                                    only_repeats=self.unit.repeats, **self.options,
                                    **self.overrides)
                break
            except FolderBusy as err:
                if time.monotonic() + self.busy_wait_s > give_up:
                    raise FolderBusy(f"{err} (still held after {self.busy_max_min:g} "
                                     f"minutes of retries)") from None
                print(f"{self.unit.name}: {err}; trying again in {self.busy_wait_s:g} s",
                      flush=True)
                time.sleep(self.busy_wait_s)
        return {"unit": self.unit.name, "written": progress.runs_written,
                "remaining": progress.remaining, "blocked": progress.blocked}

    def checkpoint(self, *args, **kwargs):
        """Preempted or out of time: submitit requeues this job, which resumes from its
        shard (the run in progress is lost, none is written twice)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def submit_grid(executor: str, preset: str, results: str | os.PathLike | None = None,
                resume: bool = False, options: dict | None = None,
                overrides: dict | None = None, **cluster) -> list[tuple[Unit, object]]:
    """Submit the remaining units of ``preset``'s grid as jobs; [(unit, submitit job)].

    ``executor``: ``slurm`` (refused at once where there is none) or ``submitit-local``
    (jobs as processes of this machine). ``cluster``: this module's :data:`DEFAULTS`.
    """
    from ..config import settings

    check_executor(executor)
    knobs = settings(DEFAULTS, None, preset, **cluster)
    overrides = overrides or {}
    cfg = grid_settings(preset, **overrides)
    with paths.preset_env(preset):
        directory = grid_results_dir(cfg, results)
    held = read_runs(directory)
    if held and not resume:
        raise ValueError(f"{directory} already holds {len(held)} runs; pass --resume to "
                         f"continue them, or give another results folder")
    units = work_units(preset, directory, **overrides)
    if not units:
        return []
    pool = make_executor(executor, directory / knobs["jobs_folder"], knobs)
    jobs = [GridJob(u, preset, str(directory), dict(options or {}), overrides,
                    knobs["busy_wait_s"], knobs["busy_max_min"]) for u in units]
    with pool.batch():
        submitted = [pool.submit(job) for job in jobs]
    return list(zip(units, submitted))


def check_executor(kind: str) -> None:
    """Refuse at once an executor this machine cannot submit to."""
    if kind not in EXECUTORS[1:]:
        raise ValueError(f"--executor {kind!r}: choose local (this process), slurm or "
                         f"submitit-local (jobs as processes of this machine)")
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if kind == "slurm" and missing:  # submitit submits with sbatch and runs jobs with srun
        raise ValueError(f"--executor slurm: no SLURM on this machine ({' and '.join(missing)} "
                         f"not on PATH); run it on the cluster's login node, or use --executor "
                         f"local (this process) or --executor submitit-local (jobs on this "
                         f"machine)")


def make_executor(kind: str, folder: Path, knobs: dict):
    """A submitit executor of ``kind`` writing its pickles and logs under ``folder``."""
    import submitit

    check_executor(kind)
    pool = submitit.AutoExecutor(folder=folder / "%j",
                                 cluster="slurm" if kind == "slurm" else "local")
    pool.update_parameters(name="mrilib-grid")  # as squeue lists it
    if kind == "slurm":
        chosen = {"slurm_partition": knobs["partition"],
                  "slurm_array_parallelism": knobs["max_jobs"]}
        pool.update_parameters(timeout_min=int(knobs["timeout_min"]),  # submitit wants int
                               gpus_per_node=knobs["gpus_per_job"],
                               **{k: v for k, v in chosen.items() if v is not None})
    else:
        # submitit hides every GPU from a local job given none: give it this machine's
        import torch
        gpus = min(knobs["gpus_per_job"], torch.cuda.device_count())
        pool.update_parameters(timeout_min=int(knobs["timeout_min"]), gpus_per_node=gpus)
    return pool


def wait_for(submitted: list[tuple[Unit, object]]) -> list[str]:
    """Wait for every job; one line per job that failed (its unit, why, its log) or left
    runs blocked (a generator missing: pass --train-generators)."""
    lines = []
    for unit, job in submitted:
        try:
            done = job.result()
        except Exception as err:  # a job's failure is reported, the others still counted
            why = (str(err).strip().splitlines() or [type(err).__name__])[-1]
            lines.append(f"failed   job {job.job_id} ({unit.name}): {why[:300]} "
                         f"(log: {job.paths.stderr})")
            continue
        lines += [f"blocked  {unit.name}: {key}: {why}" for key, why in done["blocked"].items()]
    return lines
