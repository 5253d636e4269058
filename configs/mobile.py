"""Tokenization-free on-device diffusion (arXiv 2411.06119): TFDiff over the shared DDPM trainer.

Presets (``--config=configs/mobile.py:<preset>``); "config1" is the paper's Configuration I
(initial conv stride s=2, pixel-shuffle head), "config2" Configuration II (s=1):

* ``digits_config1`` / ``digits_config2``  the spec's small-scale reproduction (§6): sklearn's 8x8
    digits, D=64, N=6, 4 heads, r=4, k=3, unconditional, T=200 cosine, eps, AdamW 1e-3 with a
    cosine decay, batch 32, 1,500 steps, DDIM-50. Minutes on 2 CPU cores.
* ``shapes_config1`` / ``shapes_config2``  the procedural RGB shapes at 32x32, class-conditional with
    classifier-free guidance, D=128, N=8.
* ``celeba64_config1`` / ``celeba64_config2``  the likely paper protocol (spec §3, U-ViT's CelebA-64
    recipe): unconditional CelebA 64x64 from ``data/celeba64``, D=512, N=12, 8 heads, AdamW 2e-4,
    wd 0.03, betas (0.99, 0.99), 5k warm-up, batch 128, 500k steps, EMA 0.9999, 1000-step ancestral
    sampling. The paper's own D, N, heads and recipe were not available (spec §7): every one is a
    field below.
* ``cifar10``  class-conditional CIFAR-10 32x32 (``data/cifar10``) with classifier-free guidance
    (label dropout 0.1, guidance scale 1 + w = 2), Configuration I, D=512, N=12.

The tokenized arm (``model.name = "uvit"``, ``mobile/uvit.py``: U-ViT, Bao et al. 2023), trained
by the same digits recipe as ``digits_config*`` so only the network differs:

* ``digits_uvit_params1`` / ``digits_uvit_flops1``  patch 2 (a 4x4 token grid, Config I's L=16),
    sized at Config I's parameter count / FLOPs per call.
* ``digits_uvit_params2`` / ``digits_uvit_flops2``  patch 1 (8x8 tokens, Config II's L=64), sized
    at Config II's parameter count / FLOPs per call.
* ``digits_uvit_tiny``  D=16, N=3, 2 training steps: for tests.
* ``celeba64_uvit``  U-ViT-S/4 (D=512, 13 blocks, 8 heads) with U-ViT's CelebA-64 recipe, as
    ``celeba64_config*``.

Every field can be overridden: ``--config.model.stride=1 --config.model.depth=8``.
"""

import ml_collections

from configs import ddpm


def base_config() -> ml_collections.ConfigDict:
  """The shared fields of ``configs.ddpm.base_config`` plus TFDiff's knobs (spec §2.2)."""
  c = ddpm.base_config()
  c.method = "mobile"

  m = c.model
  m.name = "tfdiff"
  m.width = 64  # D, the width of every core block
  m.depth = 6  # N, the number of identical core blocks
  m.num_heads = 4  # (shared key) D must be divisible by it
  m.stride = 2  # s of the initial conv: 2 = Configuration I, 1 = Configuration II
  m.mlp_ratio = 4  # r
  m.stem_kernel = 3  # k: overlapping window (a ViT patchify would be k = s)
  m.stem_extra_conv = False  # an extra 3x3 conv + GELU after the stem
  m.head_kernel = 3
  m.upsample = "pixel_shuffle"  # s > 1: pixel_shuffle | convT | resize_conv
  m.cond_dim = 0  # D_c (0: D)
  m.time_freq_dim = 256  # sinusoidal timestep features
  m.attention = "full"  # full | linear
  m.ffn_dwconv = True  # depthwise 3x3 conv inside the FFN (the only in-block spatial mixing)
  m.conditioning = "adaln"  # adaln (adaLN-Zero) | add
  m.pos_emb = "none"  # none | learned (ablation: a table at data.resolution)
  m.share_core_weights = False  # one block's weights reused N times
  m.long_skips = False  # U-ViT-style long skips (N even)
  m.text_cond = "none"  # cross-attention to text tokens: not implemented (no text data here)
  m.layer_loop = "scan"  # scan | unroll: how the N stacked blocks run (same parameters)
  m.dropout = 0.0  # (shared key) TFDiff has no dropout

  c.optimizer.schedule = "cosine"  # constant | cosine (warm-up, then cosine decay to 0)
  return c


