"""Synthetic-image checks (memorization, class fidelity, background, shortcut), the
guidance weight's choice on validation, and chapter 2's figures."""
from __future__ import annotations

import json

import matplotlib
import pytest
import torch

from mrilib.paths import ROOT
from mrilib.plots.synthetic import (class_fidelity_figure, memorization_figure, shortcut_figure,
                                    strength_sweep_figure, variations_figure)
from mrilib.synthetic.quality import (_source_folds, background_levels, chosen_guidance,
                                      class_fidelity, memorization_distances, shortcut_check)

matplotlib.use("Agg")


def _images(n, seed):
    return torch.randint(0, 256, (n, 1, 128, 128), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def _levels(levels):
    return torch.tensor(levels, dtype=torch.uint8)[:, None, None, None].expand(-1, 1, 128, 128).clone()


def test_background_levels_flag_a_grey_background_per_class():
    # Four "scans": a bright square on black. Variations keep the brain; class 1's paint
    # the background 20 grey levels up, class 0's keep it black.
    sources = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)
    sources[:, :, 4:12, 4:12] = 150
    labels = torch.tensor([0, 0, 1, 1])
    variations = sources.clone()
    variations[2:][sources[2:] == 0] = 20
    variations[:, :, 6, 6] = 90  # a changed brain pixel is not background
    levels = background_levels(sources, variations, labels, ["a", "b", "c"])
    assert levels["a"] == {"source": 0.0, "variation": 0.0, "share_above_10": 0.0, "n": 2}
    assert levels["b"]["variation"] == pytest.approx(20.0) and levels["b"]["share_above_10"] == 1.0
    assert levels["c"]["n"] == 0
    two_each = background_levels(sources, torch.stack([variations, sources], 1), labels, "abc")
    assert two_each["b"]["variation"] == pytest.approx(10.0) and two_each["b"]["n"] == 4
    with pytest.raises(ValueError, match="do not line up"):
        background_levels(sources, variations[:3], labels, "abc")


def test_copies_are_flagged_and_new_images_are_not():
    real = _levels(range(0, 120, 6))
    copies = memorization_distances(real[:5].clone(), real)
    assert torch.all(copies["synthetic_to_real"] < 1e-3)
    assert torch.equal(copies["synthetic_nn_index"], torch.arange(5))
    assert copies["share_closer_than_real_min"] == 1.0
    fresh = memorization_distances(_levels([200, 220, 250]), real)
    assert fresh["share_closer_than_real_min"] == 0.0
    assert torch.allclose(fresh["synthetic_to_real"], torch.tensor([86.0, 106.0, 136.0]))
    assert torch.all(fresh["real_to_real"] == 6.0)  # an image is never its own neighbour


