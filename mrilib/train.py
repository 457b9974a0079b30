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
``torch.Generator`` on the device, its batch order and augmentation draws: a replicate
gives the same history whether it is trained alone or beside others (up to float
rounding of the grouped kernels) and the same history twice on one device. On CUDA,
where training and evaluation run in bf16, that rounding is larger and compounds over
epochs: a replicate's numbers then depend a little on its group size (``max_parallel``,
not part of a grid's design hash) and on the device, within the spread between
repeats but not bit for bit, and a checkpoint reloaded in fp32 scores slightly
differently from the bf16 evaluation that recorded its metrics.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.profiler import record_function
from tqdm.auto import tqdm

from .config import settings
from .paths import atomic_write_bytes

# Names of the profiler ranges around one training step (all K replicates) and one
# evaluation pass, read by mrilib.bench.profile_parallel.
PROFILE_STEP = "mrilib: train step"
PROFILE_EVAL = "mrilib: evaluate"

# The thesis (ch. 4-5) says Adam and cross-entropy and nothing about epochs, batch size or
# learning rate, so these are choices. Each model's row is used unchanged in every data
# cell and augmentation policy compared, so differences between cells are not tuning.
#
# Budget behind "epochs": the chapter 7 grid is 3 policies x ~18 data cells x 20 repeats
# = ~1,080 replicates per model, each on up to 4,608 training images (the whole pool)
# and evaluated on 512 validation + 1,280 test images every epoch. Measured with
# torch.utils.flop_counter at 128x128: one training image costs 3.4 GFLOP in ResNet-18,
# 2.1 in ViT-Tiny, 0.15 in the basic CNN (forward + backward). At 3,000 images per
# replicate on average, 10 epochs of ResNet-18 over the grid is ~130 PFLOP, ViT-Tiny
# ~80 PFLOP: about 10 minutes together at 40% of an H100's dense bf16 peak, which is
# what makes 10 epochs (and not 30) the choice that keeps the whole grid feasible.
PER_MODEL = {
    "basic_cnn": {
        "epochs": 10,        # the reference protocol; the small CNN has converged by then
        "batch_size": 32,    # images per replicate per step; the PyTorch/Keras tutorial default
        "lr": 1e-3,          # Adam's default (Kingma & Ba 2015); plain Adam as the thesis says
        "lr_imagenet": None,  # no ImageNet weights exist for this network
        "schedule": "constant",  # the thesis describes plain Adam, no schedule
        "warmup_epochs": 0,
    },
    "resnet18": {
        "epochs": 10,        # budget above
        "batch_size": 32,    # same as the CNN: equal updates per epoch across models; with
                             # 20 replicates in parallel the GPU still sees 640 images per step
        "lr": 1e-3,          # Adam's default; BatchNorm makes ResNet-18 stable at it from scratch
        "lr_imagenet": 1e-4,  # fine-tuning ImageNet weights: 10x lower keeps the features
        "schedule": "constant",
        "warmup_epochs": 0,
    },
    "vit_tiny": {
        "epochs": 10,
        "batch_size": 32,
        "lr": 3e-4,          # transformers from scratch diverge at Adam's 1e-3 without tuning
        "lr_imagenet": 5e-5,  # usual ViT fine-tuning rate with Adam
        "schedule": "cosine",  # warmup then cosine decay: Adam's early steps are unstable for
        "warmup_epochs": 1,    # attention layers (Liu et al. 2020, Xiong et al. 2020)
    },
    "vit_small": {
        "epochs": 10,
        "batch_size": 32,
        "lr": 2e-4,          # 4x the parameters of ViT-Tiny: a lower rate for the same stability
        "lr_imagenet": 3e-5,
        "schedule": "cosine",
        "warmup_epochs": 1,
    },
}

