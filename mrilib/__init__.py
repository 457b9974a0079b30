"""mrilib: re-run, inspect and extend Kwon (2024), synthetic augmentation for MRI classifiers.

The flat public API; each name lives in the module of its role. Names from the heavy
modules (timm, diffusers, openai, pytorch-grad-cam) are imported on first use, so that
``import mrilib`` and ``python -m mrilib --help`` stay fast.
"""
from __future__ import annotations

from ._lazy import lazy_names
from .config import settings
from .data import CLASSES, DataError, MRIData, load_mri, resolve_source
from .splits import Split, pool_class_sizes, pool_sample, split_counts, split_mri, stratified_sample
from .paths import ROOT, figures_dir, preset_name, results_dir

__version__ = "0.1.0"

_LAZY = {
    "subjects": ["SubjectRecovery", "recover_subjects", "subject_recovery", "subject_ids",
                 "subject_counts", "split_note", "check_disjoint", "duplicate_report",
                 "random_subject_labels", "random_label_check", "kept_random_label_check", "slice_order"],
    "augment": ["POLICIES", "augment_batch", "get_policy", "policy_draws"],
    "models": ["MODELS", "BasicCNN", "build_model", "init_of", "model_label", "normalize"],
    "synthetic": ["BACKENDS", "Backend", "BudgetExceeded", "Refused", "generate_cached",
                  "get_backend", "read_manifest", "to_gray128"],
    "synthetic.diffusion": ["LeakageError", "LocalDiffusion", "assert_no_leakage",
                            "generator_path", "train_for_sample", "train_generator"],
    "synthetic.mixing": ["mixed_training_set", "real_sample", "stack_repeats"],
    "synthetic.quality": ["background_levels", "class_fidelity", "memorization_distances",
                          "saved_sweeps", "strength_sweep"],
    "train": ["train_replicates", "real_fraction_index", "model_settings", "trained_classifier"],
    "checkpoints": ["save_checkpoint", "load_checkpoint"],
    "device": ["device_name", "resolve_device"],
    "cam": ["gradcam_maps", "gradcam_by_hand", "overlay", "cam_agreement",
            "agreement_vs_baseline", "agreement_of", "untrained_control", "against_control",
            "read_scan"],
    "grid": ["grid_cells", "run_grid", "grid_status", "load_results", "chapter_results"],
    "stats": ["bootstrap_median", "bootstrap_median_difference", "bootstrap_median_of_pairs",
              "cell_summary", "compare_cells", "synthetic_effects", "split_support"],
}
__getattr__, _LAZY_NAMES = lazy_names(__name__, _LAZY, globals())

__all__ = sorted([
    "CLASSES", "DataError", "MRIData", "ROOT", "Split", "figures_dir",
    "load_mri", "pool_class_sizes", "pool_sample", "preset_name", "resolve_source",
    "results_dir", "settings", "split_counts", "split_mri", "stratified_sample", *_LAZY_NAMES,
])
