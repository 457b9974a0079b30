"""How much faster :func:`mrilib.train.train_replicates` is than the loop notebooks write.

Three ways to train the same protocol (a stratified ``real_frac`` of the training pool,
10 epochs without early stopping, the model's batch size and learning rate from
:mod:`mrilib.train`, validation and test evaluated every epoch), timed in one process on
one device:

(a) ``naive``: torchvision ``ImageFolder`` + ``DataLoader`` with PIL transforms
    (Grayscale, Resize, the policy's flip / AutoAugment, ToTensor, Normalize), fp32,
    one model at a time, ``loss.item()`` every step: what most public notebooks do.
    Slow, so only a few replicates are timed and reported per replicate.
(b) ``serial``: mrilib with ``max_parallel=1``: data resident on the device as uint8,
    augmentation on the device, no DataLoader, but one replicate at a time.
(c) ``parallel``: mrilib with all replicates in one vmap group.

Each is warmed up once before timing (CUDA context, cuDNN heuristics, worker start-up
code paths), so the numbers are steady-state per replicate. Decoding the images for
(b)/(c) is timed separately: it happens once per process (and is cached on disk).
"""
from __future__ import annotations

import datetime as _dt
import math
import statistics
import time
from pathlib import Path

import torch

from .config import settings
from .device import resolve_device, sync

DEFAULTS = {
    "real_frac": 0.3,          # the thesis's headline case and the reference protocol
    "replicates": 20,          # (c): one thesis cell, all at once
    "naive_replicates": 3,     # (a): seconds each even on a GPU; 3 give a stable mean
    "serial_replicates": 3,    # (b): one at a time, same reason
    # 0 leaves (a) or (b) untimed: a row that measures one setting, read against the
    # default row of the same card, need not time them again.
    "naive_workers": 2,        # DataLoader workers: the value Kaggle/Colab notebooks use most
    "seed": 0,                 # replicate k uses seed+k in every approach
    # Every replicate trains every epoch (early stopping off), so that each approach and
    # card times the same work; 10, as the committed benchmarks did.
    "epochs": 10,
}
PRESETS = {
    # CPU seminars and tests: few replicates, one epoch.
    "quick": {"replicates": 4, "naive_replicates": 1, "serial_replicates": 1, "epochs": 1},
}


# ----------------------------------------------------------------------------- helpers

def flops_per_image(model: str, img_size: int) -> dict[str, float]:
    """FLOPs of one image through ``model``: ``forward`` and ``train`` (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .models import build_model

    net = build_model(model, img_size=img_size)
    x = torch.zeros(2, 1, img_size, img_size)
    with FlopCounterMode(display=False) as fwd:
        net(x)
    with FlopCounterMode(display=False) as both:
        net(x).sum().backward()
    return {"forward": fwd.get_total_flops() / 2, "train": both.get_total_flops() / 2}


def naive_transform(aug: str, size: int):
    """The PIL pipeline a notebook writes for ``aug`` (no augmentation for evaluation)."""
    from torchvision import transforms as T

    from .models import MRI_MEAN, MRI_STD

    policy = {"none": [], "hflip": [T.RandomHorizontalFlip(p=0.5)],
              "autoaugment": [T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)]}
    if aug not in policy:
        raise ValueError(f"the naive loop has no PIL version of policy {aug!r}; "
                         f"choose one of {', '.join(policy)}")
    return T.Compose([T.Grayscale(num_output_channels=1), T.Resize((size, size)),
                      *policy[aug], T.ToTensor(), T.Normalize((MRI_MEAN,), (MRI_STD,))])


def naive_split(targets: list[int], real_frac: float, seed: int):
    """(train, val, test) indices of an ImageFolder with mrilib's split sizes and fractions."""
    from .splits import DEFAULTS as DATA
    from .splits import stratified_sample

    labels = torch.tensor(targets)
    every = torch.arange(len(labels))
    test = stratified_sample(labels, DATA["test_frac"], DATA["split_seed"])
    rest = every[~torch.isin(every, test)]
    val = stratified_sample(labels, DATA["val_frac"], DATA["split_seed"] + 1, pool=rest)
    pool = rest[~torch.isin(rest, val)]
    return stratified_sample(labels, real_frac, seed, pool=pool), val, test


