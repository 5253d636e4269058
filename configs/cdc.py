"""CDC-MMPG-style on-device adaptation by cloud parameter generation (arXiv 2406.01601, issue 8).

Presets (``--config=configs/cdc.py:<preset>``):

* ``moving_shapes``   the spec's toy task (section 9): 16x16 RGB videos of 8 frames, 40 simulated
                      devices of which 10 are held out, d = 64 encoders, a generated head of
                      38,290 parameters, a low-rank (r = 8) FDA. Minutes on a CPU.
* ``tiny``            the same pipeline shrunk for tests (8 devices, 8x8 frames, a handful of steps).
* ``msrvtt_qa``, ``msvd_qa``, ``msrvtt_retrieval``  real benchmarks from pre-extracted features
                      (``data.data_dir`` holds ``train.npz`` and ``test.npz`` in the format of
                      ``cdc.feature_benchmark.load_feature_split``; devices = the files'
                      ``video_domain`` ids).

Shared keys keep the foundation's meaning: ``seed`` (the run's randomness: initialisation, episode
sampling, random anchors), ``total_steps`` (optimizer updates of the FDA in ``cdc.train``),
``batch_size`` (labeled query examples per update, summed over the meta-batch's devices),
``log_every_steps``, ``ckpt_every_steps``, ``keep_checkpoints``, ``optimizer.*`` (the FDA's
optimizer), ``data.*``, ``model.*`` (the device model; ``model.name = "cdc_device"``). The
``diffusion.*`` block and the sampling keys of ``ddpm.base_config`` are kept and unused; so is
``keep_checkpoints``: a cdc binary keeps its newest checkpoint and the one before it
(``cdc.experiment.save_checkpoint``). ``total_steps = 0`` is allowed (the untrained FDA). Every
field is checked by ``cdc.experiment.validate`` before a binary reads or writes anything.
The held-out devices depend on ``data.split_seed`` only, never on ``seed``.

Everything under ``cdc.*`` is an inferred choice of the reference design (spec section 5), not a
value from the paper.
"""

import ml_collections

from configs import ddpm


def base_config() -> ml_collections.ConfigDict:
  """The ``moving_shapes`` defaults on top of ``configs.ddpm.base_config``."""
  c = ddpm.base_config()
  c.method = "cdc"
  c.seed = 0
  c.total_steps = 2000
  c.batch_size = 256
  c.log_every_steps = 100
  c.ckpt_every_steps = 1000
  c.keep_checkpoints = 1

  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.grad_clip_norm = 1.0

  d = c.data
  d.name = "moving_shapes"  # moving_shapes | features
  d.resolution = 16
  d.num_frames = 8
  d.num_devices = 40
  d.num_heldout = 10
  d.split_seed = 0  # fixes the held-out devices; independent of `seed`
  d.dataset_seed = 0  # fixes every device's shift and every video
  d.max_objects = 3
  d.object_radius = 0.18
  d.shape_names = ("circle", "square", "triangle", "cross")
  d.shift_scale = 1.0
  d.pool_videos = 64  # per device: its unlabeled stream (M = pool_videos * num_frames frames)
  d.train_videos = 256  # per device: labeled (meta-training queries; fine-tuning baselines)
  d.test_videos = 128  # per device: evaluation (QA accuracy, retrieval gallery)
  d.source_train_videos = 8000
  d.source_test_videos = 1000
  d.source_domains = ()  # features only: domain ids forming the source (default: meta-train ones)

  c.model = ml_collections.ConfigDict()
  m = c.model
  m.name = "cdc_device"
  m.frame_input = "pixels"  # pixels | features
  m.conv_channels = (16, 32, 64)
  m.text_input = "tokens"  # tokens | features
  m.dim = 64
  m.fusion_hidden = 128
  m.fusion_out = 64
  m.proj_dim = 32

  c.cdc = ml_collections.ConfigDict()
  f = c.cdc.fda = ml_collections.ConfigDict()
  f.generated = ("fusion1", "fusion2", "qa", "ret_video", "ret_text")
  f.set_hidden = 128
  f.z_dim = 128
  f.set_pool = "weighted_sum"  # weighted_sum (DeepSets) | attention
  f.text_context = False  # also encode the device's (unlabeled) question features
  f.rank = 8  # 0: full linear generators (DUET); r > 0: low-rank U(z) V(z)^T
  f.residual_scale_init = 1.0
  f.zero_init = True  # the untrained FDA returns the base head exactly
  f.train_base = True  # meta-train the shared base weights too
  f.delta_l2 = 0.0  # weight of mean ||Delta||^2 in the meta-training loss

  a = c.cdc.adr = ml_collections.ConfigDict()
  a.selector = "k_center"  # k_center | k_medoids | mmd_greedy | uniform | random | gaussian
  a.num_anchors = 16  # K (gaussian: mixture components G)
  a.weighting = "assignment"  # assignment | uniform
  a.kmedoids_iters = 10
  a.summary_samples = 64  # pseudo-features the cloud draws from a Gaussian summary
  a.text_anchors = 16  # question features sent with fda.text_context
  a.uplink_dtype = "float32"
  a.downlink_dtype = "float32"  # float16 halves the downlink

  t = c.cdc.meta = ml_collections.ConfigDict()
  t.devices_per_step = 8  # batch_size / devices_per_step queries per device
  t.pool_videos = 32  # unlabeled videos per episode's pool (a random subset of the device's)
  t.qa_weight = 1.0
  t.retrieval_weight = 1.0
  t.temperature = 0.07  # InfoNCE

  p = c.cdc.pretrain = ml_collections.ConfigDict()
  p.steps = 3000
  p.batch_size = 64  # source videos per step
  p.learning_rate = 1e-3
  p.warmup_steps = 100

  ft = c.cdc.finetune = ml_collections.ConfigDict()  # the FTA baselines (device backprop)
  ft.shots = (5, 20, 100)
  ft.steps = 100
  ft.batch_size = 32
  ft.learning_rate = 1e-3
  ft.oracle_steps = 300  # fine-tuning on all of the device's labeled videos

  e = c.cdc.eval = ml_collections.ConfigDict()
  e.selectors = ("k_center", "k_medoids", "mmd_greedy", "uniform", "random", "gaussian")
  e.anchor_counts = (4, 8, 16, 32)
  e.link_mbps = 10.0  # the stated link rate for the latency figure, both directions
  e.drift_threshold = 0.09  # MMD^2; same-device 16-video windows measured <= 0.08, see RESULTS
  e.drift_windows = 12
  e.drift_switch_at = 6
  e.drift_window_videos = 16
  return c


