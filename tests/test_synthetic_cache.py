"""The synthetic-image cache: resumable, deterministic, nothing made twice.

A tiny deterministic backend stands in for the diffusion model (each output a function
of image, label and seed only); the OpenAI backend runs against the local fake API.
Two tests kill a generating process with SIGKILL and resume it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fake_openai import FakeOpenAI

from mrilib.synthetic import (Backend, Refused, cache_dir, generate_cached, get_backend,
                              read_manifest, to_gray128, variation_seed)

TESTS = Path(__file__).resolve().parent
KEY = "sk-test-SECRET123"


class Dummy(Backend):
    """Variation = the source blended with seeded noise, plus the label: deterministic."""

    name = "dummy"

    def __init__(self, strength: float = 0.5, delay: float = 0.0, refuse_label: int | None = None,
                 stop_after: int | None = None):
        self.strength, self.delay = strength, delay
        self.refuse_label, self.stop_after = refuse_label, stop_after
        self.seen: list[int] = []  # seeds of every image made, in order

    def params(self) -> dict:
        return {"strength": self.strength}

    def generate(self, images, labels, seeds):
        if self.refuse_label is not None and bool((labels == self.refuse_label).any()):
            raise Refused(f"label {self.refuse_label} is refused")
        out = []
        for image, label, seed in zip(images, labels, seeds):
            if self.stop_after is not None and len(self.seen) >= self.stop_after:
                raise KeyboardInterrupt  # what Ctrl-C does mid-batch
            time.sleep(self.delay)
            self.seen.append(seed)
            g = torch.Generator().manual_seed(seed)
            noise = torch.randint(0, 256, image.shape, generator=g)
            mixed = (1 - self.strength) * image.float() + self.strength * noise.float() + int(label)
            out.append(mixed.round().clamp(0, 255).to(torch.uint8))
        return torch.stack(out)


def sources(n: int = 6, seed: int = 0):
    """(images, labels, ids) of ``n`` random slices, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 128, 128), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 4, [f"src{i:02d}" for i in range(n)]


def run(backend, root, per_image=2, n=6, **kw):
    images, labels, ids = sources(n)
    return generate_cached(backend, images, labels, ids, per_image, seed=7, cache_root=root,
                           progress=False, **kw)


def pairs(rows) -> list[tuple[str, int]]:
    return [(r["source_id"], r["k"]) for r in rows]


# ----------------------------------------------------------------------------- basics

def test_second_run_comes_from_the_cache(tmp_path):
    b = Dummy()
    out, report = run(b, tmp_path)
    assert out.shape == (6, 2, 1, 128, 128) and out.dtype == torch.uint8
    assert (report["generated"], report["cached"], report["missing"]) == (12, 0, 0)
    again, second = run(Dummy(), tmp_path)
    assert torch.equal(out, again) and (second["generated"], second["cached"]) == (0, 12)
    rows = read_manifest(report["dir"])
    assert sorted(pairs(rows)) == sorted({(f"src{i:02d}", k) for i in range(6) for k in (0, 1)})
    assert rows[0]["backend"] == "dummy" and rows[0]["params"] == {"strength": 0.5}
    assert rows[0]["seed"] == variation_seed(7, rows[0]["source_id"], rows[0]["k"])
    assert json.loads((Path(report["dir"]) / "key.json").read_text())["seed"] == 7


def test_output_is_independent_of_batching(tmp_path):
    one_by_one, _ = run(Dummy(), tmp_path / "a", batch_size=1)
    batched, _ = run(Dummy(), tmp_path / "b", batch_size=5)
    assert torch.equal(one_by_one, batched)
    images, labels, ids = sources()
    v = Dummy().variations(images, labels, n=2, seed=7)
    assert v.shape == batched.shape
    subset = Dummy().variations(images[[5, 0]], labels[[5, 0]], n=2, seed=7)
    assert torch.equal(v[[0, 5]], subset[[1, 0]])


@pytest.mark.parametrize("change", [{"seed": 8}, {"strength": 0.6}])
def test_key_covers_seed_and_params(tmp_path, change):
    images, labels, ids = sources(2)
    base = cache_dir(Dummy(), 7, tmp_path)
    other = cache_dir(Dummy(strength=change.get("strength", 0.5)), change.get("seed", 7), tmp_path)
    assert base != other and base.parent == other.parent == tmp_path
    a, _ = generate_cached(Dummy(), images, labels, ids, 1, 7, cache_root=tmp_path, progress=False)
    b, _ = generate_cached(Dummy(strength=change.get("strength", 0.5)), images, labels, ids, 1,
                           change.get("seed", 7), cache_root=tmp_path, progress=False)
    assert not torch.equal(a, b)


