"""A generator lever that changes the generator (batchKx) is judged on the same sources as
the default: `synth train --lever`, `synth lever-quality`, and the verdict's rule."""
from __future__ import annotations

import json

import pytest
import torch

import mrilib.cli as cli
import mrilib.paths as paths
import mrilib.synthetic.cache as cache_mod
import mrilib.synthetic.diffusion as diffusion
from mrilib.data import CLASSES
from mrilib.synthetic.diffusion_bench import QUALITY, _lever_checks

SLICE = ("--split", "slice", "--real-frac", "0.5", "--seed")


@pytest.fixture
def folder(image_folder, tmp_path, monkeypatch):
    for module in (diffusion, cache_mod, paths):  # generators, variations, the classifier
        monkeypatch.setattr(module, "CACHE", tmp_path / "cache")
    return str(image_folder(per_class={c: 6 for c in CLASSES}))


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_lever_trains_a_generator_of_its_own(folder, capsys):
    code, out, _ = run(capsys, "synth", "train", *SLICE, "0", "--source", folder, "--json")
    default = json.loads(out)["generators"][0]
    code, out, _ = run(capsys, "synth", "train", *SLICE, "0", "--lever", "batch2x",
                       "--source", folder, "--json")
    lever = json.loads(out)["generators"][0]
    assert code == 0 and default["done"] and lever["done"] and lever["lever"] == "batch2x"
    assert lever["checkpoint"] != default["checkpoint"]  # another design, another folder
    assert lever["target_steps"] == default["target_steps"] // 2  # the same images seen
    code, _, err = run(capsys, "synth", "train", *SLICE, "0", "--lever", "turbo",
                       "--source", folder)
    assert code == 2 and "lever 'turbo'" in err
    code, _, err = run(capsys, "synth", "train", *SLICE, "0", "--lever", "batch2x",
                       "--steps", "9", "--source", folder)
    assert code == 2 and "the lever sets the steps (3" in err


def test_lever_quality_compares_the_same_sources_and_resumes(folder, capsys, tmp_path):
    common = (*SLICE[:-1], "--generator", "0", "--source", folder)
    assert run(capsys, "synth", "train", *SLICE, "0", "--source", folder)[0] == 0
    code, _, err = run(capsys, "synth", "lever-quality", "--lever", "batch2x", *common)
    assert code == 2 and "no generator 0" in err and "with `--lever batch2x` added" in err
    assert run(capsys, "synth", "train", *SLICE, "0", "--lever", "batch2x",
               "--source", folder)[0] == 0
    out_file = tmp_path / "q.json"
    args = ("synth", "lever-quality", "--lever", "batch2x", *common, "--max-sources", "8",
            "--out", str(out_file))
    code, out, _ = run(capsys, *args)
    assert code == 0 and "verdict:" in out
    saved = json.loads(out_file.read_text())
    assert saved["n_sources"] == 8 and set(saved["sources_per_class"].values()) == {2}
    default, lever = saved["generators"]["default"], saved["generators"]["batch2x"]
    assert default["generator"] != lever["generator"] and lever["settings"]["batch_size"] > 0
    assert [default["generated"], lever["generated"]] == [8, 8]
    assert set(saved["checks"]) == {"fidelity_difference", "nearest_real_ratio"}
    assert saved["verdict"] in ("no worse", "worse", "not resolved")
    assert saved["provenance"]["device_name"]
    assert run(capsys, *args)[0] == 0  # a rerun draws nothing again
    again = json.loads(out_file.read_text())
    assert [again["generators"][k]["cached"] for k in ("default", "batch2x")] == [8, 8]
    assert again["checks"] == saved["checks"]
    code, _, err = run(capsys, "synth", "lever-quality", "--lever", "compile", *common)
    assert code == 2 and "changes no generator" in err


def per_source(right, distance):
    return {"right": torch.tensor(right, dtype=torch.float),
            "distance": torch.tensor(distance, dtype=torch.float)}


LABELS = torch.arange(8) % 4  # two sources per class


@pytest.mark.parametrize("lever,verdicts", [
    (per_source([1] * 8, [10.0] * 8), ("no worse", "no worse")),           # the same images
    (per_source([0] * 8, [10.0] * 8), ("worse", "no worse")),              # loses every class
    (per_source([1] * 8, [5.0] * 8), ("no worse", "worse")),               # twice as close
    (per_source([1, 1, 1, 1, 1, 1, 0, 0], [10.0] * 8), ("not resolved", "no worse")),
])
def test_the_verdict_reads_the_paired_interval(lever, verdicts):
    default = per_source([1] * 8, [10.0] * 8)
    checks = _lever_checks(default, lever, LABELS, {**QUALITY, "n_boot": 400}, seed=0)
    assert (checks["fidelity_difference"]["verdict"],
            checks["nearest_real_ratio"]["verdict"]) == verdicts
    for c in checks.values():
        assert c["low"] <= c["value"] <= c["high"]
