"""The pruning proxy score (spec §4.3 item 4): inherit, fine-tune briefly on the group, score.

A candidate structure for group g gets the base network's weights
(``inheritance.inherit_weights``), ``proxy_steps`` Adam steps on t drawn from g (fixed batches),
and is then scored by its loss on fixed held-out (x0, t, eps) triples from g. Both image sets are
cut from the train split (``proxy_split``). Every random draw is fixed by the seed, so the score
is a deterministic function of (structure, seed): what lets the memory bank cache it and the
search be reproducible. This is our stand-in for the paper's GPT-4 proxy, not a reproduction.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adaptive import inheritance, search_space
from adaptive.heldout import FixedDraws
from adaptive.method import GroupNetwork, group_model_config
from common import data
from common.train import state as state_lib


class ProxyNetwork(GroupNetwork):
  """A group network whose training batch carries its own (t, noise) draws.

  The proxy fixes every draw on the host, so the compiled step depends on the structure alone and
  not on the group: one program per structure serves every group, arm and seed of a process.
  """

  def loss_fn(self, params, batch, rng, step):
    del step
    x0 = batch["image"]
    chex.assert_rank(x0, 4)
    chex.assert_shape([batch["t"]], (x0.shape[0],))
    chex.assert_equal_shape([x0, batch["noise"]])
    rng_y, rng_drop = jax.random.split(rng)
    y = self.conditioning(batch, rng_y)
    apply_fn = functools.partial(self.apply, params, dropout_rng=rng_drop)
    terms = self.diffusion.training_losses(
      lambda x, tt, yy: apply_fn(x, tt, yy), x0, batch["t"], batch["noise"], y
    )
    return jnp.mean(terms["loss"]), {}


class ProgramCache:
  """Jitted proxy programs per structure, kept across score functions, the most recent first.

  Tracing and compiling a candidate costs ~17 s on a 2-core CPU against ~5 s of running it
  (digits, 20 steps): a search revisits structures across groups, arms and seeds, and each
  revisit costs only the run. The cache is bounded: every XLA:CPU executable holds its own
  memory mappings, and a campaign that kept all of them (30-40 structures per seed) ran into
  the kernel's 65,530 mappings per process and aborted ("LLVM ERROR: Unable to allocate section
  memory"). An evicted structure is compiled again on its next use, from the persistent
  compilation cache when the binary has one.
  """

  def __init__(self, max_programs: int = 12):
    if max_programs < 1:
      raise ValueError(f"max_programs must be >= 1, got {max_programs}")
    self.max_programs = int(max_programs)
    self._programs: collections.OrderedDict[
      tuple[str, search_space.Structure], tuple[Callable, Callable, Any]
    ] = collections.OrderedDict()
    self.compiled = 0

  def __len__(self) -> int:
    return len(self._programs)

  def get(self, config, data_info, structure: search_space.Structure):
    """(train_step, heldout_loss, tx) for ``structure`` of ``config``'s base network."""
    # What the program depends on; the run's other fields (groups, seeds, scaling) do not enter.
    parts = {k: config[k] for k in ("model", "optimizer", "diffusion", "data")}
    key = (ml_collections.ConfigDict(parts).to_json(sort_keys=True), structure)
    if key in self._programs:
      self._programs.move_to_end(key)
      return self._programs[key]
    overrides = search_space.structure_to_model_config(config.model, structure)
    t_all = (0, int(config.diffusion.num_timesteps) - 1)
    net = ProxyNetwork(group_model_config(config, overrides), data_info, t_all)
    # The run's own optimizer and update (EMA unused: decay 0 keeps it equal to the params).
    tx, lr_schedule = net.make_optimizer()
    train_step = jax.jit(state_lib.default_train_step(net, tx, lr_schedule, ema_decay=0.0))

    @jax.jit
    def heldout_loss(params, x0, t, noise, y):
      terms = net.diffusion.training_losses(
        lambda x, tt, yy: net.apply(params, x, tt, yy), x0, t, noise, y
      )
      return jnp.mean(terms["loss"])

    self._programs[key] = (train_step, heldout_loss, tx)
    self.compiled += 1
    while len(self._programs) > self.max_programs:
      self._programs.popitem(last=False)  # the executables go with the last references
    return self._programs[key]


