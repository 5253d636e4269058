"""The shared loop's jitted train step of a config, compiled and warmed up, for the benchmarks
that time it in interleaved rounds (``batch_scaling.py``, ``host_memory.py``), and the CPU
settings the binaries run it with. No flags here, so several benchmarks can import it."""

from __future__ import annotations

import jax


def as_the_binaries(model_name: str) -> None:
  """What a binary sets for a run of ``config.model.name == model_name`` on a CPU: its XLA:CPU
  defaults (``xla_flags``) and kept host memory (``host_memory``). Call it before anything
  creates a JAX backend, as the binaries do."""
  from common.train import host_memory, xla_flags

  xla_flags.apply_cpu_defaults(model_name)
  host_memory.keep_freed(jax.default_backend())


def prepared(config, batch_size: int):
  """``(step, state, batch)`` of ``config`` at ``batch_size`` on one device, after two steps.

  ``step`` is ``common.train.loop.build``'s jitted step (it donates the state: carry on with the
  state it returns); ``batch`` is the method's first training batch, placed as the step expects.
  """
  from common import parallel
  from common.train import loop

  c = config.copy_and_resolve_references()
  c.batch_size = batch_size
  c.mesh.data = 1
  mesh, method = loop.setup(c, devices=jax.devices()[:1])
  fns = loop.build(c, method, mesh)
  state = fns["init"]()
  batch = parallel.global_batch(
    next(method.train_iterator(process_index=0, process_count=1)), fns["batch_sharding"]
  )
  for _ in range(2):
    state, metrics = fns["step"](state, batch)
  jax.block_until_ready(metrics)
  return fns["step"], state, batch
