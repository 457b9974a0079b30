"""TEMP stand-in until r19-keys lands."""
import os
import platform


def device_name(device=None) -> str:
    import torch

    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} asked for, but torch sees no CUDA device "
                             f"here; use --device cpu or run on a machine with a GPU")
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
