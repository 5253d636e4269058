"""The one training loop every method runs, extended through ``Method`` hooks.

Reads top to bottom like big_vision's ``train.py``: validate, mesh, input, model, shard, update,
checkpoint, loop. The step is a pure function of (state, batch) compiled once by ``jax.jit`` with
explicit shardings and a donated state, so the same code runs on one CPU, on 8 forced CPU devices
in the tests, on a GPU and on a TPU slice; only ``config.mesh`` changes.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from common import checkpoint, data, images, parallel
from common.train import compute, drift
from common.train import validate as validate_lib
from common.train.logger import MetricLogger
from common.train.method import Method, load_method
from common.train.state import TrainState


class NonFiniteLossError(FloatingPointError):
  """The loss diverged (NaN, infinite, or ``DIVERGED_LOSS_FACTOR`` above its recent median); the
  message names the step and the last good checkpoint."""


def setup(config: ml_collections.ConfigDict, *, devices: list | None = None):
  """Validates ``config`` and builds the mesh and the method, writing nothing anywhere.

  Returns:
    (mesh, method). Raises ``validate.ConfigError`` (one line, names the field) on a bad value.
  """
  devices = list(jax.devices() if devices is None else devices)
  mesh_shape = validate_lib.validate_common(
    config, num_devices=len(devices), process_count=jax.process_count()
  )
  data_info = validate_lib.validate_data(config)
  method = load_method(config, data_info)
  validate_lib.validate_model(config, method.check_networks)
  mesh = parallel.make_mesh(mesh_shape, devices)
  return mesh, method


def _seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """A run's two keys from its seed: the parameters' init key and the state's step key."""
  rng = jax.random.PRNGKey(int(seed))
  return jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)


def make_init_fn(method: Method, tx: optax.GradientTransformation, seed: int):
  def init(rng_unused=None):
    del rng_unused
    params_key, state_key = _seed_keys(seed)
    params = method.init_params(params_key)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=method.init_opt_state(tx, params),
      rng=state_key,
    )

  return init


def start_state(config, method: Method, fns: dict, params) -> TrainState:
  """The step-0 state of a run that starts from given weights, as ``init`` would make it around
  them: the same step and rng, EMA = ``params``, a fresh optimizer state; placed with the run's
  shardings (``fns`` from :func:`build`). Built on the host, identical in every process: the
  random init of every parameter, which ``params`` replaces, is neither traced nor compiled
  (adaptive's stage 2 spent 28 s there).

  Args:
    params: a pure tree of host arrays with the tree and shapes of ``fns["abstract_state"].params``.
  """
  want = fns["abstract_state"].params
  if jax.tree.structure(params) != jax.tree.structure(want):
    raise ValueError(
      f"start_state: the parameter tree differs from the run's: {jax.tree.structure(params)}"
    )
  # Same shapes as the loop's own init: its restore of the checkpoint checks this.
  jax.tree.map(lambda a, b: np.testing.assert_equal(np.shape(a), b.shape), params, want)
  params = jax.tree.map(np.asarray, params)
  # One program for the whole optimizer state: eagerly, each leaf shape's zeros was its own
  # compiled program (adaptive's stage 2: ~45 of them, ~5 s).
  init_opt = jax.jit(
    functools.partial(method.init_opt_state, method.make_optimizer()[0]),
    compiler_options=run_once_options(method.mesh),
  )
  state = TrainState(
    step=np.zeros((), np.int32),
    params=params,
    ema_params=jax.tree.map(lambda a: a.copy(), params),
    opt_state=jax.tree.map(np.asarray, init_opt(params)),
    rng=np.asarray(_seed_keys(config.seed)[1]),  # make_init_fn's
  )
  return jax.device_put(state, fns["state_shardings"])


