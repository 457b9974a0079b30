"""What a tier of the grid costs in time-limited GPU windows, from a card's committed benchmarks.

A window (``tools/gpu/session.sh window SPLIT G``) trains generator g of one split and
its leaky twin side by side, draws g's guided variations once for every cell of the tier
that uses g, trains those cells' repeats r = g (mod G), and fills what is left with the
split's real-only cells. :func:`tier_cost` adds that up per (split, g) from

- the generator's training minutes and guided variations/s (``synth bench`` and
  ``synth bench --levers`` files; a lever that changes the generator counts only once
  ``synth lever-quality`` found it no worse),
- the basic CNN's seconds per vmap group of 20 replicates (``bench train`` files of the
  grid's design, deterministic kernels: the slowest row with no lever on, and the fastest
  row of any run-only lever, compared per epoch at 30% real; unlike the grid's pacer, no
  safety margin),
- and how many variations each generator draws: :func:`variation_counts`, exact, from
  the mixing code's own plan (no image is made).

A group's seconds scale with its training set's size (never down) and with the epochs
its last replicate trains (:data:`DEFAULTS`); fewer repeats than a group cost a group.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .. import paths
from ..config import settings
from .cells import Cell, grid_cells
from .design import grid_settings, repeat_seeds

DEFAULTS = {
    "tier": 1,
    "window_minutes": 9.5,  # a 15-minute job less the start, the transfers and packing
    # The epoch at which a 30%-real vmap group's last replicate stops (at most 30 epochs,
    # patience 5): the upper ends of the measured curves (docs/decisions.md, "Epochs and
    # early stopping": 12-18 on the slice split, 6-8 on the subject split).
    "group_epochs": {"slice": 18, "subject": 8},
}


# ----------------------------------------------------------------------------- variations

def variation_counts(data, split, cells: list[Cell], g: int, cfg: dict) -> dict[str, int]:
    """Distinct variations generator g (``"sample"``) and its leaky twin (``"leaky"``) draw
    for the repeats of ``cells`` that use them (r = g mod G).

    A variation is keyed by its generator, source, index k and seed
    (:func:`mrilib.synthetic.mixing.mixed_training_set`): a source asked for n variations by
    one cell and m by another costs max(n, m) under one seed, n + m under two.
    """
    from ..synthetic.mixing import class_ids, real_sample, synthetic_plan

    need: dict[str, dict] = {"sample": {}, "leaky": {}}
    for cell in cells:
        if cell.synthetic == "none":
            continue
        n_synth = int(round(cell.synthetic_fraction * len(split.train)))
        for r in range(cfg["repeats"]):
            s = repeat_seeds(r, cfg)
            if s.sample_index != g:
                continue
            real = real_sample(data, split, cell.real_fraction, s.sample_seed)
            sources, per_source = synthetic_plan(data, split, real,
                                                 class_ids(data, cell.synthetic_classes),
                                                 n_synth, s.synth_seed)
            seen = need[cell.leakage]
            for j, n in zip(sources.tolist(), per_source.tolist()):
                seen[j, s.synth_seed] = max(seen.get((j, s.synth_seed), 0), n)
    return {mode: sum(drawn.values()) for mode, drawn in need.items()}


# ----------------------------------------------------------------------------- speeds

def card_speeds(card: str, directory: str | Path | None = None,
                results: str | Path | None = None) -> dict:
    """Per speed source, "default" and "fastest" numbers of the card whose name contains
    ``card`` (case-insensitive): generator minutes, guided variations/s, and the basic
    CNN's seconds per group of its replicates at its real fraction for its epochs.

    ValueError naming what is missing when the card has no generator or classifier row.
    """
    from ..bench import saved_rows

    directory = paths.ROOT / "benchmarks" if directory is None else Path(directory)
    results = paths.ROOT / "results" if results is None else Path(results)
    rows = [r for r in _json_files(directory) if card.lower() in str(r.get("device", "")).lower()]
    names = sorted({r["device"] for r in rows})
    if len(names) > 1:
        raise ValueError(f"--card {card!r} names {len(names)} cards ({', '.join(names)}); give "
                         f"more of one name")
    # the grid's design: the basic CNN, 128 px, 20 at once, deterministic kernels
    classifier = [r for r in saved_rows(directory) if r["device"] in names
                  and r["model"] == "basic_cnn" and r["img_size"] == 128
                  and r["replicates"] == 20 and r["seconds"] > 0 and r["deterministic"]]
    generator = [g for r in rows for g in _generator_rows(r, results)]
    missing = [what for what, found in (("`bench train --model basic_cnn` (20 replicates, "
                                         "128 px)", classifier),
                                        ("`synth bench`", generator)) if not found]
    if missing:
        raise ValueError(f"no {' or '.join(missing)} row for a card named like {card!r} in "
                         f"{directory}; run it on that card (benchmarks/README.md), or pick "
                         f"another --card")
    default_group = max((c for c in classifier if not c["levers"]), default=None,
                        key=_per_epoch)
    plain = [g for g in generator if g["lever"] == "default"]
    return {
        "card": rows[0]["device"],
        "group": {"default": default_group, "fastest": min(classifier, key=_per_epoch)},
        "generator": {"default": max(plain, key=lambda g: g["minutes"], default=None),
                      "fastest": min(generator, key=lambda g: g["minutes"])},
        "sampling": {"default": min((g for g in plain if g["variations_per_s"]), default=None,
                                    key=lambda g: g["variations_per_s"]),
                     "fastest": max((g for g in generator if g["variations_per_s"]),
                                    default=None, key=lambda g: g["variations_per_s"])},
    }


def _per_epoch(group: dict) -> float:
    """A group's seconds per epoch per pool share: rows of other epochs or fractions compare."""
    return group["seconds"] / group["epochs"] / group["real_fraction"]


