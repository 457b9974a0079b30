"""The local generator's recipe: its settings, what changes its results, its building blocks.

A class-conditional diffusers ``UNet2DModel`` (one class embedding per diagnosis, one
more for "no class"), trained with ``DDPMScheduler`` (v-prediction on a zero-terminal-SNR
schedule, MSE) on slices scaled to [-1, 1], sampled with DDIM. :mod:`.diffusion_training`
trains it, :mod:`.diffusion` samples it and finds it on disk.
"""
from __future__ import annotations

from typing import Mapping

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from ..config import design_view, settings
from ..data import CLASSES
from .base import SIZE

DEFAULTS = {
    # --- model (diffusers UNet2DModel) ---
    "image_size": 128,  # px per side the UNet works at; 128 = the thesis's size, no resizing
    # 6.3M parameters, small on purpose: its bf16 weights must fit a 16 MiB file, and
    # ~1,400 slices need little capacity (docs/decisions.md#local-generator).
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
    # Zero terminal SNR (Lin et al. 2024), so fresh samples are not painted grey; epsilon is
    # undefined at SNR 0, hence v-prediction (docs/decisions.md#local-generator).
    "rescale_betas_zero_snr": True,
    "prediction_type": "v_prediction",  # "epsilon" (DDPM) or "v_prediction" (Salimans & Ho)
    # Share of training images shown as "no class", so one model also learns the class-free
    # output that guidance pushes away from (Ho & Salimans 2022: 0.1).
    "class_dropout": 0.1,
    # --- training ---
    "steps": 4000,  # optimizer steps in all (~180 passes over a 30% sample at batch 64),
    # sized for about 5 minutes of one GPU (docs/decisions.md#local-generator)
    "batch_size": 64,  # images per step
    "lr": 1e-4,  # AdamW, constant after warmup (diffusers' DDPM recipe)
    "warmup_steps": 200,  # linear warmup from 0, in steps
    "weight_decay": 1e-6,  # diffusers' unconditional-DDPM example
    "grad_clip": 1.0,  # max grad norm, keeps early steps of the bf16 run stable
    # Left-right flips: slices are near-symmetric, and with ~1,400 training images twice
    # the views lowers the risk of the generator memorizing its sources.
    "hflip": True,
    # Samples come from an EMA of the weights (visibly cleaner); its warmup makes it usable
    # in a short run, where a fixed 0.9999 would still be mostly the random init.
    "ema": True,
    "ema_max_decay": 0.9999,
    "ema_power": 0.75,  # reaches decay 0.999 at 10k steps (crowsonkb's short-run value)
    # --- speed (RUN_ONLY): off until `synth bench --levers` shows they pay ---
    "channels_last": False,  # NHWC activations and weights, the layout tensor cores want
    "cudnn_benchmark": False,  # let cuDNN time its convolution algorithms and keep the best
    # torch.compile of the UNet (inductor): fuses GroupNorm, SiLU and adds, which move most
    # of the step's memory; the first call pays the compile (about a minute on a GPU).
    "compile_train": False,
    "compile_sample": False,  # the same for sampling (its own graph, compiled once more)
    # --- bookkeeping (RUN_ONLY) ---
    "checkpoint_minutes": 2.0,  # wall minutes between checkpoints during training
    "log_every": 50,  # steps between loss readings (each one syncs the GPU)
    # --- sampling (SAMPLING) ---
    "strength": 0.6,  # SDEdit noise level of a variation: 0 = the source, 1 = a fresh sample
    "ddim_steps": 50,  # DDIM steps for strength 1; a variation runs strength x ddim_steps
    # Guidance weight w: uncond + w (cond - uncond); 1 = the conditional model alone. 4 is
    # the smallest w measured to keep the classes (docs/decisions.md#local-generator).
    "guidance_scale": 4.0,
    # With zero terminal SNR guidance over-exposes: this share of the output is rescaled to
    # the class output's spread (Lin et al. 2024, sec. 3.4: 0.7); used when w > 1.
    "guidance_rescale": 0.7,
    "sample_batch": 256,  # sources per UNet call (x2 with guidance): GPU memory, not results
    # The same on a CPU, where a batch buys no speed and is what an interrupted run loses
    # (the cache stores whole batches): 4 guided variations take minutes there.
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
        "ddim_steps": 4,
        "sample_batch": 16,
        "cpu_sample_batch": 16,  # a tiny model: a batch takes well under a second
    },
}

# How a run is checkpointed, logged, laid out in memory, compiled and batched: the same
# weights and images whatever they are, up to float rounding (docs/decisions.md#local-generator).
RUN_ONLY = ("checkpoint_minutes", "log_every", "sample_batch", "cpu_sample_batch",
            "channels_last", "cudnn_benchmark", "compile_train", "compile_sample")
# What a variation depends on besides the weights: read from the settings in force when a
# backend is built (not from the checkpoint), so one generator serves any of them.
SAMPLING = ("strength", "ddim_steps", "guidance_scale", "guidance_rescale")


def weights_settings(cfg: Mapping) -> dict:
    """What a generator's weights depend on besides its images and seed: its folder's key.

    ``steps`` is left out too: a longer run extends the same generator.
    """
    return design_view(cfg, (*RUN_ONLY, *SAMPLING, "steps"))


def design_settings(**overrides) -> dict:
    """What the images of a generator trained now depend on, besides its training images.

    The settings in force less :data:`RUN_ONLY` (its weights' settings, its ``steps`` and
    :data:`SAMPLING`), and the diffusers version: the generator half of a synthetic
    cell's design in the grid.
    """
    cfg = settings(DEFAULTS, PRESETS, **overrides)
    return {**design_view(cfg, RUN_ONLY), "diffusers": diffusers.__version__}


# ----------------------------------------------------------------------------- building blocks

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


def compiled(unet: UNet2DModel, on: bool):
    """``unet`` compiled by torch.compile when ``on``, else ``unet`` itself.

    The caller keeps ``unet`` for its weights (a compiled wrapper's state_dict names them
    differently); a new UNet of the same shapes reuses the graph compiled for the first.
    """
    return torch.compile(unet) if on else unet


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
    # "trailing" starts at t = T-1, so strength 1 really starts from noise ("leading" never
    # visits the last 20 timesteps); Lin et al. ask for it with zero terminal SNR too.
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
