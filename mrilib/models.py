"""The thesis's three classifiers: a basic CNN, ResNet-18 and a Vision Transformer.

Every model takes float input ``[B, 1, H, W]`` made by :func:`normalize` from uint8
slices and returns logits ``[B, num_classes]``. :func:`build_model` is the one way in::

    model = build_model("resnet18")                          # from scratch
    model = build_model("resnet18", weights="resnet18.safetensors")  # ImageNet, local file
    model = build_model("vit_tiny", img_size=256, pretrained=True)   # ImageNet, HF hub

ImageNet weights go through timm's own loader, which sums the first convolution over
the RGB channels for one-channel input, resamples the ViT position embeddings to the
chosen image size and drops the 1000-class head. Whether a model holds ImageNet
weights or starts from scratch is kept on the model (:func:`init_of`) so that every
table can say which.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

# Pixel mean and std (intensity / 255) of the 6,400 slices at 128x128, fixed so training,
# evaluation and Grad-CAM see the same input whatever subset they load.
MRI_MEAN = 0.2786
MRI_STD = 0.3268

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def normalize(x: torch.Tensor) -> torch.Tensor:
    """float32 model input from uint8 slices ``[..., H, W]``: ``(x / 255 - MRI_MEAN) / MRI_STD``."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images (0..255), got dtype {x.dtype}; "
                        f"pass the images as loaded by mrilib.data.load_mri")
    return (x.float() / 255.0 - MRI_MEAN) / MRI_STD


