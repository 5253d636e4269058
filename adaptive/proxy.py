"""The pruning proxy score (spec §4.3 item 4): inherit, fine-tune briefly on the group, score.

A candidate structure for group g gets the base network's weights (``pruning.inherit_weights``),
``proxy_steps`` Adam steps on t drawn from g (fixed batches), and is then scored by its loss on
fixed held-out (x0, t, eps) triples from g. Every random draw is fixed by the seed, so the score
is a deterministic function of (structure, seed): what lets the memory bank cache it and the
search be reproducible. This is our stand-in for the paper's GPT-4 proxy, not a reproduction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adaptive import pruning
from adaptive.heldout import FixedDraws
from adaptive.method import GroupNetwork, group_model_config
from common.train import state as state_lib


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
) -> Callable[[pruning.Structure], float]:
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
  """
  p = config.adaptive.pruner
  steps, batch = int(p.proxy_steps), int(p.proxy_batch)
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(train_images), (steps, batch))
  x_batches = jnp.asarray(train_images[idx]) if steps else None
  y_batches = None
  if train_labels is not None and steps:
    y_batches = jnp.asarray(train_labels[idx], jnp.int32)
  h_idx = draws.index[group]
  x_eval = jnp.asarray(heldout_images[h_idx])
  t_eval = jnp.asarray(draws.t[group])
  n_eval = jnp.asarray(draws.noise[group])
  y_eval = None if heldout_labels is None else jnp.asarray(heldout_labels[h_idx], jnp.int32)
  image_size = int(config.data.resolution)

  def score(structure: pruning.Structure) -> float:
    overrides = pruning.structure_to_model_config(config.model, structure)
    net = GroupNetwork(group_model_config(config, overrides), data_info, t_range)
    params = pruning.inherit_weights(
      base_params,
      config.model,
      structure,
      image_size=image_size,
      selection=str(p.selection),
      seed=seed,
    )
    params = jax.tree.map(jnp.asarray, params)

    # The run's own optimizer and update (EMA unused: decay 0 keeps it equal to the params).
    tx, lr_schedule = net.make_optimizer()
    train_step = jax.jit(state_lib.default_train_step(net, tx, lr_schedule, ema_decay=0.0))

    @jax.jit
    def heldout_loss(params):
      terms = net.diffusion.training_losses(
        lambda x, t, y: net.apply(params, x, t, y), x_eval, t_eval, n_eval, y_eval
      )
      return jnp.mean(terms["loss"])

    state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=params,
      opt_state=tx.init(params),
      rng=jax.random.key(seed),
    )
    # A Python loop, not lax.scan: XLA:CPU runs looped weight-gradient convolutions ~40x slower.
    for s in range(steps):
      batch = {"image": x_batches[s]}
      if y_batches is not None:
        batch["label"] = y_batches[s]
      state, _ = train_step(state, batch)
    return float(heldout_loss(state.params))

  return score