def proxy_split(config, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The train split cut into proxy fine-tuning images and proxy held-out images (10%).

  The proxy never sees the test split: that is where the held-out losses of the result are
  measured.
  """
  x, y = data.load_split(config.data, "train")
  order = np.random.default_rng(seed).permutation(len(x))
  n_val = max(1, len(x) // 10)
  val, fit = order[:n_val], order[n_val:]
  return x[fit], y[fit], x[val], y[val]


def make_score_fn(
  config: ml_collections.ConfigDict,
  data_info: Any,
  base_params: Any,
  t_range: tuple[int, int],
  train_images: np.ndarray,
  heldout_images: np.ndarray,
  draws: FixedDraws,
  group: int,
  *,
  train_labels: np.ndarray | None = None,
  heldout_labels: np.ndarray | None = None,
  seed: int = 0,
  programs: ProgramCache | None = None,
) -> Callable[[search_space.Structure], float]:
  """``structure -> proxy score`` (lower is better) for one group.

  Args:
    config: the run config (``model.*`` is the base network, ``adaptive.pruner.*`` the proxy's
      steps, batch and selection rule, ``optimizer.*`` its update, as in training).
    data_info: the dataset's ``DatasetInfo``.
    base_params: the base network's parameters (pure dict).
    t_range: the group's inclusive 0-based timestep interval.
    train_images: [M, H, W, C] float32 images the fine-tuning batches are drawn from.
    heldout_images: [M', H, W, C] float32 held-out images the draws index.
    draws: fixed (x0, t, eps) draws; group ``group``'s are used.
    group: the group index into ``draws``.
    train_labels, heldout_labels: [M], [M'] int32 for a class-conditional model.
    seed: fixes the fine-tuning batches, timesteps and noise.
    programs: a cache shared between score functions (a fresh one if None).
  """
  chex.assert_rank([train_images, heldout_images], 4)
  p = config.adaptive.pruner
  steps, batch = int(p.proxy_steps), int(p.proxy_batch)
  programs = programs or ProgramCache()
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(train_images), (steps, batch))
  t_lo, t_hi = int(t_range[0]), int(t_range[1])
  batches = []
  for s in range(steps):
    b = {
      "image": jnp.asarray(train_images[idx[s]]),
      "t": jnp.asarray(rng.integers(t_lo, t_hi + 1, batch), jnp.int32),
      "noise": jnp.asarray(rng.standard_normal((batch, *train_images.shape[1:])), jnp.float32),
    }
    if train_labels is not None:
      b["label"] = jnp.asarray(train_labels[idx[s]], jnp.int32)
    batches.append(b)
  h_idx = draws.index[group]
  eval_args = (
    jnp.asarray(heldout_images[h_idx]),
    jnp.asarray(draws.t[group]),
    jnp.asarray(draws.noise[group]),
    None if heldout_labels is None else jnp.asarray(heldout_labels[h_idx], jnp.int32),
  )
  image_size = int(config.data.resolution)

  def score(structure: search_space.Structure) -> float:
    train_step, heldout_loss, tx = programs.get(config, data_info, structure)
    params = inheritance.inherit_weights(
      base_params,
      config.model,
      structure,
      image_size=image_size,
      selection=str(p.selection),
      seed=seed,
    )
    params = jax.device_put(params)  # jnp.asarray compiled a conversion per new leaf shape
    state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=params,
      # One program: eagerly, every new leaf shape's zeros is its own (a candidate's pruned
      # shapes are new: ~40 small compiles each).
      opt_state=jax.jit(tx.init)(params),
      rng=jax.random.key(seed),
    )
    # A Python loop, not lax.scan: XLA:CPU runs looped weight-gradient convolutions ~40x slower.
    for b in batches:
      state, _ = train_step(state, b)
    return float(heldout_loss(state.params, *eval_args))

  return score
