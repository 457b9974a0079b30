"""make reproduce: everything committed results allow, training only on a GPU or when asked."""
from __future__ import annotations

import pytest

import mrilib.paths as paths
from mrilib import cli, reproduce


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository root with no committed runs, and a cache of our own."""
    monkeypatch.setattr(paths, "ROOT", tmp_path / "repo")
    monkeypatch.setattr(paths, "CACHE", tmp_path / "cache")
    (tmp_path / "repo" / "results").mkdir(parents=True)
    monkeypatch.setattr(reproduce, "_has_chapter_generator", lambda: False)
    return tmp_path


def test_without_a_gpu_the_thesis_preset_trains_nothing_and_says_what_waits(repo, monkeypatch,
                                                                            capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ran = []
    monkeypatch.setattr(reproduce, "_carry_out", lambda name, *a: ran.append(name) or 0)
    assert reproduce.run("thesis") == 0
    assert ran == ["01_data_exploration"]  # the only step that needs no GPU and no runs
    out = capsys.readouterr().out
    assert "== grid: left out (results/ lack runs of the grid:" in out
    assert "hours of training on an NVIDIA H100 80GB HBM3" in out
    assert "needs generator 0 of the 30% sample" in out
    assert "left out: grid, 02_synthetic_images" in out


@pytest.mark.parametrize("preset, train, expected", [
    ("thesis", True, {"grid", "02_synthetic_images", "03_gradcam_real_vs_synthetic",
                      "04_model_training", "05_results", "report"}),  # asked by name
    ("quick", None, {"02_synthetic_images", "03_gradcam_real_vs_synthetic",
                     "04_model_training", "05_results", "report"}),  # CPU minutes: notebooks
                                                                  # train the quick grid
])
def test_training_runs_on_a_gpu_or_when_asked(repo, monkeypatch, preset, train, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    steps = {s.name: s.run for s in reproduce.plan(preset, train)}
    assert steps["01_data_exploration"]
    assert {name for name, run in steps.items() if run} - {"01_data_exploration"} == expected


def test_the_cli_dry_run_runs_nothing(repo, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "_carry_out", lambda *a: pytest.fail("ran a step"))
    assert cli.main(["reproduce", "--preset", "thesis", "--dry-run"]) == 0
    assert "05_results: left out (no chapter-7 runs" in capsys.readouterr().out
