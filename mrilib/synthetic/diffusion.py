"""The local generator: a class-conditional DDPM trained here, variations made SDEdit-style.

The model is a diffusers ``UNet2DModel`` with one class embedding per diagnosis, trained
with ``DDPMScheduler`` (v-prediction on a zero-terminal-SNR schedule, MSE; see DEFAULTS)
on grayscale slices scaled to [-1, 1].
A *variation* of a source slice is the source noised to a chosen ``strength`` (0 = the
source itself, 1 = pure noise, i.e. a fresh sample of the class) and then denoised by
DDIM conditioned on the source's class (Meng et al. 2022, "SDEdit").

No leakage. A generator that augments a classifier may learn only from real images that
classifier is allowed to see: the X% stratified sample of its repeat, never validation or
test images and never other images of the training pool. Each checkpoint records the ids
of the images it learned from, :func:`assert_no_leakage` checks them against an allowed
set, and :func:`mrilib.synthetic.mixing.mixed_training_set` calls it.

Sharing. Training one generator per repeat (20 repeats x several cells) would cost hours
of GPU time, so ``n_generators`` (G = 5) generators are trained per real fraction X:
generator g learns from the stratified sample drawn with ``sample_seed = g`` (training
seed g as well), and repeat r of a cell uses sample and generator ``g = r mod G``. The
chapter-7 grid trains them at its smallest fraction only (30%) and uses them for every
fraction, which nested samples make leak-free (``generator_fraction`` in
:mod:`mrilib.experiment`). Repeats
r and r + G therefore share their real images and their generator but draw different
variations (the variation seed is r), so they are not independent draws of the real
sample; with 20 repeats each of the 5 samples is used 4 times. :func:`repeat_generator`
encodes the rule.

Ablation ("leaky"): ``leaky=True`` trains one generator per seed on the whole training
pool, whatever X is. A classifier augmented by it sees, through the synthetic images,
real images outside its own sample; comparing it with the default shows how much of a
gain is leakage. Such a generator is refused by the mixing policy unless the caller
passes ``allow_leaky=True``, and its ``params()`` say ``leaky``.

Generators live under ``cache/generators/<key>/`` (:func:`generator_dir`), the key
covering the training images (their ids and labels), X, the seed, the training settings
and the diffusers version. Training stops after ``minutes`` and resumes from the last
checkpoint, so it fits machines that run one command for at most 10 minutes.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Mapping, Sequence

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..config import settings
from ..train import resolve_device  # one rule for every module
from ..data import CLASSES, content_fingerprint
from ..paths import CACHE, atomic_write_bytes
from .base import SIZE, Backend, check_batch
from .mixing import real_sample

CHECKPOINT_FORMAT = 1  # bump when the checkpoint layout changes

DEFAULTS = {
    # --- model (diffusers UNet2DModel) ---
    "image_size": 128,  # px per side the UNet works at; 128 = the thesis's size, no resizing
    # Four levels 128->64->32->16, 6.3M parameters. Small on purpose: a trained generator
    # (bf16 weights, 12 MiB) must fit the 16 MiB a GPU machine here can hand back per
    # file, training must fit minutes on one H100, and ~1,400 training slices need little
    # capacity (a larger model memorizes them sooner). 128 channels at 32x32 and 16x16
    # carry the anatomy; 32 at full resolution is texture only.
    "block_out_channels": (32, 64, 128, 128),
    "layers_per_block": 2,  # resnet blocks per level, as in DDPM
    # Self-attention only at 16x16: slices are centred and similar in layout, so global
    # context at the coarsest level suffices, and 32x32 attention would cost ~4x as much.
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "attention_head_dim": 32,  # channels per head: 4 heads at 128 channels
    "norm_num_groups": 32,  # GroupNorm groups; must divide every width
    # --- diffusion ---
    "num_train_timesteps": 1000,  # DDPM's T
    "beta_schedule": "linear",  # DDPM's schedule (1e-4 .. 0.02); strength maps linearly to t
    # Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    # Steps are Flawed"). The linear schedule leaves sqrt(alpha_bar_T) = 0.0064 of the
    # image in x_T; a model trained so reads the image's mean brightness from that residue,
    # and sampled from pure noise (mean 0) it paints mid-grey. MRI slices are mostly black
    # (mean -0.44 in [-1, 1]): the first full generator (2026-11-26) drew grey, grainy
    # fresh slices (x0 predictions with mean ~0 all along the DDIM path; 250 steps were
    # worse than 50) and lifted its variations' black background to 13/255. Rescaling
    # the betas to SNR 0 at T removes the residue; epsilon is then undefined at T, hence
    # v-prediction. Checkpoints made before these keys existed sample as trained
    # (epsilon, no rescaling): see _schedule_kwargs.
    "rescale_betas_zero_snr": True,
    "prediction_type": "v_prediction",  # "epsilon" (DDPM) or "v_prediction" (Salimans & Ho)
    # Classifier-free guidance (Ho & Salimans 2022): this share of training images is shown
    # with a "no class" label (an extra class embedding), so that one model also learns
    # the class-free distribution and sampling can push away from it (guidance_scale).
    # Why: the first generator's strength-0.6 variations kept NonDemented (0.92 by a
    # real-only classifier) but drifted towards it for the rarer classes (Mild 0.32,
    # Moderate 0.14). 0.1 is the paper's value; 0 trains a purely conditional model.
    "class_dropout": 0.1,
    # --- training ---
    "steps": 4000,  # optimizer steps in all (~180 passes over a 30% sample at batch 64);
    # picked for the 5-minute target: measured 5.19 min on an H100 (4% over) and 4.3 on
    # an H200 (benchmarks/README.md)
    "batch_size": 64,  # images per step
    "lr": 1e-4,  # AdamW, constant after warmup (diffusers' DDPM recipe)
    "warmup_steps": 200,  # linear warmup from 0, in steps
    "weight_decay": 1e-6,  # diffusers' unconditional-DDPM example
    "grad_clip": 1.0,  # max grad norm, keeps early steps of the bf16 run stable
    # Left-right flips: slices are near-symmetric, and with ~1,400 training images twice
    # the views lowers the risk of the generator memorizing its sources.
    "hflip": True,
    # EMA of the weights is what samples are drawn from: it gives visibly cleaner DDPM
    # samples than the raw weights. Warmup (decay 1 - (1+step)^-power) makes it usable in a
    # short run; a fixed 0.9999 would still be mostly the random init after 4,000 steps.
    "ema": True,
    "ema_max_decay": 0.9999,
    "ema_power": 0.75,  # reaches decay 0.999 at 10k steps (crowsonkb's short-run value)
    # --- speed (not part of the generator's identity: same model, same steps) ---
    # Both off until `synth bench --channels-last --cudnn-benchmark` shows they pay: on an
    # H200 training ran at 50 TFLOP/s, 6% of the card's bf16 rate (benchmarks/README.md).
    # Training only; sampling (11 s per 1,000 variations on an H200) keeps its defaults.
    "channels_last": False,  # NHWC activations and weights, the layout tensor cores want
    "cudnn_benchmark": False,  # let cuDNN time its convolution algorithms and keep the best
    # --- bookkeeping (not part of the generator's identity) ---
    "checkpoint_minutes": 2.0,  # wall minutes between checkpoints during training
    "log_every": 50,  # steps between loss readings (each one syncs the GPU)
    "n_generators": 5,  # G: generators (real samples) per fraction, shared by repeats r mod G
    # --- sampling ---
    "strength": 0.6,  # SDEdit noise level of a variation: 0 = the source, 1 = a fresh sample
    "ddim_steps": 50,  # DDIM steps for strength 1; a variation runs strength x ddim_steps
    # Classifier-free guidance weight w: output = uncond + w (cond - uncond). 1 = the plain
    # conditional model (one UNet pass per step); > 1 sharpens the class at the cost of a
    # second, class-free pass per step and of diversity. Why 4: it is the smallest weight
    # measured at which a real-only classifier's balanced accuracy on the variations
    # reaches its balanced accuracy on real test slices. On the H100
    # (2026-11-26, generator 0 of the 30% sample, strength 0.6, 164 sources; results/
    # strength_sweep_x0.3_g0_guidance.json) a real-only basic CNN, balanced accuracy 0.65
    # on real test slices, scored its variations 0.38 unguided (Mild 0.36, VeryMild 0.28,
    # Moderate 0 of 14: most rare-class variations get another class, i.e. label noise
    # in the synthetic arm), 0.49 at w = 2 and 0.70 at w = 4 (0.90 / 0.60 / 5 of 14; on
    # real slices 0.55 / 0.66 / 0.46, so VeryMild and Moderate stay below). Larger weights
    # would make variations more typical of their class than real slices are and less
    # diverse. Sampling costs twice the unguided time. 3 and 6 are not measured yet.
    "guidance_scale": 4.0,
    # With zero terminal SNR, guidance w > 1 over-exposes (Lin et al. 2024, sec. 3.4): the
    # guided output's spread grows with w. Their fix, used when w > 1: rescale it per image
    # to the class output's standard deviation and blend, this much rescaled (their 0.7).
    "guidance_rescale": 0.7,
    "sample_batch": 256,  # sources per UNet call when generating (twice that many images
    # with guidance; GPU memory, not results: 11 GiB at 512 on an H100)
    # The same on a CPU, where a batch buys no speed (the convolutions are compute-bound
    # already) and is what an interrupted run loses, since the cache stores a batch when
    # it is done: 4 guided variations at strength 0.6 take ~2.5 minutes on 2 cores
    # (a notebook timeout once lost a 56-image batch, 15 minutes).
    "cpu_sample_batch": 4,
}

PRESETS = {
    "quick": {
        # A model that trains in seconds on one CPU core: 16x16 internally, two levels.
        "image_size": 16,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        "steps": 6,
        "batch_size": 8,
        "lr": 1e-3,
        "warmup_steps": 2,
        "log_every": 1,
        "n_generators": 2,
        "ddim_steps": 4,
        "sample_batch": 16,
        "cpu_sample_batch": 16,  # a tiny model: a batch takes well under a second
    },
}

# Settings that change how a run is split up or sampled, not which weights it produces.
_RUN_ONLY = ("steps", "checkpoint_minutes", "log_every", "n_generators", "strength",
             "ddim_steps", "guidance_scale", "guidance_rescale", "sample_batch",
             "cpu_sample_batch", "channels_last", "cudnn_benchmark")
# What a variation depends on besides the weights: read from the settings in force when
# a backend is built (not from the checkpoint, whose copy says how it was configured when
# trained), so that changing one retrains nothing and is seen by the generator hash.
_SAMPLING = ("strength", "ddim_steps", "guidance_scale", "guidance_rescale")


class LeakageError(ValueError):
    """A generator learned from real images the classifier it would augment may not see."""


# ----------------------------------------------------------------------------- building blocks

def training_settings(cfg: Mapping) -> dict:
    """The settings that determine a generator's weights (what its cache key covers)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(cfg.items())
            if k not in _RUN_ONLY}


