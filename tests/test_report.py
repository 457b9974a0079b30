"""Chapter 7 from whatever runs exist: committed results first, the quick grid on demand,
and every figure and table drawn or skipped with a note on a partial grid, never a crash."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import mrilib.paths as paths
from mrilib import grid as ex
from mrilib.grid import chapter as grid_chapter
from mrilib import report, stats
from mrilib.data import CLASSES
from mrilib.plots import results as plots
from mrilib.report import figure_makers, write_report

QUICK_CELLS = [c.key for c in ex.grid_cells("quick")]
CONFUSION = [[3, 0, 1, 0], [0, 1, 0, 0], [1, 0, 5, 0], [0, 0, 1, 4]]  # 1 Moderate test slice


# ----------------------------------------------------------------------------- fake results

def write_runs(directory: Path, cell_keys, repeats: int = 2, preset: str = "quick",
               epochs: int = 1, design: str = "fake") -> Path:
    """runs.jsonl and epochs.jsonl as the runner writes them, with made-up losses.

    ``design="current"``: the design the current code gives ``preset``'s runs
    (:func:`mrilib.grid.cell_design`: synthetic cells also carry the generator's).
    """
    directory.mkdir(parents=True, exist_ok=True)
    runs, curves = [], []
    for key in cell_keys:
        split, model, aug, synthetic, fraction, leakage = key.split("/")
        cell = {"split": split, "model": model, "aug": aug, "synthetic": synthetic,
                "real_fraction": float(fraction), "leakage": leakage}
        with paths.preset_env(preset):
            hashed = (ex.cell_design(ex.grid_settings(preset), preset, ex.make_cell(**cell))
                      if design == "current" else design)
        training, _, generator_design = hashed.partition("+")
        for r in range(repeats):
            loss = 0.3 - 0.05 * (synthetic != "none") + 0.01 * r
            run_key = f"{key}/r{r:02d}@{hashed}"
            runs.append({"run_key": run_key, "cell_key": key, "design": training,
                         "generator_design": generator_design or None, **cell,
                         "repeat": r, "sample_index": r % 2, "sample_seed": r % 2,
                         "init": "scratch", "final_val_loss": loss, "best_val_loss": loss,
                         "final_test_loss": loss, "best_test_loss": loss,
                         "final_test_confusion": CONFUSION, "best_test_confusion": CONFUSION,
                         "classes": list(CLASSES),
                         "preset": preset, "n_images": 640, "seconds": 1.0,
                         "train_settings": {"epochs": epochs}, "device_name": "fake cpu",
                         "git_commit": "0123456789abcdef"})
            curves += [{"run_key": run_key, **cell, "repeat": r, "init": "scratch",
                        "epoch": e + 1, "train_loss": loss + 0.1 / (e + 1),
                        "val_loss": loss + 0.01 * e} for e in range(epochs)]
    for name, rows in (("runs.jsonl", runs), ("epochs.jsonl", curves)):
        (directory / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository root and cache of our own: committed results/ starts empty."""
    monkeypatch.setattr(paths, "ROOT", tmp_path / "repo")
    monkeypatch.setattr(paths, "CACHE", tmp_path / "cache")
    (tmp_path / "repo" / "results").mkdir(parents=True)
    return tmp_path


def no_training(*args, **kwargs):
    raise AssertionError("chapter_results must not train when results exist")


# ----------------------------------------------------------------------------- chapter_results

def test_each_preset_reads_its_own_results_unless_told(repo, monkeypatch):
    write_runs(repo / "repo" / "results", QUICK_CELLS[:3], repeats=20, preset="thesis")
    write_runs(repo / "cache" / "quick" / "results", QUICK_CELLS[:2])
    monkeypatch.setattr(grid_chapter, "run_grid", no_training)
    chapter = ex.chapter_results("thesis")
    assert chapter.committed and chapter.directory == repo / "repo" / "results"
    assert len(chapter.runs) == 60 and len(chapter.epochs) == 60
    assert chapter.description.startswith("Committed full run (results/, partial: 3 of")
    assert chapter.note is None  # the thesis protocol's numbers need no warning
    quick = ex.chapter_results("quick", train=False)  # its own grid, not the committed run
    assert not quick.committed and len(quick.runs) == 4
    assert quick.directory == repo / "cache" / "quick" / "results"
    # told otherwise: the committed run under the quick preset, nothing trained
    monkeypatch.setenv("MRILIB_RESULTS", str(repo / "repo" / "results"))
    told = ex.chapter_results("quick")
    assert told.committed and len(told.runs) == 60
    assert "read under the quick preset" in told.description


def test_quick_preset_trains_the_quick_grid_once_then_reuses_it(repo, monkeypatch):
    calls = []

    def fake_grid(preset, **kwargs):
        calls.append((preset, kwargs))
        folder = paths.CACHE / preset / "results"
        if not (folder / "runs.jsonl").exists():  # what resume=True does: only what is missing
            write_runs(folder, QUICK_CELLS)

    monkeypatch.setattr(grid_chapter, "run_grid", fake_grid)
    first = ex.chapter_results("quick", progress=False)
    second = ex.chapter_results("quick", progress=False)
    assert [c[0] for c in calls] == ["quick", "quick"]
    assert all(c[1]["train_generators"] and c[1]["resume"] for c in calls)
    assert first.directory == second.directory == repo / "cache" / "quick" / "results"
    assert not first.committed and len(second.runs) == 2 * len(QUICK_CELLS)
    assert "Quick CPU grid" in first.description
    assert "8 of 8 cells complete" in first.description
    assert "numbers test the code only" in first.description
    assert "models of 1 epoch(s) on 640 of the 6,400 slices" in first.note


def test_the_thesis_preset_without_committed_results_says_what_to_run(repo, monkeypatch):
    monkeypatch.setattr(grid_chapter, "run_grid", no_training)
    with pytest.raises(FileNotFoundError) as err:
        ex.chapter_results("thesis")
    message = str(err.value)
    assert "results/ holds no runs of the current protocol yet" in message
    assert "python -m mrilib grid --preset thesis --train-generators --resume" in message
    assert "MRILIB_PRESET=quick" in message


def test_train_false_only_reads(repo, monkeypatch):
    monkeypatch.setattr(grid_chapter, "run_grid", no_training)
    with pytest.raises(FileNotFoundError, match="--preset quick"):
        ex.chapter_results("quick", train=False)
    write_runs(repo / "cache" / "quick" / "results", QUICK_CELLS[:2])
    assert len(ex.chapter_results("quick", train=False).runs) == 4


def test_needs_grid_follows_what_chapter_results_would_read(repo):
    committed = repo / "repo" / "results"
    assert ex.needs_grid("thesis") and ex.needs_grid("quick")
    every = [c.key for c in ex.grid_cells("thesis")]
    write_runs(committed, every[:5], repeats=20, preset="thesis", design="current")
    assert ex.needs_grid("thesis")      # a partial full run is resumed
    assert ex.needs_grid("quick")       # the quick preset reads its own, still missing
    write_runs(repo / "cache" / "quick" / "results", QUICK_CELLS, preset="quick",
               design="current")
    assert not ex.needs_grid("quick")
    # every cell, but under another training protocol: grid --resume would retrain them all
    write_runs(committed, every, repeats=20, preset="thesis", design="0ld0ld00")
    assert ex.needs_grid("thesis")
    write_runs(committed, every, repeats=20, preset="thesis", design="current")
    assert not ex.needs_grid("thesis")


# ----------------------------------------------------------------------------- partial grids

PARTIAL_GRIDS = {
    "quick grid": QUICK_CELLS,
    "headline cells only": QUICK_CELLS[:3],
    "one real-only cell": ["slice/basic_cnn/none/none/1/none"],
    "Moderate-only cells alone for an augmentation": QUICK_CELLS[:2] + [
        "slice/basic_cnn/hflip/100+20mod/1/sample"],
    "another architecture without the basic CNN": ["subject/resnet18/none/none/0.3/none",
                                                   "subject/resnet18/none/fill/0.3/sample"],
}


@pytest.mark.parametrize("cells", PARTIAL_GRIDS.values(), ids=PARTIAL_GRIDS.keys())
def test_every_figure_is_drawn_or_skipped_with_a_note(tmp_path, capsys, cells):
    runs, epochs = ex.load_results(write_runs(tmp_path / "results", cells))
    makers = figure_makers(runs, epochs, n_boot=50)
    for name, make in makers.items():
        fig = plots.if_available(make)
        if fig is not None:
            plt.close(fig)
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("not shown")]
    assert all("yet" in line for line in skipped)
    assert {name.rsplit("_", 1)[1] for name in makers} == set(runs["split"])
    for split, at in runs.groupby("split"):  # one split, one protocol, per table
        for table in (report.effects_table, report.leakage_table):
            plots.if_available(table, at, n_boot=50)
        for model in dict.fromkeys(at["model"]):
            assert report.results_table(at, model, n_boot=50).shape == (3, 3)
        assert len(report.classification_table(at, n_boot=50)) == at["cell_key"].nunique()
        assert len(report.thesis_comparison(at, n_boot=50)) == 3
    if runs["split"].nunique() > 1:
        with pytest.raises(ValueError, match="two protocols"):
            report.results_table(runs, "basic_cnn", n_boot=50)


