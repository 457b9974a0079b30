"""The local generator: a class-conditional DDPM trained here, variations made SDEdit-style.

The public home of the local generator's names. Its recipe (settings, what changes a
result, the UNet and schedulers) is in :mod:`.diffusion_model`, its training loop and
files in :mod:`.diffusion_training`; this module finds generators on disk, checks them
for leakage, and samples them (:class:`LocalDiffusion`).

A *variation* of a source slice is the source noised to a chosen ``strength`` (0 = the
source itself, 1 = pure noise, i.e. a fresh sample of the class) and then denoised by
DDIM conditioned on the source's class (Meng et al. 2022, "SDEdit").

No leakage. A generator that augments a classifier may learn only from real images that
classifier is allowed to see: the X% stratified sample of its repeat, never validation or
test images and never other images of the training pool. Each checkpoint records the ids
of the images it learned from, :func:`assert_no_leakage` checks them against an allowed
set, and :func:`mrilib.synthetic.mixing.mixed_training_set` calls it.

Generator g. Training one generator per repeat would cost hours of GPU time, so
generators are trained per real sample: generator g of real fraction X learns from the
stratified sample of X drawn with ``sample_seed = g`` (training seed g as well). Which
samples there are and which repeat uses which is the grid's to decide
(:mod:`mrilib.grid`); here generator g is trained by :func:`train_for_sample` and
found by :func:`generator_path`.

Ablation ("leaky"): ``leaky=True`` trains one generator per seed on the whole training
pool, whatever X is. A classifier augmented by it sees, through the synthetic images,
real images outside its own sample; comparing it with the default shows how much of a
gain is leakage. Such a generator is refused by the mixing policy unless the caller
passes ``allow_leaky=True``, and its ``params()`` say ``leaky``.

Generators live under ``cache/generators/<key>/`` (:func:`generator_dir`), the key
covering the training images (their ids and labels), X, the seed, the settings its
weights depend on (:func:`weights_settings`) and the diffusers version. Training stops
after ``minutes`` and resumes from the last checkpoint, so it fits time-limited jobs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Sequence

import diffusers
import torch

from ..config import settings
from ..data import CLASSES, content_fingerprint
from ..device import autocast, resolve_device
from ..locks import folder_lock
from ..paths import CACHE, KEPT_GENERATORS, atomic_write_bytes
from .base import Backend, check_batch
from .diffusion_model import (DEFAULTS, PRESETS, RUN_ONLY, SAMPLING, build_unet,  # noqa: F401
                              compiled, design_settings, guided, null_class, sample_scheduler,
                              to_model_scale, to_uint8_128, train_scheduler, weights_settings)
from .diffusion_training import (generator_file, read_checkpoint, train_generator,
                                 training_record)
from .mixing import real_sample


class LeakageError(ValueError):
    """A generator learned from real images the classifier it would augment may not see."""


# ----------------------------------------------------------------------------- leakage

def assert_no_leakage(checkpoint: str | Path | Mapping, allowed_ids: Sequence[str]) -> None:
    """Raise :class:`LeakageError` if the generator learned from any image not in ``allowed_ids``.

    ``checkpoint`` is a checkpoint/generator file, its folder, or a loaded record.
    """
    record = training_record(checkpoint)
    if "train_ids" not in record:
        raise LeakageError("this checkpoint records no training ids, so it cannot be shown "
                           "free of leakage; retrain it with mrilib's train_generator")
    outside = sorted(set(record["train_ids"]) - set(allowed_ids))
    if outside:
        kind = "a leaky (whole-pool) ablation generator" if record.get("leaky") else "a generator"
        raise LeakageError(
            f"{kind} trained on {record['n_images']} images, {len(outside)} of them outside the "
            f"{len(set(allowed_ids))} real images this classifier may see (e.g. "
            f"{', '.join(outside[:3])}). Use the generator trained on this repeat's own sample "
            f"g (generator_path / `python -m mrilib synth train --split S --real-frac X --seed g`)"
            + ("; for the leakage ablation pass allow_leaky=True" if record.get("leaky") else ""))


# ----------------------------------------------------------------------------- generators on disk

def generator_dir(train_ids: Sequence[str], labels: torch.Tensor, real_fraction: float | None,
                  seed: int, leaky: bool = False, **overrides) -> Path:
    """``cache/generators/<key>/`` for a generator of these images, X, seed and settings."""
    cfg = settings(DEFAULTS, PRESETS, **overrides)
    blob = json.dumps({"data": content_fingerprint(list(train_ids), labels.tolist(), CLASSES),
                       "real_fraction": None if leaky else real_fraction, "seed": int(seed),
                       "leaky": leaky, "settings": weights_settings(cfg),
                       "diffusers": diffusers.__version__}, sort_keys=True)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:12]
    label = f"leaky-pool-s{seed}" if leaky else f"x{real_fraction:g}-s{seed}"
    return CACHE / "generators" / f"{label}-{digest}"


def generator_training_set(data, split, real_fraction: float, g: int,
                           leaky: bool = False) -> torch.Tensor:
    """Indices into ``data`` generator g learns from: sample g of X, or the whole pool."""
    if g < 0:
        raise ValueError(f"g={g}: generators (and their samples) are numbered from 0")
    return split.train.clone() if leaky else real_sample(data, split, real_fraction, g)


def train_for_sample(data, split, real_fraction: float, g: int, leaky: bool = False,
                     minutes: float | None = None, steps: int | None = None,
                     device: str | torch.device | None = None, progress: bool = True,
                     **overrides) -> Path:
    """Train or resume generator g of real fraction X under cache/generators/."""
    index = generator_training_set(data, split, real_fraction, g, leaky)
    ids = [data.ids[i] for i in index.tolist()]
    out = generator_dir(ids, data.labels[index], real_fraction, g, leaky, **overrides)
    kept = _kept(out)
    if kept is not None and not (out / "checkpoint.pt").exists():
        return generator_path(data, split, real_fraction, g, leaky, **overrides)
    busy = (f"generator {g} at {out} is being trained by another process (pid {{pid}}); "
            f"wait for it to finish (its grid then finds it), or stop that process")
    with folder_lock(out, busy):  # two jobs never train one generator
        return train_generator(data.images[index], data.labels[index], g, out,
                               minutes=minutes, steps=steps, ids=ids, leaky=leaky,
                               device=device, progress=progress, **overrides)


def generator_path(data, split, real_fraction: float, g: int, leaky: bool = False,
                   allow_unfinished: bool = False, **overrides) -> Path:
    """The generator.pt of generator g of X, finished, or FileNotFoundError saying how to train it.

    Finished means trained for the ``steps`` in force: the folder key leaves ``steps`` out
    (a longer run extends the same generator), but results name the steps in force
    (:func:`design_settings`), so a shorter generator must be extended first
    (FileNotFoundError) and a longer one is refused (ValueError) rather than mislabelled.
    """
    index = generator_training_set(data, split, real_fraction, g, leaky)
    ids = [data.ids[i] for i in index.tolist()]
    path = generator_dir(ids, data.labels[index], real_fraction, g, leaky,
                         **overrides) / "generator.pt"
    path = path if path.exists() else (_kept(path.parent) or path)
    command = _train_command(real_fraction, g, leaky, split.kind)
    if not path.exists():
        raise FileNotFoundError(f"no generator {g} for real fraction {real_fraction:g} "
                                f"{'(leaky) ' if leaky else ''}at {path.parent}; {command}")
    # generator.pt alone decides (not meta.json), so that it is the one file to ship.
    record = training_record(path)
    if allow_unfinished:
        return path
    if not record["done"]:
        raise FileNotFoundError(f"generator at {path.parent} has trained {record['step']} of "
                                f"{record['target_steps']} steps; to finish it, {command}")
    steps = settings(DEFAULTS, PRESETS, **overrides)["steps"]
    if record["target_steps"] < steps:
        raise FileNotFoundError(f"generator at {path.parent} was trained for "
                                f"{record['target_steps']} steps and the settings in force ask "
                                f"for {steps}; to extend it, {command}")
    if record["target_steps"] > steps:
        raise ValueError(f"generator at {path.parent} was trained for {record['target_steps']} "
                         f"steps, more than the {steps} in force, which results would name; "
                         f"to use it, run the preset it was trained under (MRILIB_PRESET), or "
                         f"in Python set steps={record['target_steps']} (diffusion DEFAULTS "
                         f"or the preset)")
    return path


def _kept(folder: Path) -> Path | None:
    """The copy of ``folder``'s generator.pt kept in git (same key, so the same generator), if any."""
    path = KEPT_GENERATORS / folder.name / "generator.pt"
    return path if path.exists() else None