def test_repeated_source_is_made_once(tmp_path):
    b = Dummy()
    images, labels, ids = sources(2)
    out, report = generate_cached(b, images[[0, 0, 1]], labels[[0, 0, 1]], [ids[0], ids[0], ids[1]],
                                  2, 7, cache_root=tmp_path, progress=False)
    assert len(b.seen) == 4 and torch.equal(out[0], out[1]) and report["ok"].all()


# ----------------------------------------------------------------------------- interruption

def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    reference, _ = run(Dummy(), tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(Dummy(stop_after=5), tmp_path / "cut", batch_size=2)
    directory = cache_dir(Dummy(), 7, tmp_path / "cut")
    stored = {r["seed"] for r in read_manifest(directory)}
    assert len(stored) == 4  # two whole batches; the third was in flight
    b = Dummy()
    resumed, report = run(b, tmp_path / "cut", batch_size=2)
    assert torch.equal(resumed, reference)
    assert not stored & set(b.seen) and (report["generated"], report["cached"]) == (8, 4)
    rows = pairs(read_manifest(directory))
    assert len(rows) == len(set(rows)) == 12


def test_png_without_its_row_is_recovered_not_remade(tmp_path):
    _, report = run(Dummy(), tmp_path)
    manifest = Path(report["dir"]) / "manifest.jsonl"
    lines = manifest.read_bytes().splitlines(keepends=True)
    # Killed between the image write and its row, and again mid-way through a row.
    manifest.write_bytes(b"".join(lines[:-2]) + lines[-2][:25])
    b = Dummy()
    again, second = run(b, tmp_path)
    assert b.seen == [] and second["cached"] == 12 and second["ok"].all()
    rows = read_manifest(report["dir"])
    assert sorted(pairs(rows)) == sorted(set(pairs(rows))) and len(rows) == 12
    assert sum(r.get("recovered", False) for r in rows) == 2


def test_deleted_image_is_made_again(tmp_path):
    first, report = run(Dummy(), tmp_path)
    (Path(report["dir"]) / "src03_1.png").unlink()
    b = Dummy()
    again, second = run(b, tmp_path)
    assert len(b.seen) == 1 and second["generated"] == 1 and torch.equal(first, again)


def test_refusals_in_a_batch_are_found_one_by_one(tmp_path):
    out, report = run(Dummy(refuse_label=3), tmp_path, batch_size=4)
    refused = [i for i in range(6) if i % 4 == 3]
    assert report["refused"] == 2 * len(refused) and report["generated"] == 12 - 2 * len(refused)
    assert report["ok"].tolist() == [[i not in refused] * 2 for i in range(6)]
    assert out[refused].sum() == 0
    b = Dummy()
    _, again = run(b, tmp_path)
    assert b.seen == [] and again["refused"] == 2 * len(refused)


def test_a_second_run_on_the_same_folder_is_turned_away(tmp_path):
    import fcntl

    directory = cache_dir(Dummy(), 7, tmp_path)
    directory.mkdir(parents=True)
    with open(directory / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another run is generating"):
            run(Dummy(), tmp_path)
    assert run(Dummy(), tmp_path)[1]["generated"] == 12


@pytest.mark.parametrize("kw, match", [
    ({"ids": ["a", "b"]}, "2 ids for 6 images"),
    ({"ids": ["../x"] * 6}, "'../x' cannot name a file"),
    ({"per_image": 0}, "per_image=0"),
    ({"images": torch.zeros(6, 1, 64, 64, dtype=torch.uint8)}, r"uint8 \[B, 1, 128, 128\]"),
])
def test_bad_input_is_named(tmp_path, kw, match):
    images, labels, ids = sources()
    args = {"images": images, "labels": labels, "ids": ids, "per_image": 1, **kw}
    with pytest.raises(ValueError, match=match):
        generate_cached(Dummy(), args["images"], labels, args["ids"], args["per_image"], 0,
                        cache_root=tmp_path, progress=False)


def test_wrong_backend_output_is_named(tmp_path):
    class Broken(Dummy):
        def generate(self, images, labels, seeds):
            return super().generate(images, labels, seeds).float()

    with pytest.raises(ValueError, match="'dummy' returned torch.float32"):
        run(Broken(), tmp_path)


# ----------------------------------------------------------------------------- base helpers

@pytest.mark.parametrize("picture", [
    lambda: __import__("PIL.Image").Image.new("RGBA", (512, 512), (200, 100, 0, 255)),
    lambda: torch.full((3, 256, 256), 128, dtype=torch.uint8),
    lambda: torch.rand(300, 200).numpy(),
])
def test_to_gray128(picture):
    out = to_gray128(picture())
    assert out.shape == (1, 128, 128) and out.dtype == torch.uint8


@pytest.mark.parametrize("name", ["local", "openai"])
def test_registry_points_at_a_backend_class(name):
    import importlib.util

    from mrilib.synthetic import BACKENDS

    # Checked in the source, not by importing: diffusers alone takes ~20 s to import here.
    module, cls = BACKENDS[name].target.split(":")
    source = Path(importlib.util.find_spec(module).origin).read_text()
    assert f"class {cls}(Backend)" in source


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown backend 'dalle'; choose one of local, openai"):
        get_backend("dalle")


# ----------------------------------------------------------------------------- kill -9

def _child(code: str, env: dict, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MRILIB_PRESET": "quick", **env}
    return subprocess.Popen([sys.executable, "-c", code], cwd=TESTS, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode} early:\n{log.read_text()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"child did not get there in {timeout} s:\n{log.read_text()}")
        time.sleep(0.05)


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_openai_run_killed_mid_way_resumes_without_paying_twice(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    from mrilib.synthetic.openai_backend import OpenAIBackend

    settings = {"timeout_s": 5.0, "backoff_s": 0.05, "upload_size": 256}
    code = ("import sys; from test_synthetic_cache import sources; "
            "from mrilib.synthetic import generate_cached; "
            "from mrilib.synthetic.openai_backend import OpenAIBackend; "
            f"b = OpenAIBackend(base_url=sys.argv[1], **{settings!r}); "
            f"generate_cached(b, *sources(), 1, 7, cache_root={str(tmp_path)!r})")
    with FakeOpenAI() as server:
        server.hold_after = 3  # the 4th request hangs: the kill lands while it is in flight
        log = tmp_path / "child.log"
        proc = _child(code.replace("sys.argv[1]", repr(server.base_url)),
                      {"OPENAI_API_KEY": KEY}, log)
        backend = OpenAIBackend(base_url=server.base_url, **settings)
        directory = cache_dir(backend, 7, tmp_path)
        _wait_for(lambda: server.held.is_set() and len(read_manifest(directory)) == 3, proc, log)
        _kill9(proc)
        server.hold_after = None
        server.release()
        out, report = run(backend, tmp_path, per_image=1)

    answered = [r["image_sha"] for r in server.answered()]
    assert len(answered) == len(set(answered)) == 6  # each image paid for once
    assert (report["cached"], report["generated"], report["missing"]) == (3, 3, 0)
    rows = pairs(read_manifest(directory))
    assert len(rows) == len(set(rows)) == 6
    assert "SECRET123" not in log.read_text() and "synthetic/openai" in log.read_text()


def test_local_style_run_killed_mid_way_resumes_to_the_same_images(tmp_path):
    code = ("from test_synthetic_cache import Dummy, run; "
            f"run(Dummy(delay=0.1), {str(tmp_path / 'cut')!r}, n=8, batch_size=2)")
    log = tmp_path / "child.log"
    proc = _child(code, {}, log)
    directory = cache_dir(Dummy(), 7, tmp_path / "cut")
    _wait_for(lambda: len(read_manifest(directory)) >= 5, proc, log)
    _kill9(proc)  # anywhere: between batches, between an image and its row, mid-row
    done = {r["seed"] for r in read_manifest(directory)}
    b = Dummy()
    resumed, report = run(b, tmp_path / "cut", n=8, batch_size=2)
    reference, _ = run(Dummy(), tmp_path / "ref", n=8)
    assert torch.equal(resumed, reference) and report["ok"].all()
    assert not done & set(b.seen)
    rows = pairs(read_manifest(directory))
    assert len(rows) == len(set(rows)) == 16
