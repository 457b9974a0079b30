"""The training step's levers (mrilib.stacked_step): how a step runs, never what it learns."""
from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters

from mrilib.models import MODELS
from mrilib.train import design_settings, train_replicates
from test_train import tiny_problem

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# 20 images in batches of 8: two full batches and a short one per epoch, so the compiled
# or graphed full steps and the eager short step both run.
KW = dict(aug="hflip", epochs=2, batch_size=8, max_parallel=2)


def runs(name, device, seeds=(3, 4), n_train=20, **levers):
    images, labels, index, val, test = tiny_problem(k=len(seeds), n_train=n_train)
    return train_replicates(name, images, labels, index, val, test, list(seeds),
                            return_models=True, device=device, **{**KW, **levers})


def alone(name, device, seeds, n_train=20, **levers):
    """Each replicate of :func:`runs` trained by itself, on its own row of the same problem."""
    images, labels, index, val, test = tiny_problem(k=len(seeds), n_train=n_train)
    return [train_replicates(name, images, labels, index[j:j + 1], val, test, [seed],
                             device=device, **{**KW, **levers})[0]
            for j, seed in enumerate(seeds)]


def assert_same_learning(ref, other, weights_tol):
    """Histories equal up to summation order; weights within what Adam's sign flips allow."""
    (a, a_models), (b, b_models) = ref, other
    for r, s in zip(a, b):
        losses = [[h[key] for h in x["history"]] for x in (r, s)
                  for key in ("train_loss", "val_loss")]
        torch.testing.assert_close(torch.tensor(losses[:2]), torch.tensor(losses[2:]),
                                   rtol=1e-3, atol=1e-4)
        assert s["stopped_epoch"] == r["stopped_epoch"]
    for (wa, _), (wb, _) in zip(a_models, b_models):
        assert list(wa) == list(wb)  # same names: checkpoints load either way
        for key, value in wa.items():
            if "running" in key:  # statistics of drifted activations: close on average
                # (measured: <= 1.1e-3; two replicates' differ by 0.025-0.48 on average)
                gap = (wb[key].float() - value.float()).abs().mean()
                assert gap < 5e-3, f"{key}: {gap:.2g}"
                continue
            torch.testing.assert_close(wb[key].to(value.dtype), value, rtol=0,
                                       atol=weights_tol, msg=key)


# Adam moves a weight by about lr per step whatever its gradient's size, and rounding can
# flip a near-zero gradient's sign: 2 * lr * (3 steps x epochs) bounds the drift.
def adam_tol(name, epochs=KW["epochs"]):
    from mrilib.train import model_settings
    return 2 * model_settings(name)["lr"] * 3 * epochs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_step_trains_as_the_eager_step(name):
    eager, compiled = runs(name, "cpu"), runs(name, "cpu", compile_step=True)
    assert [r["compile_step"] for r in eager[0] + compiled[0]] == [False] * 2 + [True] * 2
    assert_same_learning(eager, compiled, adam_tol(name))


def test_compiled_step_compiles_once_per_architecture_and_shape():
    runs("basic_cnn", "cpu", compile_step=True)
    before = counters["stats"]["unique_graphs"]
    again = runs("basic_cnn", "cpu", seeds=(7, 8), compile_step=True)
    assert counters["stats"]["unique_graphs"] == before  # a second group reuses the code
    assert all(r["compile_step"] for r in again[0])
    runs("basic_cnn", "cpu", seeds=(7, 8), n_train=28, compile_step=True)
    assert counters["stats"]["unique_graphs"] == before  # another set size: the same code
    runs("basic_cnn", "cpu", seeds=(7, 8, 9), compile_step=True)
    assert counters["stats"]["unique_graphs"] == before + 1  # 3 replicates: a new shape


@pytest.mark.parametrize("lever", ["compile_step", "cuda_graph", "replicate_loop",
                                   "replicate_streams"])
def test_step_levers_are_run_only(lever):
    assert design_settings("basic_cnn", **{lever: True}) == design_settings("basic_cnn")


@pytest.mark.parametrize("lever", ["cuda_graph", "replicate_streams"])
def test_cuda_levers_are_refused_off_cuda(lever):
    with pytest.raises(ValueError, match=f"{lever}=True needs a CUDA device, not 'cpu'"):
        runs("basic_cnn", "cpu", replicate_loop=True, **{lever: True})


def test_a_stack_on_streams_is_a_loop():
    from mrilib.models import build_model
    from mrilib.stacked import Stack

    with pytest.raises(ValueError, match="pass loop=True"):
        Stack([build_model("basic_cnn")], torch.device("cpu"), streams=True)


@pytest.mark.parametrize("levers,says", [
    (dict(replicate_streams=True), "set replicate_loop=True too"),
    (dict(replicate_streams=True, replicate_loop=True, compile_step=True),
     "cannot be compiled; drop compile_step")])
def test_streams_need_the_loop_and_no_compiling(levers, says):
    from mrilib.stacked_step import check_levers
    from mrilib.train import model_settings

    with pytest.raises(ValueError, match=says):
        check_levers(model_settings("resnet18", **levers), torch.device("cuda"))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("levers", [
    dict(cuda_graph=True), dict(compile_step=True, cuda_graph=True),
    dict(replicate_loop=True, cuda_graph=True), dict(replicate_loop=True, replicate_streams=True),
    dict(replicate_loop=True, replicate_streams=True, cuda_graph=True)],
    ids=["graph", "compile+graph", "loop+graph", "loop+streams", "loop+streams+graph"])