def keep_generator(data, split, real_fraction: float, g: int, leaky: bool = False) -> Path:
    """Copy finished generator g of X into the kept generators (``generators/``, tracked in git)."""
    path = generator_path(data, split, real_fraction, g, leaky)
    out = KEPT_GENERATORS / path.parent.name / "generator.pt"
    if path != out:
        atomic_write_bytes(out, path.read_bytes())
    return out


def _train_command(real_fraction: float, g: int, leaky: bool, split: str = "subject") -> str:
    """How to train generator g of X on ``split``, for a GPU and for a look on a CPU."""
    command = (f"python -m mrilib synth train --split {split} --real-frac {real_fraction:g} "
               f"--seed {g}" + (" --leaky" if leaky else ""))
    return (f"train it on a GPU with `{command} --device cuda` (rerun until it says done), "
            f"or, for a look on a CPU, train the quick preset's tiny generator with "
            f"`MRILIB_PRESET=quick {command}`")


# ----------------------------------------------------------------------------- the backend

class LocalDiffusion(Backend):
    """Variations from a trained generator checkpoint, SDEdit-style (see the module doc).

    Each output depends on (image, label, seed) only: its noise comes from a CPU
    torch RNG seeded by its own seed, and DDIM with eta = 0 adds no other
    randomness. Across batch compositions the UNet's arithmetic may round differently
    (GEMM blocking depends on the batch size), so outputs agree to within one gray level
    in rare pixels rather than bit for bit; on one batch layout they are bitwise equal.
    With a model smaller than 128 px (the quick preset) sources are area-downscaled to
    its size and outputs bilinearly upscaled back to 128x128.

    ``strength``, ``ddim_steps``, ``guidance_scale``, ``guidance_rescale``,
    ``compile_sample`` and ``sample_batch`` (``cpu_sample_batch`` on a CPU) default to the
    settings in force
    (DEFAULTS and the preset), not to
    the checkpoint's copy: they are choices about sampling, which the same weights serve
    under any of them.
    ``guidance_scale`` > 1 needs a generator trained with ``class_dropout`` > 0.
    """

    name = "local"

    def __init__(self, checkpoint: str | Path, strength: float | None = None,
                 ddim_steps: int | None = None, device: str | torch.device | None = None,
                 sample_batch: int | None = None, allow_unfinished: bool = False,
                 sample_seed: int | None = None, guidance_scale: float | None = None,
                 guidance_rescale: float | None = None, compile_sample: bool | None = None):
        path = generator_file(Path(checkpoint))
        blob = read_checkpoint(path)
        if not (blob["done"] or allow_unfinished):
            raise ValueError(f"the generator at {path.parent} has trained {blob['step']} of "
                             f"{blob['target_steps']} steps; finish it (rerun synth train) "
                             f"or, for a look at a partial model, pass --allow-unfinished on "
                             f"the command line, allow_unfinished=True in Python")
        self.cfg = blob["config"]
        self.null_class = null_class(self.cfg)
        now = settings(DEFAULTS, PRESETS)
        self.strength, self.ddim_steps, self.guidance_scale, self.guidance_rescale = \
            _sampling_settings(now, path, self.null_class, strength, ddim_steps,
                               guidance_scale, guidance_rescale)
        self.device = resolve_device(device)
        self.max_batch = int(sample_batch or now["cpu_sample_batch" if self.device.type == "cpu"
                                                 else "sample_batch"])
        self.path = path
        # Sample g of generator g (mixing draws the same one); None for a generator used
        # outside the grid's samples.
        self.sample_seed = sample_seed
        self.training_record = training_record(blob)
        self.unet = build_unet(self.cfg)
        self.unet.load_state_dict(blob["model"])
        self.unet.to(self.device).eval().requires_grad_(False)
        self.compile_sample = bool(now["compile_sample"] if compile_sample is None
                                   else compile_sample)
        self.weights_sha1 = _weights_hash(blob["model"])
        self.scheduler = sample_scheduler(self.cfg)

    def params(self) -> dict:
        rec = self.training_record
        return {"backend": self.name, "weights": self.weights_sha1, "step": rec["step"],
                "train_fingerprint": rec["train_fingerprint"], "n_train_images": rec["n_images"],
                "leaky": rec["leaky"], "strength": self.strength, "ddim_steps": self.ddim_steps,
                "guidance_scale": self.guidance_scale,
                # what the rescale does when there is guidance; nothing without
                "guidance_rescale": self.guidance_rescale if self.guidance_scale != 1 else 0.0,
                "image_size": self.cfg["image_size"], "diffusers": diffusers.__version__}

    @torch.inference_mode()
    def generate(self, images: torch.Tensor, labels: torch.Tensor,
                 seeds: Sequence[int]) -> torch.Tensor:
        images, labels = check_batch(images, labels)
        if len(seeds) != len(images):
            raise ValueError(f"{len(seeds)} seeds for {len(images)} images; give one per image")
        if self.strength == 0.0:
            return images.clone()  # no noise added, so nothing to denoise
        out = [self._denoise(images[a:a + self.max_batch], labels[a:a + self.max_batch],
                             seeds[a:a + self.max_batch])
               for a in range(0, len(images), self.max_batch)]
        return torch.cat(out)

    def _denoise(self, images, labels, seeds) -> torch.Tensor:
        size = self.cfg["image_size"]
        noise = torch.cat([torch.randn((1, 1, size, size),
                                       generator=torch.Generator().manual_seed(int(s)))
                           for s in seeds]).to(self.device)
        self.scheduler.set_timesteps(self.ddim_steps)
        n_run = max(1, round(self.ddim_steps * self.strength))
        timesteps = self.scheduler.timesteps[self.ddim_steps - n_run:]
        if self.strength >= 1.0:
            x = noise  # a fresh sample: nothing of the source survives
        else:
            x0 = to_model_scale(images.to(self.device), size)
            x = self.scheduler.add_noise(x0, noise, timesteps[:1].repeat(len(x0)))
        cls = labels.to(self.device)
        guiding = self.guidance_scale != 1.0
        net = compiled(self.unet, self.compile_sample)  # a wrapper: compiled once per shape
        if guiding:  # one UNet call for both: the batch with its classes, then without
            cls = torch.cat([cls, torch.full_like(cls, self.null_class)])
        for t in timesteps:
            with autocast(self.device):
                inp = torch.cat([x, x]) if guiding else x
                out = net(inp, t.to(self.device), class_labels=cls).sample.float()
            if guiding:  # eps or v alike: both are linear in the score
                out = guided(*out.chunk(2), self.guidance_scale, self.guidance_rescale)
            x = self.scheduler.step(out, t, x).prev_sample
        return to_uint8_128(x)


