"""Synthetic-image checks (memorization, class fidelity, background) and chapter 2's figures."""
from __future__ import annotations

import matplotlib
import pytest
import torch

from mrilib.plots.synthetic import (class_fidelity_figure, memorization_figure,
                                    strength_sweep_figure, variations_figure)
from mrilib.synthetic.quality import background_levels, class_fidelity, memorization_distances

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
    fid = class_fidelity_figure({"real test": {"A": 0.9, "B": 0.5}, "synthetic": {"A": 0.7, "B": 0.2}})
    assert fid.axes[0].get_ylim()[1] > 1
    row = {"fidelity": {"A": 0.8, "B": 0.3}, "balanced_fidelity": 0.55, "rms_to_source": 20.0,
           "background_grey": 5.0}
    sweep = {"n_sources": 8, "chance": 0.5, "classifier_real_test": {"A": 0.9, "B": 0.6},
             "strengths": [{**row, "strength": 0.3}, {**row, "strength": 0.6}]}
    fig = strength_sweep_figure(sweep, note="tiny generator")
    assert len(fig.axes) == 2 and len(fig.axes[0].get_lines()) >= 3
    guided = {**sweep, "strengths": [{**r, "guidance_scale": w} for w in (1.0, 3.0)
                                     for r in sweep["strengths"]]}
    fig = strength_sweep_figure(guided)
    assert len(fig.axes) == 3 and "guidance 3" in fig.axes[1].get_title()
    one_strength = {**sweep, "strengths": [{**row, "strength": 0.6, "guidance_scale": w}
                                           for w in (1.0, 2.0, 4.0)]}
    fig = strength_sweep_figure(one_strength)  # guidance on the x axis instead
    assert len(fig.axes) == 2 and "guidance weight" in fig.axes[0].get_xlabel()
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == 3
