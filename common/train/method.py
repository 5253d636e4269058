"""What a method supplies to the shared training loop, and the DDPM baseline that supplies it.

The loop (``common.train.loop``) owns the mesh, data, optimizer, EMA, checkpoints, logging and
sample grids. A method owns its networks, its loss and how its samples are drawn; it changes
behaviour by overriding hooks of ``Method``, never by copying the loop (the pattern of VDM's
``Experiment``). ``DDPM`` is the one-segment segmented denoiser: one network over all of [0, T).

A method package ``<name>/`` is found by the name in ``config.method``: its module
``<name>.method`` must define ``METHOD``: a ``Method`` subclass, or a function
``(config, data_info) -> Method`` where one package holds several (adaptive: TDC and E6's
supernet). ``common`` never imports it statically.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from common import data, models
from common.diffusion import GaussianDiffusion, sampling
from common.metrics import flops as flops_lib
from common.train import drift

Params = Any


def make_diffusion(config: ml_collections.ConfigDict) -> GaussianDiffusion:
  """The ``GaussianDiffusion`` described by ``config.diffusion``."""
  d = config.diffusion
  return GaussianDiffusion.create(
    d.schedule,
    d.num_timesteps,
    parameterization=d.parameterization,
    learn_sigma=d.loss == "hybrid",
    loss=d.loss,
    vlb_weight=d.vlb_weight,
    min_snr_gamma=d.min_snr_gamma,
  )


def timestep_spacing(config: ml_collections.ConfigDict) -> str:
  """The sampling grid ``config.diffusion.timestep_spacing`` ("uniform" | "ddim", see
  ``sampling.make_levels``); "uniform" for a config saved before the field existed, the only
  grid there was then."""
  return str(drift.added_field(config, "diffusion.timestep_spacing"))


def x0_clipping_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The sampler's x0_hat bound from ``config.diffusion`` as ``sampling.sample_chain`` keywords
  (``x0_clipping``, ``dynamic_threshold_percentile``); static clipping to [-1, 1] for a config
  saved before the fields existed, the only bound there was then."""
  return {
    "x0_clipping": str(drift.added_field(config, "diffusion.x0_clipping")),
    "dynamic_threshold_percentile": float(
      drift.added_field(config, "diffusion.dynamic_threshold_percentile")
    ),
  }


def x0_clipping_description(config: ml_collections.ConfigDict, clipped: bool) -> dict[str, Any]:
  """What ``metrics.json`` records of the x0_hat bound: ``{"x0_clipping": "none" | "static"}``,
  or "dynamic" with its ``dynamic_threshold_percentile``. ``clipped``: whether the sampler
  bounds x0_hat at all (``diffusion.clip_denoised``, or always, as collab's sides do)."""
  if not clipped:
    return {"x0_clipping": "none"}
  kw = x0_clipping_kwargs(config)
  return kw if kw["x0_clipping"] == "dynamic" else {"x0_clipping": kw["x0_clipping"]}


