"""The thesis's augmentation policies, applied on the device to whole uint8 batches.

Each image gets its own random draw, as when a torchvision transform runs per sample in
a DataLoader. torchvision's v2 ``AutoAugment`` (and kornia's) called on a batch draw one
sub-policy for the whole batch instead, which is a different augmentation. So the draw
is made here, per image, and each operation is then applied to the subset of images
that drew it, one batched call of torchvision's own operation per (operation, signed
magnitude), so a fixed draw gives torchvision's AutoAugment pixels exactly::

    rng = torch.Generator().manual_seed(seed)
    x_aug = augment_batch("autoaugment", x_uint8, rng)     # x_uint8 [..., 1, H, W] on any device

A policy is an object with ``draw(n, rng)`` (the per-image randomness, from a torch RNG) and
``apply(x, draws)`` (deterministic given the draws); adding one is one entry in
:data:`POLICIES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import AutoAugment as TorchvisionAutoAugment
from torchvision.transforms import AutoAugmentPolicy, InterpolationMode
from torchvision.transforms.autoaugment import _apply_op as _torchvision_apply_op

from .config import settings
from .paths import preset_name

DEFAULTS = {
    "hflip_p": 0.5,                   # per-image flip probability; thesis ch. 6.1: 50%
    "autoaugment_policy": "imagenet",  # torchvision policy table; thesis ch. 6.2: ImageNet's
    "num_bins": 10,                   # magnitude bins; torchvision AutoAugment's own value
    "interpolation": "nearest",       # for rotate/shear/translate; torchvision AutoAugment's default
    "fill": 0,                        # gray level (0..255) uncovered by rotation: MRI background is black
}
PRESETS: dict = {}  # the quick preset augments exactly like the thesis protocol


class Identity:
    """``none``: the images as they are."""

    def draw(self, n: int, rng: torch.Generator) -> None:
        return None

    def apply(self, x: torch.Tensor, draws: None) -> torch.Tensor:
        return x


class HorizontalFlip:
    """``hflip``: each image mirrored left-right with probability ``p``."""

    def __init__(self, p: float):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"hflip probability must be in [0, 1], got {p}")
        self.p = p

    def draw(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """Bool ``[n]``: which images are flipped."""
        return torch.rand(n, generator=rng, device=rng.device) < self.p

    def apply(self, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        # One where() over the batch: no host sync and no per-subset indexing on the GPU.
        flip = draws.to(x.device).view(-1, 1, 1, 1)
        return torch.where(flip, x.flip(-1), x)


@dataclass(frozen=True)
class AutoAugmentDraws:
    """Per-image AutoAugment randomness, as torchvision's ``AutoAugment.get_params`` draws it."""

    sub_policy: torch.Tensor  # long [n]: index into the policy table
    applied: torch.Tensor     # bool [n, 2]: whether each of the sub-policy's 2 operations runs
    negative: torch.Tensor    # bool [n, 2]: signed magnitudes are negated (torchvision: sign == 0)


def _apply_operation(x: torch.Tensor, name: str, magnitude: float,
                     interpolation: InterpolationMode, fill: list[float]) -> torch.Tensor:
    """``x`` [N, C, H, W] after one AutoAugment operation, in one batched call.

    torchvision's own ``_apply_op`` (what its AutoAugment runs per image), whose tensor
    kernels all take batches; only Equalize goes to the v2 kernel, because v1's loops over
    the images in Python and v2's is one vectorised histogram with the same pixels.
    The v2 kernels are not used throughout: v2 autocontrast rounds differently and
    moves some pixels by one gray level from what torchvision's AutoAugment gives.
    """
    if name == "Equalize":
        return TF.equalize(x)
    return _torchvision_apply_op(x, name, magnitude, interpolation=interpolation, fill=fill)


