"""The cluster-wide and personalized models: ``python -m hybrid.train --config=configs/hybrid.py:digits
--workdir=DIR``.

Stage 1 trains the cluster-wide model, a plain DDPM on the generic data plus the union of the
users' shots (``hybrid.data``), in ``DIR/cluster`` with the config's ``total_steps``,
``batch_size``, ``optimizer`` and ``ema_decay``; or takes an existing run's checkpoint given by
``hybrid.cluster_workdir`` (a ``common.train`` run, or a collab run's server network), which must
have this config's ``model.*``, ``data.*`` and diffusion schedule.

Stage 2 fine-tunes the U personalized models, one stacked tree initialised with U copies of the
cluster model's EMA weights (DreamBooth-style, optional prior preservation), in ``DIR`` itself
for ``hybrid.personal_steps`` steps of ``hybrid.personal_batch_size`` images per user. The
initial weights are written as the run's step-0 checkpoint, so stage 2 is an ordinary run of the
shared loop: both stages resume, and ``python -m common.eval --workdir=DIR`` samples the hybrid
chain at ``hybrid.eval_cut_point`` per user.

A command line with a field's name from before the cut point's rename
(``--config.hybrid.eval_split=100``) exits 2 naming the new one; a run saved before resumes as it
was (``hybrid.fields``).

Faults: ``validate`` checks both stages' configs (every ``hybrid.*`` field through
``hybrid.method.validate`` and the shared loop's checks) before ``DIR`` is created; a bad field is
one line and exit 2. ``train_summary.json`` is written atomically.
"""

from __future__ import annotations

import copy
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from common import data, fileio
from common.train.validate import ConfigError

CLUSTER_DIR = "cluster"


def cluster_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Stage 1: the DDPM method on the cluster's data, the top-level training fields."""
  c = copy.deepcopy(config)
  c.unlock()
  c.method = "ddpm"
  return c


def personal_config(config, cluster_source: str, cluster_step: int) -> ml_collections.ConfigDict:
  """Stage 2: the hybrid method with the ``hybrid.personal_*`` training fields."""
  h = config.hybrid
  c = copy.deepcopy(config)
  c.unlock()
  c.method = "hybrid"
  c.hybrid.cluster_steps = int(config.total_steps)
  c.hybrid.cluster_source = str(cluster_source)
  c.hybrid.cluster_source_step = int(cluster_step)
  c.total_steps = int(h.personal_steps)
  c.batch_size = int(h.personal_batch_size)
  c.optimizer.learning_rate = float(h.personal_learning_rate)
  c.optimizer.warmup_steps = int(h.personal_warmup_steps)
  c.ema_decay = float(h.personal_ema_decay)
  c.ckpt_every_steps = max(1, min(int(c.ckpt_every_steps), int(h.personal_steps)))
  c.log_every_steps = max(1, min(int(c.log_every_steps), int(h.personal_steps)))
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Every check that needs no training, so a bad config fails before stage 1 starts."""
  from common.train import loop
  from common.train.validate import integer, require

  require(config, "hybrid.personal_steps", integer(1), "must be an integer >= 1")
  require(config, "hybrid.personal_batch_size", integer(1), "must be an integer >= 1")
  require(config, "hybrid.personal_learning_rate", lambda v: v > 0, "must be > 0")
  require(config, "hybrid.personal_ema_decay", lambda v: 0 <= v < 1, "must be in [0, 1)")
  require(config, "hybrid.personal_warmup_steps", integer(0), "must be an integer >= 0")
  require(config, "hybrid.cluster_step", integer(-1), "must be an integer >= 0 or -1 (latest)")
  require(
    config,
    "hybrid.cluster_workdir",
    lambda v: not v or os.path.exists(os.path.join(v, "config.json")),
    "must be empty or a run holding config.json (common.train, collab)",
  )
  if not config.hybrid.cluster_workdir:
    loop.setup(cluster_config(config))
  loop.setup(personal_config(config, "", -1))


def _same(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> bool:
  return json.loads(a.to_json()) == json.loads(b.to_json())


def load_cluster(config, workdir: str):
  """The cluster-wide network's EMA params (host arrays), where they came from and the step."""
  from common import eval as eval_lib
  from common.train import loop

  h = config.hybrid
  source = str(h.cluster_workdir)
  if not source:
    source = os.path.join(workdir, CLUSTER_DIR)
    step = int(config.total_steps)
  else:
    step = int(h.cluster_step)
    if not os.path.exists(os.path.join(source, "config.json")):
      raise ConfigError("hybrid.cluster_workdir", source, "holds no config.json (not a run)")
  if h.cluster_workdir:
    # The saved config first: a mismatch is refused before anything is restored.
    base_config = loop.load_config(source)
    if not _same(base_config.model, config.model):
      raise ConfigError(
        "hybrid.cluster_workdir", source, "was trained with another model.* than this config's"
      )
    for field in ("name", "resolution"):
      if base_config.data[field] != config.data[field]:
        raise ConfigError(
          "hybrid.cluster_workdir",
          source,
          f"was trained on data.{field}={base_config.data[field]!r}, this config has "
          f"{config.data[field]!r}",
        )
    for field in ("num_timesteps", "schedule", "parameterization", "loss"):
      if base_config.diffusion[field] != config.diffusion[field]:
        raise ConfigError(
          "hybrid.cluster_workdir",
          source,
          f"was trained with diffusion.{field}={base_config.diffusion[field]!r}, this config has "
          f"{config.diffusion[field]!r}",
        )
  try:
    _, _, params, step = eval_lib.load_params(source, step=step)
  except FileNotFoundError as e:
    raise ConfigError("hybrid.cluster_workdir", source, str(e)) from None
  if isinstance(params, dict) and "server" in params and "clients" in params:
    params = params["server"]  # a collab run: its server is the shared network
  return jax.device_get(params), source, step


