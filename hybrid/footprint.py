"""Storage and memory of the hybrid design against a full personalized model per user.

``python -m hybrid.footprint --config=configs/hybrid.py:digits [--workdir=RUN --device_batch=1
--edge_batch=C --out=footprint.json]`` prints the table; ``hybrid.optimize`` puts the same table
(``measure`` + ``markdown``) in ``results.md`` and ``results.json``.

What is compared (spec §1): in the hybrid design the edge stores one cluster-wide network for the
whole cluster and runs levels T..n+1 of every admitted request in one batch, and each device stores
its user's personalized network and runs levels n..1 (``hybrid.device.device_fn_for``: the device
holds its own slice, never the cluster's). The alternative is a full personalized model per user:
U networks stored (at the edge, the paper's "storing one model per user at the edge is too costly",
or one on each device), each request run from level T by its user's network.

Storage counts the parameter trees the run builds (``Hybrid.init_params``, or a trained run's
loaded arrays with ``--workdir``): the sum over leaves of size x itemsize at the stored dtype, i.e.
``nbytes``. A user's serving state is its slice of the stacked personalized tree (the EMA weights
``load_run`` serves); the edge keeps no per-user state between windows (a request's latent is in
flight only). The training-state row counts stage 2's train state (params, EMA params and Adam's
moments per user, ``hybrid.method``), the per-user part of what ``hybrid.train`` checkpoints,
against one network's train state fine-tuned on its own (``common.train.method.DDPM``).

Memory is XLA's ``compiled.memory_analysis()`` of the jitted programs, lowered on abstract
arguments and compiled for this process's backend (nothing is allocated or run): ``peak`` =
argument + output - alias + temp bytes, i.e. the parameters the program reads, the latents and
keys in and out and XLA's temporary buffers (activations of the U-Net call inside the sampling
loop, and any copy the program makes of a parameter slice), without the executable's code.
``xla_peak`` is XLA's own ``peak_memory_in_bytes`` as the backend reports it, kept in the JSON
only: on XLA:CPU it came out at about argument + output, below what the temporaries add (e.g.
3.12 MB against 4.68 MB for the digits edge), so it is not the figure used. On XLA:CPU the
temporaries stand in for an accelerator's (the buffers are the same, the fusion is not). Programs:

* device, hybrid: ``Programs.device_chain`` with one user's slice at ``device_batch`` rows (the
  program ``device_denoise`` runs; the levels are traced arguments, so it is one executable for
  every cut point n);
* device, full: the core's one-segment sampler (``sampling.sample_chain``, levels T..0) of one
  personalized network at ``device_batch`` rows, what a user without an edge runs;
* edge, hybrid: ``Programs.chain`` of the cluster-wide network at ``edge_batch`` rows (default
  ``scheduler.system.capacity``), every admitted request in one batch;
* edge, full: ``Programs.device_chain`` over all U personalized networks (the edge holds each
  user's model) at one row: a request run by its own user's network, one call per request (what
  ``hybrid_sample`` runs per user; its temporaries include the copy of that user's slice).

Training the personalized part is not part of the device's job in this design (stage 2 runs in
``hybrid.train``), so no device train step is compiled.
"""

from __future__ import annotations

import functools
import json
import math
import time
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from common.diffusion import sampling


