"""The local diffusion generator: training, resuming, variations, leakage, the synth CLI.

All on CPU with the quick preset's tiny UNet (16x16 internally, a few steps).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mrilib.cli as cli
import mrilib.synthetic.cache as cache_mod
import mrilib.synthetic.diffusion as diffusion
import mrilib.synthetic.diffusion_bench as diffusion_bench
import mrilib.synthetic.diffusion_training as diffusion_training
from mrilib.data import CLASSES, MRIData
from mrilib.splits import split_mri
from mrilib.device import device_name
from mrilib.synthetic.diffusion import (LeakageError, LocalDiffusion, assert_no_leakage,
                                        generator_dir, generator_path, train_for_sample,
                                        train_generator)
from mrilib.synthetic.mixing import mixed_training_set, real_sample


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models run fastest on one thread; on a shared 2-core box a second OpenMP
    # thread spin-waits and makes each step several times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Smooth blobs whose brightness depends on the class, so classes differ."""
    rng = np.random.default_rng(seed)
    labels = torch.arange(n) % len(CLASSES)
    yy, xx = np.mgrid[:128, :128] / 128.0
    imgs = []
    for c in labels.tolist():
        cy, cx = rng.uniform(0.3, 0.7, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05) * (60 + 50 * c)
        imgs.append(np.clip(blob + rng.normal(0, 4, blob.shape), 0, 255))
    images = torch.from_numpy(np.stack(imgs).astype(np.uint8))[:, None]
    return images, labels, [f"img{seed}x{i:03d}" for i in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    images, labels, ids = tiny_images(16)
    out = tmp_path_factory.mktemp("gen")
    path = train_generator(images, labels, seed=0, out_dir=out, ids=ids, progress=False)
    return path, images, labels, ids


@pytest.fixture(scope="module")
def backend(trained):
    return LocalDiffusion(trained[0])


def state_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- training

def test_checkpoint_records_what_the_generator_learned_from(trained):
    path, _, labels, ids = trained
    ck = state_of(path)
    steps = diffusion.settings(diffusion.DEFAULTS, diffusion.PRESETS)["steps"]
    assert ck["step"] == ck["target_steps"] == steps and ck["done"]
    assert ck["train_ids"] == sorted(ids) and ck["n_images"] == len(ids)
    assert ck["class_counts"] == dict(zip(CLASSES, torch.bincount(labels).tolist()))
    assert [s for s, _ in ck["loss_history"]] == list(range(1, steps + 1))
    assert all(np.isfinite(loss) for _, loss in ck["loss_history"])
    assert set(ck) >= {"model", "optimizer", "lr_schedule", "ema", "rng", "config", "identity"}
    assert (path.parent / "generator.pt").exists()
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["done"] and meta["train_fingerprint"] == ck["train_fingerprint"]


@pytest.mark.parametrize("log_every,channels_last", [(1, False), (3, False), (1, True)])
def test_resume_equals_uninterrupted(tmp_path, log_every, channels_last):
    images, labels, ids = tiny_images(12, seed=1)
    kw = {"ids": ids, "progress": False, "log_every": log_every, "channels_last": channels_last}
    whole = train_generator(images, labels, 3, tmp_path / "a", steps=4, **kw)
    half = train_generator(images, labels, 3, tmp_path / "b", steps=2, **kw)
    saved = state_of(half)
    assert saved["step"] == saved["target_steps"] == 2  # a larger steps extends it below
    resumed = train_generator(images, labels, 3, tmp_path / "b", steps=4, **kw)
    a, b = state_of(whole), state_of(resumed)
    assert b["step"] == 4 and b["done"]
    assert b["loss_history"][:len(saved["loss_history"])] == saved["loss_history"]  # continues
    assert a["loss_history"] == b["loss_history"] and len(a["loss_history"]) == 4 // log_every
    assert a["pending_loss"] == b["pending_loss"]
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), name
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert torch.equal(x, y)
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]


def test_channels_last_is_the_same_training_in_another_layout(tmp_path):
    images, labels, ids = tiny_images(12, seed=1)
    kw = {"ids": ids, "progress": False, "steps": 4}
    plain = state_of(train_generator(images, labels, 3, tmp_path / "a", **kw))
    nhwc = train_generator(images, labels, 3, tmp_path / "b", channels_last=True, **kw)
    # The same generator (the layout is a speed setting, not part of its identity)...
    assert state_of(nhwc)["identity"] == plain["identity"]
    # ...whose weights differ by float rounding only: Adam moves a weight by at most ~lr a
    # step, so 2 x lr x steps bounds what a flipped sign of a near-zero gradient can do.
    lr = diffusion.settings(diffusion.DEFAULTS, diffusion.PRESETS)["lr"]
    for name, w in plain["model"].items():
        torch.testing.assert_close(state_of(nhwc)["model"][name], w, rtol=0, atol=2 * lr * 4)


def test_loaded_optimizer_state_takes_its_weights_layout():
    # Fused and foreach Adam pair a weight with its moments element by element in memory:
    # a moment loaded contiguous beside a channels_last weight must be laid out like it.
    w = torch.nn.Parameter(torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last))
    opt = torch.optim.AdamW([w])
    saved = torch.randn(4, 3, 2, 2)
    opt.state[w] = {"step": torch.tensor(3.0), "exp_avg": saved.clone(),
                    "exp_avg_sq": saved.abs()}
    diffusion_training._match_layouts(opt)
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt.state[w][key].stride() == w.stride()
    assert torch.equal(opt.state[w]["exp_avg"], saved)
    assert opt.state[w]["step"].shape == ()