def design_settings(**overrides) -> dict:
    """What the images of a generator trained now depend on, besides its training images.

    The settings its weights depend on (:func:`training_settings`), its length
    (``steps``) and the sampling settings, as in force for the current preset: what
    :func:`mrilib.experiment.generator_hash` covers (the generator half of a synthetic
    cell's design, :func:`mrilib.experiment.cell_design`).
    """
    cfg = settings(DEFAULTS, PRESETS, **overrides)
    return {**training_settings(cfg), "steps": cfg["steps"],
            **{k: cfg[k] for k in _SAMPLING}, "diffusers": diffusers.__version__}


def null_class(cfg: Mapping) -> int | None:
    """The class id that means "no class" (classifier-free guidance), or None without one."""
    return len(CLASSES) if cfg.get("class_dropout", 0) > 0 else None


def build_unet(cfg: Mapping) -> UNet2DModel:
    """The class-conditional UNet described by ``cfg`` (random weights).

    One class embedding per diagnosis, and one more for "no class" when the model is
    trained with ``class_dropout`` (checkpoints made before that key have none).
    """
    return UNet2DModel(
        sample_size=cfg["image_size"], in_channels=1, out_channels=1,
        num_class_embeds=len(CLASSES) + (null_class(cfg) is not None),
        block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=cfg["layers_per_block"],
        down_block_types=tuple(cfg["down_block_types"]),
        up_block_types=tuple(cfg["up_block_types"]),
        attention_head_dim=cfg["attention_head_dim"],
        norm_num_groups=cfg["norm_num_groups"],
    )