class AutoAugment:
    """``autoaugment``: torchvision's AutoAugment policy with an independent draw per image.

    The sub-policy table and magnitude bins are torchvision's own (read from
    ``torchvision.transforms.AutoAugment``), and so are the draw rules: a uniform
    sub-policy, each of its two operations applied when ``U(0,1) <= p``, and each
    signed magnitude negated with probability 1/2.
    """

    def __init__(self, policy: str = "imagenet", num_bins: int = 10,
                 interpolation: str = "nearest", fill: int = 0):
        try:
            reference = TorchvisionAutoAugment(AutoAugmentPolicy(policy))
        except ValueError:
            raise ValueError(f"unknown AutoAugment policy {policy!r}; choose one of "
                             f"{', '.join(p.value for p in AutoAugmentPolicy)}") from None
        self.sub_policies = reference.policies
        self._space = reference._augmentation_space
        modes = [m.value for m in InterpolationMode]
        if interpolation not in modes:
            raise ValueError(f"unknown interpolation {interpolation!r}; choose one of "
                             f"{', '.join(modes)} (torchvision's AutoAugment uses 'nearest')")
        if not 0 <= fill <= 255:
            raise ValueError(f"fill is a gray level in 0..255, got {fill}")
        self.num_bins = num_bins
        self.interpolation = InterpolationMode(interpolation)
        self.fill = fill
        self._probs = torch.tensor([[p for _, p, _ in sub] for sub in self.sub_policies])
        self._keys = self._action_keys()
        self._table = self._action_table()
        self._actions_by_size: dict[tuple[int, int], list[tuple[str, float]]] = {}

    def draw(self, n: int, rng: torch.Generator) -> AutoAugmentDraws:
        """Sub-policy, applied flags and signs for ``n`` images."""
        device = rng.device
        sub = torch.randint(len(self.sub_policies), (n,), generator=rng, device=device)
        u = torch.rand((n, 2), generator=rng, device=device)
        sign = torch.randint(2, (n, 2), generator=rng, device=device)
        return AutoAugmentDraws(sub, u <= self._probs.to(device)[sub], sign == 0)

    def operations(self, draws: AutoAugmentDraws, image_size: tuple[int, int]
                   ) -> list[tuple[tuple[str, float], ...]]:
        """Per image, the ``(operation, signed magnitude)`` pairs it receives, in order."""
        actions = self._actions(tuple(image_size))
        return [tuple(actions[a] for a in row if a >= 0)
                for row in self._action_ids(draws).tolist()]

    def apply(self, x: torch.Tensor, draws: AutoAugmentDraws) -> torch.Tensor:
        """The images after their drawn operations; ``x`` [N, C, H, W] uint8 is not modified."""
        actions = self._actions(tuple(x.shape[-2:]))
        ids = self._action_ids(draws)
        out = x.clone()
        for stage in range(2):  # the second operation acts on the first one's output
            for action in ids[:, stage].unique().tolist():
                if action < 0:
                    continue
                name, magnitude = actions[action]
                index = (ids[:, stage] == action).nonzero().flatten().to(x.device)
                done = _apply_operation(out.index_select(0, index), name, magnitude,
                                        self.interpolation, [float(self.fill)] * x.shape[-3])
                out.index_copy_(0, index, done)
        return out

    def _action_ids(self, draws: AutoAugmentDraws) -> torch.Tensor:
        """Long [n, 2] on the CPU: the action each image gets at each stage, -1 for none.

        Grouping happens on the CPU because the group sizes decide the kernel calls.
        """
        sub, applied, negative = (t.cpu() for t in (draws.sub_policy, draws.applied,
                                                     draws.negative))
        ids = self._table[sub.unsqueeze(1), torch.arange(2), negative.long()]
        return torch.where(applied, ids, -1)

    def _action_keys(self) -> list[tuple[str, int | None, bool]]:
        """Every distinct (operation, magnitude bin, negated) the policy table can produce."""
        signed = {name: s for name, (_, s) in self._space(self.num_bins, (1, 1)).items()}
        keys = []
        for sub in self.sub_policies:
            for name, _, mag_id in sub:
                for neg in ((False, True) if signed[name] else (False,)):
                    if (name, mag_id, neg) not in keys:
                        keys.append((name, mag_id, neg))
        return keys

    def _action_table(self) -> torch.Tensor:
        """Long [sub-policy, stage, negated] -> action id (index into ``self._keys``)."""
        signed = {name: s for name, (_, s) in self._space(self.num_bins, (1, 1)).items()}
        return torch.tensor([[[self._keys.index((name, mag_id, neg and signed[name]))
                               for neg in (False, True)]
                              for name, _, mag_id in sub]
                             for sub in self.sub_policies])

    def _actions(self, image_size: tuple[int, int]) -> list[tuple[str, float]]:
        """(operation, signed magnitude) per action id; translations scale with image size."""
        if image_size not in self._actions_by_size:
            space = self._space(self.num_bins, image_size)
            self._actions_by_size[image_size] = [
                (name, (-1.0 if neg else 1.0) * (0.0 if mag_id is None
                                                 else float(space[name][0][mag_id].item())))
                for name, mag_id, neg in self._keys]
        return self._actions_by_size[image_size]


