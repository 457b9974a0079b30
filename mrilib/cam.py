"""Grad-CAM for the three classifiers (thesis chapter 3), and how far two CAMs agree.

:func:`gradcam_maps` is the one used everywhere: pytorch-grad-cam's ``GradCAM`` at the
layer :func:`target_layer` picks (the basic CNN's ``act2``, ResNet-18's ``layer4``, the
ViT's last ``blocks[-1].norm1`` with :func:`reshape_transform` laying its tokens out on
the patch grid). :func:`gradcam_by_hand` is the thesis's three steps written out for
teaching; a test holds it to the library within 1e-5. :func:`overlay` draws a CAM over a
grayscale scan. :func:`cam_agreement` and :func:`agreement_vs_baseline` measure what the
thesis judged by eye: do a scan and its synthetic variation make the model look at the
same places, more than two different scans of the same class do?

Every map is float32 ``[B, H, W]`` in [0, 1], scaled as pytorch-grad-cam scales it.

Kept as one module (646 lines): the maps, their drawing and their agreement statistics
are one chapter of the thesis and are read together; splitting would scatter chapter 3.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .config import settings
from .data import CLASSES, read_image
from .models import normalize
from .stats import DEFAULTS as STATS_DEFAULTS
from .stats import PRESETS as STATS_PRESETS
from .stats import bootstrap_median, bootstrap_median_difference, bootstrap_median_of_pairs

# The Grad-CAM layer of each model in mrilib.models.MODELS, by registry name. One entry
# per model: the last feature maps that still have a spatial layout.
LAYERS = {
    # The rectified maps of the last convolution, 32 x S/2 x S/2 (Grad-CAM's feature maps
    # are rectified activations; conv2's raw output agreed poorly with them, Pearson
    # 0.1-0.8 on an untrained model)
    "basic_cnn": "act2",
    "resnet18": "layer4",            # last residual stage, 512 x S/32 x S/32
    "vit_tiny": "blocks.-1.norm1",   # tokens entering the last attention: S/16 x S/16 grid
    "vit_small": "blocks.-1.norm1",
}
METRICS = ("pearson", "iou")  # what cam_agreement returns, in this order
# The two ends of the scale the thesis contrasts (chapter 3.2).
EXTREMES = ("Moderate_Demented", "Non_Demented")

# Bootstrap resamples and coverage come from mrilib.stats (its DEFAULTS and PRESETS).
DEFAULTS = {
    "top_frac": 0.2,   # share of pixels in a CAM's "top region" for the IoU
    "batch_size": 64,  # scans per Grad-CAM forward/backward; bounds memory, not results
}
PRESETS: dict = {}


# ----------------------------------------------------------------------------- inputs

def _squash(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def class_index(name_or_index, classes: Sequence[str] = CLASSES) -> int:
    """The index of a class given as an index, a digit string or a name.

    Names ignore case, underscores, hyphens and spaces: ``"Moderate_Demented"``,
    ``"ModerateDemented"`` and ``"moderate demented"`` are all index 1.
    """
    listing = ", ".join(f"{i} {c}" for i, c in enumerate(classes))
    value = name_or_index.item() if isinstance(name_or_index, torch.Tensor) else name_or_index
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if 0 <= value < len(classes):
            return int(value)
        raise ValueError(f"class index {value} is out of range; give one of {listing}")
    if isinstance(value, str):
        for i, c in enumerate(classes):
            if _squash(c) == _squash(value):
                return i
    raise ValueError(f"unknown class {name_or_index!r}; give a name or index: {listing}")


def read_scan(path, size: int = 128) -> torch.Tensor:
    """uint8 ``[1, size, size]`` from any grayscale or RGB image file, padded to square."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scan {str(path)!r} does not exist; give the path of a "
                                f"grayscale or RGB image file (PNG, JPEG, ...)")
    gray, _ = read_image(path, size)  # DataError naming the file if it is not an image
    return torch.from_numpy(gray.copy())[None]