# XLA:CPU spends most of an init program's compile in LLVM's -O2 passes over the random number
# generator of every parameter; LLVM -O1 compiles it 2-4x faster (collab digits: 16.7 -> 4.6 s,
# hybrid 17.7 -> 5.1 s, ddpm 6.2 -> 2.4 s) and, for a program that runs once, its slower code
# costs milliseconds. -O1 keeps the floating-point results bit-identical (tested for every method
# in tests/common/test_train.py); -O0 does not (it forms no fused multiply-adds: the embeddings'
# normal draws move by one ulp). The fusion emitters are XLA's default; set here too because a
# process that turns them off for its steps (the tests' flags, tests/conftest.py) would otherwise
# compile the init without them: the same bits, 15-25% slower to compile (tiny collab init 7.6-9.6
# against 6.9-7.2 s, ddpm 3.0-3.3 against 2.4-2.8 s, three alternating compiles each).
RUN_ONCE_CPU_OPTIONS = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": True}


def run_once_options(mesh) -> dict | None:
  """Compiler options for a program that runs once (the state's init): faster to compile on the
  CPU, the same numbers; None (XLA's defaults) on other platforms."""
  platform = mesh.devices.flat[0].platform
  return dict(RUN_ONCE_CPU_OPTIONS) if platform == "cpu" else None


def build(config, method: Method, mesh):
  """Compiles-on-first-use init and step functions with explicit shardings.

  Returns:
    dict with ``init`` (jitted, -> sharded TrainState), ``step`` (jitted, donated state),
    ``abstract_state`` (ShapeDtypeStructs carrying the shardings), ``batch_sharding``,
    ``flops_counting_step`` (``Method.make_flops_counting_step`` jitted, or None).
  """
  method.mesh = mesh
  tx, lr_schedule = method.make_optimizer()
  init_fn = make_init_fn(method, tx, config.seed)
  abstract = jax.eval_shape(init_fn)
  state_sh = method.state_shardings(mesh, abstract)
  batch_sh = parallel.batch_sharding(mesh)
  abstract_state = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, state_sh
  )
  init = jax.jit(init_fn, out_shardings=state_sh, compiler_options=run_once_options(mesh))
  step = jax.jit(
    method.make_train_step(tx, lr_schedule, config.ema_decay),
    in_shardings=(state_sh, batch_sh),
    out_shardings=(state_sh, parallel.replicated(mesh)),
    donate_argnums=(0,),
  )
  counting = method.make_flops_counting_step(tx, lr_schedule, config.ema_decay)
  return {
    "init": init,
    "step": step,
    # Lowered only, by compute.measure_step: never compiled nor run.
    "flops_counting_step": None if counting is None else jax.jit(counting),
    "abstract_state": abstract_state,
    "batch_sharding": batch_sh,
    "state_shardings": state_sh,
  }


def step_cost(config, *, devices: list | None = None) -> dict[str, Any]:
  """The cost of one train step under ``config``, from its lowered program alone (nothing is
  compiled, run or written: seconds): how many steps a training budget in FLOPs buys.

  Returns ``compute.measure_step``'s record plus ``flops_per_image`` (``step_flops /
  images_per_step``).
  A method whose binary trains several configs (adaptive: ``adaptive.stages.stage1_config``)
  is measured on the one given.
  """
  mesh, method = setup(config, devices=devices)
  fns = build(config, method, mesh)
  batch = next(method.train_iterator(process_index=0, process_count=1))
  batch = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=fns["batch_sharding"]), batch
  )
  record = compute.measure_step(
    fns["step"],
    fns["abstract_state"],
    batch,
    devices=mesh.size,
    images_per_step=method.images_per_step(),
    counting_fn=fns["flops_counting_step"],
  )
  flops = record["step_flops"]
  return {**record, "flops_per_image": None if flops is None else flops / record["images_per_step"]}


# A loss this many times the median of the recent ones is a divergence even while it is finite:
# healthy diffusion losses move by a few x over a run, an exploding update by orders of magnitude.
DIVERGED_LOSS_FACTOR = 1e3
_RECENT_LOSSES = 50


def _divergence(loss: float, recent: collections.deque) -> str | None:
  if not math.isfinite(loss):
    return f"non-finite loss ({loss})"
  if recent and loss > DIVERGED_LOSS_FACTOR * float(np.median(recent)):
    return (
      f"loss {loss:.4g}, over {DIVERGED_LOSS_FACTOR:g}x the recent median {np.median(recent):.4g},"
    )
  return None