def _digits(c, stride):
  c.data.name = "digits"
  c.data.resolution = 8
  c.model.stride = stride
  c.model.width = 64
  c.model.depth = 6
  c.model.num_heads = 4
  c.diffusion.num_timesteps = 200
  c.diffusion.schedule = "cosine"
  c.diffusion.sampler = "ddim"
  c.diffusion.sample_steps = 50
  # Batch 32 and 1,500 steps: on 2 shared CPU cores Config I takes ~0.16 s a step and Config II
  # ~0.6 s (the s=1 stack works on 4x the positions), so the pair trains in ~20 minutes.
  c.batch_size = 32
  c.total_steps = 1500
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.0
  c.optimizer.warmup_steps = 100
  c.ema_decay = 0.995
  c.log_every_steps = 100
  c.ckpt_every_steps = 500
  c.sample_every_steps = 1500


def _shapes(c, stride):
  c.data.name = "shapes"
  c.data.resolution = 32
  c.model.stride = stride
  c.model.width = 128
  c.model.depth = 8
  c.model.num_heads = 4
  c.model.class_conditional = True
  c.diffusion.num_timesteps = 1000
  c.diffusion.schedule = "cosine"
  c.diffusion.cond_drop_prob = 0.1
  c.diffusion.guidance_scale = 2.0
  c.batch_size = 64
  c.total_steps = 20_000
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 500
  c.ema_decay = 0.999
  c.log_every_steps = 100
  c.ckpt_every_steps = 1000
  c.sample_every_steps = 5000


def _uvit_recipe(c):
  # U-ViT's official CelebA-64 recipe (configs/celeba64_uvit.py), spec §3: the likely protocol.
  c.model.width = 512
  c.model.depth = 12
  c.model.num_heads = 8
  c.diffusion.num_timesteps = 1000
  c.diffusion.schedule = "linear"
  c.batch_size = 128
  c.total_steps = 500_000
  c.optimizer.name = "adamw"
  c.optimizer.schedule = "constant"
  c.optimizer.learning_rate = 2e-4
  c.optimizer.weight_decay = 0.03
  c.optimizer.b1, c.optimizer.b2 = 0.99, 0.99
  c.optimizer.warmup_steps = 5000
  c.optimizer.grad_clip_norm = 0.0
  c.ema_decay = 0.9999
  c.log_every_steps = 100
  c.ckpt_every_steps = 5000
  c.sample_every_steps = 20_000


def _uvit(c, *, patch_size, width, depth, num_heads):
  """The U-ViT baseline's network (``mobile.uvit``); U-ViT's CIFAR-10 / CelebA choices.

  Its own fields are added here, not in ``base_config``: a TFDiff run's saved config then stays
  field for field what it was, and a resume compares every field.
  """
  m = c.model
  m.name = "uvit"
  m.patch_size = patch_size  # p: the patch embedding's kernel = stride
  m.width = width
  m.depth = depth  # all blocks, odd: (N-1)/2 in, 1 mid, (N-1)/2 out (U-ViT's depth=12 is 13)
  m.num_heads = num_heads
  m.mlp_ratio = 4
  m.qkv_bias = False
  m.time_mlp = False  # U-ViT: an MLP on the time features only for ImageNet
  m.final_conv = True  # the 3x3 conv after un-patchifying
  m.long_skips = True  # concat + Linear(2D -> D) from block i to block N-1-i
  m.pos_emb = "learned"  # learned | none (ablation)