def test_interrupt_saves_and_resumes(tmp_path, monkeypatch):
    images, labels, ids = tiny_images(12, seed=1)
    whole = state_of(train_generator(images, labels, 3, tmp_path / "a", steps=4, ids=ids,
                                     progress=False))
    real_loss, calls = F.mse_loss, []

    def interrupted_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C (or SIGTERM in the CLI) inside step 3
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(F, "mse_loss", interrupted_third_step)
    with pytest.raises(KeyboardInterrupt):
        train_generator(images, labels, 3, tmp_path / "b", steps=4, ids=ids, progress=False)
    monkeypatch.setattr(F, "mse_loss", real_loss)
    assert state_of(tmp_path / "b" / "checkpoint.pt")["step"] == 2
    resumed = state_of(train_generator(images, labels, 3, tmp_path / "b", steps=4, ids=ids,
                                       progress=False))
    assert resumed["loss_history"] == whole["loss_history"]
    assert all(torch.equal(w, resumed["model"][k]) for k, w in whole["model"].items())


def test_time_budget_stops_then_resumes(tmp_path):
    images, labels, ids = tiny_images(8, seed=2)
    path = train_generator(images, labels, 0, tmp_path, minutes=0, ids=ids, progress=False)
    assert state_of(path)["step"] == 0 and not state_of(path)["done"]
    with pytest.raises(ValueError, match="allow_unfinished"):
        LocalDiffusion(tmp_path)
    path = train_generator(images, labels, 0, tmp_path, ids=ids, progress=False)
    assert state_of(path)["done"]


def test_a_shipped_generator_is_kept_not_retrained(tmp_path):
    """generator.pt brought back from a GPU machine without its checkpoint.pt."""
    images, labels, ids = tiny_images(8, seed=2)
    kw = {"ids": ids, "progress": False}
    train_generator(images, labels, 0, tmp_path, steps=2, **kw)
    (tmp_path / "checkpoint.pt").unlink()
    shipped = (tmp_path / "generator.pt").read_bytes()
    assert train_generator(images, labels, 0, tmp_path, steps=2, **kw) == tmp_path / "generator.pt"
    assert (tmp_path / "generator.pt").read_bytes() == shipped
    assert not (tmp_path / "checkpoint.pt").exists()
    # another run's, or an unfinished one's, is not taken for it: that run trains afresh
    path = train_generator(images, labels, 0, tmp_path, steps=3, **kw)
    assert path.name == "checkpoint.pt" and state_of(path)["step"] == 3


def test_resume_refuses_another_run(tmp_path):
    images, labels, ids = tiny_images(8, seed=2)
    train_generator(images, labels, 0, tmp_path, steps=1, ids=ids, progress=False)
    with pytest.raises(ValueError, match="another training run"):
        train_generator(images, labels, 1, tmp_path, steps=2, ids=ids, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"ids": ["a"]}, "one dataset id per image"),
    ({"labels": torch.full((8,), 7)}, "class ids"),
    ({"images": torch.zeros(8, 1, 64, 64, dtype=torch.uint8)}, "uint8"),
    ({"minutes": -1}, "minutes"),
])
def test_train_rejects_bad_input(tmp_path, kwargs, match):
    images, labels, ids = tiny_images(8)
    args = {"images": images, "labels": labels, "ids": ids} | kwargs
    with pytest.raises(ValueError, match=match):
        train_generator(args.pop("images"), args.pop("labels"), 0, tmp_path, progress=False,
                        **args)


# ----------------------------------------------------------------------------- variations

def test_variations_shape_dtype_params(backend, trained):
    _, images, labels, _ = trained
    out = backend.generate(images[:3], labels[:3], [1, 2, 3])
    assert out.shape == (3, 1, 128, 128) and out.dtype == torch.uint8
    many = backend.variations(images[:2], labels[:2], n=2, seed=0)
    assert many.shape == (2, 2, 1, 128, 128)
    params = backend.params()
    ck = state_of(trained[0])
    assert params["train_fingerprint"] == ck["train_fingerprint"]
    assert params["strength"] == 0.6 and params["ddim_steps"] == 4 and params["step"] == ck["step"]
    json.dumps(params)  # the cache keys on it


def test_seed_determinism(backend, trained):
    _, images, labels, _ = trained
    a = backend.generate(images[:3], labels[:3], [10, 11, 12])
    assert torch.equal(a, backend.generate(images[:3], labels[:3], [10, 11, 12]))
    b = backend.generate(images[:3], labels[:3], [20, 21, 22])
    assert all(not torch.equal(a[i], b[i]) for i in range(3))


def test_independent_of_batch_composition(backend, trained):
    _, images, labels, _ = trained
    together = backend.generate(images[:4], labels[:4], [5, 6, 7, 8])
    alone = backend.generate(images[2:3], labels[2:3], [7])
    other_batch = backend.generate(images[[9, 2]], labels[[9, 2]], [99, 7])
    for x in (alone[0], other_batch[1]):
        diff = (x.int() - together[2].int()).abs()
        # GEMM rounding differs with the batch size: at most one gray level, in few pixels
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_label_conditioning_is_used(backend, trained):
    _, images, labels, _ = trained
    src = images[:1].repeat(4, 1, 1, 1)
    out = backend.generate(src, torch.arange(4), [3, 3, 3, 3])
    assert len({o.numpy().tobytes() for o in out}) == 4


def test_strength_zero_is_the_source_and_one_ignores_it(trained):
    path, images, labels, _ = trained
    zero = LocalDiffusion(path, strength=0.0)
    assert torch.equal(zero.generate(images[:2], labels[:2], [1, 2]), images[:2])
    one = LocalDiffusion(path, strength=1.0)
    same_class = (labels == labels[0]).nonzero().flatten()[:2]
    out = one.generate(images[same_class], labels[same_class], [4, 4])
    assert torch.equal(out[0], out[1])  # a fresh sample: only label and seed matter


