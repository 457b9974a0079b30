"""``summary.md``: every chapter-7 figure drawn and every table written as markdown.

:func:`write_report` is what ``python -m mrilib report`` runs: it draws the figures of
:func:`figure_makers` (:mod:`mrilib.plots.results`), skipping with a note those whose
cells are not run yet, and writes :func:`summary_markdown`, whose tables come from
:mod:`mrilib.report.tables`. Each split is its own protocol: its own section, tables
and figures (``<figure>_<split>.png``), never mixed with the other's.

Kept as one module (a little over 500 lines): its sections and their caveats are one
document, read top to bottom as summary.md is; the tables live in :mod:`.tables`.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from .. import stats
from ..grid.store import shard_folders
from ..plots import results as plots
from ..plots.results import split_of
from .tables import (cells_table, classification_table, effects_table, leakage_table,
                     min_clusters, results_table, thesis_comparison, thesis_differences,
                     thesis_metric)

PRIMARY = plots.PRIMARY
# Report order and headings: the honest split first, then the thesis's.
SPLIT_TITLES = {"subject": "Subject split: whole brains on one side",
                "slice": "Slice split: the thesis's protocol (optimistic)"}


class _Source(NamedTuple):
    directory: Path       # the folder holding runs.jsonl
    runs: pd.DataFrame
    epochs: pd.DataFrame
    origin: str           # the summary's first line: where the runs come from
    out: Path | None      # the summary's folder (None: the preset's results folder)
    figures: Path | None  # the figures' folder (None: the preset's figures folder)


def write_report(results=None, metric: str = PRIMARY, n_boot: int | None = None,
                 seed: int | None = None, out=None, figures=None) -> Path:
    """Draw every figure and write ``summary.md``; the path of the summary.

    Reads ``results``, by default the runs :func:`mrilib.grid.chapter_results` picks
    without training (the preset's own: ``results/`` for thesis, ``cache/<preset>/``
    otherwise); figures go to ``figures`` (default :func:`figures_dir`) and the summary to
    ``out`` (default :func:`results_dir`), both the preset's. A ``results`` folder other
    than the preset's own (e.g. ``results/imagenet``) keeps its report to itself:
    ``summary.md`` in it and figures in its ``figures/``. Figures whose cells are not run
    yet are listed in the summary with the reason, and a chapter-7 figure file this report
    does not draw is removed, so no stale figure stands beside the summary. Runs of a
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
    """The runs a report reads, the line that says where from, and where it writes: a
    folder other than the preset's own keeps its report beside its runs, except the
    committed ``results/``, which only the thesis preset writes."""
    from ..grid import chapter_results, committed_results_dir, folder_line, load_results
    from ..paths import results_dir

    if results is None:
        chapter = chapter_results(train=False)
        directory, runs, epochs = chapter.directory, chapter.runs, chapter.epochs
        origin = chapter.description
    else:
        directory = Path(results)
        runs, epochs = load_results(directory)  # one design per model; warns what it set aside
        origin = folder_line(runs, directory)
    if directory.resolve() not in (results_dir().resolve(), committed_results_dir().resolve()):
        out = directory if out is None else out
        figures = directory / "figures" if figures is None else figures
    return _Source(directory, runs, epochs, origin, out, figures)


CHAPTER7_FIGURES = ("fig7_", "thesis_comparison", "leakage", "fraction_sweep",
                    "synthetic_effect")  # the names figure_makers gives, for stale files


def _drawn_figures(makers: dict, directory=None) -> dict:
    """Name -> the path of each figure drawn, or ``"not drawn: why"``; a chapter-7 figure
    file of an earlier report that this one does not draw is removed."""
    import matplotlib.pyplot as plt

    from ..paths import figures_dir
    from ..plots import save_figure

    folder = Path(directory or figures_dir())
    drawn = {}
    for name, make in makers.items():
        try:
            fig = make()
        except plots.MissingCells as err:  # the cells it needs are not in the table yet
            drawn[name] = f"not drawn: {err}"
            continue
        drawn[name] = save_figure(fig, name, directory=directory)
        plt.close(fig)
    for stale in folder.glob("*.png"):
        if stale.name.startswith(CHAPTER7_FIGURES) and not isinstance(drawn.get(stale.stem), Path):
            stale.unlink()
    return drawn


