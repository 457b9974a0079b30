"""How fast the local generator trains and samples, and what each speed lever buys.

:func:`benchmark` times one set of settings: training images/s (the hot loop alone) and
variations/s at one or more guidance weights, on random 128x128 slices (speed does not
depend on content). :func:`bench_levers` times the settings in force and each named
lever beside them, one after another in one process on one device, so that its rows
compare like with like. A lever is a set of overrides of the generator's settings
(:func:`lever_overrides`); whether it changes results is read from the one declaration of
what does (``RUN_ONLY``), through the generator's design (:func:`changes_results`).
A lever that does (``batchKx``) makes another generator, kept only if :func:`lever_quality`
finds it no worse than the default one on the same sources.
"""
from __future__ import annotations

import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import diffusers
import torch

from ..config import hash8, settings
from ..data import CLASSES
from ..device import device_name, resolve_device, sync
from .base import SIZE
from .diffusion import LocalDiffusion, train_generator, training_record
from .diffusion_model import DEFAULTS, PRESETS, design_settings, weights_settings

# The settings that change how fast, not what: each row records them.
SPEED_SETTINGS = ("channels_last", "cudnn_benchmark", "compile_train", "compile_sample",
                  "sample_batch")


def larger_batch(cfg: Mapping, k: int) -> dict:
    """k times the batch at the same number of images seen: steps and warmup divided by k,
    the learning rate times sqrt(k) (Adam's square-root rule: Malladi et al. 2022)."""
    return {"batch_size": cfg["batch_size"] * k, "steps": max(1, round(cfg["steps"] / k)),
            "warmup_steps": round(cfg["warmup_steps"] / k), "lr": cfg["lr"] * math.sqrt(k)}


# Levers by name: their overrides of the settings in force. Guidance already runs its two
# passes as one batch, and AdamW is already fused on CUDA: neither is a lever here.
FIXED_LEVERS = {
    "default": {},
    "compile": {"compile_train": True, "compile_sample": True},
    "channels_last": {"channels_last": True},
    "autotune": {"cudnn_benchmark": True},
}
# Levers with a whole factor K, spelled NAMEKx (batch4x: four times the preset's batch).
FACTOR_LEVERS = {
    "batch": larger_batch,
    "samplebatch": lambda cfg, k: {"sample_batch": cfg["sample_batch"] * k},
}
_FACTOR = re.compile(r"(?P<name>[a-z_]+?)(?P<k>[1-9][0-9]*)x")


def lever_overrides(name: str, cfg: Mapping | None = None) -> dict:
    """The settings lever ``name`` changes, against ``cfg`` (default: the settings in force).

    A name is one of :data:`FIXED_LEVERS`, ``batchKx`` or ``samplebatchKx``, or several
    joined by ``+`` (``compile+batch4x``).
    """
    cfg = settings(DEFAULTS, PRESETS) if cfg is None else cfg
    out: dict = {}
    for part in name.split("+"):
        found = _FACTOR.fullmatch(part)
        if part in FIXED_LEVERS:
            out |= FIXED_LEVERS[part]
        elif found and found["name"] in FACTOR_LEVERS:
            out |= FACTOR_LEVERS[found["name"]](cfg, int(found["k"]))
        else:
            raise ValueError(f"lever {part!r}: use {', '.join(FIXED_LEVERS)}, batchKx or "
                             f"samplebatchKx (K a whole factor, e.g. batch4x), or several "
                             f"joined by + (compile+batch4x)")
    return out


def changes_results(overrides: Mapping) -> bool:
    """Whether settings ``overrides`` change the generator's design (and so its results)."""
    return design_settings(**overrides) != design_settings()


# ----------------------------------------------------------------------------- timing

