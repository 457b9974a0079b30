"""``make reproduce``: build every chapter that committed results and artifacts allow.

Training starts only where a GPU is present or the user asks for it by name
(``--train``; the quick preset always trains: CPU minutes). Without either, a chapter that
would train a generator or a classifier grid is left out with one line saying what it
waits for and what it would cost on a GPU, and the run still finishes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import paths

NOTEBOOKS = ("01_data_exploration", "02_synthetic_images", "03_gradcam_real_vs_synthetic",
             "04_model_training", "05_results")
GENERATOR_MINUTES = 5.2  # one generator on an NVIDIA H100 80GB HBM3 (benchmarks/README.md)


@dataclass
class Step:
    """One thing ``make reproduce`` does, or leaves out and why."""

    name: str
    run: bool
    why: str


def plan(preset: str | None = None, train: bool | None = None) -> list[Step]:
    """What a reproduction does under ``preset``: the grid, each notebook, the report.

    ``train`` None: train where a GPU is present (always in the quick preset).
    """
    import torch

    preset = preset or paths.preset_name()
    if train is None:
        train = torch.cuda.is_available() or preset != "thesis"
    with paths.preset_env(preset):
        steps = [_grid_step(preset, train)]
        from .grid.chapter import TRAIN_ON_DEMAND

        # notebook 05 trains an on-demand preset's grid itself
        results = steps[0].run or _has_runs(preset) or (train and preset in TRAIN_ON_DEMAND)
        generator = train or _has_chapter_generator()
        steps += [Step(NOTEBOOKS[0], True, "the data, the recovered brains, the random-label "
                                           "check (committed result where there is one)")]
        wait = f"needs generator 0 of the 30% sample: {_generator_cost()}"
        steps += [Step(NOTEBOOKS[1], generator, "generator 0" if generator else wait),
                  Step(NOTEBOOKS[2], generator, "generator 0" if generator else wait),
                  Step(NOTEBOOKS[3], train, "trains one cell" if train else
                       "trains one grid cell with its generators: run it on a GPU, or with "
                       "--train (TRAIN=1) to train on this CPU"),
                  Step(NOTEBOOKS[4], results, "the chapter-7 runs" if results else
                       "no chapter-7 runs of the current protocol to read yet"),
                  Step("report", results, "figures and summary.md" if results else
                       "no runs to report yet")]
    return steps


def _grid_step(preset: str, train: bool) -> Step:
    from .grid import needs_grid

    if preset != "thesis":
        return Step("grid", False, f"the {preset} grid is trained by notebook 05 (CPU minutes)")
    if not needs_grid(preset):
        return Step("grid", False, "results/ hold every run of the grid: nothing to train")
    if train:
        return Step("grid", True, "training the missing runs (resumable)")
    return Step("grid", False, f"results/ lack runs of the grid: {grid_cost()} Run "
                               f"`make reproduce TRAIN=1` on a machine with a GPU (or "
                               f"`python -m mrilib grid --train-generators --resume "
                               f"--device cuda`), then commit results/")


def grid_cost() -> str:
    """The thesis grid's missing work, by the committed benchmarks of one card."""
    from .grid import grid_cells, grid_settings, grid_status
    from .grid.chapter import committed_results_dir
    from .grid.schedule import TimeBudget, bench_priors

    card = "NVIDIA H100 80GB HBM3"
    cfg = grid_settings("thesis")
    status = grid_status("thesis", committed_results_dir())
    missing = dict(zip(status["cell"], status["repeats"] - status["done"]))
    budget = TimeBudget(None, lambda: 0.0, [], lambda model: 20, bench_priors(card, cfg))
    seconds = sum(budget.expected(c, missing[c.key]) for c in grid_cells("thesis")
                  if missing[c.key])
    runs = int(sum(missing.values()))
    generators = 4 * cfg["samples"]  # leak-free and leaky, per split
    return (f"{runs} runs, at most about {seconds / 3600:.1f} hours of training on an {card} "
            f"by its committed benchmarks (maximum epochs; early stopping shortens it), plus "
            f"about {generators * GENERATOR_MINUTES / 60:.1f} hours for {generators} generators "
            f"and their sampling.")


def _generator_cost() -> str:
    return (f"about {GENERATOR_MINUTES:.0f} minutes on a GPU (`python -m mrilib synth train "
            f"--real-frac 0.3 --seed 0 --device cuda`), or --train (TRAIN=1) for hours on "
            f"this CPU")


def _has_runs(preset: str) -> bool:
    from .grid import chapter_results

    try:
        return not chapter_results(preset, train=False).runs.empty
    except FileNotFoundError:
        return False


def _has_chapter_generator() -> bool:
    """Whether generator 0 of the 30% sample, which chapters 2 and 3 show, is at hand."""
    from .data import load_mri
    from .splits import split_mri
    from .synthetic.diffusion import generator_path

    data = load_mri()
    try:
        generator_path(data, split_mri(data, "subject"), 0.3, 0)
    except (FileNotFoundError, ValueError):
        return False
    return True


def run(preset: str | None = None, train: bool | None = None,
        out: str | Path = "build/notebooks") -> int:
    """Carry out :func:`plan`: print each step, run those it can; 0 when all that ran passed."""
    preset = preset or paths.preset_name()
    steps = plan(preset, train)
    failed = 0
    for step in steps:
        print(f"== {step.name}: {'running' if step.run else 'left out'} ({step.why})",
              flush=True)
        if step.run:
            failed += _carry_out(step.name, preset, Path(out)) != 0
    left = [s.name for s in steps if not s.run]
    print(f"done: {sum(s.run for s in steps) - failed} of {len(steps)} steps ran"
          + (f"; left out: {', '.join(left)} (see above)" if left else "")
          + f"; notebooks in {out}/, figures in {paths.figures_dir()}/")
    return 1 if failed else 0


def _carry_out(name: str, preset: str, out: Path) -> int:
    env = {**os.environ, "MRILIB_PRESET": preset}
    if name == "grid":
        command = [sys.executable, "-m", "mrilib", "grid", "--preset", preset,
                   "--train-generators", "--resume"]
    elif name == "report":
        command = [sys.executable, "-m", "mrilib", "report", "--preset", preset]
    else:
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook",
                   "--execute", "--ExecutePreprocessor.timeout=-1", "--output-dir", str(out),
                   str(paths.NOTEBOOKS / f"{name}.ipynb")]
    return subprocess.run(command, env=env, cwd=paths.ROOT).returncode