def figure_makers(runs, epochs, metric: str = PRIMARY, n_boot: int | None = None,
                  seed: int | None = None, note: str | None = None) -> dict:
    """File name under figures/ -> a call that draws it, for every chapter-7 figure.

    Per split (``<name>_<split>``): Figures 7.1 and 7.2 for the basic CNN (the thesis's),
    the sweep and the synthetic effect once per augmentation policy; ``note`` goes under
    each (:func:`mrilib.grid.preset_note`).
    """
    makers = {}
    for split in splits_of(runs):
        at = runs[runs["split"] == split]
        curves = epochs[epochs["split"] == split] if "split" in epochs else epochs
        makers.update({f"{name}_{split}": make
                       for name, make in _split_makers(at, curves, metric, n_boot, seed,
                                                       note).items()})
    return makers


def _split_makers(runs, epochs, metric, n_boot, seed, note) -> dict:
    boot = {"n_boot": n_boot, "seed": seed, "note": note}
    makers = {
        "fig7_1_loss_curves": partial(plots.loss_curves_figure, epochs, note=note),
        "fig7_2_augmentation": partial(plots.augmentation_figure, runs, metric=metric, note=note),
        "thesis_comparison": partial(plots.thesis_comparison_figure, runs, **boot),
        "leakage": partial(plots.leakage_figure, runs, metric, **boot),
    }
    for aug in [a for a in plots.AUG_LABELS if (runs["aug"] == a).any()]:
        suffix = "" if aug == "none" else f"_{aug}"
        makers[f"fraction_sweep{suffix}"] = partial(plots.fraction_sweep_figure, runs, aug,
                                                    metric, **boot)
        makers[f"synthetic_effect{suffix}"] = partial(plots.synthetic_effect_figure, runs, aug,
                                                      metric, **boot)
    return makers


def splits_of(runs) -> list[str]:
    """The splits ``runs`` holds, in report order (subject first)."""
    held = set(runs["split"]) if "split" in runs else {"slice"}
    return [s for s in SPLIT_TITLES if s in held]


def by_split(frame):
    """``(split, rows of that split)`` for each split of ``frame`` (runs or epochs), in
    report order: every table and figure shows one split, one protocol."""
    for split in splits_of(frame):
        yield split, frame[frame["split"] == split] if "split" in frame else frame


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
    """What the test split holds of Moderate_Demented (one split's runs), and what that does
    to its recall."""
    notes = sorted({str(n) for n in runs.get("split_note", pd.Series(dtype=object)).dropna()})
    support = stats.split_support(runs, _confusion_column(runs))
    k = int(support.get("Moderate_Demented", 0))
    if not k:
        return " ".join(notes) or ("The test split holds no Moderate_Demented slice (the "
                                   "dataset has 64 in all): its recall cannot be measured here.")
    # Clopper-Pearson for k of k: the lower bound solves p^k = 0.025.
    return (" ".join(n + "." for n in notes) + (" " if notes else "")
            + f"Moderate_Demented has {k} of the {int(support.sum())} test images (the full "
            f"dataset has 64 in all): its recall moves in steps of 1/{k}, and its intervals "
            f"below cover the variation between runs only, not these {k} slices' own "
            f"uncertainty: even {k} of {k} correct leaves an exact binomial 95% interval of "
            f"[{0.025 ** (1 / k):.2f}, 1].")


def _confusion_column(runs) -> str:
    """The test confusion of the selected epoch; the last epoch's for older rows."""
    column = "best_test_confusion"
    return column if column in runs and runs[column].notna().all() else "final_test_confusion"