def tree_bytes(tree) -> int:
  """Sum over ``tree``'s leaves (arrays or ``ShapeDtypeStruct``s) of size x itemsize."""
  return sum(
    int(math.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
  )


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _method(config):
  from common import data
  from hybrid import method as hmethod

  return hmethod.Hybrid(config, data.get_info(config.data))


class _Trees(NamedTuple):
  """What both measurements start from, built once: the method, the hybrid tree ``{'cluster':
  tree, 'users': tree with a leading U axis}`` and one full network's tree (abstract unless a
  run's real tree was given)."""

  method: Any
  hybrid: Any
  full: Any


def model_params(config, params=None) -> _Trees:
  """The hybrid tree and one full network's tree, both abstract (``ShapeDtypeStruct``s) unless
  ``params`` (a run's real hybrid tree) is given, with the method that built them."""
  from common.train.method import DDPM

  method = _method(config)
  key = jax.random.key(0)
  hybrid = _abstract(params) if params is not None else jax.eval_shape(method.init_params, key)
  # A full personalized model is one network of the config's architecture, built on its own (not
  # read off the hybrid tree), so the comparison would show a mismatch.
  full = jax.eval_shape(functools.partial(DDPM.init_params, method), key)
  return _Trees(method, hybrid, full)


def _train_state_bytes(config, method) -> dict[str, int]:
  """Per-user bytes of stage 2's train state (params + EMA + optimizer state of the users' stacked
  tree, over U) and of one network's train state trained on its own."""
  from common.train import loop
  from common.train.method import DDPM

  tx, _ = method.make_optimizer()
  state = jax.eval_shape(loop.make_init_fn(method, tx, int(config.seed)))
  users = (state.params["users"], state.ema_params["users"], state.opt_state["users"])
  single = DDPM(config, method.data_info)
  one = jax.eval_shape(loop.make_init_fn(single, tx, int(config.seed)))
  return {
    "hybrid": tree_bytes(users) // method.num_users,
    "full": tree_bytes((one.params, one.ema_params, one.opt_state)),
  }


def storage(config, params=None) -> dict[str, Any]:
  """Bytes stored, hybrid against a full personalized model per user (see the module docstring).

  Args:
    config: a hybrid config (its ``model``, ``data``, ``hybrid.num_users``).
    params: optional real hybrid tree ``{'cluster', 'users'}`` (a trained run's); default the
      config's tree, shape-only.

  Returns:
    ``num_users`` U, ``cluster`` (the shared network), ``per_user`` / ``train_state_per_user``
    ``{'hybrid', 'full'}``, ``edge_total`` and ``total`` ``{'hybrid', 'full'}`` for U users; bytes.
  """
  return _storage(config, model_params(config, params))


def _storage(config, trees: _Trees) -> dict[str, Any]:
  hybrid, full = trees.hybrid, trees.full
  users = hybrid["users"]
  u = int(jax.tree.leaves(users)[0].shape[0])
  one_user = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), users)
  chex.assert_trees_all_equal_shapes(one_user, full)
  cluster, per_user, full_bytes = (
    tree_bytes(hybrid["cluster"]),
    tree_bytes(one_user),
    tree_bytes(full),
  )
  return {
    "num_users": u,
    "dtypes": sorted({str(np.dtype(a.dtype)) for a in jax.tree.leaves(users)}),
    "cluster": cluster,
    "per_user": {"hybrid": per_user, "full": full_bytes},
    "train_state_per_user": _train_state_bytes(config, trees.method),
    # The edge: one cluster-wide network, against one network per user.
    "edge_total": {"hybrid": cluster, "full": u * full_bytes},
    # Everywhere: the cluster-wide network once plus U personalized parts, against U networks.
    "total": {"hybrid": cluster + u * per_user, "full": u * full_bytes},
  }


def _xla_memory(lowered) -> dict[str, int]:
  """XLA's figures of a lowered program, compiled here."""
  t0 = time.perf_counter()
  stats = lowered.compile().memory_analysis()
  compile_s = time.perf_counter() - t0
  if stats is None:
    raise RuntimeError(f"{jax.default_backend()} reports no memory analysis")
  out = {
    "argument": int(stats.argument_size_in_bytes),
    "output": int(stats.output_size_in_bytes),
    "alias": int(stats.alias_size_in_bytes),
    "temp": int(stats.temp_size_in_bytes),
  }
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["xla_peak"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
  out["compile_s"] = round(compile_s, 2)
  return out


def memory(config, params=None, *, device_batch: int = 1, edge_batch: int | None = None):
  """Peak bytes of the device's and the edge's sampling programs, hybrid against full (see the
  module docstring for the programs and what ``peak`` includes).

  Args:
    config: a hybrid config.
    params: optional real hybrid tree (only its shapes and dtypes matter).
    device_batch: rows of the device's program (a device runs its own request: 1).
    edge_batch: rows of the edge's batch; default ``scheduler.system.capacity``.

  Returns:
    ``{'device': {'hybrid', 'full'}, 'edge': {'hybrid', 'full'}}`` of ``_xla_memory`` dicts,
    and the batches.
  """
  return _memory(config, model_params(config, params), device_batch, edge_batch)


def _memory(config, trees: _Trees, device_batch: int, edge_batch: int | None):
  from common import data
  from hybrid import models

  if edge_batch is None:
    edge_batch = int(config.scheduler.system.capacity)
  if device_batch < 1 or edge_batch < 1:
    raise ValueError(f"batches must be >= 1, got device {device_batch}, edge {edge_batch}")
  hybrid, full = trees.hybrid, trees.full
  programs = models.programs_for(config)
  info = data.get_info(config.data)
  shape = (info.resolution, info.resolution, info.channels)
  big_t = int(programs.num_timesteps)

  def args(b):
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
    level = jax.ShapeDtypeStruct((b,), jnp.int32)
    return jax.ShapeDtypeStruct((b, *shape), jnp.float32), level, keys

  one_user = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype), hybrid["users"]
  )
  user = jax.ShapeDtypeStruct((), jnp.int32)
  x, level, keys = args(device_batch)
  device_hybrid = programs.device_chain.lower(one_user, user, x, level, keys)

  # The full model as its own program (one static scan over T..0): device_chain started at T
  # would be the hybrid's executable itself, the levels being arguments.
  def full_chain(params, x_T, keys):
    seg = sampling.Segment(lambda x, t, y: programs.apply(params, x, t), big_t, 0, side="device")
    return sampling.sample_chain(
      programs.diffusion, [seg], x_T, keys, levels=programs.levels, sampler=programs.sampler,
      eta=programs.eta, clip_denoised=programs.clip_denoised, **programs.x0_clipping,
    )  # fmt: skip

  device_full = jax.jit(full_chain).lower(full, x, keys)
  x, level, keys = args(edge_batch)
  edge_hybrid = programs.chain.lower(hybrid["cluster"], x, level, level, keys)
  x, level, keys = args(1)
  edge_full = programs.device_chain.lower(hybrid["users"], user, x, level, keys)
  return {
    "device_batch": int(device_batch),
    "edge_batch": int(edge_batch),
    "backend": jax.default_backend(),
    "device": {"hybrid": _xla_memory(device_hybrid), "full": _xla_memory(device_full)},
    "edge": {"hybrid": _xla_memory(edge_hybrid), "full": _xla_memory(edge_full)},
  }