def _build_autoaugment(s: dict) -> AutoAugment:
    return AutoAugment(s["autoaugment_policy"], s["num_bins"], s["interpolation"], s["fill"])


# name -> builder from the settings in force. A new policy is one entry here: any object
# with draw(n, rng) and apply(x [N, C, H, W], draws).
POLICIES: dict[str, Callable[[dict], object]] = {
    "none": lambda s: Identity(),
    "hflip": lambda s: HorizontalFlip(s["hflip_p"]),
    "autoaugment": _build_autoaugment,
}


def get_policy(name: str, **overrides) -> object:
    """The policy ``name`` built with the settings in force (``DEFAULTS``, preset, overrides)."""
    if name not in POLICIES:
        raise ValueError(f"unknown augmentation policy {name!r}; choose one of "
                         f"{', '.join(POLICIES)}")
    return POLICIES[name](settings(DEFAULTS, PRESETS, **overrides))


def policy_draws(policy, x: torch.Tensor, rng: torch.Generator):
    """The per-image random draws ``policy`` makes for the images in ``x``."""
    policy = _as_policy(policy)
    return policy.draw(_images(x).shape[0], rng)


def augment_batch(policy, x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """``x`` (uint8 ``[..., C, H, W]``) augmented with an independent draw per image.

    ``policy`` is a name in :data:`POLICIES` or a policy object from :func:`get_policy`
    (build it once outside a training loop). The result has ``x``'s shape, dtype and
    device; ``x`` itself is never modified (``none`` returns it as is).
    """
    policy = _as_policy(policy)
    images = _images(x)
    return policy.apply(images, policy.draw(images.shape[0], rng)).reshape(x.shape)


@lru_cache(maxsize=None)
def _default_policy(name: str, preset: str) -> object:
    """``get_policy(name)`` built once per preset, not again at every training step."""
    return get_policy(name)


def _as_policy(policy):
    if isinstance(policy, str):
        return _default_policy(policy, preset_name())
    if not (hasattr(policy, "draw") and hasattr(policy, "apply")):
        raise TypeError(f"policy must be a name ({', '.join(POLICIES)}) or an object with "
                        f"draw() and apply(), got {policy!r}")
    return policy


def _images(x: torch.Tensor) -> torch.Tensor:
    """``x`` as one flat batch ``[N, C, H, W]`` (leading dims such as replicates merged)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() < 3:
        raise TypeError(f"augmentation expects a uint8 tensor [..., C, H, W], got "
                        f"{getattr(x, 'dtype', type(x).__name__)} of shape "
                        f"{tuple(getattr(x, 'shape', ()))}; pass images as loaded by load_mri")
    return x.reshape(-1, *x.shape[-3:])
