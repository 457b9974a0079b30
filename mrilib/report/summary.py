"""``summary.md``: every chapter-7 figure drawn and every table written as markdown.

:func:`write_report` is what ``python -m mrilib report`` runs: it draws the figures of
:func:`figure_makers` (:mod:`mrilib.plots.results`), skipping with a note those whose
cells are not run yet, and writes :func:`summary_markdown`, whose tables come from
:mod:`mrilib.report.tables`.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from .. import stats
from ..plots import results as plots
from .tables import (cells_table, classification_table, effects_table, leakage_table,
                     min_clusters, results_table, thesis_comparison, thesis_differences,
                     thesis_metric)


class _Source(NamedTuple):
    directory: Path       # the folder holding runs.jsonl
    runs: pd.DataFrame
    epochs: pd.DataFrame
    origin: str           # the summary's first line: where the runs come from
    out: Path | None      # the summary's folder (None: the preset's results folder)
    figures: Path | None  # the figures' folder (None: the preset's figures folder)


def write_report(results=None, metric: str = "final_val_loss", n_boot: int | None = None,
                 seed: int | None = None, out=None, figures=None) -> Path:
    """Draw every figure and write ``summary.md``; the path of the summary.

    Reads ``results``, by default the runs :func:`mrilib.grid.chapter_results`
    picks without training (the committed ``results/`` when it holds runs, else the
    preset's results folder); figures go to ``figures`` (default :func:`figures_dir`) and
    the summary to ``out`` (default :func:`results_dir`), both by the preset in force, so
    reading the committed results under the quick preset writes nothing over them. A
    ``results`` folder other than these two (e.g. ``results/imagenet``) keeps its report
    to itself: ``summary.md`` in it and figures in its ``figures/``. Figures whose
    cells are not run yet are listed in the summary with the reason (and an older file of
    theirs is removed, so no stale figure stands beside the summary). Runs of a
    superseded design are left out, as :func:`mrilib.grid.load_results` does by
    default, and the summary says how many.
    """
    from ..grid import preset_note
    from ..paths import atomic_write_bytes, results_dir

    source = _report_source(results, out, figures)
    if source.runs.empty:
        raise FileNotFoundError(f"{source.directory / 'runs.jsonl'} holds no runs yet; run the "
                                f"grid first (python -m mrilib grid --preset ... --resume)")
    runs = stats.with_confusion_metrics(source.runs)
    makers = figure_makers(runs, source.epochs, metric, n_boot, seed, preset_note(runs))
    drawn = _drawn_figures(makers, source.figures)
    out = Path(source.out) if source.out is not None else results_dir()
    text = summary_markdown(runs, source.directory, out, drawn, metric, n_boot, seed,
                            source.origin)
    return atomic_write_bytes(out / "summary.md", text.encode())


def _report_source(results, out, figures) -> _Source:
    """The runs a report reads, the line that says where from, and where it writes."""
    from ..grid import chapter_results, committed_results_dir, folder_line, load_results
    from ..paths import results_dir

    if results is None:
        chapter = chapter_results(train=False)
        return _Source(chapter.directory, chapter.runs, chapter.epochs, chapter.description,
                       out, figures)
    directory = Path(results)
    runs, epochs = load_results(directory)  # one design per model; warns what it set aside
    if directory.resolve() not in (results_dir().resolve(),
                                   committed_results_dir().resolve()):
        # another folder (results/imagenet, a copy): its report stays beside its runs
        out = directory if out is None else out
        figures = directory / "figures" if figures is None else figures
    return _Source(directory, runs, epochs, folder_line(runs, directory), out, figures)


def _drawn_figures(makers: dict, directory=None) -> dict:
    """Name -> the path of each figure drawn, or ``"not drawn: why"``."""
    import matplotlib.pyplot as plt

    from ..paths import figures_dir
    from ..plots import save_figure

    drawn = {}
    for name, make in makers.items():
        try:
            fig = make()
        except plots.MissingCells as err:  # the cells it needs are not in the table yet
            drawn[name] = f"not drawn: {err}"
            (Path(directory or figures_dir()) / f"{name}.png").unlink(missing_ok=True)
            continue
        drawn[name] = save_figure(fig, name, directory=directory)
        plt.close(fig)
    return drawn


def figure_makers(runs, epochs, metric: str = "final_val_loss", n_boot: int | None = None,
                  seed: int | None = None, note: str | None = None) -> dict:
    """File name under figures/ -> a call that draws it, for every chapter-7 figure.

    Figures 7.1 and 7.2 for the basic CNN (the thesis's), the sweep and the synthetic
    effect once per augmentation policy; ``note`` goes under each
    (:func:`mrilib.grid.preset_note`).
    """
    boot = {"n_boot": n_boot, "seed": seed, "note": note}
    makers = {
        "fig7_1_loss_curves": partial(plots.loss_curves_figure, epochs, note=note),
        "fig7_2_augmentation": partial(plots.augmentation_figure, runs, metric=metric, note=note),
        "thesis_comparison": partial(plots.thesis_comparison_figure, runs, metric, **boot),
        "leakage": partial(plots.leakage_figure, runs, metric, **boot),
    }
    for aug in [a for a in plots.AUG_LABELS if (runs["aug"] == a).any()]:
        suffix = "" if aug == "none" else f"_{aug}"
        makers[f"fraction_sweep{suffix}"] = partial(plots.fraction_sweep_figure, runs, aug,
                                                    metric, **boot)
        makers[f"synthetic_effect{suffix}"] = partial(plots.synthetic_effect_figure, runs, aug,
                                                      metric, **boot)
    return makers


# ----------------------------------------------------------------------------- markdown

def markdown_table(frame, index: bool = True) -> str:
    """A GitHub markdown table of ``frame`` (no tabulate dependency)."""
    frame = frame.reset_index() if index else frame
    cells = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4f}"
    return str(value).replace("|", "/").replace("\n", " ")


def moderate_note(runs: pd.DataFrame) -> str:
    """How many Moderate_Demented slices the test split holds, and what that does to recall."""
    support = stats.split_support(runs)
    k = int(support.get("Moderate_Demented", 0))
    if not k:
        return ("The test split holds no Moderate_Demented slice (the dataset has 64 in all): "
                "its recall cannot be measured here.")
    # Clopper-Pearson for k of k: the lower bound solves p^k = 0.025.
    return (f"Moderate_Demented has {k} of the {int(support.sum())} test images (the full "
            f"dataset has 64 in all): its recall moves in steps of 1/{k}, and its intervals "
            f"below cover the variation between runs only, not these {k} slices' own "
            f"uncertainty: even {k} of {k} correct leaves an exact binomial 95% interval of "
            f"[{0.025 ** (1 / k):.2f}, 1].")


def summary_markdown(runs, directory: Path, out: Path, figures: dict,
                     metric: str = "final_val_loss", n_boot: int | None = None,
                     seed: int | None = None, origin: str | None = None) -> str:
    """The report: provenance, caveats, the thesis comparison, every table, the figures.

    ``origin`` is :attr:`mrilib.grid.ChapterResults.description`, shown first.
    """
    from ..paths import ROOT

    source = directory / "runs.jsonl"
    if source.resolve().is_relative_to(ROOT.resolve()):
        source = source.resolve().relative_to(ROOT.resolve())
    parts = [f"# Chapter 7 results\n\nGenerated by `python -m mrilib report` from "
             f"{len(runs)} runs in {runs['cell_key'].nunique()} cells "
             f"(`{source}`). Measure: median "
             f"{plots.METRIC_LABELS.get(metric, metric)} over repeats, with percentile-"
             f"bootstrap 95% intervals (hierarchical over shared real samples/generators)."
             + (f"\n\n**{origin}**" if origin else ""),
             _provenance(runs), _caveats(runs),
             _thesis_section(runs, metric, n_boot, seed),
             _effects_section(runs, metric, n_boot, seed),
             _tables_section(runs, metric, n_boot, seed),
             _leakage_section(runs, metric, n_boot, seed),
             _classification_section(runs, n_boot, seed),
             _figures_section(out, figures),
             _cells_section(runs, n_boot, seed)]
    return "\n\n".join(p for p in parts if p) + "\n"


def _provenance(runs) -> str:
    def values(col):
        return ", ".join(sorted({str(v) for v in runs[col].dropna()})) if col in runs else "-"

    hours = runs["seconds"].fillna(0).sum() / 3600 if "seconds" in runs else float("nan")
    lines = ["## Provenance",
             f"- git commit(s): {values('git_commit')} (dirty: {values('git_dirty')})",
             f"- device(s): {values('device_name')}",
             f"- torch {values('torch')}, timm {values('timm')}, diffusers {values('diffusers')}, "
             f"numpy {values('numpy')}, python {values('python')}",
             f"- preset(s): {values('preset')}; design hash(es): {values('design')}; "
             f"generator design(s): {values('generator_design')}; "
             f"data fingerprint: {values('data_fingerprint')}, images used: {values('n_images')}",
             f"- training time summed over runs: {hours:.2f} GPU/CPU hours"]
    return "\n".join(lines)


def _caveats(runs) -> str:
    lines = ["## Read this first"]
    scratch = sorted({m for m, i in zip(runs["model"], runs["init"].astype(str))
                      if m != "basic_cnn" and i == "scratch"})
    if scratch:
        names = " and ".join(plots.model_label(runs, m).split(" (")[0] for m in scratch)
        lines.append(f"- {names} were trained **from scratch** (ImageNet weights "
                     f"were not available where they were trained); the thesis fine-tuned "
                     f"ImageNet weights, so their numbers are not the thesis's setting.")
    lines.append("- Splits are **slice-level**: the dataset has about 32 axial slices per "
                 "subject (6,400 slices: likely about 200 OASIS subjects) and no subject ids, "
                 "so slices of one brain sit on both sides of every split; all losses and "
                 "accuracies are optimistic compared with a subject-level split.")
    lines.append("- " + moderate_note(runs))
    lines.append("- Synthetic images come from a class-conditional DDPM trained here on the "
                 "30% real sample that lies inside each repeat's own sample at every fraction "
                 "(SDEdit variations), not from Dall-E 2 as in the "
                 "thesis; epochs, learning rates and batch sizes, which the thesis does not "
                 "state, are mrilib.train's documented choices. Either can move the numbers.")
    lines.append("- Intervals cover the variation between training runs (real samples, "
                 "generators, initial weights) on one fixed split, not the finite test and "
                 "validation sets; with 5 independent real samples per cell (20 in a 100% "
                 "real-only cell) they cover "
                 "somewhat less than 95% (about 90-93% in simulation).")
    lines.append("- Many comparisons are made below at 95% each: a few intervals excluding 0 "
                 "are expected by chance alone; a consistent pattern across fractions or "
                 "architectures is stronger evidence than any single cell.")
    return "\n".join(lines)


def _thesis_section(runs, metric, n_boot, seed) -> str:
    metric = thesis_metric(metric)  # the thesis's measure, whatever --metric
    lines = ["## Beside the thesis (basic CNN, no augmentation)",
             f"Median {plots.METRIC_LABELS[metric]}, the thesis's measure; whether its number "
             f"lies inside our interval is judged only for cells of at least "
             f"{min_clusters()} real samples.",
             markdown_table(thesis_comparison(runs, metric, n_boot, seed))]
    differences = thesis_differences(runs, metric, n_boot, seed)
    if len(differences):
        lines += ["First minus second, 95% interval: the median of the per-repeat "
                  "differences where the cells are paired (same real samples), else the "
                  "difference of their medians:",
                  markdown_table(differences, index=False)]
    lines.append("Where our numbers differ from the thesis's, the causes the thesis leaves open "
                 "are the training protocol (epochs, learning rate, batch size, which epoch's "
                 "loss is reported), the generator (a DDPM trained on each sample here, Dall-E 2 "
                 "there), and the split (our fixed 20% test / 10% validation split by content "
                 "hash; the thesis's validation set is not described).")
    return "\n\n".join(lines)


def _effects_section(runs, metric, n_boot, seed) -> str:
    try:
        effects = effects_table(runs, metric, n_boot, seed)
    except plots.MissingCells:
        return ("## Did synthetic images help?\n\nNo synthetic cell with a leak-free generator "
                "has its real-only twin in the results yet.")
    return "\n\n".join(["## Did synthetic images help?",
                        "Each synthetic cell against the real-only cell with the same "
                        "architecture, augmentation and real fraction (leak-free generator; "
                        "paired by real sample: the difference is the median of the "
                        "per-repeat differences, synthetic minus real only). Negative "
                        "differences mean the synthetic images lowered the loss.",
                        markdown_table(effects.drop(columns="clusters"), index=False),
                        "\"real only\" and \"with synthetic\" are the medians of the repeats "
                        "the two cells share, so \"real only\" can differ from the real-only "
                        "cell's median over all its repeats in the tables below.",
                        _helped_line(effects)])


def _helped_line(effects) -> str:
    """How many comparisons the synthetic images won, against how many chance would give."""
    helped = effects[effects["verdict"].str.startswith("helped")]
    which = ("; ".join(f"{a}, {g}, {p} at {x}% real" for a, g, p, x in
                       zip(helped["architecture"], helped["aug"], helped["synthetic"],
                           helped["real %"])))
    n = len(effects)
    return (f"Synthetic images lowered the loss distinguishably from noise in {len(helped)} of "
            f"{n} comparisons" + (f": {which}." if len(helped) else ".")
            + f" With no effect anywhere, about {0.025 * n:.1f}-{0.05 * n:.1f} of {n} would "
              f"show a lower loss by chance (one tail of a 95% interval, 2.5%, or more where "
              f"the intervals cover less); a verdict holds more weight where it repeats "
              f"across fractions and architectures.")


def _tables_section(runs, metric, n_boot, seed) -> str:
    from ..grid import MODELS
    from ..models import MODELS as SPECS

    lines = ["## The thesis's results table, per architecture",
             "Median [95% interval] n=repeats; '-' where a cell has not been run; "
             "', k samples' where its repeats rest on fewer real samples than an interval "
             "needs (a partly run cell)."]
    for model in dict.fromkeys(runs["model"]):
        lines.append(markdown_table(results_table(runs, model, metric, n_boot, seed)))
    missing = [SPECS[m].label for m in MODELS if not (runs["model"] == m).any()]
    if missing:
        lines.append(f"No runs yet of {' and '.join(missing)}.")
    return "\n\n".join(lines)


def _leakage_section(runs, metric, n_boot, seed) -> str:
    try:
        table = leakage_table(runs, metric, n_boot, seed)
    except plots.MissingCells:
        return ""
    return "\n\n".join(["## Leakage ablation",
                        "A generator trained on the whole training pool (leaky) against one "
                        "trained only on the repeat's own sample (leak-free). A leaky gain that "
                        "the leak-free generator does not reproduce is information from real "
                        "images the classifier was not given.",
                        markdown_table(table, index=False)])


def _classification_section(runs, n_boot, seed) -> str:
    return "\n\n".join(["## Accuracy, macro-F1 and recall per class (test split, last epoch)",
                        moderate_note(runs) + " " + plots.SPLIT_NOTE,
                        markdown_table(classification_table(runs, n_boot=n_boot, seed=seed),
                                       index=False)])


def _figures_section(directory: Path, figures: dict) -> str:
    lines = ["## Figures"]
    for name, where in figures.items():
        if isinstance(where, Path):
            lines.append(f"![{name}]({os.path.relpath(where, directory)})")
        else:
            lines.append(f"- {name}: {where}")
    return "\n\n".join(lines)


def _cells_section(runs, n_boot, seed) -> str:
    return "\n\n".join(["## Every cell", "Medians [95% interval] over repeats; accuracy, "
                        "macro-F1 and recall from the test confusion matrices. `clusters`: "
                        "the independent units the bootstrap resamples (repeats that share "
                        "a real sample count once); an interval over few of them is "
                        "optimistic. `diverged`: runs whose final validation loss is "
                        "missing or infinite (counted as +inf in the medians). "
                        + plots.SPLIT_NOTE,
                        markdown_table(cells_table(runs, n_boot, seed), index=False)])
