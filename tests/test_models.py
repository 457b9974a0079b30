"""Models: shapes, vmap across replicates, ImageNet weights from a local file, clear errors."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch.func import functional_call, stack_module_state, vmap

from mrilib.models import (MODELS, BasicCNN, build_model, init_of, model_label, normalize)

SIZES = [(name, 128) for name in MODELS] + [(name, 256) for name in MODELS if "vit" in name]


def uint8_batch(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def test_normalize_is_fixed_affine_map_of_uint8():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    y = normalize(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.flatten(), torch.tensor([-0.2786 / 0.3268, 0.7214 / 0.3268]))
    with pytest.raises(TypeError, match="uint8"):
        normalize(x.float())


@pytest.mark.parametrize("name,size", SIZES)
def test_logits_shape_and_scratch_label(name, size):
    torch.manual_seed(0)
    model = build_model(name, img_size=size).eval()
    with torch.no_grad():
        y = model(normalize(uint8_batch(3, 1, size, size)))
    assert y.shape == (3, 4) and torch.isfinite(y).all()
    assert init_of(model) == "scratch"
    assert name == "basic_cnn" or model_label(model).endswith("(from scratch)")


def test_basic_cnn_layers_match_docstring():
    model = build_model("basic_cnn")
    assert isinstance(model, BasicCNN)
    assert [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1] is model.conv2
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == 4_207_748
    assert sum(p.numel() for p in BasicCNN(img_size=256).parameters()) == 16_790_660
    assert model.fc1.in_features == 32 * 32 * 32


def stacked_forward(models, x):
    """Logits of each model on its own batch, all at once through vmap; and the buffers."""
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def one(p, b, xb):
        return functional_call(base, (p, b), (xb,))

    return vmap(one)(params, buffers, x), buffers


@pytest.mark.parametrize("name,mode", [("basic_cnn", "train"), ("resnet18", "eval"),
                                       ("resnet18", "train"), ("vit_tiny", "train")])
def test_vmap_over_replicates_equals_one_at_a_time(name, mode):
    torch.manual_seed(0)
    size = 64 if name == "resnet18" else 32
    models = [getattr(build_model(name, img_size=size), mode)() for _ in range(2)]
    x = normalize(uint8_batch(2, 4, 1, size, size))
    y, buffers = stacked_forward(models, x)
    before = {k: v.clone() for k, v in buffers.items()}
    expected = torch.stack([m(x[i]) for i, m in enumerate(models)])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # BatchNorm in train mode: each replicate's running stats are updated from its own
    # batch only, in place in the stacked buffers, exactly as the separate models'.
    for key, stacked in buffers.items():
        for i, m in enumerate(models):
            torch.testing.assert_close(stacked[i], m.state_dict()[key])
    if name == "resnet18" and mode == "train":
        assert not torch.equal(buffers["bn1.running_mean"], torch.zeros_like(before["bn1.running_mean"]))
        assert not torch.equal(buffers["bn1.running_mean"][0], buffers["bn1.running_mean"][1])


@pytest.fixture(scope="module")
def imagenet_files(tmp_path_factory):
    """A random 3-channel, 1000-class timm model per architecture, saved both ways."""
    root = tmp_path_factory.mktemp("weights")
    out = {}
    for name, timm_name in [("resnet18", "resnet18"), ("vit_tiny", "vit_tiny_patch16_224")]:
        torch.manual_seed(1)
        state = timm.create_model(timm_name, pretrained=False).state_dict()
        save_file(state, str(root / f"{name}.safetensors"))
        torch.save(state, root / f"{name}.pth")
        out[name] = state
    return root, out


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_resnet18_local_weights_adapt_first_conv_and_reset_head(imagenet_files, suffix):
    root, states = imagenet_files
    src = states["resnet18"]
    model = build_model("resnet18", weights=root / f"resnet18{suffix}")
    sd = model.state_dict()
    assert sd["conv1.weight"].shape == (64, 1, 7, 7)
    torch.testing.assert_close(sd["conv1.weight"], src["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(sd["layer4.1.conv2.weight"], src["layer4.1.conv2.weight"])
    torch.testing.assert_close(sd["bn1.running_var"], src["bn1.running_var"])
    assert sd["fc.weight"].shape == (4, 512)
    assert init_of(model) == "imagenet" and model_label(model) == "ResNet-18 (ImageNet)"


@pytest.mark.parametrize("size", [128, 256])
def test_vit_local_weights_resize_pos_embed(imagenet_files, size):
    root, states = imagenet_files
    src = states["vit_tiny"]
    model = build_model("vit_tiny", img_size=size, weights=root / "vit_tiny.safetensors")
    sd = model.state_dict()
    grid = size // 16
    torch.testing.assert_close(sd["patch_embed.proj.weight"],
                               src["patch_embed.proj.weight"].sum(dim=1, keepdim=True))
    assert sd["pos_embed"].shape == (1, 1 + grid * grid, 192)
    torch.testing.assert_close(sd["pos_embed"], resample_abs_pos_embed(
        src["pos_embed"], new_size=(grid, grid), old_size=(14, 14), num_prefix_tokens=1,
        interpolation="bicubic", antialias=True))
    torch.testing.assert_close(sd["blocks.11.mlp.fc2.weight"], src["blocks.11.mlp.fc2.weight"])
    assert sd["head.weight"].shape == (4, 192)
    with torch.no_grad():
        assert model.eval()(normalize(uint8_batch(2, 1, size, size))).shape == (2, 4)


def test_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*does not exist") as err:
        build_model("resnet18", weights=missing)
    assert "pretrained=False" in str(err.value)


def test_weights_of_another_model_are_refused(imagenet_files):
    root, _ = imagenet_files
    with pytest.raises(ValueError, match="vit_tiny.safetensors.*not a 'resnet18' state dict"):
        build_model("resnet18", weights=root / "vit_tiny.safetensors")


def test_corrupt_or_wrong_kind_of_file_is_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read weights file.*bad.pth"):
        build_model("resnet18", weights=bad)
    npz = tmp_path / "vit.npz"
    npz.write_bytes(b"x")
    with pytest.raises(ValueError, match="vit.npz.*not a state dict file"):
        build_model("vit_tiny", weights=npz)


def test_unknown_model_lists_the_names():
    with pytest.raises(ValueError, match="unknown model 'vgg16'.*basic_cnn, resnet18, vit_tiny, vit_small"):
        build_model("vgg16")


@pytest.mark.parametrize("kwargs", [dict(pretrained=True), dict(weights="x.pth")])
def test_basic_cnn_has_no_imagenet_weights(kwargs):
    with pytest.raises(ValueError, match="'basic_cnn' has no ImageNet weights"):
        build_model("basic_cnn", **kwargs)


def test_unreachable_hub_gives_one_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants
    # Offline mode makes the download fail at once instead of retrying for a minute, and an
    # empty cache makes the test independent of weights someone downloaded on this machine.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        build_model("resnet18", pretrained=True)
    message = str(err.value)
    assert "timm/resnet18.a1_in1k" in message and str(tmp_path) in message
    assert "weights=PATH" in message and "--weights PATH" in message
    assert "pretrained=False" in message


def test_init_of_refuses_foreign_models():
    with pytest.raises(ValueError, match="build_model"):
        init_of(torch.nn.Linear(2, 2))
