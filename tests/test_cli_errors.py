"""The command line on bad input, unwritable outputs, interrupts and unfulfilled runs.

Bad input is one line on stderr (``error: ...``), exit status 2, no traceback, and it is
found before any long work starts. Every case runs ``mrilib.cli.main`` in-process.
"""
from __future__ import annotations

import json
import os
import re

import pytest
from fake_openai import FakeOpenAI

from mrilib import cli
from mrilib.checkpoints import save_checkpoint
from mrilib.data import CLASSES
from mrilib.models import build_model


@pytest.fixture
def tiny(image_folder, tmp_path, monkeypatch):
    """A tiny four-class image folder (enough for the quick grid's 10%); caches in tmp_path."""
    import mrilib.synthetic.cache as synthetic_cache
    import mrilib.synthetic.diffusion as diffusion

    monkeypatch.setattr(synthetic_cache, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(diffusion, "CACHE", tmp_path / "cache")
    return str(image_folder({c: 40 for c in CLASSES}, size=(32, 32)))


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("in the way")
    return str(path)


def one_error_line(capsys) -> str:
    """The one ``error:`` line on stderr, after checking there is no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


BAD_INPUT = [
    # --device gpu: the device module's message, for each command that takes a device
    ("train --source {src} --device gpu", "device 'gpu' is not a device torch knows"),
    ("grid --source {src} --device gpu --results {tmp}/res", "device 'gpu' is not a device"),
    ("synth train --real-frac 0.5 --source {src} --device gpu", "device 'gpu' is not a device"),
    ("grid --results {file}", "--results '{file}' is a file, not a folder"),
    ("report --n-boot 0", "--n-boot 0: give 1 or more bootstrap resamples"),
    ("report --n-boot -5", "--n-boot -5: give 1 or more"),
    ("synth generate --real-frac 0.5 --per-image 1 --source {src} --limit-sources 0",
     "--limit-sources 0: give 1 or more"),
    ("synth generate --real-frac 0.5 --per-image 1 --source {src} --limit-sources -2",
     "--limit-sources -2: give 1 or more"),
    ("synth generate --real-frac 0.5 --per-image 1 --source {src} --seed -5",
     "--seed -5: give a seed of 0 or more"),
    ("synth generate --real-frac 0.5 --per-image 1 --source {src} --generator -1",
     "--generator -1: generators are numbered from 0"),
    ("synth generate --real-frac 0 --per-image 1 --source {src}", "--real-frac 0: give a fraction"),
    ("synth generate --split slice --real-frac 0.5 --per-image 1 --source {src}",
     "train it on a GPU with `python -m mrilib synth train --split slice --real-frac 0.5 --seed 0 "
     "--device "
     "cuda` (rerun until it says done), or, for a look on a CPU, train the quick preset's tiny "
     "generator with `MRILIB_PRESET=quick python -m mrilib synth train --split slice "
     "--real-frac 0.5 --seed 0`"),
    ("train --source {src} --seed -5", "--seed -5: give a seed of 0 or more"),
    ("train --source {src} --real-frac 1.5", "--real-frac 1.5: give a fraction in (0, 1]"),
    ("bench train --source {src} --seed -1", "--seed -1: give a seed of 0 or more"),
    # outputs that cannot be written, found before the work
    ("train --source {src} --save {file}", "--save '{file}' is a file, not a folder"),
    ("train --source {src} --save {file}/ckpt", "'{file}' is a file, so nothing can be written"),
    ("bench train --source {src} --out {file}", "--out '{file}' is a file, not a folder"),
    ("synth bench --out {file}/x.json", "--out '{file}/x.json': '{file}' is a file"),
    ("synth sweep --real-frac 0.5 --source {src} --out {tmp}", "--out '{tmp}' is a folder"),
    ("report --out {file}", "--out '{file}' is a file, not a folder"),
    ("report --figures {file}/figures", "--figures '{file}/figures': '{file}' is a file"),
    ("cam --image {src}/Non_Demented/Non_Demented_0.png --checkpoint {tmp}/none.pt "
     "--out {file}/cam.png", "--out '{file}/cam.png': '{file}' is a file"),
]


@pytest.mark.parametrize("command, message", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(command, message, tiny, a_file, tmp_path, capsys,
                                          monkeypatch):
    import mrilib.train

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr(mrilib.train, "train_replicates", no_training)
    fill = {"src": tiny, "file": a_file, "tmp": str(tmp_path)}
    assert cli.main(command.format(**fill).split()) == 2
    assert message.format(**fill) in one_error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
@pytest.mark.parametrize("command", ["train --source {src} --save {locked}/ckpt",
                                     "report --out {locked}/summary"])
def test_an_unwritable_folder_is_found_before_the_work(command, tiny, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code = cli.main(command.format(src=tiny, locked=locked).split())
    finally:
        locked.chmod(0o755)
    assert code == 2 and "cannot write in" in one_error_line(capsys)


def test_a_checkpoint_that_does_not_fit_its_config_says_what_to_do_on_the_command_line(
        tiny, tmp_path, capsys):
    path = tmp_path / "mislabelled.pt"
    cnn = build_model("basic_cnn", img_size=32)
    save_checkpoint(path, cnn.state_dict(), {"model": "resnet18", "img_size": 32,
                                             "num_classes": 4})
    code = cli.main(["cam", "--image", f"{tiny}/Non_Demented/Non_Demented_0.png",
                     "--checkpoint", str(path), "--out", str(tmp_path / "cam.png")])
    line = one_error_line(capsys)
    assert code == 2 and "does not fit the model its config names" in line
    assert "model=None" not in line and "python -m mrilib train ... --save DIR" in line


def test_a_truncated_generator_is_named_and_kept(tiny, tmp_path, capsys):
    from mrilib.data import load_mri
    from mrilib.splits import split_mri
    from mrilib.synthetic.diffusion import train_for_sample

    data = load_mri(tiny)
    path = train_for_sample(data, split_mri(data), 0.5, 0, steps=1, progress=False)
    generator = path.parent / "generator.pt"
    generator.write_bytes(generator.read_bytes()[:200])
    code = cli.main(["synth", "generate", "--split", "slice", "--real-frac", "0.5",
                     "--per-image", "1",
                     "--source", tiny, "--allow-unfinished"])
    line = one_error_line(capsys)
    assert code == 2 and f"generator file {generator} is unreadable" in line
    assert f"delete the folder {generator.parent}" in line
    assert generator.exists()  # GPU work: never deleted for the user


@pytest.mark.parametrize("argv, patch, kept", [
    ("train --source {src}", ("mrilib.commands.train", "run"), "nothing was kept"),
    ("cam --image x --checkpoint y --out z.png", ("mrilib.commands.cam", "run"),
     "nothing was written"),
    ("bench train", ("mrilib.commands.bench", "run"), "a rerun times everything again"),
    ("grid", ("mrilib.commands.grid", "run"), "rerun with --resume"),
    ("synth train --real-frac 0.3", ("mrilib.commands.synth", "run_train"),
     "rerun the same command to resume"),
    ("synth generate --real-frac 0.3 --per-image 1", ("mrilib.commands.synth", "run_generate"),
     "every image made is cached"),
])
def test_ctrl_c_says_what_is_kept(argv, patch, kept, tiny, capsys, monkeypatch):
    import importlib

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(patch[0]), patch[1], interrupted)
    assert cli.main(argv.format(src=tiny).split()) == 130
    err = capsys.readouterr().err
    assert kept in err and err.count("\n") == 1
    if not argv.startswith(("grid", "synth")):
        assert "resume" not in err  # only grid and synth resume


# ----------------------------------------------------------------------------- OpenAI budget

@pytest.mark.parametrize("script, budget, code, counts", [
    (["ok", "refuse", "ok", "ok"], 2, 3, (2, 1, 1)),    # the budget stops it: one not made
    (["ok", "refuse", "ok", "ok"], None, 0, (3, 1, 0)),  # refused is an answer, apart
])
def test_openai_run_not_fulfilled_exits_non_zero_and_counts_refused_apart(
        script, budget, code, counts, tiny, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET123")
    with FakeOpenAI() as server:
        server.script = list(script)
        argv = ["synth", "generate", "--backend", "openai", "--base-url", server.base_url,
                "--split", "slice", "--real-frac", "1.0", "--per-image", "1",
                "--limit-sources", "4",
                "--source", tiny, "--json"]
        if budget is not None:
            argv += ["--max-images", str(budget)]
        assert cli.main(argv) == code
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert (summary["generated"], summary["refused"], summary["not_made"]) == counts
    assert summary["requested"] == 4
    if code:
        assert re.search(r"1 of 4 images not made: stopped before exceeding max_images=2",
                         captured.err)


# ----------------------------------------------------------------------------- the flag

def test_train_and_grid_skip_unreadable_files_when_told(tiny, capsys, monkeypatch):
    import mrilib.grid

    broken = f"{tiny}/Mild_Demented/broken.jpg"
    with open(broken, "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")
    argv = ["train", "--source", tiny, "--real-frac", "1.0", "--replicates", "1",
            "--epochs", "1", "--device", "cpu", "--json"]
    assert cli.main(argv) == 2
    assert "--skip-unreadable on the command line" in one_error_line(capsys)
    assert cli.main(argv + ["--skip-unreadable"]) == 0
    captured = capsys.readouterr()
    assert "warning: skipped 1 unreadable or non-image file(s), e.g. " + broken in captured.err
    assert len(json.loads(captured.out)["runs"]) == 1

    seen = {}

    def run_grid(*args, on_error="raise", **kwargs):
        seen["on_error"] = on_error
        raise KeyboardInterrupt

    monkeypatch.setattr(mrilib.grid, "run_grid", run_grid)
    assert cli.main(["grid", "--source", tiny, "--skip-unreadable"]) == 130
    assert seen["on_error"] == "skip"  # the runner loads past the broken file
    from mrilib.data import load_mri

    assert broken in [p for p, _ in load_mri(tiny, on_error="skip").skipped]


def test_a_class_with_a_handful_of_images_is_warned_about(tiny, capsys):
    argv = ["train", "--source", tiny, "--real-frac", "0.0001", "--replicates", "1",
            "--epochs", "1", "--device", "cpu"]
    assert cli.main(argv) == 0
    assert re.search(r"warning: --real-frac 0.0001 gives few images of some classes "
                     r"\(Mild_Demented 1, .*fewer than 5\)", capsys.readouterr().err)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_permissions_the_umask_gives(umask, mode, tmp_path):
    from mrilib.paths import atomic_write_bytes

    before = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "figure.png", b"png")
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == mode