def _checked_scans(x_uint8: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x_uint8)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 1 or len(x) == 0:
        raise ValueError(f"scans must be uint8 [B, 1, H, W] as load_mri returns them, got "
                         f"{x.dtype} {list(x.shape)}; for one scan use scan[None]")
    return x


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _evaluating(model: nn.Module):
    """Eval mode for the duration, then the caller's mode back.

    pytorch-grad-cam switches the model to eval and leaves it there; a CAM taken between
    training steps must not silently turn dropout off for the rest of training.
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _model_input(model: nn.Module, scans: torch.Tensor) -> torch.Tensor:
    # requires_grad on the input keeps a graph to the target layer even when the
    # weights are frozen (a fine-tuned head on a frozen backbone).
    return normalize(scans.to(_device(model))).requires_grad_(True)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    try:
        return model(x)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, AssertionError) as err:  # torch's and timm's shape complaints
        raise ValueError(f"the model cannot take scans of shape {list(x.shape)} "
                         f"({type(err).__name__}: {err}); load or resize the scans to the "
                         f"image size the model was built for") from err


def _batch_starts(scans: torch.Tensor, batch_size: int) -> range:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; give a positive whole number of scans")
    return range(0, len(scans), batch_size)


def class_probabilities(model: nn.Module, x_uint8: torch.Tensor,
                        batch_size: int = DEFAULTS["batch_size"]) -> torch.Tensor:
    """Softmax probabilities ``[B, num_classes]`` (on the CPU) for uint8 scans."""
    scans = _checked_scans(x_uint8)
    with _evaluating(model), torch.no_grad():
        logits = [_logits(model, normalize(scans[i:i + batch_size].to(_device(model))))
                  for i in _batch_starts(scans, batch_size)]
    return torch.softmax(torch.cat(logits).float(), dim=1).cpu()


def _target_indices(targets, scores: torch.Tensor, classes: Sequence[str]) -> list[int]:
    """One class index per image: the prediction (None), one class for all, or one each.

    ``scores`` are the model's logits or probabilities ``[B, num_outputs]``.
    """
    n, num_outputs = scores.shape
    if targets is None:
        return scores.argmax(dim=1).tolist()
    if isinstance(targets, (str, int, np.integer)) or (
            isinstance(targets, torch.Tensor) and targets.ndim == 0):
        targets = [targets] * n
    if len(targets) != n:
        raise ValueError(f"got {len(targets)} targets for {n} scans; give one class per "
                         f"scan, a single class for all, or None for the predicted class")
    out = [class_index(t, classes) for t in targets]
    if max(out) >= num_outputs:
        raise ValueError(f"class index {max(out)} does not exist in a model with "
                         f"{num_outputs} outputs; pass the classes it was trained on")
    return out


def contrast_class(predicted, true, classes: Sequence[str] = CLASSES) -> int:
    """The extreme class to set against the prediction (thesis ch. 3.2): the other end.

    Moderate <-> Non demented from the predicted class; when the prediction is a middle
    class, the other end from the true class; when both are middle classes, Moderate.
    """
    ends = [class_index(end, classes) for end in EXTREMES]
    for anchor in (class_index(predicted, classes), class_index(true, classes)):
        if anchor in ends:
            return ends[1 - ends.index(anchor)]
    return ends[0]


# ----------------------------------------------------------------------------- layers

def _submodule(model: nn.Module, dotted: str) -> nn.Module:
    """``model.get_submodule`` that also takes negative indices (``blocks.-1.norm1``)."""
    module = model
    for part in dotted.split("."):
        if re.fullmatch(r"-?\d+", part) and isinstance(module, (nn.Sequential, nn.ModuleList)):
            module = module[int(part)]
        elif part in module._modules:
            module = module._modules[part]
        else:
            examples = ", ".join(name for name, _ in list(model.named_modules())[1:6])
            raise ValueError(f"layer {dotted!r} not found in {type(model).__name__} (no "
                             f"{part!r}); give a dotted name from model.named_modules(), "
                             f"e.g. {examples}")
    return module


def target_layer(model: nn.Module, layer: str | nn.Module | None = None) -> nn.Module:
    """The layer whose feature maps Grad-CAM weighs: ``layer`` if given, else :data:`LAYERS`."""
    if isinstance(layer, nn.Module):
        return layer
    if layer is None:
        name = getattr(model, "mrilib_name", None)
        if name not in LAYERS:
            raise ValueError(f"no default Grad-CAM layer for {type(model).__name__} "
                             f"(mrilib name {name!r}); build it with mrilib.models.build_model "
                             f"or pass layer=NAME, a dotted name from model.named_modules()")
        layer = LAYERS[name]
    return _submodule(model, layer)


def layer_name(model: nn.Module, layer: nn.Module) -> str:
    """The dotted name of ``layer`` inside ``model`` (for titles and logs)."""
    for name, module in model.named_modules():
        if module is layer:
            return name
    raise ValueError(f"{type(layer).__name__} is not a layer of {type(model).__name__}")


def reshape_transform(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a ViT, tokens ``[B, N, C]`` to maps ``[B, C, h, w]`` on its patch grid; None for CNNs.

    The grid is the model's own (128/16 = 8x8 at 128 pixels, 16x16 at 256). The class
    token and any other prefix tokens (``model.num_prefix_tokens``) have no place on the
    grid and are dropped. A layer that already has a grid (the patch convolution) and
    the patch embedding, which has no prefix tokens yet, pass through.
    """
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None:
        return None
    h, w = patch_embed.grid_size
    prefix = getattr(model, "num_prefix_tokens", 1)

    def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim == 4:
            return tokens
        n = tokens.shape[1]
        if n not in (h * w, h * w + prefix):
            raise ValueError(f"{n} tokens do not fit the {h}x{w} patch grid of this ViT "
                             f"(+{prefix} prefix tokens); explain a layer that carries the "
                             f"patch tokens, e.g. blocks.-1.norm1")
        grid = tokens[:, n - h * w:].reshape(tokens.shape[0], h, w, tokens.shape[2])
        return grid.permute(0, 3, 1, 2)

    return tokens_to_grid