class _Constant(torch.nn.Module):
    """Predicts class ``c`` for bright images, class 0 for dark ones."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        bright = (x.mean(dim=(1, 2, 3)) > 0).float()
        logits = torch.zeros(len(x), 4)
        logits[:, self.c] = 10 * bright
        logits[:, 0] += 10 * (1 - bright)
        return logits + self.dummy


def test_class_fidelity_per_class():
    images = torch.cat([torch.full((4, 1, 8, 8), 255, dtype=torch.uint8),
                        torch.zeros((4, 1, 8, 8), dtype=torch.uint8)])
    labels = torch.tensor([2, 2, 2, 2, 0, 0, 2, 2])
    result = class_fidelity(_Constant(2), images, labels, ["a", "b", "c", "d"])
    assert result["a"] == 1.0 and result["c"] == pytest.approx(4 / 6)
    assert result["b"] != result["b"]  # NaN: no image of that class


def test_chapter2_figures_render():
    real = _images(12, 2)
    labels = torch.tensor([0, 1, 2, 3])
    var = {0.5: _images(8, 3).reshape(4, 2, 1, 128, 128), 1.0: _images(8, 4).reshape(4, 2, 1, 128, 128)}
    fig = variations_figure(real[:4], labels, var, ["A", "B", "C", "D"], note="tiny generator")
    assert len(fig.axes) == 4 * 5
    dist = memorization_distances(var[0.5], real)
    assert len(memorization_figure(dist, var[0.5], real).axes) == 1 + 2 * 4
    fid = class_fidelity_figure({"real validation": {"A": 0.9, "B": 0.5}, "synthetic": {"A": 0.7, "B": 0.2}})
    assert fid.axes[0].get_ylim()[1] > 1
    row = {"fidelity": {"A": 0.8, "B": 0.3}, "balanced_fidelity": 0.55, "rms_to_source": 20.0,
           "background_grey": 5.0}
    sweep = {"n_sources": 8, "chance": 0.5, "classifier_real_val": {"A": 0.9, "B": 0.6},
             "classifier_real_val_balanced": 0.75,
             "strengths": [{**row, "strength": 0.3}, {**row, "strength": 0.6}]}
    fig = strength_sweep_figure(sweep, note="tiny generator")
    assert len(fig.axes) == 2 and len(fig.axes[0].get_lines()) >= 3
    assert "validation" in fig.axes[0].get_title()
    old = {k: v for k, v in sweep.items() if "val" not in k} | {
        "classifier_real_test": {"A": 0.9, "B": 0.6}}  # sweeps made before the validation ceiling
    assert "test slices" in strength_sweep_figure(old).axes[0].get_title()
    guided = {**sweep, "strengths": [{**r, "guidance_scale": w} for w in (1.0, 3.0)
                                     for r in sweep["strengths"]]}
    fig = strength_sweep_figure(guided)
    assert len(fig.axes) == 3 and "guidance 3" in fig.axes[1].get_title()
    one_strength = {**sweep, "chosen_guidance": 2.0,
                    "strengths": [{**row, "strength": 0.6, "guidance_scale": w}
                                  for w in (1.0, 2.0, 4.0)]}
    fig = strength_sweep_figure(one_strength)  # guidance on the x axis instead
    assert len(fig.axes) == 2 and "guidance weight" in fig.axes[0].get_xlabel()
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == 3
    assert any("chosen on validation: 2" in t.get_text() for t in fig.axes[0].get_legend().texts)


# ----------------------------------------------------------------------------- guidance weight

def _sweep(balanced_by_weight, ceiling=0.6, strength=0.6):
    rows = [{"strength": s, "guidance_scale": w, "balanced_fidelity": b}
            for w, b in balanced_by_weight.items() for s in (0.3, strength)]
    return {"classifier_real_val_balanced": ceiling, "classifier_real_test_balanced": 0.0,
            "strengths": rows}


@pytest.mark.parametrize("measured, chosen", [
    ({1.0: 0.4, 2.0: 0.62, 4.0: 0.7}, 2.0),   # the smallest weight that reaches it
    ({4.0: 0.7, 1.0: 0.4, 2.0: 0.6}, 2.0),    # equal counts as reached; order of rows is no matter
    ({1.0: 0.65, 4.0: 0.9}, 1.0),             # no guidance when none is needed
    ({1.0: 0.3, 2.0: 0.5, 4.0: 0.59}, None),  # none reaches it: the rule chooses nothing
])
def test_the_guidance_weight_is_chosen_against_validation(measured, chosen):
    sweep = _sweep(measured)
    assert chosen_guidance(sweep) == chosen
    # the test split's number is there, and changes nothing
    assert chosen_guidance({**sweep, "classifier_real_test_balanced": 1.0}) == chosen


def test_a_sweep_without_a_validation_ceiling_chooses_nothing():
    sweep = _sweep({1.0: 0.4, 4.0: 0.7})
    del sweep["classifier_real_val_balanced"]
    with pytest.raises(ValueError, match="no validation ceiling"):
        chosen_guidance(sweep)
    # the committed sweep that set the default weight read the test split only
    committed = json.loads((ROOT / "results" / "strength_sweep_x0.3_g0_guidance.json").read_text())
    with pytest.raises(ValueError, match="test split"):
        chosen_guidance(committed)
    with pytest.raises(ValueError, match="no rows at strength 0.8"):
        chosen_guidance(_sweep({1.0: 0.4}), strength=0.8)
    assert chosen_guidance(_sweep({1.0: 0.4, 2.0: 0.7}, strength=0.8), strength=0.8) == 2.0


# ----------------------------------------------------------------------------- shortcut check

def _scans(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """uint8 [n, 1, size, size] "brains": a textured disc of random place and size on black."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x = torch.zeros(n, 1, size, size)
    for i in range(n):
        cy, cx = torch.randint(10, size - 10, (2,), generator=g)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (6 + 4 * torch.rand(1, generator=g)) ** 2
        x[i, 0][disc] = 80 + 120 * torch.rand(int(disc.sum()), generator=g)
    return x.to(torch.uint8)


def _grey_background(real):
    out = real.clone()
    out[out == 0] = 40  # the first generator's fault: a background no real slice has
    return out


@pytest.mark.parametrize("make, verdict", [
    (_grey_background, "high"),
    (lambda real: _scans(len(real), seed=1), "near chance"),  # fresh scans of the same kind
])
def test_shortcut_check_finds_an_artefact_and_not_a_fresh_draw(make, verdict):
    real, labels = _scans(96, seed=0), torch.arange(96) % 4
    check = shortcut_check(real, make(real), labels, "ABCD", seed=0, device="cpu",
                           train={"epochs": 5}, folds=4, max_sources=None)
    assert check["verdict"] == verdict
    assert check["n_sources"] == 96 and check["n_real"] == check["n_synthetic"] == 96
    assert check["chance"] == 0.5 and 0.55 < check["chance_upper"] < 0.6
    if verdict == "high":
        assert check["accuracy"] >= 0.9 and "predicts 'Moderate'" in check["reading"]
    else:
        assert abs(check["accuracy"] - 0.5) < 0.12 and "within chance" in check["reading"]
    assert set(check["per_class"]) == set("ABCD")
    assert all(row["n_sources"] == 24 for row in check["per_class"].values())
    assert check["seeds"] == [0, 1, 2, 3] and check["folds_by"] == "source"


