"""What a tier of the grid costs in GPU windows (mrilib.grid.cost): exact variation counts,
the window arithmetic, which benchmark rows are read, and `bench cost`."""
from __future__ import annotations

import json

import pytest

from mrilib.grid import grid_settings
from mrilib.grid.cells import grid_cells
from mrilib.grid.cost import card_speeds, tier_cost, variation_counts
from mrilib.grid.design import repeat_seeds
from mrilib.synthetic.mixing import mixed_training_set
from test_mixing import ShiftBackend, pool  # noqa: F401 (a fixture)


class LeakyShift(ShiftBackend):
    def params(self) -> dict:
        return {**super().params(), "generator": "leaky twin"}


@pytest.mark.parametrize("draws", ["per_generator", "per_repeat"])
def test_variation_counts_are_what_the_mixing_code_draws(pool, tmp_path, draws):  # noqa: F811
    """Every tier-1 slice cell's repeats of generator 1, mixed for real through one cache:
    the images drawn are the count, shared draws counted once."""
    data, split = pool
    cfg = grid_settings("thesis", variations=draws)
    cells = [c for c in grid_cells("thesis", tier=1) if c.split == "slice"]
    backends = {"sample": ShiftBackend(sample_seed=1), "leaky": LeakyShift(sample_seed=1)}
    for cell in (c for c in cells if c.synthetic != "none"):
        for r in (r for r in range(cfg["repeats"]) if repeat_seeds(r, cfg).sample_index == 1):
            s = repeat_seeds(r, cfg)
            mixed_training_set(data, split, cell.real_fraction, cell.synthetic_fraction,
                               classes=cell.synthetic_classes, seed=s.synth_seed,
                               backend=backends[cell.leakage], cache_root=tmp_path,
                               progress=False)
    counted = variation_counts(data, split, cells, 1, cfg)
    assert counted == {mode: b.made for mode, b in backends.items()}
    assert 0 < counted["leaky"] < counted["sample"]


def speeds(gen_minutes=1.0, per_s=1e6, group_seconds=1.0):
    gen = {"file": "g.json", "lever": "default", "minutes": gen_minutes,
           "variations_per_s": per_s, "estimated": False}
    group = {"file": "c.json", "seconds": group_seconds, "replicates": 20, "epochs": 10,
             "real_fraction": 0.3, "levers": []}
    return {"card": "test card", "generator": {"default": gen, "fastest": gen},
            "sampling": {"default": gen, "fastest": gen},
            "group": {"default": group, "fastest": group}}


def test_windows_hold_a_generator_and_everything_that_uses_it(pool):  # noqa: F811
    pool = pool[0]
    fits = tier_cost(pool, speeds(), split="slice")["splits"]["slice"]["default"]
    assert [w["windows"] for w in fits["generators"]] == [1] * 5 and fits["windows"] == 5
    # a generator and its cells, 33.25 minutes of work: its window, then three more that
    # each retrain it (1 minute) for the 23.75 minutes left, at 8.5 a window
    slow = tier_cost(pool, speeds(group_seconds=1.0), split="slice",
                     group_epochs={"slice": 10, "subject": 10})["splits"]["slice"]["default"]
    one = slow["generators"][0]
    cells = one["synthetic_cells"]
    scale = (33.25 - 1.0) / cells  # group seconds that make a generator's work 33.25 minutes
    big = tier_cost(pool, speeds(group_seconds=scale), split="slice",
                    group_epochs={"slice": 10, "subject": 10})["splits"]["slice"]["default"]
    g0 = big["generators"][0]
    assert g0["synthetic_cells"] == pytest.approx(cells * scale)
    assert g0["windows"] == 4 and g0["minutes"] == pytest.approx(33.25 + 3 * 1.0, rel=1e-4)
    assert big["gpu_minutes"] == pytest.approx(sum(w["minutes"] for w in big["generators"])
                                               + big["real_only_cells"])
    longer = tier_cost(pool, speeds(group_seconds=scale), split="slice",
                       group_epochs={"slice": 20, "subject": 20})["splits"]["slice"]["default"]
    assert longer["generators"][0]["synthetic_cells"] == pytest.approx(2 * g0["synthetic_cells"])
    with pytest.raises(ValueError, match="cannot hold the generator's 12.0 minutes"):
        tier_cost(pool, speeds(gen_minutes=12.0), split="slice")


def write(folder, name, row):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(row))


def bench_row(seconds, levers=(), deterministic=True, device="Card X"):
    settings = {"img_size": 128, "epochs": 10, "real_frac": 0.3,
                "deterministic_mrilib": deterministic,
                **{f"{lever}_mrilib": True for lever in levers}}
    return {"device": device, "model": "basic_cnn", "settings": settings,
            "parallel": {"replicates": 20, "seconds_per_replicate": seconds}}