def make_optimizer(
  opt: ml_collections.ConfigDict, total_steps: int | None = None
) -> tuple[optax.GradientTransformation, Any]:
  """Adam(W) with optional global-norm clipping; returns (tx, lr schedule).

  ``opt.schedule`` (absent: "constant"): "constant" is a linear warm-up over ``warmup_steps``
  then ``learning_rate``; "cosine" is the warm-up then a cosine decay to 0 at ``total_steps``
  (U-ViT's recipe, which mobile's presets use).
  """
  schedule = opt.get("schedule", "constant")
  if schedule == "cosine":
    if not total_steps:
      raise ValueError("optimizer.schedule='cosine' needs the run's total_steps")
    lr = optax.warmup_cosine_decay_schedule(
      0.0, opt.learning_rate, opt.warmup_steps, total_steps, end_value=0.0
    )
  elif schedule != "constant":
    raise ValueError(
      f"optimizer.schedule={schedule!r} is not a known schedule; allowed: constant, cosine"
    )
  elif opt.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps)
  else:
    lr = optax.constant_schedule(opt.learning_rate)
  if opt.name == "adamw":
    core = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
  else:
    core = optax.adam(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  parts = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else []
  return optax.chain(*parts, core), lr


class Method:
  """The contract between a method and the shared binaries: hooks of the loop (``common.train``),
  the evaluator (``common.eval``) and the chain (``common.diffusion.sampling``). Subclasses
  override what their paper changes; most methods subclass ``DDPM``, which implements all of it
  for one network.

  Required (no default here; ``DDPM`` has them):
    ``init_params(rng) -> params`` (a pytree of every network's parameters);
    ``loss_fn(params, batch, rng, step) -> (loss [], metrics {name: []})``, with ``batch`` this
    method's global batch (``{'image': [B, H, W, C], 'label': [B]}`` by default);
    ``sample(params, rng, n, labels [n] | None) -> [n, H, W, C]`` float32 in [-1, 1];
    ``flops_per_sample(params) -> float`` (every denoiser call of one sample's chain).

  Optional, with defaults:
    data: ``train_iterator(process_index, process_count)`` (this process's rows of each global
    batch; several parties: ``common.data.party_train_iterator``), ``images_per_step()``;
    optimization: ``make_optimizer()``, ``init_opt_state(tx, params)``,
    ``state_shardings(mesh, abstract_state)``, ``make_train_step(tx, lr_schedule, ema_decay)``
    (networks updating at different rates, like collab's);
    sampling: ``sampling_chain(params, levels) -> [Segment]`` on ``DDPM`` (which denoiser runs
    which levels; TDC's groups), ``sample_grid``, ``grid_labels``;
    evaluation: ``eval_batches`` (samples with a group id each), ``eval_group_names``,
    ``eval_group_reference``, ``cost_description``, ``sampling_description``,
    ``check_networks``; and the class attribute ``default_ref_split``.

  Attributes set by ``__init__``: ``config``, ``data_info`` (``common.data.DatasetInfo``),
  ``diffusion`` (``GaussianDiffusion``).
  """

  name = "base"
  # The real split ``common.eval`` compares samples with unless told otherwise: a method whose
  # groups hold private training data (collab's clients) measures against their held-out data.
  default_ref_split = "train"
  # The mesh the train step runs on, bound by ``loop.build`` before ``make_train_step`` (a
  # method that lays out its own axes, like collab's clients under shard_map, reads it).
  mesh = None
  # Config fields that choose how the compiled step is laid out, not what it computes (collab's
  # ``collab.client_loop``): a resume may change them, as it may change the mesh.
  layout_fields: tuple[str, ...] = ()

  def __init__(self, config: ml_collections.ConfigDict, data_info: Any):
    self.config = config
    self.data_info = data_info
    self.diffusion = make_diffusion(config)

  # --- networks -----------------------------------------------------------------------------
  def init_params(self, rng: jax.Array) -> Params:
    """A pytree of parameters (pure nested dicts of arrays) for all of the method's networks."""
    raise NotImplementedError

  def check_networks(self) -> None:
    """Builds the networks shape-only; raises ``ValueError`` when they cannot take the data."""
    jax.eval_shape(self.init_params, jax.random.key(0))

  # --- training -----------------------------------------------------------------------------
  def train_iterator(self, *, process_index: int, process_count: int):
    """A checkpointable grain iterator of this process's rows of each global batch (the batch at
    step n is the same for every process count; ``common.data.process_rows``)."""
    return data.make_train_iterator(
      self.config.data,
      global_batch_size=self.config.batch_size,
      seed=self.config.seed,
      process_index=process_index,
      process_count=process_count,
    )

  def images_per_step(self) -> int:
    """Images one training step reads (the logger's images/s): the global batch by default."""
    return int(self.config.batch_size)

  def make_optimizer(self) -> tuple[optax.GradientTransformation, Any]:
    return make_optimizer(self.config.optimizer, self.config.total_steps)

  def state_shardings(self, mesh, abstract_state) -> Any:
    """Shardings of the train state (``abstract_state``: ShapeDtypeStructs): the FSDP rule.

    A method with a stacked axis of its own (collab's clients) may split that axis instead.
    """
    from common import parallel

    return parallel.state_shardings(mesh, abstract_state)

  def init_opt_state(self, tx: optax.GradientTransformation, params: Params) -> Any:
    """The optimizer state for ``params`` (a method with several networks may split it)."""
    return tx.init(params)

  def make_train_step(self, tx: optax.GradientTransformation, lr_schedule, ema_decay: float):
    """``(TrainState, batch) -> (TrainState, metrics)``: one step of the method.

    The default takes one gradient step on ``loss_fn`` over all parameters; a method whose
    networks update at different rates (CollaFuse's server takes one update per client) builds
    its own from the same pieces (``common.train.state``).
    """
    from common.train import state

    return state.default_train_step(self, tx, lr_schedule, ema_decay)

  def make_flops_counting_step(self, tx: optax.GradientTransformation, lr_schedule, ema_decay):
    """The train step with its loops unrolled, only lowered, to count its FLOPs; or None.

    XLA's cost analysis counts a loop's body once, whatever its trip count: a step that scans
    over its N blocks (mobile's TFDiff) or over its parties (collab's clients and server updates,
    hybrid's users: ``common.train.parties``) would be counted as one block or one update
    (TFDiff Config I's step read 6.6e6 FLOPs an image, under one forward call's 1.1e7). A method
    with such a loop returns the same arithmetic with the loop unrolled
    (``common.train.compute.measure_step`` counts its lowered program); None, the default: the
    step has no loop and its own lowered program is counted.
    """
    del tx, lr_schedule, ema_decay
    return None

  def loss_fn(
    self, params: Params, batch: dict[str, jax.Array], rng: jax.Array, step: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and a dict of scalar metrics for one global batch.

    Args:
      params: the method's parameters.
      batch: ``{'image': [B, H, W, C] float32 in [-1, 1], 'label': [B] int32, ...}``.
      rng: a key for this step (already folded with the step number).
      step: the int32 step being taken (0-based), for schedules inside the loss.
    """
    raise NotImplementedError

  # --- sampling -----------------------------------------------------------------------------
  def sample(
    self, params: Params, rng: jax.Array, num_samples: int, labels: np.ndarray | None = None
  ) -> np.ndarray:
    """``num_samples`` images [N, H, W, C] float32 in [-1, 1] with the configured sampler."""
    raise NotImplementedError

  def sample_grid(self, params: Params, rng: jax.Array, num_samples: int):
    """Samples for the training-time grid: (images [N, H, W, C], columns or None, row names or None)."""
    labels, row_names = self.grid_labels(num_samples)
    samples = self.sample(params, rng, num_samples, labels)
    if labels is None:
      return samples, None, None
    return samples, int(np.ceil(num_samples / self.data_info.num_classes)), row_names

  def grid_labels(self, num_samples: int) -> tuple[np.ndarray | None, list[str] | None]:
    """Labels to sample a grid with (one class per row) and the row captions, or (None, None)."""
    if not self.class_conditional:
      return None, None
    k = self.data_info.num_classes
    ncols = int(np.ceil(num_samples / k))
    labels = np.repeat(np.arange(k, dtype=np.int32), ncols)[:num_samples]
    names = list(self.data_info.class_names or [str(i) for i in range(k)])
    return labels, names

  # --- evaluation (common.eval calls these; the binary itself never changes per method) ------
  def eval_group_names(self) -> list[str] | None:
    """Names of the groups metrics are also reported for (classes, clients, users), or None."""
    if not self.class_conditional:
      return None
    k = self.data_info.num_classes
    return list(self.data_info.class_names or [str(i) for i in range(k)])

  def eval_batches(self, params: Params, rng: jax.Array, num_samples: int, batch_size: int):
    """Yields ``(images [b, H, W, C] in [-1, 1], labels [b] int32 | None, groups [b] | None)``.

    The default draws class-balanced labels (label i = sample index mod K) for a conditional
    model, so per-class metrics see equal counts; the group of a sample is its class.
    """
    for start in range(0, num_samples, batch_size):
      b = min(batch_size, num_samples - start)
      labels = None
      if self.class_conditional:
        labels = (np.arange(start, start + b) % self.data_info.num_classes).astype(np.int32)
      images = self.sample(params, jax.random.fold_in(rng, start), b, labels)
      yield images, labels, labels

  def eval_group_reference(self, group: int, ref_labels: np.ndarray, split: str) -> np.ndarray:
    """Indices into the reference ``split`` (labels ``ref_labels``) a group is compared with.

    The default group is a class, so its reference is that class's examples.
    """
    del split
    return np.flatnonzero(ref_labels == group)

  def flops_per_sample(self, params: Params) -> float:
    """FLOPs of the whole sampling chain for one sample (every denoiser call it makes)."""
    raise NotImplementedError

  def cost_description(self, params: Params) -> dict[str, Any]:
    """Method-specific costs ``metrics.json`` records (e.g. client FLOPs, bytes on the wire)."""
    del params
    return {}

  def sampling_description(self) -> dict[str, Any]:
    """What ``metrics.json`` records about how samples were drawn (sampler, steps and their grid,
    ``timestep_spacing``: a figure names the grid it was measured on)."""
    d = self.config.diffusion
    return {
      "sampler": d.sampler,
      "sampling_steps": int(d.sample_steps),
      "timestep_spacing": timestep_spacing(self.config),
      "ddim_eta": float(d.ddim_eta),
      "guidance_scale": float(d.guidance_scale) if self.class_conditional else 1.0,
      **x0_clipping_description(self.config, bool(d.clip_denoised)),
    }

  @property
  def class_conditional(self) -> bool:
    return bool(self.config.model.class_conditional) and self.data_info.num_classes > 0


class DDPM(Method):
  """The single-network baseline: one U-Net denoises every timestep."""

  name = "ddpm"

  def __init__(self, config: ml_collections.ConfigDict, data_info: Any):
    super().__init__(config, data_info)
    self._graphdef = None

  def build_network(self, rng: jax.Array) -> nnx.Module:
    return models.build_model(
      self.config,
      in_channels=self.data_info.channels,
      num_classes=self.data_info.num_classes,
      rngs=models.InitRngs(rng),  # nnx.Rngs' keys, without its cost under a trace
    )

  @property
  def graphdef(self):
    if self._graphdef is None:
      abstract = nnx.eval_shape(lambda: self.build_network(jax.random.key(0)))
      self._graphdef, _ = nnx.split(abstract, nnx.Param)
    return self._graphdef

  def init_params(self, rng: jax.Array) -> Params:
    _, state = nnx.split(self.build_network(rng), nnx.Param)
    return nnx.to_pure_dict(state)

  def apply(self, params, x, t, y=None, dropout_rng=None):
    """Runs the network: ``x`` [B, H, W, C], ``t`` [B] int32 -> model output [B, H, W, C'']."""
    return nnx.merge(self.graphdef, params)(x, t, y, dropout_rng=dropout_rng)

  def conditioning(self, batch, rng):
    """The labels the network sees in training, with CFG label dropout; None if unconditional."""
    if not self.class_conditional:
      return None
    y = batch["label"]
    p = self.config.diffusion.cond_drop_prob
    if p > 0:
      drop = jax.random.bernoulli(rng, p, y.shape)
      y = jnp.where(drop, self.data_info.num_classes, y)
    return y

  def timestep_range(self) -> tuple[int, int]:
    """[t_min, t_max) of model timesteps this network trains on (all of them for DDPM)."""
    return 0, self.diffusion.num_timesteps

  def loss_fn(self, params, batch, rng, step):
    x0 = batch["image"]
    chex.assert_rank(x0, 4)
    rng_t, rng_noise, rng_y, rng_drop = jax.random.split(rng, 4)
    t_min, t_max = self.timestep_range()
    t = self.diffusion.sample_timesteps(rng_t, x0.shape[0], t_min, t_max)
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
    y = self.conditioning(batch, rng_y)
    apply_fn = functools.partial(self.apply, params, dropout_rng=rng_drop)
    terms = self.diffusion.training_losses(lambda x, tt, yy: apply_fn(x, tt, yy), x0, t, noise, y)
    metrics = {k: jnp.mean(v) for k, v in terms.items() if k != "loss"}
    return jnp.mean(terms["loss"]), metrics

  def denoise_fn(self, params):
    return lambda x, t, y: self.apply(params, x, t, y)

  def sampling_chain(self, params, levels: np.ndarray) -> list[sampling.Segment]:
    """The method's sampling as a chain over the grid ``levels`` (what ``sample`` runs through
    ``sampling.sample_chain``): which denoiser runs which levels. The baseline is one segment,
    this network from the grid's top (T, or the DDIM grid's first level) to 0; TDC has one per
    group."""
    return [sampling.Segment(self.denoise_fn(params), int(levels[0]), int(levels[-1]))]

  @functools.cached_property
  def _sample_jit(self):
    d = self.config.diffusion
    res, ch = self.data_info.resolution, self.data_info.channels
    levels = sampling.make_levels(
      self.diffusion.num_timesteps, d.sample_steps, spacing=timestep_spacing(self.config)
    )

    def run(params, rng, labels, num_samples):
      return sampling.sample_chain(
        self.diffusion,
        self.sampling_chain(params, levels),
        sampling.initial_noise(rng, (num_samples, res, res, ch)),
        rng,
        levels=levels,
        sampler=d.sampler,
        eta=d.ddim_eta,
        y=labels,
        guidance_scale=d.guidance_scale if labels is not None else 1.0,
        null_label=self.data_info.num_classes if self.class_conditional else None,
        clip_denoised=d.clip_denoised,
        **x0_clipping_kwargs(self.config),
      )

    return jax.jit(run, static_argnums=(3,))

  def denoiser_call_flops(self, params, num_steps: int) -> float:
    """FLOPs of ``num_steps`` reverse steps of one network for one sample.

    XLA's cost analysis counts a while-loop body once, so one denoiser call is costed at batch 1
    and multiplied by the calls (twice per step under classifier-free guidance).
    """
    res, ch = self.data_info.resolution, self.data_info.channels
    x = jax.ShapeDtypeStruct((1, res, res, ch), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if self.class_conditional else None
    per_call = flops_lib.count_flops(lambda p, x, t, y: self.apply(p, x, t, y), params, x, t, y)
    guided = self.class_conditional and self.config.diffusion.guidance_scale != 1.0
    return per_call * num_steps * (2 if guided else 1)

  def flops_per_sample(self, params):
    return self.denoiser_call_flops(params, self.config.diffusion.sample_steps)

  def sample(self, params, rng, num_samples, labels=None):
    if self.class_conditional and labels is None:
      labels = np.asarray(
        jax.random.randint(
          jax.random.fold_in(rng, 1), (num_samples,), 0, self.data_info.num_classes
        ),
        np.int32,
      )
    if not self.class_conditional:
      labels = None
    y = None if labels is None else jnp.asarray(labels, jnp.int32)
    return np.asarray(self._sample_jit(params, rng, y, num_samples))


def load_method(config: ml_collections.ConfigDict, data_info: Any) -> Method:
  """Instantiates the method named by ``config.method`` (a plugin import for method packages)."""
  name = config.method
  if name == "ddpm":
    return DDPM(config, data_info)
  try:
    module = importlib.import_module(f"{name}.method")
  except ModuleNotFoundError as e:
    if e.name not in (name, f"{name}.method"):
      raise
    from common.train.validate import ConfigError

    raise ConfigError("method", name, "no such method package (need <name>/method.py)") from None
  return module.METHOD(config, data_info)