def _image_folder(source) -> Path:
    from .data import resolve_source

    path = Path(resolve_source(source))
    if not path.is_dir() or not any(p.is_dir() for p in path.iterdir()):
        raise ValueError(f"the naive loop reads an image folder (one sub-folder per class), "
                         f"but the source is {str(path)!r}; pass --source "
                         f"path/to/alzheimer_mri or set MRILIB_DATA")
    return path


# ----------------------------------------------------------------------------- (a) naive

def naive_replicate(root: Path, model: str, aug: str, seed: int, cfg: dict, size: int,
                    device: torch.device, workers: int, epochs: int | None = None,
                    evaluate: bool = True) -> dict:
    """One notebook-style run; ``seconds`` and the last epoch's validation accuracy."""
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    from .models import build_model

    train_ds = ImageFolder(str(root), transform=naive_transform(aug, size))
    eval_ds = ImageFolder(str(root), transform=naive_transform("none", size))
    train_idx, val_idx, test_idx = naive_split(train_ds.targets, cfg["real_frac"], seed)
    torch.manual_seed(seed)
    loader = DataLoader(Subset(train_ds, train_idx.tolist()), batch_size=cfg["batch_size"],
                        shuffle=True, num_workers=workers)
    evals = [DataLoader(Subset(eval_ds, idx.tolist()), batch_size=cfg["batch_size"],
                        num_workers=workers) for idx in (val_idx, test_idx)]
    net = build_model(model, img_size=size).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(cfg["epochs"] if epochs is None else epochs):
        net.train()
        running = 0.0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            running += loss.item()  # the per-step host sync notebooks have, kept on purpose
        net.eval()
        with torch.no_grad():
            accs = [_naive_accuracy(net, e, device) for e in (evals if evaluate else [])]
    sync(device)
    return {"seconds": time.perf_counter() - start, "train_loss": running / len(loader),
            "val_acc": accs[0] if accs else float("nan"), "n_train": len(train_idx)}


def _naive_accuracy(net, loader, device) -> float:
    correct = sum((net(x.to(device)).argmax(1) == y.to(device)).sum().item() for x, y in loader)
    return correct / len(loader.dataset)


# ----------------------------------------------------------------------------- (b), (c)

def _mrilib_timed(model, aug, data, index, val, test, seeds, device, max_parallel, overrides):
    from .train import train_replicates

    sync(device)
    start = time.perf_counter()
    records = train_replicates(model, data.images, data.labels, index, val, test, seeds,
                               aug=aug, device=device, max_parallel=max_parallel, **overrides)
    sync(device)
    return time.perf_counter() - start, records