def _schedule_kwargs(cfg: Mapping) -> dict:
    # .get: a checkpoint's stored config from before these keys meant epsilon, no rescaling
    if cfg.get("rescale_betas_zero_snr", False) and cfg.get("prediction_type") == "epsilon":
        raise ValueError("rescale_betas_zero_snr=True needs prediction_type='v_prediction': "
                         "at zero SNR the noise is the whole input and epsilon says nothing")
    return {"num_train_timesteps": cfg["num_train_timesteps"],
            "beta_schedule": cfg["beta_schedule"],
            "prediction_type": cfg.get("prediction_type", "epsilon"),
            "rescale_betas_zero_snr": cfg.get("rescale_betas_zero_snr", False)}


def train_scheduler(cfg: Mapping) -> DDPMScheduler:
    return DDPMScheduler(**_schedule_kwargs(cfg))


def sample_scheduler(cfg: Mapping) -> DDIMScheduler:
    # "trailing" spacing starts at t = T-1, so strength 1 really starts from noise
    # (the default "leading" spacing never visits the last 20 timesteps); Lin et al.
    # ask for it with zero terminal SNR too.
    return DDIMScheduler(**_schedule_kwargs(cfg), timestep_spacing="trailing")


def guided(cond: torch.Tensor, free: torch.Tensor, scale: float, rescale: float) -> torch.Tensor:
    """Classifier-free guidance of UNet outputs (eps or v): free + scale (cond - free),
    rescaled per image towards ``cond``'s standard deviation by ``rescale`` (0 = not).

    By hand because diffusers keeps its ``rescale_noise_cfg`` in the Stable Diffusion
    pipeline module, which imports transformers; this is the same arithmetic, with a
    constant output (std 0) left as it is instead of divided by zero.
    """
    out = free + scale * (cond - free)
    if rescale:
        dims = list(range(1, out.dim()))
        std_cond, std_out = cond.std(dim=dims, keepdim=True), out.std(dim=dims, keepdim=True)
        ratio = torch.where(std_out > 0, std_cond / std_out.clamp_min(1e-12),
                            torch.ones_like(std_out))
        out = rescale * out * ratio + (1 - rescale) * out
    return out


