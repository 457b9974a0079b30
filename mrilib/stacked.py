"""K replicates of one architecture as stacked tensors, run with ``vmap``, scored and kept.

:class:`Stack` holds the replicates' weights stacked (``torch.func.stack_module_state``)
and one template module that ``functional_call`` runs for all of them, so one kernel
launch serves K replicates. The template swaps two module types for versions that vmap
and bf16 accept together (:func:`vmap_amp_safe`) and, on request, computes one-channel
stem convolutions as unfold + matmul (:func:`im2col_stems`). Weights are untouched by
either swap. On request the replicates run one after another instead, each with dense
kernels on its slice of the stacked weights (:func:`replicate_logits`), and on CUDA each
on its own stream (:func:`on_streams`). :func:`evaluate` scores every replicate on one
shared batch;
:class:`BestWeights` keeps each replicate's lowest-validation-loss weights on the device;
:func:`replicate_records` turns the stacked metrics into one record per replicate.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.profiler import record_function

from .device import autocast
from .stopping import improved

# The profiler range around one evaluation pass, read by mrilib.bench.profile_parallel.
PROFILE_EVAL = "mrilib: evaluate"


class Fp32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalizes in fp32 whatever autocast made its input; same state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def vmap_amp_safe(template: nn.Module) -> nn.Module:
    """Route two ops of ``template`` around CUDA kernels that reject what vmap + bf16 give them.

    BatchNorm normalizes in fp32 (:class:`Fp32BatchNorm2d`): under CUDA autocast vmap's
    batch rule hands its kernel a bf16 weight beside fp32 running statistics. Attention
    uses timm's explicit form (q @ k^T, softmax, @ v; the same arithmetic as SDPA's math
    backend), whose softmax backward gets matching dtypes. Neither failure happens on a
    CPU; what was seen is in docs/decisions.md#training-engine. Weights are untouched.
    """
    for module in template.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = Fp32BatchNorm2d
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return template


class Im2colConv2d(nn.Conv2d):
    """A one-input-channel Conv2d computed as unfold + matmul; same parameters, same sums.

    Under vmap, K stacked one-channel convolutions become one grouped convolution with a
    single input channel per group, which PyTorch runs with its slow native depthwise
    kernel rather than cuDNN; unfolded, they are one batched matmul.
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


