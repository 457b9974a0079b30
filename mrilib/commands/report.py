"""``python -m mrilib report``: every chapter-7 figure and ``summary.md`` from the results table."""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from ..config import KNOWN_PRESETS

METRICS = ("final_val_loss", "best_val_loss", "final_test_loss", "best_test_loss")


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="chapter-7 figures and summary.md from the results table")
    p.add_argument("--preset", choices=KNOWN_PRESETS, default=None,
                   help="whose results: thesis (results/, figures/) or quick/cell "
                        "(cache/<preset>/); default: $MRILIB_PRESET, else thesis")
    p.add_argument("--results", default=None,
                   help="folder holding runs.jsonl to read (default: the committed results/ "
                        "when it holds runs, else the preset's results folder); any other "
                        "folder gets the summary and a figures/ folder of its own, e.g. "
                        "results/imagenet")
    p.add_argument("--out", default=None,
                   help="folder for summary.md (default: the folder --results names, else "
                        "the preset's results folder, so a quick run never overwrites the "
                        "committed results/summary.md)")
    p.add_argument("--figures", default=None,
                   help="folder for the figures (default: figures/ for thesis and "
                        "cache/<preset>/figures otherwise; <folder>/figures for a --results "
                        "folder other than results/ and the preset's own)")
    p.add_argument("--metric", default="final_val_loss", choices=METRICS,
                   help="the loss the tables and verdicts use (default: the thesis's, median "
                        "validation cross-entropy at the last epoch)")
    p.add_argument("--n-boot", type=int, default=None,
                   help="bootstrap resamples (default: mrilib.stats, 10,000; quick 500)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiment import preset_env
    from ..paths import preset_name

    with preset_env(args.preset or preset_name()):
        path = write_report(args.results, args.metric, args.n_boot, out=args.out,
                            figures=args.figures)
    print(f"wrote {path}")
    return 0


def write_report(results=None, metric: str = "final_val_loss", n_boot: int | None = None,
                 seed: int | None = None, out=None, figures=None) -> Path:
    """Draw every figure and write ``summary.md``; the path of the summary.

    Reads ``results``, by default the runs :func:`mrilib.experiment.chapter_results`
    picks without training (the committed ``results/`` when it holds runs, else the
    preset's results folder); figures go to ``figures`` (default :func:`figures_dir`) and
    the summary to ``out`` (default :func:`results_dir`), both by the preset in force, so
    reading the committed results under the quick preset writes nothing over them. A
    ``results`` folder other than these two (e.g. ``results/imagenet``) keeps its report
    to itself: ``summary.md`` in it and figures in its ``figures/``. Figures whose
    cells are not run yet are listed in the summary with the reason (and an older file of
    theirs is removed, so no stale figure stands beside the summary). Runs of a
    superseded design are left out, as :func:`mrilib.experiment.load_results` does by
    default, and the summary says how many.
    """
    import matplotlib.pyplot as plt

    from .. import stats
    from ..experiment import (chapter_results, committed_results_dir, folder_line,
                              load_results, preset_note)
    from ..paths import atomic_write_bytes, figures_dir, results_dir
    from ..plots import results as plots
    from ..plots import save_figure

    figure_dir = figures
    if results is None:
        chapter = chapter_results(train=False)
        directory, runs, epochs = chapter.directory, chapter.runs, chapter.epochs
        origin = chapter.description
    else:
        directory = Path(results)
        runs, epochs = load_results(directory)  # one design per model; warns what it set aside
        origin = folder_line(runs, directory)
        if directory.resolve() not in (results_dir().resolve(),
                                       committed_results_dir().resolve()):
            # another folder (results/imagenet, a copy): its report stays beside its runs
            out = directory if out is None else out
            figure_dir = directory / "figures" if figure_dir is None else figure_dir
    if runs.empty:
        raise FileNotFoundError(f"{directory / 'runs.jsonl'} holds no runs yet; run the grid "
                                f"first (python -m mrilib grid --preset ... --resume)")
    runs = stats.with_confusion_metrics(runs)
    figures = {}
    for name, make in figure_makers(runs, epochs, metric, n_boot, seed,
                                    preset_note(runs)).items():
        try:
            fig = make()
        except plots.MissingCells as err:  # the cells it needs are not in the table yet
            figures[name] = f"not drawn: {err}"
            stale = Path(figure_dir or figures_dir()) / f"{name}.png"
            stale.unlink(missing_ok=True)
            continue
        figures[name] = save_figure(fig, name, directory=figure_dir)
        plt.close(fig)
    out = Path(out) if out is not None else results_dir()
    text = summary_markdown(runs, directory, out, figures, metric, n_boot, seed, origin)
    return atomic_write_bytes(out / "summary.md", text.encode())


def figure_makers(runs, epochs, metric: str = "final_val_loss", n_boot: int | None = None,
                  seed: int | None = None, note: str | None = None) -> dict:
    """File name under figures/ -> a call that draws it, for every chapter-7 figure.

    Figures 7.1 and 7.2 for the basic CNN (the thesis's), the sweep and the synthetic
    effect once per augmentation policy; ``note`` goes under each
    (:func:`mrilib.experiment.preset_note`).
    """
    from ..plots import results as plots

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


def summary_markdown(runs, directory: Path, out: Path, figures: dict,
                     metric: str = "final_val_loss", n_boot: int | None = None,
                     seed: int | None = None, origin: str | None = None) -> str:
    """The report: provenance, caveats, the thesis comparison, every table, the figures.

    ``origin`` is :attr:`mrilib.experiment.ChapterResults.description`, shown first.
    """
    from ..plots import results as plots

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
    from ..plots import results as plots
    from ..plots.results import model_label

    lines = ["## Read this first"]

    scratch = sorted({m for m, i in zip(runs["model"], runs["init"].astype(str))
                      if m != "basic_cnn" and i == "scratch"})
    if scratch:
        names = " and ".join(model_label(runs, m).split(" (")[0] for m in scratch)
        lines.append(f"- {names} were trained **from scratch** (ImageNet weights "
                     f"cannot be fetched on the machines this ran on); the thesis fine-tuned "
                     f"ImageNet weights, so their numbers are not the thesis's setting.")
    lines.append("- Splits are **slice-level**: the dataset has about 32 axial slices per "
                 "subject (6,400 slices: likely about 200 OASIS subjects) and no subject ids, "
                 "so slices of one brain sit on both sides of every split; all losses and "
                 "accuracies are optimistic compared with a subject-level split.")
    lines.append("- " + plots.moderate_note(runs))
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
    from .. import stats
    from ..plots import results as plots

    metric = plots.thesis_metric(metric)  # the thesis's measure, whatever --metric
    table = plots.thesis_comparison(runs, metric, n_boot, seed)
    lines = ["## Beside the thesis (basic CNN, no augmentation)",
             f"Median {plots.METRIC_LABELS[metric]}, the thesis's measure; whether its number "
             f"lies inside our interval is judged only for cells of at least "
             f"{plots.min_clusters()} real samples.",
             markdown_table(table)]
    pairs = (("30% real + 70% synthetic vs 100% real",
              {"synthetic": "fill", "real_fraction": 0.3}, {"synthetic": "none", "real_fraction": 1.0}),
             ("30% real vs 100% real",
              {"synthetic": "none", "real_fraction": 0.3}, {"synthetic": "none", "real_fraction": 1.0}),
             ("30% real + 70% synthetic vs 30% real",
              {"synthetic": "fill", "real_fraction": 0.3}, {"synthetic": "none", "real_fraction": 0.3}))
    rows = []
    for label, a, b in pairs:
        a, b = {"model": "basic_cnn", "aug": "none", **a}, {"model": "basic_cnn", "aug": "none", **b}
        try:
            c = stats.compare_cells(runs, a, b, metric, n_boot=n_boot, seed=seed)
        except ValueError:
            continue
        rows.append({"comparison": label, "difference": plots.format_interval(
            c["difference"], c["low"], c["high"]), "paired": c["paired"],
            "distinguishable from noise": c["distinguishable"]})
    if rows:
        import pandas as pd
        lines += ["First minus second, 95% interval: the median of the per-repeat "
                  "differences where the cells are paired (same real samples), else the "
                  "difference of their medians:",
                  markdown_table(pd.DataFrame(rows), index=False)]
    lines.append("Where our numbers differ from the thesis's, the causes the thesis leaves open "
                 "are the training protocol (epochs, learning rate, batch size, which epoch's "
                 "loss is reported), the generator (a DDPM trained on each sample here, Dall-E 2 "
                 "there), and the split (our fixed 20% test / 10% validation split by content "
                 "hash; the thesis's validation set is not described).")
    return "\n\n".join(lines)


def _effects_section(runs, metric, n_boot, seed) -> str:
    from ..plots import results as plots

    try:
        effects = plots.effects_table(runs, metric, n_boot, seed)
    except plots.MissingCells:
        return ("## Did synthetic images help?\n\nNo synthetic cell with a leak-free generator "
                "has its real-only twin in the results yet.")
    shown = effects.drop(columns="clusters")
    helped = effects[effects["verdict"].str.startswith("helped")]
    lines = ["## Did synthetic images help?",
             "Each synthetic cell against the real-only cell with the same architecture, "
             "augmentation and real fraction (leak-free generator; paired by real sample: "
             "the difference is the median of the per-repeat differences, synthetic minus "
             "real only). Negative differences mean the synthetic images lowered the loss.",
             markdown_table(shown, index=False),
             "\"real only\" and \"with synthetic\" are the medians of the repeats the two "
             "cells share, so \"real only\" can differ from the real-only cell's median "
             "over all its repeats in the tables below.",
             f"Synthetic images lowered the loss distinguishably from noise in {len(helped)} of "
             f"{len(effects)} comparisons" + (": " + "; ".join(
                 f"{a}, {g}, {p} at {x}% real" for a, g, p, x in
                 zip(helped["architecture"], helped["aug"], helped["synthetic"], helped["real %"]))
                 + "." if len(helped)
                 else ".")
             + f" With no effect anywhere, about {0.025 * len(effects):.1f}-"
               f"{0.05 * len(effects):.1f} of {len(effects)} would show a lower loss by chance "
               f"(one tail of a 95% interval, 2.5%, or more where the intervals cover less); "
               f"a verdict "
               f"holds more weight where it repeats across fractions and architectures."]
    return "\n\n".join(lines)


def _tables_section(runs, metric, n_boot, seed) -> str:
    from ..plots import results as plots

    from ..experiment import MODELS
    from ..models import MODELS as SPECS

    lines = ["## The thesis's results table, per architecture",
             "Median [95% interval] n=repeats; '-' where a cell has not been run; "
             "', k samples' where its repeats rest on fewer real samples than an interval "
             "needs (a partly run cell)."]
    for model in dict.fromkeys(runs["model"]):
        lines.append(markdown_table(plots.results_table(runs, model, metric, n_boot, seed)))
    missing = [SPECS[m].label for m in MODELS if not (runs["model"] == m).any()]
    if missing:
        lines.append(f"No runs yet of {' and '.join(missing)}.")
    return "\n\n".join(lines)


def _leakage_section(runs, metric, n_boot, seed) -> str:
    from ..plots import results as plots

    try:
        table = plots.leakage_table(runs, metric, n_boot, seed)
    except plots.MissingCells:
        return ""
    return "\n\n".join(["## Leakage ablation",
                        "A generator trained on the whole training pool (leaky) against one "
                        "trained only on the repeat's own sample (leak-free). A leaky gain that "
                        "the leak-free generator does not reproduce is information from real "
                        "images the classifier was not given.",
                        markdown_table(table, index=False)])


def _classification_section(runs, n_boot, seed) -> str:
    from ..plots import results as plots

    return "\n\n".join(["## Accuracy, macro-F1 and recall per class (test split, last epoch)",
                        plots.moderate_note(runs) + " " + plots.SPLIT_NOTE,
                        markdown_table(plots.classification_table(runs, n_boot=n_boot,
                                                                  seed=seed), index=False)])


def _figures_section(directory: Path, figures: dict) -> str:
    lines = ["## Figures"]
    for name, where in figures.items():
        if isinstance(where, Path):
            lines.append(f"![{name}]({os.path.relpath(where, directory)})")
        else:
            lines.append(f"- {name}: {where}")
    return "\n\n".join(lines)


def _cells_section(runs, n_boot, seed) -> str:
    from .. import stats
    from ..plots import results as plots

    summary = stats.cell_summary(runs, n_boot=n_boot, seed=seed)
    shown = summary[[*stats.CELL_COLUMNS, "n", "clusters", "diverged", "init"]].copy()
    shown["real_fraction"] = [f"{x:.0%}" for x in shown["real_fraction"]]
    for metric in stats.default_metrics(runs):
        shown[metric] = [plots.format_interval(e, lo, hi, digits=3) for e, lo, hi in
                         zip(summary[metric], summary[f"{metric}_low"], summary[f"{metric}_high"])]
    return "\n\n".join(["## Every cell", "Medians [95% interval] over repeats; accuracy, "
                        "macro-F1 and recall from the test confusion matrices. `clusters`: "
                        "the independent units the bootstrap resamples (repeats that share "
                        "a real sample count once); an interval over few of them is "
                        "optimistic. `diverged`: runs whose final validation loss is "
                        "missing or infinite (counted as +inf in the medians). "
                        + plots.SPLIT_NOTE,
                        markdown_table(shown, index=False)])