def _json_files(directory: Path, pattern: str = "*.json") -> list[dict]:
    """The JSON objects of ``directory``'s files matching ``pattern``; unreadable ones skipped."""
    out = []
    for path in sorted(directory.glob(pattern)):
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(row, dict):
            out.append(row | {"file": path.name})
    return out


def _generator_rows(r: dict, results: Path) -> list[dict]:
    """The generator rows of a ``synth bench`` file (one) or a ``--levers`` file (one per
    lever; a lever that changes the generator only with a "no worse" quality verdict)."""
    if "rows" in r:
        rows = [row for row in r["rows"] if not row.get("changes_results")
                or _judged_no_worse(row["lever"], results)]
    elif "minutes_for_default_steps" in r:  # a plain `synth bench`, its speed flags a lever
        on = [k for k, v in r.get("speed_settings", r.get("training_speed_settings", {})).items()
              if v is True]
        rows = [r | {"lever": "+".join(on) or "default"}]
    else:
        return []
    return [{"file": r["file"], "lever": row["lever"],
             "minutes": row["minutes_for_default_steps"], **_guided_rate(row)} for row in rows]


def _guided_rate(row: dict) -> dict:
    """Variations/s at the generator's guidance weight in force; where only unguided
    sampling was timed, half of it (guidance runs the UNet on a doubled batch), marked as
    estimated."""
    from ..synthetic.diffusion_model import DEFAULTS as GENERATOR, PRESETS

    weight = settings(GENERATOR, PRESETS)["guidance_scale"]
    for s in row.get("sampling", []):
        if abs(s["guidance_scale"] - weight) < 1e-9:
            return {"variations_per_s": s["variations_per_s"], "estimated": False}
    unguided = [s["variations_per_s"] for s in row.get("sampling", [])
                if s["guidance_scale"] == 1.0] or [row.get("variations_per_s")]
    if unguided[0] is None or row.get("guidance_scale", 1.0) != 1.0:
        return {"variations_per_s": None, "estimated": False}
    return {"variations_per_s": unguided[0] / 2, "estimated": True}


