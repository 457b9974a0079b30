"""Is a synthetic image new, and does it look like its class? (notebook 02's checks)

Memorization: a generator trained on few images can hand back near copies of them. We
compare each synthetic image's distance to its nearest real training image with the
distance between real training images and their nearest other real image: a synthetic
set that sits much closer to the training images than they sit to each other is copying.

Class fidelity: a classifier trained on real images only is asked to label the synthetic
images; accuracy per class well above chance says the variations keep their class's
features (the property the thesis reads off Grad-CAM by eye).
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
