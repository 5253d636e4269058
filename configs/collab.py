"""CollaFuse (arXiv 2406.14429): K clients with private data, one shared server, cut point
``collab.cut_point`` (the paper's t_ζ).

Presets (``--config=configs/collab.py:<preset>``):

* ``digits``   K=5 clients holding two digit classes each (client k: {2k, 2k+1}), 8x8, T=100
               cosine, eps, min-SNR gamma=5, Adam 1e-3 (0.9, 0.99), class-conditional with label
               dropout 0.1; the spec's small-scale reproduction (§11). Minutes on a CPU.
* ``shapes``   K=4 clients split by colour attribute (two colours each), 32x32 RGB.
* ``celeba64`` the paper's setting as far as it is known (§4, §7): 5 attribute-group clients at
               64x64 from a prepared CelebA directory, T=1000 cosine, min-SNR gamma=5, Adam 1e-3
               (0.9, 0.99), batch 50 per client, 18k steps (1,800 epochs x 10), cut ratio 0.2.
               Each of the six networks is our ADM U-Net at the size of the official code's
               EfficientUNet: widths (32, 64, 128, 256), res blocks (2, 4, 8, 8), attention at
               levels 2-4 with 8 heads. Substitution: the T5 text condition of the official code
               is replaced by the class id of the prepared data's label (see WORKSPACE.md).
* ``cifar10``  K=5 clients by class (two classes each), 32x32 (attention at 16, 8, 4), otherwise
               as celeba64.

``batch_size`` is per client: a step reads K * batch_size images. CollaFuse's own fields are under
``collab.*`` (the shared ones, ``batch_size``, ``model.*``, ``diffusion.*``, ... where every method
keeps them); every field can be overridden: ``--config.collab.num_clients=5
--config.collab.cut_point=20``. ``RENAMED`` maps the top-level names these fields had before
(``--config.cut_point``) to their place now; ``collab.train`` and ``collab.sweep`` answer an old
command line with the new name.
"""

import ml_collections

from configs import ddpm


def collab_fields() -> ml_collections.ConfigDict:
  """CollaFuse's own fields (``config.collab``), at the digits preset's values."""
  c = ml_collections.ConfigDict()
  c.num_clients = 5
  # The paper's t_ζ: the clients own levels 1..cut_point (the low-noise steps), the server
  # levels cut_point + 1..T.
  c.cut_point = 20
  c.server_noising = "ratio"  # ratio (marginal-consistent, spec §2.3) | full (official code, §2.1)
  # ratio only: sample the server's half on the global chain with its noise estimate rescaled
  # (x0_hat clipped; "global") or with the rebased chain's unclipped posterior ("rebased", §2.3).
  c.server_sampling_chain = "global"
  # none | code (the client starts at the official code's offset cut_point + cut_point (1 - c))
  c.client_start_offset = "none"
  c.share_labels = True  # the server also receives the labels (as in the official code)
  c.partition = "by_class"  # iid | by_class | dirichlet | by_attribute
  c.classes_per_client = 2
  c.dirichlet_alpha = 0.5
  c.partition_attribute = ""  # by_attribute: an attribute name of the dataset (shapes: colour)
  # How the K client steps are laid out in the compiled step (common.train.parties): vmap, all
  # clients in one batched step (accelerators); scan, a loop over the clients that compiles one
  # client's network (XLA:CPU, where vmapped weight-gradient convs are ~40x slower); unroll, the
  # K steps written out (K networks to compile; the same sums as scan, rounded alike in the
  # tests). All three train the same stacked parameter tree, and a resume may change it.
  c.client_loop = "vmap"
  # The mesh axis the client axis of the stacked client tree is split over (K divisible by its
  # size; otherwise, or with "", the FSDP rule): 100 clients on a slice is --config.mesh.data=N.
  c.client_mesh_axis = "data"
  return c


# Where each field of ``collab_fields`` lived before it moved under ``collab.*`` (issue 21): the
# old top-level name -> the new dotted one. Read by ``collab.fields`` (old command lines, runs
# saved with the old layout).
RENAMED = {name: f"collab.{name}" for name in collab_fields()}


def _shared(c: ml_collections.ConfigDict) -> None:
  """The fields every preset shares (the official code's settings)."""
  c.diffusion.schedule = "cosine"
  c.diffusion.min_snr_gamma = 5.0
  c.diffusion.cond_drop_prob = 0.1
  c.diffusion.guidance_scale = 1.0
  c.model.class_conditional = True
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.99
  c.optimizer.grad_clip_norm = 0.0
  c.optimizer.warmup_steps = 0


