"""The results store cannot be silently corrupted: one writer per folder, each run once,
one data set per table. The grid cases run as real ``python -m mrilib grid`` processes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mrilib import cli, paths
from mrilib.grid import load_results
from mrilib.grid.store import (EPOCHS_FILE, RUNS_FILE, ResultsWriter, append_lines,
                               read_runs)

# The quick preset's subject split, real data: one real-only cell of 2 runs (its synthetic
# cell waits for generators the fresh cache lacks), about 10 s on a 2-core CPU.
GRID = ["grid", "--preset", "quick", "--split", "subject"]


# ----------------------------------------------------------------------------- processes

def start_grid(args: list, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mrilib", *GRID, *map(str, args)],
                            cwd=paths.ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen) -> tuple[int, str]:
    """(exit status, stderr's lines without progress bars) of a child grid."""
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if "|" not in line and line.strip()]
    return proc.returncode, "\n".join(lines)


def run_keys(results: Path) -> list[str]:
    return [json.loads(line)["run_key"] for line in (results / RUNS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory, grid_env):
    """A results folder one quick grid wrote from the real data."""
    results = tmp_path_factory.mktemp("quick") / "results"
    code, err = finished(start_grid(["--results", results], grid_env))
    assert code == 0, err
    assert len(run_keys(results)) == 2
    return results


def test_two_grids_on_one_folder_one_is_turned_away_and_each_run_is_written_once(
        tmp_path, grid_env):
    results = tmp_path / "results"
    first = start_grid(["--results", results, "--resume"], grid_env)
    second = start_grid(["--results", results, "--resume"], grid_env)
    (code_1, err_1), (code_2, err_2) = finished(first), finished(second)
    assert sorted([code_1, code_2]) == [0, 2], (err_1, err_2)
    winner, err = (first, err_2) if code_1 == 0 else (second, err_1)
    assert err.count("\n") == 0  # one line: which folder, who holds it, what to do
    assert err.startswith(f"error: {results} is being written by another grid or merge "
                          f"(pid {winner.pid}); wait for it to finish or stop it, or pass "
                          f"another --results folder")
    keys = run_keys(results)
    assert len(keys) == len(set(keys)) == 2
    assert len(load_results(results)[0]) == 2


@pytest.fixture(scope="session")
def other_data(tmp_path_factory, mri_path):
    """The real data less one slice: another data set (another fingerprint), as a folder of
    links (nothing copied)."""
    root = tmp_path_factory.mktemp("other") / "mri"
    files = sorted(p for p in Path(mri_path).rglob("*") if p.is_file())
    for path in files[1:]:
        link = root / path.relative_to(mri_path)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return root


@pytest.mark.parametrize("given_by", ["--source", "MRILIB_DATA"])
def test_a_grid_on_other_data_is_refused_naming_both_fingerprints(given_by, quick_results,
                                                                 other_data, tmp_path,
                                                                 grid_env):
    results = shutil.copytree(quick_results, tmp_path / "results")
    before = (results / RUNS_FILE).read_bytes(), (results / EPOCHS_FILE).read_bytes()
    held = json.loads(before[0].splitlines()[0])["data_fingerprint"]
    args, env = ["--results", results, "--resume"], dict(grid_env)
    if given_by == "--source":
        args += ["--source", other_data]
    else:
        env["MRILIB_DATA"] = str(other_data)
    code, err = finished(start_grid(args, env))
    assert code == 2 and err.count("\n") == 0, err
    assert err.startswith(f"error: {results} holds 2 runs made from data {held}, but this "
                          f"grid loaded data ")
    assert f"from {other_data}: pass the --source (or MRILIB_DATA) those runs used" in err
    assert ((results / RUNS_FILE).read_bytes(), (results / EPOCHS_FILE).read_bytes()) == before


def test_the_report_refuses_to_pool_two_data_sets(quick_results, tmp_path, capsys):
    """A folder an older grid appended other data's runs to (the check above did not exist)."""
    results = shutil.copytree(quick_results, tmp_path / "results")
    rows = [json.loads(line) for line in (results / RUNS_FILE).read_text().splitlines()]
    held = rows[0]["data_fingerprint"]
    other = [{**r, "run_key": r["run_key"].replace("/r0", "/r1"),
              "data_fingerprint": "0123456789abcdef"} for r in rows]
    append_lines(results / RUNS_FILE, other)
    assert cli.main(["report", "--preset", "quick", "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds runs made from 2 data sets (data_fingerprint " in err
    assert f"{held} (2 runs), 0123456789abcdef (2 runs)" in err
    assert len(load_results(results, design=None)[0]) == 4  # every row, when asked


# ----------------------------------------------------------------------------- in one process

def row(key: str, loss: float = 0.5) -> dict:
    return {"run_key": key, "final_val_loss": loss}


@pytest.mark.parametrize("second, kept", [
    (row("a"), 2),            # one run written twice as the same row: counted once
    (row("a", 0.25), None),   # trained twice, differently: no table may count either
])
def test_reading_folds_identical_copies_and_names_differing_ones(second, kept, tmp_path):
    append_lines(tmp_path / RUNS_FILE, [row("a"), row("b"), second])
    if kept is not None:
        assert [r["run_key"] for r in read_runs(tmp_path)] == ["a", "b"]
        return
    with pytest.raises(ValueError, match=rf"run a is in {tmp_path}/runs.jsonl line 1 and "
                                         rf"{tmp_path}/runs.jsonl line 3 with different "
                                         r"final_val_loss \(0.5 and 0.25\): it was trained "
                                         r"twice; delete one of the two lines"):
        read_runs(tmp_path)


def test_a_second_writer_is_turned_away_naming_the_holder(tmp_path):
    with ResultsWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match=rf"{tmp_path} is being written by another grid "
                                             rf"or merge \(pid {os.getpid()}\)"):
            ResultsWriter(tmp_path)
        assert writer.append(row("a"), [])
    with ResultsWriter(tmp_path) as again:  # the lock went with the first writer
        assert again.done == {"a"}


def test_the_holder_is_named_even_just_after_it_took_the_lock(tmp_path):
    """A holder writes its pid right after taking the lock: a second writer arriving in
    between reads it once written, rather than "unknown" (a grid test once caught it)."""
    import threading

    from mrilib.locks import holder

    lock = tmp_path / ".lock"
    lock.write_text("")
    threading.Timer(0.05, lock.write_text, ["4242\n"]).start()
    assert holder(lock) == "4242"
    (tmp_path / ".empty").write_text("")
    assert holder(tmp_path / ".empty", wait_s=0.05) == "unknown"  # a holder that died early


def test_a_writer_skips_a_run_that_appeared_since_it_looked(tmp_path):
    with ResultsWriter(tmp_path) as writer:
        append_lines(tmp_path / RUNS_FILE, [row("a")])  # a writer that ignored the lock
        assert not writer.append(row("a"), [{"run_key": "a", "epoch": 1}])
        assert writer.append(row("b"), [{"run_key": "b", "epoch": 1}])
    assert [r["run_key"] for r in read_runs(tmp_path)] == ["a", "b"]
    assert (tmp_path / EPOCHS_FILE).read_text().count("\n") == 1