def benchmark(device: str | torch.device | None = None, n_train_steps: int = 50,
              n_variations: int = 1000, guidance_scales: Sequence[float] | None = None,
              **overrides) -> dict:
    """Training images/s and variations/s of the settings in force, on random 128x128 slices.

    Warm-up calls come first (CUDA context, kernel choice, compiles) and are timed apart;
    the training time is that of the hot loop alone (no checkpoint writes). Variations are
    timed at each of ``guidance_scales`` (default: the preset's weight); the top-level
    ``variations_per_s`` is the first one's.
    """
    device = resolve_device(device)
    cfg = settings(DEFAULTS, PRESETS, **overrides)
    scales = [cfg["guidance_scale"]] if guidance_scales is None else list(guidance_scales)
    images, labels, ids = _random_slices(max(cfg["batch_size"], 64))
    with tempfile.TemporaryDirectory() as tmp:
        trained = _train_speed(images, labels, ids, tmp, device, n_train_steps, overrides)
        sampled = [_sample_speed(tmp, images, labels, device, n_variations, cfg, w)
                   for w in scales]
    return {"device": device_name(device), "torch": str(torch.__version__),
            "diffusers": diffusers.__version__,
            "train_images_per_s": trained["steps_per_s"] * cfg["batch_size"],
            "train_steps_per_s": trained["steps_per_s"],
            "train_warmup_seconds": trained["warmup_seconds"],
            "train_peak_gib": trained["peak_gib"],
            "minutes_for_default_steps": cfg["steps"] / trained["steps_per_s"] / 60,
            "variations_per_s": sampled[0]["variations_per_s"],
            "seconds_per_1000_variations": sampled[0]["seconds_per_1000_variations"],
            "strength": cfg["strength"], "ddim_steps": cfg["ddim_steps"],
            "guidance_scale": sampled[0]["guidance_scale"],
            "guidance_rescale": cfg["guidance_rescale"], "sampling": sampled,
            "settings": weights_settings(cfg) | {"steps": cfg["steps"]},
            "speed_settings": {k: cfg[k] for k in SPEED_SETTINGS}}


def _random_slices(n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    rng = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, SIZE, SIZE), dtype=torch.uint8, generator=rng)
    return images, torch.arange(n) % len(CLASSES), [f"bench{i}" for i in range(n)]


def _train_speed(images, labels, ids, folder, device, n_steps: int, overrides: Mapping) -> dict:
    """A 2-step warm-up call, then ``n_steps`` more resumed from it and timed."""
    overrides = {k: v for k, v in overrides.items() if k != "steps"}  # the calls set steps
    _peak_gib(device)
    calls = []
    for total in (2, 2 + n_steps):
        train_generator(images, labels, 0, folder, steps=total, ids=ids, device=device,
                        progress=False, **overrides)
        calls.append(json.loads((Path(folder) / "meta.json").read_text())["last_call"])
    warm, timed = calls
    return {"steps_per_s": timed["steps"] / timed["loop_seconds"],
            "warmup_seconds": warm["loop_seconds"], "peak_gib": _peak_gib(device)}


def _sample_speed(folder, images, labels, device, n: int, cfg: Mapping, scale: float) -> dict:
    """Variations/s at guidance weight ``scale``, after a warm-up on each batch shape."""
    backend = LocalDiffusion(folder, device=device, allow_unfinished=True, guidance_scale=scale,
                             **{k: cfg[k] for k in ("strength", "ddim_steps", "guidance_rescale",
                                                    "sample_batch", "compile_sample")})
    pick = torch.arange(n) % len(images)
    src, lab = images[pick], labels[pick]
    start = time.perf_counter()
    for size in {min(n, backend.max_batch), n % backend.max_batch} - {0}:
        backend.generate(src[:size], lab[:size], list(range(size)))  # a compile per shape
    sync(device)
    warm_s, start = time.perf_counter() - start, time.perf_counter()
    backend.generate(src, lab, list(range(n)))
    sync(device)
    seconds = time.perf_counter() - start
    return {"guidance_scale": backend.guidance_scale, "variations_per_s": n / seconds,
            "seconds_per_1000_variations": 1000 * seconds / n, "warmup_seconds": warm_s,
            "peak_gib": _peak_gib(device)}


