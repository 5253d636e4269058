"""Meshes and shardings: the one module that knows how arrays are laid out over devices.

The mesh has three named axes, ``data``, ``fsdp`` and ``model`` (``model`` is reserved for tensor
parallelism and is 1 today). The global batch is split over ``(data, fsdp)``; parameters, EMA and
optimizer state are split over ``fsdp`` (ZeRO-3 style) on the largest dimension that divides, and
replicated otherwise. The same code runs on 1 CPU, 8 forced CPU devices, a GPU and a TPU slice: only
``config.mesh`` changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
# Arrays smaller than this stay replicated: splitting a bias or a norm scale saves nothing and
# costs an all-gather per use.
MIN_FSDP_SIZE = 2**12


class LaunchError(ValueError):
  """A multi-process launch that is only half specified; the message is one line."""


# Cluster environments whose coordinator JAX finds itself (TPU pods, SLURM, Kubernetes jobs).
_AUTO_DETECTED = (
  "COORDINATOR_ADDRESS",
  "TPU_WORKER_HOSTNAMES",
  "MEGASCALE_COORDINATOR_ADDRESS",
  "OMPI_COMM_WORLD_SIZE",
)


def launch_settings(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  env: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
  """How this process joins a multi-process run, from flags, else the environment.

  Each of the three comes from its argument (the binaries' ``--coordinator_address``,
  ``--num_processes``, ``--process_id``) or, when that is None, ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. Returns ``{"coordinator_address", "num_processes",
  "process_id"}`` when all three are set; ``{}`` when none is but a cluster JAX detects by itself
  is (a TPU pod slice, SLURM with more than one task, ...); None for a single-process run.

  Raises:
    LaunchError: some of the three are set and others are not, or a value is malformed.
  """
  env = os.environ if env is None else env
  given = {
    "coordinator_address": coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None,
    "num_processes": num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES"),
    "process_id": process_id if process_id is not None else env.get("JAX_PROCESS_ID"),
  }
  missing = [k for k, v in given.items() if v is None]
  if len(missing) == 3:
    auto = any(k in env for k in _AUTO_DETECTED) or int(env.get("SLURM_NTASKS", "1")) > 1
    return {} if auto else None
  flag = {k: f"--{k} (or JAX_{k.upper()})" for k in given}
  if missing:
    have = ", ".join(flag[k] for k in given if k not in missing)
    raise LaunchError(
      f"launch error: {have} given but not {', '.join(flag[k] for k in missing)}: a "
      "multi-process launch names all three (or none, on a cluster JAX detects)"
    )
  try:
    n, i = int(given["num_processes"]), int(given["process_id"])
  except ValueError as e:
    raise LaunchError(f"launch error: process count and id must be integers ({e})") from None
  if n < 1 or not 0 <= i < n:
    raise LaunchError(f"launch error: --process_id={i} must be in [0, --num_processes={n})")
  if ":" not in str(given["coordinator_address"]):
    raise LaunchError(
      f"launch error: --coordinator_address={given['coordinator_address']!r} must be host:port"
    )
  return {"coordinator_address": str(given["coordinator_address"]), "num_processes": n,
          "process_id": i}  # fmt: skip


def maybe_initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Calls ``jax.distributed.initialize`` when this is a multi-process launch (``launch_settings``),
  once, before anything asks JAX for its devices.

  The CPU backend's cross-process collectives go through gloo (what a multi-process test on one
  machine runs; GPUs and TPUs use their own, unaffected by it). One process: nothing is
  initialized, so nothing waits for peers that do not exist.
  """
  settings = launch_settings(coordinator_address, num_processes, process_id)
  if settings is None or jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**settings)
  logging.info(
    "jax.distributed initialized: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves ``-1`` in ``config.mesh`` and checks the product against the device count.

  Raises:
    ValueError: naming the field when the mesh does not fit the devices.
  """
  shape = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  free = [a for a, n in shape.items() if n == -1]
  for axis, n in shape.items():
    if n == 0 or n < -1:
      raise ValueError(f"mesh.{axis}={n}: must be a positive integer or -1 (all remaining devices)")
  if len(free) > 1:
    raise ValueError(
      f"mesh: at most one axis may be -1, got {', '.join('mesh.' + a for a in free)}"
    )
  fixed = int(np.prod([n for n in shape.values() if n != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(
        f"mesh.{free[0]}=-1: the other axes use {fixed} devices, which does not divide the "
        f"{num_devices} available devices"
      )
    shape[free[0]] = num_devices // fixed
  total = int(np.prod(list(shape.values())))
  if total > num_devices:
    raise ValueError(
      f"mesh: data*fsdp*model = {shape['data']}*{shape['fsdp']}*{shape['model']} = {total} "
      f"devices, but only {num_devices} are available"
    )
  return shape


def make_mesh(mesh_config: Mapping[str, int], devices: list | None = None) -> Mesh:
  """Builds the ``(data, fsdp, model)`` mesh from ``config.mesh``.

  A mesh smaller than the device count uses the first devices (handy for tests that compare a
  1-device run with an 8-device run in one process). With several CPU processes every process
  must call this at the same point: it connects the mesh's device groups (``cpu_collectives``).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  n = int(np.prod(list(shape.values())))
  # Auto axes: XLA propagates shardings from the jit boundaries (GSPMD), so models need no
  # sharding annotations inside; JAX's default for make_mesh is now Explicit.
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if n == len(devices):
    mesh = jax.make_mesh(tuple(shape.values()), MESH_AXES, axis_types, devices=devices)
  else:
    grid = np.asarray(devices[:n]).reshape(tuple(shape.values()))
    mesh = Mesh(grid, MESH_AXES, axis_types=axis_types)
  from common.parallel import cpu_collectives

  cpu_collectives.open_groups(mesh)  # several CPU processes: see cpu_collectives
  return mesh


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ``(data, fsdp)``; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """The FSDP rule: split the largest dimension divisible by the ``fsdp`` axis, else replicate."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
  """Shardings for a pytree of ``jax.ShapeDtypeStruct`` (params, EMA, optimizer state, step)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), abstract_tree)


def check_process_rows(sharding: NamedSharding, global_batch_size: int, rows: range) -> None:
  """Checks that this process's devices hold exactly ``rows`` of a global batch: the block
  ``common.data.process_rows`` gives its input pipeline.

  Raises:
    ValueError: one line naming the rows the mesh puts on this process, when they differ (a
      device order in which a process's devices are not one block of the batch axes).
  """
  held = set()
  for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
    held.update(range(*index[0].indices(global_batch_size)))
  if held != set(rows):
    lo, hi = (min(held), max(held) + 1) if held else (0, 0)
    raise ValueError(
      f"process {jax.process_index()} of {jax.process_count()} holds rows {lo}..{hi - 1} "
      f"({len(held)} rows) of the {global_batch_size}-row batch, not its block "
      f"{rows.start}..{rows.stop - 1}: the mesh's device order splits processes across the "
      "batch axes"
    )


def global_batch(
  local_batch: Mapping[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global ``jax.Array``s with ``sharding``."""
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }
