"""Is a synthetic image new, and does it look like its class? (notebook 02's checks)

Memorization: a generator trained on few images can hand back near copies of them. We
compare each synthetic image's distance to its nearest real training image with the
distance between real training images and their nearest other real image: a synthetic
set that sits much closer to the training images than they sit to each other is copying.

Class fidelity: a classifier trained on real images only is asked to label the synthetic
images; accuracy per class well above chance says the variations keep their class's
features (the property the thesis reads off Grad-CAM by eye).

Background: real slices are skull-stripped on black. A generator that paints the
background grey hands a classifier a cue that says "synthetic", not "this class"; where
synthetic images go to one class only (the thesis's "20% synthetic, ModerateDemented
only"), that cue predicts the class. The first full generator did this (13 of 255 where
the sources are black, 2026-11-26), so the check sits beside the other two.
"""
from __future__ import annotations

import torch

from ..data import nearest_neighbours


def memorization_distances(synthetic: torch.Tensor, real_train: torch.Tensor) -> dict:
    """Nearest-real distances of synthetic images, against real-to-real ones (gray-level RMS).

    Returns ``synthetic_to_real`` and ``synthetic_nn_index`` (for each synthetic image,
    the distance to and index of its nearest image in ``real_train``) and
    ``real_to_real`` (each real image to its nearest other real image).
    """
    synthetic = synthetic.reshape(-1, *synthetic.shape[-3:])
    syn_d, syn_i = nearest_neighbours(synthetic, real_train)
    real_d, _ = nearest_neighbours(real_train, real_train, same=True)
    return {"synthetic_to_real": syn_d, "synthetic_nn_index": syn_i, "real_to_real": real_d,
            "share_closer_than_real_min": float((syn_d < real_d.min()).float().mean())}


@torch.no_grad()
def predictions(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Softmax probabilities [N, C] of ``model`` (eval mode) on uint8 ``images``."""
    from ..models import normalize

    model.eval()
    device = next(model.parameters()).device
    out = [torch.softmax(model(normalize(images[i:i + batch_size].to(device))).float(), dim=1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def class_fidelity(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   classes) -> dict[str, float]:
    """Accuracy per class of a real-only ``model`` on (synthetic) ``images``; NaN if absent."""
    predicted = predictions(model, images).argmax(dim=1)
    result = {}
    for c, name in enumerate(classes):
        mask = labels == c
        result[name] = float((predicted[mask] == c).float().mean()) if mask.any() else float("nan")
    return result


def background_levels(sources: torch.Tensor, variations: torch.Tensor, labels: torch.Tensor,
                      classes, black: int = 2) -> dict[str, dict[str, float]]:
    """Per class: mean grey level of the pixels where each source is black (<= ``black``),
    in the sources and in their variations, and the share of those pixels a variation
    lifts above 10 (a level no real background reaches).

    ``variations`` [N, 1, H, W] (or [N, V, 1, H, W], V per source) line up with
    ``sources`` [N, 1, H, W] and ``labels`` [N], all uint8 scans of one size.
    """
    if variations.dim() == sources.dim() + 1:  # V variations per source
        v = variations.shape[1]
        sources, labels = sources.repeat_interleave(v, 0), labels.repeat_interleave(v, 0)
        variations = variations.flatten(0, 1)
    if variations.shape != sources.shape:
        raise ValueError(f"variations {tuple(variations.shape)} do not line up with sources "
                         f"{tuple(sources.shape)}; give one (or V) per source, same size")
    mask = sources <= black
    per_image = mask.flatten(1).sum(1).clamp(min=1)
    src = (sources.float() * mask).flatten(1).sum(1) / per_image
    var = (variations.float() * mask).flatten(1).sum(1) / per_image
    lifted = ((variations > 10) & mask).flatten(1).sum(1) / per_image
    out = {}
    for c, name in enumerate(classes):
        rows = labels == c
        out[name] = ({"source": float(src[rows].mean()), "variation": float(var[rows].mean()),
                      "share_above_10": float(lifted[rows].mean()), "n": int(rows.sum())}
                     if rows.any() else {"source": float("nan"), "variation": float("nan"),
                                         "share_above_10": float("nan"), "n": 0})
    return out
