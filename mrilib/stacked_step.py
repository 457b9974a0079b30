"""One training step of K stacked replicates: run eagerly, compiled, or replayed as a CUDA graph.

A step is the forward of every replicate on its own batch, each replicate's mean
cross-entropy, the backward of their sum and one Adam step over the stacked tensors
(Adam is elementwise: K independent Adams). Two run-only levers change how it runs, not
what it computes (the same arithmetic, summed in another order, as on another card; two
more, ``replicate_loop`` and ``replicate_streams``, are :class:`mrilib.stacked.Stack`'s):

- ``compile_step``: the forward and loss go through ``torch.compile`` (the backward
  follows through AOTAutograd); fewer, fused kernels. Static shapes, compiled once per
  architecture and number of replicates; an epoch's short last batch runs eagerly, so that
  the real fractions' different remainders compile nothing more.
- ``cuda_graph``: the whole step, backward and optimizer included, is recorded once as a
  CUDA graph and replayed for every full batch, so the host launches one graph instead
  of a thousand kernels (ViT-Tiny's step is host-bound). Its first steps run eagerly on
  a side stream (the warm-up capture needs), a short last batch runs eagerly, Adam is
  ``capturable`` with its learning rate a device tensor, which the schedule fills, and
  autocast keeps no cache of cast weights (as PyTorch's CUDA-graph docs require).

Augmentation is not in the step: an epoch's images are drawn and augmented on the device
beforehand (``train._epoch_data``), so the graph holds no random numbers. The default
(all off) is the eager step the engine always ran.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .device import autocast
from .stacked import replicate_logits

# Eager full-batch steps before a graph is captured (CUDA's warm-up: cuBLAS/cuDNN handles,
# autograd's stream bookkeeping, a compiled step's first run).
GRAPH_WARMUP_STEPS = 3


def forward_loss(template, params, buffers, x8, y, device, amp, loop=False, streams=None,
                 cache=True) -> torch.Tensor:
    """Each replicate's mean cross-entropy ``[K]`` on its batch ``x8`` ``[K, B, 1, H, W]``
    (uint8), in fp32 whatever autocast did; ``template`` runs in its current mode.
    ``loop``, ``streams``: as :func:`mrilib.stacked.replicate_logits` runs replicates.
    ``cache``: autocast's cache of cast weights (off where the step is graphed)."""
    from .models import normalize

    with autocast(device, amp, cache):
        logits = replicate_logits(template, params, buffers, normalize(x8), loop=loop,
                                  streams=streams)
    k = y.shape[0]
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                           reduction="none").view(k, -1).mean(1)


@functools.cache
def compiled_forward_loss():
    """:func:`forward_loss` under ``torch.compile``, built once per process so that its
    compiled code is reused by every group of the same architecture and shapes."""
    return torch.compile(forward_loss, dynamic=False)


def check_levers(cfg: dict, device: torch.device) -> None:
    """ValueError when a step lever cannot run on ``device``."""
    for lever in ("cuda_graph", "replicate_streams"):
        if cfg[lever] and device.type != "cuda":
            raise ValueError(f"{lever}=True needs a CUDA device, not {device.type!r}; "
                             f"drop it, or train with --device cuda")
    if cfg["replicate_streams"] and not cfg["replicate_loop"]:
        raise ValueError("replicate_streams=True puts each replicate of the loop on a stream "
                         "of its own; set replicate_loop=True too")
    if cfg["replicate_streams"] and cfg["compile_step"]:
        # dynamo would trace across the stream switches; the graph is what takes the launches
        raise ValueError("replicate_streams=True cannot be compiled; drop compile_step "
                         "(cuda_graph=True removes the launches instead)")


class Step:
    """``step(x8, y)``: one training step of ``stack``; returns the detached loss ``[K]``.

    Owns the optimizer and the schedule (``lr_factor(step)``, a multiplier of ``cfg["lr"]``
    per step), so that a graphed step can make them capturable.
    """

    def __init__(self, stack, cfg: dict, device: torch.device, lr_factor):
        self.stack, self.device, self.amp = stack, device, cfg["amp"]
        self.graphed = cfg["cuda_graph"]
        # A captured Adam reads its learning rate from the device, where the schedule
        # writes it; a Python float would be frozen into the graph at capture.
        lr = torch.tensor(cfg["lr"], device=device) if self.graphed else cfg["lr"]
        # fused=True on CUDA: one kernel for all tensors, a large share of a small model's step.
        self.opt = torch.optim.Adam(stack.params.values(), lr=lr,
                                    weight_decay=cfg["weight_decay"],
                                    fused=device.type == "cuda" or None,
                                    capturable=self.graphed)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor)
        self.forward = compiled_forward_loss() if cfg["compile_step"] else forward_loss
        self.full = None  # the full batch's shape, taken from the first step
        self.graph = self.static = None
        self.steps = 0

    def __call__(self, x8: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.stack.template.train()
        if self.forward is not forward_loss or self.graphed:
            # the epoch's slices have strides of its length: compiled code guards on them
            x8, y = x8.contiguous(), y.contiguous()
        if self.full is None:
            self.full = tuple(x8.shape)
        if tuple(x8.shape) != self.full:  # an epoch's short last batch
            loss = self._eager(x8, y, forward_loss)
        elif not self.graphed:
            loss = self._eager(x8, y, self.forward)
        elif self.graph is None and self.steps < GRAPH_WARMUP_STEPS:
            loss = self._on_side_stream(x8, y)
        else:
            loss = self._replayed(x8, y)
        self.sched.step()
        self.steps += 1
        return loss

    def release(self) -> None:
        """Drop the gradients (a graph's among them), so a finished group holds no memory."""
        self.opt.zero_grad(set_to_none=True)
        self.graph = self.static = None

    def _loss(self, x8, y, forward):
        """``forward`` (:func:`forward_loss` or its compiled self) of the stack's weights."""
        return forward(self.stack.template, self.stack.params, self.stack.buffers, x8, y,
                       self.device, self.amp, loop=self.stack.loop, streams=self.stack.streams,
                       cache=not self.graphed)

    def _eager(self, x8, y, forward):
        # backward of the sum: replicate k's tensors get exactly its own gradient
        loss = self._loss(x8, y, forward)
        self.opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        self.opt.step()
        return loss.detach()

    def _on_side_stream(self, x8, y):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            loss = self._eager(x8, y, self.forward)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return loss

    def _replayed(self, x8, y):
        if self.graph is None:
            self._capture(x8, y)
        x_in, y_in, loss = self.static
        x_in.copy_(x8)
        y_in.copy_(y)
        self.graph.replay()
        return loss.clone()  # the next replay overwrites the graph's own output

    def _capture(self, x8, y):
        """Record one whole step (forward, backward, Adam) on static inputs; nothing runs."""
        x_in, y_in = x8.clone(), y.clone()
        self.opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self._loss(x_in, y_in, self.forward)
            loss.sum().backward()
            self.opt.step()
        self.graph, self.static = graph, (x_in, y_in, loss.detach())
