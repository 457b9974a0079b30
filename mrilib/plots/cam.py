"""Chapter 3: where the classifier looks, on real scans and their synthetic variations."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from ..cam import (METRICS, NO_EVIDENCE, class_index, class_probabilities, contrast_class,
                   gradcam_maps, layer_name, no_evidence, overlay, target_layer)
from ..data import CLASSES
from . import _PRESET, stamp
from .data import _maybe_save

KINDS = ("real/variation", "real/real")  # left to right in the agreement figure
METRIC_LABELS = {"pearson": "Pearson r", "iou": "IoU of top {top:.0%} regions"}


def _one_scan(scan, name: str) -> torch.Tensor:
    scan = torch.as_tensor(scan)
    if scan.ndim == 2:
        scan = scan[None]
    if scan.dtype != torch.uint8 or scan.ndim != 3 or scan.shape[0] != 1:
        raise ValueError(f"{name} must be one uint8 scan [1, H, W], got {scan.dtype} "
                         f"{list(scan.shape)}")
    return scan.cpu()


def _colorbar(fig, axes) -> None:
    # The overlays are RGB pictures; the bar says what their jet colours stand for.
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="jet"), ax=axes, shrink=0.7,
                       pad=0.02)
    bar.set_label("Grad-CAM (scaled per map)", fontsize=8)


def _bare(ax) -> None:
    ax.set_xticks([]), ax.set_yticks([])


def _cam_panel(ax, scan, cam, title: str, target: str) -> None:
    """The CAM over the scan; for an all-zero map the bare scan and a title saying so,
    not a flat blue overlay that reads as "looks nowhere in particular"."""
    if no_evidence(cam):
        ax.imshow(_one_scan(scan, "scan")[0].numpy(), cmap="gray", vmin=0, vmax=255)
        title += "\n" + NO_EVIDENCE.format(target=target)
    else:
        ax.imshow(overlay(scan, cam))
    ax.set_title(title, fontsize=8)


def real_vs_synthetic_cam_figure(model, real_uint8, synthetic_uint8, true_class,
                                 classes=CLASSES, layer=None, save: str | None = None,
                                 note=_PRESET):
    """Thesis Figures 3.1-3.4: a real scan and its synthetic variation, with their CAMs.

    Rows: the real scan, the variation. Columns: the scan, its CAM for the class the
    model predicts for the real scan, its CAM for the other extreme class
    (:func:`mrilib.cam.contrast_class`). Both rows use the same two classes so they can
    be compared; each row says what the model predicts for that scan and how surely.
    ``note`` goes above in red (default: the preset's stamp, :func:`mrilib.plots.stamp`).
    """
    pair = torch.stack([_one_scan(real_uint8, "real_uint8"),
                        _one_scan(synthetic_uint8, "synthetic_uint8")])
    true = class_index(true_class, classes)
    probs = class_probabilities(model, pair)
    predicted = int(probs[0].argmax())
    targets = (predicted, contrast_class(predicted, true, classes))
    cams = [gradcam_maps(model, pair, t, layer, classes) for t in targets]

    fig, axes = plt.subplots(2, 3, figsize=(8.2, 5.6))
    for row, what in enumerate(("Real scan", "Synthetic variation")):
        guess = int(probs[row].argmax())
        axes[row, 0].imshow(pair[row, 0].numpy(), cmap="gray", vmin=0, vmax=255)
        axes[row, 0].set_title(f"{what}\npredicted {classes[guess]} ({probs[row, guess]:.0%})",
                               fontsize=8)
        for col, t in enumerate(targets):
            _cam_panel(axes[row, col + 1], pair[row], cams[col][row],
                       f"CAM for {classes[t]}\np = {probs[row, t]:.2f}", classes[t])
    for ax in axes.flat:
        _bare(ax)
    where = layer_name(model, target_layer(model, layer))
    fig.suptitle(f"True class: {classes[true]}   (Grad-CAM at {where})", fontsize=10)
    _colorbar(fig, axes)
    return _maybe_save(stamp(fig, note), save)


def _interval_marks(ax, cell) -> None:
    """Median and 95% bootstrap interval of each kind, as a point with error bars."""
    for x, kind in enumerate(KINDS):
        med, low, high = cell.loc[kind, ["median", "low", "high"]]
        if np.isfinite(med):
            ax.errorbar(x, med, yerr=[[med - low], [high - med]], fmt="o", color="black",
                        capsize=4, zorder=5)


def _difference_title(diff) -> str:
    """The difference of medians with its interval, or why there is none (all-zero maps)."""
    if not np.isfinite(diff["median"]):
        return "difference of medians\nundefined: all-zero maps\n(no positive evidence)"
    return (f"difference of medians\n"
            f"{diff['median']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]")


def cam_agreement_figure(results, save: str | None = None, note=_PRESET):
    """Distributions of CAM agreement, real/variation vs real/real pairs, per class.

    ``results`` is an :class:`mrilib.cam.AgreementResult`. One row per metric, one
    column per class; black points are medians with their bootstrap intervals, and each
    title gives the difference of the medians with its interval, or says it is undefined
    where every map of a kind is all zero. ``note`` as in :func:`real_vs_synthetic_cam_figure`.
    """
    pairs, summary = results.pairs, results.summary
    classes = list(dict.fromkeys(pairs["class"]))
    fig, axes = plt.subplots(len(METRICS), len(classes), squeeze=False, sharey="row",
                             figsize=(0.6 + 2.7 * len(classes), 3.0 * len(METRICS)))
    for r, metric in enumerate(METRICS):
        for c, cls in enumerate(classes):
            ax = axes[r, c]
            values = pairs[(pairs["class"] == cls) & (pairs["metric"] == metric)]
            values = values.dropna(subset=["value"])
            sns.violinplot(data=values, x="kind", y="value", order=KINDS, cut=0, inner=None,
                           color="0.88", ax=ax)
            sns.stripplot(data=values, x="kind", y="value", order=KINDS, size=2, alpha=0.5,
                          jitter=0.25, ax=ax)
            cell = summary[(summary["class"] == cls) & (summary["metric"] == metric)]
            cell = cell.set_index("kind")
            _interval_marks(ax, cell)
            ax.set_title(f"{cls.replace('_', ' ')}\n{_difference_title(cell.loc['difference'])}",
                         fontsize=8)
            ax.set_xlabel("")
            ax.tick_params(labelsize=7)
        axes[r, 0].set_ylabel(METRIC_LABELS[metric].format(top=results.top_frac), fontsize=8)
    fig.suptitle(f"Do a scan and its variation share a CAM? Medians with "
                 f"{results.level:.0%} bootstrap intervals (seed {results.seed})", fontsize=10)
    fig.tight_layout()
    return _maybe_save(stamp(fig, note), save)


def scan_cam_figure(scan_uint8, cam: np.ndarray, predicted: str, probability: float,
                    target: str, layer: str, save: str | None = None, note=_PRESET):
    """One scan and its CAM overlay, titled with the prediction and the CAM's class
    (an all-zero CAM is said to be one); ``note`` as in :func:`real_vs_synthetic_cam_figure`."""
    scan = _one_scan(scan_uint8, "scan_uint8")
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.5))
    axes[0].imshow(scan[0].numpy(), cmap="gray", vmin=0, vmax=255)
    axes[0].set_title(f"predicted {predicted} ({probability:.0%})", fontsize=9)
    _cam_panel(axes[1], scan, cam, f"Grad-CAM for {target}\nat {layer}", target)
    for ax in axes:
        _bare(ax)
    _colorbar(fig, axes)
    return _maybe_save(stamp(fig, note), save)
