"""The device a run uses, the name it is recorded under, and what a hot loop asks of it.

Every module resolves ``--device`` here, names the device here (results and benchmarks
are matched on that name, so there is one spelling), waits for queued kernels here
before reading a clock, and enters bf16 autocast here.
"""
from __future__ import annotations

import os
import platform

import torch

AMP_MODES = ("auto", "bf16", "off")  # "auto": bf16 on CUDA only; "bf16": on a CPU too


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when there is one, else the CPU; a one-line error for a bad one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {str(device)!r} is not a device torch knows; use cpu, cuda "
                         f"or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA device "
                         f"here; use --device cpu or run on a machine with a GPU")
    return device


def device_name(device: str | torch.device | None = None) -> str:
    """The accelerator's name (e.g. ``NVIDIA H100 80GB HBM3``), else the CPU's, one spelling."""
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return device.type


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it times the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def checked_amp(amp: str) -> str:
    """``amp`` if it is one of :data:`AMP_MODES`, else a ValueError saying which are."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp={amp!r}; use 'auto' (bf16 on CUDA), 'bf16' or 'off'")
    return amp


def autocast(device: torch.device, amp: str = "auto", cache: bool = True):
    """bf16 autocast on ``device`` as ``amp`` says: "auto" (CUDA only), "bf16" or "off".

    bf16 needs no loss scaling; on a CPU it is slower on most cores, hence off under "auto".
    ``cache=False`` for code captured in a CUDA graph, as PyTorch's graph docs require.
    """
    on = checked_amp(amp) == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on, cache_enabled=cache)