@pytest.mark.parametrize("cells", PARTIAL_GRIDS.values(), ids=PARTIAL_GRIDS.keys())
def test_the_report_lists_what_it_could_not_draw(repo, cells):
    results = write_runs(repo / "results", cells)
    summary = write_report(results, n_boot=50).read_text()
    assert "Chapter 7 results" in summary
    for split in {key.split("/")[0] for key in cells}:
        assert {"slice": "## Slice split", "subject": "## Subject split"}[split] in summary
    assert "Moderate_Demented has 1 of the 16 test images" in summary
    drawn = {p.stem for p in (results / "figures").glob("*.png")}
    for name in figure_makers(*ex.load_results(results)):
        assert name in drawn or f"- {name}: not drawn:" in summary, name


def test_the_quick_grid_report_skips_the_missing_cells_by_name(repo):
    summary = write_report(write_runs(repo / "results", QUICK_CELLS), n_boot=50).read_text()
    assert "- synthetic_effect_hflip_slice: not drawn: synthetic_effect_figure: no synthetic " \
           "cell" in summary
    assert "Leakage ablation" in summary and "| recall Moderate Demented |" in summary


def test_a_presets_report_reads_and_writes_its_own_results(repo, monkeypatch):
    """After `grid --preset quick`, the quick report is of the quick runs, beside them."""
    monkeypatch.setenv("MRILIB_PRESET", "quick")
    monkeypatch.setattr(grid_chapter, "run_grid", no_training)
    write_runs(repo / "repo" / "results", QUICK_CELLS, repeats=3, preset="thesis")
    write_runs(repo / "cache" / "quick" / "results", QUICK_CELLS[:2])
    figures = repo / "cache" / "quick" / "figures"
    figures.mkdir(parents=True)
    (figures / "fig7_2_augmentation.png").write_bytes(b"a figure of an earlier protocol")
    (figures / "1_class_counts.png").write_bytes(b"chapter 1's")
    path = write_report(n_boot=50)
    assert path == repo / "cache" / "quick" / "results" / "summary.md"  # not over results/
    assert "Quick CPU grid" in path.read_text() and "Committed" not in path.read_text()
    assert not (figures / "fig7_2_augmentation.png").exists()  # stale: another name now
    assert (figures / "1_class_counts.png").exists()            # not chapter 7's
    # told otherwise: the committed run, reported in the quick preset's folders only
    monkeypatch.setenv("MRILIB_RESULTS", str(repo / "repo" / "results"))
    path = write_report(n_boot=50)
    assert path == repo / "cache" / "quick" / "results" / "summary.md"
    assert "**Committed full run (results/" in path.read_text()
    assert not (repo / "repo" / "results" / "summary.md").exists()
    assert not (repo / "repo" / "figures").exists()


