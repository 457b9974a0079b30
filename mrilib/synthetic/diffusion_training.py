"""Training the local generator: a resumable loop, its checkpoint files, their records.

A generator's folder holds ``checkpoint.pt`` (everything needed to resume: weights,
optimizer, EMA, schedule, counters), ``generator.pt`` (what sampling needs: the EMA
weights in bf16 and the training record, the one file to ship) and ``meta.json``.
Training stops after ``minutes`` and resumes from the last checkpoint, so a generator
can be trained in pieces by time-limited jobs; all randomness of step k comes from an
RNG seeded by (seed, k), so a resumed run takes the same steps as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import diffusers
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..config import settings
from ..data import CLASSES, content_fingerprint
from ..device import autocast, resolve_device, sync
from ..paths import atomic_write_bytes
from .base import SIZE, check_batch
from .diffusion_model import (DEFAULTS, PRESETS, build_unet, compiled, null_class,
                              to_model_scale, train_scheduler, training_target, weights_settings)

CHECKPOINT_FORMAT = 1  # bump when the checkpoint layout changes


def train_generator(images: torch.Tensor, labels: torch.Tensor, seed: int,
                    out_dir: str | Path, minutes: float | None = None, steps: int | None = None,
                    *, ids: Sequence[str], leaky: bool = False,
                    device: str | torch.device | None = None, progress: bool = True,
                    **overrides) -> Path:
    """Train (or resume) the generator in ``out_dir``; the path of its checkpoint.

    ``images`` uint8 [N,1,128,128] with ``labels`` and dataset ``ids`` (recorded so that
    :func:`mrilib.synthetic.diffusion.assert_no_leakage` can tell which real images the
    generator saw) are its whole training set. Trains until ``steps`` optimizer steps in
    all (default: the preset's) or until ``minutes`` of wall time have passed in this
    call, whichever comes first; a checkpoint is written every ``checkpoint_minutes``, at
    the end and on Ctrl-C, and a later call resumes from it. A larger ``steps`` later
    extends a finished run.
    """
    images, labels = check_batch(images, labels)
    ids = _checked_ids(ids, labels)
    if minutes is not None and minutes < 0:
        raise ValueError(f"minutes={minutes}: give a non-negative time budget")
    cfg = settings(DEFAULTS, PRESETS, **overrides, **({} if steps is None else {"steps": steps}))
    if not 0 <= cfg["class_dropout"] < 1:
        raise ValueError(f"class_dropout={cfg['class_dropout']}: give the share of training "
                         f"images shown without their class, in [0, 1) (0.1 is usual)")
    device = resolve_device(device)
    out_dir = Path(out_dir)
    identity = _identity(cfg, seed, ids, labels, leaky)
    if _shipped_and_done(out_dir, identity, cfg["steps"]):
        return out_dir / "generator.pt"
    run = _Run.resumed(cfg, seed, device, out_dir / "checkpoint.pt", identity)
    record = {"seed": int(seed), "train_ids": sorted(ids),
              "train_fingerprint": ids_fingerprint(ids), "n_images": len(ids), "leaky": bool(leaky),
              "class_counts": dict(zip(CLASSES, torch.bincount(
                  labels, minlength=len(CLASSES)).tolist())),
              "versions": {"torch": str(torch.__version__), "diffusers": diffusers.__version__},
              "device": str(device)}
    run.train(cfg, images, labels, minutes, device, progress, out_dir,
              {"identity": identity, **record})
    return out_dir / "checkpoint.pt"


def _checked_ids(ids: Sequence[str], labels: torch.Tensor) -> list[str]:
    ids = list(ids)
    if len(ids) != len(labels):
        raise ValueError(f"ids has {len(ids)} entries for {len(labels)} images; give one "
                         f"dataset id per image (MRIData.ids)")
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise ValueError(f"labels must be class ids 0..{len(CLASSES) - 1}, got "
                         f"{sorted(set(labels.tolist()))}")
    return ids


def _identity(cfg: Mapping, seed: int, ids: Sequence[str], labels: torch.Tensor,
              leaky: bool) -> dict:
    """What must match for a checkpoint to be resumed: the data, the seed, the settings."""
    return {"format": CHECKPOINT_FORMAT, "settings": weights_settings(cfg), "seed": int(seed),
            "data_fingerprint": content_fingerprint(ids, labels.tolist(), CLASSES),
            "leaky": bool(leaky)}


def _shipped_and_done(out_dir: Path, identity: dict, steps: int) -> bool:
    """Whether ``out_dir`` holds this run's finished generator.pt without its checkpoint.pt.

    Such a generator (brought back alone, as the one file that fits) is the result: keep
    it rather than retrain from step 0 over it. Extending it needs the checkpoint.
    """
    shipped = out_dir / "generator.pt"
    if not shipped.exists() or (out_dir / "checkpoint.pt").exists():
        return False
    record = training_record(shipped)
    return (record.get("identity") == identity and bool(record.get("done"))
            and record.get("target_steps", 0) >= steps)


def _memory_format(cfg: Mapping) -> torch.memory_format:
    return torch.channels_last if cfg["channels_last"] else torch.contiguous_format


def _step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s RNG: the same whether the run was resumed or not."""
    digest = hashlib.sha256(f"{seed}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class _Run:
    """A generator's training in progress: its modules and the counters a checkpoint keeps."""

    unet: UNet2DModel
    opt: torch.optim.Optimizer
    lr_sched: Any
    ema: EMAModel | None
    step: int = 0
    history: list = field(default_factory=list)  # [step, mean loss since the entry before]
    elapsed: float = 0.0  # wall seconds of training over all calls
    pending: list = field(default_factory=lambda: [0.0, 0])  # loss sum, count since then
    saved_target: int | None = None  # the checkpoint's target steps, None when fresh
    first_step: int = 0  # the step this call started at
    loop_s: float = 0.0  # seconds of this call's hot loop, checkpoint writes excluded

    @classmethod
    def resumed(cls, cfg: Mapping, seed: int, device: torch.device, ckpt_path: Path,
                identity: dict) -> "_Run":
        """A fresh run, its weights drawn from ``seed``, or the one saved at ``ckpt_path``."""
        run = cls(*_fresh_state(cfg, seed, device))
        if ckpt_path.exists():
            saved = read_checkpoint(ckpt_path)
            if saved.get("identity") != identity:
                raise ValueError(f"{ckpt_path} belongs to another training run (other images, "
                                 f"seed or settings); give another out_dir or delete that folder")
            run.load(saved, device)
        run.first_step = run.step
        return run

    def load(self, saved: dict, device: torch.device) -> None:
        self.unet.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["optimizer"])
        _match_layouts(self.opt)
        self.lr_sched.load_state_dict(saved["lr_schedule"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
            self.ema.to(device)
            self.ema.shadow_params = [torch.empty_like(p).copy_(v) for p, v in
                                      zip(self.unet.parameters(), self.ema.shadow_params)]
        self.step, self.history = saved["step"], saved["loss_history"]
        self.elapsed, self.pending = saved["elapsed_s"], saved["pending_loss"]
        self.saved_target = saved["target_steps"]

    def train(self, cfg, images, labels, minutes, device, progress, out_dir, record) -> None:
        """Steps until ``cfg["steps"]`` or ``minutes``, checkpointing on the way and at the end.

        The hot loop: one optimizer step per iteration, no host sync but for logging.
        """
        data, class_ids = images.to(device), labels.to(device)
        if cfg["image_size"] != SIZE:  # quick preset: a tiny model works on downscaled slices
            data = ((to_model_scale(data, cfg["image_size"]) + 1) * 127.5).round().to(torch.uint8)
        noise_sched, null, fmt = train_scheduler(cfg), null_class(cfg), _memory_format(cfg)
        net = compiled(self.unet, cfg["compile_train"])  # self.unet keeps the weights' names
        autotune = torch.backends.cudnn.benchmark  # restored in the finally below
        start = last_save = time.monotonic()
        deadline = None if minutes is None else start + 60 * minutes
        clean = True  # False from the optimizer step until the step is counted
        loss_sum, n_loss = torch.tensor(self.pending[0], device=device), self.pending[1]
        bar = tqdm(total=cfg["steps"], initial=self.step, desc="train generator",
                   disable=not progress, unit="step")
        try:
            torch.backends.cudnn.benchmark = cfg["cudnn_benchmark"]
            while self.step < cfg["steps"] and (deadline is None or time.monotonic() < deadline):
                # -- this step's batch, noise, timesteps and dropped classes, from its own RNG
                rng = torch.Generator(device=device).manual_seed(_step_seed(record["seed"],
                                                                            self.step))
                xt, t, cls, target = _noised_batch(rng, data, class_ids, cfg, noise_sched, null,
                                                   fmt, device)
                with autocast(device):
                    pred = net(xt, t, class_labels=cls).sample
                loss = F.mse_loss(pred.float(), target)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg["grad_clip"])
                # Mid-update until step += 1: an interrupt here must not be saved, or the
                # resumed run would apply this step twice.
                clean = False
                self.opt.step()
                self.lr_sched.step()
                if self.ema is not None:
                    self.ema.step(self.unet.parameters())
                self.step += 1
                clean = True
                loss_sum += loss.detach()
                n_loss += 1
                # -- logging and periodic checkpoints
                if self.step % cfg["log_every"] == 0:
                    self.history.append([self.step, float(loss_sum) / n_loss])
                    loss_sum.zero_()
                    n_loss = 0
                    bar.set_postfix(loss=f"{self.history[-1][1]:.4f}")
                bar.update(1)
                if time.monotonic() - last_save >= 60 * cfg["checkpoint_minutes"]:
                    sync(device)
                    now = time.monotonic()
                    self.elapsed += now - last_save
                    self.loop_s += now - last_save
                    self.pending = [float(loss_sum), n_loss]
                    self.save(out_dir, cfg, record, done=False)
                    last_save = time.monotonic()  # the write is not training time
            sync(device)
            self.loop_s += time.monotonic() - last_save
        finally:  # also on Ctrl-C / SIGTERM turned KeyboardInterrupt: nothing trained is lost
            torch.backends.cudnn.benchmark = autotune
            bar.close()
            self.elapsed += time.monotonic() - last_save
            if clean and (self.step > self.first_step or self.saved_target != cfg["steps"]):
                self.pending = [float(loss_sum), n_loss]
                self.save(out_dir, cfg, record, done=self.step >= cfg["steps"])
            elif not clean:
                print(f"interrupted inside step {self.step + 1}; resuming from the last "
                      f"checkpoint", file=sys.stderr)

    def save(self, out_dir: Path, cfg: Mapping, record: dict, done: bool) -> None:
        state = {"identity": record["identity"],
                 "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                 "model": self.unet.state_dict(), "optimizer": self.opt.state_dict(),
                 "lr_schedule": self.lr_sched.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None,
                 "step": self.step, "target_steps": cfg["steps"], "done": done,
                 "loss_history": self.history, "elapsed_s": self.elapsed, "seed": record["seed"],
                 # losses of steps since the last history entry, so a resumed run's next
                 # entry averages the same steps as an uninterrupted run's
                 "pending_loss": self.pending,
                 "rng": {"scheme": "per-step generator seeded by sha256(seed, step)",
                         "seed": record["seed"], "next_step": self.step},
                 **{k: v for k, v in record.items() if k not in ("identity", "seed")},
                 "last_call": {"steps": self.step - self.first_step, "loop_seconds": self.loop_s}}
        _save(out_dir, state, _sampling_weights(self.unet, self.ema))


def _noised_batch(rng, data, class_ids, cfg, noise_sched, null, fmt, device):
    """One step's (x_t, t, classes, target), every draw from ``rng``, in a fixed order."""
    idx = torch.randint(len(data), (cfg["batch_size"],), generator=rng, device=device)
    x0 = data[idx].float() / 127.5 - 1.0
    if cfg["hflip"]:
        flip = torch.rand(len(idx), generator=rng, device=device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    t = torch.randint(cfg["num_train_timesteps"], (len(idx),), generator=rng, device=device)
    noise = torch.randn(x0.shape, generator=rng, device=device)
    xt = noise_sched.add_noise(x0, noise, t).contiguous(memory_format=fmt)
    cls = class_ids[idx]
    if null is not None:  # classifier-free guidance: some images learn "no class"
        drop = torch.rand(len(idx), generator=rng, device=device) < cfg["class_dropout"]
        cls = torch.where(drop, null, cls)
    return xt, t, cls, training_target(noise_sched, x0, noise, t)


def _fresh_state(cfg: Mapping, seed: int, device: torch.device):
    """(unet, optimizer, lr schedule, ema): weights drawn from ``seed``, global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(cfg)
    # The layout is set before the optimizer and the EMA copy their tensors from the weights.
    unet.to(device, memory_format=_memory_format(cfg)).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                            fused=device.type == "cuda")
    lr_sched = get_constant_schedule_with_warmup(opt, cfg["warmup_steps"])
    ema = (EMAModel(unet.parameters(), decay=cfg["ema_max_decay"], use_ema_warmup=True,
                    power=cfg["ema_power"], foreach=True) if cfg["ema"] else None)
    return unet, opt, lr_sched, ema


def _match_layouts(opt: torch.optim.Optimizer) -> None:
    """Give each loaded optimizer state tensor its parameter's memory layout.

    A checkpoint stores them contiguous; fused and foreach Adam pair a weight with its
    moments element by element in memory, so a channels_last weight beside a contiguous
    moment would be updated with another element's moments.
    """
    for param, state in opt.state.items():
        for key, value in state.items():
            if key != "step" and torch.is_tensor(value) and value.shape == param.shape:
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# ----------------------------------------------------------------------------- files

def read_checkpoint(path: Path) -> dict:
    """A checkpoint.pt or generator.pt as saved (tensors and plain containers only), or a
    ValueError naming the file and what to do; an unreadable file is never deleted here:
    it is GPU work that may still be whole where it was trained."""
    try:
        # weights_only: a tampered file cannot run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated (OSError 22, zip or unpickling errors), not torch's
        first = (str(err).splitlines() or [""])[0]  # one line: the CLI prints one
        raise ValueError(f"generator file {path} is unreadable ({type(err).__name__}: "
                         f"{first}), e.g. cut short by a copy or a full disk. "
                         f"{_unreadable_fix(Path(path))}") from None


def _unreadable_fix(path: Path) -> str:
    """What to do about an unreadable generator file, which mrilib leaves in place."""
    command = "`python -m mrilib synth train` (train_generator in Python)"
    if path.name == "checkpoint.pt":
        return (f"Copy it again from where it was trained, or delete it and train from step 0 "
                f"with {command}, which overwrites generator.pt beside it.")
    return (f"Copy it again from where it was trained, or delete the folder {path.parent} "
            f"and train it again with {command}.")


def _save(out_dir: Path, state: dict, sampling_weights: dict) -> Path:
    """Write checkpoint.pt (to resume), generator.pt (to sample) and meta.json, atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    ckpt = atomic_write_bytes(out_dir / "checkpoint.pt", buf.getvalue())
    # generator.pt holds only what sampling needs, in bf16 (an eighth of the checkpoint),
    # so it is what is shipped between machines and loaded by LocalDiffusion.
    slim = {k: v for k, v in state.items() if k not in ("model", "optimizer", "lr_schedule", "ema")}
    buf = io.BytesIO()
    torch.save(slim | {"model": sampling_weights}, buf)
    atomic_write_bytes(out_dir / "generator.pt", buf.getvalue())
    meta = {k: state[k] for k in ("step", "target_steps", "done", "seed", "leaky", "n_images",
                                  "class_counts", "train_fingerprint", "elapsed_s", "last_call",
                                  "versions", "device")}
    meta["last_losses"] = state["loss_history"][-5:]
    atomic_write_bytes(out_dir / "meta.json", json.dumps(meta, indent=2).encode())
    return ckpt


def _sampling_weights(unet: UNet2DModel, ema: EMAModel | None) -> dict:
    """The weights to sample from: the EMA's where there is one, in bf16, keyed like a state_dict.

    bf16 loses nothing on the GPU, where bf16 autocast rounds the weights so anyway, and
    halves the file; CPU sampling upcasts them to fp32.
    """
    weights = dict(unet.state_dict())
    if ema is not None:
        names = [name for name, _ in unet.named_parameters()]
        weights.update(zip(names, ema.shadow_params))
    return {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach()).cpu()
            for k, v in weights.items()}


def ids_fingerprint(ids: Sequence[str]) -> str:
    """A hash of a set of image ids, independent of order."""
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def training_record(checkpoint: str | Path | Mapping) -> dict:
    """The non-weight part of a checkpoint (ids, fingerprint, step, leaky, config)."""
    if isinstance(checkpoint, Mapping):
        return {k: v for k, v in checkpoint.items() if k not in ("model", "optimizer", "ema",
                                                                 "lr_schedule")}
    return training_record(read_checkpoint(generator_file(Path(checkpoint))))


def generator_file(path: Path) -> Path:
    """generator.pt for a folder, a checkpoint.pt beside one, or the file given."""
    if path.is_dir():
        path = path / "generator.pt"
    elif path.name == "checkpoint.pt" and (path.parent / "generator.pt").exists():
        path = path.parent / "generator.pt"
    if not path.exists():
        raise FileNotFoundError(f"no generator checkpoint at {path}; train one with "
                                f"`python -m mrilib synth train` or train_generator()")
    return path