def write_personal_start(config, workdir: str, cluster_params) -> None:
  """Stage 2's step-0 checkpoint: the cluster network and U copies of it, fresh optimizers.

  The EMA starts from the same weights. Nothing is written when the run already has a
  checkpoint (a resumed stage 2).
  """
  from common import checkpoint
  from common.train import loop

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    if ckpt.latest_step() is not None:
      return
    # Every process builds and saves its shards (orbax's save is collective), on the run's mesh.
    mesh, method = loop.setup(config)
    fns = loop.build(config, method, mesh)
    users = jax.tree.map(
      lambda a: np.broadcast_to(np.asarray(a), (method.num_users, *np.shape(a))).copy(),
      cluster_params,
    )
    params = {"cluster": jax.tree.map(np.asarray, cluster_params), "users": users}
    # The loop's own init would compile a random init of U + 1 networks only to overwrite it.
    state = loop.start_state(config, method, fns, params)
    data_iter = method.train_iterator(
      process_index=jax.process_index(), process_count=jax.process_count()
    )
    ckpt.save(0, state, data_iter, config.to_json_best_effort(sort_keys=True, indent=2), force=True)
  finally:
    ckpt.close()


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage 1 (or the given cluster run), then stage 2; returns a summary (also written)."""
  from common.train import loop
  from hybrid import data as hdata
  from hybrid import fields
  from hybrid import method as hmethod

  validate(config)
  os.makedirs(workdir, exist_ok=True)
  info = data.get_info(config.data)
  if not config.hybrid.cluster_workdir:
    c1 = cluster_config(config)
    cluster_dir = os.path.join(workdir, CLUSTER_DIR)
    logging.info("stage 1: cluster-wide model, %d steps in %s", c1.total_steps, cluster_dir)
    c1 = fields.in_layout_of(c1, cluster_dir)  # resumed under the names it was saved with
    loop.train(c1, cluster_dir, method=hmethod.ClusterDDPM(c1, info))
  cluster_params, source, step = load_cluster(config, workdir)
  logging.info("cluster-wide model: %s step %d", source, step)

  c2 = personal_config(config, source, step)
  write_personal_start(c2, workdir, cluster_params)
  logging.info(
    "stage 2: %d personalized models, %d steps in %s",
    config.hybrid.num_users,
    c2.total_steps,
    workdir,
  )
  loop.train(fields.in_layout_of(c2, workdir), workdir)
  summary = {
    "cluster": {"source": source, "step": step, "examples": len(hdata.cluster_indices(config))},
    "users": [
      {"user": u, "class": int(c), "shots": [int(i) for i in idx]}
      for u, (c, idx) in enumerate(
        zip(config.hybrid.user_classes, hdata.user_shot_indices(config), strict=True)
      )
    ],
    "personal_steps": int(c2.total_steps),
    "prior_weight": float(config.hybrid.prior_weight),
  }
  fileio.write_json(os.path.join(workdir, "train_summary.json"), summary, indent=1)
  return summary


if __name__ == "__main__":
  import sys

  from common.train import cli
  from hybrid import fields

  fields.exit_if_renamed(sys.argv)
  cli.config_workdir_binary(run, workdir_help="Run directory (stage 2; stage 1 in cluster/).")
