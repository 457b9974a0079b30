"""Augmentation: per-image draws, the same pixels and the same distribution as torchvision."""
from __future__ import annotations

from collections import Counter
from itertools import product

import pytest
import torch
import torchvision.transforms.autoaugment as tv_autoaugment
from torchvision.transforms import AutoAugmentPolicy, InterpolationMode

from mrilib.augment import (POLICIES, AutoAugment, AutoAugmentDraws, augment_batch, get_policy,
                            policy_draws)

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])


def mri_like(n, size=32, seed=0):
    """Bright noisy discs on black, off-centre so that flips and rotations change them."""
    rng = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size * 0.45) ** 2 + (xx - size * 0.4) ** 2) < (size * 0.35) ** 2
    noise = torch.randint(40, 256, (n, 1, size, size), generator=rng, dtype=torch.uint8)
    return noise * disc


def rng_of(seed):
    return torch.Generator().manual_seed(seed)


def test_autoaugment_draws_a_uniform_sub_policy_per_image():
    policy = get_policy("autoaugment")
    n = 4000
    draws = policy_draws(policy, torch.zeros(n, 1, 4, 4, dtype=torch.uint8), rng_of(0))
    counts = torch.bincount(draws.sub_policy, minlength=25).double()
    chi2 = ((counts - n / 25) ** 2 / (n / 25)).sum().item()
    assert chi2 < 51.2, f"sub-policy counts not uniform (chi2={chi2:.1f}, 24 dof, p=0.001)"
    # independent per image: the first 100 images of one batch span (almost) all 25
    assert len(draws.sub_policy[:100].unique()) >= 20
    # each operation applied with its table probability, each sign negative half the time
    probs = torch.tensor([[p for _, p, _ in s] for s in policy.sub_policies])[draws.sub_policy]
    expected, seen = probs.sum().item(), draws.applied.sum().item()
    assert abs(seen - expected) < 4 * (probs * (1 - probs)).sum().sqrt().item()
    assert abs(draws.negative.double().mean().item() - 0.5) < 0.02


def test_identical_images_in_one_batch_come_out_differently():
    x = mri_like(1).expand(200, 1, 32, 32).contiguous()
    y = augment_batch("autoaugment", x, rng_of(1))
    distinct = {bytes(img.flatten().tolist()) for img in y}
    # A batch-wide draw would give at most 4 different outputs (2 ops x applied or not).
    assert len(distinct) > 20


@pytest.mark.parametrize("table", ["imagenet", "cifar10", "svhn"])
def test_fixed_draw_gives_torchvision_autoaugment_pixels(table, monkeypatch):
    """Pixel-exact against torchvision's own AutoAugment.forward run on each image alone.

    Every sub-policy x applied flags x signs once, in one batch. torchvision's get_params is made to return this image's draw, so its forward picks the
    same sub-policy, applied flags and signs, and computes magnitudes and ops itself. The
    CIFAR10 and SVHN tables cover the operations ImageNet's does not (shear, translate,
    brightness, sharpness).
    """
    policy = AutoAugment(table)
    combos = list(product(range(len(policy.sub_policies)), product([False, True], repeat=2),
                          product([False, True], repeat=2)))
    draws = AutoAugmentDraws(torch.tensor([c[0] for c in combos]),
                             torch.tensor([c[1] for c in combos]),
                             torch.tensor([c[2] for c in combos]))
    x = mri_like(len(combos), size=24, seed=2)
    y = policy.apply(x, draws)

    reference = tv_autoaugment.AutoAugment(AutoAugmentPolicy(table),
                                           interpolation=InterpolationMode.NEAREST, fill=0)
    for i in range(len(x)):
        probs = torch.where(draws.applied[i], 0.0, 2.0)  # <= p exactly when applied
        signs = (~draws.negative[i]).long()              # torchvision negates on sign == 0
        monkeypatch.setattr(reference, "get_params",
                            lambda n, s=int(draws.sub_policy[i]), p=probs, g=signs: (s, p, g))
        expected = reference(x[i])
        assert torch.equal(y[i], expected), (i, policy.operations(draws, (24, 24))[i])
    changed = (y != x).flatten(1).any(1)
    assert changed.float().mean() > 0.5  # the comparison is not between unchanged images