def summary_markdown(runs, directory: Path, out: Path, figures: dict,
                     metric: str = PRIMARY, n_boot: int | None = None,
                     seed: int | None = None, origin: str | None = None) -> str:
    """The report: provenance, caveats, then per split the synthetic effect, the thesis's
    table and numbers, the leakage ablation, the classification metrics and the figures.

    ``origin`` is :attr:`mrilib.grid.ChapterResults.description`, shown first.
    """
    from ..paths import ROOT

    source = directory / "runs.jsonl"
    if source.resolve().is_relative_to(ROOT.resolve()):
        source = source.resolve().relative_to(ROOT.resolve())
    parts = [f"# Chapter 7 results\n\nGenerated by `python -m mrilib report` from "
             f"{len(runs)} runs in {runs['cell_key'].nunique()} cells "
             f"(`{source}`{' and its shards' if shard_folders(directory) else ''}). "
             f"Measure: median "
             f"{plots.METRIC_LABELS.get(metric, metric)} over repeats, with percentile-"
             f"bootstrap 95% intervals (hierarchical over shared real samples/generators); "
             f"beside the thesis's numbers, the thesis's own measure."
             + (f"\n\n**{origin}**" if origin else ""),
             headline(runs, metric, n_boot, seed), _provenance(runs), _caveats(runs)]
    for split in splits_of(runs):
        at = runs[runs["split"] == split]
        shown = {k[:-len(split) - 1]: v for k, v in figures.items() if k.endswith(f"_{split}")}
        parts += [f"## {SPLIT_TITLES[split]}", _split_caveats(at, split),
                  _effects_section(at, metric, n_boot, seed),
                  _tables_section(at, metric, n_boot, seed),
                  _thesis_section(at, n_boot, seed),
                  _leakage_section(at, metric, n_boot, seed),
                  _classification_section(at, n_boot, seed),
                  _figures_section(out, {f"{k}_{split}": v for k, v in shown.items()}),
                  _cells_section(at, n_boot, seed)]
    return "\n\n".join(p for p in parts if p) + "\n"


HEADLINE = {"model": "basic_cnn", "aug": "none", "synthetic": "fill", "real %": 30}


def headline(runs, metric: str = PRIMARY, n_boot: int | None = None,
             seed: int | None = None) -> str:
    """The answer in one line: the basic CNN at 30% real, with 70% synthetic against without,
    on the subject split where it has runs (else the slice split, said to be optimistic)."""
    for split in ("subject", "slice"):
        at = runs[runs["split"] == split]
        try:
            effects = effects_table(at, metric, n_boot, seed) if len(at) else None
        except plots.MissingCells:
            effects = None
        if effects is None:
            continue
        label = plots.model_label(at, HEADLINE["model"])
        row = effects[(effects["architecture"] == label) & (effects["aug"] == HEADLINE["aug"])
                      & (effects["synthetic"] == HEADLINE["synthetic"])
                      & (effects["real %"] == HEADLINE["real %"])]
        if len(row):
            r = row.iloc[0]
            return (f"**Headline ({SPLIT_TITLES[split].split(':')[0].lower()}, {label}, "
                    f"30% real + 70% synthetic against 30% real only):** "
                    f"{plots.METRIC_LABELS.get(metric, metric)} {r['real only']:.3f} without, "
                    f"{r['with synthetic']:.3f} with; difference {r['synthetic - real only']} "
                    f"over {r['clusters']} independent samples: {r['verdict']}.")
    return ("**Headline:** not yet: the basic CNN's 30% real cell with 70% synthetic images and "
            "its real-only twin are not both in these results.")


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
    lines += [
        "- **Two splits, two protocols.** The 6,400 slices are 200 brains of 32 slices "
        "(recovered from the images, chapter 1). The *slice* split is the thesis's: slices "
        "of one brain sit in training and test, so its numbers are optimistic. The *subject* "
        "split keeps every brain on one side. Each has its own section; no table mixes them.",
        _measure_line(runs),
        "- **Smaller pool than the thesis.** After a 20% test and a 10% validation split the "
        "training pool is 4,608 slices (slice split; 4,576 on the subject split), where the "
        "thesis trained on 5,120: a '100% real' cell here has about 10% fewer images.",
        "- Synthetic images come from a class-conditional DDPM trained here on the 30% real "
        "sample that lies inside each repeat's own sample at every fraction (SDEdit "
        "variations), one draw of variations per generator shared by the repeats that use "
        "it, not from Dall-E 2 as in the thesis; epochs, learning rates and batch sizes, "
        "which the thesis does not state, are mrilib.train's documented choices. Either can "
        "move the numbers.",
        "- Intervals cover the variation between training runs (real samples, generators, "
        "initial weights) on one fixed split, not the finite test and validation sets; with "
        "5 independent real samples per cell they cover somewhat less than 95% (about "
        "90-93% in simulation). A 100% real-only cell is **one** sample, the whole pool, "
        "trained with 20 seeds (its `samples` column says 1): its interval covers seed "
        "variation only.",
        "- Many comparisons are made below at 95% each: a few intervals excluding 0 are "
        "expected by chance alone; a consistent pattern across fractions or architectures "
        "is stronger evidence than any single cell."]
    return "\n".join(lines)