def training_target(sched: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output at ``t``: the noise, or v = a_t noise - s_t x0."""
    if sched.config.prediction_type == "v_prediction":
        return sched.get_velocity(x0, noise, t)
    return noise




def _autocast(device: torch.device):
    # bf16 on the GPU (H100 tensor cores, no loss scaling needed); fp32 on CPU, where
    # bf16 autocast is slower on most cores and would change results for nothing.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _hash_seed(*parts) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def to_model_scale(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B,1,H,W] -> float [B,1,size,size] in [-1, 1] (area-downsampled if smaller)."""
    x = images.float() / 127.5 - 1.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x


def to_uint8_128(x: torch.Tensor) -> torch.Tensor:
    """float [B,1,s,s] in [-1, 1] -> uint8 [B,1,128,128] (bilinear upsampling if s < 128)."""
    x = x.float().clamp(-1, 1)
    if x.shape[-1] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


# ----------------------------------------------------------------------------- training

def _identity(cfg: Mapping, seed: int, ids: Sequence[str], labels: torch.Tensor,
              leaky: bool) -> dict:
    """What must match for a checkpoint to be resumed: the data, the seed, the settings."""
    return {"format": CHECKPOINT_FORMAT, "settings": training_settings(cfg), "seed": int(seed),
            "data_fingerprint": content_fingerprint(ids, labels.tolist(), CLASSES),
            "leaky": bool(leaky)}


def _memory_format(cfg: Mapping) -> torch.memory_format:
    return torch.channels_last if cfg["channels_last"] else torch.contiguous_format


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


def _load_checkpoint(path: Path) -> dict:
    # weights_only: a checkpoint is plain tensors and dicts, and loading nothing else
    # means a tampered file cannot run code.
    return torch.load(path, map_location="cpu", weights_only=True)


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


def train_generator(images: torch.Tensor, labels: torch.Tensor, seed: int,
                    out_dir: str | Path, minutes: float | None = None, steps: int | None = None,
                    *, ids: Sequence[str], leaky: bool = False,
                    device: str | torch.device | None = None, progress: bool = True,
                    **overrides) -> Path:
    """Train (or resume) the generator in ``out_dir``; the path of its checkpoint.

    ``images`` uint8 [N,1,128,128] with ``labels`` and dataset ``ids`` (recorded so that
    :func:`assert_no_leakage` can tell which real images the generator saw) are its
    whole training set. Trains until ``steps`` optimizer steps in all (default: the
    preset's) or until ``minutes`` of wall time have passed in this call, whichever comes
    first; a checkpoint is written every ``checkpoint_minutes``, at the end and on
    Ctrl-C, and a later call resumes from it. All randomness of step k comes from a
    generator seeded by (seed, k), so a resumed run takes the same steps as an
    uninterrupted one. A larger ``steps`` later extends a finished run.
    """
    images, labels = check_batch(images, labels)
    ids = list(ids)
    if len(ids) != len(images):
        raise ValueError(f"ids has {len(ids)} entries for {len(images)} images; give one "
                         f"dataset id per image (MRIData.ids)")
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise ValueError(f"labels must be class ids 0..{len(CLASSES) - 1}, got "
                         f"{sorted(set(labels.tolist()))}")
    if minutes is not None and minutes < 0:
        raise ValueError(f"minutes={minutes}: give a non-negative time budget")
    cfg = settings(DEFAULTS, PRESETS, **overrides, **({} if steps is None else {"steps": steps}))
    if not 0 <= cfg["class_dropout"] < 1:
        raise ValueError(f"class_dropout={cfg['class_dropout']}: give the share of training "
                         f"images shown without their class, in [0, 1) (0.1 is usual)")
    device = resolve_device(device)
    out_dir = Path(out_dir)
    identity = _identity(cfg, seed, ids, labels, leaky)

    # A finished generator.pt without its checkpoint.pt (one brought back from a GPU
    # machine, where only generator.pt fits the outbox) is the result: keep it rather than
    # retrain from step 0 over it. Extending it (more steps) needs the checkpoint.
    shipped = out_dir / "generator.pt"
    if shipped.exists() and not (out_dir / "checkpoint.pt").exists():
        record = training_record(shipped)
        if record.get("identity") == identity and record.get("done") \
                and record.get("target_steps", 0) >= cfg["steps"]:
            return shipped

    # --- set up: fresh, or resumed from out_dir/checkpoint.pt ---
    unet, opt, lr_sched, ema = _fresh_state(cfg, seed, device)
    step, history, elapsed, pending, saved_target = 0, [], 0.0, [0.0, 0], None
    ckpt_path = out_dir / "checkpoint.pt"
    if ckpt_path.exists():
        saved = _load_checkpoint(ckpt_path)
        if saved.get("identity") != identity:
            raise ValueError(f"{ckpt_path} belongs to another training run (other images, seed "
                             f"or settings); give another out_dir or delete that folder")
        unet.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        _match_layouts(opt)
        lr_sched.load_state_dict(saved["lr_schedule"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
            ema.to(device)
            ema.shadow_params = [torch.empty_like(p).copy_(v) for p, v in
                                 zip(unet.parameters(), ema.shadow_params)]
        step, history, elapsed = saved["step"], saved["loss_history"], saved["elapsed_s"]
        pending, saved_target = saved["pending_loss"], saved["target_steps"]

    data, class_ids = images.to(device), labels.to(device)
    if cfg["image_size"] != SIZE:  # quick preset: a tiny model works on downscaled slices
        data = ((to_model_scale(data, cfg["image_size"]) + 1) * 127.5).round().to(torch.uint8)
    noise_sched = train_scheduler(cfg)
    null = null_class(cfg)

    def state(done: bool) -> dict:
        return {"identity": identity, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                 for k, v in cfg.items()},
                "model": unet.state_dict(), "optimizer": opt.state_dict(),
                "lr_schedule": lr_sched.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "step": step, "target_steps": cfg["steps"], "done": done,
                "loss_history": history, "elapsed_s": elapsed, "seed": int(seed),
                # losses of steps since the last history entry, so a resumed run's next
                # entry averages the same steps as an uninterrupted run's
                "pending_loss": [float(loss_sum), n_loss],
                "rng": {"scheme": "per-step generator seeded by sha256(seed, step)",
                        "seed": int(seed), "next_step": step},
                "train_ids": sorted(ids), "train_fingerprint": ids_fingerprint(ids),
                "n_images": len(ids), "leaky": bool(leaky),
                "class_counts": dict(zip(CLASSES, torch.bincount(
                    labels, minlength=len(CLASSES)).tolist())),
                "versions": {"torch": str(torch.__version__), "diffusers": diffusers.__version__},
                "device": str(device), "last_call": {"steps": step - first_step,
                                                     "loop_seconds": loop_s}}

    # --- the hot loop: one optimizer step per iteration, no host sync but for logging ---
    fmt = _memory_format(cfg)
    autotune = torch.backends.cudnn.benchmark  # restored in the finally below
    start = last_save = time.monotonic()
    deadline = None if minutes is None else start + 60 * minutes
    first_step, loop_s, clean = step, 0.0, True
    loss_sum, n_loss = torch.tensor(pending[0], device=device), pending[1]
    bar = tqdm(total=cfg["steps"], initial=step, desc="train generator", disable=not progress,
               unit="step")
    try:
        torch.backends.cudnn.benchmark = cfg["cudnn_benchmark"]
        while step < cfg["steps"] and (deadline is None or time.monotonic() < deadline):
            g = torch.Generator(device=device).manual_seed(_hash_seed(seed, step))
            idx = torch.randint(len(data), (cfg["batch_size"],), generator=g, device=device)
            x0 = data[idx].float() / 127.5 - 1.0
            if cfg["hflip"]:
                flip = torch.rand(len(idx), generator=g, device=device) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            t = torch.randint(cfg["num_train_timesteps"], (len(idx),), generator=g, device=device)
            noise = torch.randn(x0.shape, generator=g, device=device)
            xt = noise_sched.add_noise(x0, noise, t).contiguous(memory_format=fmt)
            cls = class_ids[idx]
            if null is not None:  # classifier-free guidance: some images learn "no class"
                drop = torch.rand(len(idx), generator=g, device=device) < cfg["class_dropout"]
                cls = torch.where(drop, null, cls)
            with _autocast(device):
                pred = unet(xt, t, class_labels=cls).sample
            loss = F.mse_loss(pred.float(), training_target(noise_sched, x0, noise, t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg["grad_clip"])
            # From here to step += 1 the state is mid-update: an interrupt here must not
            # be saved, or the resumed run would apply this step twice.
            clean = False
            opt.step()
            lr_sched.step()
            if ema is not None:
                ema.step(unet.parameters())
            step += 1
            clean = True
            loss_sum += loss.detach()
            n_loss += 1
            # --- logging and periodic checkpoints ---
            if step % cfg["log_every"] == 0:
                history.append([step, float(loss_sum) / n_loss])
                loss_sum.zero_()
                n_loss = 0
                bar.set_postfix(loss=f"{history[-1][1]:.4f}")
            bar.update(1)
            if time.monotonic() - last_save >= 60 * cfg["checkpoint_minutes"]:
                _sync(device)
                now = time.monotonic()
                elapsed += now - last_save
                loop_s += now - last_save
                _save(out_dir, state(done=False), _sampling_weights(unet, ema))
                last_save = time.monotonic()  # the write is not training time
        _sync(device)
        loop_s += time.monotonic() - last_save
    finally:  # also on Ctrl-C / SIGTERM turned KeyboardInterrupt: nothing trained is lost
        torch.backends.cudnn.benchmark = autotune
        bar.close()
        elapsed += time.monotonic() - last_save
        if clean and (step > first_step or saved_target != cfg["steps"]):
            _save(out_dir, state(done=step >= cfg["steps"]), _sampling_weights(unet, ema))
        elif not clean:
            print(f"interrupted inside step {step + 1}; resuming from the last checkpoint",
                  file=sys.stderr)
    return ckpt_path


def ids_fingerprint(ids: Sequence[str]) -> str:
    """A hash of a set of image ids, independent of order."""
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- leakage

def training_record(checkpoint: str | Path | Mapping) -> dict:
    """The non-weight part of a checkpoint (ids, fingerprint, step, leaky, config)."""
    if isinstance(checkpoint, Mapping):
        return {k: v for k, v in checkpoint.items() if k not in ("model", "optimizer", "ema",
                                                                 "lr_schedule")}
    return training_record(_load_checkpoint(_generator_file(Path(checkpoint))))


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
            f"(repeat_generator / `python -m mrilib synth train --real-frac X --seed r%G`)"
            + ("; for the leakage ablation pass allow_leaky=True" if record.get("leaky") else ""))


# ----------------------------------------------------------------------------- generators on disk

def generator_dir(train_ids: Sequence[str], labels: torch.Tensor, real_fraction: float | None,
                  seed: int, leaky: bool = False, **overrides) -> Path:
    """``cache/generators/<key>/`` for a generator of these images, X, seed and settings."""
    cfg = settings(DEFAULTS, PRESETS, **overrides)
    blob = json.dumps({"data": content_fingerprint(list(train_ids), labels.tolist(), CLASSES),
                       "real_fraction": None if leaky else real_fraction, "seed": int(seed),
                       "leaky": leaky, "settings": training_settings(cfg),
                       "diffusers": diffusers.__version__}, sort_keys=True)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:12]
    label = f"leaky-pool-s{seed}" if leaky else f"x{real_fraction:g}-s{seed}"
    return CACHE / "generators" / f"{label}-{digest}"


def repeat_generator(repeat: int, **overrides) -> int:
    """The generator (and real sample seed) that repeat ``repeat`` uses: ``repeat mod G``."""
    if repeat < 0:
        raise ValueError(f"repeat={repeat}: repeats are numbered from 0")
    return repeat % settings(DEFAULTS, PRESETS, **overrides)["n_generators"]


def generator_training_set(data, split, real_fraction: float, generator: int,
                           leaky: bool = False) -> torch.Tensor:
    """Indices into ``data`` a generator learns from: sample ``generator`` of X, or the pool."""
    return split.train.clone() if leaky else real_sample(data, split, real_fraction, generator)


def train_for_sample(data, split, real_fraction: float, generator: int, leaky: bool = False,
                     minutes: float | None = None, steps: int | None = None,
                     device: str | torch.device | None = None, progress: bool = True,
                     **overrides) -> Path:
    """Train or resume generator ``generator`` of real fraction X under cache/generators/."""
    index = generator_training_set(data, split, real_fraction, generator, leaky)
    ids = [data.ids[i] for i in index.tolist()]
    out = generator_dir(ids, data.labels[index], real_fraction, generator, leaky, **overrides)
    return train_generator(data.images[index], data.labels[index], generator, out,
                           minutes=minutes, steps=steps, ids=ids, leaky=leaky, device=device,
                           progress=progress, **overrides)


def trained_generator(data, split, real_fraction: float, generator: int, leaky: bool = False,
                      allow_unfinished: bool = False, **overrides) -> Path:
    """The generator.pt of a finished generator, or FileNotFoundError saying how to train it.

    Finished means trained for the ``steps`` in force: the folder key leaves ``steps`` out
    (a longer run extends the same generator), but results name the steps in force
    (:func:`design_settings`), so a shorter generator must be extended first
    (FileNotFoundError) and a longer one is refused (ValueError) rather than mislabelled.
    """
    index = generator_training_set(data, split, real_fraction, generator, leaky)
    ids = [data.ids[i] for i in index.tolist()]
    path = generator_dir(ids, data.labels[index], real_fraction, generator, leaky,
                         **overrides) / "generator.pt"
    command = (f"python -m mrilib synth train --real-frac {real_fraction:g} --seed {generator}"
               + (" --leaky" if leaky else "") + " --device cuda")
    if not path.exists():
        raise FileNotFoundError(f"no generator {generator} for real fraction {real_fraction:g} "
                                f"{'(leaky) ' if leaky else ''}at {path.parent}; train it with "
                                f"`{command}` (rerun until it says done)")
    # generator.pt alone decides (not meta.json), so that it is the one file to ship.
    record = training_record(path)
    if allow_unfinished:
        return path
    if not record["done"]:
        raise FileNotFoundError(f"generator at {path.parent} has trained {record['step']} of "
                                f"{record['target_steps']} steps; finish it with `{command}`")
    steps = settings(DEFAULTS, PRESETS, **overrides)["steps"]
    if record["target_steps"] < steps:
        raise FileNotFoundError(f"generator at {path.parent} was trained for "
                                f"{record['target_steps']} steps and the settings in force ask "
                                f"for {steps}; extend it with `{command}`")
    if record["target_steps"] > steps:
        raise ValueError(f"generator at {path.parent} was trained for {record['target_steps']} "
                         f"steps, more than the {steps} in force, which results would name; "
                         f"set steps={record['target_steps']} (diffusion DEFAULTS or the "
                         f"preset) to use it")
    return path


def _generator_file(path: Path) -> Path:
    """generator.pt for a folder, a checkpoint.pt beside one, or the file given."""
    if path.is_dir():
        path = path / "generator.pt"
    elif path.name == "checkpoint.pt" and (path.parent / "generator.pt").exists():
        path = path.parent / "generator.pt"
    if not path.exists():
        raise FileNotFoundError(f"no generator checkpoint at {path}; train one with "
                                f"`python -m mrilib synth train` or train_generator()")
    return path


# ----------------------------------------------------------------------------- the backend

class LocalDiffusion(Backend):
    """Variations from a trained generator checkpoint, SDEdit-style (see the module doc).

    Each output depends on (image, label, seed) only: its noise comes from a CPU
    ``torch.Generator`` seeded by its own seed, and DDIM with eta = 0 adds no other
    randomness. Across batch compositions the UNet's arithmetic may round differently
    (GEMM blocking depends on the batch size), so outputs agree to within one gray level
    in rare pixels rather than bit for bit; on one batch layout they are bitwise equal.
    With a model smaller than 128 px (the quick preset) sources are area-downscaled to
    its size and outputs bilinearly upscaled back to 128x128.

    ``strength``, ``ddim_steps``, ``guidance_scale``, ``guidance_rescale`` and
    ``sample_batch`` (``cpu_sample_batch`` on a CPU) default to the settings in force
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
                 guidance_rescale: float | None = None):
        path = _generator_file(Path(checkpoint))
        blob = _load_checkpoint(path)
        if not (blob["done"] or allow_unfinished):
            raise ValueError(f"the generator at {path.parent} has trained {blob['step']} of "
                             f"{blob['target_steps']} steps; finish it (rerun synth train) "
                             f"or pass allow_unfinished=True for a look at a partial model")
        self.cfg = blob["config"]
        now = settings(DEFAULTS, PRESETS)
        self.strength = float(now["strength"] if strength is None else strength)
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength={strength}: give a noise level in [0, 1] "
                             f"(0 = the source, 1 = a fresh sample of its class)")
        self.ddim_steps = int(ddim_steps or now["ddim_steps"])
        self.guidance_scale = float(now["guidance_scale"] if guidance_scale is None
                                    else guidance_scale)
        self.guidance_rescale = float(now["guidance_rescale"] if guidance_rescale is None
                                      else guidance_rescale)
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale={self.guidance_rescale:g}: give a share in "
                             f"[0, 1] (0 = plain guidance, 0.7 = Lin et al.'s)")
        self.null_class = null_class(self.cfg)
        if guidance_scale is None and self.guidance_scale != 1.0 and self.null_class is None:
            raise ValueError(
                f"the generator at {path.parent} was trained without class_dropout, so it "
                f"cannot sample with the default guidance_scale={self.guidance_scale:g} (it "
                f"has no class-free output to guide against): pass guidance_scale=1 "
                f"(--guidance 1) for the conditional model alone, or retrain it")
        if not self.guidance_scale >= 1.0 or (self.guidance_scale != 1.0
                                              and self.null_class is None):  # NaN too
            raise ValueError(
                f"guidance_scale={self.guidance_scale:g}: give 1 (the conditional model alone)"
                + (" or more" if self.null_class is not None else
                   f"; the generator at {path.parent} was trained without class_dropout, so "
                   f"it has no class-free output to guide against (retrain it to use > 1)"))
        self.device = resolve_device(device)
        self.max_batch = int(sample_batch or now["cpu_sample_batch" if self.device.type == "cpu"
                                                 else "sample_batch"])
        self.path = path
        # The real sample this generator belongs to (mixing draws the same one); None for
        # a generator built outside the repeat scheme.
        self.sample_seed = sample_seed
        self.training_record = training_record(blob)
        self.unet = build_unet(self.cfg)
        self.unet.load_state_dict(blob["model"])
        self.unet.to(self.device).eval().requires_grad_(False)
        self.weights_sha1 = _weights_hash(blob["model"])
        self.scheduler = sample_scheduler(self.cfg)

    @classmethod
    def for_repeat(cls, data, split, real_fraction: float, repeat: int, leaky: bool = False,
                   **kwargs) -> "LocalDiffusion":
        """The backend of repeat ``repeat``: generator ``repeat mod G`` of real fraction X."""
        g = repeat_generator(repeat)
        path = trained_generator(data, split, real_fraction, g, leaky=leaky,
                                 allow_unfinished=kwargs.get("allow_unfinished", False))
        return cls(path, sample_seed=g, **kwargs)

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
        if guiding:  # one UNet call for both: the batch with its classes, then without
            cls = torch.cat([cls, torch.full_like(cls, self.null_class)])
        for t in timesteps:
            with _autocast(self.device):
                inp = torch.cat([x, x]) if guiding else x
                out = self.unet(inp, t.to(self.device), class_labels=cls).sample.float()
            if guiding:  # eps or v alike: both are linear in the score
                out = guided(*out.chunk(2), self.guidance_scale, self.guidance_rescale)
            x = self.scheduler.step(out, t, x).prev_sample
        return to_uint8_128(x)


def _weights_hash(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for name in sorted(state):
        h.update(name.encode())
        flat = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- benchmark

def benchmark(device: str | torch.device | None = None, n_train_steps: int = 50,
              n_variations: int = 1000, **overrides) -> dict:
    """Training images/s and variations/s of the settings in force, on random 128x128 slices.

    Warm-up runs come first (CUDA context, kernel choice); the training time is that of
    the hot loop alone (no checkpoint writes). Random images: speed does not depend on
    content.
    """
    device = resolve_device(device)
    cfg = settings(DEFAULTS, PRESETS, **overrides)
    g = torch.Generator().manual_seed(0)
    n = max(cfg["batch_size"], 64)
    images = torch.randint(0, 256, (n, 1, SIZE, SIZE), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % len(CLASSES)
    ids = [f"bench{i}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        for total in (2, 2 + n_train_steps):
            train_generator(images, labels, 0, tmp, steps=total, ids=ids, device=device,
                            progress=False, **overrides)
        timed = json.loads((Path(tmp) / "meta.json").read_text())["last_call"]
        backend = LocalDiffusion(tmp, device=device, allow_unfinished=True,
                                 **{k: cfg[k] for k in (*_SAMPLING, "sample_batch")})
        src, lab = images[torch.arange(n_variations) % n], labels[torch.arange(n_variations) % n]
        warm = min(n_variations, backend.max_batch)
        backend.generate(src[:warm], lab[:warm], list(range(warm)))
        _sync(device)
        t0 = time.perf_counter()
        backend.generate(src, lab, list(range(n_variations)))
        _sync(device)
        sample_s = time.perf_counter() - t0
    steps_per_s = timed["steps"] / timed["loop_seconds"]
    return {"device": _device_name(device), "torch": str(torch.__version__),
            "diffusers": diffusers.__version__,
            "train_images_per_s": steps_per_s * cfg["batch_size"],
            "train_steps_per_s": steps_per_s,
            "minutes_for_default_steps": cfg["steps"] / steps_per_s / 60,
            "variations_per_s": n_variations / sample_s,
            "seconds_per_1000_variations": 1000 * sample_s / n_variations,
            "strength": backend.strength, "ddim_steps": backend.ddim_steps,
            "guidance_scale": backend.guidance_scale,
            "guidance_rescale": backend.guidance_rescale,
            "settings": training_settings(cfg) | {"steps": cfg["steps"]},
            # they apply to training only: sampling runs as it always does
            "training_speed_settings": {k: cfg[k] for k in ("channels_last", "cudnn_benchmark")}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