def _features(c, data_dir: str, *, qa: bool, retrieval: bool):
  c.data.name = "features"
  c.data.data_dir = data_dir
  c.data.num_heldout = 5
  c.model.frame_input = "features"
  c.model.text_input = "features"
  c.model.dim = 256
  c.model.fusion_hidden = 512
  c.model.fusion_out = 256
  c.model.proj_dim = 256
  c.cdc.fda.z_dim = 256
  c.cdc.fda.set_hidden = 256
  c.cdc.meta.qa_weight = 1.0 if qa else 0.0
  c.cdc.meta.retrieval_weight = 1.0 if retrieval else 0.0
  c.cdc.adr.num_anchors = 32
  c.cdc.pretrain.steps = 20000
  c.cdc.pretrain.batch_size = 256
  c.total_steps = 20000
  return c


def get_config(preset: str = "moving_shapes") -> ml_collections.ConfigDict:
  """Returns the config for ``preset``; see the module docstring for the list."""
  c = base_config()
  if preset == "moving_shapes":
    return c
  if preset == "tiny":
    c.data.resolution = 8
    c.data.num_frames = 4
    c.data.num_devices = 8
    c.data.num_heldout = 2
    c.data.pool_videos = 8
    c.data.train_videos = 16
    c.data.test_videos = 16
    c.data.source_train_videos = 64
    c.data.source_test_videos = 16
    c.model.conv_channels = (4, 8, 8)
    c.model.dim = 16
    c.model.fusion_hidden = 16
    c.model.fusion_out = 16
    c.model.proj_dim = 8
    c.cdc.fda.set_hidden = 16
    c.cdc.fda.z_dim = 16
    c.cdc.fda.rank = 2
    c.cdc.adr.num_anchors = 4
    c.cdc.adr.summary_samples = 8
    c.cdc.meta.devices_per_step = 2
    c.cdc.meta.pool_videos = 4
    c.cdc.pretrain.steps = 4
    c.cdc.pretrain.batch_size = 8
    c.cdc.pretrain.warmup_steps = 0
    c.cdc.finetune.shots = (5,)
    c.cdc.finetune.steps = 2
    c.cdc.finetune.oracle_steps = 2
    c.cdc.finetune.batch_size = 4
    c.cdc.eval.selectors = ("k_center", "random", "gaussian")
    c.cdc.eval.anchor_counts = (4,)
    c.cdc.eval.drift_windows = 4
    c.cdc.eval.drift_switch_at = 2
    c.cdc.eval.drift_window_videos = 2
    c.total_steps = 4
    c.batch_size = 8
    c.optimizer.warmup_steps = 0
    c.log_every_steps = 2
    c.ckpt_every_steps = 2
    return c
  if preset == "msrvtt_qa":
    return _features(c, "data/msrvtt_qa_features", qa=True, retrieval=False)
  if preset == "msvd_qa":
    return _features(c, "data/msvd_qa_features", qa=True, retrieval=False)
  if preset == "msrvtt_retrieval":
    return _features(c, "data/msrvtt_retrieval_features", qa=False, retrieval=True)
  raise ValueError(
    f"unknown preset {preset!r}; allowed: moving_shapes, tiny, msrvtt_qa, msvd_qa, msrvtt_retrieval"
  )