def _measure_line(runs) -> str:
    """How the runs chose the epoch they are scored at: early stopping, or a fixed budget."""
    settings = [t for t in runs.get("train_settings", []) if isinstance(t, dict)]
    patience = "/".join(str(p) for p in sorted({t["patience"] for t in settings
                                                 if t.get("patience") is not None}))
    epochs = "/".join(str(e) for e in sorted({t["epochs"] for t in settings if "epochs" in t}))
    how = (f"trains up to {epochs} epochs and stops {patience} epochs after its lowest "
           f"validation loss{_capped(runs)}" if patience else
           f"trained a fixed {epochs or '?'} epochs, with no early stopping (an earlier "
           f"protocol)")
    return ("- **The measure.** Each run " + how + "; its weights at the epoch with the "
            "lowest validation loss are scored on the test split. The primary measure is that "
            "test cross-entropy, with accuracy, balanced accuracy and macro-F1 at the same "
            "epoch. The thesis's measure (last-epoch validation cross-entropy) appears beside "
            "the thesis's numbers only; the validation loss at the selected epoch is no "
            "result, since it chose the epoch.")


def _capped(runs) -> str:
    """How many runs reached their maximum epochs still improving (said only if any): at
    the maximum with their best epoch fewer than ``patience`` epochs before it."""
    if "stopped_epoch" not in runs:
        return ""
    best = runs["best_epoch"] if "best_epoch" in runs else [None] * len(runs)
    n = sum(1 for stop, b, t in zip(runs["stopped_epoch"], best, runs["train_settings"])
            if isinstance(t, dict) and t.get("patience") and stop == t.get("epochs")
            and (pd.isna(b) or stop - b < t["patience"]))  # no best epoch: older rows
    return (f" ({n} of {len(runs)} runs reached the maximum before stopping: their selected "
            f"epoch may be early)") if n else ""


def _split_caveats(runs, split: str) -> str:
    if split == "slice":
        first = ("- Slices of one brain sit on both sides of this split: losses and "
                 "accuracies are optimistic. Comparisons between policies at one real "
                 "fraction share the split; comparisons **across fractions are not fair** "
                 "here, since the share of held-out slices with a near-copy in training "
                 "grows with the real fraction.")
    else:
        first = ("- Every brain is on one side of this split: test scores are of brains "
                 "no run has seen, and the test split holds few of them, so its numbers "
                 "move more between splits than the intervals say.")
    return "\n".join([first, *_baseline_line(runs), "- " + moderate_note(runs)])


def _baseline_line(runs) -> list[str]:
    """The no-learning baseline on this split: predicting the training set's class shares."""
    if "class_share_test_loss" not in runs or runs["class_share_test_loss"].isna().all():
        return []
    shares = runs["class_share_test_loss"].dropna()
    return [f"- **Learning nothing scores {shares.median():.3f}** (median, {shares.min():.3f}-"
            f"{shares.max():.3f}): the test cross-entropy of answering every image with its "
            f"run's training class shares, without looking at it. A cell has learned "
            f"something only where its test cross-entropy is below this."]