class _FakeUNet(torch.nn.Module):
    """Answers ``fn(class label)`` everywhere: what guidance does with it is visible."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, class_labels):
        from types import SimpleNamespace

        out = self.fn(class_labels.to(x.dtype))[:, None, None, None].expand_as(x)
        return SimpleNamespace(sample=out)


@pytest.mark.parametrize("w", [2.0, 3.5])
def test_guidance_combines_the_class_and_class_free_outputs(trained, w):
    # output = free + w (cond - free), with "free" the null class (id 4): run once guided
    # and once unguided with a UNet that answers that combination itself.
    path, images, labels, _ = trained
    guided = LocalDiffusion(path, guidance_scale=w, guidance_rescale=0.0)
    plain = LocalDiffusion(path, guidance_scale=1.0)
    null = diffusion.null_class(guided.cfg)
    assert null == len(CLASSES)
    guided.unet = _FakeUNet(lambda c: 0.1 * c - 0.2)
    plain.unet = _FakeUNet(lambda c: (0.1 * null - 0.2) + w * 0.1 * (c - null))
    a = guided.generate(images[:4], labels[:4], [1, 2, 3, 4])
    b = plain.generate(images[:4], labels[:4], [1, 2, 3, 4])
    assert torch.equal(a, b)
    assert guided.params()["guidance_scale"] == w and plain.params()["guidance_scale"] == 1.0


def test_guidance_rescale_restores_the_class_outputs_spread(trained):
    # A UNet whose output is its input times a class factor: guidance multiplies the
    # spread by (f_null + w (f_c - f_null)) / f_c; rescaling fully (1) undoes exactly that,
    # so it samples as the conditional model alone; 0.7 lands in between.
    path, images, labels, _ = trained
    factor = lambda c: 0.9 - 0.1 * c  # noqa: E731  (null, id 4, lowest: guided stays > 0)

    class Scaled(torch.nn.Module):
        def forward(self, x, t, class_labels):
            from types import SimpleNamespace
            return SimpleNamespace(sample=x * factor(class_labels.to(x.dtype))[:, None, None, None])

    seeds, out = [1, 2, 3, 4], {}
    for name, kw in {"plain": {"guidance_scale": 1.0}, "full": {"guidance_scale": 3.0,
                     "guidance_rescale": 1.0}, "none": {"guidance_scale": 3.0,
                     "guidance_rescale": 0.0}, "part": {"guidance_scale": 3.0}}.items():
        backend = LocalDiffusion(path, strength=1.0, **kw)
        backend.unet = Scaled()
        out[name] = backend.generate(images[:4], labels[:4], seeds).float()
    assert (out["full"] - out["plain"]).abs().max() <= 1  # gray levels of rounding
    assert (out["none"] - out["plain"]).abs().max() > 10
    gap = lambda a: (a - out["plain"]).abs().mean()  # noqa: E731
    assert 0 < gap(out["part"]) < gap(out["none"])
    assert LocalDiffusion(path, guidance_scale=3.0).params()["guidance_rescale"] == 0.7
    assert LocalDiffusion(path, guidance_scale=1).params()["guidance_rescale"] == 0.0  # none
    assert LocalDiffusion(path).params()["guidance_scale"] == 4.0  # the default (DEFAULTS)
    with pytest.raises(ValueError, match="guidance_rescale=2"):
        LocalDiffusion(path, guidance_scale=3.0, guidance_rescale=2.0)


def test_a_cpu_samples_in_small_batches_each_stored_when_done(trained, tmp_path,
                                                                monkeypatch):
    from mrilib.synthetic.cache import generate_cached

    path, images, labels, ids = trained
    monkeypatch.setitem(diffusion.PRESETS["quick"], "cpu_sample_batch", 3)
    backend = LocalDiffusion(path, device="cpu")
    assert backend.max_batch == 3
    assert LocalDiffusion(path, device="cpu", sample_batch=5).max_batch == 5  # asked for
    sizes = []
    denoise = backend._denoise

    def dies_third(im, *a):  # a crash during the third UNet call
        sizes.append(len(im))
        if len(sizes) == 3:
            raise KeyboardInterrupt
        return denoise(im, *a)

    monkeypatch.setattr(backend, "_denoise", dies_third)
    kw = dict(per_image=1, seed=0, cache_root=tmp_path, batch_size=256, progress=False)
    with pytest.raises(KeyboardInterrupt):
        generate_cached(backend, images[:7], labels[:7], ids[:7], **kw)
    assert sizes == [3, 3, 1]
    monkeypatch.setattr(backend, "_denoise", denoise)
    _, report = generate_cached(backend, images[:7], labels[:7], ids[:7], **kw)
    assert (report["cached"], report["generated"]) == (6, 1)  # two batches were kept
    # without batch_size the cache calls the backend with its own batch (the preset's
    # cache batch is 4 in quick)
    monkeypatch.setitem(diffusion.PRESETS["quick"], "cpu_sample_batch", 5)
    wide, sizes[:] = LocalDiffusion(path, device="cpu"), []
    inner = wide._denoise
    monkeypatch.setattr(wide, "_denoise", lambda im, *a: sizes.append(len(im)) or inner(im, *a))
    generate_cached(wide, images[:7], labels[:7], ids[:7], per_image=1, seed=1,
                    cache_root=tmp_path, progress=False)
    assert sizes == [5, 2]


def test_class_dropout_trains_a_class_free_embedding(tmp_path, trained):
    images, labels, ids = tiny_images(8)
    cfg = diffusion.settings(diffusion.DEFAULTS, diffusion.PRESETS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init = diffusion.build_unet(cfg).class_embedding.weight.detach()
    learned = state_of(trained[0])["model"]["class_embedding.weight"]  # seed 0, defaults
    assert init.shape[0] == learned.shape[0] == len(CLASSES) + 1
    assert not torch.equal(learned[len(CLASSES)], init[len(CLASSES)])  # it was trained
    path = train_generator(images, labels, 0, tmp_path, ids=ids, progress=False,
                           class_dropout=0.0)
    assert state_of(path)["model"]["class_embedding.weight"].shape[0] == len(CLASSES)
    # The default weight (4) needs a class-free output: one clear error, naming the fix
    with pytest.raises(ValueError, match=r"without class_dropout.*guidance_scale=1"):
        LocalDiffusion(path)
    assert LocalDiffusion(path, guidance_scale=1).params()["guidance_rescale"] == 0.0
    with pytest.raises(ValueError, match="without class_dropout"):
        LocalDiffusion(path, guidance_scale=2.0)
    with pytest.raises(ValueError, match="guidance_scale=0.5"):
        LocalDiffusion(trained[0], guidance_scale=0.5)
    with pytest.raises(ValueError, match="guidance_scale=nan"):
        LocalDiffusion(trained[0], guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="class_dropout=1"):
        train_generator(images, labels, 0, tmp_path / "x", ids=ids, progress=False,
                        class_dropout=1.0)


def test_sampling_settings_come_from_the_settings_in_force(tmp_path):
    # A checkpoint stores the config it was trained under; strength and DDIM steps are
    # choices about sampling, so a generator trained under other ones samples as told now.
    images, labels, ids = tiny_images(8)
    path = train_generator(images, labels, 0, tmp_path, ids=ids, progress=False, strength=0.2,
                           ddim_steps=9)
    assert state_of(path)["config"]["strength"] == 0.2
    now = diffusion.settings(diffusion.DEFAULTS, diffusion.PRESETS)
    backend = LocalDiffusion(path)
    assert (backend.strength, backend.ddim_steps) == (now["strength"], now["ddim_steps"])
    assert LocalDiffusion(path, strength=0.3, ddim_steps=7).params()["ddim_steps"] == 7


def test_registered_as_local(trained):
    from mrilib.synthetic import get_backend

    assert isinstance(get_backend("local", checkpoint=trained[0]), LocalDiffusion)


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_bad_strength(trained, strength):
    with pytest.raises(ValueError, match="strength"):
        LocalDiffusion(trained[0], strength=strength)


def test_seed_count_must_match(backend, trained):
    _, images, labels, _ = trained
    with pytest.raises(ValueError, match="one per image"):
        backend.generate(images[:2], labels[:2], [1])


# ----------------------------------------------------------------------------- leakage

def test_assert_no_leakage(trained):
    path, _, _, ids = trained
    assert_no_leakage(path, ids)
    assert_no_leakage(path.parent, ids + ["extra"])
    with pytest.raises(LeakageError, match="1 of them outside"):
        assert_no_leakage(path, ids[1:])
    with pytest.raises(LeakageError, match="records no training ids"):
        assert_no_leakage({"step": 1}, ids)


@pytest.fixture
def mri(tmp_path, monkeypatch):
    """A tiny dataset and split, with generators and synthetic images cached in tmp_path."""
    monkeypatch.setattr(diffusion, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(cache_mod, "CACHE", tmp_path / "cache")
    images, labels, ids = tiny_images(40, seed=5)
    data = MRIData(images, labels, CLASSES, ids, "tiny", "fp")
    return data, split_mri(data)


def test_generators_learn_from_their_sample_only(mri):
    data, split = mri
    held_out = {data.ids[i] for i in torch.cat([split.val, split.test]).tolist()}
    pool = {data.ids[i] for i in split.train.tolist()}
    path = train_for_sample(data, split, 0.5, 1, progress=False)
    seen = set(state_of(path)["train_ids"])
    sample = {data.ids[i] for i in real_sample(data, split, 0.5, 1).tolist()}
    assert seen == sample and not seen & held_out and seen < pool
    leaky = train_for_sample(data, split, 0.5, 0, leaky=True, progress=False)
    record = state_of(leaky)
    assert set(record["train_ids"]) == pool and record["leaky"]
    assert leaky.parent.name.startswith("leaky-pool")

    # a repeat given generator 1 draws sample 1, and its mixed set passes the check
    backend = LocalDiffusion(generator_path(data, split, 0.5, 1), sample_seed=1)
    _, _, _, info = mixed_training_set(data, split, 0.5, 0.1, seed=3, backend=backend,
                                       progress=False)
    assert info["sample_seed"] == 1 and info["leaky"] is False
    assert info["generator_checkpoint"] == str(path.parent / "generator.pt")
    # a generator of another sample is leakage for this one
    with pytest.raises(LeakageError):
        mixed_training_set(data, split, 0.5, 0.1, seed=0, backend=backend, sample_seed=0,
                           progress=False)
    with pytest.raises(FileNotFoundError, match="synth train"):
        generator_path(data, split, 0.5, 0)
    with pytest.raises(ValueError, match="numbered from 0"):
        generator_path(data, split, 0.5, -1)


def test_a_cell_missing_one_generator_stops_before_sampling_any(mri, monkeypatch):
    # Repeats 0 and 1 use generators 0 and 1; only 0 is trained. The cell must stop at
    # once, naming generator 1, rather than sample repeat 0's variations first.
    import mrilib.grid as ex

    data, split = mri
    cfg = ex.grid_settings("quick", generator_fraction=0.5)
    cell = ex.make_cell("basic_cnn", synthetic="fill", real_fraction=0.5)
    train_for_sample(data, split, 0.5, 0, progress=False)
    sampled, generate = [], LocalDiffusion.generate
    monkeypatch.setattr(LocalDiffusion, "generate",
                        lambda self, *a, **k: sampled.append(1) or pytest.fail("sampled"))
    seeds = [ex.repeat_seeds(r, cfg) for r in (0, 1)]
    with pytest.raises(FileNotFoundError, match="no generator 1 for real fraction 0.5"):
        ex.training_sets(data, split, cell, seeds, cfg)
    assert not sampled
    train_for_sample(data, split, 0.5, 1, progress=False)
    monkeypatch.setattr(LocalDiffusion, "generate", generate)
    sets = ex.training_sets(data, split, cell, seeds, cfg)
    assert [i["n_synthetic"] > 0 for i in sets.info] == [True, True]


def test_fresh_samples_of_dark_slices_are_dark():
    # Slices are mostly black. On DDPM's linear schedule x_T keeps 0.6% of the image, a
    # model learns to read the mean brightness from it, and from pure noise (mean 0) it
    # paints mid-grey: what the first full generator did. The zero-terminal-SNR schedule
    # with v-prediction (the default) has no such residue.
    images, labels, ids = tiny_images(64)
    target = images.float().mean()  # ~21 of 255: blobs on black

    def fresh_mean(tmp, **schedule):
        path = train_generator(images, labels, seed=0, out_dir=tmp, ids=ids, progress=False,
                               steps=100, **schedule)
        fresh = LocalDiffusion(path, strength=1.0, ddim_steps=20)
        return fresh.generate(images[:32], labels[:32], list(range(32))).float().mean()

    import tempfile
    with tempfile.TemporaryDirectory() as new, tempfile.TemporaryDirectory() as old:
        assert abs(fresh_mean(new) - target) < 20
        assert fresh_mean(old, prediction_type="epsilon", rescale_betas_zero_snr=False) > 80


def test_schedules_of_old_checkpoints_and_bad_combinations():
    old = {k: v for k, v in diffusion.DEFAULTS.items()
           if k not in ("prediction_type", "rescale_betas_zero_snr")}
    sched = diffusion.sample_scheduler(old)
    assert sched.config.prediction_type == "epsilon" and not sched.config.rescale_betas_zero_snr
    new = diffusion.train_scheduler(diffusion.DEFAULTS)
    assert new.config.prediction_type == "v_prediction" and new.alphas_cumprod[-1] < 1e-6
    with pytest.raises(ValueError, match="v_prediction"):
        diffusion.train_scheduler({**diffusion.DEFAULTS, "prediction_type": "epsilon"})


class _Brightness(torch.nn.Module):
    """Labels a tiny_images blob by its peak brightness (class c peaks near 60 + 50 c)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        from mrilib.models import MRI_MEAN, MRI_STD

        peak = ((x * MRI_STD + MRI_MEAN) * 255).amax(dim=(1, 2, 3))
        centres = 60 + 50 * torch.arange(len(CLASSES), dtype=peak.dtype)
        return -(peak[:, None] - centres).abs() + self.dummy


