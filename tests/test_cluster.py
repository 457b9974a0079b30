"""The grid as cluster jobs, through submitit's local executor: real job processes, real
pickling, each job writing its own shard of the results folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from mrilib import cli, paths
from mrilib.grid import cell_design, grid_cells, grid_settings, load_results, run_key
from mrilib.grid.cluster import work_units
from mrilib.grid.store import RUNS_FILE, read_epochs, read_runs, shard_folders

TIMING = ("finished_at", "seconds", "cell_seconds")  # when and how long, not what was trained


def grid(args: list, env: dict, background: bool = False):
    argv = [sys.executable, "-m", "mrilib", "grid", "--preset", "quick", *map(str, args)]
    if background:
        return subprocess.Popen(argv, cwd=paths.ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(argv, cwd=paths.ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def untimed(rows: list[dict]) -> dict[str, dict]:
    return {r["run_key"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows}


# ----------------------------------------------------------------------------- the unit of work

@pytest.mark.parametrize("preset, overrides", [("quick", {}), ("thesis", {"tier": 1})])
def test_each_run_is_in_one_unit_and_each_generator_in_one_job(preset, overrides, tmp_path):
    cfg = grid_settings(preset, **overrides)
    units = work_units(preset, tmp_path, **overrides)
    cells = {c.key: c for c in grid_cells(preset, **overrides)}
    runs = Counter((key, r) for u in units for key in u.cells
                   for r in (u.repeats if u.repeats is not None else range(cfg["repeats"])))
    assert set(runs) == {(key, r) for key in cells for r in range(cfg["repeats"])}
    assert set(runs.values()) == {1}
    generators = Counter()
    for unit in units:
        synthetic = {cells[key].synthetic != "none" for key in unit.cells}
        assert len(synthetic) == 1  # a job trains generators for all its cells or for none
        if synthetic == {True}:
            generators.update({(cells[key].split, r % cfg["samples"], cells[key].leakage)
                               for key in unit.cells for r in unit.repeats})
    assert set(generators.values()) == {1}
    assert len({g for _, g, _ in generators}) == cfg["samples"]


def test_slurm_without_slurm_fails_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    assert cli.main(["grid", "--preset", "quick", "--executor", "slurm",
                     "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--executor slurm: no SLURM on this machine" in err
    assert not (tmp_path / "r" / "jobs").exists()


def test_slurm_gets_one_job_array_with_the_cluster_options(tmp_path, capsys, monkeypatch):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_COPY"\n'
                                 'echo "Submitted batch job 4242"\n')  # as SLURM answers
    (bin_ / "srun").write_text("#!/bin/sh\n")  # submitit looks for both
    for tool in ("sbatch", "srun"):
        (bin_ / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_COPY", str(tmp_path / "job.sh"))
    assert cli.main(["grid", "--preset", "quick", "--executor", "slurm", "--results",
                     str(tmp_path / "r"), "--partition", "gpu", "--max-jobs", "2",
                     "--timeout-min", "30"]) == 0
    units = work_units("quick", tmp_path / "r")
    script = (tmp_path / "job.sh").read_text()
    for option in ("--partition=gpu", "--gpus-per-node=1", "--time=30",
                   "--job-name=mrilib-grid", f"--array=0-{len(units) - 1}%2"):
        assert f"#SBATCH {option}\n" in script
    out = capsys.readouterr().out
    assert out.count("job      4242_") == len(units) and "jobs submitted" in out


# ----------------------------------------------------------------------------- jobs

def test_jobs_give_the_rows_the_in_process_grid_gives(tmp_path, grid_env):
    here, jobs = tmp_path / "here", tmp_path / "jobs"
    done = grid(["--split", "subject", "--results", here], grid_env)
    assert done.returncode == 0, done.stderr
    done = grid(["--split", "subject", "--results", jobs, "--executor", "submitit-local"],
                grid_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 of 3 jobs finished" in done.stdout
    assert {p.name for p in shard_folders(jobs)} == {"subject-g0", "subject-g1",
                                                      "subject-basic_cnn-real"}
    assert not (jobs / RUNS_FILE).exists() and len(load_results(jobs)[0]) == 2  # report's read
    expected = read_runs(here)
    assert untimed(read_runs(jobs)) == untimed(expected) and len(expected) == 2
    keys = {r["run_key"] for r in expected}
    assert read_epochs(jobs, keys) == read_epochs(here, keys)
    # `grid --merge` folds the shards into runs.jsonl and removes them
    assert cli.main(["grid", "--preset", "quick", "--merge", "--results", str(jobs)]) == 0
    assert shard_folders(jobs) == [] and len(load_results(jobs)[0]) == 2
    assert untimed(read_runs(jobs)) == untimed(expected)


def test_a_job_killed_mid_run_is_resubmitted_with_no_run_lost_or_twice(tmp_path, grid_env):
    results = tmp_path / "results"
    shard = results / "shards" / "slice-basic_cnn-real"
    submitter = grid(["--split", "slice", "--results", results, "--executor",
                      "submitit-local"], grid_env, background=True)
    end = time.monotonic() + 240
    while not ((shard / RUNS_FILE).exists() and (shard / RUNS_FILE).read_text().count("\n") >= 2):
        assert submitter.poll() is None and time.monotonic() < end, submitter.stdout.read()
        time.sleep(0.05)
    first = (shard / RUNS_FILE).read_text()
    os.kill(int((shard / ".lock").read_text()), signal.SIGKILL)  # the job, mid-way: 1 of 3 cells
    out, _ = submitter.communicate(timeout=240)
    assert submitter.returncode == 1 and "(slice-basic_cnn-real)" in out, out
    assert "rerun with --resume to resubmit" in out
    done = grid(["--split", "slice", "--results", results, "--executor", "submitit-local",
                 "--resume"], grid_env)
    assert done.returncode == 0, done.stdout + done.stderr
    keys = [json.loads(line)["run_key"] for line in (shard / RUNS_FILE).read_text().splitlines()]
    cfg = grid_settings("quick")
    real = [c for c in grid_cells("quick", splits=["slice"]) if c.synthetic == "none"]
    with paths.preset_env("quick"):
        wanted = {run_key(c, r, cell_design(cfg, "quick", c)) for c in real for r in range(2)}
    assert len(keys) == len(set(keys)) and set(keys) == wanted
    assert (shard / RUNS_FILE).read_text().startswith(first)  # its finished runs kept as were


def test_two_jobs_writing_shards_at_once_lose_nothing(tmp_path):
    code = ("import sys; from mrilib.grid.store import ResultsWriter\n"
            "with ResultsWriter(sys.argv[1], sys.argv[2]) as w:\n"
            "    for i in range(300):\n"
            "        w.append({'run_key': f'{sys.argv[2]}/{i}'}, [{'run_key': f'{sys.argv[2]}/{i}',"
            " 'epoch': 1}])\n")
    env = {**os.environ, "PYTHONPATH": str(paths.ROOT)}
    jobs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), name], env=env)
            for name in ("a", "b")]
    assert [job.wait(timeout=120) for job in jobs] == [0, 0]
    keys = [r["run_key"] for r in read_runs(tmp_path)]
    assert len(keys) == len(set(keys)) == 600
    assert len(read_epochs(tmp_path, set(keys))) == 600


def test_merge_holds_the_folder_lock_and_leaves_shards_a_job_still_writes(tmp_path):
    from mrilib.grid.store import ResultsWriter, merge_shards
    from mrilib.locks import FolderBusy

    for name in ("a", "b"):
        with ResultsWriter(tmp_path, name) as w:
            w.append({"run_key": name, "test_acc": 0.5}, [{"run_key": name, "epoch": 1}])
    with ResultsWriter(tmp_path):  # an in-process grid on the folder
        with pytest.raises(FolderBusy, match="being written by another grid or merge"):
            merge_shards(tmp_path)
    with ResultsWriter(tmp_path, "b"):  # job b still runs
        assert merge_shards(tmp_path) == (1, ["b"])
    assert [p.name for p in shard_folders(tmp_path)] == ["b"]
    assert [r["run_key"] for r in read_runs(tmp_path)] == ["a", "b"]
    assert merge_shards(tmp_path) == (1, []) and shard_folders(tmp_path) == []
    assert len(read_epochs(tmp_path, {"a", "b"})) == 2


def test_a_grid_on_the_folder_does_not_run_beside_its_cluster_jobs(tmp_path):
    from mrilib.grid.store import ResultsWriter
    from mrilib.locks import FolderBusy

    with ResultsWriter(tmp_path, "a") as job:  # a job is running
        job.append({"run_key": "x", "test_acc": 0.5}, [])
        with pytest.raises(FolderBusy, match=r"shards/a is being written by a cluster job"):
            ResultsWriter(tmp_path, shards_too=True)
        with ResultsWriter(tmp_path) as merge:  # a merge may: it leaves busy shards alone
            assert merge.done == {"x"}
    with ResultsWriter(tmp_path, shards_too=True) as grid:  # the job ended: its run is done
        assert grid.done == {"x"}
        with pytest.raises(FolderBusy):  # and no job starts on a shard meanwhile
            ResultsWriter(tmp_path, "a")


def test_a_generator_another_process_trains_is_not_trained_twice(tmp_path, monkeypatch):
    import torch

    import mrilib.synthetic.diffusion as diffusion
    from mrilib.data import CLASSES, MRIData
    from mrilib.locks import folder_lock
    from mrilib.splits import split_mri

    monkeypatch.setattr(diffusion, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(diffusion, "train_generator", lambda *a, **k: pytest.fail("trained"))
    labels = torch.tensor([0] * 12 + [1] * 6 + [2] * 24 + [3] * 18)
    data = MRIData(torch.zeros(len(labels), 1, 128, 128, dtype=torch.uint8), labels, CLASSES,
                   [f"{i:04d}" for i in range(len(labels))], "constructed", "fp")
    split = split_mri(data)
    index = diffusion.generator_training_set(data, split, 0.5, 0, False)
    out = diffusion.generator_dir([data.ids[i] for i in index.tolist()], labels[index], 0.5, 0,
                                  False)
    with folder_lock(out, "held"):  # as the job training it holds it
        with pytest.raises(ValueError, match=rf"generator 0 at {out} is being trained by "
                                             rf"another process \(pid {os.getpid()}\); wait"):
            diffusion.train_for_sample(data, split, 0.5, 0, progress=False)


@pytest.mark.parametrize("gpus_here,given", [(0, 0), (2, 1)])
def test_a_local_job_gets_this_machines_gpu_when_it_has_one(tmp_path, monkeypatch, gpus_here,
                                                            given):
    import torch

    from mrilib.grid.cluster import DEFAULTS, make_executor

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus_here)
    pool = make_executor("submitit-local", tmp_path, dict(DEFAULTS))
    assert pool._executor.parameters["gpus_per_node"] == given


def test_a_job_finding_its_shard_busy_waits_and_tries_again(monkeypatch, capsys):
    """A requeued job that starts while `grid --merge` folds its shard, or while another job
    trains its generator, waits for the lock instead of failing."""
    import types

    import mrilib.grid.cluster as cluster
    from mrilib.locks import FolderBusy

    tries, slept = [], []

    def run_grid(*args, **kwargs):
        tries.append(kwargs["shard"])
        if len(tries) < 3:
            raise FolderBusy("shards/u is being written by another grid or merge")
        return types.SimpleNamespace(runs_written=2, remaining=0, blocked={})

    monkeypatch.setattr(cluster, "run_grid", run_grid)
    monkeypatch.setattr("time.sleep", slept.append)
    job = cluster.GridJob(cluster.Unit("u", ("cell",), None), "quick", "results", {}, {},
                          busy_wait_s=5.0, busy_max_min=1.0)
    assert job() == {"unit": "u", "written": 2, "remaining": 0, "blocked": {}}
    assert tries == ["u"] * 3 and slept == [5.0, 5.0]
    assert "trying again in 5 s" in capsys.readouterr().out
    tries.clear()
    impatient = cluster.GridJob(cluster.Unit("u", ("cell",), None), "quick", "results", {}, {},
                                busy_wait_s=5.0, busy_max_min=0.05)  # 3 s: no second try
    with pytest.raises(FolderBusy, match="still held after 0.05 minutes of retries"):
        impatient()
    assert tries == ["u"]