# ----------------------------------------------------------------------------- Grad-CAM

def gradcam_maps(model: nn.Module, x_uint8: torch.Tensor, targets=None,
                 layer: str | nn.Module | None = None, classes: Sequence[str] = CLASSES,
                 batch_size: int = DEFAULTS["batch_size"]) -> np.ndarray:
    """Grad-CAM maps float32 ``[B, H, W]`` in [0, 1] from pytorch-grad-cam.

    ``targets``: None (each scan's predicted class), one class for all scans, or one per
    scan; a class is a name or an index (:func:`class_index`). Scans go through the
    model ``batch_size`` at a time, so a whole test set fits in memory. The model's
    training mode is left as it was and its weights carry no gradients afterwards.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = target_layer(model, layer)
    scans = _checked_scans(x_uint8)
    # The layer's output, seen during the forward that picks the classes anyway: a layer
    # without feature maps is refused by name before the library is handed it.
    first = []
    handle = module.register_forward_hook(
        lambda _m, _i, output: first.append(output) if not first else None)
    try:
        probabilities = class_probabilities(model, scans, batch_size)
    finally:
        handle.remove()
    if not first:
        raise ValueError(f"layer {layer_name(model, module)!r} did not run in the forward "
                         f"pass, so it has no feature maps to explain; pick another layer")
    _check_spatial_output(model, module, first[0])
    wanted = _target_indices(targets, probabilities, classes)
    starts = _batch_starts(scans, batch_size)
    maps = []
    with _evaluating(model), torch.enable_grad(), \
            GradCAM(model, [module], reshape_transform(model)) as cam:
        for i in starts:
            maps.append(cam(input_tensor=_model_input(model, scans[i:i + batch_size]),
                            targets=[ClassifierOutputTarget(c) for c in wanted[i:i + batch_size]]))
    # The library backpropagates into the weights' .grad; leave no CAM gradients behind
    # for an optimizer to step on.
    model.zero_grad(set_to_none=True)
    if len(maps) < len(starts):
        # GradCAM.__exit__ swallows an IndexError (it prints it and carries on).
        raise RuntimeError("pytorch-grad-cam failed with an IndexError (printed above) "
                           f"at layer {layer_name(model, module)!r}")
    return np.concatenate(maps)


def gradcam_by_hand(model: nn.Module, x_uint8: torch.Tensor, targets=None,
                    layer: str | nn.Module | None = None,
                    classes: Sequence[str] = CLASSES) -> np.ndarray:
    """The thesis's three Grad-CAM steps written out; the same maps as :func:`gradcam_maps`.

    This repeats what pytorch-grad-cam does on purpose: it is the chapter's worked
    example, and the test holding it to the library within 1e-5 shows a reader that the
    three steps below (plus the library's scaling) are all Grad-CAM is.
    """
    module = target_layer(model, layer)
    to_grid = reshape_transform(model)
    x = _model_input(model, _checked_scans(x_uint8))
    kept = []
    handle = module.register_forward_hook(lambda _module, _inputs, output: kept.append(output))
    try:
        with _evaluating(model), torch.enable_grad():
            logits = _logits(model, x)
    finally:
        handle.remove()
    if not kept:
        raise ValueError(f"layer {layer_name(model, module)!r} did not run in the forward "
                         f"pass, so it has no feature maps to explain; pick another layer")
    feats = kept[0]
    _check_spatial_output(model, module, feats)
    indices = torch.tensor(_target_indices(targets, logits.detach(), classes), device=x.device)

    # Step 1: dy_c/dA^k, y_c the pre-softmax score of each scan's target class. In eval
    # mode scans do not interact, so the gradient of the sum over the batch gives each
    # scan its own gradient.
    y_c = logits.gather(1, indices[:, None]).sum()
    (grads,) = torch.autograd.grad(y_c, feats)
    if to_grid is not None:  # ViT tokens -> [B, C, h, w] feature maps
        feats, grads = to_grid(feats), to_grid(grads)

    # Step 2: alpha_k^c, the gradients averaged over the h x w positions (1/Z sum_ij).
    alpha = grads.mean(dim=(2, 3), keepdim=True)

    # Step 3: ReLU of the alpha-weighted sum of the feature maps, h x w per scan.
    cam = F.relu((alpha * feats.detach()).sum(dim=1, keepdim=True))

    return _scaled_like_library(cam, x.shape[-2:]).cpu().numpy()


def _check_spatial_output(model: nn.Module, module: nn.Module, output) -> None:
    want = 3 if reshape_transform(model) is not None else 4  # ViT tokens, or [B, C, h, w]
    shape = list(getattr(output, "shape", []))
    if len(shape) != want:
        raise ValueError(f"layer {layer_name(model, module)!r} gives {shape}, not feature "
                         f"maps ({'[B, tokens, C]' if want == 3 else '[B, C, h, w]'}); "
                         f"Grad-CAM needs a layer with a spatial layout, e.g. the default "
                         f"{LAYERS.get(getattr(model, 'mrilib_name', None), 'last convolution')!r}")


def _minmax(cam: torch.Tensor) -> torch.Tensor:
    # pytorch-grad-cam's scale_cam_image: subtract the minimum, divide by (1e-7 + max).
    # The epsilon keeps an all-zero map at zero instead of 0/0.
    cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
    return cam / (1e-7 + cam.amax(dim=(-2, -1), keepdim=True))


def _scaled_like_library(cam: torch.Tensor, size) -> torch.Tensor:
    """``[B, 1, h, w]`` -> ``[B, H, W]``: min-max, bilinear upsampling, min-max again.

    pytorch-grad-cam scales each map to [0, 1], resizes it with ``cv2.resize`` (bilinear,
    pixel centres at half-integers) and scales it again after averaging its layers.
    ``F.interpolate(bilinear, align_corners=False)`` samples at the same points, and
    matches cv2 on float32 maps to rounding (tests check it), so torch stands in for cv2.
    """
    cam = F.interpolate(_minmax(cam), size=tuple(size), mode="bilinear", align_corners=False)
    return _minmax(cam)[:, 0]


# ----------------------------------------------------------------------------- overlays

def no_evidence(cams) -> np.ndarray:
    """bool ``[B]`` (or a bool for one map): True where a map is all zero, i.e. the model
    finds no positive evidence for the class at that layer, and there is nothing to show."""
    arr = _numpy(cams)
    flat = arr.reshape(-1) if arr.ndim == 2 else arr.reshape(len(arr), -1)
    out = ~np.any(flat > 0, axis=-1)
    return bool(out) if arr.ndim == 2 else out


NO_EVIDENCE = "all zero: no positive evidence for {target} at this layer"


def overlay(scan_uint8, cam: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]``: the jet-coloured CAM blended over a grayscale scan.

    ``scan_uint8`` is ``[1, H, W]`` or ``[H, W]`` (tensor or array), ``cam`` ``[H, W]`` in
    [0, 1]. pytorch-grad-cam's ``show_cam_on_image`` wants float RGB in [0, 1]: the
    gray-to-RGB conversion happens here and nowhere else. It also stretches the blend
    so that its brightest pixel is 255.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    scan = _numpy(scan_uint8)
    if scan.ndim == 3 and scan.shape[0] == 1:
        scan = scan[0]
    if scan.dtype != np.uint8 or scan.ndim != 2:
        raise ValueError(f"scan must be uint8 [1, H, W] or [H, W], got {scan.dtype} "
                         f"{list(scan.shape)}")
    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape != scan.shape:
        raise ValueError(f"cam of shape {list(cam.shape)} does not match the scan's "
                         f"{list(scan.shape)}; compute it on this scan")
    if not (np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1):
        raise ValueError(f"cam values must lie in [0, 1], got {cam.min():.3g}..{cam.max():.3g}; "
                         f"use the maps gradcam_maps returns")
    rgb = np.repeat(scan[..., None], 3, axis=-1).astype(np.float32) / 255.0
    return show_cam_on_image(rgb, cam, use_rgb=True, image_weight=image_weight)


# ----------------------------------------------------------------------------- agreement

def _cam_stack(cams, name: str) -> np.ndarray:
    arr = _numpy(cams)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be maps [N, H, W], got shape {list(arr.shape)}")
    return arr.reshape(len(arr), -1).astype(np.float64)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip((a * b).sum(axis=1) / denom, -1.0, 1.0)  # NaN for a constant map


def _top_region(cams: np.ndarray, top_frac: float) -> np.ndarray:
    # Ties at the threshold all count (no arbitrary tie-break), and a pixel with zero
    # attribution never does, so a map that is mostly zero has a region under top_frac.
    threshold = np.quantile(cams, 1.0 - top_frac, axis=1, keepdims=True)
    return (cams >= threshold) & (cams > 0)


def cam_agreement(cams_a, cams_b, top_frac: float | None = None) -> dict[str, np.ndarray]:
    """Per pair of maps: ``pearson`` correlation and ``iou`` of their top-``top_frac`` regions.

    ``cams_a[i]`` is compared with ``cams_b[i]``. Undefined values are NaN: the
    correlation of a constant map, the IoU of two maps with no positive pixel.
    """
    if top_frac is None:
        top_frac = settings(DEFAULTS, PRESETS)["top_frac"]
    if not 0.0 < top_frac < 1.0:
        raise ValueError(f"top_frac={top_frac}: give a share of pixels in (0, 1), e.g. 0.2")
    a, b = _cam_stack(cams_a, "cams_a"), _cam_stack(cams_b, "cams_b")
    if a.shape != b.shape:
        raise ValueError(f"cams_a and cams_b must pair up map for map; got shapes "
                         f"{np.shape(cams_a)} and {np.shape(cams_b)}")
    ra, rb = _top_region(a, top_frac), _top_region(b, top_frac)
    union = (ra | rb).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = (ra & rb).sum(axis=1) / union
    return dict(zip(METRICS, (_pearson_rows(a, b), np.where(union > 0, iou, np.nan))))


@dataclass
class AgreementResult:
    """Agreement of CAM pairs: every pair (``pairs``) and medians with intervals (``summary``).

    ``pairs``: one row per pair and metric (class, kind, metric, value, a, b). Kind
    ``real/variation``: ``a`` indexes the real map, ``b`` the variation map; kind
    ``real/real`` (the baseline): ``a`` and ``b`` index two different real maps.
    ``summary``: per class, metric and kind the n, median and bootstrap interval, plus
    kind ``difference`` = median(real/variation) - median(real/real) with its interval.
    """

    pairs: pd.DataFrame
    summary: pd.DataFrame
    seed: int
    n_boot: int
    top_frac: float
    level: float


def _baseline_pairs(members: np.ndarray, n: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` distinct pairs of two different members, drawn without replacement.

    Both measures are symmetric, so (i, j) and (j, i) are one pair: the draw is over
    unordered pairs, all of them when there are no more than ``n``. (Drawing ordered
    pairs with replacement counted some pairs twice: 4 slices gave 8 draws of 6 pairs.)
    """
    first, second = np.triu_indices(len(members), k=1)
    if len(first) > n:
        keep = np.sort(rng.choice(len(first), size=n, replace=False))
        first, second = first[keep], second[keep]
    return members[first], members[second]


def _checked_pairing(real: np.ndarray, labels: np.ndarray, variations: np.ndarray,
                     source: np.ndarray) -> None:
    if len(labels) != len(real) or len(source) != len(variations) or len(source) == 0:
        raise ValueError(f"need one label per real map ({len(real)} maps, {len(labels)} "
                         f"labels) and one source index per variation map, at least one "
                         f"({len(variations)} maps, {len(source)} indices)")
    if source.min() < 0 or source.max() >= len(real):
        raise ValueError(f"variation_source holds {source.min()}..{source.max()}; each must "
                         f"index a real map, 0..{len(real) - 1}")


def agreement_vs_baseline(real_cams, real_labels, variation_cams, variation_source,
                          classes: Sequence[str] = CLASSES, seed: int = 0,
                          n_boot: int | None = None, top_frac: float | None = None,
                          level: float | None = None) -> AgreementResult:
    """CAM agreement of real/variation pairs against random real/real pairs, per class.

    ``variation_cams[k]`` is the map of a synthetic variation of real scan
    ``variation_source[k]`` (an index into ``real_cams``); ``real_labels`` are the real
    scans' classes. For each class with variations, the baseline draws as many distinct
    pairs of two different real scans of that class (all pairs where there are fewer).
    Baseline pairs share scans, so their median is bootstrapped by scans, not by pairs
    (:func:`mrilib.stats.bootstrap_median_of_pairs`); real/variation pairs by source scan,
    then variations within it. ``seed`` fixes those draws and the bootstrap; ``n_boot``
    and ``level`` default to :mod:`mrilib.stats`'s settings.
    """
    cfg = settings(DEFAULTS, PRESETS, **({} if top_frac is None else {"top_frac": top_frac}))
    boot = settings(STATS_DEFAULTS, STATS_PRESETS, **{k: v for k, v in dict(
        n_boot=n_boot, level=level).items() if v is not None})
    real, variations = _numpy(real_cams), _numpy(variation_cams)
    labels = _numpy(real_labels).astype(np.int64).reshape(-1)
    source = _numpy(variation_source).astype(np.int64).reshape(-1)
    _checked_pairing(real, labels, variations, source)
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.unique(labels[source]):
        mine = np.flatnonzero(labels[source] == c)
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            raise ValueError(f"class {classes[c]!r} has {len(members)} real map(s); the "
                             f"real/real baseline needs at least two per class")
        a, b = _baseline_pairs(members, len(mine), rng)
        for kind, first, second, maps_b in (("real/variation", source[mine], mine, variations),
                                             ("real/real", a, b, real)):
            scores = cam_agreement(real[first], maps_b[second], cfg["top_frac"])
            rows += [pd.DataFrame({"class": classes[c], "kind": kind, "metric": metric,
                                   "value": values, "a": first, "b": second})
                     for metric, values in scores.items()]
    pairs = pd.concat(rows, ignore_index=True)
    return AgreementResult(pairs, _summary(pairs, list(classes), boot, seed), seed,
                           boot["n_boot"], cfg["top_frac"], boot["level"])


def _finite(pairs: pd.DataFrame) -> pd.DataFrame:
    return pairs[np.isfinite(pairs["value"].to_numpy(dtype=np.float64))]


def _median_row(variation: pd.DataFrame, boot: dict, seed: int) -> tuple:
    v = _finite(variation)
    if len(v) == 0:
        return (0, np.nan, np.nan, np.nan)
    return (len(v), *bootstrap_median(v["value"], v["a"], boot["n_boot"], boot["level"], seed))


def _baseline_row(baseline: pd.DataFrame, boot: dict, seed: int) -> tuple:
    b = _finite(baseline)
    if len(b) == 0:
        return (0, np.nan, np.nan, np.nan)
    return (len(b), *bootstrap_median_of_pairs(b["value"], b["a"], b["b"], boot["n_boot"],
                                               boot["level"], seed))


def _difference_row(variation: pd.DataFrame, baseline: pd.DataFrame, boot: dict,
                    seed: int) -> tuple:
    v, b = _finite(variation), _finite(baseline)
    if len(v) == 0 or len(b) == 0:
        return (len(v), np.nan, np.nan, np.nan)
    return (len(v), *bootstrap_median_difference(
        v["value"], b["value"], v["a"], paired=False, n_boot=boot["n_boot"],
        level=boot["level"], seed=seed, pairs_b=(b["a"].to_numpy(), b["b"].to_numpy())))


def _summary(pairs: pd.DataFrame, classes: list[str], boot: dict, seed: int) -> pd.DataFrame:
    """n, median and bootstrap interval per class, metric and kind, and their difference.

    Variations of one real scan share it, so the real/variation medians resample real
    scans first, then variations within them (:func:`mrilib.stats.bootstrap_median`);
    real/real pairs share scans too, and their medians resample the scans
    (:func:`mrilib.stats.bootstrap_median_of_pairs`). Undefined values (NaN) are left out
    and not counted in n.
    """
    rows = []
    for (cls, metric), cell in pairs.groupby(["class", "metric"], sort=False):
        variation = cell[cell["kind"] == "real/variation"]
        baseline = cell[cell["kind"] == "real/real"]
        # A seed per (class, metric, kind): one cell's interval does not change when
        # another class is added or left out.
        key = (seed, classes.index(cls), METRICS.index(metric))
        rows += [(cls, metric, "real/variation", *_median_row(variation, boot, _seed(*key, 0))),
                 (cls, metric, "real/real", *_baseline_row(baseline, boot, _seed(*key, 1))),
                 (cls, metric, "difference",
                  *_difference_row(variation, baseline, boot, _seed(*key, 2)))]
    return pd.DataFrame(rows, columns=["class", "metric", "kind", "n", "median", "low", "high"])


def _seed(*keys: int) -> int:
    """One integer seed from several, for APIs that take a single int."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


# ----------------------------------------------------------------------------- a control

def untrained_control(name: str, img_size: int = 128, seed: int = 0) -> nn.Module:
    """Architecture ``name`` with its random initial weights (seed ``seed``), in eval mode.

    A variation is made from its source and stays close to it pixel by pixel, so even a
    network that learned nothing gives it a heat map like its source's. The agreement
    such a model shows is what input similarity alone produces: the control for
    "the classifier looks where the source looks" (:func:`against_control`).
    """
    from .models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build_model(name, img_size=img_size).eval()


def agreement_of(model: nn.Module, real_images, real_labels, variation_images,
                 variation_source, seed: int = 0, **kwargs) -> AgreementResult:
    """:func:`agreement_vs_baseline` of ``model``'s maps for each scan's true class.

    ``variation_images[k]`` is a variation of ``real_images[variation_source[k]]`` and is
    mapped for that source's class.
    """
    labels = torch.as_tensor(real_labels)
    source = torch.as_tensor(variation_source)
    real_cams = gradcam_maps(model, real_images, labels)
    variation_cams = gradcam_maps(model, variation_images, labels[source])
    return agreement_vs_baseline(real_cams, labels, variation_cams, source, seed=seed, **kwargs)


def against_control(result: AgreementResult, control: AgreementResult) -> pd.DataFrame:
    """Per class and metric: the trained model's difference (real/variation minus
    real/real) beside the untrained control's, and whether it lies beyond it.

    ``beyond control`` is True only where the trained model's interval lies wholly above
    the control's: a conservative reading (two intervals that do not overlap), since the
    two analyses share their scans and a paired test would need their maps together.
    """
    def differences(r: AgreementResult) -> pd.DataFrame:
        d = r.summary[r.summary["kind"] == "difference"]
        return d.set_index(["class", "metric"])[["n", "median", "low", "high"]]

    ours, ctrl = differences(result), differences(control)
    out = pd.merge(ours, ctrl, left_index=True, right_index=True,
                   suffixes=(" trained", " untrained"))
    out["beyond control"] = out["low trained"] > out["high untrained"]
    return out.reset_index()