def im2col_stems(template: nn.Module) -> nn.Module:
    """Run ``template``'s one-input-channel convolutions as :class:`Im2colConv2d`."""
    for module in template.modules():
        if (type(module) is nn.Conv2d and module.in_channels == 1 and module.groups == 1
                and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
            module.__class__ = Im2colConv2d
    return template


def replicate_logits(template: nn.Module, params: dict, buffers: dict, x: torch.Tensor,
                     shared: bool = False, loop: bool = False,
                     streams: list | None = None) -> torch.Tensor:
    """``[K, B, C]`` logits of K stacked replicates run by ``template`` in its current mode.

    ``x``: per-replicate batches ``[K, B, ...]``, or one batch ``[B, ...]`` for all
    (``shared``). By default one ``vmap`` over the stacked weights, whose convolutions
    become grouped ones; with ``loop``, one ordinary call per replicate on its slice of
    them (dense kernels, K times the launches), the same sums otherwise; ``streams`` (K
    CUDA streams, with ``loop``): replicate j's call on ``streams[j]`` (:func:`on_streams`).
    """
    def call(p, b, xs):
        return functional_call(template, (p, b), (xs,))
    if not loop:
        # randomness="error": a model that draws random numbers in forward (dropout)
        # would break per-replicate determinism, so it must fail loudly, not vary quietly.
        return vmap(call, in_dims=(0, 0, None if shared else 0), randomness="error")(
            params, buffers, x)
    # unbind: its backward stacks the K gradients once (indexing would add K full-size ones)
    slices = {name: t.unbind(0) for name, t in params.items()}
    k = len(next(iter(slices.values())))

    def one(j):
        return call({name: s[j] for name, s in slices.items()},
                    {name: t[j] for name, t in buffers.items()}, x if shared else x[j])
    return torch.stack([one(j) for j in range(k)] if streams is None
                       else on_streams(one, x, streams))


def on_streams(one, x: torch.Tensor, streams: list) -> list[torch.Tensor]:
    """``[one(j) for j]``, each issued on ``streams[j]`` after the current stream's work so
    far; the current stream then waits for all. Their backward runs on the same streams
    (autograd's rule), so inside a CUDA graph the K replicates are K parallel branches.

    The batch ``x`` (made on the current stream, read on the others) and the outputs (the
    other way) are marked with ``record_stream``: the caching allocator keeps each stream's
    memory apart, and would otherwise hand a block to one stream while another reads it.
    """
    main = torch.cuda.current_stream(x.device)
    outs = []
    for j, stream in enumerate(streams):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            x.record_stream(stream)
            out = one(j)
        out.record_stream(main)
        outs.append(out)
    for stream in streams:
        main.wait_stream(stream)
    return outs


class Stack:
    """K replicates of one architecture as stacked tensors, run by one template module.

    ``loop``: each replicate called on its own (dense kernels) instead of one ``vmap``
    (:func:`replicate_logits`); weights and results are the same either way. ``streams``
    (CUDA, with ``loop``): each replicate's calls on a stream of its own.
    """

    def __init__(self, models: list[nn.Module], device: torch.device, im2col: bool = False,
                 loop: bool = False, streams: bool = False):
        self.template = vmap_amp_safe(copy.deepcopy(models[0]).to("meta"))
        if im2col:
            self.template = im2col_stems(self.template)
        if streams and not loop:
            raise ValueError("streams=True runs the loop's replicates on streams; pass loop=True")
        self.loop = loop
        # High priority: a pool of streams apart from the default-priority ones that graph
        # capture and the warm-up take, so no replicate shares theirs (and loses its overlap).
        self.streams = ([torch.cuda.Stream(device, priority=-1) for _ in models] if streams
                        else None)
        self.params, self.buffers = stack_module_state([m.to(device) for m in models])
        self.persistent = list(self.template.state_dict().keys())

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[K, B, C]`` logits of every replicate for one shared batch ``[B, 1, H, W]``."""
        self.template.eval()
        return replicate_logits(self.template, self.params, self.buffers, x, shared=True,
                                loop=self.loop, streams=self.streams)

    def state_dict(self, k: int, stacked: dict | None = None) -> dict[str, torch.Tensor]:
        """Replicate ``k``'s weights as an ordinary ``state_dict`` on the CPU (of the
        ``stacked`` tensors by name, e.g. :class:`BestWeights`'s, instead of the current)."""
        flat = {**self.params, **self.buffers} if stacked is None else stacked
        return {name: flat[name][k].detach().cpu().clone() for name in self.persistent}


@torch.no_grad()
def evaluate(stack: Stack, images, labels, cfg, device):
    """Per replicate: mean cross-entropy [K], accuracy [K], confusion [K, C, C] (true x pred)."""
    from .models import normalize

    c = cfg["num_classes"]
    k = stack.params[next(iter(stack.params))].shape[0]
    loss = torch.zeros(k, device=device)
    confusion = torch.zeros(k * c * c, dtype=torch.long, device=device)
    offsets = torch.arange(k, device=device)[:, None] * c * c
    for s in range(0, len(labels), cfg["eval_batch_size"]):
        x, y = images[s:s + cfg["eval_batch_size"]], labels[s:s + cfg["eval_batch_size"]]
        with autocast(device, cfg["amp"]):
            logits = stack.eval_logits(normalize(x)).float()
        per_image = F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none")
        loss += per_image.view(k, -1).sum(1)
        cells = offsets + y[None] * c + logits.argmax(-1)
        # counted in place: bincount sizes its output from the data, a host sync per batch
        confusion.scatter_add_(0, cells.flatten(), torch.ones_like(cells.flatten()))
    confusion = confusion.view(k, c, c)
    acc = confusion.diagonal(dim1=1, dim2=2).sum(1).float() / len(labels)
    return loss / len(labels), acc, confusion


class BestWeights:
    """Each replicate's weights at its lowest validation loss so far, kept on the device."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.loss = None
        self.epoch = None
        self.state = None

    def update(self, epoch: int, val_loss: torch.Tensor, trained: torch.Tensor) -> None:
        """Keep epoch ``epoch``'s weights of the ``trained`` replicates that improved
        (:func:`mrilib.stopping.improved`, the rule replicate_records applies)."""
        better = improved(val_loss, self.loss) & trained
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


def fill_test_metrics(stack: Stack, keeper: BestWeights, test, cfg, device, metrics,
                      last: torch.Tensor) -> None:
    """Test metrics at each replicate's last epoch (index ``last``) and best epoch only, into
    ``metrics``; NaN elsewhere (confusions: -1, which :func:`replicate_records` reads as
    "not tested"). The stack holds each replicate's weights of its last epoch."""
    epochs = len(metrics["val_loss"])
    with record_function(PROFILE_EVAL):
        final = evaluate(stack, *test, cfg, device)
    if bool((keeper.epoch == last).all()):
        best = final  # every replicate's best weights are its final ones
    else:
        params, buffers = stack.params, stack.buffers
        stack.params = {name: keeper.state[name] for name in params}
        stack.buffers = {name: keeper.state[name] for name in buffers}
        try:
            with record_function(PROFILE_EVAL):
                best = evaluate(stack, *test, cfg, device)
        finally:
            stack.params, stack.buffers = params, buffers
    k = final[0].shape[0]
    rows = torch.arange(k, device=final[0].device)
    for key, at_final, at_best in zip(("test_loss", "test_acc", "test_confusion"), final, best):
        fill = -1 if key == "test_confusion" else float("nan")
        out = torch.full((epochs, *at_final.shape), fill, dtype=at_final.dtype,
                         device=at_final.device)
        out[keeper.epoch.to(out.device), rows] = at_best
        out[last.to(out.device), rows] = at_final  # the final weights are the best where both
        metrics[key] = list(out)


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


def replicate_records(metrics, seeds, first, base_record, last=None):
    """One record per replicate from stacked per-epoch metrics ``[epochs, K, ...]``.

    ``last[j]``: replicate j's last trained epoch (0-based; default the last of all), where
    its history ends; its ``stopped_epoch`` is that epoch counted from 1.
    """
    records = []
    epochs = metrics["train_loss"].shape[0]
    for j, seed in enumerate(seeds):
        n = epochs if last is None else int(last[j]) + 1
        history = [{"epoch": e + 1, "train_loss": float(metrics["train_loss"][e, j]),
                    **{key: float(metrics[key][e, j]) for key in ("val_loss", "val_acc")},
                    **{key: _tested(metrics, key, e, j) for key in ("test_loss", "test_acc")}}
                   for e in range(n)]
        # Selection by validation loss only; the first such epoch on ties (argmin's rule).
        best = int(torch.argmin(metrics["val_loss"][:n, j]))
        records.append({**base_record, "replicate": first + j, "seed": int(seed),
                        "stopped_epoch": n, "history": history,
                        "final": _at_epoch(metrics, n - 1, j), "best": _at_epoch(metrics, best, j)})
    return records