DEFAULTS = {
    # None: take the model's value from "per_model"; a number overrides it for every model.
    "epochs": None,
    "batch_size": None,
    "lr": None,
    "schedule": None,          # "constant" or "cosine" (linear warmup, then cosine to 0)
    "warmup_epochs": None,     # epochs of linear warmup from lr/steps to lr
    "per_model": PER_MODEL,
    "weight_decay": 0.0,       # L2 in Adam; the thesis mentions none
    # The thesis fine-tunes ImageNet weights for ResNet-18 and the ViT. The project machines
    # cannot reach the Hugging Face hub, so the default trains from scratch and every
    # record says init "scratch"; pass pretrained=True (hub) or weights=PATH for ImageNet.
    "pretrained": False,
    "weights": None,           # path to timm's ImageNet state dict for the model
    "num_classes": 4,          # Mild, Moderate, Non, Very mild demented
    # Replicates per vmap group, by device type (or one number for all). CUDA: 20 = one
    # thesis cell at once, launches shared by all; lower it if memory runs out. CPU: 1,
    # because CPU kernels are compute-bound already and stacking only adds the layout
    # copies of grouped convolutions (measured 1.4-4x slower per replicate on 2 cores).
    "max_parallel": {"cuda": 20, "cpu": 1},
    "eval_batch_size": 256,    # images per evaluation forward (times the replicates in it)
    "amp": "auto",             # "auto": bf16 autocast on CUDA only; "bf16": also on CPU; "off"
    "deterministic": True,     # deterministic cuDNN and attention kernels: same seed, same
                               # history on a GPU too (see _deterministic_kernels)
    # True: the test split is evaluated after every epoch (a test curve in the history).
    # False: only for the final and the best-validation epoch of each replicate (the best
    # weights are kept on the device), which is all the records' test metrics need: the
    # same numbers, with 10-epoch evaluation 57% cheaper for the basic CNN (val 512 every
    # epoch, test 1,280 twice instead of ten times; benchmarks/README.md). The history
    # then holds test values at those epochs only (None elsewhere).
    "test_every_epoch": True,
    # True: convolutions with one input channel (the stems: the basic CNN's and ResNet-18's
    # conv1, the ViT's patch embedding) run as unfold + matmul (see _Im2colConv2d). Under
    # vmap such a convolution becomes a grouped one with a single channel per group, which
    # PyTorch sends to its native depthwise kernel: 12% of ResNet-18's device time and
    # 3.9 of the basic CNN's 17.2 ms per step on an H100 (benchmarks/README.md). The same
    # sums in another order (equal in fp32 to rounding; a test pins it), so not part of a
    # run's design. Off until a lease has measured it (`bench train --im2col-stem`).
    "im2col_stem": False,
}
PRESETS = {
    "quick": {"epochs": 1},  # CPU tests and seminars: seconds, not minutes
}

CHECKPOINT_FORMAT = "mrilib-checkpoint-v1"


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
    if cfg["schedule"] not in ("constant", "cosine"):
        raise ValueError(f"schedule={cfg['schedule']!r}; use 'constant' or 'cosine'")
    if cfg["amp"] not in ("auto", "bf16", "off"):
        raise ValueError(f"amp={cfg['amp']!r}; use 'auto' (bf16 on CUDA), 'bf16' or 'off'")
    groups = cfg["max_parallel"].values() if isinstance(cfg["max_parallel"], dict) else [
        cfg["max_parallel"]]
    for key, value in [(k, cfg[k]) for k in ("epochs", "batch_size", "eval_batch_size")] + [
            ("max_parallel", v) for v in groups]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r}; give a positive whole number")
    for key in ("im2col_stem", "test_every_epoch", "deterministic"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"{key}={cfg[key]!r}; give True or False")
    if not cfg["lr"] > 0:
        raise ValueError(f"lr={cfg['lr']!r}; give a positive learning rate such as 1e-3")
    return cfg


# ----------------------------------------------------------------------------- samples

def real_fraction_index(labels: torch.Tensor, pool: torch.Tensor, fraction: float,
                        seeds: Sequence[int], ids: Sequence[str] | None = None) -> torch.Tensor:
    """``[K, n]`` rows of ``labels``: one stratified ``fraction`` of ``pool`` per seed.

    Stratified samples of one pool and fraction all have the same size (the per-class
    counts do not depend on the seed), so they stack into the ``train_index`` of
    :func:`train_replicates`.
    """
    from .data import stratified_sample

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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when there is one, else the CPU; an error for an absent GPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA device "
                         f"here; use --device cpu or run on a machine with a GPU")
    return device


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


