"""mrilib.cam: Grad-CAM through pytorch-grad-cam, the by-hand version, overlays, agreement, CLI."""
from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mrilib import cam as C
from mrilib.data import CLASSES, DataError
from mrilib.models import build_model

# Smallest image size per model whose Grad-CAM layer still has a grid larger than 1x1
# (a 1x1 map min-max scales to all zeros and would compare nothing): conv2 16x16,
# layer4 2x2, the ViT's 4x4 patch grid.
TEST_SIZES = {"basic_cnn": 32, "resnet18": 64, "vit_tiny": 64}
# Weight seeds under which every class has an informative map on the test scans (the
# matrix test asserts it, so a change in timm's initialisation shows up as a failure).
MODEL_SEEDS = {"basic_cnn": 0, "resnet18": 2, "vit_tiny": 0}


def brain_like(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 1, size, size]: a textured bright ellipse at a random place on dark ground."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    out = []
    for _ in range(n):
        cy, cx = ((torch.rand(2, generator=g) - 0.5) * 0.6).tolist()
        ry, rx = (0.4 + 0.4 * torch.rand(2, generator=g)).tolist()
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        texture = torch.rand(size, size, generator=g)
        out.append(torch.where(inside, 80 + 150 * texture, 10 * texture))
    return torch.stack(out)[:, None].round().to(torch.uint8)


def tiny_model(name: str, size: int | None = None, seed: int | None = None) -> nn.Module:
    torch.manual_seed(MODEL_SEEDS[name] if seed is None else seed)
    model = build_model(name, img_size=size or TEST_SIZES[name])
    # timm zero-initialises the last BatchNorm of each residual block, so an untrained
    # ResNet is nearly the identity per block and its class maps come out flat or all
    # negative (all-zero CAMs). Unit gammas give the untrained net spatially varied maps.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: tiny_model(name) for name in TEST_SIZES}


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


# ----------------------------------------------------------------------------- Grad-CAM

@pytest.mark.parametrize("cls", range(len(CLASSES)), ids=CLASSES)
@pytest.mark.parametrize("name", list(TEST_SIZES))
def test_by_hand_matches_pytorch_grad_cam(models, name, cls):
    model, x = models[name], brain_like(2, TEST_SIZES[name])
    library = C.gradcam_maps(model, x, cls)
    by_hand = C.gradcam_by_hand(model, x, cls)
    assert library.shape == by_hand.shape == (2, TEST_SIZES[name], TEST_SIZES[name])
    assert library.dtype == by_hand.dtype == np.float32 and library.min() >= 0
    assert (library.reshape(2, -1).std(axis=1) > 0.05).any(), \
        f"{name} gives flat maps for class {cls}: the comparison would test nothing"
    # Min-max scaled with pytorch-grad-cam's 1e-7: each map peaks at 1 up to that
    # epsilon, or is 0 everywhere when ReLU left nothing.
    peaks = library.reshape(2, -1).max(axis=1)
    assert np.all((np.abs(peaks - 1) < 1e-5) | (peaks == 0))
    np.testing.assert_allclose(by_hand, library, atol=1e-5, rtol=0)