def test_the_rows_read_are_the_grid_protocol_and_judged_levers(tmp_path):
    bench, results = tmp_path / "benchmarks", tmp_path / "results"
    write(bench, "bench-train-a.json", bench_row(0.5))
    write(bench, "bench-train-b.json", bench_row(0.6))
    write(bench, "bench-train-graph.json", bench_row(0.2, levers=("cuda_graph",)))
    write(bench, "bench-train-nondet.json", bench_row(0.1, deterministic=False))  # a design
    write(bench, "bench-train-other.json", bench_row(0.01, device="Card Y"))
    write(bench, "gen.json", {"device": "Card X", "minutes_for_default_steps": 5.0,
                              "variations_per_s": 80.0, "guidance_scale": 1.0,
                              "speed_settings": {"channels_last": False}})
    sampling = [{"guidance_scale": 1.0, "variations_per_s": 90.0},
                {"guidance_scale": 4.0, "variations_per_s": 45.0}]
    write(bench, "levers.json", {"device": "Card X", "rows": [
        {"lever": "default", "changes_results": False, "minutes_for_default_steps": 5.5,
         "sampling": sampling},
        {"lever": "batch4x", "changes_results": True, "minutes_for_default_steps": 1.5,
         "sampling": sampling}]})
    got = card_speeds("card x", bench, results)
    assert got["group"]["default"]["file"] == "bench-train-b.json"  # the slowest row without a lever
    assert got["group"]["fastest"]["file"] == "bench-train-graph.json"  # levers are run-only
    assert got["group"]["fastest"]["seconds"] == pytest.approx(4.0)
    assert got["generator"]["default"]["minutes"] == 5.5
    assert got["generator"]["fastest"]["minutes"] == 5.0  # batch4x: not judged yet
    assert got["sampling"]["default"] == got["sampling"]["default"] | {
        "file": "gen.json", "variations_per_s": 40.0, "estimated": True}
    assert got["sampling"]["fastest"]["variations_per_s"] == 45.0
    write(results, "lever_quality_batch4x_x0.3_g0.json", {"verdict": "no worse",
                                                          "preset": "quick"})
    assert card_speeds("Card X", bench, results)["generator"]["fastest"]["minutes"] == 5.0
    write(results, "lever_quality_batch4x_x0.3_g0.json", {"verdict": "no worse",
                                                          "preset": "thesis"})
    assert card_speeds("Card X", bench, results)["generator"]["fastest"]["minutes"] == 1.5
    write(results, "lever_quality_batch4x_x0.3_g1.json", {"verdict": "not resolved",
                                                          "preset": "thesis"})
    assert card_speeds("Card X", bench, results)["generator"]["fastest"]["minutes"] == 5.0
    with pytest.raises(ValueError, match="no `synth bench` row for a card named like 'Card Y'"):
        card_speeds("Card Y", bench, results)
    with pytest.raises(ValueError, match="names 2 cards"):
        card_speeds("card", bench, results)


def test_a_row_of_fewer_epochs_is_compared_per_epoch(tmp_path):
    bench = tmp_path / "benchmarks"
    write(bench, "gen.json", {"device": "Card X", "minutes_for_default_steps": 5.0,
                              "variations_per_s": 80.0, "guidance_scale": 1.0})
    write(bench, "bench-train-ten.json", bench_row(0.5))
    write(bench, "bench-train-one.json", bench_row(0.1) | {"settings": bench_row(0.1)["settings"]
                                                | {"epochs": 1}})
    assert card_speeds("Card X", bench, tmp_path)["group"]["fastest"]["file"] == "bench-train-ten.json"


def test_what_the_rows_cannot_price_is_refused(pool):  # noqa: F811
    with pytest.raises(ValueError, match="resnet18, vit_tiny cells, which the basic CNN's"):
        tier_cost(pool[0], speeds(), tier=2)
    no_plain = speeds()
    no_plain["generator"]["default"] = None
    with pytest.raises(ValueError, match="no `synth bench` row without speed flags"):
        tier_cost(pool[0], no_plain, split="slice")


def test_cli_bench_cost(mri_path, capsys):
    import mrilib.cli as cli

    assert cli.main(["bench", "cost", "--card", "H100", "--split", "subject",
                     "--source", str(mri_path)]) == 0
    out = capsys.readouterr().out
    assert "tier 1 on NVIDIA H100" in out and "subject split" in out and "slice" not in out
    assert "windows for the split" in out and "GPU-minutes" in out
    assert cli.main(["bench", "cost", "--card", "no such card"]) == 2
    assert "pick another --card" in capsys.readouterr().err