def test_strength_sweep_trades_fidelity_for_distance_and_resumes(mri, monkeypatch):
    from mrilib.synthetic.quality import strength_sweep

    data, split = mri
    train_for_sample(data, split, 0.5, 0, progress=False)
    kw = dict(max_sources=8, classifier=_Brightness(), progress=False)
    result = strength_sweep(data, split, 0.5, 0, [0.2, 1.0], **kw)
    assert result["n_sources"] == 8 and set(result["sources_per_class"].values()) == {2}
    low, high = result["strengths"]
    assert (low["strength"], high["strength"]) == (0.2, 1.0)
    assert low["guidance_scale"] == high["guidance_scale"] == 4.0  # the preset's weight
    assert low["generated"] == high["generated"] == 8 and low["cached"] == 0
    # a little noise keeps a variation near its source; strength 1 draws a new image
    assert 0 < low["rms_to_source"] < high["rms_to_source"]
    assert low["balanced_fidelity"] == pytest.approx(
        sum(low["fidelity"].values()) / len(CLASSES))
    assert result["classifier_real_test_balanced"] > result["chance"]
    again = strength_sweep(data, split, 0.5, 0, [0.2, 1.0], **kw)
    assert [r["cached"] for r in again["strengths"]] == [8, 8]
    assert [r["generated"] for r in again["strengths"]] == [0, 0]
    assert again["strengths"][0]["fidelity"] == low["fidelity"]
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        strength_sweep(data, split, 0.5, 0, [0.0, 0.5], **kw)
    with pytest.raises(ValueError, match="numbered from 0"):
        strength_sweep(data, split, 0.5, -1, [0.5], **kw)
    with pytest.raises(FileNotFoundError, match="no generator 7"):
        strength_sweep(data, split, 0.5, 7, [0.5], **kw)
    with pytest.raises(ValueError, match="one source per class"):
        strength_sweep(data, split, 0.5, 0, [0.5], **{**kw, "max_sources": 2})
    with pytest.raises(ValueError, match="weights >= 1"):
        strength_sweep(data, split, 0.5, 0, [0.5], **{**kw, "guidance_scales": [0.5]})
    # a generator without a class-free output is refused before any w = 1 sampling
    train_for_sample(data, split, 0.5, 1, progress=False, class_dropout=0.0)
    with monkeypatch.context() as m:
        m.setitem(diffusion.DEFAULTS, "class_dropout", 0.0)  # so that the sweep finds it
        m.setattr(LocalDiffusion, "generate", lambda *a: pytest.fail("sampled first"))
        with pytest.raises(ValueError, match="without class_dropout"):
            strength_sweep(data, split, 0.5, 1, [0.5], **{**kw, "guidance_scales": [1, 2]})
    # guidance weights: a row per (weight, strength), the default weight's from the cache
    both = strength_sweep(data, split, 0.5, 0, [0.2, 1.0], guidance_scales=[1, 4], **kw)
    assert [(r["guidance_scale"], r["strength"]) for r in both["strengths"]] == [
        (1.0, 0.2), (1.0, 1.0), (4.0, 0.2), (4.0, 1.0)]
    assert [r["cached"] for r in both["strengths"]] == [0, 0, 8, 8]
    assert both["strengths"][2]["cache_dir"] != both["strengths"][0]["cache_dir"]


