"""mrilib: re-run, inspect and extend Kwon (2024), synthetic augmentation for MRI classifiers.

The flat public API; each name lives in the module of its role.
"""
from .augment import POLICIES, augment_batch, get_policy, policy_draws
from .config import settings
from .data import (CLASSES, DataError, MRIData, Split, duplicate_report, load_mri,
                   resolve_source, split_counts, split_mri, stratified_sample)
from .models import MODELS, BasicCNN, build_model, init_of, model_label, normalize
from .paths import ROOT, figures_dir, preset_name, results_dir

__version__ = "0.1.0"

__all__ = [
    "MODELS", "POLICIES", "BasicCNN", "augment_batch", "build_model", "get_policy", "init_of",
    "model_label", "normalize", "policy_draws",
    "CLASSES", "DataError", "MRIData", "ROOT", "Split", "duplicate_report", "figures_dir",
    "load_mri", "preset_name", "resolve_source", "results_dir", "settings", "split_counts",
    "split_mri", "stratified_sample",
]