# compile and loop alone: as on a CPU
@pytest.mark.parametrize("name", ["basic_cnn", "resnet18", "vit_tiny"])  # the grid's
def test_cuda_step_levers_train_as_the_eager_step(name, levers):
    # fp32, so that what differs is the order of sums, not bf16's rounding
    # 3 epochs: a replay also follows an eager short batch after the capture
    eager = runs(name, "cuda", amp="off", epochs=3)
    fast = runs(name, "cuda", amp="off", epochs=3, **levers)
    assert_same_learning(eager, fast, adam_tol(name, epochs=3))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name,levers", [
    ("basic_cnn", dict(cuda_graph=True)), ("vit_tiny", dict(cuda_graph=True)),
    ("resnet18", dict(replicate_loop=True, replicate_streams=True, cuda_graph=True))])
def test_cuda_graph_gives_the_same_run_for_the_same_seeds(name, levers):
    first, second = (runs(name, "cuda", **levers) for _ in range(2))
    assert [r["history"] for r in first[0]] == [r["history"] for r in second[0]]


CPU_LEVERS = [dict(compile_step=True), dict(replicate_loop=True),
              dict(replicate_loop=True, compile_step=True)]


@pytest.mark.parametrize("levers", CPU_LEVERS, ids=["compile", "loop", "loop+compile"])
def test_cpu_levers_give_the_same_run_for_the_same_seeds(levers):
    first, second = (runs("basic_cnn", "cpu", **levers) for _ in range(2))
    assert [r["history"] for r in first[0]] == [r["history"] for r in second[0]]


@pytest.mark.parametrize("levers", CPU_LEVERS, ids=["compile", "loop", "loop+compile"])
def test_cpu_levers_train_replicates_together_as_alone(levers):
    together = runs("basic_cnn", "cpu", seeds=(1, 2, 3), **levers)[0]  # groups of 2 and 1
    for a, b in zip(together, alone("basic_cnn", "cpu", (1, 2, 3), **levers)):
        assert a["final"]["val_loss"] == pytest.approx(b["final"]["val_loss"], rel=1e-3)


@pytest.mark.gpu
@cuda
def test_cuda_graph_basic_cnn_replicates_together_match_one_at_a_time():
    together = runs("basic_cnn", "cuda", seeds=(1, 2, 3), amp="off", cuda_graph=True)[0]
    for a, b in zip(together, alone("basic_cnn", "cuda", (1, 2, 3), amp="off", cuda_graph=True)):
        assert a["final"]["val_loss"] == pytest.approx(b["final"]["val_loss"], rel=1e-3)


def test_bench_times_every_epoch_of_every_replicate(monkeypatch):
    """Timings compare equal work: early stopping would end a group at a varying epoch."""
    from mrilib import bench

    monkeypatch.setenv("MRILIB_PRESET", "thesis")
    assert bench._bench_settings({})[1] == {"epochs": 10, "patience": "off"}
    assert bench._bench_settings({"epochs": 3, "lr": 1e-4})[1] == {
        "epochs": 3, "patience": "off", "lr": 1e-4}
    monkeypatch.setenv("MRILIB_PRESET", "quick")
    assert bench._bench_settings({})[1]["epochs"] == 1


@pytest.mark.parametrize("flag,suffix,lever,text", [
    ("--compile-step", "compile", "compile_step", "compiled step"),
    ("--replicate-loop", "loop", "replicate_loop", "replicates one after another")])
def test_bench_times_a_lever_as_a_row_of_its_own(image_folder, tmp_path, capsys, flag, suffix,
                                                  lever, text):
    from mrilib.commands import bench as bench_cmd
    from test_train import _parse

    args = _parse(bench_cmd, ["bench", "train", "--source", str(image_folder()),
                              "--replicates", "2", "--naive-replicates", "0",
                              "--serial-replicates", "0", "--real-frac", "0.5",
                              "--device", "cpu", "--out", str(tmp_path), flag])
    assert args.func(args) == 0
    assert text in capsys.readouterr().out
    [saved] = tmp_path.glob(f"bench-train-basic_cnn-none-cpu*-k2-{suffix}-no-naive-no-serial.json")
    settings = json.loads(saved.read_text())["settings"]
    from mrilib.train import STEP_LEVERS
    assert [k for k in STEP_LEVERS if settings[f"{k}_mrilib"]] == [lever]  # this one lever


@pytest.mark.parametrize("name", sorted(MODELS))
def test_replicates_in_a_loop_train_as_under_vmap(name):
    """Dense kernels per replicate instead of grouped ones: the same sums."""
    stacked, looped = runs(name, "cpu"), runs(name, "cpu", replicate_loop=True)
    assert [r["replicate_loop"] for r in looped[0]] == [True, True]
    assert_same_learning(stacked, looped, adam_tol(name))


def test_replicates_in_a_loop_compile_as_under_vmap():
    assert_same_learning(runs("basic_cnn", "cpu"),
                         runs("basic_cnn", "cpu", replicate_loop=True, compile_step=True),
                         adam_tol("basic_cnn"))
