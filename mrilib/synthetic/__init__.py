"""Synthetic MRI slices: generator backends, a resumable cache of their images, mixing.

One interface (:class:`Backend`, in :mod:`.base`), one module per backend (``local``:
a class-conditional DDPM in :mod:`.diffusion`; ``openai``: the OpenAI image API in
:mod:`.openai_backend`), loaded on demand through :func:`get_backend` so that importing
this package pulls in neither diffusers nor openai.
"""
from __future__ import annotations

from .base import (BACKENDS, Backend, BudgetExceeded, Refused, check_batch, get_backend,
                   image_id, to_gray128, variation_seed)
from .cache import cache_dir, cache_key, generate_cached, read_manifest
from .mixing import mixed_training_set

__all__ = ["BACKENDS", "Backend", "BudgetExceeded", "Refused", "cache_dir", "cache_key",
           "check_batch", "generate_cached", "get_backend", "image_id", "mixed_training_set",
           "read_manifest", "to_gray128", "variation_seed"]
