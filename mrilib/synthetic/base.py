"""The one interface every image generator implements, and the registry of generators.

A backend turns source slices into variations of them::

    backend = get_backend("local", ...)
    out = backend.generate(images, labels, seeds)       # one variation per input
    out = backend.variations(images, labels, n, seed)   # n variations per input

Images are uint8 ``[B, 1, 128, 128]`` in and out. ``generate`` makes each output a
deterministic function of (image, label, seed) where the backend allows it (the local
diffusion model does; the OpenAI API does not), independent of how inputs are batched.
``params()`` returns everything that determines the outputs, so that the cache
(:mod:`mrilib.synthetic.cache`) can key stored images by it.

A backend that may refuse single images (a content filter) raises :class:`Refused`
from ``generate`` and sets ``max_batch = 1`` so that a refusal is about one image.
"""
from __future__ import annotations

import hashlib
import importlib
import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..data import as_gray_square

SIZE = 128  # pixels per side of every image a backend takes and returns


class Refused(Exception):
    """The backend declined to make this image (e.g. a content policy); ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BudgetExceeded(ValueError):
    """The next call would exceed a spending limit the user set; nothing was sent."""


class Backend:
    """Base class: subclasses set ``name`` and implement ``params`` and ``generate``."""

    name: str = ""
    # Largest batch ``generate`` should be given; None = any. Paid backends use 1 so the
    # cache stores each image before the next one is paid for.
    max_batch: int | None = None

    def params(self) -> dict:
        """Everything that determines the outputs, JSON-able (model, strength, checkpoint...)."""
        raise NotImplementedError

    def generate(self, images: torch.Tensor, labels: torch.Tensor,
                 seeds: Sequence[int]) -> torch.Tensor:
        """One variation per input: uint8 [B,1,128,128] from uint8 [B,1,128,128], int64 [B]."""
        raise NotImplementedError

    def cost_estimate(self, n_images: int) -> dict | None:
        """What ``n_images`` would cost ({"usd", "usd_per_image", "note"}); None when free."""
        return None

    def announce(self, n_images: int) -> dict | None:
        """Print (stderr) what ``n_images`` will cost, before any paid call; the estimate."""
        est = self.cost_estimate(n_images)
        if est is not None:
            print(f"{self.name}: {n_images} image(s), estimated ${est['usd']:.2f} "
                  f"({est.get('note', '')})", file=sys.stderr, flush=True)
        return est

    def variations(self, images: torch.Tensor, labels: torch.Tensor, n: int,
                   seed: int) -> torch.Tensor:
        """``n`` variations per input, uint8 [B, n, 1, 128, 128]; seeds per (image, k).

        Image ids are content hashes, so a source gets the same seeds in any batch. A
        refusal ends the call: for paid or refusing backends use
        :func:`mrilib.synthetic.generate_cached`, which stores each image as it arrives.
        """
        images, labels = check_batch(images, labels)
        if n < 1:
            raise ValueError(f"n={n}: ask for at least one variation per image")
        ids = [image_id(img) for img in images]
        flat_images = images.repeat_interleave(n, dim=0)
        flat_labels = labels.repeat_interleave(n, dim=0)
        seeds = [variation_seed(seed, i, k) for i in ids for k in range(n)]
        step = self.max_batch or len(seeds)
        out = [self.generate(flat_images[a:a + step], flat_labels[a:a + step], seeds[a:a + step])
               for a in range(0, len(seeds), step)]
        return torch.cat(out).reshape(len(images), n, 1, SIZE, SIZE)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params()!r})"


def check_batch(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` and ``labels`` as uint8 [B,1,128,128] and int64 [B], or a ValueError."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (1, SIZE, SIZE):
        raise ValueError(f"images must be uint8 [B, 1, {SIZE}, {SIZE}], got {images.dtype} "
                         f"{list(images.shape)}; load them with mrilib.load_mri(size={SIZE})")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"labels must be one class id per image ({len(images)}), got shape "
                         f"{list(labels.shape)}")
    return images, labels.long()


def image_id(image: torch.Tensor) -> str:
    """A content hash of one uint8 image, used as its id where no dataset id is given."""
    return hashlib.sha1(image.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def variation_seed(seed: int, source_id: str, k: int) -> int:
    """The seed of variation ``k`` of ``source_id``: the same on every machine and batching."""
    digest = hashlib.sha256(f"{int(seed)}/{source_id}/{int(k)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)  # fits torch.manual_seed


def to_gray128(picture: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [1, 128, 128] from a PIL image or array of any size and mode (padded to square)."""
    if isinstance(picture, torch.Tensor):
        picture = picture.detach().cpu().numpy()
    if isinstance(picture, np.ndarray):
        picture = _pil_from_array(picture)
    if not isinstance(picture, Image.Image):
        raise TypeError(f"to_gray128 takes a PIL image, numpy array or tensor, "
                        f"not {type(picture).__name__}")
    gray, _ = as_gray_square(picture, SIZE)
    return torch.from_numpy(gray.copy()).unsqueeze(0)


def _pil_from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channels-first, as tensors come
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"cannot read an image from an array of shape {list(arr.shape)}; "
                         f"give [H, W], [H, W, C] or [C, H, W]")
    if arr.dtype != np.uint8:
        # Floats in 0..1 are the usual convention; anything else is stretched to 0..255.
        arr = arr.astype(np.float64)
        lo, hi = (0.0, 1.0) if arr.min() >= 0 and arr.max() <= 1 else (arr.min(), arr.max())
        arr = np.round((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
    return Image.fromarray(arr)


# ----------------------------------------------------------------------------- registry

def _lazy(path: str) -> Callable[..., Backend]:
    """A factory that imports ``module:attr`` only when called, so backends load on demand."""
    module, attr = path.split(":")

    def factory(**kwargs: Any) -> Backend:
        return getattr(importlib.import_module(module), attr)(**kwargs)

    factory.__qualname__ = factory.__name__ = attr
    factory.target = path  # what it will import, readable without importing it
    return factory


BACKENDS: dict[str, Callable[..., Backend]] = {
    "local": _lazy("mrilib.synthetic.diffusion:LocalDiffusion"),
    "openai": _lazy("mrilib.synthetic.openai_backend:OpenAIBackend"),
}


def get_backend(name: str, **kwargs: Any) -> Backend:
    """The backend registered as ``name``, built with ``kwargs``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](**kwargs)