def test_one_target_per_image_and_predicted_by_default(models):
    model, x = models["basic_cnn"], brain_like(4, 32)
    batch = C.gradcam_maps(model, x, [0, 1, "Non_Demented", "verymilddemented"])
    for i in range(4):  # a batch of 4 and of 1 round differently (BLAS blocking): 1e-5
        np.testing.assert_allclose(batch[i], C.gradcam_maps(model, x[i:i + 1], i)[0], atol=1e-5)
    predicted = C.class_probabilities(model, x).argmax(dim=1).tolist()
    np.testing.assert_allclose(C.gradcam_maps(model, x), C.gradcam_maps(model, x, predicted))
    np.testing.assert_allclose(C.gradcam_by_hand(model, x), C.gradcam_by_hand(model, x, predicted))
    assert not np.allclose(batch[0], C.gradcam_maps(model, x[:1], 2)[0]), \
        "the class asked for must change the map"
    chunked = C.gradcam_maps(model, x, [0, 1, 2, 3], batch_size=3)  # batches of 3 and 1
    np.testing.assert_allclose(chunked, batch, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size=0"):
        C.gradcam_maps(model, x, batch_size=0)


@pytest.mark.parametrize("shape", [(2, 2, 64, 64), (4, 4, 64, 64), (16, 16, 32, 32),
                                   (8, 8, 128, 128), (3, 5, 40, 24)])
def test_torch_bilinear_matches_the_cv2_resize_pytorch_grad_cam_uses(shape):
    h, w, H, W = shape
    cam = np.random.default_rng(0).random((h, w), dtype=np.float32)
    with_cv2 = cv2.resize(cam, (W, H))  # scale_cam_image's call, interpolation by default
    with_torch = F.interpolate(torch.from_numpy(cam)[None, None], size=(H, W), mode="bilinear",
                               align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(with_torch, with_cv2, atol=1e-6, rtol=0)


def test_maps_are_scaled_like_the_library_even_without_a_zero():
    # ReLU leaves a positive floor here; the library subtracts it before dividing.
    cam = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])
    out = C._scaled_like_library(cam, (2, 2))[0]
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.25], [0.5, 1.0]]), atol=1e-6, rtol=0)


def test_default_layers_are_the_chapters_layers(models):
    assert C.target_layer(models["basic_cnn"]) is models["basic_cnn"].act2  # conv2, rectified
    assert C.target_layer(models["resnet18"]) is models["resnet18"].layer4
    vit = models["vit_tiny"]
    assert C.target_layer(vit) is vit.blocks[-1].norm1
    assert C.layer_name(vit, C.target_layer(vit)) == f"blocks.{len(vit.blocks) - 1}.norm1"
    assert C.target_layer(vit, "blocks.-2.norm1") is vit.blocks[-2].norm1
    assert C.reshape_transform(models["resnet18"]) is None


def test_layer_choice_changes_the_map(models):
    model, x = models["resnet18"], brain_like(1, 64)
    layer3 = C.gradcam_maps(model, x, 0, layer="layer3")
    np.testing.assert_allclose(C.gradcam_by_hand(model, x, 0, layer="layer3"), layer3, atol=1e-5)
    assert not np.allclose(layer3, C.gradcam_maps(model, x, 0))


def test_vit_reshape_drops_prefix_tokens_and_keeps_patch_order():
    fake_vit = SimpleNamespace(patch_embed=SimpleNamespace(grid_size=(2, 3)), num_prefix_tokens=5)
    to_grid = C.reshape_transform(fake_vit)
    tokens = torch.arange(2 * 11 * 4, dtype=torch.float32).reshape(2, 11, 4)  # 5 prefix + 2x3
    grid = to_grid(tokens)
    assert grid.shape == (2, 4, 2, 3)
    for r in range(2):
        for c in range(3):
            torch.testing.assert_close(grid[:, :, r, c], tokens[:, 5 + 3 * r + c])
    torch.testing.assert_close(to_grid(tokens[:, 5:]), grid)  # patch embedding: no prefix yet
    with pytest.raises(ValueError, match="7 tokens do not fit the 2x3 patch grid"):
        to_grid(tokens[:, :7])


@pytest.mark.parametrize("size,grid", [(128, 8), (256, 16)])
def test_vit_grid_follows_image_size(size, grid):
    vit = tiny_model("vit_tiny", size=size, seed=0)
    kept = []
    handle = C.target_layer(vit).register_forward_hook(lambda m, i, out: kept.append(out))
    with torch.no_grad():
        vit(torch.zeros(1, 1, size, size))
    handle.remove()
    assert kept[0].shape[1] == grid * grid + vit.num_prefix_tokens
    assert C.reshape_transform(vit)(kept[0]).shape == (1, vit.embed_dim, grid, grid)
    maps = C.gradcam_maps(vit, brain_like(1, size), "Moderate_Demented")
    assert maps.shape == (1, size, size) and maps.max() > 0.99