def _sampling_settings(now: Mapping, path: Path, null: int | None, strength, ddim_steps,
                       guidance_scale, guidance_rescale) -> tuple[float, int, float, float]:
    """(strength, ddim_steps, guidance_scale, guidance_rescale): the given ones, else those in
    force (``now``), checked against what the generator at ``path`` can do."""
    out_strength = float(now["strength"] if strength is None else strength)
    if not 0.0 <= out_strength <= 1.0:
        raise ValueError(f"strength={strength}: give a noise level in [0, 1] "
                         f"(0 = the source, 1 = a fresh sample of its class)")
    scale = float(now["guidance_scale"] if guidance_scale is None else guidance_scale)
    rescale = float(now["guidance_rescale"] if guidance_rescale is None else guidance_rescale)
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance_rescale={rescale:g}: give a share in "
                         f"[0, 1] (0 = plain guidance, 0.7 = Lin et al.'s)")
    if guidance_scale is None and scale != 1.0 and null is None:
        raise ValueError(
            f"the generator at {path.parent} was trained without class_dropout, so it "
            f"cannot sample with the default guidance_scale={scale:g} (it "
            f"has no class-free output to guide against): pass guidance_scale=1 "
            f"(--guidance 1) for the conditional model alone, or retrain it")
    if not scale >= 1.0 or (scale != 1.0 and null is None):  # NaN too
        raise ValueError(
            f"guidance_scale={scale:g}: give 1 (the conditional model alone)"
            + (" or more" if null is not None else
               f"; the generator at {path.parent} was trained without class_dropout, so "
               f"it has no class-free output to guide against (retrain it to use > 1)"))
    return out_strength, int(ddim_steps or now["ddim_steps"]), scale, rescale


def _weights_hash(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for name in sorted(state):
        h.update(name.encode())
        flat = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