def _vouch_for_checkpoints(host_metrics, ckpt, provisional: list[int], recent) -> None:
  """Confirms or discards the provisional checkpoints by the losses of the steps after them.

  ``host_metrics``: ``(done, metrics)`` pairs in order, where ``metrics["loss"]`` was computed
  from the parameters after ``done - 1`` updates. A healthy loss (finite, and not over
  ``DIVERGED_LOSS_FACTOR`` times the median of the ``recent`` ones) confirms every provisional
  checkpoint up to ``done - 1``; a diverged one discards checkpoint ``done - 1`` (the parameters
  that produced it) and raises, naming the newest checkpoint that is still good.
  """
  for done, m in host_metrics:
    loss = float(m["loss"])
    why = _divergence(loss, recent)
    if why is None:
      recent.append(loss)
      for step in [s for s in provisional if s <= done - 1]:
        ckpt.confirm(step)
        provisional.remove(step)
      continue
    removed = [s for s in provisional if s >= done - 1]
    for step in removed:
      ckpt.discard(step)
      provisional.remove(step)
    good = ckpt.latest_good_step()
    where = (
      f"The last good checkpoint is step {good}: a rerun with a lower learning rate and "
      f"--allow_config_change=optimizer.learning_rate resumes from it."
      if good is not None
      else "No checkpoint was saved yet."
    )
    gone = f"checkpoint {removed[0]} (past the divergence) was removed. " if removed else ""
    raise NonFiniteLossError(f"{why} at step {done}; stopping without saving, {gone}{where}")


def save_samples(
  method: Method, params, config, path: str, seed_offset: int, *, write: bool = True
) -> str:
  """Draws the method's sample grid with ``params`` (EMA by convention) and writes it to ``path``
  when ``write``.

  With several processes every process must call this: the sampler is one program over the
  run's devices, and a method's sampler may hold collectives (collab's sharded clients), which
  would wait forever for processes that skipped it. Only the one told to ``write`` does.
  """
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 10_000 + seed_offset)
  samples, ncols, row_names = method.sample_grid(params, rng, config.num_sample_images)
  if isinstance(samples, jax.Array) and not samples.is_fully_addressable:
    from jax.experimental import multihost_utils

    samples = multihost_utils.process_allgather(samples, tiled=True)
  if write:
    images.save_grid(path, np.asarray(samples), ncols=ncols, row_labels=row_names)
  return path


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  devices: list | None = None,
  method: Method | None = None,
  resumable: tuple[str, ...] = (),
) -> TrainState:
  """Trains (or resumes) the run in ``workdir`` to ``config.total_steps``; returns the state.

  A resume refuses a config that differs from the saved one (``drift``) except in the fields
  ``drift.RESUMABLE``, ``resumable`` (patterns this caller knows do not affect this run), the
  method's ``layout_fields`` and ``--allow_config_change`` name.
  """
  # --- Validate and set up: nothing is written before this succeeds. ------------------------
  mesh, default_method = setup(config, devices=devices)
  method = method or default_method
  is_main = jax.process_index() == 0
  logging.info("mesh %s over %d devices; method %s", dict(mesh.shape), mesh.size, method.name)

  # --- Input: each process reads its own slice; slices become one global array. --------------
  data_iter = method.train_iterator(
    process_index=jax.process_index(), process_count=jax.process_count()
  )

  # --- Model, optimizer and shardings. -------------------------------------------------------
  fns = build(config, method, mesh)
  try:
    rows = method.images_per_step()
    mine = data.process_rows(rows, jax.process_index(), jax.process_count())
    parallel.check_process_rows(fns["batch_sharding"], rows, mine)
  except ValueError as e:
    raise validate_lib.ConfigError("mesh", dict(mesh.shape), str(e)) from None
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(fns["abstract_state"].params))
  logging.info("parameters: %s", f"{n_params:,}")

  # --- Checkpoint: resume from the newest intact one if the workdir has any. -----------------
  ckpt_dir = os.path.join(workdir, "checkpoints")
  resuming = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
  resumable = tuple(resumable) + tuple(method.layout_fields)
  config_changes = drift.check_resume(workdir, config, resumable) if resuming else {}
  os.makedirs(workdir, exist_ok=True)
  config_json = config.to_json_best_effort(sort_keys=True, indent=2)
  ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints)
  ckpt.install_signal_handler()
  logger = MetricLogger(
    workdir, total_steps=config.total_steps, batch_size=method.images_per_step(), enabled=is_main
  )
  try:
    ckpt.set_compiling(True, "no checkpoint yet: a rerun starts from step 0")
    latest, state = ckpt.restore_latest(fns["abstract_state"], data_iter)
    if latest is not None:
      logging.info("resuming from %s/%d", ckpt.directory, latest)
      ckpt.set_compiling(True, f"a rerun resumes from step {latest}")
    else:
      state = fns["init"]()
    start = int(jax.device_get(state.step))
    if is_main:
      drift.record(workdir, config_json, config_changes, start)
    logger.truncate_after(start)
    state = _train_steps(config, workdir, method, fns, ckpt, logger, state, data_iter, config_json)
  except BaseException:
    ckpt.close(failed=True)
    logger.close()
    raise
  ckpt.close()
  logger.close()
  return state