def test_operation_frequencies_match_torchvision_image_by_image(monkeypatch):
    n = 4000
    recorded: list[list[tuple[str, float]]] = []

    def record(img, op_name, magnitude, interpolation, fill):
        recorded[-1].append((op_name, round(magnitude, 4)))
        return img

    monkeypatch.setattr(tv_autoaugment, "_apply_op", record)
    reference = tv_autoaugment.AutoAugment(AutoAugmentPolicy.IMAGENET)
    torch.manual_seed(4)
    image = torch.zeros(1, 8, 8, dtype=torch.uint8)
    for _ in range(n):
        recorded.append([])
        reference(image)

    policy = get_policy("autoaugment")
    ours = [[(name, round(m, 4)) for name, m in ops]
            for ops in policy.operations(policy.draw(n, rng_of(5)), (8, 8))]

    def frequencies(runs):
        return Counter(op for ops in runs for op in ops), Counter(len(ops) for ops in runs)

    (ops_ref, len_ref), (ops_ours, len_ours) = frequencies(recorded), frequencies(ours)
    assert set(ops_ours) == set(ops_ref)  # same (operation, signed magnitude) support
    names = {name for name, _ in ops_ref}
    for counts_ref, counts_ours, keys in [
        ({k: sum(c for (nm, _), c in ops_ref.items() if nm == k) for k in names},
         {k: sum(c for (nm, _), c in ops_ours.items() if nm == k) for k in names}, names),
        (len_ref, len_ours, {0, 1, 2}),
    ]:
        for key in keys:
            f_ref, f_ours = counts_ref.get(key, 0) / n, counts_ours.get(key, 0) / n
            sigma = (2 * max(f_ref, 1 / n) * (1 - f_ref) / n) ** 0.5
            assert abs(f_ours - f_ref) < 4.5 * sigma, (key, f_ours, f_ref)


def test_hflip_flips_about_half_each_image_on_its_own():
    x = mri_like(4000, size=8, seed=6)
    rng = rng_of(7)
    policy = get_policy("hflip")
    draws = policy_draws(policy, x, rng)
    y = policy.apply(x, draws)
    assert abs(draws.double().mean().item() - 0.5) < 0.03
    torch.testing.assert_close(y[draws], x[draws].flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(y[~draws], x[~draws], rtol=0, atol=0)
    never = get_policy("hflip", hflip_p=0.0)
    assert torch.equal(never.apply(x, never.draw(len(x), rng)), x)


def test_none_is_identity():
    x = mri_like(5)
    assert torch.equal(augment_batch("none", x, rng_of(0)), x)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name", list(POLICIES))
def test_shape_dtype_device_kept_and_input_untouched(name, device):
    x = mri_like(2 * 16, size=16, seed=8).view(2, 16, 1, 16, 16).to(device)  # replicates x batch
    before = x.clone()
    y = augment_batch(name, x, rng_of(9))
    assert y.shape == x.shape and y.dtype == torch.uint8 and y.device == x.device
    assert torch.equal(x, before)
    again = augment_batch(name, x, rng_of(9))
    assert torch.equal(y, again), "same RNG seed must give the same batch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_pixels_for_the_same_draw():
    policy = get_policy("autoaugment")
    x = mri_like(300, size=32, seed=10)
    draws = policy.draw(len(x), rng_of(11))
    torch.testing.assert_close(policy.apply(x.cuda(), draws).cpu(), policy.apply(x, draws),
                               rtol=0, atol=1)


def test_unknown_policy_and_bad_input_are_refused():
    with pytest.raises(ValueError, match="unknown augmentation policy 'mixup'.*none, hflip, autoaugment"):
        augment_batch("mixup", mri_like(2), rng_of(0))
    with pytest.raises(ValueError, match="unknown AutoAugment policy 'mnist'"):
        AutoAugment("mnist")
    with pytest.raises(TypeError, match="uint8"):
        augment_batch("hflip", mri_like(2).float(), rng_of(0))
    with pytest.raises(ValueError, match="hflip probability"):
        get_policy("hflip", hflip_p=1.5)
