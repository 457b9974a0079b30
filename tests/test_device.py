"""One device module: resolving --device, one name per device, sync and bf16 autocast."""
from __future__ import annotations

import pytest
import torch

from mrilib import cli
from mrilib.device import autocast, device_name, resolve_device, sync


@pytest.mark.parametrize("asked", ["gpu", "cuda:x", "", "tpu0"])
def test_a_device_torch_does_not_know_is_one_clear_line(asked):
    with pytest.raises(ValueError, match=f"device '{asked}' is not a device torch knows; use "
                                         f"cpu, cuda or cuda:N"):
        resolve_device(asked)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: asking for it is fine")
def test_an_absent_gpu_says_what_to_do():
    with pytest.raises(ValueError, match="torch sees no CUDA device here; use --device cpu"):
        resolve_device("cuda")


@pytest.mark.parametrize("asked", [None, "cpu", torch.device("cpu")])
def test_resolved_devices_are_torch_devices(asked):
    device = resolve_device(asked)
    assert isinstance(device, torch.device)
    if asked is not None or not torch.cuda.is_available():
        assert device.type == "cpu"


def test_the_cpu_has_one_name_whatever_it_is_asked_as():
    names = {device_name("cpu"), device_name(torch.device("cpu"))}
    if not torch.cuda.is_available():
        names.add(device_name())
    (name,) = names
    assert name.startswith("cpu (") and name.endswith(" cores)")


@pytest.mark.parametrize("amp,enabled", [("auto", False), ("bf16", True), ("off", False)])
def test_autocast_on_the_cpu(amp, enabled):
    with autocast(torch.device("cpu"), amp):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert (y.dtype == torch.bfloat16) is enabled
    sync(torch.device("cpu"))  # nothing to wait for, and no error


def test_autocast_names_a_bad_mode():
    with pytest.raises(ValueError, match="amp='fp8'; use 'auto'"):
        autocast(torch.device("cpu"), "fp8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_is_named_by_its_card_and_autocast_there_under_auto():
    device = resolve_device("cuda")
    assert device_name(device) == torch.cuda.get_device_name(device)
    with autocast(device):
        y = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    sync(device)
    assert y.dtype == torch.bfloat16


def test_the_cli_prints_a_bad_device_without_a_traceback(image_folder, capsys):
    code = cli.main(["train", "--source", str(image_folder()), "--device", "gpu",
                     "--replicates", "1", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "error: device 'gpu' is not a device torch knows; use cpu, cuda or cuda:N"]