def test_saved_sweeps_are_those_of_the_generator_found_here(mri, tmp_path):
    from mrilib.synthetic.quality import saved_sweeps

    data, split = mri
    folder = tmp_path / "results"
    folder.mkdir()
    assert saved_sweeps(data, split, 0.5, 0, folder) == []  # no generator trained here
    path = train_for_sample(data, split, 0.5, 0, progress=False)
    gen = path.parent / "generator.pt"
    other = path.parent.parent / "x0.5-s0-0ldrecipe000" / "generator.pt"
    for name, generator in (("strength_sweep_x0.5_g0.json", gen),
                            ("strength_sweep_x0.5_g0_guidance.json", gen),
                            ("strength_sweep_x0.5_g0_old.json", other),
                            ("strength_sweep_x0.5_g1.json", gen)):
        (folder / name).write_text(json.dumps({"generator": f"/elsewhere/{generator.parent.name}"
                                                            f"/generator.pt", "strengths": []}))
    found = saved_sweeps(data, split, 0.5, 0, folder)
    assert [Path(s["file"]).name for s in found] == ["strength_sweep_x0.5_g0.json",
                                                     "strength_sweep_x0.5_g0_guidance.json"]


def test_a_generator_counts_as_trained_for_the_steps_in_force_only(mri, monkeypatch):
    data, split = mri
    train_for_sample(data, split, 0.5, 0, progress=False)
    steps = diffusion.settings(diffusion.DEFAULTS, diffusion.PRESETS)["steps"]
    assert generator_path(data, split, 0.5, 0).exists()
    # more steps in force: the same folder (steps is not in its key), to be extended
    monkeypatch.setitem(diffusion.PRESETS["quick"], "steps", steps + 2)
    with pytest.raises(FileNotFoundError, match=f"trained for {steps} steps .* ask for {steps + 2}"):
        generator_path(data, split, 0.5, 0)
    assert generator_path(data, split, 0.5, 0, allow_unfinished=True).exists()
    path = train_for_sample(data, split, 0.5, 0, progress=False)  # resumes and extends it
    assert state_of(path)["step"] == steps + 2 and generator_path(data, split, 0.5, 0)
    monkeypatch.setitem(diffusion.PRESETS["quick"], "steps", steps)  # fewer in force now
    with pytest.raises(ValueError, match=f"more than the {steps} in force"):
        generator_path(data, split, 0.5, 0)


