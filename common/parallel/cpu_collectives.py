"""Several CPU processes (gloo collectives): opening every device group of a mesh while the
processes are in step.

gloo connects the devices of a group (a "clique") the first time a program runs a collective over
them, and that connection gives up after a fixed 30 s when a peer has not arrived: measured here,
process 0 ahead of process 1 by 45 s at its first collective over a new group fails with
``Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() timed out``; once a group is
connected, a collective waits for a late peer as long as it takes (70 s, no error). Processes of
one job compile each program on their own, so on a loaded machine one can reach a new program's
first collective much later than another (what failed a 1 -> 2 process resume in CI before its
first step). ``open_groups`` therefore connects, right after a barrier of the coordination service
(which has no such limit), every group the mesh can form: the devices of each subset of its axes,
and all devices (what ``sync_global_devices`` reduces over). Programs that later reduce over mesh
axes (XLA's SPMD collectives) reuse these connections. GPUs and TPUs do not use gloo.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Generous: the processes may still be reading data or restoring a checkpoint at different speeds.
BARRIER_TIMEOUT_S = 3600
_barriers = 0


def needed() -> bool:
  """Several processes on the CPU backend: the case gloo carries the collectives."""
  return jax.process_count() > 1 and jax.default_backend() == "cpu"


def wait_for_peers(name: str) -> None:
  """A barrier of the coordination service (no collective, no 30 s limit) across all processes;
  a no-op with one process. ``name`` says where, for the error if it times out."""
  global _barriers
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost

  _barriers += 1  # barrier ids must be unique per job; every process counts the same calls
  multihost.get_barrier_sync_fn()(
    key=f"segdiff_{name}_{_barriers}", timeout_ms=BARRIER_TIMEOUT_S * 1000
  )


def axis_groups(mesh: Mesh) -> list[tuple[str, ...]]:
  """The subsets of ``mesh``'s axes whose devices form groups of more than one device."""
  names = mesh.axis_names
  return [
    axes
    for r in range(1, len(names) + 1)
    for axes in itertools.combinations(names, r)
    if int(np.prod([mesh.shape[a] for a in axes])) > 1
  ]


def open_groups(mesh: Mesh) -> None:
  """Connects every device group of ``mesh`` and of all devices, with the processes in step.
  Does nothing unless ``needed()``."""
  if not needed():
    return
  wait_for_peers("open_groups")
  groups = axis_groups(mesh)
  for axes in groups:
    _reduce_over(mesh, axes)
  _reduce_over(Mesh(np.asarray(jax.devices()), ("all",)), ("all",))
  logging.info("gloo: connected the device groups of mesh axes %s and of all devices", groups)


def _reduce_over(mesh: Mesh, axes: tuple[str, ...]) -> None:
  spec = P(mesh.axis_names)
  x = jax.make_array_from_callback(
    (mesh.size,), NamedSharding(mesh, spec), lambda _: np.ones((1,), np.float32)
  )
  total = jax.jit(
    jax.shard_map(lambda v: jax.lax.psum(v, axes), mesh=mesh, in_specs=spec, out_specs=spec)
  )(x)
  jax.block_until_ready(total)
