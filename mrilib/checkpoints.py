"""A trained classifier on disk: its weights and the config that rebuilds and describes it."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch
from torch import nn

from .config import hash8
from .paths import atomic_write_bytes

CHECKPOINT_FORMAT = "mrilib-checkpoint-v1"
WRITE_ONE = ("write one with `python -m mrilib train ... --save DIR` on the command line, "
             "save_checkpoint in Python")


def checkpoint_config(record: dict, at: str = "last") -> dict:
    """What a checkpoint must carry to be rebuilt and to say how it was trained; ``at``:
    whether its weights are of the record's last epoch or its best (``scored``: their
    numbers)."""
    keep = ("model", "aug", "init", "weights", "img_size", "num_classes", "seed", "replicate",
            "epochs", "batch_size", "lr", "schedule", "warmup_epochs", "weight_decay",
            "n_train", "torch")
    return {**{key: record[key] for key in keep},
            **{key: record.get(key) for key in ("patience", "stopped_epoch")},
            "weights_at": at, **{stage: {key: record[stage][key] for key in (
                "epoch", "val_loss", "val_acc", "test_loss", "test_acc")}
                for stage in (("final", "best") if at == "best" else ("final",))}}


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
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; {WRITE_ONE}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated, pickled objects...
        first = (str(err).splitlines() or [""])[0]  # one line: the CLI prints one
        raise ValueError(f"{str(path)!r} is not a readable mrilib checkpoint "
                         f"({type(err).__name__}: {first}), e.g. cut short by a copy; copy "
                         f"it again, or {WRITE_ONE}") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not an mrilib checkpoint (format "
                         f"{CHECKPOINT_FORMAT}); {WRITE_ONE}")
    config, state = blob["config"], blob["state_dict"]
    given = model is not None
    if model is None or isinstance(model, str):
        name = config["model"] if model is None else model
        model = build_model(name, num_classes=config["num_classes"], img_size=config["img_size"])
    problem = _state_mismatch(model.state_dict(), state)
    if problem:
        raise ValueError(f"checkpoint {str(path)!r} ({config['model']}, img_size "
                         f"{config['img_size']}, {config['num_classes']} classes) does not fit "
                         f"{'the model given' if given else 'the model its config names'}: "
                         f"{problem}. {_mismatch_fix(given)}")
    model.load_state_dict(state)
    model.mrilib_init = config.get("init", "scratch")  # the run's start, not the rebuild's
    return model.eval(), config


def _mismatch_fix(given: bool) -> str:
    """What to do when the weights do not fit: a model passed in Python, or the config's own."""
    if given:
        return ("Load it with the model and image size it was trained with, or leave "
                "model=None to rebuild the model its config names.")
    return ("Its config and its weights disagree, so the file was not written by one "
            f"training run: {WRITE_ONE}.")


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


# ----------------------------------------------------------------------------- the cache

def trained_classifier(data, split, train_index: torch.Tensor, model: str = "basic_cnn",
                       seed: int = 0, aug: str = "none", device=None, **overrides):
    """``(model, record)`` trained on ``data`` rows ``train_index``, cached in cache/classifiers/.

    Notebooks that need the same classifier train it once (see :func:`_classifier_path`).
    Its weights are those of its best validation epoch, the one its record is scored at.
    """
    from .train import train_replicates
    path = _classifier_path(data, split, train_index, model, seed, aug, device, **overrides)
    record_path = path.with_suffix(".json")
    if path.exists() and record_path.exists():
        net, config = load_checkpoint(path)
        # cached before weights were kept at the best epoch: its last epoch's, trained again
        if config.get("weights_at") == "best":
            return net, json.loads(record_path.read_text())
    (record,), ((state, config),) = train_replicates(
        model, data.images, data.labels, torch.as_tensor(train_index)[None],
        (data.images[split.val], data.labels[split.val]),
        (data.images[split.test], data.labels[split.test]), seeds=[seed], aug=aug,
        device=device, return_models=True, models_at="best", **overrides)
    save_checkpoint(path, state, config)
    atomic_write_bytes(record_path, json.dumps(record, default=str).encode())
    net, _ = load_checkpoint(path)
    return net, record


def _classifier_path(data, split, train_index, model, seed, aug, device, **overrides) -> Path:
    """``cache/classifiers/<model>-<key>.pt`` for a classifier trained as asked.

    The key covers the training images' ids in the order given (the order sets the
    batches), their size, the device type (CPU and CUDA draw different random streams and
    CUDA trains in bf16), model, seed, policy and :func:`design_settings`.
    """
    from .device import resolve_device
    from .paths import CACHE
    from .train import design_settings

    ids = [data.ids[i] for i in torch.as_tensor(train_index).tolist()]
    key = hash8({"ids": ids, "model": model, "seed": seed, "aug": aug, "split_seed": split.seed,
                 "img_size": int(data.images.shape[-1]), "device": resolve_device(device).type,
                 "settings": design_settings(model, **overrides)})
    return CACHE / "classifiers" / f"{model}-{key}.pt"