def test_hooks_released_mode_restored_and_no_gradients_left(models):
    model, x = models["vit_tiny"], brain_like(1, 64)
    model.train()
    try:
        C.gradcam_maps(model, x, 1)
        C.gradcam_by_hand(model, x, 1)
        assert model.training, "a CAM must not leave the model in eval mode"
    finally:
        model.eval()
    assert hooks_left(model) == 0
    assert all(p.grad is None for p in model.parameters())
    # An error raised while a layer is hooked must release the hook too.
    with pytest.raises(ValueError, match="layer 'head' gives"):
        C.gradcam_maps(model, x, 1, layer="head")
    assert hooks_left(model) == 0


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("given,expected", [
    ("Moderate_Demented", 1), ("ModerateDemented", 1), ("moderate demented", 1),
    ("NON_DEMENTED", 2), ("very-mild-demented", 3), (0, 0), ("3", 3), (np.int64(2), 2),
    (torch.tensor(1), 1)])
def test_class_index_accepts_names_and_indices(given, expected):
    assert C.class_index(given) == expected


@pytest.mark.parametrize("bad,message", [("Severe_Demented", "unknown class 'Severe_Demented'"),
                                         (4, "class index 4 is out of range"),
                                         (-1, "class index -1 is out of range"),
                                         (True, "unknown class True")])
def test_class_index_names_the_bad_value(bad, message):
    with pytest.raises(ValueError, match=message) as err:
        C.class_index(bad)
    assert "1 Moderate_Demented" in str(err.value)  # and lists what exists


def test_bad_scans_targets_and_layers_are_named(models):
    model, x = models["basic_cnn"], brain_like(2, 32)
    with pytest.raises(ValueError, match=r"uint8 \[B, 1, H, W\].*float32"):
        C.gradcam_maps(model, x.float())
    with pytest.raises(ValueError, match=r"uint8 \[B, 1, H, W\].*\[1, 32, 32\]"):
        C.gradcam_maps(model, x[0])
    with pytest.raises(ValueError, match=r"cannot take scans of shape \[2, 1, 64, 64\]"):
        C.gradcam_by_hand(model, brain_like(2, 64))
    with pytest.raises(ValueError, match="unknown class 'Severe'"):
        C.gradcam_maps(model, x, "Severe")
    with pytest.raises(ValueError, match="3 targets for 2 scans"):
        C.gradcam_maps(model, x, [0, 1, 2])
    with pytest.raises(ValueError, match="layer 'conv9' not found"):
        C.gradcam_maps(model, x, 0, layer="conv9")
    two_class = build_model("basic_cnn", num_classes=2, img_size=32)
    with pytest.raises(ValueError, match="class index 3 does not exist in a model with 2 outputs"):
        C.gradcam_maps(two_class, x, "Very_Mild_Demented")
    assert hooks_left(model) == 0
    with pytest.raises(ValueError, match="no default Grad-CAM layer for Sequential"):
        C.target_layer(nn.Sequential(nn.Conv2d(1, 2, 3)))


class Fussy(nn.Module):
    """A CNN with a layer it never uses, that fails (IndexError) whenever grad is on."""

    def __init__(self):
        super().__init__()
        self.conv, self.unused, self.head = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 1), nn.Linear(4, 4)

    def forward(self, x):
        if torch.is_grad_enabled():
            raise IndexError("fussy")
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_library_and_layer_failures_are_not_silent():
    model, x = Fussy(), brain_like(1, 16)
    # GradCAM.__exit__ swallows IndexErrors; gradcam_maps must not return nothing.
    with pytest.raises(RuntimeError, match="failed with an IndexError"):
        C.gradcam_maps(model, x, 0, layer="conv")
    model.forward = lambda x: model.head(model.conv(x).mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="layer 'unused' did not run"):
        C.gradcam_by_hand(model, x, 0, layer="unused")
    assert hooks_left(model) == 0