def measure(config, params=None, *, device_batch: int = 1, edge_batch: int | None = None):
  """``{'storage': storage(...), 'memory': memory(...)}`` of one config (or a run's tree)."""
  trees = model_params(config, params)
  return {
    "storage": _storage(config, trees),
    "memory": _memory(config, trees, device_batch, edge_batch),
  }


def _mib(n: int) -> str:
  return f"{n / 2**20:.3f}"


def _ratio(full: int, hybrid: int) -> str:
  return f"{full / hybrid:.2f}" if hybrid else "-"


def markdown(fp: dict[str, Any]) -> list[str]:
  """The table of ``measure``'s result (MiB; the last column is full / hybrid)."""
  s, m = fp["storage"], fp["memory"]
  u = s["num_users"]
  rows = [
    ("stored per user: its personalized parameters (hybrid: on its device)", s["per_user"]),
    ("stored per user: training state (params + EMA + Adam)", s["train_state_per_user"]),
    (f"stored at the edge, {u} users (hybrid: the cluster-wide network once)", s["edge_total"]),
    (f"stored in all, {u} users (hybrid: cluster-wide + {u} personalized)", s["total"]),
  ]
  dev, edge = m["device"], m["edge"]
  rows += [
    (
      f"device peak, sampling at batch {m['device_batch']} (hybrid: n of T levels; full: T)",
      {k: v["peak"] for k, v in dev.items()},
    ),
    (
      f"edge peak, sampling (hybrid: one batch of {m['edge_batch']} requests; full: "
      f"{u} networks held, one request a call)",
      {k: v["peak"] for k, v in edge.items()},
    ),
  ]
  lines = [
    f"Parameters {', '.join(s['dtypes'])}; peak = XLA's argument + output - alias + temp bytes "
    f"of the compiled sampling program ({m['backend']}); MiB.",
    "",
    "| quantity | hybrid | full personalized model per user | full / hybrid |",
    "|---|---|---|---|",
  ]
  for name, v in rows:
    lines.append(f"| {name} | {_mib(v['hybrid'])} | {_mib(v['full'])} | "
                 f"{_ratio(v['full'], v['hybrid'])} |")  # fmt: skip
  return lines


# ------------------------------------------------------------------------------------------------
# The binary.


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Hybrid config and preset.")
  return {
    "workdir": flags.DEFINE_string(
      "workdir", None, "Optional finished hybrid.train run: count its loaded arrays."
    ),
    "device_batch": flags.DEFINE_integer("device_batch", 1, "Rows of the device's program."),
    "edge_batch": flags.DEFINE_integer(
      "edge_batch", None, "Rows of the edge's batch (default scheduler.system.capacity)."
    ),
    "out": flags.DEFINE_string("out", None, "Also write the figures to this JSON file."),
  }


def main(argv, flag_values) -> None:
  from absl import app, flags

  from common import fileio
  from common.train import cli

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.start_binary()
  config, params = flags.FLAGS.config, None
  if flag_values["workdir"].value:
    from hybrid import models

    run = models.load_run(flag_values["workdir"].value, require_finished=False)
    config = run.config
    params = {"cluster": run.cluster_params, "users": run.personal_params}
  fp = measure(
    config,
    params,
    device_batch=flag_values["device_batch"].value,
    edge_batch=flag_values["edge_batch"].value,
  )
  print("\n".join(markdown(fp)))
  if flag_values["out"].value:
    fileio.write_json(flag_values["out"].value, fp, indent=1)
  print(json.dumps(fp, sort_keys=True))


if __name__ == "__main__":
  from absl import app, flags

  _flags = _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: main(argv, _flags))