class BasicCNN(nn.Module):
    """The thesis's from-scratch CNN (ch. 5.1): two conv+ReLU+max-pool stages, a 2-hidden-layer MLP.

    With ``S = img_size`` (a multiple of 4) and one input channel:

    ======  ===================================  ===============  ====================
    layer   op                                   output           parameters
    ======  ===================================  ===============  ====================
    conv1   Conv2d(1, 16, 3, padding=1), ReLU    16 x S x S       160
    pool    MaxPool 2x2                          16 x S/2 x S/2   0
    conv2   Conv2d(16, 32, 3, padding=1), ReLU   32 x S/2 x S/2   4,640
    pool    MaxPool 2x2                          32 x S/4 x S/4   0
    fc1     Linear(32 * (S/4)^2, 128), ReLU      128              4,096 (S/4)^2 + 128
    fc2     Linear(128, 64), ReLU                64               8,256
    head    Linear(64, num_classes)              num_classes      65 * num_classes
    ======  ===================================  ===============  ====================

    Total at S=128 with 4 classes: 4,207,748 parameters (4,194,432 of them in fc1);
    at S=256: 16,790,660. ``conv2`` is the last convolution; its rectified output
    (``act2``, a weightless ``nn.ReLU`` module so that a hook can reach it) is the
    Grad-CAM layer, as ResNet's ``layer4`` output is rectified too.
    No BatchNorm and no Dropout: the thesis's network is plain, and without them the
    forward is a pure function of the weights (vmap-friendly across replicates).
    """

    def __init__(self, num_classes: int = 4, img_size: int = 128, in_chans: int = 1):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"BasicCNN needs img_size divisible by 4 (two 2x2 poolings), "
                             f"got {img_size}; use 128 or 256")
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * (img_size // 4) ** 2, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, num_classes)
        self.act2 = nn.ReLU()  # no weights: state dicts are those of the plain network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(self.act2(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.head(x)


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: how to build a model and what to call it in tables."""

    label: str                       # name in tables and figures
    timm_name: str | None = None     # timm architecture; None for a model written here
    module: type[nn.Module] | None = None  # the class, for a model written here
    takes_img_size: bool = False     # timm model whose shape depends on img_size (ViT)


MODELS: dict[str, ModelSpec] = {
    "basic_cnn": ModelSpec("Basic CNN", module=BasicCNN),
    "resnet18": ModelSpec("ResNet-18", timm_name="resnet18"),
    "vit_tiny": ModelSpec("ViT-Tiny/16", timm_name="vit_tiny_patch16_224", takes_img_size=True),
    "vit_small": ModelSpec("ViT-Small/16", timm_name="vit_small_patch16_224", takes_img_size=True),
}


def build_model(name: str, num_classes: int = 4, img_size: int = 128,
                pretrained: bool = False, weights: str | os.PathLike | None = None) -> nn.Module:
    """A freshly built model for one-channel ``img_size`` slices, from scratch or ImageNet.

    ``weights=PATH`` loads ImageNet weights from a local state dict of timm's three-channel
    model (safetensors or .pth/.pt/.bin); ``pretrained=True`` without a path fetches them
    from the Hugging Face hub (or its local cache). Either way the model is labelled
    ``init_of(model) == "imagenet"``; otherwise ``"scratch"``.
    """
    spec = model_spec(name)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if spec.timm_name is None:
        if pretrained or weights is not None:
            raise ValueError(f"{name!r} has no ImageNet weights: the thesis trains it from "
                             f"scratch; call build_model({name!r}) with pretrained=False and "
                             f"no weights (or drop --weights / --pretrained)")
        return _labelled(spec.module(num_classes=num_classes, img_size=img_size), name,
                         "scratch", None)
    kwargs = dict(in_chans=1, num_classes=num_classes)
    if spec.takes_img_size:
        kwargs["img_size"] = img_size
    if weights is not None:
        path = _checked_weights_path(weights, spec.timm_name)
        return _labelled(_timm_from_file(spec.timm_name, path, kwargs), name, "imagenet",
                         str(path))
    if pretrained:
        return _labelled(_timm_from_hub(spec.timm_name, kwargs), name, "imagenet",
                         f"hf-hub:{hub_id(spec.timm_name)}")
    return _labelled(timm.create_model(spec.timm_name, pretrained=False, **kwargs), name,
                     "scratch", None)


def model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; a clear error listing the known names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of "
                         f"{', '.join(MODELS)}") from None


def init_of(model: nn.Module) -> str:
    """``"imagenet"`` if the model started from ImageNet weights, ``"scratch"`` otherwise."""
    try:
        return model.mrilib_init
    except AttributeError:
        raise ValueError("this model was not made by mrilib.models.build_model, so whether "
                         "it was pretrained is unknown; build it with build_model") from None


def model_label(model: nn.Module) -> str:
    """The name a table shows, e.g. ``"ResNet-18 (ImageNet)"`` or ``"ResNet-18 (from scratch)"``."""
    init = init_of(model)
    label = MODELS[model.mrilib_name].label
    if model.mrilib_name == "basic_cnn":
        return label  # always from scratch, as in the thesis; no need to say so
    return f"{label} ({'ImageNet' if init == 'imagenet' else 'from scratch'})"


def hub_id(timm_name: str) -> str:
    """The Hugging Face hub repo timm fetches ``timm_name``'s default ImageNet weights from."""
    return timm.models.get_pretrained_cfg(timm_name).hf_hub_id


def _labelled(model: nn.Module, name: str, init: str, source: str | None) -> nn.Module:
    model.mrilib_name = name
    model.mrilib_init = init
    model.mrilib_weights = source
    return model


def _how_to_get_weights(timm_name: str) -> str:
    hub = hub_id(timm_name)
    return (f"To use ImageNet weights, download model.safetensors from "
            f"https://huggingface.co/{hub} on a machine with internet and pass "
            f"weights=PATH (CLI: --weights PATH); it must be timm's 3-channel "
            f"{timm_name!r} state dict (safetensors or .pth). To train from scratch "
            f"instead, use pretrained=False (tables then say 'from scratch').")


def _timm_from_hub(timm_name: str, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except OSError as err:  # hub unreachable or offline, and not in the local cache
        from huggingface_hub.constants import HF_HUB_CACHE
        raise FileNotFoundError(
            f"Could not get ImageNet weights for {timm_name!r}: looked on the Hugging Face "
            f"hub ({hub_id(timm_name)}) and in the local hub cache ({HF_HUB_CACHE}); "
            f"{type(err).__name__}: {err}\n{_how_to_get_weights(timm_name)}") from None


def _checked_weights_path(weights: str | os.PathLike, timm_name: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist.\n"
                                f"{_how_to_get_weights(timm_name)}")
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"weights file {str(path)!r} is not a state dict file "
                         f"({', '.join(WEIGHT_SUFFIXES)}); {_how_to_get_weights(timm_name)}")
    return path


def _timm_from_file(timm_name: str, path: Path, kwargs: dict) -> nn.Module:
    # Check the file holds this architecture first: timm loads non-strictly once it drops
    # the classifier, so another model's file would leave a silently random network.
    try:
        state = timm.models.load_state_dict(str(path))
    except Exception as err:  # corrupt file, pickle, not a state dict...
        raise ValueError(f"could not read weights file {str(path)!r}: "
                         f"{type(err).__name__}: {err}\n{_how_to_get_weights(timm_name)}") from err
    with torch.device("meta"):  # only the tensor names are needed: skip the random init
        expected = timm.create_model(timm_name, pretrained=False, **kwargs).state_dict()
    classifier = timm.models.get_pretrained_cfg(timm_name).classifier
    missing = [k for k in expected if k not in state and not k.startswith(classifier + ".")]
    if missing:
        raise ValueError(f"weights file {str(path)!r} is not a {timm_name!r} state dict: "
                         f"{len(missing)} of its tensors are missing (e.g. {missing[:3]}).\n"
                         f"{_how_to_get_weights(timm_name)}")
    del state, expected
    # custom_load=False: the ViT's default config points at a JAX .npz loader; a file
    # given here is a PyTorch/safetensors state dict, which timm's generic path adapts.
    overlay = dict(file=str(path), custom_load=False)
    try:
        return timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=overlay,
                                 **kwargs)
    except RuntimeError as err:  # shapes that timm cannot adapt
        raise ValueError(f"weights file {str(path)!r} does not fit {timm_name!r}: {err}\n"
                         f"{_how_to_get_weights(timm_name)}") from err