def test_read_scan_takes_any_gray_or_rgb_image(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (90, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "wide.png")
    deep = (np.arange(50 * 50, dtype=np.uint16).reshape(50, 50) * 20)
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    for name in ("wide.png", "deep.tif"):
        scan = C.read_scan(tmp_path / name, 64)
        assert scan.dtype == torch.uint8 and scan.shape == (1, 64, 64) and scan.max() > 200
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(DataError, match="cannot read image .*notes.png"):
        C.read_scan(tmp_path / "notes.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        C.read_scan(tmp_path / "missing.png")


# ----------------------------------------------------------------------------- overlays

def test_overlay_is_uint8_rgb_of_the_scan():
    scan = brain_like(1, 32)[0]
    cam = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    out = C.overlay(scan, cam)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    np.testing.assert_array_equal(C.overlay(scan[0].numpy(), cam), out)  # [H, W] array too
    assert not (out[..., 0] == out[..., 2]).all(), "the heat map must colour the scan"
    gray = C.overlay(scan, cam, image_weight=1.0)  # the scan alone, as RGB
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # show_cam_on_image stretches its result to a maximum of 255.
    expected = scan[0].numpy() / scan.max().item() * 255
    assert np.abs(gray[..., 0] - expected).max() <= 1


@pytest.mark.parametrize("scan,cam,message", [
    (np.zeros((1, 8, 8), np.float32), np.zeros((8, 8)), "scan must be uint8"),
    (np.zeros((1, 8, 8), np.uint8), np.zeros((4, 4)), r"cam of shape \[4, 4\] does not match"),
    (np.zeros((1, 8, 8), np.uint8), np.full((8, 8), 2.0), r"cam values must lie in \[0, 1\]"),
])
def test_overlay_rejects_what_it_cannot_draw(scan, cam, message):
    with pytest.raises(ValueError, match=message):
        C.overlay(scan, cam)


# ----------------------------------------------------------------------------- agreement

def test_agreement_of_constructed_maps():
    ramp = np.tile(np.arange(10, dtype=np.float64), (10, 1))        # columns 8, 9 on top
    shifted = np.roll(ramp, -1, axis=1)                              # columns 7, 8 on top
    left, right = np.zeros((10, 10)), np.zeros((10, 10))
    left[:, :3], right[:, 7:] = 1.0, 1.0
    a = np.stack([ramp, ramp, ramp[:, ::-1], left, ramp])
    b = np.stack([ramp, 2 * ramp + 1, ramp, right, shifted])
    scores = C.cam_agreement(a, b, top_frac=0.2)
    assert set(scores) == {"pearson", "iou"}
    np.testing.assert_allclose(scores["pearson"][:3], [1.0, 1.0, -1.0])
    np.testing.assert_allclose(scores["iou"][:4], [1.0, 1.0, 0.0, 0.0])
    assert scores["iou"][4] == pytest.approx(1 / 3)  # {8, 9} vs {7, 8}: one column of three


def test_agreement_undefined_cases_are_nan_and_shapes_must_pair():
    flat, zero = np.ones((1, 6, 6)), np.zeros((1, 6, 6))
    scores = C.cam_agreement(flat, zero)
    assert np.isnan(scores["pearson"][0]) and scores["iou"][0] == 0.0
    assert np.isnan(C.cam_agreement(zero, zero)["iou"][0])  # no region on either side
    with pytest.raises(ValueError, match="pair up map for map"):
        C.cam_agreement(np.zeros((2, 6, 6)), np.zeros((3, 6, 6)))
    with pytest.raises(ValueError, match=r"cams_a must be maps \[N, H, W\]"):
        C.cam_agreement(np.zeros((6, 6)), np.zeros((6, 6)))
    with pytest.raises(ValueError, match="top_frac=1.5"):
        C.cam_agreement(flat, flat, top_frac=1.5)


def smooth_maps(n: int, seed: int, size: int = 16) -> np.ndarray:
    """n maps of one Gaussian blob each at a random place: different maps barely agree."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    centres = rng.uniform(2, size - 2, size=(n, 2))
    return np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 8.0)


def test_variations_agree_more_than_random_real_pairs():
    real = smooth_maps(24, seed=0)
    labels = np.repeat([1, 2], 12)                         # Moderate, Non
    source = np.repeat(np.arange(24), 2)                   # two variations per real map
    noise = np.random.default_rng(1).normal(0, 0.05, size=(48, 16, 16))
    variations = np.clip(real[source] + noise, 0, None)
    result = C.agreement_vs_baseline(real, labels, variations, source, seed=7, n_boot=200)
    pairs = result.pairs
    assert set(pairs["class"]) == {"Moderate_Demented", "Non_Demented"}
    baseline = pairs[pairs["kind"] == "real/real"]
    assert (baseline["a"] != baseline["b"]).all()
    assert (labels[baseline["a"]] == labels[baseline["b"]]).all()
    assert len(baseline) == len(pairs[pairs["kind"] == "real/variation"]) == 48 * 2
    summary = result.summary.set_index(["class", "metric", "kind"])
    assert len(summary) == 2 * 2 * 3 and (summary["low"] <= summary["median"]).all()
    assert (summary["median"] <= summary["high"]).all()
    diff = summary.xs("difference", level="kind")
    assert (diff["low"] > 0.2).all(), "near-copies must agree more than random pairs"
    again = C.agreement_vs_baseline(real, labels, variations, source, seed=7, n_boot=200)
    assert again.summary.equals(result.summary) and again.pairs.equals(result.pairs)
    other = C.agreement_vs_baseline(real, labels, variations, source, seed=8, n_boot=200)
    assert not other.pairs.equals(result.pairs)


def test_undefined_agreement_is_left_out_of_the_summary():
    real = smooth_maps(4, seed=0)
    variations = real.copy()
    variations[0] = 0.5  # a flat map: its correlation is undefined
    result = C.agreement_vs_baseline(real, [2, 2, 2, 2], variations, np.arange(4), n_boot=100)
    row = result.summary.set_index(["metric", "kind"]).loc[("pearson", "real/variation")]
    assert row["n"] == 3 and row["median"] == pytest.approx(1.0)


def test_agreement_vs_baseline_names_bad_input():
    real, labels = smooth_maps(3, seed=0), np.array([1, 2, 2])
    with pytest.raises(ValueError, match="'Moderate_Demented' has 1 real map"):
        C.agreement_vs_baseline(real, labels, real[:1], [0])
    with pytest.raises(ValueError, match="variation_source holds 0..5"):
        C.agreement_vs_baseline(real, labels, real[:2], [0, 5])
    with pytest.raises(ValueError, match="one label per real map"):
        C.agreement_vs_baseline(real, labels[:2], real[:1], [1])


# ----------------------------------------------------------------------------- figures

def test_real_vs_synthetic_figure_titles_and_saves(models, tmp_path, monkeypatch):
    import mrilib.plots as plots
    from mrilib.plots.cam import real_vs_synthetic_cam_figure

    monkeypatch.setattr(plots, "figures_dir", lambda: tmp_path)
    model, scans = models["basic_cnn"], brain_like(2, 32)
    fig = real_vs_synthetic_cam_figure(model, scans[0], scans[1], "ModerateDemented",
                                       save="fig3_1_test")
    probs = C.class_probabilities(model, scans)
    predicted = CLASSES[int(probs[0].argmax())]
    titles = [ax.get_title() for ax in fig.axes[:6]]
    assert "True class: Moderate_Demented" in fig.get_suptitle()
    assert f"predicted {predicted}" in titles[0] and f"CAM for {predicted}" in titles[1]
    contrast = CLASSES[C.contrast_class(predicted, "Moderate_Demented")]
    assert f"CAM for {contrast}" in titles[2] and f"CAM for {contrast}" in titles[5]
    assert (tmp_path / "fig3_1_test.png").stat().st_size > 10_000
    plt.close(fig)


@pytest.mark.parametrize("predicted,true,expected", [
    ("Moderate_Demented", "Moderate_Demented", "Non_Demented"),
    ("Non_Demented", "Moderate_Demented", "Moderate_Demented"),
    ("Mild_Demented", "Non_Demented", "Moderate_Demented"),
    ("Mild_Demented", "Very_Mild_Demented", "Moderate_Demented")])
def test_contrast_class_is_the_other_extreme(predicted, true, expected):
    assert CLASSES[C.contrast_class(predicted, true)] == expected


def test_cam_agreement_figure_has_a_panel_per_metric_and_class():
    from mrilib.plots.cam import cam_agreement_figure

    real = smooth_maps(8, seed=0)
    result = C.agreement_vs_baseline(real, np.repeat([1, 2], 4), real, np.arange(8),
                                     seed=0, n_boot=50)
    fig = cam_agreement_figure(result)
    assert len([ax for ax in fig.axes if ax.get_title()]) == 4
    assert "difference of medians" in fig.axes[0].get_title()
    plt.close(fig)


def blind_to(model: nn.Module, cls: int) -> nn.Module:
    """``model`` with no weight into class ``cls``'s score: its Grad-CAM is all zero."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight[cls] = 0
    return model


def test_an_all_zero_map_is_said_to_be_one_not_drawn_flat_blue():
    from mrilib.plots.cam import real_vs_synthetic_cam_figure, scan_cam_figure

    model, scans = blind_to(tiny_model("basic_cnn"), 1), brain_like(2, 32)
    cam = C.gradcam_maps(model, scans, 1)
    assert C.no_evidence(cam).tolist() == [True, True] and C.no_evidence(cam[0])
    fig = scan_cam_figure(scans[0], cam[0], "Non_Demented", 0.5, "Moderate_Demented", "act2")
    panel = fig.axes[1]
    assert "all zero: no positive evidence for Moderate_Demented" in panel.get_title()
    assert panel.images[0].get_array().ndim == 2  # the bare scan, not an RGB overlay
    plt.close(fig)
    blind = blind_to(model, 2)  # the contrast class is always an extreme: 1 or 2
    fig = real_vs_synthetic_cam_figure(blind, scans[0], scans[1], "Moderate_Demented")
    titles = " ".join(ax.get_title() for ax in fig.axes[:6])
    assert re.search("no positive evidence for (Moderate|Non)_Demented", titles)
    plt.close(fig)


def test_agreement_of_all_zero_maps_is_undefined_on_the_panel_not_nan():
    from mrilib.plots.cam import cam_agreement_figure

    zero = np.zeros((4, 16, 16), np.float32)
    result = C.agreement_vs_baseline(zero, [1, 1, 2, 2], zero, np.arange(4), seed=0, n_boot=20)
    fig = cam_agreement_figure(result)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles and all("undefined: all-zero maps" in t for t in titles)
    assert not any("nan" in t for t in titles)
    plt.close(fig)


@pytest.mark.parametrize("preset, stamped", [("quick", True), ("thesis", False)])
def test_chapter_3_figures_carry_the_preset_stamp_even_unsaved(models, preset, stamped,
                                                                monkeypatch):
    from mrilib.plots import PRESET_STAMPS, stamp
    from mrilib.plots.cam import cam_agreement_figure, real_vs_synthetic_cam_figure

    monkeypatch.setenv("MRILIB_PRESET", preset)
    scans = brain_like(2, 32)
    real = smooth_maps(8, seed=0)
    result = C.agreement_vs_baseline(real, np.repeat([1, 2], 4), real, np.arange(8),
                                     seed=0, n_boot=20)
    for fig in (real_vs_synthetic_cam_figure(models["basic_cnn"], scans[0], scans[1], 1),
                cam_agreement_figure(result)):
        texts = [t.get_text().replace("\n", " ") for t in fig.texts]
        assert (PRESET_STAMPS["quick"] in texts) == stamped
        assert len(stamp(fig).texts) == len(fig.texts)  # once per figure
        plt.close(fig)
    fig = real_vs_synthetic_cam_figure(models["basic_cnn"], scans[0], scans[1], 1,
                                       note="quick preset: this notebook's own words")
    assert "quick preset: this notebook's own words" in [t.get_text() for t in fig.texts]
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def cli(argv, monkeypatch):
    import mrilib.cli

    return mrilib.cli.main(argv)


def saved_model(tmp_path, name: str, size: int, config_name: str | None = None) -> str:
    from mrilib.checkpoints import save_checkpoint

    model = tiny_model(name, size=size)
    path = tmp_path / f"{name}-{size}.pt"
    save_checkpoint(path, model.state_dict(), {"model": config_name or name, "img_size": size,
                                               "num_classes": 4, "seed": MODEL_SEEDS[name]})
    return str(path)


@pytest.fixture(scope="module")
def real_scan(mri_path):
    return sorted((mri_path / "Moderate_Demented").glob("*.jpg"))[0]


@pytest.mark.parametrize("name,size", [("basic_cnn", 128), ("resnet18", 64), ("vit_tiny", 64)])
def test_cli_writes_overlay_for_a_real_scan(name, size, real_scan, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cam.png"
    code = cli(["cam", "--image", str(real_scan), "--checkpoint",
                saved_model(tmp_path, name, size), "--target", "Non_Demented",
                "--out", str(out)], monkeypatch)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "Grad-CAM for Non_Demented" in printed and "predicted " in printed
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 300


def test_cli_says_when_the_map_is_all_zero(real_scan, tmp_path, capsys):
    import mrilib.cli
    from mrilib.checkpoints import save_checkpoint

    model = blind_to(tiny_model("basic_cnn", size=64), 1)
    path = save_checkpoint(tmp_path / "blind.pt", model.state_dict(),
                           {"model": "basic_cnn", "img_size": 64, "num_classes": 4})
    assert mrilib.cli.main(["cam", "--image", str(real_scan), "--checkpoint", str(path),
                            "--target", "1", "--out", str(tmp_path / "cam.png")]) == 0
    out = capsys.readouterr().out
    assert "the map is all zero: no positive evidence for Moderate_Demented" in out


def test_cli_errors_name_the_bad_value(real_scan, tmp_path, monkeypatch, capsys):
    good = saved_model(tmp_path, "basic_cnn", 64)
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a scan")
    cases = [
        (["--image", str(real_scan), "--checkpoint", good, "--target", "Severe"],
         "unknown class 'Severe'"),
        (["--image", str(notes), "--checkpoint", good], "cannot read image .*notes.jpg"),
        (["--image", str(real_scan), "--checkpoint", saved_model(tmp_path, "basic_cnn", 32,
                                                                 config_name="resnet18")],
         r"checkpoint .*basic_cnn-32.pt.*does not fit"),
        (["--image", str(real_scan), "--checkpoint", good, "--layer", "layer4"],
         "layer 'layer4' not found"),
    ]
    for args, message in cases:
        code = cli(["cam", *args, "--out", str(tmp_path / "x.png")], monkeypatch)
        assert code == 2
        assert re.search(message, capsys.readouterr().err), message
    assert cli(["cam", "--image", str(real_scan), "--checkpoint", good, "--out",
                str(tmp_path / "x.jpg")], monkeypatch) == 2
    assert "must name a .png file" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(TEST_SIZES))
def test_by_hand_matches_library_on_cuda(name):
    model = tiny_model(name).cuda()
    x = brain_like(2, TEST_SIZES[name])
    np.testing.assert_allclose(C.gradcam_by_hand(model, x, 1), C.gradcam_maps(model, x, 1),
                               atol=1e-5, rtol=0)


def test_an_untrained_control_measures_what_input_similarity_alone_gives():
    # Variations that are their sources plus a little noise: even random weights map them
    # like their sources, so a control must show agreement beyond the baseline too.
    real = brain_like(8, 32, seed=3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    noise = torch.randint(-6, 7, (16, 1, 32, 32), generator=torch.Generator().manual_seed(1))
    source = torch.arange(8).repeat_interleave(2)
    variations = (real[source].int() + noise).clamp(0, 255).to(torch.uint8)
    one, two = C.untrained_control("basic_cnn", img_size=32), C.untrained_control(
        "basic_cnn", img_size=32)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(),
                                                 two.state_dict().values()))
    assert not one.training
    control = C.agreement_of(one, real, labels, variations, source, seed=0, n_boot=200)
    manual = C.agreement_vs_baseline(C.gradcam_maps(one, real, labels), labels,
                                     C.gradcam_maps(one, variations, labels[source]), source,
                                     seed=0, n_boot=200)
    pd.testing.assert_frame_equal(control.summary, manual.summary)
    diff = control.summary[(control.summary["kind"] == "difference")
                           & (control.summary["metric"] == "pearson")]
    # near-copies agree although nothing was learned (a class whose random-weight maps
    # are all flat has no correlation at all)
    assert diff["median"].notna().sum() >= 3 and (diff["median"].dropna() > 0).all()
    # against_control: beyond it only where the intervals are apart
    table = C.against_control(control, control)
    assert len(table) == 8 and not table["beyond control"].any()
    lifted = copy.deepcopy(control)
    d = lifted.summary["kind"] == "difference"
    lifted.summary.loc[d, ["median", "low", "high"]] += 10.0
    beyond = C.against_control(lifted, control)
    assert (beyond["beyond control"] == beyond["median untrained"].notna()).all()


@pytest.mark.parametrize("m, n, expected", [(4, 8, 6), (10, 8, 8), (2, 5, 1)])
def test_baseline_pairs_are_distinct_unordered_pairs_of_two_scans(m, n, expected):
    members = np.arange(100, 100 + m)
    a, b = C._baseline_pairs(members, n, np.random.default_rng(0))
    pairs = {tuple(sorted(p)) for p in zip(a.tolist(), b.tolist())}
    assert len(a) == len(pairs) == expected  # no pair twice, in either order
    assert all(x != y for x, y in pairs) and set(a) | set(b) <= set(members.tolist())


@pytest.mark.parametrize("by_hand", [False, True])
def test_a_layer_without_feature_maps_is_refused_by_name(by_hand):
    model = tiny_model("basic_cnn", 32)
    run = C.gradcam_by_hand if by_hand else C.gradcam_maps
    with pytest.raises(ValueError, match=r"layer 'fc1' gives \[1, 128\], not feature maps.*'act2'"):
        run(model, brain_like(1, 32), layer="fc1")


def test_maps_explain_the_model_as_trained_on_normalised_slices():
    # The CAM path must feed the model what training fed it: normalize(uint8 scans).
    # A missing normalize would change the probabilities (and with them the default,
    # predicted, target class), though both CAM paths would still agree with each other.
    from mrilib.models import normalize

    model = tiny_model("basic_cnn", 32)
    x = brain_like(3, 32, seed=5)
    with torch.no_grad():
        expected = torch.softmax(model.eval()(normalize(x)), dim=1)
        raw = torch.softmax(model(x.float() / 255.0), dim=1)
    torch.testing.assert_close(C.class_probabilities(model, x), expected)
    assert not torch.allclose(raw, expected, atol=1e-3)  # the check can tell them apart