def _thesis_section(runs, n_boot, seed) -> str:
    metric = thesis_metric()
    lines = ["### Beside the thesis (basic CNN, no augmentation)",
             f"Median {plots.METRIC_LABELS[metric]} beside the thesis's numbers. A side-by-"
             f"side, not a test of agreement: our intervals cover run-to-run variation "
             f"under our protocol, so a number from another protocol falls outside them "
             f"whether or not the claims agree; the thesis's claims are the differences "
             f"below.",
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
        return ("### Did synthetic images help?\n\nNo synthetic cell with a leak-free generator "
                "has its real-only twin in the results yet.")
    return "\n\n".join(["### Did synthetic images help?",
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

    lines = ["### The thesis's results table, per architecture",
             "Median [95% interval] n=repeats; '-' where a cell has not been run; "
             "', k samples' where its repeats rest on fewer real samples than an interval "
             "needs (a partly run cell)."]
    for model in dict.fromkeys(runs["model"]):
        lines.append(markdown_table(results_table(runs, model, metric, n_boot, seed)))
    missing = [SPECS[m].label for m in MODELS if not (runs["model"] == m).any()]
    if missing:
        lines.append(f"No runs yet of {' and '.join(missing)}.")
    if (runs["synthetic"] == "100+20mod").any():
        lines.append(shortcut_line(split_of(runs)))
    return "\n\n".join(lines)


def shortcut_line(split: str, directory=None) -> str:
    """What the shortcut check (``synth shortcut``) says about the ModerateDemented-only row,
    where every synthetic image is of that class: can "synthetic" stand for "Moderate"?"""
    import json

    from ..paths import ROOT

    folder = Path(directory) if directory is not None else ROOT / "results"
    checks = [json.loads(p.read_text()) for p in sorted(folder.glob("shortcut_*.json"))]
    checks = [c for c in checks if c.get("split", "slice") == split]
    if not checks:
        return (f"**ModerateDemented-only row:** the shortcut check has not been run on this "
                f"split's generators (`python -m mrilib synth shortcut --split {split} "
                f"--real-frac 0.3 --out results/shortcut_{split}_x0.3_g0.json`): if a "
                f"classifier can tell variations from real slices, 'looks synthetic' stands "
                f"for 'Moderate' in this row, which may measure that shortcut rather than "
                f"better Moderate features.")
    check = checks[-1]
    if check.get("verdict") == "near chance":
        return (f"**ModerateDemented-only row:** on sources it never saw, a basic CNN tells "
                f"generator {check.get('generator_index', 0)}'s variations from real slices "
                f"{check['accuracy']:.0%} of the time (chance 50%): no shortcut found.")
    moderate = check.get("per_class", {}).get("Moderate_Demented", {})
    how = "partly" if check.get("verdict") == "above chance" else "plainly"
    return (f"**ModerateDemented-only row:** on sources it never saw, a basic CNN tells "
            f"generator {check.get('generator_index', 0)}'s variations from real slices "
            f"{check['accuracy']:.0%} of the time (chance 50%; ModerateDemented alone "
            f"{moderate.get('accuracy', float('nan')):.0%}, {moderate.get('n_sources', '?')} "
            f"sources). Every synthetic image in this row is ModerateDemented, so 'looks "
            f"synthetic' can {how} stand for 'Moderate': the row may measure that shortcut "
            f"rather than better Moderate features.")


def _leakage_section(runs, metric, n_boot, seed) -> str:
    try:
        table = leakage_table(runs, metric, n_boot, seed)
    except plots.MissingCells:
        return ""
    return "\n\n".join(["### Leakage ablation",
                        "A generator trained on the whole training pool (leaky) against one "
                        "trained only on the repeat's own sample (leak-free). A leaky gain that "
                        "the leak-free generator does not reproduce is information from real "
                        "images the classifier was not given.",
                        markdown_table(table, index=False)])


def _classification_section(runs, n_boot, seed) -> str:
    return "\n\n".join(["### Accuracy, balanced accuracy, macro-F1 and recall per class "
                        "(test split, epoch selected on validation)",
                        markdown_table(classification_table(runs, stage=_stage(runs),
                                                            n_boot=n_boot, seed=seed),
                                       index=False)])


def _stage(runs) -> str:
    """``best`` (the epoch selected on validation); ``final`` for rows without it."""
    return "best" if _confusion_column(runs).startswith("best") else "final"


def _figures_section(directory: Path, figures: dict) -> str:
    lines = ["### Figures"]
    for name, where in figures.items():
        if isinstance(where, Path):
            lines.append(f"![{name}]({os.path.relpath(where, directory)})")
        else:
            lines.append(f"- {name}: {where}")
    return "\n\n".join(lines)


def _cells_section(runs, n_boot, seed) -> str:
    return "\n\n".join(["### Every cell", "Medians [95% interval] over repeats; accuracy, "
                        "balanced accuracy, macro-F1 and recall from the test confusion "
                        "matrices at the selected epoch. `samples`: distinct real samples; "
                        "`clusters`: the units the bootstrap resamples (repeats that share "
                        "a real sample count once); an interval over few of them is "
                        "optimistic. `diverged`: runs whose final validation loss is "
                        "missing or infinite (counted as +inf in the medians).",
                        markdown_table(cells_table(runs, n_boot, seed), index=False)])
