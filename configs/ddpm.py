"""DDPM baseline: the one-segment segmented denoiser every method compares against.

Presets (``--config=configs/ddpm.py:<preset>``):

* ``digits``     tiny, minutes on 2 CPU cores: sklearn's bundled 8x8 digits at their native 8x8.
* ``shapes``     the procedural RGB dataset at 32x32, class-conditional on the shape.
* ``cifar10``    IDDPM (Nichol & Dhariwal 2021) CIFAR-10 model: 128 ch, mult (1,2,2,2), 3 res blocks,
                 attention at 16 and 8, dropout 0.3, T=4000 cosine, hybrid loss, lr 1e-4, batch 128.
* ``imagenet64`` IDDPM ImageNet-64 model: 128 ch, mult (1,2,3,4), 3 res blocks, attention at 16 and 8,
                 T=4000 cosine, hybrid loss, lr 1e-4, batch 128 (class-unconditional, as in the paper).
* ``celeba64`` / ``ffhq64``  the ImageNet-64 architecture on 64x64 faces (IDDPM has no face model;
                 this is our choice, see WORKSPACE.md).

Every field can be overridden from the command line, e.g. ``--config.total_steps=100``.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every preset and, field for field, by every method's config."""
  c = ml_collections.ConfigDict()
  c.method = "ddpm"  # the shared binaries import the method's hooks by this name
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 64  # global, over all devices and hosts
  c.log_every_steps = 50
  c.ckpt_every_steps = 500
  c.sample_every_steps = 1000
  c.keep_checkpoints = 3
  c.ema_decay = 0.9999
  c.num_sample_images = 64

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: every device not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.model = 1

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.num_timesteps = 1000
  c.diffusion.schedule = "linear"  # linear | cosine
  c.diffusion.parameterization = "eps"  # eps | x0 | v
  c.diffusion.loss = "simple"  # simple | hybrid (learned sigma, L_simple + vlb_weight * L_vlb)
  c.diffusion.vlb_weight = 0.001
  c.diffusion.min_snr_gamma = 0.0  # 0 disables min-SNR-gamma weighting
  c.diffusion.cond_drop_prob = 0.0  # classifier-free guidance training dropout of the label
  c.diffusion.sampler = "ddim"  # ddpm | ddim
  c.diffusion.sample_steps = 50  # respaced steps; num_timesteps for the full chain
  # uniform: N even t, T-1 included (IDDPM's "N") | ddim: the DDIM paper's grid (IDDPM's "ddimN")
  c.diffusion.timestep_spacing = "uniform"
  c.diffusion.ddim_eta = 0.0
  c.diffusion.guidance_scale = 1.0  # 1.0 = plain conditional sampling
  c.diffusion.clip_denoised = True
  # How clip_denoised bounds x0_hat: static (clip to [-1, 1]) | dynamic (Imagen's dynamic
  # thresholding at this percentile of |x0_hat|, the official CollaFuse sampler's)
  c.diffusion.x0_clipping = "static"
  c.diffusion.dynamic_threshold_percentile = 0.95

  c.model = ml_collections.ConfigDict()
  c.model.name = "unet"
  c.model.channels = (32, 64)  # per resolution level, explicit so levels can be pruned
  c.model.num_res_blocks = 2
  c.model.attention_resolutions = (8,)
  c.model.num_heads = 4
  c.model.num_head_channels = -1  # >0 overrides num_heads with width // num_head_channels
  c.model.dropout = 0.0
  c.model.class_conditional = False
  c.model.use_scale_shift_norm = True
  c.model.resblock_updown = True
  c.model.norm_group_size = 0  # 0: gcd(32, width) GroupNorm groups; > 0: groups of this size
  c.model.time_embed_channels = 0  # 0: channels[0] (IDDPM's model_channels)
  c.model.base_channels = ()  # a pruned network's unpruned widths; () = its own
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # digits | shapes | array_record
  c.data.resolution = 16
  c.data.data_dir = ""  # array_record only: a directory written by common.data.prepare
  c.data.num_examples = 0  # shapes only: how many images to generate (0 = dataset default)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adam | adamw
  c.optimizer.learning_rate = 2e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.warmup_steps = 0
  c.optimizer.grad_clip_norm = 1.0  # 0 disables clipping
  return c


def _iddpm(c, *, mults, dropout, resolution):
  c.diffusion.num_timesteps = 4000
  c.diffusion.schedule = "cosine"
  c.diffusion.loss = "hybrid"
  c.diffusion.sampler = "ddpm"
  c.diffusion.sample_steps = 100
  c.model.channels = tuple(128 * m for m in mults)
  c.model.num_res_blocks = 3
  c.model.attention_resolutions = (16, 8)
  c.model.num_heads = 4
  c.model.dropout = dropout
  # IDDPM resamples with plain convs; BigGAN-style up/down res blocks came later (ADM) and add ~8%
  # parameters (57.1M vs 52.5M on CIFAR-10).
  c.model.resblock_updown = False
  c.data.resolution = resolution
  c.batch_size = 128
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-4
  c.optimizer.grad_clip_norm = 0.0
  c.ema_decay = 0.9999
  c.log_every_steps = 100
  c.ckpt_every_steps = 5000
  c.sample_every_steps = 20000
  return c


def get_config(preset: str = "digits") -> ml_collections.ConfigDict:
  """Returns the config for ``preset``; see the module docstring for the list."""
  c = base_config()
  if preset == "digits":
    # The digits are 8x8 natively; upsampling adds pixels, not information, and quadruples the
    # cost (2.7e10 vs 6.0e9 FLOPs per step at batch 64, benchmarks/RESULTS.md).
    c.data.name = "digits"
    c.data.resolution = 8
    c.model.channels = (32, 64)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (4,)
    c.diffusion.num_timesteps = 1000
    c.diffusion.schedule = "cosine"
    c.batch_size = 64
    c.total_steps = 2000
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.ema_decay = 0.995
    c.log_every_steps = 100
    c.ckpt_every_steps = 500
    c.sample_every_steps = 1500
  elif preset == "shapes":
    c.data.name = "shapes"
    c.data.resolution = 32
    c.model.channels = (64, 128, 128)
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (8,)
    c.model.class_conditional = True
    c.diffusion.cond_drop_prob = 0.1
    c.diffusion.guidance_scale = 2.0
    c.diffusion.schedule = "cosine"
    c.batch_size = 64
    c.total_steps = 20000
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 500
    c.ema_decay = 0.999
    c.log_every_steps = 100
    c.ckpt_every_steps = 1000
    c.sample_every_steps = 5000
  elif preset == "cifar10":
    _iddpm(c, mults=(1, 2, 2, 2), dropout=0.3, resolution=32)
    c.data.name = "array_record"
    c.data.data_dir = "data/cifar10"
    c.total_steps = 500_000
  elif preset in ("imagenet64", "celeba64", "ffhq64"):
    _iddpm(c, mults=(1, 2, 3, 4), dropout=0.0, resolution=64)
    c.data.name = "array_record"
    c.data.data_dir = f"data/{preset}"
    c.total_steps = 1_500_000 if preset == "imagenet64" else 500_000
  else:
    raise ValueError(
      f"configs/ddpm.py: unknown preset {preset!r}; "
      "allowed: digits, shapes, cifar10, imagenet64, celeba64, ffhq64"
    )
  return c