def _judged_no_worse(lever: str, results: Path) -> bool:
    """Whether every thesis-preset ``synth lever-quality`` file of ``lever`` says "no worse"."""
    checks = [c for c in _json_files(results, f"lever_quality_{lever}_*.json")
              if c.get("preset") == "thesis"]
    return bool(checks) and all(c.get("verdict") == "no worse" for c in checks)


# ----------------------------------------------------------------------------- windows

def tier_cost(data, speeds: dict, preset: str = "thesis", split: str | None = None,
              **overrides) -> dict:
    """Per split (or ``split`` alone) and per speed column ("default", "fastest"): each
    generator's window work (generator, variations, sampling, synthetic cells, in minutes),
    the real-only cells', the windows they need and the GPU-minutes of work in all.
    ``overrides``: of :data:`DEFAULTS` (tier, window_minutes, group_epochs). The cells
    are priced by the basic CNN's rows: a tier with other models is refused."""
    from ..splits import split_mri
    from .sets import grid_data

    c = settings(DEFAULTS, {}, **overrides)
    for column in ("default", "fastest"):
        gen = speeds["generator"][column]
        if gen is None:
            raise ValueError(f"no `synth bench` row without speed flags for {speeds['card']}; "
                             f"run `synth bench --guidance 1,4` on it")
        if gen["minutes"] >= c["window_minutes"]:
            raise ValueError(f"window_minutes={c['window_minutes']:g} cannot hold the "
                             f"generator's {gen['minutes']:.1f} minutes ({gen['file']}); "
                             f"give longer windows")
    narrowed = {} if split is None else {"splits": [split]}
    cfg = grid_settings(preset, tier=c["tier"], **narrowed)
    cells = grid_cells(preset, tier=c["tier"], **narrowed)
    others = sorted({cell.model for cell in cells} - {"basic_cnn"})
    if others:
        raise ValueError(f"tier {c['tier']} has {', '.join(others)} cells, which the basic "
                         f"CNN's rows cannot price; ask for tier 1")
    data = grid_data(data, cfg, any(cell.split == "subject" for cell in cells))
    out = {"tier": c["tier"], "window_minutes": c["window_minutes"],
           "repeats": cfg["repeats"], "splits": {}}
    for kind in sorted({cell.split for cell in cells}):
        parts = split_mri(data, kind)
        mine = [cell for cell in cells if cell.split == kind]
        counts = [variation_counts(data, parts, mine, g, cfg) for g in range(cfg["samples"])]
        out["splits"][kind] = {
            column: _split_windows(mine, counts, speeds, column, cfg, c["group_epochs"][kind],
                                   c["window_minutes"])
            for column in ("default", "fastest")}
    out["total"] = {column: {key: sum(s[column][key] for s in out["splits"].values())
                             for key in ("windows", "gpu_minutes")}
                    for column in ("default", "fastest")}
    return out


