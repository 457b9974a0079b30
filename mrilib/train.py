# Over 500 lines on purpose: the settings, input checks and hot loop of one engine read as one.
"""Train K replicates of one classifier at once: Adam, cross-entropy, data on the device.

The thesis trains every (model, augmentation, data) cell 20 times on independent samples
and reports the median. :func:`train_replicates` does those K runs together, the way
cifar10-airbench trains one: the images stay on the device as uint8, augmentation and
normalisation happen there on whole tensors, and there is no DataLoader. The K
replicates are stacked into one functional model (``torch.func.stack_module_state``)
and run through ``vmap``, so one kernel launch serves all K; convolutions become grouped
convolutions, BatchNorm keeps batch statistics per replicate and updates its running
statistics in place in the stacked buffers (one slice per replicate), and one Adam over
the stacked tensors is K independent Adams (Adam is elementwise; ``tests/test_train.py``
checks it). That sharing pays on a GPU, where a small model's step is kernel launches;
on a CPU the default group size is 1 (see ``max_parallel``).

Each replicate has its own seed, which fixes its initial weights and, through its own
torch RNG on the device, its batch order and augmentation draws: a replicate
gives the same history whether it is trained alone or beside others (up to float
rounding of the grouped kernels) and the same history twice on one device. On CUDA,
where training and evaluation run in bf16, that rounding is larger and compounds over
epochs: a replicate's numbers then depend a little on its group size (``max_parallel``,
one of :data:`RUN_ONLY`) and on the device, within the spread between repeats but not
bit for bit, and a checkpoint reloaded in fp32 scores slightly differently from the bf16
evaluation that recorded its metrics. The stacked model lives in :mod:`mrilib.stacked`,
checkpoints in :mod:`mrilib.checkpoints`.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function
from tqdm.auto import tqdm

from .checkpoints import _classifier_path, checkpoint_config, trained_classifier  # noqa: F401
from .config import design_view, settings
from .device import checked_amp, device_name, resolve_device, sync
from .stacked import (PROFILE_EVAL, BestWeights, Stack, evaluate, fill_test_metrics,
                      replicate_records)
from .stacked_step import Step, check_levers
from .stopping import EarlyStopping

# The profiler range around one training step (all K replicates), read by
# mrilib.bench.profile_parallel.
PROFILE_STEP = "mrilib: train step"

# The thesis names Adam and cross-entropy only, so these are choices; each row is used
# unchanged in every cell and policy compared, so differences between cells are not tuning.
PER_MODEL = {
    "basic_cnn": {
        # At most 30 epochs, stopping 5 after the lowest validation loss: measured curves
        # in docs/decisions.md#epochs-and-early-stopping (tools/curves.py --summary).
        "epochs": 30,
        "patience": 5,
        "batch_size": 32,    # images per replicate per step; the PyTorch/Keras tutorial default
        "lr": 1e-3,          # Adam's default (Kingma & Ba 2015); plain Adam as the thesis says
        "lr_imagenet": None,  # no ImageNet weights exist for this network
        "schedule": "constant",  # the thesis describes plain Adam, no schedule
        "warmup_epochs": 0,
    },
    "resnet18": {
        "epochs": 30,        # the basic CNN's rule; one subject-split curve measured
        "patience": 5,       # (docs/decisions.md#epochs-and-early-stopping)
        "batch_size": 32,    # same as the CNN: equal updates per epoch across models; with
                             # 20 replicates in parallel the GPU still sees 640 images per step
        "lr": 1e-3,          # Adam's default; BatchNorm makes ResNet-18 stable at it from scratch
        "lr_imagenet": 1e-4,  # fine-tuning ImageNet weights: 10x lower keeps the features
        "schedule": "constant",
        "warmup_epochs": 0,
    },
    "vit_tiny": {
        "epochs": 30,        # the basic CNN's rule; one subject-split curve measured
        "patience": 5,       # (docs/decisions.md#epochs-and-early-stopping)
        "batch_size": 32,
        "lr": 3e-4,          # transformers from scratch diverge at Adam's 1e-3 without tuning
        "lr_imagenet": 5e-5,  # usual ViT fine-tuning rate with Adam
        "schedule": "cosine",  # warmup then cosine decay: Adam's early steps are unstable for
        "warmup_epochs": 1,    # attention layers (Liu et al. 2020, Xiong et al. 2020)
    },
    "vit_small": {
        "epochs": 30,        # the basic CNN's rule, unmeasured for this model
        "patience": 5,       # (docs/decisions.md#epochs-and-early-stopping)
        "batch_size": 32,
        "lr": 2e-4,          # 4x the parameters of ViT-Tiny: a lower rate for the same stability
        "lr_imagenet": 3e-5,
        "schedule": "cosine",
        "warmup_epochs": 1,
    },
}

DEFAULTS = {
    # None: take the model's value from "per_model"; a number overrides it for every model.
    "epochs": None,            # the most epochs a replicate trains
    "patience": None,          # a number of epochs, or "off" for every model (see stopping)
    "batch_size": None,
    "lr": None,
    "schedule": None,          # "constant" or "cosine" (linear warmup, then cosine to 0)
    "warmup_epochs": None,     # epochs of linear warmup from lr/steps to lr
    "per_model": PER_MODEL,
    "weight_decay": 0.0,       # L2 in Adam; the thesis mentions none
    # The thesis fine-tunes ImageNet weights for ResNet-18 and the ViT; the default trains
    # from scratch (records say init "scratch") because the hub may be out of reach.
    "pretrained": False,       # True: ImageNet weights from the Hugging Face hub
    "weights": None,           # path to timm's ImageNet state dict for the model
    "num_classes": 4,          # Mild, Moderate, Non, Very mild demented
    # Replicates per vmap group, by device type (or one number). CUDA: one thesis cell at
    # once; CPU: 1, where stacking only costs (docs/decisions.md#training-engine).
    "max_parallel": {"cuda": 20, "cpu": 1},
    "eval_batch_size": 256,    # images per evaluation forward (times the replicates in it)
    "amp": "auto",             # "auto": bf16 autocast on CUDA only; "bf16": also on CPU; "off"
    "deterministic": True,     # deterministic cuDNN and attention kernels: same seed, same
                               # history on a GPU too (see _deterministic_kernels)
    # True: the test split after every epoch (a test curve); False: at the final and the
    # best-validation epochs only, all the records need (None elsewhere in the history).
    "test_every_epoch": True,
    # True: the one-channel stems run as unfold + matmul (stacked.Im2colConv2d), the same
    # sums in another order; off until measured faster (`bench train --im2col-stem`).
    "im2col_stem": False,
    # How a training step runs (mrilib.stacked_step), not what it computes: through
    # torch.compile, and/or replayed as one CUDA graph (CUDA only). Off until measured faster.
    "compile_step": False,
    "cuda_graph": False,
    # True: each replicate's forward and backward as its own dense kernels, one after
    # another (ResNet-18's grouped convolutions under vmap are slow), best inside a graph;
    # with replicate_streams (CUDA), each on a stream of its own, so that they overlap.
    "replicate_loop": False,
    "replicate_streams": False,
}
PRESETS = {
    "quick": {"epochs": 1},  # CPU tests and seminars: seconds, not minutes (patience moot)
}
# The speed levers above: by which kernels, in which order and how a step's sums run.
STEP_LEVERS = ("im2col_stem", "compile_step", "cuda_graph", "replicate_loop",
               "replicate_streams")
# How a run is batched, timed and evaluated, and in which order or by which kernels its
# sums run, not what it learns: left out of every key of a run's design.
RUN_ONLY = ("max_parallel", "eval_batch_size", "test_every_epoch", *STEP_LEVERS)


# ----------------------------------------------------------------------------- settings

def model_settings(model: str, **overrides: Any) -> dict:
    """The settings in force for ``model``: its ``per_model`` row under the global ones."""
    from .models import model_spec

    model_spec(model)  # unknown name -> clear error listing the known ones
    cfg = settings(DEFAULTS, PRESETS, **overrides)
    row = cfg.pop("per_model")[model]
    for key, value in row.items():
        if cfg.get(key) is None:
            cfg[key] = value
    init = "imagenet" if (cfg["pretrained"] or cfg["weights"] is not None) else "scratch"
    if init == "imagenet" and overrides.get("lr") is None:
        if row["lr_imagenet"] is None:
            raise ValueError(f"{model!r} has no ImageNet weights; drop pretrained/weights")
        cfg["lr"] = row["lr_imagenet"]
    cfg.pop("lr_imagenet")
    cfg["patience"] = _checked_patience(cfg["patience"])
    if cfg["schedule"] not in ("constant", "cosine"):
        raise ValueError(f"schedule={cfg['schedule']!r}; use 'constant' or 'cosine'")
    checked_amp(cfg["amp"])
    groups = cfg["max_parallel"].values() if isinstance(cfg["max_parallel"], dict) else [
        cfg["max_parallel"]]
    for key, value in [(k, cfg[k]) for k in ("epochs", "batch_size", "eval_batch_size")] + [
            ("max_parallel", v) for v in groups]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r}; give a positive whole number")
    for key in (k for k, v in DEFAULTS.items() if isinstance(v, bool)):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"{key}={cfg[key]!r}; give True or False")
    if not cfg["lr"] > 0:
        raise ValueError(f"lr={cfg['lr']!r}; give a positive learning rate such as 1e-3")
    return cfg


def _checked_patience(patience):
    """``patience`` as a positive whole number, or None for no early stopping ("off")."""
    if patience in (None, "off"):
        return None
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience={patience!r}; give a positive whole number of epochs, "
                         f"or 'off' for no early stopping")
    return patience


def design_settings(model: str, **overrides: Any) -> dict:
    """What a run of ``model`` depends on: its settings in force less :data:`RUN_ONLY`.

    JSON-stable (:func:`mrilib.config.design_view`); a weights file is named by its
    content, so the same weights anywhere give the same design.
    """
    out = design_view(model_settings(model, **overrides), RUN_ONLY)
    if out.get("weights") is not None:
        out["weights"] = _file_digest(out["weights"])
    return out


def _file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:16]}"


# ----------------------------------------------------------------------------- samples

def real_fraction_index(labels: torch.Tensor, pool: torch.Tensor, fraction: float,
                        seeds: Sequence[int], ids: Sequence[str] | None = None) -> torch.Tensor:
    """``[K, n]`` rows of ``labels``: one stratified ``fraction`` of ``pool`` per seed.

    Stratified samples of one pool and fraction all have the same size (the per-class
    counts do not depend on the seed), so they stack into the ``train_index`` of
    :func:`train_replicates`.
    """
    from .splits import stratified_sample

    if len(seeds) == 0:
        raise ValueError("seeds is empty; give one seed per replicate, e.g. range(20)")
    rows = [stratified_sample(labels, fraction, int(s), pool=pool, ids=ids) for s in seeds]
    return torch.stack(rows)


# ----------------------------------------------------------------------------- checks

def _checked_images(x: torch.Tensor, what: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{what} must be uint8 [N, 1, H, W] (as mrilib.data.load_mri gives); "
                         f"got {x.dtype} {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty; it needs at least one image")
    return x


def _checked_labels(y: torch.Tensor, n: int, num_classes: int, what: str) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.shape[0] != n or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what} must be int64 [{n}] (one label per image); "
                         f"got {y.dtype} {tuple(y.shape)}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{what} holds labels {int(y.min())}..{int(y.max())} but there are "
                         f"{num_classes} classes (0..{num_classes - 1}); pass num_classes "
                         f"or fix the labels")
    return y.long()


def _checked_index(train_index, m: int, seeds: Sequence[int]) -> torch.Tensor:
    index = torch.as_tensor(train_index)
    if index.ndim != 2 or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"train_index must be an integer tensor [K, n] (one row of bank rows "
                         f"per replicate, all rows the same length); got {index.dtype} "
                         f"{tuple(index.shape)}")
    if index.shape[0] == 0:
        raise ValueError("no replicates: train_index has 0 rows; give one row of bank rows "
                         "(and one seed) per replicate")
    if index.shape[1] == 0:
        raise ValueError(f"train_index has shape {tuple(index.shape)}; each of the K replicates "
                         f"needs at least one training image")
    if index.shape[0] != len(seeds):
        raise ValueError(f"train_index has {index.shape[0]} rows but {len(seeds)} seeds were "
                         f"given; give one seed per replicate")
    if int(index.min()) < 0 or int(index.max()) >= m:
        raise ValueError(f"train_index refers to rows {int(index.min())}..{int(index.max())} "
                         f"but the bank holds {m} images (rows 0..{m - 1})")
    if any(not isinstance(s, (int, np.integer)) for s in seeds):
        raise ValueError(f"seeds must be integers; got {list(seeds)!r}")
    return index.long()


# ----------------------------------------------------------------------------- pieces

def _stream_seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for one random stream (init, data) of one replicate."""
    state = np.random.SeedSequence([int(seed), stream]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _initial_model(name: str, seed: int, cfg: dict, img_size: int) -> nn.Module:
    """Replicate ``seed``'s starting network, the same on every device (built on the CPU)."""
    from .models import build_model

    with torch.random.fork_rng(devices=[]):
        # the CPU generator only (torch.manual_seed would reseed CUDA's too, outside the fork)
        torch.default_generator.manual_seed(_stream_seed(seed, 0))
        return build_model(name, num_classes=cfg["num_classes"], img_size=img_size,
                           pretrained=cfg["pretrained"], weights=cfg["weights"])


@contextlib.contextmanager
def _deterministic_kernels(on: bool):
    """Kernels that give the same bits on every run, for the duration; restored afterwards.

    cuDNN: its deterministic algorithms, no autotuning. Attention: the math backend
    (matmul, softmax, matmul) for any SDPA call, because the flash and memory-efficient
    backwards add into dQ with atomics in varying order; at the ViT's 65-257 tokens the
    fused kernels save little. (The stacked models themselves use timm's explicit
    attention, the same arithmetic: see :func:`mrilib.stacked.vmap_amp_safe`.)
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    with contextlib.ExitStack() as stack:
        if on:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        try:
            yield
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _lr_factor(cfg: dict, steps_per_epoch: int):
    """Multiplier of the base lr at each step (for ``LambdaLR``)."""
    # Over the most epochs, whatever early stopping does: a stopped replicate's steps are
    # then the first steps of the same replicate trained without stopping.
    total = cfg["epochs"] * steps_per_epoch
    warmup = min(cfg["warmup_epochs"] * steps_per_epoch, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg["schedule"] == "constant":
            return 1.0
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + np.cos(np.pi * min(progress, 1.0)))
    return factor


def _epoch_data(bank_x, bank_y, index, rngs, aug):
    """Replicate k's training images for one epoch, in its own shuffled order, augmented.

    The whole epoch is augmented at once per replicate rather than batch by batch: the
    draws are per image either way, and one call per replicate per epoch instead of one
    per step keeps the launch count of the hot loop down.
    """
    from .augment import augment_batch

    n = index.shape[1]
    perm = torch.stack([torch.randperm(n, generator=rng, device=index.device) for rng in rngs])
    rows = torch.gather(index, 1, perm)
    x = bank_x[rows]
    if aug != "none":
        x = torch.stack([augment_batch(aug, x[k], rng) for k, rng in enumerate(rngs)])
    return x, bank_y[rows]


# ----------------------------------------------------------------------------- the hot loop

def _train_group(name, cfg, bank_x, bank_y, index, val, test, seeds, aug, device, label,
                 report=None, keep_best=False):
    """Train one vmap group of replicates; per-epoch metrics as CPU tensors, plus the stack.

    ``report(epoch, metrics, stopper)``, if given, is called after each epoch's evaluation.
    The group ends when every replicate has stopped (:mod:`mrilib.stopping`); the returned
    ``last`` holds each replicate's last epoch (0-based) and the stack its weights then;
    ``keeper`` (:class:`BestWeights`) their best epoch's weights where testing waits for the
    end or ``keep_best`` asks for them, else None.
    """
    from .models import init_of

    # -- setup: K initial networks stacked, one Adam over the stacked tensors, K RNGs
    models = [_initial_model(name, s, cfg, bank_x.shape[-1]) for s in seeds]
    init = init_of(models[0])
    stack = Stack(models, device, im2col=cfg["im2col_stem"], loop=cfg["replicate_loop"],
                  streams=cfg["replicate_streams"])
    del models
    k, n = index.shape
    bs = cfg["batch_size"]
    steps = -(-n // bs)
    # one Adam over the stacked tensors and the schedule, run as cfg's step levers say
    step = Step(stack, cfg, device, _lr_factor(cfg, steps))
    rngs = [torch.Generator(device=device).manual_seed(_stream_seed(s, 1)) for s in seeds]
    metrics = {key: [] for key in ("train_loss", "val_loss", "val_acc", "val_confusion",
                                   "test_loss", "test_acc", "test_confusion")}

    test_each = cfg["test_every_epoch"]
    keeper = BestWeights(stack) if keep_best or not test_each else None
    stopper = EarlyStopping(stack, cfg["patience"])
    bar = tqdm(total=cfg["epochs"] * steps, desc=label, unit="step", leave=False, disable=None)
    for epoch in range(cfg["epochs"]):
        # -- one epoch's shuffled, augmented images per replicate, still uint8 on the device
        xs, ys = _epoch_data(bank_x, bank_y, index, rngs, aug)
        # Summed on the device, read once per epoch: no host sync inside the step loop.
        loss_sum = torch.zeros(k, device=device)
        for s in range(0, n, bs):
            # Named ranges for torch.profiler (`bench train --profile`); ~1 us when off.
            with record_function(PROFILE_STEP):
                # -- forward, loss, backward and Adam of all K replicates at once
                y = ys[:, s:s + bs]
                loss_sum += step(xs[:, s:s + bs], y) * y.shape[1]
            bar.update()
        # -- evaluation on the shared validation and test images (BatchNorm running stats)
        metrics["train_loss"].append(loss_sum / n)
        for part, (images, labels) in (("val", val), ("test", test))[:2 if test_each else 1]:
            with record_function(PROFILE_EVAL):
                part_loss, part_acc, part_conf = evaluate(stack, images, labels, cfg, device)
            metrics[f"{part}_loss"].append(part_loss)
            metrics[f"{part}_acc"].append(part_acc)
            metrics[f"{part}_confusion"].append(part_conf)
        # -- early stopping: stopped replicates keep stepping, their results end here
        stopper.update(epoch, metrics["val_loss"][-1])
        if keeper is not None:
            keeper.update(epoch, metrics["val_loss"][-1], stopper.trained)
        if report is not None:
            report(epoch, metrics, stopper)
        bar.set_postfix_str(f"{int(stopper.running.sum())}/{k} training")
        if stopper.all_stopped():
            break
    bar.close()
    step.release()
    stopper.restore()
    if not test_each:
        fill_test_metrics(stack, keeper, test, cfg, device, metrics, stopper.last)
    return ({key: torch.stack(v).cpu() for key, v in metrics.items()}, stack, init,
            stopper.last.cpu(), keeper)


def _epoch_reporter(on_epoch: Callable[[dict], Any], replicates: Sequence[int],
                    seeds: Sequence[int], epochs: int):
    """``report`` for :func:`_train_group` that hands ``on_epoch`` one dict per epoch.

    Validation only, never test metrics: a hook that sees an epoch's numbers is where
    a live plot goes, and it may not look at the test split. The dict lists the
    replicates that trained the epoch (a stopped one drops out, as its history ends);
    ``last`` is True at the group's last epoch. The values cross to the host in one copy,
    right after early stopping's check (which already reads one flag per epoch), so the
    step loop gains no synchronisation.
    """
    def report(epoch: int, metrics: dict, stopper) -> None:
        train_loss, val_loss, val_acc, trained, running = torch.stack(
            [metrics[key][-1].float() for key in ("train_loss", "val_loss", "val_acc")]
            + [stopper.trained.float(), stopper.running.float()]).cpu()
        keep = [j for j in range(len(seeds)) if trained[j]]
        on_epoch({"epoch": epoch + 1, "epochs": epochs,
                  "last": epoch + 1 == epochs or not bool(running.any()),
                  "replicates": [replicates[j] for j in keep],
                  "seeds": [int(seeds[j]) for j in keep],
                  **{key: [float(v[j]) for j in keep] for key, v in (
                      ("train_loss", train_loss), ("val_loss", val_loss), ("val_acc", val_acc))}})
    return report


def train_replicates(model: str, bank_images: torch.Tensor, bank_labels: torch.Tensor,
                     train_index: torch.Tensor, val, test, seeds: Sequence[int],
                     aug: str = "none", device: str | torch.device | None = None,
                     return_models: bool = False, models_at: str = "last",
                     on_epoch: Callable[[dict], Any] | None = None, **overrides: Any):
    """Train K replicates of ``model``; one record per replicate (see module docstring).

    ``bank_images`` uint8 ``[M, 1, H, W]`` and ``bank_labels`` ``[M]`` hold every image
    any replicate may train on (real and synthetic pooled); replicate k trains on rows
    ``train_index[k]`` with seed ``seeds[k]``. ``val`` and ``test`` are ``(images,
    labels)`` shared by all. ``overrides`` are :data:`DEFAULTS` keys (``epochs=3``...).
    Each record's ``seconds`` is its vmap group's wall time divided by the group's size
    (including the time ``on_epoch`` takes: time without a hook when speed matters).
    A replicate trains at most ``epochs`` epochs and, with a ``patience``, stops early on
    its validation loss (:mod:`mrilib.stopping`); its record's ``stopped_epoch`` is its
    last epoch, where its ``history`` and ``final`` end, and ``best`` its lowest
    validation loss up to then. With ``return_models=True`` also returns
    ``[(state_dict, config)]`` of each replicate's last epoch (``models_at="last"``) or of
    its best, the epoch its record is scored at (``"best"``), ready for
    :func:`save_checkpoint`. ``on_epoch``, if given, is called after every epoch of every
    vmap group with a dict: ``epoch`` (from 1), ``epochs`` (the most), ``last`` (the
    group's last epoch), the ``replicates`` (indices into ``seeds``) and ``seeds`` that
    trained it, and per replicate ``train_loss``, ``val_loss`` and ``val_acc`` (the same
    numbers as the records' ``history``); e.g. :class:`mrilib.plots.training.LiveLossPlot`.
    """
    cfg = model_settings(model, **overrides)
    if models_at not in ("last", "best"):
        raise ValueError(f"models_at={models_at!r}; use 'last' or 'best'")
    seeds = list(seeds)
    bank_images, bank_labels, index, parts = _checked_inputs(
        cfg, aug, bank_images, bank_labels, train_index, (val, test), seeds)
    device = resolve_device(device)
    check_levers(cfg, device)
    per_group = group_size(cfg["max_parallel"], device)

    # Everything the loop touches goes to the device once, as uint8 (a quarter of fp32).
    bank_x, bank_y = bank_images.to(device), bank_labels.to(device)
    val, test = [(x.to(device), y.to(device)) for x, y in parts]
    index = index.to(device)
    records, checkpoints = [], []
    with _deterministic_kernels(cfg["deterministic"]):
        for first in range(0, len(seeds), per_group):
            group = seeds[first:first + per_group]
            label = f"{model}/{aug} replicates {first}-{first + len(group) - 1}"
            report = None if on_epoch is None else _epoch_reporter(
                on_epoch, list(range(first, first + len(group))), group, cfg["epochs"])
            start = time.perf_counter()
            metrics, stack, init, last, keeper = _train_group(
                model, cfg, bank_x, bank_y, index[first:first + len(group)], val, test,
                group, aug, device, label, report, keep_best=models_at == "best")
            sync(device)
            base = {"model": model, "aug": aug, "init": init, **_record_settings(cfg),
                    "img_size": int(bank_images.shape[-1]), "n_train": int(index.shape[1]),
                    "seconds": (time.perf_counter() - start) / len(group),
                    "group_size": len(group), "device": device_name(device),
                    "torch": str(torch.__version__)}
            group_records = replicate_records(metrics, group, first, base, last)
            records += group_records
            if return_models:
                checkpoints += [(stack.state_dict(j, None if models_at == "last" else keeper.state),
                                 checkpoint_config(rec, models_at))
                                for j, rec in enumerate(group_records)]
    return (records, checkpoints) if return_models else records


def _checked_inputs(cfg, aug, bank_images, bank_labels, train_index, val_test, seeds):
    """``(bank_images, bank_labels, index, [val, test])`` checked; ValueError saying what is off."""
    from .augment import POLICIES

    if aug not in POLICIES:
        raise ValueError(f"unknown augmentation policy {aug!r}; choose one of "
                         f"{', '.join(POLICIES)}")
    bank_images = _checked_images(bank_images, "bank_images")
    bank_labels = _checked_labels(bank_labels, len(bank_images), cfg["num_classes"], "bank_labels")
    index = _checked_index(train_index, len(bank_images), seeds)
    parts = []
    for what, part in zip(("val", "test"), val_test):
        images = _checked_images(part[0], f"{what} images")
        if images.shape[-2:] != bank_images.shape[-2:]:
            raise ValueError(f"{what} images are {tuple(images.shape[-2:])} but the bank's are "
                             f"{tuple(bank_images.shape[-2:])}; load both at one size")
        parts.append((images, _checked_labels(part[1], len(images), cfg["num_classes"],
                                              f"{what} labels")))
    if bank_images.shape[-1] != bank_images.shape[-2]:
        raise ValueError(f"images must be square; got {tuple(bank_images.shape[-2:])}")
    return bank_images, bank_labels, index, parts


def _record_settings(cfg: dict) -> dict:
    """The settings in force that every record carries."""
    keep = ("epochs", "patience", "batch_size", "lr", "schedule", "warmup_epochs",
            "weight_decay", "amp", "num_classes", "test_every_epoch", *STEP_LEVERS)
    return {**{key: cfg[key] for key in keep},
            "weights": None if cfg["weights"] is None else str(cfg["weights"])}


def group_size(max_parallel: int | dict, device: torch.device) -> int:
    """Replicates per vmap group on ``device`` (``max_parallel`` may be keyed by device type)."""
    if isinstance(max_parallel, dict):
        return max_parallel.get(device.type, max_parallel["cpu"])
    return max_parallel
