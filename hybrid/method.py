"""The hybrid run in the shared loop: a frozen cluster-wide network and U personalized networks.

``params = {'cluster': tree, 'users': tree with a leading U axis}``. Stage 2 of ``hybrid.train``
is this method: every user's network takes one optimizer step per training step on a batch of its
own few shots (plus, with ``hybrid.prior_weight > 0``, the same loss on a batch of generic images:
DreamBooth's prior preservation), each with its own optimizer state and gradient clipping (a
vmapped ``tx``); the cluster-wide network is carried along unchanged, so one checkpoint holds
everything ``hybrid.models.load_run`` and ``common.eval`` need. Stage 1 (the cluster-wide model)
is ``ClusterDDPM``: the plain DDPM on the cluster's data.

Sampling (``common.eval``, the training grid) is the hybrid sampler at ``hybrid.eval_cut_point``;
the groups are the users, each compared with the real images of its subject class.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import data
from common.train import parties
from common.train import state as state_lib
from common.train.method import DDPM, timestep_spacing
from common.train.validate import ConfigError
from hybrid import data as hdata
from hybrid import fields, models

USER_LOOPS = parties.PARTY_LOOPS


def validate(config, data_info) -> None:
  """``hybrid.*`` fields the models use; raises ``ConfigError`` naming the field."""
  hdata.validate(config, data_info)
  h = config.hybrid
  big_t = int(config.diffusion.num_timesteps)
  if config.model.class_conditional:
    raise ConfigError(
      "model.class_conditional", True, "the hybrid models are unconditional (subjects are users)"
    )
  if h.user_loop not in USER_LOOPS:
    raise ConfigError("hybrid.user_loop", h.user_loop, "allowed: " + ", ".join(USER_LOOPS))
  if not h.prior_weight >= 0:
    raise ConfigError("hybrid.prior_weight", h.prior_weight, "must be >= 0 (0 disables it)")
  if not isinstance(h.eval_cut_point, int) or not 0 <= h.eval_cut_point <= big_t:
    raise ConfigError(
      "hybrid.eval_cut_point", h.eval_cut_point, f"must be an integer in [0, {big_t}]"
    )


class ClusterDDPM(DDPM):
  """Stage 1: the DDPM baseline trained on the generic data plus the union of the users' shots."""

  name = "hybrid_cluster"
  # Stage 1 carries the run's hybrid.* fields; the users' loop does not touch it.
  layout_fields = ("hybrid.user_loop",)

  def train_iterator(self, *, process_index: int, process_count: int):
    return data.make_train_iterator(
      self.config.data,
      global_batch_size=self.config.batch_size,
      seed=self.config.seed,
      indices=hdata.cluster_indices(self.config),
      process_index=process_index,
      process_count=process_count,
    )


