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
only"), that cue predicts the class. The first full generator did this
(docs/decisions.md#local-generator), so the check sits beside the other two.
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


def _balanced_sources(labels: torch.Tensor, index: torch.Tensor, max_sources: int | None,
                      seed: int) -> torch.Tensor:
    """``index`` itself, or up to ``max_sources`` of it in equal shares per class.

    Equal shares rather than the sample's proportions: the question is per class, and a
    proportional subset of 100 would hold one ModerateDemented slice.
    """
    if max_sources is None or max_sources >= len(index):
        return index
    classes = labels[index].unique()
    per_class = max(1, max_sources // len(classes))
    rng = torch.Generator().manual_seed(seed)
    picked = [index[labels[index] == c][torch.randperm(int((labels[index] == c).sum()),
                                                       generator=rng)[:per_class]]
              for c in classes]
    return torch.cat(picked).sort().values


def strength_sweep(data, split, real_fraction: float, g: int, strengths,
                   max_sources: int | None = None, seed: int = 0, device=None,
                   classifier: torch.nn.Module | None = None, progress: bool = True,
                   guidance_scales=None) -> dict:
    """How each SDEdit strength (and guidance weight) trades class fidelity against
    distance from the source.

    One variation per source at each strength, drawn (and cached, so a rerun or a cut-off
    run resumes) from generator g of ``real_fraction``, for the images of its
    own training sample (all of them, or ``max_sources`` in equal shares per class). Per
    strength: the per-class accuracy of a real-only classifier on the variations
    (``fidelity``; ``balanced_fidelity`` is their mean, chance 1/C), the grey level where
    the sources are black (``background_grey``), and the median RMS gray-level distance
    of a variation from its own source (``rms_to_source``: 0 at strength 0, the spread
    the variations add). ``classifier`` defaults to the thesis protocol's basic CNN
    trained on the same sample (seed 0), whose per-class accuracy on the real test split
    is reported beside them as the ceiling to read fidelity against. One row per strength
    and classifier-free guidance weight in ``guidance_scales`` (1 = none; > 1 needs a
    generator trained with ``class_dropout``; default: the preset's ``guidance_scale``),
    strengths varying fastest.
    """
    from ..device import resolve_device
    from ..train import trained_classifier
    from .cache import generate_cached
    from .diffusion import LocalDiffusion, generator_path
    from .mixing import real_sample

    strengths, scales = _checked_sweep(strengths, guidance_scales, max_sources, data.classes)
    device = resolve_device(device)
    path = generator_path(data, split, real_fraction, g)
    if max(scales) > 1:  # a generator without a class-free output says so now, not after w=1
        LocalDiffusion(path, guidance_scale=max(scales), device="cpu")
    sample = real_sample(data, split, real_fraction, g)  # what generator g learned from
    sources = _balanced_sources(data.labels, sample, max_sources, seed)
    src, lab = data.images[sources], data.labels[sources]
    ids = [data.ids[i] for i in sources.tolist()]
    if classifier is None:  # trained once, then found in cache/classifiers/
        classifier, _ = trained_classifier(data, split, sample, device=device)
    classifier = classifier.to(device)
    real = class_fidelity(classifier, data.images[split.test], data.labels[split.test],
                          data.classes)
    rows = []
    for w, s in ((w, s) for w in scales for s in strengths):
        backend = LocalDiffusion(path, strength=s, guidance_scale=w, device=device,
                                 sample_seed=g)
        made, report = generate_cached(backend, src, lab, ids, per_image=1, seed=seed,
                                       progress=progress, batch_size=backend.max_batch)
        variations = made[:, 0]
        fidelity = class_fidelity(classifier, variations, lab, data.classes)
        grey = background_levels(src, variations, lab, data.classes)
        n = sum(g["n"] for g in grey.values())
        rows.append({
            "strength": s, "guidance_scale": w, "fidelity": fidelity,
            "balanced_fidelity": _mean(fidelity.values()),
            "background_grey": sum(g["variation"] * g["n"] for g in grey.values() if g["n"]) / n,
            "rms_to_source": float(((variations.float() - src.float()) ** 2)
                                   .flatten(1).mean(1).sqrt().median()),
            "generated": report["generated"], "cached": report["cached"],
            "seconds": report["seconds"], "cache_dir": str(report["dir"])})
    return {"generator": str(path), "real_fraction": real_fraction,
            "generator_index": g, "seed": seed, "n_sources": len(sources),
            "sources_per_class": {name: int((lab == c).sum()) for c, name in enumerate(data.classes)},
            "classifier_real_test": real, "classifier_real_test_balanced": _mean(real.values()),
            "chance": 1 / len(data.classes), "strengths": rows}


def saved_sweeps(data, split, real_fraction: float, g: int, directory=None) -> list[dict]:
    """The sweeps ``synth sweep --out`` saved for this generator (e.g. a GPU run's, committed
    under ``results/`` as ``strength_sweep_x<X>_g<g>*.json``), oldest name first.

    Only sweeps of the generator the current code finds for ``real_fraction`` and g
    (same folder key: same training images, recipe and seed) are returned;
    a sweep of an earlier recipe is left out, and none at all when that generator is not
    trained here. ``directory`` defaults to the repository's ``results/``.
    """
    import json
    from pathlib import Path

    from ..paths import ROOT
    from .diffusion import generator_path

    try:
        key = generator_path(data, split, real_fraction, g).parent.name
    except (FileNotFoundError, ValueError):
        return []
    folder = Path(directory) if directory is not None else ROOT / "results"
    found = []
    for path in sorted(folder.glob(f"strength_sweep_x{real_fraction:g}_g{g}*.json")):
        sweep = json.loads(path.read_text())
        if Path(sweep.get("generator", "")).parent.name == key:
            found.append(sweep | {"file": str(path)})
    return found


def _checked_sweep(strengths, guidance_scales, max_sources, classes) -> tuple[list, list]:
    """(strengths, guidance weights) of a sweep as floats, the weight in force by default."""
    from ..config import settings
    from .diffusion import DEFAULTS, PRESETS

    strengths = [float(s) for s in strengths]
    bad = [s for s in strengths if not 0.0 < s <= 1.0]
    if bad or not strengths:
        raise ValueError(f"strengths {strengths}: give noise levels in (0, 1], e.g. 0.4,0.6,0.8")
    if guidance_scales is None:
        guidance_scales = [settings(DEFAULTS, PRESETS)["guidance_scale"]]
    scales = [float(w) for w in guidance_scales]
    if not scales or any(not w >= 1.0 for w in scales):
        raise ValueError(f"guidance scales {scales}: give weights >= 1, e.g. 1,2,4 "
                         f"(1 = the conditional model alone)")
    if max_sources is not None and max_sources < len(classes):
        raise ValueError(f"max_sources={max_sources}: give at least one source per class "
                         f"({len(classes)}), or None for the whole sample")
    return strengths, scales


def _mean(values) -> float:
    kept = [v for v in values if v == v]  # NaN for a class with no source
    return sum(kept) / len(kept) if kept else float("nan")
