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

Shortcut: a basic CNN trained to tell variations from real slices, on sources it never
saw (docs/decisions.md#shortcut-check). High held-out accuracy says "synthetic" is a
feature a classifier can learn, whatever the cue (background, texture, blur).

The guidance weight is chosen from a sweep against the classifier's accuracy on real
*validation* slices (:func:`chosen_guidance`); the test split chooses nothing.
"""
from __future__ import annotations

import torch

from ..config import settings
from ..data import nearest_neighbours

DEFAULTS = {
    # --- shortcut check (shortcut_check) ---
    "folds": 5,           # every source held out once, by a model that never saw it (or its brain)
    "high": 0.75,         # held-out balanced accuracy (chance 0.5) from which a cue counts as easy
    "max_sources": None,  # sources checked, equal shares per class; None: all of them
    # A fixed budget, no early stopping: the held-out fold sits in the engine's validation
    # slot, and stopping on it would choose on what it scores (the checks so far ran 10).
    "epochs": 10,
}
PRESETS = {
    "quick": {"folds": 3, "max_sources": 48, "epochs": 1},  # seconds on a CPU: the pipeline
}


def memorization_distances(synthetic: torch.Tensor, real_train: torch.Tensor,
                           real_to_real: torch.Tensor | None = None) -> dict:
    """Nearest-real distances of synthetic images, against real-to-real ones (gray-level RMS).

    Returns ``synthetic_to_real`` and ``synthetic_nn_index`` (for each synthetic image,
    the distance to and index of its nearest image in ``real_train``) and
    ``real_to_real`` (each real image to its nearest other real image; pass a previous
    call's to compare several synthetic sets with one real set without computing it again).
    """
    synthetic = synthetic.reshape(-1, *synthetic.shape[-3:])
    syn_d, syn_i = nearest_neighbours(synthetic, real_train)
    real_d = (nearest_neighbours(real_train, real_train, same=True)[0] if real_to_real is None
              else real_to_real)
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


def mean_background(levels: dict[str, dict[str, float]]) -> float:
    """The variations' mean grey level where the sources are black, over all sources
    (:func:`background_levels`'s per-class means, weighted by their counts)."""
    n = sum(v["n"] for v in levels.values())
    return sum(v["variation"] * v["n"] for v in levels.values() if v["n"]) / max(n, 1)


def balanced_sources(labels: torch.Tensor, index: torch.Tensor, max_sources: int | None,
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
    trained on the same sample (seed 0), whose per-class accuracy on the real
    *validation* split (``classifier_real_val``) is the ceiling to read fidelity against
    and to choose the guidance weight by (``chosen_guidance``, ``guidance_note``: see
    :func:`chosen_guidance`); its accuracy on real test slices (``classifier_real_test``)
    is there for information only and chooses nothing. One row per strength
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
    sources = balanced_sources(data.labels, sample, max_sources, seed)
    src, lab = data.images[sources], data.labels[sources]
    ids = [data.ids[i] for i in sources.tolist()]
    if classifier is None:  # trained once, then found in cache/classifiers/
        classifier, _ = trained_classifier(data, split, sample, device=device)
    classifier = classifier.to(device)
    val = class_fidelity(classifier, data.images[split.val], data.labels[split.val],
                         data.classes)
    test = class_fidelity(classifier, data.images[split.test], data.labels[split.test],
                          data.classes)  # information only: chooses nothing
    rows = []
    for w, s in ((w, s) for w in scales for s in strengths):
        backend = LocalDiffusion(path, strength=s, guidance_scale=w, device=device,
                                 sample_seed=g)
        made, report = generate_cached(backend, src, lab, ids, per_image=1, seed=seed,
                                       progress=progress, batch_size=backend.max_batch)
        variations = made[:, 0]
        fidelity = class_fidelity(classifier, variations, lab, data.classes)
        rows.append({
            "strength": s, "guidance_scale": w, "fidelity": fidelity,
            "balanced_fidelity": _mean(fidelity.values()),
            "background_grey": mean_background(background_levels(src, variations, lab,
                                                                 data.classes)),
            "rms_to_source": float(((variations.float() - src.float()) ** 2)
                                   .flatten(1).mean(1).sqrt().median()),
            "generated": report["generated"], "cached": report["cached"],
            "seconds": report["seconds"], "cache_dir": str(report["dir"])})
    sweep = {"generator": str(path), "real_fraction": real_fraction,
             "generator_index": g, "seed": seed, "n_sources": len(sources),
             "sources_per_class": {name: int((lab == c).sum()) for c, name in enumerate(data.classes)},
             "classifier_real_val": val, "classifier_real_val_balanced": _mean(val.values()),
             "classifier_real_test": test, "classifier_real_test_balanced": _mean(test.values()),
             "chance": 1 / len(data.classes), "strengths": rows}
    return sweep | _guidance_choice(sweep)


def chosen_guidance(sweep: dict, strength: float | None = None) -> float | None:
    """The guidance weight a sweep chooses: the smallest one measured at ``strength``
    (default: the preset's) whose balanced fidelity reaches the classifier's balanced
    accuracy on real validation slices; None when none reaches it (measure larger ones).

    A sweep with no validation ceiling (those made before it, which read the test split)
    raises ValueError: the test split chooses nothing.
    """
    if "classifier_real_val_balanced" not in sweep:
        raise ValueError("this sweep has no validation ceiling (it predates it and read the "
                         "test split, which must choose nothing); rerun `synth sweep` to "
                         "choose a guidance weight")
    strength = float(_generator_settings()["strength"]) if strength is None else float(strength)
    rows = _rows_at(sweep, strength)
    if not rows:
        raise ValueError(f"the sweep has no rows at strength {strength:g} (it has "
                         f"{sorted({r['strength'] for r in sweep['strengths']})}); pass one "
                         f"of those or sweep that strength")
    ceiling = sweep["classifier_real_val_balanced"]
    reached = [w for w, r in rows.items() if r["balanced_fidelity"] >= ceiling]
    return min(reached) if reached else None


def _guidance_choice(sweep: dict) -> dict:
    """``chosen_guidance`` (None where the rule chooses nothing) and a line saying why."""
    strength = float(_generator_settings()["strength"])
    rows = _rows_at(sweep, strength)
    if not rows:
        return {"chosen_guidance": None,
                "guidance_note": f"no guidance weight chosen: no rows at the default strength "
                                 f"{strength:g}"}
    w = chosen_guidance(sweep, strength)
    ceiling = sweep["classifier_real_val_balanced"]
    measured = ", ".join(f"{v:g}" for v in sorted(rows))
    if w is not None:
        note = (f"guidance {w:g} chosen: the smallest weight measured at strength {strength:g} "
                f"({measured}) whose balanced fidelity ({rows[w]['balanced_fidelity']:.2f}) "
                f"reaches the classifier's balanced accuracy on real validation slices "
                f"({ceiling:.2f})")
    else:
        best = max(rows, key=lambda v: rows[v]["balanced_fidelity"])
        note = (f"no guidance weight chosen: none measured at strength {strength:g} "
                f"({measured}) reaches the classifier's balanced accuracy on real validation "
                f"slices ({ceiling:.2f}; best {rows[best]['balanced_fidelity']:.2f} at "
                f"{best:g}); sweep larger weights before changing the default")
    return {"chosen_guidance": w, "guidance_note": note}


def _rows_at(sweep: dict, strength: float) -> dict[float, dict]:
    """The sweep's rows at ``strength``, by guidance weight (1 for sweeps made before it)."""
    return {float(r.get("guidance_scale", 1.0)): r for r in sweep["strengths"]
            if abs(r["strength"] - strength) < 1e-9}


def _generator_settings() -> dict:
    """The generator's settings in force (its default strength and guidance weight)."""
    from . import diffusion

    return settings(diffusion.DEFAULTS, diffusion.PRESETS)


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


def shortcut_check(real: torch.Tensor, variations: torch.Tensor, labels: torch.Tensor, classes,
                   seed: int = 0, groups: torch.Tensor | None = None, device=None,
                   train: dict | None = None, **overrides) -> dict:
    """Can a basic CNN tell ``variations`` (1) from their ``real`` sources (0) on sources
    it never saw? Held-out accuracy, overall and per diagnosis class, and a reading.

    ``real`` uint8 [N, 1, H, W] with diagnosis ``labels`` [N]; ``variations`` [N, 1, H, W]
    or [N, V, 1, H, W], V per source. The sources are dealt into ``folds`` by class (whole
    ``groups``, e.g. brains, where given, so no neighbouring slice is trained on either);
    fold k's sources and their variations are held out from the model that scores them,
    the engine's basic CNN with its defaults (``train``: overrides of
    :data:`mrilib.train.DEFAULTS`) trained on the other folds with seed ``seed + k``. Its
    final epoch scores them: the engine's validation slot holds the held-out fold too, and
    nothing is chosen on it. ``accuracy`` is balanced (real and synthetic weigh alike,
    chance 0.5); ``chance_upper`` is what a coin stays under 97.5% of the time on as many
    held-out images; ``verdict`` is "near chance", "above chance" or "high" (at or above
    ``high``). ``overrides``: :data:`DEFAULTS` keys.
    """
    cfg = _shortcut_settings(**overrides)
    folds_by = "source" if groups is None else "group"
    real, variations, labels, groups = _checked_shortcut_inputs(real, variations, labels,
                                                                groups)
    keep = balanced_sources(labels, torch.arange(len(labels)), cfg["max_sources"], seed)
    real, variations, labels, groups = real[keep], variations[keep], labels[keep], groups[keep]
    fold = _source_folds(labels, groups, cfg["folds"], seed)
    v = variations.shape[1]
    bank = torch.cat([real, variations.flatten(0, 1)])
    synthetic = torch.cat([torch.zeros(len(real)), torch.ones(len(real) * v)]).long()
    row_fold, row_class = torch.cat([fold, fold.repeat_interleave(v)]), \
        torch.cat([labels, labels.repeat_interleave(v)])
    said, epochs = _held_out_predictions(bank, synthetic, row_fold, cfg["folds"], seed,
                                         device, {"epochs": cfg["epochs"], **(train or {})})
    right = said == synthetic
    overall = _split_accuracy(right, synthetic)
    per_class = {name: {**_split_accuracy(right[row_class == c], synthetic[row_class == c]),
                        "n_sources": int((labels == c).sum())}
                 for c, name in enumerate(classes) if (labels == c).any()}
    result = {**overall, "chance": 0.5, "high": cfg["high"], "per_class": per_class,
              "n_sources": len(real), "variations_per_source": v, "folds": cfg["folds"],
              "folds_by": folds_by,
              "seeds": [seed + k for k in range(cfg["folds"])], "model": "basic_cnn",
              "epochs": epochs, "img_size": int(real.shape[-1])}
    result["verdict"] = _shortcut_verdict(result)
    for row in per_class.values():
        row["verdict"] = _shortcut_verdict({**row, "high": cfg["high"]})
    return result | {"reading": shortcut_reading(result)}


def shortcut_reading(check: dict) -> str:
    """What :func:`shortcut_check`'s numbers say, in a few plain sentences."""
    acc, upper = check["accuracy"], check["chance_upper"]
    said = (f"On sources it never saw, a basic CNN tells variations from real slices "
            f"{acc:.0%} of the time (balanced; chance 50%, a coin stays under {upper:.0%} on "
            f"as many images).")
    if check["verdict"] == "near chance":
        return (said + " That is within chance: this basic CNN found no cue that says "
                "'synthetic', so the ModerateDemented-only row is not explained by one "
                "(a larger model might still find one).")
    strength = "easily" if check["verdict"] == "high" else "partly"
    return (said + f" 'Synthetic' is a feature a classifier can {strength} learn. Where "
            "synthetic images go to one class only (the thesis's ModerateDemented-only row), "
            "'synthetic' then predicts 'Moderate': that row may measure the shortcut rather "
            "than better Moderate features.")


def generator_shortcut_check(data, split, real_fraction: float, g: int, seed: int = 0,
                             device=None, progress: bool = True, **overrides) -> dict:
    """:func:`shortcut_check` of generator g's variations of its own training sample, drawn
    (and cached) at the preset's strength and guidance weight, as the grid draws them.

    Folds hold whole recovered brains where the data reveals them (else single slices);
    ``max_sources`` (a :data:`DEFAULTS` key) picks that many in equal shares per class.
    """
    from ..data import DataError
    from ..subjects import subject_ids
    from .cache import generate_cached
    from .diffusion import LocalDiffusion, generator_path
    from .mixing import real_sample

    cfg = _shortcut_settings(**overrides)  # bad settings fail before any sampling
    path = generator_path(data, split, real_fraction, g)
    backend = LocalDiffusion(path, device=device, sample_seed=g)
    sources = balanced_sources(data.labels, real_sample(data, split, real_fraction, g),
                                cfg["max_sources"], seed)
    made, report = generate_cached(backend, data.images[sources], data.labels[sources],
                                   [data.ids[i] for i in sources.tolist()], per_image=1,
                                   seed=seed, progress=progress, batch_size=backend.max_batch)
    try:
        brains = data.subjects if data.subjects is not None else subject_ids(data)
        groups = torch.as_tensor(brains)[sources]
    except DataError:  # no brains to recover: folds of single slices
        groups = None
    check = shortcut_check(data.images[sources], made, data.labels[sources], data.classes,
                           seed=seed, groups=groups, device=device,
                           **{**overrides, "max_sources": None})
    return {"generator": str(path), "real_fraction": real_fraction, "generator_index": g,
            "seed": seed, "strength": backend.strength, "guidance_scale": backend.guidance_scale,
            "generated": report["generated"], "cached": report["cached"], **check,
            "folds_by": "source" if groups is None else "brain"}


def _shortcut_settings(**overrides) -> dict:
    """The shortcut check's settings in force; ValueError for a count it cannot use."""
    cfg = settings(DEFAULTS, PRESETS, **overrides)
    if cfg["folds"] < 2:
        raise ValueError(f"folds={cfg['folds']}: give at least 2 (each fold is held out once)")
    if cfg["max_sources"] is not None and cfg["max_sources"] < cfg["folds"]:
        raise ValueError(f"max_sources={cfg['max_sources']}: give at least one source per "
                         f"fold ({cfg['folds']}), or None for all of them")
    return cfg


def _checked_shortcut_inputs(real, variations, labels, groups):
    """(real, variations [N, V, 1, H, W], labels, groups) checked; ValueError saying what is off."""
    if variations.dim() == real.dim():
        variations = variations[:, None]
    if real.dim() != 4 or variations.shape[0] != len(real) or variations.shape[2:] != real.shape[1:]:
        raise ValueError(f"variations {tuple(variations.shape)} do not line up with real "
                         f"{tuple(real.shape)}; give [N, 1, H, W] sources and one (or V) "
                         f"variations per source of the same size")
    if len(labels) != len(real):
        raise ValueError(f"{len(labels)} labels for {len(real)} sources; give one per source")
    groups = torch.arange(len(real)) if groups is None else torch.as_tensor(groups).long()
    if len(groups) != len(real):
        raise ValueError(f"{len(groups)} groups for {len(real)} sources; give one per source")
    return real, variations, labels, groups


def _source_folds(labels: torch.Tensor, groups: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """[N] the fold of each source: whole groups, each class's spread evenly over the folds.

    Groups are dealt in a seeded order, class by class, each to the fold that holds fewest
    of its class (then fewest sources): a held-out fold never shares a group with training.
    """
    units = groups.unique()
    if len(units) < folds:
        raise ValueError(f"{len(units)} sources (or groups) for {folds} folds: give at least "
                         f"one per fold, or fewer folds")
    rng = torch.Generator().manual_seed(seed)
    unit_class = torch.stack([labels[groups == u].min() for u in units])
    fold = torch.empty(len(labels), dtype=torch.long)
    size = [0] * folds
    for c in unit_class.unique().tolist():
        mine, of_class = units[unit_class == c], [0] * folds
        for u in mine[torch.randperm(len(mine), generator=rng)].tolist():
            k = min(range(folds), key=lambda j: (of_class[j], size[j], j))
            members = groups == u
            fold[members] = k
            of_class[k] += int(members.sum())
            size[k] += int(members.sum())
    return fold


def _held_out_predictions(bank, synthetic, row_fold, folds, seed, device, train) -> tuple:
    """(what each row's held-out model says, 0 real / 1 synthetic; the epochs trained)."""
    from ..device import resolve_device
    from ..models import build_model
    from ..train import train_replicates

    said = torch.empty_like(synthetic)
    for k in range(folds):
        out = row_fold == k
        held = (bank[out], synthetic[out])
        (record,), ((state, _),) = train_replicates(
            "basic_cnn", bank, synthetic, (~out).nonzero()[:, 0][None], held, held,
            seeds=[seed + k], device=device, return_models=True,
            **{"num_classes": 2, "test_every_epoch": False, **train, "patience": "off"})
        model = build_model("basic_cnn", num_classes=2, img_size=int(bank.shape[-1]))
        model.load_state_dict(state)
        said[out] = predictions(model.to(resolve_device(device)), bank[out]).argmax(1)
    return said, record["epochs"]


def _split_accuracy(right: torch.Tensor, synthetic: torch.Tensor) -> dict:
    """Accuracy on real rows, on synthetic rows, their mean (balanced) and a coin's 97.5% point."""
    n_real, n_syn = int((synthetic == 0).sum()), int((synthetic == 1).sum())
    real = float(right[synthetic == 0].float().mean()) if n_real else float("nan")
    syn = float(right[synthetic == 1].float().mean()) if n_syn else float("nan")
    # a coin scores each half with variance 1/4n: the balanced mean's sd is half their root sum
    upper = 0.5 + 1.96 * 0.5 * (0.25 / max(n_real, 1) + 0.25 / max(n_syn, 1)) ** 0.5
    return {"accuracy": _mean([real, syn]), "real": real, "synthetic": syn,
            "n_real": n_real, "n_synthetic": n_syn, "chance_upper": min(upper, 1.0)}


def _shortcut_verdict(check: dict) -> str:
    if not check["accuracy"] > check["chance_upper"]:  # NaN reads as near chance
        return "near chance"
    return "high" if check["accuracy"] >= check["high"] else "above chance"


def _checked_sweep(strengths, guidance_scales, max_sources, classes) -> tuple[list, list]:
    """(strengths, guidance weights) of a sweep as floats, the weight in force by default."""
    strengths = [float(s) for s in strengths]
    bad = [s for s in strengths if not 0.0 < s <= 1.0]
    if bad or not strengths:
        raise ValueError(f"strengths {strengths}: give noise levels in (0, 1], e.g. 0.4,0.6,0.8")
    if guidance_scales is None:
        guidance_scales = [_generator_settings()["guidance_scale"]]
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