class Hybrid(DDPM):
  """Stage 2 and the finished run (see the module docstring)."""

  name = "hybrid"
  layout_fields = ("hybrid.user_loop",)

  def __init__(self, config, data_info):
    config = fields.upgrade(config)  # a run saved before the cut point's rename reads the same
    super().__init__(config, data_info)
    validate(config, data_info)
    self.num_users = int(config.hybrid.num_users)
    self.user_classes = tuple(int(c) for c in config.hybrid.user_classes)

  @property
  def has_prior(self) -> bool:
    return float(self.config.hybrid.prior_weight) > 0

  # --- data: each user's few shots, and the generic batch of the prior term ------------------
  def train_iterator(self, *, process_index: int, process_count: int):
    """Per step ``[P * b, ...]``, party-major: the U users' batches, then the prior batch."""
    parts = hdata.user_shot_indices(self.config)
    if self.has_prior:
      parts = [*parts, hdata.generic_indices(self.config)]
    return data.party_train_iterator(
      self.config.data,
      parts,
      batch_size=self.config.batch_size,
      seed=self.config.seed,
      process_index=process_index,
      process_count=process_count,
    )

  def images_per_step(self) -> int:
    return (self.num_users + int(self.has_prior)) * int(self.config.batch_size)

  # --- networks: the cluster's tree and the users' stacked tree --------------------------------
  def init_params(self, rng):
    one = functools.partial(DDPM.init_params, self)
    keys = jax.random.split(jax.random.fold_in(rng, 1), self.num_users)
    return {"cluster": one(jax.random.fold_in(rng, 0)), "users": jax.vmap(one)(keys)}

  def init_opt_state(self, tx, params):
    # One optimizer state per user (and nothing for the frozen cluster network), so clipping
    # and Adam's moments never mix users.
    return {"users": jax.vmap(tx.init)(params["users"])}

  def make_flops_counting_step(self, tx, lr_schedule, ema_decay):
    """The step with the users' loop written out (XLA counts a loop body once); None when no
    loop is left in it."""
    if self.config.hybrid.user_loop != "scan":
      return None
    return self.make_train_step(tx, lr_schedule, ema_decay, for_flops=True)

  def make_train_step(self, tx, lr_schedule, ema_decay, *, for_flops: bool = False):
    u_count = self.num_users
    prior_w = float(self.config.hybrid.prior_weight)
    has_prior = self.has_prior
    user_loop = self.config.hybrid.user_loop
    party_count = u_count + int(has_prior)

    def user_objective(p, x_user, x_prior, rng):
      r_subject, r_prior = jax.random.split(rng)
      subject, _ = DDPM.loss_fn(self, p, {"image": x_user}, r_subject, 0)
      if not has_prior:
        return subject, (subject, jnp.zeros(()))
      prior, _ = DDPM.loss_fn(self, p, {"image": x_prior}, r_prior, 0)
      return subject + prior_w * prior, (subject, prior)

    grad_fn = jax.value_and_grad(user_objective, has_aux=True)

    def train_step(state, batch):
      rng = jax.random.fold_in(state.rng, state.step)
      x = batch["image"]
      x = x.reshape(party_count, x.shape[0] // party_count, *x.shape[1:])
      x_users = x[:u_count]
      x_prior = x[u_count] if has_prior else x[0]
      rngs = jax.random.split(rng, u_count)
      users = state.params["users"]
      (loss, (subject, prior)), grads = parties.map_parties(
        lambda p, x_u, r, x_p: grad_fn(p, x_u, x_p, r),
        (users, x_users, rngs),
        (x_prior,),
        loop=user_loop,
        for_flops=for_flops,
      )
      updates, opt_users = jax.vmap(tx.update)(grads, state.opt_state["users"], users)
      new_users = optax.apply_updates(users, updates)
      sumsq = sum(
        jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(grads)
      )
      metrics = {
        "loss": jnp.mean(loss),
        "loss_max": jnp.max(loss),
        "subject_loss": jnp.mean(subject),
        "prior_loss": jnp.mean(prior),
        "grad_norm": jnp.sqrt(jnp.mean(sumsq)),
        "lr": lr_schedule(state.step),
      }
      new_state = state.replace(
        step=state.step + 1,
        params={"cluster": state.params["cluster"], "users": new_users},
        ema_params={
          "cluster": state.ema_params["cluster"],
          "users": state_lib.ema_update(state.ema_params["users"], new_users, ema_decay),
        },
        opt_state={"users": opt_users},
      )
      return new_state, metrics

    return train_step

  # --- sampling: the hybrid sampler at the configured cut point -----------------------------
  @property
  def programs(self) -> models.Programs:
    return models.programs_for(self.config)

  def models_of(self, params) -> models.HybridModels:
    return models.from_params(self.config, params, programs=self.programs)

  def sample_users(self, params, rng, users, cut_point: int | None = None) -> np.ndarray:
    """Hybrid samples [len(users), H, W, C] for the given users at cut point ``cut_point``."""
    n = int(self.config.hybrid.eval_cut_point if cut_point is None else cut_point)
    users = np.asarray(users, np.int32)
    out = models.hybrid_sample(self.models_of(params), users, np.full_like(users, n), rng)
    return np.asarray(out)

  def sample(self, params, rng, num_samples, labels=None):
    del labels
    return self.sample_users(params, rng, np.arange(num_samples) % self.num_users)

  def user_names(self) -> list[str]:
    return [f"user{u} (digit {c})" for u, c in enumerate(self.user_classes)]

  def sample_grid(self, params, rng, num_samples):
    per = max(1, num_samples // self.num_users)
    images = self.sample_users(params, rng, np.repeat(np.arange(self.num_users), per))
    return images, per, self.user_names()

  # --- evaluation: one group per user, against its subject's real images -----------------------
  def eval_group_names(self):
    return [f"user{u}" for u in range(self.num_users)]

  def eval_batches(self, params, rng, num_samples, batch_size):
    per_user = [len(a) for a in np.array_split(np.arange(num_samples), self.num_users)]
    for u, n_u in enumerate(per_user):
      for start in range(0, n_u, batch_size):
        b = min(batch_size, n_u - start)
        images = self.sample_users(
          params, jax.random.fold_in(rng, u * 1_000_003 + start), np.full((b,), u)
        )
        yield images, None, np.full((b,), u, np.int32)

  def eval_group_reference(self, group, ref_labels, split):
    del split
    return np.flatnonzero(ref_labels == self.user_classes[group])

  def flops_per_sample(self, params):
    # Both halves run the same architecture: T calls of one network per image.
    return self.denoiser_call_flops(params["cluster"], self.diffusion.num_timesteps)

  def cost_description(self, params) -> dict[str, Any]:
    del params
    n = int(self.config.hybrid.eval_cut_point)
    res, ch = self.data_info.resolution, self.data_info.channels
    return {
      "edge_steps_per_image": int(self.diffusion.num_timesteps) - n,
      "device_steps_per_image": n,
      "latent_bytes_per_image": int(res * res * ch * 4),
    }

  def sampling_description(self) -> dict[str, Any]:
    d = self.config.diffusion
    return {
      "sampler": d.sampler,
      "sampling_steps": int(self.diffusion.num_timesteps),
      # Every level (the paper's full chain), the same grid on both spacings (ddimT = all of T).
      "timestep_spacing": timestep_spacing(self.config),
      "ddim_eta": float(d.ddim_eta),
      "guidance_scale": 1.0,
      "cut_point": int(self.config.hybrid.eval_cut_point),
    }


METHOD = Hybrid