def _autocast(device: torch.device, amp: str):
    on = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


@contextlib.contextmanager
def _deterministic_kernels(on: bool):
    """Kernels that give the same bits on every run, for the duration; restored afterwards.

    cuDNN: its deterministic algorithms, no autotuning. Attention: the math backend
    (matmul, softmax, matmul) for any SDPA call, because the flash and memory-efficient
    backwards add into dQ with atomics in varying order; at the ViT's 65-257 tokens the
    fused kernels save little. (The stacked models themselves use timm's explicit
    attention, the same arithmetic: see ``_vmap_amp_safe``.)
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


class _Fp32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalizes in fp32 whatever autocast made its input; same state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _vmap_amp_safe(template: nn.Module) -> nn.Module:
    """Route two ops of ``template`` around CUDA kernels that reject what vmap + bf16 give them.

    Both were seen on an H200 (torch 2.11, CUDA 13) and neither happens on a CPU, where
    autocast runs BatchNorm in fp32 and the math attention keeps bf16 throughout:

    - BatchNorm: under CUDA autocast its input is bf16 beside fp32 weights and running
      statistics, and vmap's batch rule for its backward hands the CUDA kernel a weight
      in the input's dtype: "Expected running_mean to have type BFloat16 but got Float".
      Normalizing in fp32 (cast in, cast back) keeps every tensor of the op fp32, which
      is also how mixed precision usually treats BatchNorm. State dict unchanged.
    - Attention: SDPA's math backend calls ``_safe_softmax``, which on CUDA upcasts bf16
      to fp32 inside; its backward then gives CUDA's softmax backward an fp32 gradient
      for a bf16 input, which that kernel accepts for fp16 only ("expected input and
      grad types to match, or input to be at::Half and grad to be at::Float"). timm's
      explicit attention (q @ k^T, softmax, @ v) is the same arithmetic as the math
      backend, and autocast runs its softmax in fp32 as an ordinary op. Deterministic too.

    The template is the module ``functional_call`` runs; replicates' weights are untouched.
    """
    for module in template.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = _Fp32BatchNorm2d
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return template


class _Im2colConv2d(nn.Conv2d):
    """A one-input-channel Conv2d computed as unfold + matmul; same parameters, same sums.

    Written by hand because of vmap: K stacked one-channel convolutions reach PyTorch as
    one grouped convolution with a single input channel per group, which it runs with its
    native depthwise kernel rather than cuDNN (~2.8 TFLOP/s for ResNet-18's conv1 on an
    H100, its weight gradient slower still). Unfolded, the replicates' convolutions are
    one batched matmul.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # cast the image, not its 49x unfold
            x = x.to(torch.get_autocast_dtype(x.device.type))
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride,
                                                  self.padding, self.dilation)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        out = self.weight.flatten(1) @ cols  # [out, k*k] @ [N, k*k, L] -> [N, out, L]
        if self.bias is not None:
            out = out + self.bias[:, None].to(out.dtype)  # as autocast's conv: bf16 out
        return out.reshape(n, self.out_channels, (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                           (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def _im2col_stems(template: nn.Module) -> nn.Module:
    """Run ``template``'s one-input-channel convolutions as :class:`_Im2colConv2d`."""
    for module in template.modules():
        if (type(module) is nn.Conv2d and module.in_channels == 1 and module.groups == 1
                and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
            module.__class__ = _Im2colConv2d
    return template


class _Stack:
    """K replicates of one architecture as stacked tensors, run with ``vmap``."""

    def __init__(self, models: list[nn.Module], device: torch.device, im2col: bool = False):
        self.template = _vmap_amp_safe(copy.deepcopy(models[0]).to("meta"))
        if im2col:
            self.template = _im2col_stems(self.template)
        self.params, self.buffers = stack_module_state([m.to(device) for m in models])
        self.persistent = list(self.template.state_dict().keys())
        # randomness="error": a model that draws random numbers in forward (dropout)
        # would break per-replicate determinism, so it must fail loudly, not vary quietly.
        self._train = vmap(self._call, in_dims=(0, 0, 0), randomness="error")
        self._eval = vmap(self._call, in_dims=(0, 0, None), randomness="error")

    def _call(self, params, buffers, x):
        return functional_call(self.template, (params, buffers), (x,))

    def train_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[K, B, C]`` logits for per-replicate batches ``x`` ``[K, B, 1, H, W]``."""
        self.template.train()
        return self._train(self.params, self.buffers, x)

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[K, B, C]`` logits of every replicate for one shared batch ``[B, 1, H, W]``."""
        self.template.eval()
        return self._eval(self.params, self.buffers, x)

    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Replicate ``k``'s weights as an ordinary ``state_dict`` on the CPU."""
        flat = {**self.params, **self.buffers}
        return {name: flat[name][k].detach().cpu().clone() for name in self.persistent}


def _epoch_data(bank_x, bank_y, index, generators, aug):
    """Replicate k's training images for one epoch, in its own shuffled order, augmented.

    The whole epoch is augmented at once per replicate rather than batch by batch: the
    draws are per image either way, and one call per replicate per epoch instead of one
    per step keeps the launch count of the hot loop down.
    """
    from .augment import augment_batch

    n = index.shape[1]
    perm = torch.stack([torch.randperm(n, generator=g, device=index.device) for g in generators])
    rows = torch.gather(index, 1, perm)
    x = bank_x[rows]
    if aug != "none":
        x = torch.stack([augment_batch(aug, x[k], g) for k, g in enumerate(generators)])
    return x, bank_y[rows]


@torch.no_grad()
def _evaluate(stack: _Stack, images, labels, cfg, device):
    """Per replicate: mean cross-entropy [K], accuracy [K], confusion [K, C, C] (true x pred)."""
    from .models import normalize

    c = cfg["num_classes"]
    k = stack.params[next(iter(stack.params))].shape[0]
    loss = torch.zeros(k, device=device)
    confusion = torch.zeros(k * c * c, dtype=torch.long, device=device)
    offsets = torch.arange(k, device=device)[:, None] * c * c
    for s in range(0, len(labels), cfg["eval_batch_size"]):
        x, y = images[s:s + cfg["eval_batch_size"]], labels[s:s + cfg["eval_batch_size"]]
        with _autocast(device, cfg["amp"]):
            logits = stack.eval_logits(normalize(x)).float()
        per_image = F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none")
        loss += per_image.view(k, -1).sum(1)
        cells = offsets + y[None] * c + logits.argmax(-1)
        confusion += torch.bincount(cells.flatten(), minlength=k * c * c)
    confusion = confusion.view(k, c, c)
    acc = confusion.diagonal(dim1=1, dim2=2).sum(1).float() / len(labels)
    return loss / len(labels), acc, confusion


# ----------------------------------------------------------------------------- the hot loop

def _train_group(name, cfg, bank_x, bank_y, index, val, test, seeds, aug, device, label,
                 report=None):
    """Train one vmap group of replicates; per-epoch metrics as CPU tensors, plus the stack.

    ``report(epoch, metrics)``, if given, is called after each epoch's evaluation.
    """
    from .models import init_of, normalize

    # -- setup: K initial networks stacked, one Adam over the stacked tensors, generators
    models = [_initial_model(name, s, cfg, bank_x.shape[-1]) for s in seeds]
    init = init_of(models[0])
    stack = _Stack(models, device, im2col=cfg["im2col_stem"])
    del models
    k, n = index.shape
    bs = cfg["batch_size"]
    steps = -(-n // bs)
    # Adam's update is elementwise, so Adam over a [K, ...] tensor is K independent Adams.
    # fused=True on CUDA: one kernel for all tensors, a large share of a small model's step.
    opt = torch.optim.Adam(stack.params.values(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                           fused=device.type == "cuda" or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg, steps))
    generators = [torch.Generator(device=device).manual_seed(_stream_seed(s, 1)) for s in seeds]
    metrics = {key: [] for key in ("train_loss", "val_loss", "val_acc", "val_confusion",
                                   "test_loss", "test_acc", "test_confusion")}

    keeper = None if cfg["test_every_epoch"] else _BestWeights(stack)
    bar = tqdm(total=cfg["epochs"] * steps, desc=label, unit="step", leave=False, disable=None)
    for epoch in range(cfg["epochs"]):
        # -- one epoch's shuffled, augmented images per replicate, still uint8 on the device
        xs, ys = _epoch_data(bank_x, bank_y, index, generators, aug)
        # Summed on the device, read once per epoch: no host sync inside the step loop.
        loss_sum = torch.zeros(k, device=device)
        for s in range(0, n, bs):
            # Named ranges for torch.profiler (`bench train --profile`); ~1 us when off.
            with record_function(PROFILE_STEP):
                # -- forward of all K replicates at once; loss in fp32 whatever autocast did
                x, y = normalize(xs[:, s:s + bs]), ys[:, s:s + bs]
                with _autocast(device, cfg["amp"]):
                    logits = stack.train_logits(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                       reduction="none").view(k, -1).mean(1)
                # -- backward of the sum: replicate k's tensors get exactly its own gradient
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach() * y.shape[1]
            bar.update()
        # -- evaluation on the shared validation and test images (BatchNorm running stats)
        metrics["train_loss"].append(loss_sum / n)
        for part, (images, labels) in (("val", val), ("test", test))[:2 if keeper is None else 1]:
            with record_function(PROFILE_EVAL):
                part_loss, part_acc, part_conf = _evaluate(stack, images, labels, cfg, device)
            metrics[f"{part}_loss"].append(part_loss)
            metrics[f"{part}_acc"].append(part_acc)
            metrics[f"{part}_confusion"].append(part_conf)
        if keeper is not None:
            keeper.update(epoch, metrics["val_loss"][-1])
        if report is not None:
            report(epoch, metrics)
    bar.close()
    if keeper is not None:
        _test_final_and_best(stack, keeper, test, cfg, device, metrics)
    return {key: torch.stack(v).cpu() for key, v in metrics.items()}, stack, init


class _BestWeights:
    """Each replicate's weights at its lowest validation loss so far, kept on the device."""

    def __init__(self, stack: _Stack):
        self.stack = stack
        self.loss = None
        self.epoch = None
        self.state = None

    def update(self, epoch: int, val_loss: torch.Tensor) -> None:
        # argmin's rule, which _records applies to the history: strictly lower wins (the
        # first such epoch on ties), and a NaN (a diverged run) beats any number.
        better = (torch.ones_like(val_loss, dtype=torch.bool) if self.loss is None
                  else (val_loss < self.loss) | (val_loss.isnan() & ~self.loss.isnan()))
        current = {**self.stack.params, **self.stack.buffers}
        if self.state is None:
            self.state = {name: t.detach().clone() for name, t in current.items()}
            self.loss, self.epoch = val_loss.clone(), torch.zeros_like(val_loss, dtype=torch.long)
            return
        for name, t in current.items():
            mask = better.view(-1, *[1] * (t.dim() - 1))
            self.state[name] = torch.where(mask, t.detach(), self.state[name])
        self.loss = torch.where(better, val_loss, self.loss)
        self.epoch = torch.where(better, torch.full_like(self.epoch, epoch), self.epoch)


def _test_final_and_best(stack, keeper, test, cfg, device, metrics) -> None:
    """Test metrics at the final and each replicate's best epoch only; NaN (confusions:
    -1, which _tested reads as "not tested") elsewhere."""
    epochs = len(metrics["val_loss"])
    with record_function(PROFILE_EVAL):
        final = _evaluate(stack, *test, cfg, device)
    if bool((keeper.epoch == epochs - 1).all()):
        best = final  # every replicate's best weights are its final ones
    else:
        params, buffers = stack.params, stack.buffers
        stack.params = {name: keeper.state[name] for name in params}
        stack.buffers = {name: keeper.state[name] for name in buffers}
        try:
            with record_function(PROFILE_EVAL):
                best = _evaluate(stack, *test, cfg, device)
        finally:
            stack.params, stack.buffers = params, buffers
    k = final[0].shape[0]
    rows = torch.arange(k, device=final[0].device)
    for key, at_final, at_best in zip(("test_loss", "test_acc", "test_confusion"), final, best):
        fill = -1 if key == "test_confusion" else float("nan")
        out = torch.full((epochs, *at_final.shape), fill, dtype=at_final.dtype,
                         device=at_final.device)
        out[keeper.epoch.to(out.device), rows] = at_best
        out[-1] = at_final  # the final weights are the best ones where the last epoch won
        metrics[key] = list(out)


def _epoch_reporter(on_epoch: Callable[[dict], Any], replicates: Sequence[int],
                    seeds: Sequence[int], epochs: int):
    """``report`` for :func:`_train_group` that hands ``on_epoch`` one dict per epoch.

    Validation only, never test metrics: a hook that sees an epoch's numbers is where
    early stopping or a live plot goes, and neither may look at the test split. The
    three values cross to the host in one copy, right after evaluation (whose bincount
    already waits for the device), so the step loop gains no synchronisation.
    """
    def report(epoch: int, metrics: dict) -> None:
        train_loss, val_loss, val_acc = torch.stack(
            [metrics[key][-1].float() for key in ("train_loss", "val_loss", "val_acc")]).cpu()
        on_epoch({"epoch": epoch + 1, "epochs": epochs, "replicates": list(replicates),
                  "seeds": [int(s) for s in seeds], "train_loss": train_loss.tolist(),
                  "val_loss": val_loss.tolist(), "val_acc": val_acc.tolist()})
    return report


def _at_epoch(metrics, e: int, j: int) -> dict:
    """Replicate ``j``'s evaluation at epoch index ``e``, confusion matrices included."""
    out = {"epoch": e + 1}
    for key in ("val_loss", "val_acc", "test_loss", "test_acc"):
        out[key] = float(metrics[key][e, j])
    for key in ("test_confusion", "val_confusion"):
        out[key] = metrics[key][e, j].tolist()
    return out


def _tested(metrics, key: str, e: int, j: int) -> float | None:
    """A test metric of the history; None at an epoch the test split was not evaluated."""
    if int(metrics["test_confusion"][e, j].sum()) < 0:  # test_every_epoch=False's filler
        return None
    return float(metrics[key][e, j])


def _records(metrics, seeds, first, base_record):
    """One record per replicate from stacked per-epoch metrics ``[epochs, K, ...]``."""
    records = []
    epochs = metrics["train_loss"].shape[0]
    for j, seed in enumerate(seeds):
        history = [{"epoch": e + 1, "train_loss": float(metrics["train_loss"][e, j]),
                    **{key: float(metrics[key][e, j]) for key in ("val_loss", "val_acc")},
                    **{key: _tested(metrics, key, e, j) for key in ("test_loss", "test_acc")}}
                   for e in range(epochs)]
        # Selection by validation loss only; the first such epoch on ties (argmin's rule).
        best = int(torch.argmin(metrics["val_loss"][:, j]))
        records.append({**base_record, "replicate": first + j, "seed": int(seed),
                        "history": history, "final": _at_epoch(metrics, epochs - 1, j),
                        "best": _at_epoch(metrics, best, j)})
    return records


def train_replicates(model: str, bank_images: torch.Tensor, bank_labels: torch.Tensor,
                     train_index: torch.Tensor, val, test, seeds: Sequence[int],
                     aug: str = "none", device: str | torch.device | None = None,
                     return_models: bool = False,
                     on_epoch: Callable[[dict], Any] | None = None, **overrides: Any):
    """Train K replicates of ``model``; one record per replicate (see module docstring).

    ``bank_images`` uint8 ``[M, 1, H, W]`` and ``bank_labels`` ``[M]`` hold every image
    any replicate may train on (real and synthetic pooled); replicate k trains on rows
    ``train_index[k]`` with seed ``seeds[k]``. ``val`` and ``test`` are ``(images,
    labels)`` shared by all. ``overrides`` are :data:`DEFAULTS` keys (``epochs=3``...).
    Each record's ``seconds`` is its vmap group's wall time divided by the group's size
    (including the time ``on_epoch`` takes: time without a hook when speed matters).
    With ``return_models=True`` also returns ``[(state_dict, config)]`` of the final
    epoch, one per replicate, ready for :func:`save_checkpoint`. ``on_epoch``, if given,
    is called after every epoch of every vmap group with a dict: ``epoch`` (from 1),
    ``epochs``, the group's ``replicates`` (indices into ``seeds``) and ``seeds``, and
    per replicate ``train_loss``, ``val_loss`` and ``val_acc`` (the same numbers as the
    records' ``history``); e.g. :class:`mrilib.plots.training.LiveLossPlot`.
    """
    from .augment import POLICIES

    cfg = model_settings(model, **overrides)
    if aug not in POLICIES:
        raise ValueError(f"unknown augmentation policy {aug!r}; choose one of "
                         f"{', '.join(POLICIES)}")
    seeds = list(seeds)
    bank_images = _checked_images(bank_images, "bank_images")
    bank_labels = _checked_labels(bank_labels, len(bank_images), cfg["num_classes"], "bank_labels")
    index = _checked_index(train_index, len(bank_images), seeds)
    parts = []
    for what, part in (("val", val), ("test", test)):
        images = _checked_images(part[0], f"{what} images")
        if images.shape[-2:] != bank_images.shape[-2:]:
            raise ValueError(f"{what} images are {tuple(images.shape[-2:])} but the bank's are "
                             f"{tuple(bank_images.shape[-2:])}; load both at one size")
        parts.append((images, _checked_labels(part[1], len(images), cfg["num_classes"],
                                              f"{what} labels")))
    device = resolve_device(device)
    group_size = _group_size(cfg["max_parallel"], device)
    if bank_images.shape[-1] != bank_images.shape[-2]:
        raise ValueError(f"images must be square; got {tuple(bank_images.shape[-2:])}")

    # Everything the loop touches goes to the device once, as uint8 (a quarter of fp32).
    bank_x, bank_y = bank_images.to(device), bank_labels.to(device)
    val, test = [(x.to(device), y.to(device)) for x, y in parts]
    index = index.to(device)
    settings_used = {key: cfg[key] for key in ("epochs", "batch_size", "lr", "schedule",
                                               "warmup_epochs", "weight_decay", "amp",
                                               "num_classes", "test_every_epoch",
                                               "im2col_stem")}
    records, checkpoints = [], []
    with _deterministic_kernels(cfg["deterministic"]):
        for first in range(0, len(seeds), group_size):
            group = seeds[first:first + group_size]
            label = f"{model}/{aug} replicates {first}-{first + len(group) - 1}"
            report = None if on_epoch is None else _epoch_reporter(
                on_epoch, range(first, first + len(group)), group, cfg["epochs"])
            start = time.perf_counter()
            metrics, stack, init = _train_group(
                model, cfg, bank_x, bank_y, index[first:first + len(group)], val, test,
                group, aug, device, label, report)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - start) / len(group)
            base = {"model": model, "aug": aug, "init": init, **settings_used,
                    "weights": None if cfg["weights"] is None else str(cfg["weights"]),
                    "img_size": int(bank_images.shape[-1]), "n_train": int(index.shape[1]),
                    "seconds": seconds, "group_size": len(group), "device": _device_name(device),
                    "torch": str(torch.__version__)}
            group_records = _records(metrics, group, first, base)
            records += group_records
            if return_models:
                checkpoints += [(stack.state_dict(j), _checkpoint_config(rec))
                                for j, rec in enumerate(group_records)]
    return (records, checkpoints) if return_models else records


def _group_size(max_parallel: int | dict, device: torch.device) -> int:
    """Replicates per vmap group on ``device`` (``max_parallel`` may be keyed by device type)."""
    if isinstance(max_parallel, dict):
        return max_parallel.get(device.type, max_parallel["cpu"])
    return max_parallel


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------- checkpoints

def _checkpoint_config(record: dict) -> dict:
    """What a checkpoint must carry to be rebuilt and to say how it was trained."""
    keep = ("model", "aug", "init", "weights", "img_size", "num_classes", "seed", "replicate",
            "epochs", "batch_size", "lr", "schedule", "warmup_epochs", "weight_decay",
            "n_train", "torch")
    return {**{key: record[key] for key in keep}, "final": {
        key: record["final"][key] for key in ("epoch", "val_loss", "val_acc", "test_loss",
                                              "test_acc")}}


def save_checkpoint(path: str | os.PathLike, state_dict: dict, config: dict) -> Path:
    """Write ``state_dict`` and its ``config`` (model, img_size, num_classes...) atomically."""
    missing = [k for k in ("model", "img_size", "num_classes") if k not in config]
    if missing:
        raise ValueError(f"checkpoint config lacks {missing}; load_checkpoint needs them to "
                         f"rebuild the model")
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "config": dict(config),
                "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}, buf)
    return atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: str | os.PathLike, model: str | nn.Module | None = None):
    """``(model, config)`` from :func:`save_checkpoint`'s file, in eval mode on the CPU.

    ``model`` may be None (rebuilt from the config), a model name, or a module to load
    into; a checkpoint that does not fit it raises ``ValueError`` saying how.
    """
    from .models import build_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; write one with "
                                f"`python -m mrilib train ... --save DIR`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated, pickled objects...
        raise ValueError(f"{str(path)!r} is not a readable mrilib checkpoint: "
                         f"{type(err).__name__}: {err}") from err
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not an mrilib checkpoint (format "
                         f"{CHECKPOINT_FORMAT}); write one with save_checkpoint")
    config, state = blob["config"], blob["state_dict"]
    if model is None or isinstance(model, str):
        name = config["model"] if model is None else model
        model = build_model(name, num_classes=config["num_classes"], img_size=config["img_size"])
    problem = _state_mismatch(model.state_dict(), state)
    if problem:
        raise ValueError(f"checkpoint {str(path)!r} ({config['model']}, img_size "
                         f"{config['img_size']}, {config['num_classes']} classes) does not fit "
                         f"the model given: {problem}. Load it with the model and image size "
                         f"it was trained with, or leave model=None to rebuild it.")
    model.load_state_dict(state)
    model.mrilib_init = config.get("init", "scratch")  # the run's start, not the rebuild's
    return model.eval(), config


def _state_mismatch(expected: dict, found: dict) -> str:
    """A short description of how ``found`` differs from ``expected``; '' when it fits."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in found and found[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    if extra:
        parts.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[:3]}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:2]}")
    return "; ".join(parts)


def trained_classifier(data, split, train_index: torch.Tensor, model: str = "basic_cnn",
                       seed: int = 0, aug: str = "none", device=None, **overrides):
    """``(model, record)`` trained on ``data`` rows ``train_index``; cached under cache/classifiers/.

    The cache key covers the training images' ids in the order given (the order sets
    the batches), their size, the device type (CPU and CUDA draw different random
    streams and CUDA trains in bf16), model, seed, policy and the settings in force, so
    notebooks that need the same classifier train it once.
    """
    import hashlib
    import json

    from .paths import CACHE

    cfg = model_settings(model, **overrides)
    ids = [data.ids[i] for i in torch.as_tensor(train_index).tolist()]
    # test_every_epoch changes which epochs are tested, not the weights
    blob = json.dumps({"ids": ids, "model": model, "seed": seed, "aug": aug,
                       "split_seed": split.seed, "img_size": int(data.images.shape[-1]),
                       "device": resolve_device(device).type,
                       "cfg": {k: str(v) for k, v in cfg.items() if k != "test_every_epoch"}},
                      sort_keys=True)
    path = CACHE / "classifiers" / f"{model}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}.pt"
    record_path = path.with_suffix(".json")
    if path.exists() and record_path.exists():
        net, _ = load_checkpoint(path)
        return net, json.loads(record_path.read_text())
    (record,), ((state, config),) = train_replicates(
        model, data.images, data.labels, torch.as_tensor(train_index)[None],
        (data.images[split.val], data.labels[split.val]),
        (data.images[split.test], data.labels[split.test]), seeds=[seed], aug=aug,
        device=device, return_models=True, **overrides)
    save_checkpoint(path, state, config)
    atomic_write_bytes(record_path, json.dumps(record, default=str).encode())
    net, _ = load_checkpoint(path)
    return net, record
