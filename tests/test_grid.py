"""The grid spec and its runner: rows streamed, resumed without loss or duplicates, time-boxed."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from mrilib import grid as ex
from mrilib import paths, provenance
from mrilib.grid import schedule
from mrilib.grid.cells import DEFAULTS as GRID_DEFAULTS, PRESETS as GRID_PRESETS
from mrilib.data import CLASSES, MRIData
from mrilib.splits import split_mri, stratified_sample
from mrilib.train import model_settings

EPOCHS = 3
QUICK = 8        # cells of the quick grid: 6 on the slice split, 2 on the subject split
SYNTHETIC = 4    # of them with synthetic images (3 slice, 1 subject)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny():
    """60 random 128x128 'slices' in 4 classes (the generators' size), split as the real data."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 12 + [1] * 6 + [2] * 24 + [3] * 18)
    images = torch.randint(0, 256, (len(labels), 1, 128, 128), generator=g, dtype=torch.uint8)
    images[:, :, :4, :4] = (labels * 60).to(torch.uint8)[:, None, None, None]
    data = MRIData(images, labels, CLASSES, [f"{i:04d}" for i in range(len(labels))],
                   "constructed", "tinyfingerprint",
                   subjects=torch.arange(len(labels)) // 6)  # 10 "brains" of 6, one class each
    return data, split_mri(data)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_sets(data, split, cell, seeds, cfg, device=None, generators=None):
    """Real sample per seed; synthetic cells append copies as 'synthetic' images."""
    rows = torch.stack([stratified_sample(data.labels, cell.real_fraction, s.sample_seed,
                                          pool=split.train, ids=data.ids) for s in seeds])
    n_syn = round(cell.synthetic_fraction * len(split.train))
    bank_x, bank_y, index = data.images, data.labels, rows
    if n_syn:
        fake = torch.arange(n_syn) % len(split.train)
        bank_x = torch.cat([data.images, 255 - data.images[split.train][fake]])
        bank_y = torch.cat([data.labels, data.labels[split.train][fake]])
        extra = len(data.labels) + torch.arange(n_syn)
        index = torch.cat([rows, extra.expand(len(seeds), -1)], dim=1)
    info = [{"n_real": rows.shape[1], "n_synthetic": n_syn} for _ in seeds]
    return ex.TrainingSets(bank_x, bank_y, index, info)


class FakeTrainer:
    """train_replicates' contract with made-up losses; ticks a fake clock; can fail."""

    def __init__(self, clock=None, seconds_per_cell=10.0, fail_after=None):
        self.clock, self.seconds, self.fail_after = clock, seconds_per_cell, fail_after
        self.calls, self.overrides = [], []

    def __call__(self, model, bank_images, bank_labels, train_index, val, test, seeds,
                 aug="none", device=None, **overrides):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated crash (out of time, preempted, ...)")
        self.calls.append((model, aug, list(seeds), tuple(train_index.shape)))
        self.overrides.append(overrides)
        if self.clock is not None:
            self.clock.now += self.seconds
        conf = np.diag([3, 1, 5, 4]).tolist()
        records = []
        for k, seed in enumerate(seeds):
            loss = 0.2 + 0.002 * (seed % 10) + 0.01 * k
            history = [{"epoch": e + 1, "train_loss": loss + 0.1 / (e + 1), "val_loss": loss + 0.01 * e,
                        "val_acc": 0.8, "test_loss": loss, "test_acc": 0.8} for e in range(EPOCHS)]
            stage = {"epoch": EPOCHS, "val_loss": loss, "val_acc": 0.8, "test_loss": loss,
                     "test_acc": 0.8, "test_confusion": conf, "val_confusion": conf}
            records.append({"history": history, "final": stage, "best": {**stage, "epoch": 1},
                            "seconds": self.seconds / len(seeds), "device": "fake",
                            "init": "scratch", "epochs": EPOCHS, "seed": seed})
        return records


def run(tiny, path, trainer, clock=None, max_minutes=None, **kw):
    data, split = tiny
    clock = clock or FakeClock()
    return ex.run_grid("quick", results_path=path, train_fn=trainer, synth_fn=fake_sets,
                       data=data, split=split, clock=clock, progress=False,
                       pacer=paced(max_minutes, path, clock, **kw), **kw)


def paced(max_minutes, path, clock, **kw):
    """A time budget as ``grid --max-minutes`` makes one, without this card's benchmarks."""
    if max_minutes is None:
        return None
    grid = {k: v for k, v in kw.items() if k in GRID_DEFAULTS}
    return schedule.time_budget(max_minutes, "quick", path, clock=clock, benchmarks=False,
                                **grid)


# ----------------------------------------------------------------------------- the spec

def test_quick_grid_touches_every_policy_and_generator_mode():
    cells = ex.grid_cells("quick")
    assert len(cells) == len(set(cells)) == 8
    assert {c.split for c in cells} == {"slice", "subject"}
    assert {c.synthetic for c in cells} == {"none", "fill", "100+20mod"}
    assert {c.leakage for c in cells} == {"none", "sample", "leaky"}
    assert {c.aug for c in cells} == {"none", "hflip"}


def test_thesis_grid_is_the_full_factorial_in_tiers_headline_first():
    tiers = ex.cell_tiers("thesis")
    cells = list(tiers)
    keys = {c.key for c in cells}
    for split in ex.SPLITS:
        for model in ex.MODELS:
            for aug in ex.AUGS:
                for x in ex.FRACTIONS:
                    assert f"{split}/{model}/{aug}/none/{x:g}/none" in keys
                    if x < 1:
                        assert f"{split}/{model}/{aug}/fill/{x:g}/sample" in keys
                assert f"{split}/{model}/{aug}/100+20mod/1/sample" in keys
            assert f"{split}/{model}/none/fill/0.3/leaky" in keys
    per_model = 3 * (8 + 7 + 1) + 1  # augs x (sweep none + sweep fill + Moderate-only) + leaky
    assert len(cells) == len(keys) == 2 * 3 * per_model
    assert [c.key for c in cells[:4]] == ["slice/basic_cnn/none/none/0.3/none",
                                          "slice/basic_cnn/none/none/1/none",
                                          "slice/basic_cnn/none/fill/0.3/sample",
                                          "slice/basic_cnn/none/fill/0.3/leaky"]
    # tier 1: the basic CNN's thesis cells, slice split then subject split (27 each)
    tier1 = [c for c in cells if tiers[c] == 1]
    assert cells[:54] == tier1 and {c.model for c in tier1} == {"basic_cnn"}
    assert [c.split for c in tier1] == ["slice"] * 27 + ["subject"] * 27
    assert sum(c.aug != "none" for c in tier1) == 2 * 10  # Figure 7.2 and the table's rows
    # tier 2: ResNet-18 and ViT-Tiny on subjects, headline cells and the results table
    tier2 = [c for c in cells if tiers[c] == 2]
    assert cells[54:54 + len(tier2)] == tier2 and len(tier2) == 2 * 11
    assert {(c.model, c.split) for c in tier2} == {("resnet18", "subject"), ("vit_tiny", "subject")}
    assert ex.grid_cells("thesis", tier=2) == cells[:54 + 22]


def test_80_20_is_the_fill_cell_at_80_percent():
    assert ex.make_cell("basic_cnn", "none", "80+20") == ex.make_cell("basic_cnn", "none", "fill", 0.8)
    assert ex.make_cell("basic_cnn", "none", "fill", 0.3).synthetic_fraction == pytest.approx(0.7)
    mod = ex.make_cell("basic_cnn", "none", "100+20mod")
    assert (mod.real_fraction, mod.synthetic_fraction, mod.synthetic_classes) == \
        (1.0, 0.2, ("Moderate_Demented",))


@pytest.mark.parametrize("kwargs, match", [
    (dict(model="alexnet"), "unknown model"),
    (dict(model="basic_cnn", aug="cutout"), "unknown augmentation"),
    (dict(model="basic_cnn", synthetic="fill"), "needs a real_fraction"),
    (dict(model="basic_cnn", synthetic="fill", real_fraction=1.0), "adds no synthetic"),
    (dict(model="basic_cnn", synthetic="none", real_fraction=0.3, leakage="leaky"), "does not fit"),
    (dict(model="basic_cnn", synthetic="100+20mod", real_fraction=0.5), "implies"),
    (dict(model="basic_cnn", synthetic="none", real_fraction=1.5), r"\(0, 1\]"),
])
def test_bad_cells_are_refused_with_what_to_do(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ex.make_cell(**kwargs)


def test_repeats_share_samples_modulo_g_so_cells_pair():
    cfg = ex.grid_settings("thesis")
    assert cfg["samples"] == 5  # the local backend's generators (one per real sample)
    seeds = [ex.repeat_seeds(r, cfg) for r in range(cfg["repeats"])]
    assert [s.sample_index for s in seeds[:7]] == [0, 1, 2, 3, 4, 0, 1]
    # sample g is drawn with seed g, the seed generator g learned from
    assert [s.sample_seed for s in seeds[:7]] == [0, 1, 2, 3, 4, 0, 1]
    assert len({s.train_seed for s in seeds}) == 20
    # one variation draw per generator: repeats r, r + G, ... share sample, generator and
    # variations, and differ in initial weights, batch order and augmentation
    assert [s.synth_seed for s in seeds[:7]] == [0, 1, 2, 3, 4, 0, 1]
    apart = ex.grid_settings("thesis", variations="per_repeat")
    assert len({ex.repeat_seeds(r, apart).synth_seed for r in range(20)}) == 20
    with paths.preset_env("thesis"):
        assert ex.design_hash(cfg, "thesis", "basic_cnn") != ex.design_hash(apart, "thesis",
                                                                            "basic_cnn")


def test_one_generator_set_serves_every_fraction_at_or_above_its_own():
    cfg = ex.grid_settings("thesis")
    assert cfg["generator_fraction"] == min(ex.FRACTIONS) == 0.3
    for cell in ex.grid_cells("thesis"):
        if cell.synthetic != "none":
            assert ex.generator_fraction(cell, cfg) == 0.3
    cell = ex.make_cell("basic_cnn", "none", "fill", 0.6)
    assert ex.generator_fraction(cell, {**cfg, "generator_fraction": None}) == 0.6
    with pytest.raises(ValueError, match="generator_fraction=0.7 is above"):
        ex.generator_fraction(cell, {**cfg, "generator_fraction": 0.7})
    # a different generator set is a different protocol: its runs get their own key
    assert (ex.design_hash(cfg, "thesis", "basic_cnn")
            != ex.design_hash({**cfg, "generator_fraction": None}, "thesis", "basic_cnn"))


def test_samples_of_one_seed_are_nested_across_fractions(mri):
    """The documented design: sample g at 30% lies inside sample g at 40%, ... 100%."""
    split = split_mri(mri)
    previous = None
    for x in ex.FRACTIONS:
        sample = set(stratified_sample(mri.labels, x, 3, pool=split.train, ids=mri.ids).tolist())
        assert previous is None or previous <= sample
        previous = sample
    assert previous == set(split.train.tolist())


def test_quick_grid_uses_a_stratified_tenth_of_the_slices(mri):
    cfg = ex.grid_settings("quick")
    small = ex.grid_data(mri, cfg)
    assert len(small) == 640 and small.counts()["Moderate_Demented"] == 6
    assert ex.grid_data(mri, ex.grid_settings("thesis")) is mri


def test_moderate_demented_in_the_test_split(mri):
    """The report's caveat: 13 of the 1,280 test images are Moderate_Demented."""
    counts = mri.counts(split_mri(mri).test)
    assert counts["Moderate_Demented"] == 13 and sum(counts.values()) == 1280


# ----------------------------------------------------------------------------- the runner

def test_rows_are_streamed_with_full_metadata(tiny, tmp_path):
    trainer = FakeTrainer()
    progress = run(tiny, tmp_path, trainer)
    runs, epochs = ex.load_results(tmp_path)
    assert progress.runs_written == len(runs) == QUICK * 2 and not progress.remaining
    assert len(epochs) == len(runs) * EPOCHS
    assert len(trainer.calls) == QUICK and all(len(seeds) == 2 for *_, seeds, _ in trainer.calls)
    for col in ("run_key", "cell_key", "split", "model", "aug", "synthetic", "real_fraction",
                "leakage", "repeat", "split_seed", "sample_index", "sample_seed", "train_seed", "synth_seed", "init",
                "final_val_loss", "best_val_loss", "final_test_confusion", "seconds",
                "git_commit", "git_dirty", "torch", "timm", "diffusers", "numpy", "python",
                "device", "device_name", "config", "preset", "data_fingerprint", "classes"):
        assert col in runs.columns, col
    assert runs["run_key"].is_unique
    assert (runs["data_fingerprint"] == "tinyfingerprint").all()
    assert runs["config"].iloc[0]["repeats"] == 2
    assert (tmp_path / "runs.csv").exists() and (tmp_path / "epochs.csv").exists()
    assert len(pd.read_csv(tmp_path / "runs.csv")) == len(runs)


def test_synthetic_cells_get_more_images_and_pair_with_real_only(tiny, tmp_path):
    trainer = FakeTrainer()
    run(tiny, tmp_path, trainer)
    runs, _ = ex.load_results(tmp_path)
    runs = runs[runs.split == "slice"]
    real = runs[(runs.synthetic == "none") & (runs.real_fraction == 0.3) & (runs.aug == "none")]
    syn = runs[(runs.synthetic == "fill") & (runs.leakage == "sample")]
    assert list(real["sample_seed"]) == list(syn["sample_seed"])
    assert list(real["train_seed"]) == list(syn["train_seed"])
    assert syn["n_train"].min() > real["n_train"].max()
    assert syn["n_train"].iloc[0] == pytest.approx(len(tiny[1].train), abs=1)


def test_interrupted_run_resumes_without_loss_or_duplicates(tiny, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny, tmp_path / "chunked", FakeTrainer(fail_after=3))
    partial, _ = ex.load_results(tmp_path / "chunked")
    assert len(partial) == 3 * 2
    second = FakeTrainer()
    run(tiny, tmp_path / "chunked", second)
    assert len(second.calls) == QUICK - 3  # only the cells that were missing
    run(tiny, tmp_path / "straight", FakeTrainer())
    chunked, chunked_epochs = ex.load_results(tmp_path / "chunked")
    straight, _ = ex.load_results(tmp_path / "straight")
    assert sorted(chunked["run_key"]) == sorted(straight["run_key"])
    assert chunked["run_key"].is_unique
    assert not chunked_epochs.duplicated(["run_key", "epoch"]).any()
    cols = ["run_key", "final_val_loss", "sample_seed", "train_seed"]
    pd.testing.assert_frame_equal(chunked[cols].sort_values("run_key").reset_index(drop=True),
                                  straight[cols].sort_values("run_key").reset_index(drop=True))


def test_a_row_torn_by_a_kill_is_dropped_and_rerun(tiny, tmp_path):
    with pytest.raises(RuntimeError):
        run(tiny, tmp_path, FakeTrainer(fail_after=2))
    runs_file, epochs_file = tmp_path / ex.RUNS_FILE, tmp_path / ex.EPOCHS_FILE
    lines = runs_file.read_bytes().splitlines(keepends=True)
    torn_key = json.loads(lines[-1])["run_key"]
    runs_file.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])  # killed mid-write
    with open(epochs_file, "a") as f:  # epochs of a run whose run row never landed
        f.write(json.dumps({"run_key": "ghost", "epoch": 1}) + "\n")
    trainer = FakeTrainer()
    run(tiny, tmp_path, trainer)
    runs, epochs = ex.load_results(tmp_path)
    assert len(runs) == 2 * QUICK and runs["run_key"].is_unique and torn_key in set(runs["run_key"])
    assert trainer.calls[0][2] == [1001]  # only the torn repeat of that cell was retrained
    raw_epochs = [json.loads(x) for x in epochs_file.read_text().splitlines()]
    assert len(raw_epochs) == 2 * QUICK * EPOCHS and "ghost" not in {e["run_key"] for e in raw_epochs}


def test_max_minutes_stops_between_cells_by_the_expected_cell_time(tiny, tmp_path):
    cells = [{"split": "slice", "model": "basic_cnn", "aug": a, "synthetic": "none", "real_fraction": f}
             for f in (0.3, 1.0) for a in ("none", "hflip", "autoaugment")]
    clock = FakeClock()
    trainer = FakeTrainer(clock, seconds_per_cell=10.0)
    # 30 s budget, 10 s per cell: cells end at 10, 20, 30 s; a fourth would end past it
    progress = run(tiny, tmp_path, trainer, clock=clock, max_minutes=0.5, cells=cells)
    assert len(trainer.calls) == 3 and progress.stopped_for_time
    assert len(progress.remaining) == 3 and progress.cells_done == 3
    # The next chunk reads the last cell's 10 s from the stored rows, and expects a 100%
    # cell to take 1 / 0.3 times as long (more images per repeat): 33 s do not fit 30...
    trainer2 = FakeTrainer(FakeClock(), seconds_per_cell=10.0)
    progress = run(tiny, tmp_path, trainer2, clock=trainer2.clock, max_minutes=0.5,
                   cells=cells)
    assert not trainer2.calls and progress.stopped_for_time
    # ...but fit 36 s; then each 100% cell is judged by the last one (10 s): all three run
    trainer3 = FakeTrainer(FakeClock(), seconds_per_cell=10.0)
    progress = run(tiny, tmp_path, trainer3, clock=trainer3.clock, max_minutes=0.6,
                   cells=cells)
    assert len(trainer3.calls) == 3 and not progress.remaining


def test_the_budget_scales_a_cell_up_by_repeats_and_images_never_down():
    row = {"model": "basic_cnn", "cell_key": "a", "cell_seconds": 10.0, "real_fraction": 0.3,
           "synthetic_fraction": 0.0}
    # two repeats of cell "a" in one call (same cell_seconds), then nothing else
    budget = schedule.TimeBudget(1.0, lambda: 0.0, [row, row])
    cell = ex.make_cell("basic_cnn", real_fraction=0.3)
    assert budget.expected(cell, 2) == 10.0
    assert budget.expected(cell, 20) == pytest.approx(100.0)  # a partial cell's rows
    assert budget.expected(cell, 1) == 10.0  # never scaled down
    assert budget.expected(ex.make_cell("basic_cnn", real_fraction=0.6), 2) == pytest.approx(20)
    fill = ex.make_cell("basic_cnn", synthetic="fill", real_fraction=0.3)  # 30% + 70%
    assert budget.expected(fill, 2) == pytest.approx(10 / 0.3)
    assert budget.expected(ex.make_cell("resnet18", real_fraction=0.3), 2) == 0.0  # unseen
    assert budget.fits(cell, 2) and not budget.fits(cell, 20)
    budget.record(fill, 5.0, 4)
    assert budget.expected(cell, 2) == 5.0 and budget.expected(fill, 8) == 10.0
    # on a GPU 20 replicates train in one vmap group: 4 repeats then 20 are one group each
    gpu = schedule.TimeBudget(1.0, lambda: 0.0, [row, row], group_size=lambda model: 20)
    assert gpu.expected(cell, 20) == 10.0 and gpu.expected(cell, 21) == 20.0


def bench_file(directory, model, device="NVIDIA H100 80GB HBM3", seconds=2.0, replicates=20,
               epochs=10, name=None, **settings):
    result = {"model": model, "device": device,
              "settings": {"real_frac": 0.3, "img_size": 128, "epochs": epochs, **settings},
              "parallel": {"replicates": replicates, "seconds_per_replicate": seconds}}
    path = directory / (name or f"bench-train-{model}-none-{len(list(directory.iterdir()))}.json")
    path.write_text(json.dumps(result))


def test_a_model_not_seen_yet_is_judged_by_this_devices_benchmark(tmp_path):
    cfg = ex.grid_settings("thesis")
    bench_file(tmp_path, "resnet18", seconds=2.0)                 # 40 s per group of 20
    bench_file(tmp_path, "resnet18", seconds=2.5)                 # the slower row counts
    bench_file(tmp_path, "resnet18", seconds=9.0, device="NVIDIA H200")   # another card
    bench_file(tmp_path, "resnet18", seconds=9.0, im2col_stem_mrilib=True)  # a lever row
    bench_file(tmp_path, "resnet18", seconds=9.0, compile_step_mrilib=True)  # another
    bench_file(tmp_path, "resnet18", seconds=9.0, cuda_graph_mrilib=True)    # and another
    bench_file(tmp_path, "resnet18", seconds=9.0, replicates=60)  # another group size
    bench_file(tmp_path, "vit_tiny", seconds=1.0, epochs=5)       # scaled to the grid's most
    (tmp_path / "bench-train-broken.json").write_text("{not json")
    with paths.preset_env("thesis"):  # the grid's most epochs are the thesis preset's
        priors = schedule.bench_priors("NVIDIA H100 80GB HBM3", cfg, tmp_path)
        most = {m: model_settings(m)["epochs"] for m in ("resnet18", "vit_tiny")}
    assert set(priors) == {"resnet18", "vit_tiny"}
    r = priors["resnet18"]["group_seconds"]
    assert r == pytest.approx(2.5 * 20 * most["resnet18"] / 10)  # benchmarks ran 10 epochs
    assert priors["vit_tiny"]["group_seconds"] == pytest.approx(1.0 * 20 * most["vit_tiny"] / 5)
    assert schedule.bench_priors("cpu (x86_64, 2 cores)", cfg, tmp_path) == {}

    budget = schedule.TimeBudget(2.5 * r / 60, lambda: 0.0, [], group_size=lambda model: 20,
                                 priors=priors)
    resnet = ex.make_cell("resnet18", real_fraction=0.3)
    assert budget.expected(resnet, 20) == pytest.approx(1.25 * r)
    full = ex.make_cell("resnet18", real_fraction=1.0)  # 1 / 0.3 as many images
    assert budget.expected(full, 20) == pytest.approx(1.25 * r / 0.3)
    assert budget.fits(resnet, 20) and not budget.fits(full, 20)  # 1.25 r and 4.2 r of 2.5 r
    assert budget.expected(ex.make_cell("basic_cnn", real_fraction=0.3), 20) == 0.0  # no bench
    budget.record(full, 100.0, 20)  # a cell seen beats the benchmark
    assert budget.expected(full, 20) == 100.0


def test_cells_without_a_trained_generator_are_skipped_and_listed(tiny, tmp_path, monkeypatch):
    import mrilib.synthetic.cache as cache_mod
    import mrilib.synthetic.diffusion as diffusion

    monkeypatch.setattr(diffusion, "CACHE", tmp_path / "cache")  # no generator trained
    monkeypatch.setattr(cache_mod, "CACHE", tmp_path / "cache")
    data, split = tiny
    trainer = FakeTrainer()
    progress = ex.run_grid("quick", results_path=tmp_path / "results", train_fn=trainer,
                           data=data, split=split, progress=False)
    assert set(progress.blocked) == {c.key for c in ex.grid_cells("quick") if c.synthetic != "none"}
    real_only = QUICK - SYNTHETIC
    assert progress.runs_written == real_only * 2
    assert set(progress.remaining) == set(progress.blocked)
    assert all("synth train" in why for why in progress.blocked.values())
    assert len(trainer.calls) == real_only  # the blocked cells built nothing
    progress = run(tiny, tmp_path / "results", FakeTrainer())  # a builder with its own images
    assert not progress.blocked and not progress.remaining
    assert progress.runs_written == SYNTHETIC * 2


def test_refuses_to_overwrite_without_resume(tiny, tmp_path):
    run(tiny, tmp_path, FakeTrainer())
    with pytest.raises(ValueError, match="--resume"):
        run(tiny, tmp_path, FakeTrainer(), resume=False)
    with pytest.raises(ValueError, match="max_minutes"):
        run(tiny, tmp_path / "other", FakeTrainer(), max_minutes=0)
    with pytest.raises(ValueError, match="max_minutes"):
        schedule.TimeBudget(-1, FakeClock(), [])


def test_a_changed_design_is_a_different_run(tiny, tmp_path):
    other_seeds = {"train": 8, "synthetic": 9}
    run(tiny, tmp_path, FakeTrainer())
    assert (ex.grid_status("quick", tmp_path, seeds=other_seeds)["done"] == 0).all()
    trainer = FakeTrainer()
    run(tiny, tmp_path, trainer, seeds=other_seeds)
    assert len(trainer.calls) == QUICK
    runs, _ = ex.load_results(tmp_path, design=None)  # every row; the default keeps one design
    assert len(runs) == 4 * QUICK and runs["design"].nunique() == 2


def test_the_run_key_follows_the_training_protocol_not_its_batching():
    cfg = ex.grid_settings("quick")
    key = ex.design_hash(cfg, "quick", "basic_cnn")
    assert key == ex.design_hash(ex.grid_settings("quick", train={"max_parallel": 3}),
                                 "quick", "basic_cnn")
    assert key != ex.design_hash(ex.grid_settings("quick", train={"lr": 1e-4}), "quick", "basic_cnn")
    assert key != ex.design_hash(cfg, "quick", "vit_tiny")  # its own lr and schedule
    assert key != ex.design_hash(cfg, "cell", "basic_cnn")


def test_a_new_generator_recipe_is_a_new_design_for_synthetic_cells_only(monkeypatch):
    import mrilib.synthetic.diffusion as diffusion

    cfg = ex.grid_settings("quick")
    real = ex.make_cell("basic_cnn", real_fraction=0.3)
    synth = ex.make_cell("basic_cnn", synthetic="fill", real_fraction=0.3)
    with paths.preset_env("quick"):
        design = ex.design_hash(cfg, "quick", "basic_cnn")
        assert ex.cell_design(cfg, "quick", real) == design
        before = ex.cell_design(cfg, "quick", synth)
        assert before == f"{design}+{ex.generator_hash(cfg)}"
        for key, value in (("guidance_scale", 2.0), ("class_dropout", 0.2), ("steps", 7),
                           ("strength", 0.7), ("lr", 3e-4)):
            with monkeypatch.context() as m:
                m.setitem(diffusion.DEFAULTS, key, value)
                m.delitem(diffusion.PRESETS["quick"], key, raising=False)
                assert ex.cell_design(cfg, "quick", synth) != before, key
                assert ex.cell_design(cfg, "quick", real) == design, key
        with monkeypatch.context() as m:  # how a run is split up changes nothing
            m.setitem(diffusion.DEFAULTS, "checkpoint_minutes", 9.0)
            m.setitem(diffusion.PRESETS["quick"], "sample_batch", 3)
            m.setitem(diffusion.PRESETS["quick"], "cpu_sample_batch", 3)
            assert ex.cell_design(cfg, "quick", synth) == before
        openai = ex.grid_settings("quick", backend="openai")
        assert ex.generator_hash(openai) != ex.generator_hash(cfg)


def test_a_new_generator_sets_the_old_synthetic_runs_aside_but_no_real_run(tiny, tmp_path,
                                                                           monkeypatch):
    import mrilib.synthetic.diffusion as diffusion

    run(tiny, tmp_path, FakeTrainer())
    runs, _ = ex.load_results(tmp_path)
    synthetic = runs["synthetic"] != "none"
    assert runs.loc[~synthetic, "generator_design"].isna().all()
    old = runs.loc[synthetic, "generator_design"].unique().tolist()
    assert len(old) == 1 and runs["design"].nunique() == 1
    assert all(k.endswith(f"@{d}+{old[0]}") for k, d in
               zip(runs.loc[synthetic, "run_key"], runs.loc[synthetic, "design"]))
    monkeypatch.setitem(diffusion.PRESETS["quick"], "guidance_scale", 2.0)  # a new recipe
    trainer = FakeTrainer()
    run(tiny, tmp_path, trainer)
    assert len(trainer.calls) == SYNTHETIC  # the synthetic cells; the real-only ones are done
    with pytest.warns(ex.MixedDesignsWarning, match="two generators") as caught:
        runs, epochs = ex.load_results(tmp_path)
    assert "kept generator" in str(caught[-1].message)
    assert len(runs) == 2 * QUICK and old[0] not in set(runs["generator_design"])
    assert runs.attrs["set_aside"]["set_aside"] == {f"{runs['design'][0]}+{old[0]}": 2 * SYNTHETIC}
    assert set(epochs["run_key"]) == set(runs["run_key"])
    assert len(ex.load_results(tmp_path, design=None)[0]) == 2 * (QUICK + SYNTHETIC)
    exact, _ = ex.load_results(tmp_path, design=f"{runs['design'][0]}+{old[0]}")
    # that generator's synthetic runs, and the real-only runs they are compared with
    assert len(exact) == 2 * QUICK and set(exact["generator_design"].dropna()) == {old[0]}
    assert (exact["synthetic"] == "none").sum() == 2 * (QUICK - SYNTHETIC)
    assert (ex.grid_status("quick", tmp_path)["done"] == 2).all()


def test_synthetic_rows_written_before_generators_were_named_are_set_aside(tiny, tmp_path):
    run(tiny, tmp_path, FakeTrainer())
    # rewrite the synthetic rows as the runner wrote them before: run key @<design> only,
    # no generator_design; the grid then reruns those cells under today's run keys
    for name in ("runs.jsonl", "epochs.jsonl"):
        path = tmp_path / name
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            cell, _, design = row["run_key"].rpartition("@")
            row["run_key"] = f"{cell}@{design.split('+')[0]}"
            row.pop("generator_design", None)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = FakeTrainer()
    run(tiny, tmp_path, trainer)
    assert len(trainer.calls) == SYNTHETIC
    with pytest.warns(ex.MixedDesignsWarning, match="unrecorded"):
        runs, _ = ex.load_results(tmp_path)
    assert len(runs) == 2 * QUICK and runs.groupby("cell_key").size().eq(2).all()
    assert runs.loc[runs["synthetic"] != "none", "generator_design"].notna().all()
    design = runs["design"].iloc[0]
    older, _ = ex.load_results(tmp_path, design=f"{design}+unrecorded")
    assert len(older) == 2 * QUICK and "generator_design" not in older  # all in the old format


def test_grid_status_counts_finished_repeats(tiny, tmp_path):
    with pytest.raises(RuntimeError):
        run(tiny, tmp_path, FakeTrainer(fail_after=4))
    status = ex.grid_status("quick", tmp_path)
    assert list(status["done"]) == [2, 2, 2, 2, 0, 0, 0, 0]


# ----------------------------------------------------------------------------- the real engine

def test_real_trainer_mixing_and_generators_behind_the_runner(tiny, tmp_path, monkeypatch):
    """train_replicates, mixed_training_set and quick-preset generators, CPU, end to end."""
    import mrilib.synthetic.cache as cache_mod
    import mrilib.synthetic.diffusion as diffusion

    monkeypatch.setattr(diffusion, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(cache_mod, "CACHE", tmp_path / "cache")
    data, split = tiny
    cells = [{"split": "slice", "model": "basic_cnn", "aug": "none", "synthetic": "none", "real_fraction": 0.5},
             {"split": "slice", "model": "basic_cnn", "aug": "none", "synthetic": "fill", "real_fraction": 0.5},
             {"split": "slice", "model": "basic_cnn", "aug": "none", "synthetic": "fill", "real_fraction": 0.5,
              "leakage": "leaky"},
             {"split": "slice", "model": "basic_cnn", "aug": "none", "synthetic": "100+20mod"}]
    kwargs = dict(results_path=tmp_path / "results", data=data, split=split, device="cpu",
                  cells=cells, train={"epochs": 2, "batch_size": 16}, progress=False)
    progress = ex.run_grid("quick", **kwargs)
    assert set(progress.blocked) == {"slice/basic_cnn/none/fill/0.5/sample",
                                     "slice/basic_cnn/none/fill/0.5/leaky",
                                     "slice/basic_cnn/none/100+20mod/1/sample"}
    assert "synth train --split slice --real-frac 0.3" in progress.blocked["slice/basic_cnn/none/fill/0.5/sample"]
    # the runner trains the G = 2 generators per mode itself, then the cells; the leak-free
    # ones learn from the 30% samples and serve the 50% and 100% cells (nested samples;
    # mixed_training_set checks each generator's training ids against the cell's sample)
    progress = ex.run_grid("quick", train_generators=True, **kwargs)
    assert not progress.blocked and not progress.remaining
    trained = sorted(p.parent.name.split("-")[0] + "-" + p.parent.name.split("-")[1]
                     for p in (tmp_path / "cache" / "generators").glob("*/generator.pt"))
    assert trained == ["leaky-pool", "leaky-pool", "x0.3-s0", "x0.3-s1"]
    runs, epochs = ex.load_results(tmp_path / "results")
    assert len(runs) == 8 and len(epochs) == 16 and (runs["init"] == "scratch").all()
    assert runs["final_val_loss"].map(np.isfinite).all()
    assert (runs["stopped_epoch"] == runs["final_epoch"]).all()  # a result, not a setting
    assert runs["class_share_test_loss"].between(0.5, 2.0).all()  # the no-learning baseline
    assert all("stopped_epoch" not in t for t in runs["train_settings"])
    assert runs["final_test_confusion"].map(lambda m: np.asarray(m).sum()).eq(len(split.test)).all()
    info = pd.DataFrame(list(runs["synthetic_info"]))
    synthetic = runs["synthetic"] == "fill"
    # the mixing drew the same real sample the runner says the repeat used
    assert (info.loc[synthetic, "sample_seed"].to_numpy() == runs.loc[synthetic, "sample_seed"]).all()
    assert (info.loc[synthetic, "n_synthetic"] > 0).all()
    assert list(info.loc[runs["leakage"] == "leaky", "leaky"]) == [True, True]
    real_n = runs.loc[runs["synthetic"] == "none", "n_train"].iloc[0]
    assert (runs.loc[synthetic, "n_train"] > real_n).all()


# ----------------------------------------------------------------------------- the report

REPORT_CELLS = [
    {"split": "slice", "model": "basic_cnn", "aug": "none", "synthetic": "none", "real_fraction": 0.3},
    {"split": "slice", "model": "basic_cnn", "aug": "none", "synthetic": "none", "real_fraction": 1.0},
    {"split": "slice", "model": "basic_cnn", "aug": "none", "synthetic": "fill", "real_fraction": 0.3},
    {"split": "slice", "model": "basic_cnn", "aug": "none", "synthetic": "fill", "real_fraction": 0.3,
     "leakage": "leaky"},
    {"split": "slice", "model": "basic_cnn", "aug": "none", "synthetic": "none", "real_fraction": 0.8},
    {"split": "slice", "model": "basic_cnn", "aug": "none", "synthetic": "80+20"},
    {"split": "slice", "model": "basic_cnn", "aug": "none", "synthetic": "100+20mod"},
    {"split": "slice", "model": "basic_cnn", "aug": "hflip", "synthetic": "none", "real_fraction": 0.3},
    {"split": "slice", "model": "basic_cnn", "aug": "hflip", "synthetic": "fill", "real_fraction": 0.3},
    {"split": "slice", "model": "resnet18", "aug": "none", "synthetic": "none", "real_fraction": 0.3},
    {"split": "slice", "model": "resnet18", "aug": "none", "synthetic": "fill", "real_fraction": 0.3},
]


class SyntheticHelps(FakeTrainer):
    """Loss falls by 0.05 x the synthetic share of the training set: a known gain."""

    def __init__(self, n_real_rows):
        super().__init__()
        self.n_real_rows = n_real_rows

    def __call__(self, model, bank_images, bank_labels, train_index, val, test, seeds, **kw):
        records = super().__call__(model, bank_images, bank_labels, train_index, val, test,
                                   seeds, **kw)
        share = (train_index >= self.n_real_rows).float().mean(dim=1)
        for record, s in zip(records, share.tolist()):
            for part in (record["final"], record["best"], *record["history"]):
                part["val_loss"] -= 0.05 * s
                part["test_loss"] -= 0.05 * s
        return records


@pytest.fixture
def results_with_a_known_gain(tiny, tmp_path, monkeypatch):
    import mrilib.paths as paths

    monkeypatch.setattr(paths, "CACHE", tmp_path / "cache")  # figures of the quick preset
    data, split = tiny
    # Five samples, one repeat each: enough independent units for a verdict. The backend
    # is named only so that G may differ from the local generators' count (fake_sets
    # makes the images).
    ex.run_grid("quick", results_path=tmp_path / "results", train_fn=SyntheticHelps(len(data)),
                synth_fn=fake_sets, data=data, split=split, progress=False,
                cells=REPORT_CELLS, repeats=5, samples=5, backend="openai")
    return tmp_path / "results", tmp_path / "cache" / "quick" / "figures"


def test_report_writes_every_figure_and_a_summary(results_with_a_known_gain):
    from mrilib.report import write_report

    results, figures = results_with_a_known_gain
    path = write_report(results, n_boot=200)
    assert path == results / "summary.md"  # a folder of its own keeps its report
    figures = results / "figures"
    summary = path.read_text()
    assert {p.stem for p in figures.glob("*.png")} == {f"{name}_slice" for name in (
        "fig7_1_loss_curves", "fig7_2_augmentation", "fraction_sweep", "synthetic_effect",
        "fraction_sweep_hflip", "synthetic_effect_hflip", "thesis_comparison", "leakage")}
    for phrase in ("ResNet-18 (from scratch)", "Slice split", "Beside the thesis", "0.1760",
                   "Did synthetic images help?", "Leakage ablation", "80% real / 20% synthetic",
                   "Moderate_Demented has 1 of the 13 test images", "git commit"):
        assert phrase in summary, phrase
    verdicts = [line for line in summary.splitlines() if "| 30 |" in line and "| fill |" in line]
    assert len(verdicts) == 3 and all("helped (lower loss)" in v for v in verdicts)
    assert "fig7_1_loss_curves_slice.png" in summary


def test_results_table_and_thesis_comparison_have_intervals(results_with_a_known_gain):
    from mrilib import report
    from mrilib.plots import results as plots

    runs, epochs = ex.load_results(results_with_a_known_gain[0])
    table = report.results_table(runs, "basic_cnn", n_boot=200)
    assert list(table.columns) == list(plots.AUG_LABELS.values())
    assert table.loc["80% real / 20% synthetic", "No augmentation"].endswith("n=5")
    assert table.loc["80% real / 20% synthetic", "AutoAugment"] == "-"
    comparison = report.thesis_comparison(runs, n_boot=200)
    assert (comparison["low"] <= comparison["ours"]).all()
    assert (comparison["ours"] <= comparison["high"]).all()
    assert comparison.loc["100% real", "thesis"] == pytest.approx(0.176023)
    assert "from scratch" in plots.model_label(runs, "resnet18")
    assert plots.model_label(runs, "basic_cnn") == "Basic CNN"


def test_figures_refuse_missing_cells_by_name(results_with_a_known_gain):
    from mrilib.plots import results as plots

    runs, epochs = ex.load_results(results_with_a_known_gain[0])
    with pytest.raises(ValueError, match="vit_tiny"):
        plots.loss_curves_figure(epochs, model="vit_tiny")
    with pytest.raises(ValueError, match="no runs"):
        plots.augmentation_figure(runs, real_fraction=0.5)


def test_cli_modules_parse_and_run(results_with_a_known_gain, capsys):
    import argparse

    from mrilib.commands import grid, report

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    grid.add_parser(sub)
    report.add_parser(sub)
    results, figures = results_with_a_known_gain
    args = parser.parse_args(["grid", "--preset", "quick", "--list", "--results", str(results)])
    assert args.func(args) == 0
    assert "cells complete" in capsys.readouterr().out
    args = parser.parse_args(["report", "--preset", "quick", "--results", str(results),
                              "--n-boot", "200"])
    assert args.func(args) == 0
    assert (results / "summary.md").exists() and (results / "figures").is_dir()
    assert not (figures.parent / "results" / "summary.md").exists()


# ----------------------------------------------------------------------------- one design per read

def test_a_changed_default_sets_the_old_design_aside_when_read(tiny, tmp_path, monkeypatch):
    """After a default changes, a resumed grid holds two designs; reads keep the current one."""
    import warnings

    import mrilib.train as train

    resnet = {"split": "slice", "model": "resnet18", "aug": "none", "synthetic": "none", "real_fraction": 0.3}
    cells = [*GRID_PRESETS["quick"]["cells"][:3], resnet]
    run(tiny, tmp_path, FakeTrainer(), cells=cells)
    old = ex.design_hash(ex.grid_settings("quick"), "quick", "basic_cnn")
    monkeypatch.setitem(train.PRESETS["quick"], "epochs", 2)  # the protocol changes
    with paths.preset_env("quick"):
        new = ex.design_hash(ex.grid_settings("quick"), "quick", "basic_cnn")
    assert new != old
    trainer = FakeTrainer()
    run(tiny, tmp_path, trainer, cells=cells[:2])  # a partial resume: two cells retrained
    assert len(trainer.calls) == 2
    with pytest.warns(ex.MixedDesignsWarning) as caught:
        runs, epochs = ex.load_results(tmp_path)
    message = str(caught[-1].message)
    for phrase in (str(tmp_path), "6 of 12 runs set aside", f"kept design {new}",
                   f"set aside {old} (6 runs)", "design=None", "one design"):
        assert phrase in message, phrase
    basic = runs[runs["model"] == "basic_cnn"]
    assert set(basic["design"]) == {new} and len(basic) == 4  # the third cell is not rerun yet
    assert set(runs.loc[runs["model"] == "resnet18", "design"]) == {old}  # its only design
    assert runs.attrs["set_aside"]["set_aside"] == {old: 6}
    assert set(epochs["run_key"]) == set(runs["run_key"]) and len(epochs) == len(runs) * EPOCHS
    assert list(ex.grid_status("quick", tmp_path, cells=cells[:3])["done"]) == [2, 2, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        every, every_epochs = ex.load_results(tmp_path, design=None)
        older, _ = ex.load_results(tmp_path, design=old)
    assert len(every) == 12 and set(every["design"]) == {old, new}
    assert len(every_epochs) == 12 * EPOCHS and every.attrs["set_aside"] is None
    assert len(older) == 8 and set(older["design"]) == {old}
    with pytest.raises(ValueError, match=f"{old} \\(8 runs\\)"):
        ex.load_results(tmp_path, design="deadbeef")


def test_rows_made_with_explicit_settings_are_kept_newest_first(tiny, tmp_path):
    """Overrides (tests, notebook 04) give designs the defaults do not: the newest is kept."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(tiny, tmp_path, FakeTrainer(), train={"lr": 1e-4})
        runs, _ = ex.load_results(tmp_path)
    assert len(runs) == 2 * QUICK and runs.attrs["set_aside"] is None
    first = runs["design"].iloc[0]
    run(tiny, tmp_path, FakeTrainer(), train={"lr": 3e-4})  # same cells, another protocol
    with pytest.warns(ex.MixedDesignsWarning, match="the newest"):
        runs, _ = ex.load_results(tmp_path)
    assert len(runs) == 2 * QUICK and first not in set(runs["design"])
    assert len(ex.load_results(tmp_path, design=first)[0]) == 2 * QUICK


def test_provenance_without_git_uses_the_recorded_checkout(monkeypatch):
    """On a GPU machine prepare.sh's record of the checkout names the commit."""
    monkeypatch.setattr(provenance, "_git", lambda *args: None)
    monkeypatch.delenv("MRILIB_GIT_COMMIT", raising=False)
    assert provenance.git_state()["git_commit"] == "uncommitted"
    monkeypatch.setenv("MRILIB_GIT_COMMIT", "0123abcd" * 5)
    monkeypatch.setenv("MRILIB_GIT_DIRTY", "0")
    state = provenance.git_state()
    assert state["git_commit"] == "0123abcd" * 5 and state["git_dirty"] is False
    # A stale .git in the copy (seen on the H200) does not override the recorded state.
    monkeypatch.setattr(provenance, "_git", lambda *args: "fedcba98" * 5 if args[0] == "rev-parse" else "")
    assert provenance.git_state()["git_commit"] == "0123abcd" * 5
    monkeypatch.delenv("MRILIB_GIT_COMMIT")
    assert provenance.git_state()["git_commit"] == "fedcba98" * 5


def test_available_generators_run_the_repeats_that_have_theirs(tiny, tmp_path, monkeypatch):
    """Generator 0 alone: every leak-free synthetic cell runs repeat 0 now, repeat 1 later."""
    import mrilib.synthetic.cache as cache_mod
    import mrilib.synthetic.diffusion as diffusion
    from mrilib.synthetic.diffusion import train_for_sample

    monkeypatch.setattr(diffusion, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(cache_mod, "CACHE", tmp_path / "cache")
    data, split = tiny
    cells = [{"split": "slice", "model": "basic_cnn", "aug": "none", "synthetic": "fill", "real_fraction": 0.5},
             {"split": "slice", "model": "basic_cnn", "aug": "none", "synthetic": "fill", "real_fraction": 0.5,
              "leakage": "leaky"}]
    kwargs = dict(results_path=tmp_path / "results", data=data, split=split, device="cpu",
                  cells=cells, train={"epochs": 1, "batch_size": 16}, progress=False)
    cfg = ex.grid_settings("quick")
    train_for_sample(data, split, cfg["generator_fraction"], 0, progress=False)
    assert ex.run_grid("quick", **kwargs).runs_written == 0  # all or nothing by default
    progress = ex.run_grid("quick", available_generators=True, **kwargs)
    fill, leaky = "slice/basic_cnn/none/fill/0.5/sample", "slice/basic_cnn/none/fill/0.5/leaky"
    assert progress.runs_written == 1 and set(progress.remaining) == {fill, leaky}
    assert progress.blocked[fill].startswith("1 repeat(s) wait: ") and "generator 1" in \
        progress.blocked[fill]
    runs, _ = ex.load_results(tmp_path / "results")
    assert list(runs["repeat"]) == [0] and list(runs["leakage"]) == ["sample"]
    train_for_sample(data, split, cfg["generator_fraction"], 1, progress=False)
    progress = ex.run_grid("quick", available_generators=True, **kwargs)
    assert progress.runs_written == 1 and progress.remaining == [leaky]
    runs, _ = ex.load_results(tmp_path / "results")
    assert sorted(runs["repeat"]) == [0, 1] and runs["run_key"].is_unique


def test_the_grid_judges_a_new_model_by_the_committed_benchmark(monkeypatch):
    cfg = ex.grid_settings("thesis")
    import mrilib.device

    monkeypatch.setattr(mrilib.device, "device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    with paths.preset_env("thesis"):
        priors = schedule._priors(cfg, "cuda")
    assert {"basic_cnn", "resnet18", "vit_tiny"} <= set(priors)  # benchmarks/ holds them


# ----------------------------------------------------------------------------- ImageNet starts

@pytest.fixture
def weights_file(tmp_path):
    """A stand-in weights file: the grid hashes it and passes its path on."""
    path = tmp_path / "weights" / "resnet18.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"stand-in for timm's resnet18 state dict")
    return path


def test_imagenet_start_changes_the_design_of_its_model_only(weights_file, tmp_path):
    from mrilib import paths

    plain = ex.grid_settings("thesis")
    cfg = ex.grid_settings("thesis", imagenet={"resnet18": str(weights_file), "vit_tiny": True})
    moved = tmp_path / "elsewhere.safetensors"
    moved.write_bytes(weights_file.read_bytes())
    with paths.preset_env("thesis"):
        def design(c, model):
            return ex.design_hash(c, "thesis", model)

        assert design(cfg, "basic_cnn") == design(plain, "basic_cnn")
        assert design(cfg, "resnet18") != design(plain, "resnet18")
        assert design(cfg, "vit_tiny") != design(plain, "vit_tiny")
        # the weights count, not where their file lies
        same = ex.grid_settings("thesis", imagenet={"resnet18": str(moved)})
        assert design(same, "resnet18") == design(cfg, "resnet18")
        before = design(cfg, "resnet18")
        weights_file.write_bytes(b"other weights")
        assert design(cfg, "resnet18") != before
        assert ex.grid_results_dir(cfg) == paths.results_dir() / "imagenet"
        assert ex.grid_results_dir(plain) == paths.results_dir()
        assert ex.grid_results_dir(cfg, tmp_path) == tmp_path
    assert ex.train_overrides(cfg, "resnet18")["weights"] == str(weights_file)
    assert ex.train_overrides(cfg, "vit_tiny")["pretrained"] is True
    assert not {"weights", "pretrained"} & set(ex.train_overrides(cfg, "basic_cnn"))


@pytest.mark.parametrize("imagenet, match", [
    ({"basic_cnn": True}, "'basic_cnn', which has no ImageNet weights"),
    ({"alexnet": True}, "not a model of the grid"),
    ({"resnet18": "/nowhere/resnet18.safetensors"}, "no weights file at /nowhere/resnet18"),
    ({"resnet18": False}, "give True"),
    (["resnet18"], "give a dict"),
])
def test_bad_imagenet_starts_are_named(imagenet, match):
    with pytest.raises(ValueError, match=match):
        ex.grid_settings("thesis", imagenet=imagenet)


def test_grid_passes_each_model_its_imagenet_start(tiny, tmp_path, weights_file):
    cells = [{"split": "slice", "model": "basic_cnn", "real_fraction": 0.3},
             {"split": "slice", "model": "resnet18", "real_fraction": 0.3}]
    starts = {"resnet18": str(weights_file)}
    trainer = FakeTrainer()
    run(tiny, tmp_path, trainer, cells=cells, imagenet=starts)
    given = {call[0]: overrides for call, overrides in zip(trainer.calls, trainer.overrides)}
    assert given["resnet18"]["weights"] == str(weights_file)
    assert not {"weights", "pretrained"} & set(given["basic_cnn"])
    # counted as done under its own design, and not as runs of the from-scratch grid
    done = ex.grid_status("quick", tmp_path, cells=cells, imagenet=starts)
    assert (done["done"] == done["repeats"]).all()
    scratch = ex.grid_status("quick", tmp_path, cells=cells).set_index("cell")["done"]
    assert scratch.to_dict() == {"slice/basic_cnn/none/none/0.3/none": 2,
                                 "slice/resnet18/none/none/0.3/none": 0}


def test_grid_trains_resnet18_from_a_weights_file(tiny, tmp_path):
    """The real training engine: the runs start from the file and say so."""
    import timm

    from mrilib import train

    torch.manual_seed(0)
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    data, split = tiny
    ex.run_grid("quick", results_path=tmp_path / "results", synth_fn=fake_sets, data=data,
                split=split, progress=False, device="cpu",
                cells=[{"split": "slice", "model": "resnet18", "real_fraction": 0.3}],
                imagenet={"resnet18": str(path)})
    runs, _ = ex.load_results(tmp_path / "results")
    assert len(runs) == 2 and set(runs["init"]) == {"imagenet"}
    lr = train.PER_MODEL["resnet18"]["lr_imagenet"]
    assert all(s["lr"] == lr and s["weights"] == str(path) for s in runs["train_settings"])


def test_grid_cli_imagenet_option():
    from mrilib.commands.grid import imagenet_starts

    assert imagenet_starts("resnet18, vit_tiny=w/vit.safetensors") == {
        "resnet18": True, "vit_tiny": "w/vit.safetensors"}
    for bad in ("resnet18=", ",", "=w.pt"):
        with pytest.raises(ValueError, match="MODEL or MODEL=PATH"):
            imagenet_starts(bad)


def test_a_timed_chunk_is_not_stopped_by_cells_it_would_skip(tiny, tmp_path, monkeypatch):
    """No generators in this chunk: the synthetic cells are listed before any time is
    judged, and a cell too long for the time left gives way to a shorter one further on."""
    import mrilib.synthetic.cache as cache_mod
    import mrilib.synthetic.diffusion as diffusion

    monkeypatch.setattr(diffusion, "CACHE", tmp_path / "cache")  # no generator trained
    monkeypatch.setattr(cache_mod, "CACHE", tmp_path / "cache")
    data, split = tiny
    clock = FakeClock()
    trainer = FakeTrainer(clock=clock, seconds_per_cell=10.0)
    # 25 s: the 30% cell takes 10; 100% real is judged 10 / 0.3 = 33 s and waits; the
    # synthetic cells have no generator; hflip at 30% is judged 10 s and fits; the subject
    # split's 30% cell, judged 10 s at 20 s gone, does not.
    progress = ex.run_grid("quick", results_path=tmp_path / "results", train_fn=trainer,
                           data=data, split=split, clock=clock, progress=False,
                           pacer=paced(25 / 60, tmp_path / "results", clock))
    assert [(model, aug) for model, aug, *_ in trainer.calls] == [("basic_cnn", "none"),
                                                                  ("basic_cnn", "hflip")]
    assert progress.stopped_for_time
    synthetic = {c.key for c in ex.grid_cells("quick") if c.synthetic != "none"}
    assert set(progress.blocked) == synthetic
    assert all("synth train" in why for why in progress.blocked.values())
    assert set(progress.remaining) == synthetic | {"slice/basic_cnn/none/none/1/none",
                                                   "subject/basic_cnn/none/none/0.3/none"}


def test_after_a_skip_a_cell_whose_time_cannot_be_judged_waits(tiny, tmp_path):
    """A model with no cell seen and no benchmark: it would start however little time is
    left, and the hard stop would lose it; once a cell was skipped for time, it waits."""
    clock = FakeClock()
    trainer = FakeTrainer(clock=clock, seconds_per_cell=10.0)
    cells = [{"split": "slice", "model": "basic_cnn", "real_fraction": 0.3},
             {"split": "slice", "model": "basic_cnn", "real_fraction": 1.0},   # judged 33 s: skipped
             {"split": "slice", "model": "resnet18", "real_fraction": 0.3}]    # not judged: waits too
    progress = run(tiny, tmp_path, trainer, clock=clock, cells=cells, max_minutes=25 / 60)
    assert [call[0] for call in trainer.calls] == ["basic_cnn"]
    assert progress.stopped_for_time and len(progress.remaining) == 2
    # with no skip before it, an unjudged model still runs (as the first chunk must)
    progress = run(tiny, tmp_path / "b", FakeTrainer(clock=clock), clock=clock,
                   cells=cells[2:], max_minutes=25 / 60)
    assert progress.runs_written == 2


# ----------------------------------------------------------------------------- merging rows trained elsewhere

def write_rows(directory, losses: dict, torn: bool = False):
    """runs.jsonl and epochs.jsonl holding one run per key of ``losses``."""
    directory.mkdir(parents=True, exist_ok=True)
    runs = "".join(json.dumps({"run_key": k, "final_val_loss": v}) + "\n" for k, v in losses.items())
    epochs = "".join(json.dumps({"run_key": k, "epoch": e, "val_loss": v})
                     + "\n" for k, v in losses.items() for e in (1, 2))
    (directory / "runs.jsonl").write_text(runs + ('{"run_key": "cut' if torn else ""))
    (directory / "epochs.jsonl").write_text(epochs)
    return directory


def test_rows_trained_elsewhere_are_merged_by_run_key(tmp_path):
    here = write_rows(tmp_path / "here", {"a": 0.5, "c": 0.7})   # c: a run trained here
    gpu = write_rows(tmp_path / "gpu", {"a": 0.5, "b": 0.6}, torn=True)
    assert ex.merge_results(gpu, here, check_only=True) == (2, 1)
    assert len(ex.load_results(here, design=None)[0]) == 2       # checking writes nothing
    assert ex.merge_results(gpu, here) == (2, 1)
    runs, epochs = ex.load_results(here, design=None)
    assert list(runs["run_key"]) == ["a", "c", "b"]
    assert sorted(epochs.loc[epochs["run_key"] == "b", "epoch"]) == [1, 2]
    assert len(epochs) == 6
    assert ex.merge_results(gpu, here) == (3, 0)                 # collecting twice adds nothing


def test_a_run_trained_twice_differently_stops_the_merge(tmp_path):
    here = write_rows(tmp_path / "here", {"a": 0.5})
    gpu = write_rows(tmp_path / "gpu", {"a": 0.123, "b": 0.6})
    before = (here / "runs.jsonl").read_bytes(), (here / "epochs.jsonl").read_bytes()
    with pytest.raises(ValueError, match="run a differs.* in final_val_loss "
                                         r"\(0.123 there, 0.5 here\).*nothing was merged"):
        ex.merge_results(gpu, here)
    assert ((here / "runs.jsonl").read_bytes(), (here / "epochs.jsonl").read_bytes()) == before
    # a run sent twice: the same row counts once, two different rows stop the merge
    twice = tmp_path / "twice"
    write_rows(twice, {"b": 0.6})
    line = (twice / "runs.jsonl").read_text()
    (twice / "runs.jsonl").write_text(line + line)
    assert ex.merge_results(twice, here, check_only=True) == (1, 1)
    (twice / "runs.jsonl").write_text(line + line.replace("0.6", "0.7"))
    with pytest.raises(ValueError, match="run b differs.*twice in"):
        ex.merge_results(twice, here)
    assert (here / "runs.jsonl").read_bytes() == before[0]


# ----------------------------------------------------------------------------- generator needs

def test_generator_needs_says_per_repeat_which_generator_and_whether_it_is_there(
        tiny, tmp_path, monkeypatch):
    import mrilib.synthetic.cache as cache_mod
    import mrilib.synthetic.diffusion as diffusion
    from mrilib.synthetic.diffusion import train_for_sample

    monkeypatch.setattr(diffusion, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(cache_mod, "CACHE", tmp_path / "cache")
    data, split = tiny
    cfg = ex.grid_settings("quick", generator_fraction=0.5)
    fill = ex.make_cell("basic_cnn", synthetic="fill", real_fraction=0.5)
    assert ex.generator_needs(data, split, ex.make_cell("basic_cnn", real_fraction=0.5),
                              [0, 1], cfg) == {}  # real-only: no generator
    assert ex.generator_needs(data, split, fill, [0, 1], {**cfg, "backend": "openai"}) == {}
    looked_up = []
    lookup = diffusion.generator_path
    monkeypatch.setattr(diffusion, "generator_path",
                        lambda *a, **k: looked_up.append(a[3]) or lookup(*a, **k))
    needs = ex.generator_needs(data, split, fill, [0, 1, 2, 3], cfg)
    assert [needs[r].g for r in range(4)] == [0, 1, 0, 1]  # repeat r: generator r mod G
    assert all(n.path is None and "synth train --split slice --real-frac 0.5 --seed" in n.why
               for n in needs.values())
    assert sorted(looked_up) == [0, 1]  # each generator looked up once
    train_for_sample(data, split, 0.5, 0, progress=False)
    needs = ex.generator_needs(data, split, fill, [0, 1, 2, 3], cfg)
    assert [needs[r].path is not None for r in range(4)] == [True, False, True, False]
    assert needs[1].why is not None and "generator 1" in needs[1].why
    leaky = ex.make_cell("basic_cnn", synthetic="fill", real_fraction=0.5, leakage="leaky")
    assert all(n.path is None for n in ex.generator_needs(data, split, leaky, [0], cfg).values())


def test_rows_that_named_the_leakage_mode_generator_read_as_leakage(tmp_path):
    row = {"run_key": "k", "cell_key": "slice/basic_cnn/none/fill/0.3/leaky", "model": "basic_cnn",
           "synthetic": "fill", "generator": "leaky", "design": "d", "generator_design": "x"}
    (tmp_path / "runs.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "epochs.jsonl").write_text(json.dumps({"run_key": "k", "generator": "leaky",
                                                       "epoch": 1}) + "\n")
    runs, epochs = ex.load_results(tmp_path, design=None)
    assert list(runs["leakage"]) == ["leaky"] and "generator" not in runs
    assert list(epochs["leakage"]) == ["leaky"]


def test_grid_cli_lists_a_tier_and_a_split(tmp_path, capsys):
    from mrilib import cli

    assert cli.main(["grid", "--preset", "thesis", "--tier", "1", "--split", "subject", "--list",
                     "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0 of 27 cells complete; 0 of 540 runs" in out
    assert "subject/basic_cnn/none/fill/0.3/sample" in out and "slice/" not in out


@pytest.mark.parametrize("split", ["slice", "subject"])
def test_a_preset_with_its_own_cells_keeps_the_split_asked_for(split):
    """`grid --preset quick --split S` (an explicit cell list) runs S's cells only."""
    cells = ex.grid_cells("quick", splits=[split])
    assert cells and {c.split for c in cells} == {split}
    assert len(ex.grid_cells("quick")) == len(cells) + len(
        ex.grid_cells("quick", splits=[{"slice": "subject", "subject": "slice"}[split]]))


def test_a_subset_grid_says_which_command_makes_its_generators(tiny):
    data, split = tiny
    fill = ex.make_cell("basic_cnn", synthetic="fill", real_fraction=0.5)
    quick = ex.generator_needs(data, split, fill, [0], ex.grid_settings("quick", generator_fraction=0.5))
    whole = ex.generator_needs(data, split, fill, [0], ex.grid_settings(
        "quick", generator_fraction=0.5, data_fraction=1.0))
    assert "`python -m mrilib grid --train-generators`" in quick[0].why
    assert "subset" not in whole[0].why and "synth train --split slice" in whole[0].why


def test_the_class_share_baseline_is_the_cross_entropy_of_the_training_shares():
    from mrilib.grid.sets import TrainingSets, class_share_losses

    labels = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3])
    sets = TrainingSets(None, labels, torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), [{}, {}])
    test = torch.tensor([0, 1, 2, 3])
    got = class_share_losses(sets, test, 4)
    # add-one counts: [4, 2, 1, 1] / 8 and [1, 1, 3, 3] / 8
    want = [-np.log(np.array([4, 2, 1, 1]) / 8).mean(), -np.log(np.array([1, 1, 3, 3]) / 8).mean()]
    assert got == pytest.approx(want)
    uniform = TrainingSets(None, labels, torch.tensor([[0, 3, 4, 6]]), [{}])
    assert class_share_losses(uniform, test, 4) == pytest.approx([np.log(4)])