def _digits(c: ml_collections.ConfigDict) -> None:
  c.collab.client_loop = "scan"
  c.data.name = "digits"
  c.data.resolution = 8
  # Six networks train at once (five clients and the server), so each is the small end of the
  # spec's "tiny conv U-Net" (§11): 16/32 channels, no attention; 2.7x faster than ddpm's
  # digits net (32/64 with attention at 4) on a CPU.
  c.model.channels = (16, 32)
  c.model.num_res_blocks = 1
  c.model.attention_resolutions = ()
  c.diffusion.num_timesteps = 100
  c.diffusion.sample_steps = 100
  c.diffusion.sampler = "ddpm"
  c.batch_size = 32
  # 0.76 s a step on 2 CPU cores (K=5: ten U-Net updates); the server gets 5 x 600 updates.
  c.total_steps = 600
  c.ema_decay = 0.99
  c.log_every_steps = 50
  c.ckpt_every_steps = 200
  c.sample_every_steps = 600
  c.num_sample_images = 40


def _shapes(c: ml_collections.ConfigDict) -> None:
  c.collab.num_clients = 4
  c.collab.partition = "by_attribute"
  c.collab.partition_attribute = "colour"
  c.data.name = "shapes"
  c.data.resolution = 32
  c.model.channels = (64, 128, 128)
  c.model.attention_resolutions = (8,)
  c.diffusion.num_timesteps = 1000
  c.collab.cut_point = 200
  c.batch_size = 32
  c.total_steps = 20_000
  c.ema_decay = 0.999
  c.log_every_steps = 100
  c.ckpt_every_steps = 1000
  c.sample_every_steps = 5000


def _paper_scale(c: ml_collections.ConfigDict, preset: str) -> None:
  """celeba64 and cifar10: the official code's network size and training settings."""
  c.data.name = "array_record"
  c.data.data_dir = f"data/{preset}"
  c.data.resolution = 64 if preset == "celeba64" else 32
  # Every network (server and each client) is our ADM U-Net at the size of the official code's
  # imagen-pytorch EfficientUNet (SimeonAllmendinger/collafuse_imagen,
  # configs/model/config_efficient_unet.yaml, UNET_64): dim 32 x mults (1, 2, 4, 8), res blocks
  # (2, 4, 8, 8) per level, self-attention at levels 2-4 (and the bottleneck), 8 heads. Our
  # attention splits the level's own width into the 8 heads (EfficientUNet projects to
  # 8 x 64 = 512 at every level) and follows every res block at those resolutions (EfficientUNet:
  # one transformer block per level); its encoder runs at the previous level's width; its
  # cross-embed stem, pixel-shuffle upsampling, T5 cross-attention and GroupNorm(8) are not
  # followed (WORKSPACE.md, collab substitutions). 46,217,475 parameters a network at celeba64
  # with 5 classes, 277,304,850 for all six (tests/collab/test_collab_presets.py); EfficientUNet:
  # 43,199,432, of which 34,806,720 outside its text conditioning
  # (benchmarks/efficientunet_params.py).
  c.model.channels = (32, 64, 128, 256)
  with c.model.ignore_type():  # per-level res blocks: the field is an int in the base config
    c.model.num_res_blocks = (2, 4, 8, 8)
  r = c.data.resolution
  c.model.attention_resolutions = (r // 2, r // 4, r // 8)  # levels 2-4: 32, 16, 8 at 64x64
  c.model.num_heads = 8
  c.model.num_head_channels = -1
  c.diffusion.num_timesteps = 1000
  c.collab.cut_point = 200  # c = 0.2
  c.batch_size = 50
  c.total_steps = 18_000
  c.ema_decay = 0.9999
  c.log_every_steps = 100
  c.ckpt_every_steps = 1000
  c.sample_every_steps = 5000


def get_config(preset: str = "digits") -> ml_collections.ConfigDict:
  c = ddpm.base_config()
  c.method = "collab"
  c.collab = collab_fields()
  _shared(c)
  if preset == "digits":
    _digits(c)
  elif preset == "shapes":
    _shapes(c)
  elif preset in ("celeba64", "cifar10"):
    _paper_scale(c, preset)
  else:
    raise ValueError(
      f"configs/collab.py: unknown preset {preset!r}; allowed: digits, shapes, celeba64, cifar10"
    )
  return c