def _split_windows(cells, counts, speeds, column, cfg, epochs, window) -> dict:
    gen, group, sampling = (speeds[key][column] for key in ("generator", "group", "sampling"))
    if group is None or sampling is None:
        raise ValueError(f"no {'classifier row without levers' if group is None else 'sampling rate'}"
                         f" for the {column} column of {speeds['card']}; run `bench train "
                         f"--model basic_cnn` / `synth bench --guidance 1,4` on it")
    rate = sampling["variations_per_s"]
    per_g, windows, spare = [], 0, 0.0
    for g, count in enumerate(counts):
        drawn = count["sample"] + count["leaky"]
        work = {"g": g, "generator": gen["minutes"], "variations": drawn,
                "sampling": drawn / rate / 60,
                "synthetic_cells": sum(_cell_minutes(cell, _repeats_of(g, cfg), group, epochs)
                                       for cell in cells if cell.synthetic != "none")}
        total = work["generator"] + work["sampling"] + work["synthetic_cells"]
        # a window that cannot finish g's cells ends; the next retrains g for the rest
        n = 1 if total <= window else 1 + math.ceil((total - window) / (window - gen["minutes"]))
        work |= {"minutes": total + (n - 1) * gen["minutes"], "windows": n}
        windows += n
        spare += n * window - work["minutes"]
        per_g.append(work)
    real_only = sum(_cell_minutes(cell, cfg["repeats"], group, epochs) for cell in cells
                    if cell.synthetic == "none")
    windows += math.ceil(max(0.0, real_only - spare) / window)
    return {"generators": per_g, "real_only_cells": real_only, "windows": windows,
            "gpu_minutes": sum(w["minutes"] for w in per_g) + real_only,
            "rows": {"generator": f"{gen['file']} ({gen['lever']})",
                     "sampling": f"{sampling['file']} ({sampling['lever']})",
                     "classifier": f"{group['file']} ({', '.join(group['levers']) or 'no lever'})"},
            "variations_per_s": rate, "rate_estimated": sampling["estimated"]}


def _repeats_of(g: int, cfg: dict) -> int:
    return sum(1 for r in range(cfg["repeats"]) if repeat_seeds(r, cfg).sample_index == g)


def _cell_minutes(cell: Cell, repeats: int, group: dict, epochs: int) -> float:
    """A cell's training minutes: its groups of the benchmark's replicates, scaled up (never
    down) by its training set's size, and by the epochs its last replicate trains."""
    groups = math.ceil(repeats / group["replicates"])
    size = cell.real_fraction + cell.synthetic_fraction
    return (group["seconds"] * groups * max(1.0, size / group["real_fraction"])
            * epochs / group["epochs"] / 60)


# ----------------------------------------------------------------------------- report

def cost_table(cost: dict, card: str) -> str:
    """:func:`tier_cost` as text: per split, each step's minutes per generator's window (the
    mean over generators) in both columns, the windows, and the totals."""
    cols = ("default", "fastest")
    lines = [f"tier {cost['tier']} on {card}, in windows of {cost['window_minutes']:g} "
             f"minutes of work; columns: the default rows, the fastest measured rows",
             f"{'':<44}{'default':>16}{'fastest':>16}"]

    def line(label, values):
        lines.append(f"{label:<44}" + "".join(f"{v:>16}" for v in values))

    for kind, split in cost["splits"].items():
        lines.append(f"{kind} split")
        for label, key, fmt in (("  generator g + its leaky twin, in parallel", "generator",
                                 "{:.1f} min"),
                                ("  g's variations, drawn once (mean over g)", "variations",
                                 "{:,.0f}"),
                                ("  their sampling", "sampling", "{:.1f} min"),
                                ("  the cells' repeats that use g", "synthetic_cells",
                                 "{:.1f} min"),
                                ("  a generator's windows (retraining g)", "windows", "{:.1f}")):
            line(label, [fmt.format(_mean(split[c]["generators"], key)) for c in cols])
        line("  guided variations/s", [f"{split[c]['variations_per_s']:.0f}"
                                       + (" (est.)" if split[c]["rate_estimated"] else "")
                                       for c in cols])
        line(f"  real-only cells, {cost['repeats']} repeats each",
             [f"{split[c]['real_only_cells']:.1f} min" for c in cols])
        line("  windows for the split", [str(split[c]["windows"]) for c in cols])
    line("all splits: windows", [str(cost["total"][c]["windows"]) for c in cols])
    line("all splits: GPU-minutes of work", [f"{cost['total'][c]['gpu_minutes']:.0f}"
                                              for c in cols])
    first = next(iter(cost["splits"].values()))
    for c in cols:
        lines.append(f"{c} rows: " + "; ".join(f"{k} {v}" for k, v in first[c]["rows"].items()))
    return "\n".join(lines)


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)