def union_us(intervals) -> float:
    """Total length of the union of (start, end) intervals: time covered at least once."""
    total, end = 0.0, -math.inf
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def profile_parallel(model, aug, data, index, val, test, seeds, device, overrides,
                     top: int = 15) -> dict:
    """One epoch of (c) under ``torch.profiler``: where a step's time goes.

    Per training step (all K replicates: forward, backward, Adam): the host's wall time
    inside the step and the span of the same range on the device timeline (from its
    first kernel to its last, the backward's included, which autograd launches from
    its own thread); the same for one evaluation pass; device operations per step; and
    the ops that took most device time (CPU time on a CPU). A device span well below the
    host time means a launch- or Python-bound step (more replicates per group nearly
    free, CUDA graphs would help); a device span at or above it, a step bound by its
    kernels, and the top ops say which. Profiling adds a few microseconds per op on the
    host, so host times are upper bounds; device times are not inflated.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from .stacked import PROFILE_EVAL
    from .train import PROFILE_STEP, train_replicates

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        train_replicates(model, data.images, data.labels, index, val, test, seeds, aug=aug,
                         device=device, max_parallel=len(seeds), **{**overrides, "epochs": 1})
        sync(device)
        wall = time.perf_counter() - start
    events = prof.events()

    on_host = [e for e in events if e.device_type == DeviceType.CPU]
    on_device = [e for e in events if e.device_type != DeviceType.CPU]

    def ranges(name):
        host = [e for e in on_host if e.name == name]
        # The range as the device saw it (a CPU range misses the backward's kernels); the
        # union of its overlapping annotations, not their sum (docs/decisions.md#training-engine).
        spans = [(e.time_range.start, e.time_range.end) for e in on_device if e.name == name]
        return {"count": len(host),
                "host_ms": sum(e.cpu_time_total for e in host) / max(len(host), 1) / 1000,
                "device_ms": union_us(spans) / max(len(host), 1) / 1000}

    step, evaluation = ranges(PROFILE_STEP), ranges(PROFILE_EVAL)
    # Busy time from the device's own operations (key_averages() counts each kernel twice);
    # annotations share a name with a host range, kernels and copies never do.
    host_names = {e.name for e in on_host}
    ops = [e for e in on_device if e.name not in host_names
           and not getattr(e, "is_user_annotation", False)]
    kernels = len(ops)
    device_us = sum(e.time_range.elapsed_us() for e in ops)
    averages = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    return {"replicates": len(seeds), "epochs": 1, "wall_s": wall,
            "device_busy_s": device_us / 1e6, "device_busy_share": device_us / 1e6 / wall,
            "kernels": kernels,
            "kernels_per_step": kernels / max(step["count"], 1) if cuda else None,
            "step": step, "evaluate": evaluation,
            "table": averages.table(sort_by=sort, row_limit=top, max_name_column_width=60)}


def _warm_up(model, aug, data, index, val, test, device, overrides, root, cfg, workers,
             naive: bool = True, replicates: int = 2):
    """One short pass of every code path, so first-call costs stay out of the timings
    (with ``replicates`` as timed where a compiled step compiles per number of them)."""
    from .train import train_replicates

    small = index[:replicates, :cfg["batch_size"] * 2]
    train_replicates(model, data.images, data.labels, small, (val[0][:64], val[1][:64]),
                     (test[0][:64], test[1][:64]), list(range(len(small))), aug=aug,
                     device=device, **{**overrides, "epochs": 1})
    if naive:
        naive_replicate(root, model, aug, 0, {**cfg, "real_frac": min(cfg["real_frac"], 0.02)},
                        data.images.shape[-1], device, workers, epochs=1, evaluate=False)


def bench_train(model: str, aug: str = "none", source=None, device=None, size: int = 128,
                profile: bool = False, on_timed=None, **overrides) -> dict:
    """Time (a) naive, (b) serial and (c) parallel training; one JSON-ready dict.

    ``profile=True`` adds ``profile``: one more epoch of (c) under the profiler
    (:func:`profile_parallel`), after and apart from the timings. ``on_timed(result)``,
    if given, receives the timings before that profile runs (so a caller can save them
    first: a time-limited remote GPU job may be cut off before the profile ends).
    """
    from .data import load_mri
    from .splits import split_mri
    from .train import model_settings, real_fraction_index

    cfg, overrides = _bench_settings(overrides)
    train_cfg = model_settings(model, **overrides)
    device = resolve_device(device)
    root = _image_folder(source)
    workers = cfg["naive_workers"]

    # -- data for mrilib: decoded once per process, then resident on the device
    start = time.perf_counter()
    data = load_mri(root, size=size)
    load_seconds = time.perf_counter() - start
    split = split_mri(data)
    n_rep = max(cfg["replicates"], cfg["serial_replicates"])
    seeds = [cfg["seed"] + k for k in range(n_rep)]
    index = real_fraction_index(data.labels, split.train, cfg["real_frac"], seeds, data.ids)
    val = (data.images[split.val], data.labels[split.val])
    test = (data.images[split.test], data.labels[split.test])
    naive_cfg = {**train_cfg, "real_frac": cfg["real_frac"]}
    # a compiled step compiles once per number of replicates: warm up each one timed
    timed = sorted({k for k in (cfg["serial_replicates"] and 1, cfg["replicates"]) if k})
    for i, k in enumerate(timed if train_cfg["compile_step"] else [2]):
        _warm_up(model, aug, data, index, val, test, device, overrides, root, naive_cfg,
                 workers, naive=cfg["naive_replicates"] > 0 and i == 0, replicates=k)

    # -- (a) the notebook loop, a few replicates
    naive = [naive_replicate(root, model, aug, cfg["seed"] + k, naive_cfg, size, device, workers)
             for k in range(cfg["naive_replicates"])]
    # -- (b) mrilib one replicate at a time, (c) all replicates in one vmap group
    k_s, k_p = cfg["serial_replicates"], cfg["replicates"]
    serial = _mrilib_timed(model, aug, data, index[:k_s], val, test, seeds[:k_s],
                           device, 1, overrides) if k_s else (None, [])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    parallel = _mrilib_timed(model, aug, data, index[:k_p], val, test, seeds[:k_p],
                             device, k_p, overrides)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    result = _result(model, aug, size, cfg, train_cfg, split, index.shape[1], naive, serial,
                     parallel, peak, load_seconds)
    if on_timed is not None:
        on_timed(result)
    if profile:
        try:
            result["profile"] = profile_parallel(model, aug, data, index[:k_p], val, test,
                                                 seeds[:k_p], device, overrides)
        except Exception as err:  # noqa: BLE001 - the timings above must not be lost to it
            result["profile"] = {"error": f"{type(err).__name__}: {err}"}
    return result


def _bench_settings(overrides: dict) -> tuple[dict, dict]:
    """(bench settings in force, the mrilib.train overrides left), each key checked."""
    from .train import DEFAULTS as TRAIN_DEFAULTS

    overrides = dict(overrides)
    bench_keys = {k: overrides.pop(k) for k in list(overrides) if k in DEFAULTS}
    if "max_parallel" in overrides:
        raise ValueError("bench sets max_parallel itself (1 for serial, all replicates for "
                         "parallel); lower --replicates instead if memory is short")
    cfg = settings(DEFAULTS, PRESETS, **bench_keys)
    overrides |= {"epochs": cfg["epochs"], "patience": "off"}
    for key, least in (("replicates", 1), ("naive_replicates", 0), ("serial_replicates", 0),
                       ("epochs", 1)):
        if not isinstance(cfg[key], int) or cfg[key] < least:
            raise ValueError(f"{key}={cfg[key]!r}; give a whole number of at least {least}")
    unknown = set(overrides) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; bench takes "
                         f"{sorted(DEFAULTS)} and mrilib.train's {sorted(TRAIN_DEFAULTS)}")
    return cfg, overrides


def _result(model, aug, size, cfg, train_cfg, split, n_train, naive, serial, parallel,
            peak, load_seconds) -> dict:
    """The timings as one JSON-ready dict, with what the parallel run achieved."""
    from .paths import preset_name
    from .train import STEP_LEVERS

    (serial_s, serial), (parallel_s, parallel) = serial, parallel
    k_s, k_p = cfg["serial_replicates"], cfg["replicates"]
    flops = flops_per_image(model, size)
    epochs = train_cfg["epochs"]
    # test_every_epoch=False tests the final and best weights only: twice at most
    tested = epochs if train_cfg["test_every_epoch"] else min(epochs, 2)
    n_eval = len(split.val) + len(split.test) * tested / epochs  # per epoch, on average
    work = k_p * epochs * (n_train * flops["train"] + n_eval * flops["forward"])
    steps = epochs * math.ceil(n_train / train_cfg["batch_size"])
    per = {"naive": sum(r["seconds"] for r in naive) / len(naive) if naive else None,
           "serial": serial_s / k_s if k_s else None, "parallel": parallel_s / k_p}
    return {
        "model": model, "aug": aug, "init": parallel[0]["init"],
        "device": parallel[0]["device"], "torch": str(torch.__version__),
        "date": _dt.date.today().isoformat(), "preset": preset_name(),
        "settings": {"real_frac": cfg["real_frac"], "n_train": int(n_train),
                     "n_val": len(split.val), "n_test": len(split.test), "img_size": size,
                     "epochs": epochs, "batch_size": train_cfg["batch_size"],
                     "lr": train_cfg["lr"], "amp_mrilib": train_cfg["amp"],
                     "naive_workers": cfg["naive_workers"], "naive_precision": "fp32",
                     "deterministic_mrilib": train_cfg["deterministic"],
                     "test_every_epoch": train_cfg["test_every_epoch"],
                     **{f"{lever}_mrilib": train_cfg[lever] for lever in STEP_LEVERS}},
        "load_seconds": load_seconds,
        "naive": {"replicates": len(naive), "seconds_per_replicate": per["naive"],
                  "n_train": naive[0]["n_train"] if naive else None,
                  "median_final_val_acc": statistics.median(r["val_acc"] for r in naive)
                  if naive else None},
        "serial": {"replicates": k_s, "seconds_per_replicate": per["serial"],
                   "median_final_val_acc": _median_val_acc(serial) if serial else None},
        "parallel": {"replicates": k_p, "seconds_per_replicate": per["parallel"],
                     "median_final_val_acc": _median_val_acc(parallel),
                     "ms_per_step": 1000 * parallel_s / steps,
                     "achieved_tflops": work / parallel_s / 1e12,
                     "peak_memory_gib": None if peak is None else peak / 2 ** 30},
        "speedup": {"serial_vs_naive": _ratio(per["naive"], per["serial"]),
                    "parallel_vs_naive": _ratio(per["naive"], per["parallel"]),
                    "parallel_vs_serial": _ratio(per["serial"], per["parallel"])},
        "gflop_per_image": {k: v / 1e9 for k, v in flops.items()},
    }


def saved_rows(directory: str | Path) -> list[dict]:
    """The ``bench train`` files (``bench-train-*.json``) in ``directory``, one flat row
    each: file, device, model, img_size, replicates, seconds (the K-at-once group's),
    epochs, real_fraction, deterministic and the ``levers`` on; other files skipped."""
    import json

    from .train import STEP_LEVERS

    rows = []
    for path in sorted(Path(directory).glob("bench-train-*.json")):
        try:
            r = json.loads(path.read_text())
            s, p = r["settings"], r["parallel"]
            rows.append({"file": path.name, "device": r["device"], "model": r["model"],
                         "img_size": s["img_size"], "replicates": int(p["replicates"]),
                         "seconds": p["seconds_per_replicate"] * p["replicates"],
                         "epochs": s["epochs"], "real_fraction": float(s["real_frac"]),
                         "deterministic": s.get("deterministic_mrilib", True),
                         "levers": [k for k in STEP_LEVERS if s.get(f"{k}_mrilib")]})
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a benchmark of this shape
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _median_val_acc(records: list[dict]) -> float:
    return statistics.median(r["final"]["val_acc"] for r in records)


def report(result: dict) -> str:
    """The benchmark as a few lines of text."""
    s = result["settings"]
    init = "from scratch" if result["init"] == "scratch" else "ImageNet weights"
    rows = [("(a) naive: ImageFolder + DataLoader"
             f"({s['naive_workers']} workers), PIL, fp32, one model at a time", "naive"),
            ("(b) mrilib, data on device, one replicate at a time", "serial"),
            (f"(c) mrilib, {result['parallel']['replicates']} replicates at once (vmap)",
             "parallel")]
    p = result["parallel"]
    memory = "" if p["peak_memory_gib"] is None else f", peak memory {p['peak_memory_gib']:.2f} GiB"
    lines = [
        f"bench train: {result['model']} ({init}), aug {result['aug']}, "
        f"{s['real_frac']:.0%} real = {s['n_train']} training images, {s['epochs']} epochs, "
        f"batch {s['batch_size']}, lr {s['lr']:g}, {s['img_size']}px; val {s['n_val']} + "
        f"test {s['n_test']} images evaluated "
        + ("every epoch" if s.get("test_every_epoch", True) else "every epoch (val) / at the "
           "final and best epochs (test)"),
        f"device {result['device']} | torch {result['torch']} | preset {result['preset']} | "
        f"{result['date']} | mrilib amp {s['amp_mrilib']}"
        + ("" if s.get("deterministic_mrilib", True) else " | non-deterministic kernels")
        + ("" if s.get("test_every_epoch", True) else " | test split at the final and best "
           "epochs only")
        + (" | stems as unfold + matmul" if s.get("im2col_stem_mrilib", False) else "")
        + (" | compiled step" if s.get("compile_step_mrilib", False) else "")
        + (" | step as a CUDA graph" if s.get("cuda_graph_mrilib", False) else "")
        + (" | replicates one after another" if s.get("replicate_loop_mrilib", False) else "")
        + (" | each on its own stream" if s.get("replicate_streams_mrilib", False) else ""),
        f"{'approach':<82}{'reps':>5}{'s/replicate':>13}{'speedup':>9}{'val acc':>9}",
    ]
    for title, key in rows:
        r = result[key]
        if not r["replicates"]:
            lines.append(f"{title:<82}{0:>5}{'not timed':>13}{'-':>9}{'-':>9}")
            continue
        speed = _ratio(result["naive"]["seconds_per_replicate"], r["seconds_per_replicate"])
        lines.append(f"{title:<82}{r['replicates']:>5}{r['seconds_per_replicate']:>13.3f}"
                     + (f"{speed:>8.1f}x" if speed is not None else f"{'-':>9}")
                     + f"{r['median_final_val_acc']:>9.3f}")
    lines += [
        f"(c) in detail: {p['ms_per_step']:.2f} ms per step of all replicates (evaluation "
        f"included), {p['achieved_tflops']:.3f} TFLOP/s achieved{memory}; "
        f"{result['gflop_per_image']['forward']:.3f} GFLOP forward, "
        f"{result['gflop_per_image']['train']:.3f} GFLOP forward+backward per image",
        f"decoding the images for (b)/(c): {result['load_seconds']:.1f} s once per process "
        f"(cached on disk after the first run), not in the per-replicate times",
        "speedup = (a)'s seconds per replicate / this row's; val acc = median final-epoch "
        "validation accuracy (a sanity check that all three learn).",
    ]
    if "profile" in result:
        lines += profile_report(result["profile"])
    return "\n".join(lines)


def profile_report(prof: dict) -> list[str]:
    """The lines :func:`report` adds for a ``profile`` entry."""
    if "error" in prof:
        return [f"profile: failed ({prof['error']})"]
    st, ev = prof["step"], prof["evaluate"]
    on_device = prof["kernels_per_step"] is not None  # a CPU run has no device timeline
    busy = (f", device busy {prof['device_busy_s']:.2f} s ({prof['device_busy_share']:.0%}); "
            f"{prof['kernels_per_step']:.0f} device ops per training step (evaluation's "
            f"spread over them)") if on_device else ""

    def part(title, r):
        device = f", device {r['device_ms']:.2f} ms" if on_device else ""
        return f"{title} ({r['count']}x): host {r['host_ms']:.2f} ms{device}"
    return [
        f"profile of (c), {prof['replicates']} replicates, {prof['epochs']} epoch under "
        f"torch.profiler: wall {prof['wall_s']:.2f} s{busy}",
        f"  {part('training step', st)} | {part('evaluation pass', ev)}",
        prof["table"].rstrip(),
    ]