def test_generator_dir_key(mri):
    _, labels, ids = tiny_images(8)
    base = generator_dir(ids, labels, 0.3, 0)
    assert base == generator_dir(ids, labels, 0.3, 0)
    assert len({base, generator_dir(ids, labels, 0.3, 1), generator_dir(ids, labels, 0.4, 0),
                generator_dir(ids[:-1] + ["other"], labels, 0.3, 0),
                generator_dir(ids, labels, 0.3, 0, lr=2e-4)}) == 5
    # bookkeeping settings do not make a new generator
    assert base == generator_dir(ids, labels, 0.3, 0, checkpoint_minutes=9, strength=0.2)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture
def run_cli(monkeypatch, capsys):

    def run(*argv):
        code = cli.main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


@pytest.fixture
def folder(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(diffusion, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(cache_mod, "CACHE", tmp_path / "cache")
    return str(image_folder(per_class={c: 6 for c in CLASSES}))


def test_cli_train_then_generate(folder, run_cli):
    code, out, _ = run_cli("synth", "train",
                           "--split", "slice", "--real-frac", "0.5", "--seed", "1",
                           "--source", folder, "--json")
    assert code == 0
    trained_info = json.loads(out)
    assert trained_info["all_done"] and trained_info["generators"][0]["generator"] == 1

    args = ("synth", "generate", "--backend", "local",
            "--split", "slice", "--real-frac", "0.5", "--per-image", "2",
            "--generator", "1", "--seed", "3", "--limit-sources", "3", "--source", folder,
            "--json")
    code, out, _ = run_cli(*args)
    assert code == 0
    first = json.loads(out)
    assert first["generated"] == 6 and first["cached"] == 0 and first["refused"] == 0
    assert first["sample_seed"] == 1  # generator 1's own sample
    assert {"seconds", "dir", "params"} <= set(first)
    second = json.loads(run_cli(*args)[1])
    assert second["generated"] == 0 and second["cached"] == 6


def test_a_kept_generator_is_found_without_the_cache_and_never_retrained(
        folder, run_cli, tmp_path, monkeypatch):
    """`synth keep` copies generator g into generators/ (git); a fresh checkout uses that copy."""
    from mrilib.data import load_mri

    monkeypatch.setattr(diffusion, "KEPT_GENERATORS", tmp_path / "kept")
    base = ("--split", "slice", "--real-frac", "0.5", "--seed", "1", "--source", folder)
    code, _, err = run_cli("synth", "keep", *base)
    assert code == 2 and "synth train --split slice --real-frac 0.5 --seed 1" in err
    assert run_cli("synth", "train", *base, "--json")[0] == 0
    code, out, _ = run_cli("synth", "keep", *base, "--json")
    kept = Path(json.loads(out)["kept"])
    assert code == 0 and kept.parent.parent == tmp_path / "kept"
    cached = tmp_path / "cache" / "generators" / kept.parent.name
    assert kept.read_bytes() == (cached / "generator.pt").read_bytes()
    shutil.rmtree(tmp_path / "cache" / "generators")  # a fresh checkout: the cache is empty
    data = load_mri(folder)
    split = split_mri(data, "slice")
    assert generator_path(data, split, 0.5, 1) == kept
    monkeypatch.setattr(diffusion, "train_generator",
                        lambda *a, **k: pytest.fail("a kept generator was retrained"))
    assert train_for_sample(data, split, 0.5, 1, progress=False) == kept
    with pytest.raises(FileNotFoundError):  # generator 0 was never kept
        generator_path(data, split, 0.5, 0)


def test_cli_sweep(folder, run_cli, tmp_path, monkeypatch):
    import mrilib.paths as paths

    monkeypatch.setattr(paths, "CACHE", tmp_path / "cache")  # the real-only classifier
    assert run_cli("synth", "train",
                   "--split", "slice", "--real-frac", "0.5", "--seed", "0", "--source", folder,
                   "--json")[0] == 0
    out_file = tmp_path / "sweep.json"
    code, out, _ = run_cli("synth", "sweep",
                           "--split", "slice", "--real-frac", "0.5", "--strengths", "0.3,0.9",
                           "--guidance", "1,2", "--max-sources", "4", "--source", folder,
                           "--out", str(out_file))
    assert code == 0 and "balanced" in out and "0.30" in out and "0.90" in out
    saved = json.loads(out_file.read_text())
    assert [(r["guidance_scale"], r["strength"]) for r in saved["strengths"]] == [
        (1.0, 0.3), (1.0, 0.9), (2.0, 0.3), (2.0, 0.9)]
    assert saved["n_sources"] == 4 and saved["provenance"]["device_name"]
    code, _, err = run_cli("synth", "sweep",
                           "--split", "slice", "--real-frac", "0.5", "--strengths", "0.3,x",
                           "--source", folder)
    assert code == 2 and "--strengths" in err
    code, _, err = run_cli("synth", "sweep",
                           "--split", "slice", "--real-frac", "0.5", "--guidance", "two",
                           "--source", folder)
    assert code == 2 and "--guidance" in err


def test_cli_errors_are_clear(folder, run_cli):
    code, _, err = run_cli("synth", "generate", "--backend", "local",
                           "--split", "slice", "--real-frac", "0.5",
                           "--per-image", "1", "--source", folder)
    assert code == 2 and "synth train --split slice --real-frac 0.5 --seed 0" in err
    code, _, err = run_cli("synth", "generate", "--backend", "local",
                           "--split", "slice", "--real-frac", "0.5",
                           "--per-image", "1", "--max-cost", "3", "--source", folder)
    assert code == 2 and "--max-cost" in err and "openai only" in err
    code, _, err = run_cli("synth", "train",
                           "--split", "slice", "--real-frac", "0.5", "--seed", "-1",
                           "--source", folder)
    assert code == 2 and "--seed -1" in err
    code, _, err = run_cli("synth", "generate", "--backend", "openai",
                           "--split", "slice", "--real-frac", "0.5",
                           "--per-image", "1", "--generator", "1", "--source", folder)
    assert code == 2 and "--generator" in err and "local only" in err
    code, _, err = run_cli("synth", "train",
                           "--split", "slice", "--real-frac", "0.5", "--seed", "0",
                           "--device", "gpu", "--source", folder)
    assert code == 2 and "not a device torch knows" in err and "Traceback" not in err


def test_cli_generate_openai(folder, run_cli, monkeypatch):
    from fake_openai import FakeOpenAI

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    with FakeOpenAI() as server:
        code, out, err = run_cli("synth", "generate", "--backend", "openai",
                                 "--split", "slice", "--real-frac", "0.5",
                                 "--per-image", "1", "--limit-sources", "4", "--max-images", "2",
                                 "--base-url", server.base_url, "--source", folder, "--json")
    assert code == 3  # the budget left images to make: a script must not read it as done
    report = json.loads(out)
    assert report["generated"] == 2 and report["missing"] == 2 and report["stopped"]
    assert report["not_made"] == 2 and "2 of 4 images not made" in err
    assert "sk-test" not in out + err


@pytest.mark.parametrize("speed", [{}, {"channels_last": True, "cudnn_benchmark": True}])
def test_benchmark_reports_speeds(speed):
    result = diffusion_bench.benchmark("cpu", n_train_steps=2, n_variations=4,
                                       guidance_scales=[1.0, 2.0], **speed)
    assert result["device"] == device_name("cpu")
    assert result["train_images_per_s"] > 0 and result["variations_per_s"] > 0
    assert [s["guidance_scale"] for s in result["sampling"]] == [1.0, 2.0]
    assert result["variations_per_s"] == result["sampling"][0]["variations_per_s"]
    assert {k: v for k, v in result["speed_settings"].items()
            if k in ("channels_last", "cudnn_benchmark")} == {"channels_last": bool(speed),
                                                              "cudnn_benchmark": bool(speed)}
    assert not torch.backends.cudnn.benchmark  # restored after training


# ----------------------------------------------------------------------------- speed levers

@pytest.mark.parametrize("name, expected, changes", [
    ("default", {}, False),
    ("compile", {"compile_train": True, "compile_sample": True}, False),
    ("channels_last+autotune", {"channels_last": True, "cudnn_benchmark": True}, False),
    ("samplebatch4x", {"sample_batch": 64}, False),
    ("batch4x", {"batch_size": 32, "steps": 2, "warmup_steps": 0, "lr": 2e-3}, True),
    ("compile+batch2x", {"compile_train": True, "compile_sample": True, "batch_size": 16,
                         "steps": 3, "warmup_steps": 1, "lr": 1e-3 * 2 ** 0.5}, True),
])
def test_a_lever_names_its_settings_and_whether_they_change_results(name, expected, changes):
    cfg = diffusion.settings(diffusion.DEFAULTS, diffusion.PRESETS)  # quick: batch 8, 6 steps
    overrides = diffusion_bench.lever_overrides(name, cfg)
    assert overrides.keys() == expected.keys()
    for key, value in expected.items():
        assert overrides[key] == pytest.approx(value), key
    assert diffusion_bench.changes_results(overrides) == changes


@pytest.mark.parametrize("name", ["fast", "batch", "batch0x", "compile2x", "batch4x+", "Batch4x"])
def test_an_unknown_lever_is_refused_by_name(name):
    with pytest.raises(ValueError, match="batchKx"):
        diffusion_bench.lever_overrides(name)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_a_larger_batch_sees_as_many_images_at_a_square_root_learning_rate(k):
    cfg = diffusion.settings(diffusion.DEFAULTS, diffusion.PRESETS, preset="thesis")
    bigger = diffusion_bench.larger_batch(cfg, k)
    assert bigger["batch_size"] * bigger["steps"] == cfg["batch_size"] * cfg["steps"]
    assert bigger["warmup_steps"] * k == cfg["warmup_steps"]
    assert bigger["lr"] == pytest.approx(cfg["lr"] * k ** 0.5)


def test_cli_bench_levers_writes_a_row_per_lever(run_cli, tmp_path):
    out_file = tmp_path / "levers.json"
    code, out, _ = run_cli("synth", "bench", "--device", "cpu", "--train-steps", "1",
                           "--variations", "2", "--guidance", "1,2",
                           "--levers", "samplebatch2x,batch2x", "--out", str(out_file))
    assert code == 0 and "batch2x" in out  # the table
    saved = json.loads(out_file.read_text())
    rows = {row["lever"]: row for row in saved["rows"]}
    assert list(rows) == ["default", "samplebatch2x", "batch2x"]
    assert [rows[n]["changes_results"] for n in rows] == [False, False, True]
    assert rows["default"]["design"] == rows["samplebatch2x"]["design"] != rows["batch2x"]["design"]
    assert rows["samplebatch2x"]["speed_settings"]["sample_batch"] == 32
    for row in rows.values():
        assert [s["guidance_scale"] for s in row["sampling"]] == [1.0, 2.0]
        assert set(row["sampling_speedup"]) == {"1", "2"} and row["train_speedup"] > 0
    assert rows["default"]["train_speedup"] == 1.0
    code, _, err = run_cli("synth", "bench", "--levers", "compile,turbo")
    assert code == 2 and "'turbo'" in err


@pytest.fixture(scope="module")
def inductor():
    """Skip, visibly, where torch.compile's default backend cannot build kernels here."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2))
    except Exception as err:  # BackendCompilerFailed wraps the missing compiler's error
        first = (str(err).splitlines() or [""])[0]
        pytest.skip(f"torch.compile cannot build kernels on this platform ({type(err).__name__}:"
                    f" {first})")


# One level, no attention: the compile of a UNet costs minutes on a CPU, of this ~half one.
ONE_LEVEL = {"block_out_channels": (8,), "down_block_types": ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",), "norm_num_groups": 4}


@pytest.mark.slow
def test_a_compiled_unet_trains_resumes_and_samples_as_the_eager_one(tmp_path, inductor):
    images, labels, ids = tiny_images(12, seed=1)
    kw = {"ids": ids, "progress": False, **ONE_LEVEL}
    eager = state_of(train_generator(images, labels, 3, tmp_path / "a", steps=4, **kw))
    whole = train_generator(images, labels, 3, tmp_path / "b", steps=4, compile_train=True, **kw)
    train_generator(images, labels, 3, tmp_path / "c", steps=2, compile_train=True, **kw)
    resumed = train_generator(images, labels, 3, tmp_path / "c", steps=4, compile_train=True,
                              **kw)
    a, b = state_of(whole), state_of(resumed)
    assert a["identity"] == eager["identity"]  # a speed setting: the same generator
    assert a["loss_history"] == b["loss_history"]  # same seeds, same run, resumed or not
    lr = diffusion.settings(diffusion.DEFAULTS, diffusion.PRESETS)["lr"]
    for name, w in eager["model"].items():
        assert torch.equal(a["model"][name], b["model"][name]), name
        # fused kernels round differently: Adam's bound, as for channels_last
        torch.testing.assert_close(a["model"][name], w, rtol=0, atol=2 * lr * 4)
    src, lab, seeds = images[:4], labels[:4], [1, 2, 3, 4]
    plain = LocalDiffusion(whole, guidance_scale=2.0).generate(src, lab, seeds)
    fused = LocalDiffusion(whole, guidance_scale=2.0, compile_sample=True)
    out = fused.generate(src, lab, seeds)
    assert torch.equal(out, fused.generate(src, lab, seeds))
    diff = (out.int() - plain.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_and_samples_on_cuda(tmp_path):
    images, labels, ids = tiny_images(16)
    path = train_generator(images, labels, 0, tmp_path, ids=ids, device="cuda", progress=False)
    backend = LocalDiffusion(path, device="cuda")
    out = backend.generate(images[:4], labels[:4], [1, 2, 3, 4])
    assert out.shape == (4, 1, 128, 128) and out.dtype == torch.uint8
    assert torch.equal(out, backend.generate(images[:4], labels[:4], [1, 2, 3, 4]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("lever", ["compile", "channels_last", "compile+channels_last"])
def test_a_speed_lever_on_cuda_gives_the_same_runs(tmp_path, lever):
    images, labels, ids = tiny_images(16)
    kw = {"ids": ids, "device": "cuda", "progress": False, "steps": 4}
    on = diffusion_bench.lever_overrides(lever)
    plain = state_of(train_generator(images, labels, 0, tmp_path / "plain", **kw))
    runs = [train_generator(images, labels, 0, tmp_path / f"on{i}", **kw, **on) for i in (0, 1)]
    lr = diffusion.settings(diffusion.DEFAULTS, diffusion.PRESETS)["lr"]
    for name, w in plain["model"].items():  # Adam's rounding bound, as on the CPU
        for run in runs:
            torch.testing.assert_close(state_of(run)["model"][name], w, rtol=0, atol=2 * lr * 4)
    first, second = (np.array(state_of(run)["loss_history"])[:, 1] for run in runs)
    np.testing.assert_allclose(first, second, rtol=1e-3)  # same seeds: the same run
    sampler = LocalDiffusion(runs[0], device="cuda", compile_sample=on.get("compile_sample"))
    out = sampler.generate(images[:4], labels[:4], [1, 2, 3, 4])
    assert torch.equal(out, sampler.generate(images[:4], labels[:4], [1, 2, 3, 4]))
    eager = LocalDiffusion(runs[0], device="cuda").generate(images[:4], labels[:4], [1, 2, 3, 4])
    assert (out.int() - eager.int()).abs().float().mean() < 0.5  # bf16 rounding, not a change
