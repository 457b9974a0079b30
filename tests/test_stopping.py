"""Early stopping: the rule, and a replicate stopped in a vmap group equals it trained alone."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_train import one_cpu_thread, tiny_problem  # noqa: F401 (an autouse fixture)

from mrilib.stopping import EarlyStopping
from mrilib.train import model_settings, train_replicates

SEEDS = [11, 12, 13]  # at these settings they stop at different epochs, one at the most
# lr 1e-2 on 16 tiny images overfits within a few epochs, so replicates do stop.
STOPS = dict(aug="hflip", device="cpu", epochs=8, batch_size=4, lr=1e-2)
NAN = float("nan")


def stopped_at(losses, patience):
    """(last epoch from 1, best epoch from 1) per replicate of a fake stack fed ``losses``."""
    weights = torch.zeros(losses.shape[1])
    stopper = EarlyStopping(SimpleNamespace(params={"w": weights}, buffers={}), patience)
    for e, loss in enumerate(losses):
        weights.fill_(float(e))  # replicate j's weights at epoch e hold e
        stopper.update(e, loss)
        if stopper.all_stopped():
            break
    weights.fill_(-1.0)  # what stepping on would have left
    stopper.restore()
    return (stopper.last + 1).tolist(), (stopper.best_epoch + 1).tolist(), weights.tolist()


@pytest.mark.parametrize("patience,last,best", [
    (1, [3, 2, 4, 3], [2, 1, 3, 2]),
    (2, [4, 3, 5, 4], [2, 1, 3, 2]),
    (None, [5, 5, 5, 5], [1, 1, 1, 1]),  # off: no replicate stops, none tracked
])
def test_a_replicate_stops_after_patience_epochs_without_strict_improvement(patience, last,
                                                                           best):
    # [epochs, K]: a tie is no improvement (replicate 1); a NaN counts as lower (replicate 3).
    losses = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.4, 0.5, 0.4, NAN], [0.45, 0.5, 0.3, NAN],
                           [0.4, 0.5, 0.35, 0.1], [0.3, 0.5, 0.36, 0.1]])
    got_last, got_best, weights = stopped_at(losses, patience)
    assert got_last == last
    if patience is not None:
        assert got_best == best and [a - b for a, b in zip(got_last, got_best)] == [patience] * 4
    # stopped replicates' weights are put back as they were at their last epoch
    assert weights == ([-1.0] * 4 if patience is None else [float(n - 1) for n in last])


@pytest.mark.parametrize("name", ["basic_cnn", "resnet18"])
def test_a_stopped_replicate_is_the_same_replicate_trained_to_that_epoch_without_stopping(name):
    """Constant-lr models: a replicate stopped in its group is the same group trained without
    early stopping for exactly its stopped_epoch epochs (history and weights); with
    test_train's together == alone test, it is the replicate trained alone that long. (At
    this lr ResNet-18 is chaotic enough that grouped vs single kernels drift apart.)"""
    images, labels, index, val, test = tiny_problem(k=3)
    group, models = train_replicates(name, images, labels, index, val, test, SEEDS,
                                     max_parallel=3, patience=2, return_models=True, **STOPS)
    stops = [r["stopped_epoch"] for r in group]
    assert min(stops) < STOPS["epochs"] and len(set(stops)) > 1  # stopping was exercised
    assert model_settings(name, lr=STOPS["lr"])["schedule"] == "constant"
    for n in sorted(set(stops)):
        plain, plain_models = train_replicates(
            name, images, labels, index, val, test, SEEDS, max_parallel=3, patience="off",
            return_models=True, **{**STOPS, "epochs": n})
        for j in (j for j, s in enumerate(stops) if s == n):
            rec, ref = group[j], plain[j]
            assert len(rec["history"]) == n == rec["final"]["epoch"]
            assert rec["best"]["epoch"] == ref["best"]["epoch"]
            if n < STOPS["epochs"]:
                assert n - rec["best"]["epoch"] == 2
            assert rec["history"] == ref["history"] and rec["final"] == ref["final"]
            for key, value in plain_models[j][0].items():
                torch.testing.assert_close(models[j][0][key], value, rtol=0, atol=0, msg=key)


def test_a_cosine_schedule_runs_over_the_most_epochs_whether_or_not_a_replicate_stops():
    """ViT-Tiny (cosine lr): a stopped replicate's history is the first epochs of the same
    replicate trained to the most epochs without stopping."""
    images, labels, index, val, test = tiny_problem(k=2)
    kw = dict(STOPS, epochs=5, aug="none", lr=3e-3)  # at 1e-2 its val loss only falls
    assert model_settings("vit_tiny")["schedule"] == "cosine"
    stopped = train_replicates("vit_tiny", images, labels, index, val, test, SEEDS[:2],
                               max_parallel=2, patience=1, **kw)
    full = train_replicates("vit_tiny", images, labels, index, val, test, SEEDS[:2],
                            max_parallel=1, patience="off", **kw)
    assert any(r["stopped_epoch"] < 5 for r in stopped)
    for a, b in zip(stopped, full):
        ours = [[h["train_loss"], h["val_loss"]] for h in a["history"]]
        ref = [[h["train_loss"], h["val_loss"]] for h in b["history"][:a["stopped_epoch"]]]
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-4, atol=1e-5)


def test_the_group_ends_when_every_replicate_has_stopped():
    images, labels, index, val, test = tiny_problem(k=3)
    seen = []
    records = train_replicates("basic_cnn", images, labels, index, val, test, SEEDS,
                               max_parallel=3, patience=1, on_epoch=seen.append,
                               **{**STOPS, "epochs": 30})
    stops = [r["stopped_epoch"] for r in records]
    assert max(stops) < 30 and [u["epoch"] for u in seen] == list(range(1, max(stops) + 1))
    for u in seen:  # each epoch lists the replicates that trained it, as their records do
        assert u["replicates"] == [j for j, n in enumerate(stops) if n >= u["epoch"]]
        assert u["last"] == (u["epoch"] == max(stops))
        assert u["epochs"] == 30


@pytest.mark.parametrize("test_every_epoch", [True, False])
def test_patience_that_never_triggers_changes_nothing(test_every_epoch):
    """The stopping bookkeeping alone leaves every number as with patience off."""
    images, labels, index, val, test = tiny_problem(k=3)
    kw = dict(STOPS, epochs=4, max_parallel=3, test_every_epoch=test_every_epoch)
    off = train_replicates("basic_cnn", images, labels, index, val, test, SEEDS,
                           patience="off", **kw)
    long = train_replicates("basic_cnn", images, labels, index, val, test, SEEDS,
                            patience=4, **kw)
    for a, b in zip(off, long):
        assert (a["patience"], b["patience"]) == (None, 4)
        assert a["stopped_epoch"] == b["stopped_epoch"] == 4
        for key in ("history", "final", "best"):
            assert a[key] == b[key]


@pytest.mark.parametrize("name", ["basic_cnn", "resnet18"])
def test_testing_at_the_ends_only_agrees_with_testing_every_epoch_under_stopping(name):
    """test_every_epoch=False tests each replicate at its own last and best epochs."""
    images, labels, index, val, test = tiny_problem(k=3)
    kw = dict(STOPS, max_parallel=3, patience=2)
    every = train_replicates(name, images, labels, index, val, test, SEEDS, **kw)
    ends = train_replicates(name, images, labels, index, val, test, SEEDS,
                            test_every_epoch=False, **kw)
    assert any(r["stopped_epoch"] < STOPS["epochs"] for r in every)
    for a, b in zip(every, ends):
        assert a["stopped_epoch"] == b["stopped_epoch"]
        for which in ("final", "best"):
            assert b[which]["epoch"] == a[which]["epoch"]
            for key in ("test_loss", "test_acc"):
                assert b[which][key] == pytest.approx(a[which][key], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("patience", [0, -1, 2.5, True, "early"])
def test_a_bad_patience_says_what_to_give(patience):
    with pytest.raises(ValueError, match="patience="):
        model_settings("basic_cnn", patience=patience)


# ----------------------------------------------------------------------------- the command

def _train_args(argv):
    import argparse

    from mrilib.commands import train as train_cmd
    parser = argparse.ArgumentParser()
    train_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["train", *argv])


def test_train_command_stops_early_on_a_subject_split(mri_path, capsys):
    import json

    args = _train_args(["--source", str(mri_path), "--split", "subject", "--real-frac", "0.1",
                        "--epochs", "3", "--patience", "1", "--replicates", "2",
                        "--device", "cpu", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert "Subject-level" in out["note"]
    for run in out["runs"]:
        assert (run["split"], run["patience"], run["epochs"]) == ("subject", 1, 3)
        assert len(run["history"]) == run["stopped_epoch"] == run["final"]["epoch"] <= 3
        assert run["n_train"] % 32 == 0  # whole brains of 32 slices


@pytest.mark.parametrize("value,ok", [("off", True), ("4", True), ("soon", False)])
def test_train_command_patience_is_a_number_or_off(value, ok, capsys):
    if ok:
        assert _train_args(["--patience", value]).patience in ("off", 4)
        return
    with pytest.raises(SystemExit) as stop:
        _train_args(["--patience", value])
    assert stop.value.code == 2 and "'soon': give a whole number" in capsys.readouterr().err


def test_the_curves_tool_applies_the_same_rule():
    """tools/curves.py --summary, the evidence for the patience, stops where the engine does."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "curves.py"
    spec = importlib.util.spec_from_file_location("curves_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    losses = torch.rand(12, 40, generator=torch.Generator().manual_seed(0))
    for patience in (1, 2, 3, 5):
        last, best, _ = stopped_at(losses, patience)
        got = [tool.stop_epoch(losses[:, j].tolist(), patience) for j in range(40)]
        assert got == list(zip(last, best))
    table = tool.patience_table({("curves", "subject", "none", 0.3): [[1.0, 0.9, 1.1, 1.2]]})
    assert table.splitlines()[1].startswith("curves | subject | none | 0.3 | 1 | 4 | 2, 2")


@pytest.mark.parametrize("test_every_epoch", [True, False])
def test_models_at_best_are_the_weights_of_the_scored_epoch(test_every_epoch):
    """return_models with models_at="best": each replicate's weights at its best epoch, the
    same as the group trained without stopping to exactly that epoch."""
    images, labels, index, val, test = tiny_problem(k=3)
    kw = dict(STOPS, max_parallel=3, test_every_epoch=test_every_epoch)
    group, models = train_replicates("basic_cnn", images, labels, index, val, test, SEEDS,
                                     patience=2, return_models=True, models_at="best", **kw)
    assert any(r["best"]["epoch"] < r["stopped_epoch"] for r in group)
    for j, rec in enumerate(group):
        n = rec["best"]["epoch"]
        _, ref = train_replicates("basic_cnn", images, labels, index, val, test, SEEDS,
                                  patience="off", return_models=True, **{**kw, "epochs": n})
        config = models[j][1]
        assert config["weights_at"] == "best" and config["best"]["epoch"] == n
        for key, value in ref[j][0].items():
            torch.testing.assert_close(models[j][0][key], value, rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match="models_at='first'"):
        train_replicates("basic_cnn", images, labels, index, val, test, SEEDS,
                         return_models=True, models_at="first", **kw)