def test_an_empty_results_file_is_refused_not_drawn(repo):
    (repo / "results").mkdir()
    (repo / "results" / "runs.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="holds no runs yet"):
        write_report(repo / "results")


# ----------------------------------------------------------------------------- figures

def test_one_epoch_curves_show_their_epoch_and_band(tmp_path):
    runs, epochs = ex.load_results(write_runs(tmp_path / "results", QUICK_CELLS, epochs=1))
    fig = plots.loss_curves_figure(epochs[epochs["split"] == "slice"], note="quick preset: test")
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [1]
    assert all(line.get_marker() == "o" for line in ax.get_lines())
    assert any("quick preset: test" in t.get_text() for t in fig.texts)
    plt.close(fig)


def test_the_red_note_starts_below_the_wrapped_split_note():
    fig, _ = plt.subplots(figsize=(5, 3))
    plots._note(fig, "A long extra sentence. " * 3, note="quick preset")
    grey, red = fig.texts
    assert grey.get_text().count("\n") >= 1  # wrapped for a narrow figure
    assert red.get_position()[1] < grey.get_position()[1] - 0.05
    plt.close(fig)


# ----------------------------------------------------------------------------- tables

def test_classification_table_has_every_class_with_intervals(tmp_path):
    runs, _ = ex.load_results(write_runs(tmp_path / "results", QUICK_CELLS[:2]))
    table = report.classification_table(runs, n_boot=50)
    assert "balanced accuracy" in table.columns
    assert {f"recall {c.replace('_', ' ')}" for c in CLASSES} <= set(table.columns)
    assert table.loc[0, "accuracy"] == "0.812 [0.812, 0.812]"  # 13 of 16 on the diagonal
    assert (table["n"] == 2).all()
    assert np.isclose(stats.split_support(runs)["Moderate_Demented"], 1)


# ----------------------------------------------------------------------------- one design per read

def redesign(directory: Path, design: str, shift: float) -> list[str]:
    """The rows of ``directory`` as if run under ``design`` with losses moved by ``shift``."""
    out = []
    for name in ("runs.jsonl", "epochs.jsonl"):
        for line in (directory / name).read_text().splitlines():
            row = json.loads(line)
            row["run_key"] = row["run_key"].replace("@fake", f"@{design}")
            if name == "runs.jsonl":
                row["design"] = design
                row["final_val_loss"] += shift
            out.append((name, json.dumps(row)))
    return out


def two_designs(directory: Path, first: str, second: str) -> Path:
    """A results folder whose cells were run under ``first``, then again under ``second``."""
    write_runs(directory, QUICK_CELLS)
    rows = redesign(directory, first, 0.0) + redesign(directory, second, 1.0)
    for name in ("runs.jsonl", "epochs.jsonl"):
        (directory / name).write_text("".join(r + "\n" for n, r in rows if n == name))
    return directory


def test_the_report_reads_one_design_of_a_folder_that_holds_two(repo):
    results = two_designs(repo / "results", "0ld0ld00", "5eed5eed")
    n = 2 * len(QUICK_CELLS)
    with pytest.warns(ex.MixedDesignsWarning, match=f"{n} of {2 * n} runs set aside"):
        summary = write_report(results, n_boot=50).read_text()
    assert "design hash(es): 5eed5eed;" in summary and "0ld0ld00;" not in summary
    assert f"{n} runs of another design (0ld0ld00) set aside" in summary
    assert f"from {n} runs in {len(QUICK_CELLS)} cells" in summary


def test_the_current_design_wins_over_a_newer_one(repo):
    with paths.preset_env("quick"):
        current = ex.design_hash(ex.grid_settings("quick"), "quick", "basic_cnn")
    results = two_designs(repo / "results", current, "0ther000")  # the other one is newer
    with pytest.warns(ex.MixedDesignsWarning, match="the current code's"):
        runs, epochs = ex.load_results(results)
    assert set(runs["design"]) == {current} and len(runs) == 2 * len(QUICK_CELLS)
    assert runs["final_val_loss"].max() < 1  # not the shifted rows
    assert set(epochs["run_key"]) == set(runs["run_key"])


def test_chapter_results_says_what_it_set_aside(repo, monkeypatch):
    monkeypatch.setattr(grid_chapter, "run_grid", no_training)
    two_designs(repo / "repo" / "results", "0ld0ld00", "5eed5eed")
    with pytest.warns(ex.MixedDesignsWarning):
        chapter = ex.chapter_results("thesis")
    n = 2 * len(QUICK_CELLS)
    assert set(chapter.runs["design"]) == {"5eed5eed"} and len(chapter.runs) == n
    assert len(chapter.epochs) == n
    assert chapter.description.startswith("Committed full run (results/")
    assert f"{n} runs of another design (0ld0ld00) set aside" in chapter.description


def test_report_cli_writes_figures_and_summary_where_told(repo, monkeypatch):
    """What grid --imagenet's results need: a report that leaves figures/ alone."""
    from mrilib import cli

    monkeypatch.setenv("MRILIB_PRESET", "thesis")
    results = write_runs(repo / "repo" / "results" / "imagenet", QUICK_CELLS, preset="thesis")
    assert cli.main(["report", "--results", str(results), "--n-boot", "50"]) == 0
    assert (results / "figures" / "fig7_2_augmentation_slice.png").is_file()
    assert not (repo / "repo" / "figures").exists()  # the committed figures stay as they are
    summary = (results / "summary.md").read_text()
    assert "](figures/fig7_2_augmentation_slice.png)" in summary
    assert f"Runs read from results/imagenet/: {2 * len(QUICK_CELLS)} runs" in summary
    # told where: there
    figures = repo / "elsewhere"
    assert cli.main(["report", "--results", str(results), "--figures", str(figures),
                     "--n-boot", "50"]) == 0
    assert (figures / "fig7_2_augmentation_slice.png").is_file()


def test_a_figure_no_longer_drawn_is_removed(repo):
    """A partial grid's summary never stands beside a stale figure of other runs."""
    results = write_runs(repo / "results", QUICK_CELLS)
    stale = results / "figures" / "synthetic_effect_hflip_slice.png"
    stale.parent.mkdir()
    stale.write_bytes(b"an old figure")
    summary = write_report(results, n_boot=50).read_text()
    assert "- synthetic_effect_hflip_slice: not drawn" in summary and not stale.exists()


SWEEP_CELLS = ["slice/basic_cnn/none/none/0.3/none", "slice/basic_cnn/none/none/0.5/none",
               "slice/basic_cnn/none/none/1/none", "slice/basic_cnn/none/fill/0.3/sample",
               "slice/basic_cnn/none/fill/0.8/sample"]


def test_a_cell_on_few_samples_gets_no_verdict(repo):
    runs, _ = ex.load_results(write_runs(repo / "results", SWEEP_CELLS, repeats=6))
    table = report.thesis_comparison(runs, n_boot=50)
    # write_runs draws two real samples; at 100% real one sample, every repeat its own unit
    assert table["samples"].tolist() == [2, 1, 2]
    assert table["units"].tolist() == [2, 6, 2]
    assert "thesis inside our interval" not in table  # a side-by-side, not a test
    # the thesis's measure, whatever metric is asked for
    runs["final_test_loss"] += 1.0
    assert report.thesis_comparison(runs, "final_test_loss", n_boot=50).equals(table)
    cells = report.results_table(runs, n_boot=50)["No augmentation"]
    assert cells.iloc[0].endswith("n=6") and cells.iloc[1].endswith("n=6, 2 samples")
    differences = report.thesis_differences(runs, n_boot=50)
    assert differences["comparison"].tolist() == [label for label, _, _ in report.THESIS_PAIRS]
    assert not differences["distinguishable from noise"].any()  # two samples are too few


def test_gaps_break_the_sweep(repo):
    runs, _ = ex.load_results(write_runs(repo / "results", SWEEP_CELLS, repeats=6))
    line = runs[(runs["synthetic"] == "none")][["real_fraction"]].drop_duplicates()
    gaps = plots._with_gaps(line.sort_values("real_fraction"), "none")
    assert gaps["real_fraction"].round(1).tolist() == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    fill = plots._with_gaps(line[line["real_fraction"] < 0.6], "fill")
    assert fill["real_fraction"].round(1).tolist() == [0.3, 0.4, 0.5]


def test_the_moderate_only_row_says_what_the_shortcut_check_found(tmp_path):
    from mrilib.report.summary import shortcut_line

    assert "has not been run" in shortcut_line("subject", tmp_path)
    check = {"split": "subject", "generator_index": 0, "accuracy": 0.91, "verdict": "high",
             "per_class": {"Moderate_Demented": {"accuracy": 0.95, "n_sources": 14}}}
    (tmp_path / "shortcut_subject_x0.3_g0.json").write_text(json.dumps(check))
    line = shortcut_line("subject", tmp_path)
    assert "91% of the time" in line and "plainly stand for 'Moderate'" in line
    assert "has not been run" in shortcut_line("slice", tmp_path)  # another split's generator
    (tmp_path / "shortcut_subject_x0.3_g0.json").write_text(
        json.dumps({**check, "accuracy": 0.52, "verdict": "near chance"}))
    assert "no shortcut found" in shortcut_line("subject", tmp_path)


@pytest.mark.parametrize("splits", [("subject", "slice"), ("slice",), ()])
def test_the_headline_answers_on_the_subject_split_first(repo, splits):
    from mrilib.report.summary import headline

    keys = [f"{split}/basic_cnn/none/{synthetic}/0.3/{leakage}" for split in splits
            for synthetic, leakage in (("none", "none"), ("fill", "sample"))]
    keys += ["slice/basic_cnn/none/none/1/none"]  # always some runs
    runs, _ = ex.load_results(write_runs(repo / "results", keys, repeats=6))
    line = headline(runs, n_boot=50)
    if not splits:
        assert line.startswith("**Headline:** not yet")
        return
    assert f"({splits[0]} split, Basic CNN, 30% real" in line, line
    assert "without" in line and "difference -0.0500" in line
    assert "over 2 independent samples" in line


@pytest.mark.parametrize("settings,stops,bests,said", [
    ({"epochs": 10, "patience": None}, [10, 10], [4, 10], "trained a fixed 10 epochs, with no early"),
    ({"epochs": 30, "patience": 5}, [12, 17], [7, 12], "trains up to 30 epochs and stops 5 epochs after"),
    ({"epochs": 30, "patience": 5}, [12, 30], [7, 28], "(1 of 2 runs reached the maximum"),
    # best at 25, stopped by its patience at exactly 30: not cut short
    ({"epochs": 30, "patience": 5}, [12, 30], [7, 25], "stops 5 epochs after"),
    # a row without its best epoch (older rows) at the maximum: counted, as before
    ({"epochs": 30, "patience": 5}, [12, 30], [7, None], "(1 of 2 runs reached the maximum"),
])
def test_the_measure_says_how_each_run_chose_its_epoch(settings, stops, bests, said):
    from mrilib.report import summary

    runs = pd.DataFrame({"train_settings": [settings] * 2, "stopped_epoch": stops,
                         "best_epoch": bests})
    line = summary._measure_line(runs)
    capped = any(s == 30 and (b is None or s - b < 5) for s, b in zip(stops, bests))
    assert said in line and ("reached the maximum" in line) == capped


@pytest.mark.parametrize("split", ["slice", "subject"])
def test_the_caveats_give_the_no_learning_baseline_where_rows_carry_it(split, monkeypatch):
    from mrilib.report import summary

    monkeypatch.setattr(summary, "moderate_note", lambda runs: "moderate")
    runs = pd.DataFrame({"class_share_test_loss": [0.98, 1.0, 1.1], "split": split})
    said = summary._split_caveats(runs, split)
    assert "Learning nothing scores 1.000** (median, 0.980-1.100)" in said
    assert "Learning nothing" not in summary._split_caveats(
        runs.drop(columns="class_share_test_loss"), split)


def test_loss_curves_end_where_the_first_repeat_stopped(tmp_path):
    """Early-stopped repeats leaving the median would flatter the ones still improving."""
    runs, epochs = ex.load_results(write_runs(tmp_path / "results", QUICK_CELLS, epochs=3))
    epochs = epochs[epochs["split"] == "slice"]
    cell = (epochs["synthetic"] == "none") & (epochs["real_fraction"] == 1.0)
    first = epochs.loc[cell, "repeat"].min()
    epochs = epochs[~(cell & (epochs["repeat"] == first) & (epochs["epoch"] == 3))]
    fig = plots.loss_curves_figure(epochs)
    lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
    [cut] = [label for label in lines if label.startswith("100% real")]
    assert "to epoch 2, the last all trained" in cut and max(lines[cut].get_xdata()) == 2
    assert all(max(line.get_xdata()) == 3 for label, line in lines.items() if label != cut)
    plt.close(fig)
