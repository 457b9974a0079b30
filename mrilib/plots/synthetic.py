"""Chapter 2 / thesis chapter 2.2: what the generator makes, and whether it copies."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from .data import _maybe_save


def _note(fig, note: str | None):
    if note:
        fig.text(0.5, -0.02, note, ha="center", va="top", fontsize=8, color="firebrick", wrap=True)


def variations_figure(sources: torch.Tensor, labels: torch.Tensor, by_strength: dict,
                      classes, note: str | None = None, save: str | None = None):
    """Thesis Figure 2.2: each source slice next to its variations at each strength.

    ``by_strength`` maps a strength (0 = the source, 1 = a fresh sample of the class) to
    uint8 variations ``[B, n, 1, H, W]`` of ``sources`` ``[B, 1, H, W]``.
    """
    strengths = sorted(by_strength)
    n = by_strength[strengths[0]].shape[1]
    cols = 1 + n * len(strengths)
    fig, axes = plt.subplots(len(sources), cols, figsize=(1.5 * cols, 1.6 * len(sources)),
                             squeeze=False)
    for row, (src, lab) in enumerate(zip(sources, labels.tolist())):
        panels = [(src, "source")] + [(by_strength[s][row, k], f"strength {s:g}")
                                      for s in strengths for k in range(n)]
        for col, (img, title) in enumerate(panels):
            axes[row, col].imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
            axes[row, col].set_xticks([]), axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(title, fontsize=8)
        axes[row, 0].set_ylabel(classes[lab].replace("_", " "), fontsize=8)
    fig.suptitle("Real slices and their synthetic variations")
    fig.tight_layout()
    _note(fig, note)
    return _maybe_save(fig, save)


def memorization_figure(distances: dict, synthetic: torch.Tensor, real_train: torch.Tensor,
                        pairs: int = 4, note: str | None = None, save: str | None = None):
    """Nearest-real distances of synthetic images vs real-to-real, and the closest pairs."""
    synthetic = synthetic.reshape(-1, *synthetic.shape[-3:])
    syn_d = distances["synthetic_to_real"]
    fig = plt.figure(figsize=(10, 4.2))
    grid = fig.add_gridspec(2, 1 + pairs, width_ratios=[3] + [1] * pairs)
    ax = fig.add_subplot(grid[:, 0])
    bins = np.linspace(0, float(max(syn_d.max(), distances["real_to_real"].max())), 50)
    ax.hist(distances["real_to_real"].numpy(), bins=bins, alpha=0.6, density=True,
            label="real train to nearest other real")
    ax.hist(syn_d.numpy(), bins=bins, alpha=0.6, density=True, label="synthetic to nearest real train")
    ax.set_xlabel("RMS distance on 32x32 thumbnails (gray levels)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title("Memorization check: lower than real-to-real = copying")
    for j, i in enumerate(torch.argsort(syn_d)[:pairs].tolist()):
        for row, img in enumerate((synthetic[i], real_train[distances["synthetic_nn_index"][i]])):
            a = fig.add_subplot(grid[row, 1 + j])
            a.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
            a.set_xticks([]), a.set_yticks([])
            a.set_title(f"synthetic\nd={syn_d[i]:.1f}" if row == 0 else "nearest real", fontsize=7)
    fig.tight_layout()
    _note(fig, note)
    return _maybe_save(fig, save)


def class_fidelity_figure(fidelity: dict[str, dict[str, float]], note: str | None = None,
                          save: str | None = None):
    """Accuracy per class of a real-only classifier on each image set (e.g. real test, synthetic)."""
    sets = list(fidelity)
    classes = list(fidelity[sets[0]])
    x = np.arange(len(classes))
    width = 0.8 / len(sets)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for j, name in enumerate(sets):
        bars = ax.bar(x + j * width, [fidelity[name][c] for c in classes], width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1 / len(classes), color="k", ls="--", lw=1, label="chance")
    ax.set_xticks(x + width * (len(sets) - 1) / 2, [c.replace("_", "\n") for c in classes], fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy of a real-only classifier")
    ax.set_title("Class fidelity: do variations keep their source's class?")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _note(fig, note)
    return _maybe_save(fig, save)


def _ceiling(sweep: dict) -> tuple[dict, float, str]:
    """(per class, balanced, which slices) the classifier scored on real slices: validation,
    or the test split for sweeps made before the validation ceiling."""
    split = "val" if "classifier_real_val" in sweep else "test"
    return (sweep[f"classifier_real_{split}"], sweep.get(f"classifier_real_{split}_balanced",
                                                         float("nan")),
            "real validation slices" if split == "val" else "real test slices (an old sweep)")


def strength_sweep_figure(sweep: dict, note: str | None = None, save: str | None = None):
    """Class fidelity per class against SDEdit strength (one panel per guidance weight),
    and distance from the source and background (last panel), from
    :func:`mrilib.synthetic.quality.strength_sweep`. Dotted: the classifier on real
    validation slices (test slices in sweeps made before that), per class and balanced."""
    ceiling, balanced, where = _ceiling(sweep)
    by_scale: dict[float, list] = {}
    for r in sweep["strengths"]:  # sweeps made before guidance existed ran at 1
        by_scale.setdefault(r.get("guidance_scale", 1.0), []).append(r)
    if len(by_scale) > 1 and len({r["strength"] for r in sweep["strengths"]}) == 1:
        return _guidance_figure(sweep, note, save)
    fig, axes = plt.subplots(1, len(by_scale) + 1, figsize=(5 * (len(by_scale) + 1), 3.6),
                             squeeze=False)
    for left, (w, rows) in zip(axes[0], by_scale.items()):
        s = [r["strength"] for r in rows]
        for name in ceiling:
            line, = left.plot(s, [r["fidelity"][name] for r in rows], "o-",
                              label=name.replace("_", " "))
            # the classifier's accuracy on real slices of the class: the ceiling
            left.axhline(ceiling[name], color=line.get_color(), ls=":", lw=1)
        left.plot(s, [r["balanced_fidelity"] for r in rows], "k.-", lw=2,
                  label="balanced (mean)")
        left.axhline(balanced, color="k", ls=":", lw=1.5)
        left.axhline(sweep["chance"], color="k", ls="--", lw=1, label="chance")
        guidance = "no guidance" if w == 1 else f"guidance {w:g}"
        left.set(xlabel="strength (0 = the source, 1 = a fresh sample)", ylim=(0, 1.05),
                 ylabel="real-only classifier's accuracy",
                 title=f"Class fidelity, {guidance}\n({sweep['n_sources']} sources; "
                       f"dotted: {where})")
        left.legend(fontsize=7)
    right = axes[0, -1]
    for w, rows in by_scale.items():
        s = [r["strength"] for r in rows]
        tag = "" if len(by_scale) == 1 else f", guidance {w:g}"
        right.plot(s, [r["rms_to_source"] for r in rows], "o-",
                   label=f"median RMS to its source{tag}")
        right.plot(s, [r["background_grey"] for r in rows], "s--",
                   label=f"mean grey where the source is black{tag}")
    right.set(xlabel="strength", ylabel="gray levels (0-255)",
              title="How far variations move from their source")
    right.legend(fontsize=7)
    fig.tight_layout()
    _note(fig, note)
    return _maybe_save(fig, save)


def _guidance_figure(sweep: dict, note: str | None, save: str | None):
    """Class fidelity, distance and background against the guidance weight, one strength;
    the weight the sweep chose (on validation) marked, where it chose one."""
    ceiling, balanced, where = _ceiling(sweep)
    rows = sorted(sweep["strengths"], key=lambda r: r.get("guidance_scale", 1.0))
    w = [r.get("guidance_scale", 1.0) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in ceiling:
        line, = left.plot(w, [r["fidelity"][name] for r in rows], "o-",
                          label=name.replace("_", " "))
        left.axhline(ceiling[name], color=line.get_color(), ls=":", lw=1)
    left.plot(w, [r["balanced_fidelity"] for r in rows], "k.-", lw=2, label="balanced (mean)")
    left.axhline(balanced, color="k", ls=":", lw=1.5)
    left.axhline(sweep["chance"], color="k", ls="--", lw=1, label="chance")
    if sweep.get("chosen_guidance") is not None:
        left.axvline(sweep["chosen_guidance"], color="0.5", lw=4, alpha=0.3,
                     label=f"chosen on validation: {sweep['chosen_guidance']:g}")
    left.set(xlabel="guidance weight (1 = none)", ylim=(0, 1.05), xticks=w,
             ylabel="real-only classifier's accuracy",
             title=f"Class fidelity at strength {rows[0]['strength']:g}\n"
                   f"({sweep['n_sources']} sources; dotted: {where})")
    left.legend(fontsize=7)
    right.plot(w, [r["rms_to_source"] for r in rows], "o-", label="median RMS to its source")
    right.plot(w, [r["background_grey"] for r in rows], "s-",
               label="mean grey where the source is black")
    right.set(xlabel="guidance weight", ylabel="gray levels (0-255)", xticks=w,
              title="How far variations move from their source")
    right.legend(fontsize=7)
    fig.tight_layout()
    _note(fig, note)
    return _maybe_save(fig, save)


def shortcut_figure(check: dict, note: str | None = None, save: str | None = None):
    """Held-out accuracy of a basic CNN telling variations from real slices, overall and
    per class, against chance and a coin's 97.5% point, from
    :func:`mrilib.synthetic.quality.shortcut_check`."""
    rows = {"all classes": check, **check["per_class"]}
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8.5, 3.4))
    ax.bar(x, [r["accuracy"] for r in rows.values()], 0.6, color="0.75",
           label="balanced (real and synthetic alike)")
    for j, r in enumerate(rows.values()):  # inside the bar's foot, clear of the markers
        ax.text(j, 0.03, f"{r['accuracy']:.2f}\n{r['n_sources']} sources", ha="center",
                va="bottom", fontsize=7)
    ax.plot(x, [r["real"] for r in rows.values()], "o", color="tab:blue", label="real called real")
    ax.plot(x, [r["synthetic"] for r in rows.values()], "s", color="tab:orange",
            label="variation called synthetic")
    ax.plot(x, [r["chance_upper"] for r in rows.values()], "k_", ms=22, mew=1.5,
            label="a coin stays under (97.5%)")
    ax.axhline(check["chance"], color="k", ls="--", lw=1, label="chance")
    ax.axhline(check["high"], color="firebrick", ls=":", lw=1, label="high")
    ax.set_xticks(x, [n.replace("_", "\n") for n in rows], fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"Shortcut check: real or synthetic? ({check['verdict']}; "
                 f"{check['folds']} folds by {check['folds_by']})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    _note(fig, note)
    return _maybe_save(fig, save)