def test_folds_keep_groups_whole_and_spread_each_class():
    labels = torch.tensor([0] * 12 + [1] * 4 + [2] * 8)
    groups = torch.arange(24) // 2  # pairs of neighbouring slices
    fold = _source_folds(labels, groups, 4, seed=0)
    for g in groups.unique():
        assert fold[groups == g].unique().numel() == 1  # a pair never straddles two folds
    for c, units in ((0, 6), (1, 2), (2, 4)):
        per_fold = torch.bincount(fold[labels == c], minlength=4) // 2
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == units
    assert torch.equal(fold, _source_folds(labels, groups, 4, seed=0))
    with pytest.raises(ValueError, match="3 sources \\(or groups\\) for 4 folds"):
        _source_folds(labels[:6], torch.tensor([0, 0, 1, 1, 2, 2]), 4, seed=0)


def test_shortcut_check_says_what_is_wrong_with_its_input():
    real, labels = _scans(8, seed=0), torch.arange(8) % 4
    with pytest.raises(ValueError, match="do not line up"):
        shortcut_check(real, real[:6], labels, "ABCD")
    with pytest.raises(ValueError, match="7 labels for 8"):
        shortcut_check(real, real, labels[:7], "ABCD")
    with pytest.raises(ValueError, match="folds=1"):
        shortcut_check(real, real, labels, "ABCD", folds=1)
    with pytest.raises(TypeError, match="unknown setting"):
        shortcut_check(real, real, labels, "ABCD", fold=3)


def test_shortcut_figure_renders():
    row = {"accuracy": 0.8, "real": 0.7, "synthetic": 0.9, "chance_upper": 0.6, "n_sources": 10,
           "verdict": "high"}
    check = {**row, "chance": 0.5, "high": 0.75, "folds": 5, "folds_by": "brain",
             "per_class": {"Mild_Demented": row, "Moderate_Demented": {**row, "accuracy": 0.55}}}
    fig = shortcut_figure(check, note="quick preset")
    assert len(fig.axes[0].patches) == 3 and "high" in fig.axes[0].get_title()


# ----------------------------------------------------------------------------- end to end

def test_cli_sweep_chooses_on_validation_and_shortcut_writes_its_json(image_folder, tmp_path,
                                                                       monkeypatch, capsys):
    # A tiny generator on a tiny folder: the commands run end to end; the numbers mean nothing.
    import mrilib.cli as cli
    import mrilib.paths as paths
    import mrilib.synthetic.cache as cache_mod
    import mrilib.synthetic.diffusion as diffusion

    for module in (diffusion, cache_mod, paths):
        monkeypatch.setattr(module, "CACHE", tmp_path / "cache")
    folder = str(image_folder(per_class={c: 6 for c in ("Mild_Demented", "Moderate_Demented",
                                                        "Non_Demented", "Very_Mild_Demented")}))

    def run(*argv):
        code = cli.main(["synth", *argv, "--source", folder])
        out = capsys.readouterr()
        return code, out.out, out.err

    assert run("train", "--split", "slice", "--real-frac", "0.5", "--seed", "0", "--json")[0] == 0
    sweep_file = tmp_path / "sweep.json"
    code, out, _ = run("sweep", "--split", "slice", "--real-frac", "0.5", "--strengths", "0.6",
                       "--guidance", "1,2",
                       "--out", str(sweep_file))
    assert code == 0 and "validation slices: the ceiling" in out and "information only" in out
    sweep = json.loads(sweep_file.read_text())
    assert {"classifier_real_val", "classifier_real_val_balanced", "guidance_note"} <= set(sweep)
    assert sweep["chosen_guidance"] == chosen_guidance(sweep)
    assert sweep["guidance_note"] in out and "validation" in sweep["guidance_note"]

    shortcut_file = tmp_path / "shortcut.json"
    code, out, _ = run("shortcut", "--split", "slice", "--real-frac", "0.5", "--folds", "2",
                       "--out",
                       str(shortcut_file))
    assert code == 0 and "Moderate_Demented" in out
    check = json.loads(shortcut_file.read_text())
    assert check["folds"] == 2 and check["generator_index"] == 0 and check["epochs"] == 1
    assert check["n_real"] == check["n_synthetic"] == check["n_sources"] > 0
    assert check["verdict"] in ("near chance", "above chance", "high") and check["reading"] in out
    assert check["provenance"]["device_name"] and check["guidance_scale"] == 4.0
    again = json.loads(run("shortcut", "--split", "slice", "--real-frac", "0.5", "--folds", "2",
                           "--json")[1])
    assert again["cached"] == check["n_sources"] and again["accuracy"] == check["accuracy"]
    code, _, err = run("shortcut", "--split", "slice", "--real-frac", "0.5", "--folds", "1")
    assert code == 2 and "folds=1" in err