def _train_steps(config, workdir, method, fns, ckpt, logger, state, data_iter, config_json):
  """The loop from ``state.step`` to ``config.total_steps`` (or a preemption); returns the state.

  Checkpoints at regular steps are provisional until the next step's loss is finite
  (``_vouch_for_checkpoints``); the last step's and a preemption's are sealed on finite parameters.
  """
  is_main = jax.process_index() == 0
  start, total = int(jax.device_get(state.step)), config.total_steps
  pending: list[tuple[int, Any]] = []  # device metrics not yet checked or logged
  window: list[dict] = []  # host metrics since the last log line
  provisional = [start] if ckpt.is_adopted(start) else []
  recent: collections.deque = collections.deque(maxlen=_RECENT_LOSSES)
  segment = None  # this invocation's train_compute.json record (common.train.compute)
  logger.start(start)
  for step in range(start, total):
    batch = parallel.global_batch(next(data_iter), fns["batch_sharding"])
    state, metrics = fns["step"](state, batch)
    if step == start:
      ckpt.set_compiling(False)
      # After the first call: the step's lowering and executable are cached, so this is cheap.
      segment = compute.measure_step(
        fns["step"],
        state,
        batch,
        devices=method.mesh.size,
        images_per_step=method.images_per_step(),
        counting_fn=fns["flops_counting_step"],
      )
    done = step + 1
    pending.append((done, metrics))
    is_last = done == total
    stop = ckpt.should_stop(done)
    log_now = done % config.log_every_steps == 0 or is_last
    save_now = done % config.ckpt_every_steps == 0 or is_last or stop
    if log_now or save_now:
      # One device->host copy per log/save interval; a NaN is always caught before a save.
      host = jax.device_get(pending)
      pending = []
      _vouch_for_checkpoints(host, ckpt, provisional, recent)
      window.extend(m for _, m in host)
    if log_now:
      scalars = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
      scalars["lr"] = float(window[-1]["lr"])
      logger.write(done, scalars)
      window = []
    if save_now:
      bad = checkpoint.integrity.nonfinite_leaves(state)
      if bad:
        raise NonFiniteLossError(
          f"non-finite values in {bad[0]} after step {done} ({len(bad)} arrays); stopping "
          f"without saving. The last good checkpoint is step {ckpt.latest_good_step()}"
          " (None: no checkpoint was saved yet)."
        )
      final = is_last or stop
      if ckpt.save(done, state, data_iter, config_json, force=True, provisional=not final):
        provisional.extend([] if final else [done])
      if is_main:
        # Steps up to the newest checkpoint: what a resume keeps.
        compute.record(workdir, start, done, segment)
    sample_every = config.sample_every_steps
    grid_due = (sample_every and done % sample_every == 0) or is_last
    if grid_due and config.num_sample_images:  # 0: no grids (runs evaluated separately)
      path = os.path.join(workdir, "samples", f"step_{done:07d}.png")
      save_samples(method, state.ema_params, config, path, done, write=is_main)
      if is_main:
        logging.info("sample grid (EMA weights): %s", path)
    if stop:
      logging.warning("preempted: saved step %d, stopping cleanly", done)
      break
  return state


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved in ``workdir/config.json``."""
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


__all__ = [
  "NonFiniteLossError",
  "TrainState",
  "build",
  "load_config",
  "setup",
  "train",
]