def _peak_gib(device: torch.device) -> float | None:
    """GPU memory peak since the last call (GiB), then reset; None on a CPU."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


# ----------------------------------------------------------------------------- levers

def bench_levers(levers: Sequence[str], device: str | torch.device | None = None,
                 n_train_steps: int = 50, n_variations: int = 1000,
                 guidance_scales: Sequence[float] = (1.0, 4.0), on_row=None) -> dict:
    """The settings in force ("default", first) and each lever, timed one after another here.

    One row per lever: its overrides, whether they change results (and the design hash),
    :func:`benchmark`'s numbers and the speedups against the default row. Every name is
    checked before anything is timed. Sample quality is not measured here: a lever that
    changes results is judged by ``synth lever-quality`` (:func:`lever_quality`).
    ``on_row(result)`` is called with the rows so far after each one, so that a run cut
    off by a time limit keeps what it measured.
    """
    device = resolve_device(device)
    plans = [(name, lever_overrides(name)) for name in ("default", *levers)]
    out = {"device": device_name(device), "torch": str(torch.__version__),
           "diffusers": diffusers.__version__, "train_steps": n_train_steps,
           "variations": n_variations, "guidance_scales": list(guidance_scales), "rows": []}
    for name, overrides in plans:
        result = benchmark(device, n_train_steps, n_variations, guidance_scales, **overrides)
        out["rows"].append(_lever_row(name, overrides, result, out["rows"][:1]))
        if on_row is not None:
            on_row(out)
    return out


def _lever_row(name: str, overrides: Mapping, result: Mapping, base: list) -> dict:
    """One lever's row: what it sets, whether that changes results, its speeds and
    speedups against ``base`` (the default's row; none for the default itself)."""
    row = {"lever": name, "overrides": dict(overrides),
           "changes_results": changes_results(overrides),
           "design": hash8(design_settings(**overrides)),
           **{k: v for k, v in result.items() if k not in ("device", "torch", "diffusers")}}
    ref = base[0] if base else row
    row["train_speedup"] = row["train_images_per_s"] / ref["train_images_per_s"]
    row["sampling_speedup"] = {f"{s['guidance_scale']:g}": s["variations_per_s"] /
                               r["variations_per_s"]
                               for s, r in zip(row["sampling"], ref["sampling"])}
    return row


def levers_table(result: dict) -> str:
    """The rows of :func:`bench_levers` as a text table, one line per lever."""
    scales = [f"{w:g}" for w in result["guidance_scales"]]
    head = (f"{'lever':<24} {'changes':>7} {'train img/s':>11} {'x':>5} {'warm s':>6}"
            + "".join(f" {'var/s w=' + w:>10} {'x':>5}" for w in scales))
    lines = [head]
    for row in result["rows"]:
        cells = "".join(f" {s['variations_per_s']:>10.1f} {row['sampling_speedup'][w]:>5.2f}"
                        for s, w in zip(row["sampling"], scales))
        lines.append(f"{row['lever']:<24} {'yes' if row['changes_results'] else 'no':>7} "
                     f"{row['train_images_per_s']:>11.1f} {row['train_speedup']:>5.2f} "
                     f"{row['train_warmup_seconds']:>6.1f}{cells}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a lever's quality

# When a lever that changes the generator (batchKx) is "no worse": paired 95% intervals
# over the same sources (docs/decisions.md, "A generator lever's quality").
QUALITY = {
    "max_sources": None,     # sources, equal shares per class; None: generator g's whole sample
    # Balanced class fidelity the lever may lose: a quarter of what guidance 2 -> 4 bought on
    # the H100 (0.49 -> 0.70, results/strength_sweep_x0.3_g0_guidance.json).
    "fidelity_margin": 0.05,
    # Share of the median nearest-real distance it may lose (closer to a training image:
    # the memorisation check's direction).
    "distance_margin": 0.05,
    "n_boot": 2000,
    "level": 0.95,
}
QUALITY_PRESETS = {"quick": {"max_sources": 24, "n_boot": 200}}  # CPU tests: the pipeline


def lever_quality(data, split, real_fraction: float, g: int, lever: str, seed: int = 0,
                  device=None, progress: bool = True, **overrides) -> dict:
    """Generator g trained as the settings in force say and as ``lever`` changes them, each
    asked for one variation of the same sources (the same seeds, the default strength and
    guidance weight), judged by the same real-only classifier and nearest-real distances.

    Both generators must be trained (``synth train --seed g [--lever NAME]``); variations
    are cached, so a cut-off call resumes. Per generator: class fidelity per class and
    balanced, the median distance of a variation to its nearest real training image and
    the share closer than any two real images are, grey background; then the lever minus
    the default with paired bootstrap intervals over sources (resampled within class) and a
    verdict per check and overall: "no worse", "worse" or "not resolved" (:data:`QUALITY`).
    """
    from ..device import resolve_device
    from ..train import trained_classifier
    from .cache import generate_cached
    from .diffusion import generator_path
    from .mixing import real_sample
    from .quality import (background_levels, balanced_sources, mean_background,
                          memorization_distances, predictions)

    q = settings(QUALITY, QUALITY_PRESETS, **overrides)
    changed = checked_quality_lever(lever)
    device = resolve_device(device)
    paths = {"default": generator_path(data, split, real_fraction, g)}
    try:
        paths[lever] = generator_path(data, split, real_fraction, g, **changed)
    except FileNotFoundError as e:  # its message names the default's command
        raise FileNotFoundError(f"{e} -- with `--lever {lever}` added, for the lever's "
                                f"generator") from None
    sample = real_sample(data, split, real_fraction, g)
    sources = balanced_sources(data.labels, sample, q["max_sources"], seed)
    src, lab = data.images[sources], data.labels[sources]
    ids = [data.ids[i] for i in sources.tolist()]
    classifier, _ = trained_classifier(data, split, sample, device=device)
    classifier = classifier.to(device)
    per_source, rows, real_to_real = {}, {}, None
    for name, path in paths.items():
        backend = LocalDiffusion(path, device=device, sample_seed=g)
        made, report = generate_cached(backend, src, lab, ids, per_image=1, seed=seed,
                                       progress=progress, batch_size=backend.max_batch)
        variations = made[:, 0]
        right = (predictions(classifier, variations).argmax(1) == lab).float()
        near = memorization_distances(variations, data.images[sample], real_to_real)
        real_to_real = near["real_to_real"]  # the same sample for both generators
        per_source[name] = {"right": right, "distance": near["synthetic_to_real"].float()}
        grey = background_levels(src, variations, lab, data.classes)
        rows[name] = {
            "generator": str(path), "settings": changed if name == lever else {},
            "train_minutes": training_record(path)["elapsed_s"] / 60,
            "fidelity": {c: float(right[lab == k].mean()) for k, c in enumerate(data.classes)
                         if (lab == k).any()},
            "balanced_fidelity": float(_balanced(right, lab)),
            "median_nearest_real": float(near["synthetic_to_real"].median()),
            "share_closer_than_real_min": near["share_closer_than_real_min"],
            "background_grey": mean_background(grey), "generated": report["generated"],
            "cached": report["cached"]}
    checks = _lever_checks(per_source["default"], per_source[lever], lab, q, seed)
    return {"lever": lever, "real_fraction": real_fraction, "generator_index": g,
            "seed": seed, "n_sources": len(sources),
            "sources_per_class": {c: int((lab == k).sum()) for k, c in enumerate(data.classes)},
            "strength": backend.strength, "guidance_scale": backend.guidance_scale,
            "margins": {k: q[k] for k in ("fidelity_margin", "distance_margin", "level")},
            "generators": rows, "checks": checks,
            "verdict": _overall(checks[k]["verdict"] for k in checks)}


def checked_quality_lever(lever: str) -> dict:
    """``lever``'s overrides; ValueError if it changes no generator (nothing to judge)."""
    changed = lever_overrides(lever)
    if not changes_results(changed):
        raise ValueError(f"lever {lever!r} changes no generator (the same weights up to "
                         f"rounding); time it with `synth bench --levers {lever}` instead")
    return changed


def _balanced(right: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the classes present of the share ``right`` (per source, 0/1)."""
    present = labels.unique()
    return torch.stack([right[labels == c].mean() for c in present]).mean()


def _lever_checks(default: dict, lever: dict, labels: torch.Tensor, q: Mapping,
                  seed: int) -> dict:
    """Lever minus default, with paired intervals over sources resampled within class:
    balanced fidelity (difference) and median nearest-real distance (ratio)."""
    rng = torch.Generator().manual_seed(seed)
    boot = _stratified_draws(labels, q["n_boot"], rng)  # [n_boot, N] source indices
    fid = [_balanced(lever["right"][i], labels[i]) - _balanced(default["right"][i], labels[i])
           for i in boot]
    ratio = [lever["distance"][i].median() / default["distance"][i].median().clamp(min=1e-9)
             for i in boot]
    tail = (1 - q["level"]) / 2
    out = {}
    for key, point, draws, floor in (
            ("fidelity_difference", _balanced(lever["right"], labels)
             - _balanced(default["right"], labels), fid, -q["fidelity_margin"]),
            ("nearest_real_ratio", lever["distance"].median()
             / default["distance"].median().clamp(min=1e-9), ratio, 1 - q["distance_margin"])):
        low, high = torch.quantile(torch.stack(draws).float(),
                                   torch.tensor([tail, 1 - tail])).tolist()
        verdict = "no worse" if low >= floor else "worse" if high < floor else "not resolved"
        out[key] = {"value": float(point), "low": low, "high": high, "floor": floor,
                    "verdict": verdict}
    return out


def _stratified_draws(labels: torch.Tensor, n_boot: int, rng: torch.Generator) -> torch.Tensor:
    """``n_boot`` resamples of the sources, each class's sources drawn from themselves."""
    parts = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        pick = torch.randint(len(members), (n_boot, len(members)), generator=rng)
        parts.append(members[pick])
    return torch.cat(parts, dim=1)


def _overall(verdicts) -> str:
    verdicts = list(verdicts)
    if "worse" in verdicts:
        return "worse"
    return "no worse" if all(v == "no worse" for v in verdicts) else "not resolved"