# Measured with `python -m mobile.sizes` (XLA cost analysis of one call at batch 1, every block
# counted; FLOPs per sample are 50x these, DDIM-50). TFDiff for reference: Config I 495,364 params,
# 1.119e7 FLOPs a call; Config II 493,633 params, 4.853e7. (params, FLOPs a call) of each preset:
_UVIT_DIGITS = {
  # Config I's width and heads; 9 blocks: 482,958 params (-2.5%), 1.965e7 FLOPs (1.76x).
  "digits_uvit_params1": dict(patch_size=2, width=64, depth=9, num_heads=4),
  # 5 blocks: 267,278 params (0.54x), 1.087e7 FLOPs (-2.9%).
  "digits_uvit_flops1": dict(patch_size=2, width=64, depth=5, num_heads=4),
  # 485,643 params (-1.6% of Config II), 8.270e7 FLOPs (1.70x).
  "digits_uvit_params2": dict(patch_size=1, width=64, depth=9, num_heads=4),
  # D=64 would give -5.8%; D=66, 3 heads: 286,847 params (0.58x), 4.816e7 FLOPs (-0.8%).
  "digits_uvit_flops2": dict(patch_size=1, width=66, depth=5, num_heads=3),
  # 10,686 params, 6.321e5 FLOPs a call.
  "digits_uvit_tiny": dict(patch_size=2, width=16, depth=3, num_heads=2),
}


# Config I's training compute (1,500 steps x 32 images x its 1.119e7 FLOPs a call) at the U-Net's
# 1.753e7 FLOPs a call (`python -m mobile.sizes digits_config1 digits_unet`): 1,500 x 1.119 / 1.753.
DIGITS_UNET_STEPS = 958


def get_config(preset: str = "digits_config1") -> ml_collections.ConfigDict:
  """Returns the config for ``preset``; see the module docstring for the list."""
  c = base_config()
  if preset in ("digits_config1", "digits_config2"):
    _digits(c, stride=1 if preset.endswith("2") else 2)
  elif preset in ("shapes_config1", "shapes_config2"):
    _shapes(c, stride=1 if preset.endswith("2") else 2)
  elif preset in ("celeba64_config1", "celeba64_config2"):
    _uvit_recipe(c)
    c.model.stride = 1 if preset.endswith("2") else 2
    c.data.name = "array_record"
    c.data.data_dir = "data/celeba64"
    c.data.resolution = 64
    # U-ViT samples CelebA with a 1000-step Euler-Maruyama SDE solver; the ancestral DDPM chain
    # over all 1000 steps is the discrete counterpart.
    c.diffusion.sampler = "ddpm"
    c.diffusion.sample_steps = 1000
  elif preset == "cifar10":
    _uvit_recipe(c)
    c.model.stride = 2
    c.model.class_conditional = True
    c.data.name = "array_record"
    c.data.data_dir = "data/cifar10"
    c.data.resolution = 32
    c.diffusion.cond_drop_prob = 0.1
    c.diffusion.guidance_scale = 2.0  # 1 + w with w = 1: eps = (1 + w) eps(y) - w eps(null)
    c.diffusion.sampler = "ddim"
    c.diffusion.sample_steps = 50
  elif preset in _UVIT_DIGITS:
    _digits(c, stride=2)
    _uvit(c, **_UVIT_DIGITS[preset])
    if preset == "digits_uvit_tiny":
      c.diffusion.num_timesteps = 20
      c.diffusion.sample_steps = 3
      c.batch_size = 8
      c.total_steps = 2
      c.optimizer.warmup_steps = 1
      c.log_every_steps = 1
      c.ckpt_every_steps = 2
      c.sample_every_steps = 0
      c.num_sample_images = 4
  elif preset == "digits_unet":
    # The convolutional arm of M7: the U-Net of ddpm.py:digits narrowed to (24, 48), 466,153
    # params (Config I: 495,364), trained by the same recipe for Config I's training compute.
    _digits(c, stride=2)
    m = c.model
    m.name = "unet"
    m.channels = (24, 48)
    m.num_res_blocks = 1
    m.attention_resolutions = (4,)
    c.total_steps = DIGITS_UNET_STEPS
  elif preset == "celeba64_uvit":
    c = get_config("celeba64_config1")
    # U-ViT-S/4 (configs/celeba64_uvit_small.py): 44,292,228 params (the paper's "44 M"),
    # 2.493e10 FLOPs a call (TFDiff celeba64_config1: 57,950,220 params, 1.046e11: 4.2x).
    _uvit(c, patch_size=4, width=512, depth=13, num_heads=8)
  else:
    raise ValueError(
      f"configs/mobile.py: unknown preset {preset!r}; allowed: digits_config1, digits_config2, "
      "shapes_config1, shapes_config2, celeba64_config1, celeba64_config2, cifar10, "
      + ", ".join(_UVIT_DIGITS)
      + ", digits_unet, celeba64_uvit"
    )
  return c
