"""Compile time and step time of one train step under each party loop, side by side in one process.

  python benchmarks/party_loops.py --config=configs/collab.py:digits
  python benchmarks/party_loops.py --config=configs/hybrid.py:digits --loops=scan,unroll

For collab's clients (``collab.client_loop``) or hybrid's users (``hybrid.user_loop``), the
real step the trainer compiles (``loop.build``: shardings, donation, optimizer, EMA) is built and
compiled once per loop, then every step is timed in interleaved rounds from the same start, so
a ratio is measured on the same machine load; the last lines say whether the loops' parameters
are equal bit for bit after the timed steps. The binaries' XLA:CPU settings apply
(``common.train.xla_flags``, ``common.train.host_memory``). ``common.train.parties`` says what
each loop is.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and preset.")
_LOOPS = flags.DEFINE_list("loops", ["unroll", "scan"], "Party loops to compare.")
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Timed steps of each loop, interleaved.")

_FIELD = {"collab": "collab.client_loop", "hybrid": "hybrid.user_loop"}


def _build(config, loop_name: str):
  """The compiled step, its start state and a real batch under ``loop_name``; compile seconds."""
  import jax

  from common.train import loop

  with config.unlocked():
    config.update_from_flattened_dict({_FIELD[config.method]: loop_name, "mesh.data": 1})
  mesh, method = loop.setup(config, devices=jax.devices()[:1])
  fns = loop.build(config, method, mesh)
  batch = next(method.train_iterator(process_index=0, process_count=1))
  batch = jax.device_put(batch, fns["batch_sharding"])
  state = fns["init"]()
  t0 = time.perf_counter()
  step = fns["step"].lower(state, batch).compile()
  return step, state, batch, time.perf_counter() - t0


def main(argv):
  del argv
  config = _CONFIG.value
  if config.method not in _FIELD:
    raise app.UsageError(
      f"--config: method {config.method!r} has no party loop; allowed: collab, hybrid"
    )
  from common.train import host_memory, xla_flags

  xla_flags.apply_cpu_defaults(config.model.name)
  import jax
  import numpy as np

  host_memory.keep_freed(jax.default_backend())
  runs = {}
  for name in _LOOPS.value:
    step, state, batch, compile_s = _build(config.copy_and_resolve_references(), name)
    runs[name] = {"step": step, "state": state, "batch": batch, "compile_s": compile_s, "ms": []}
    print(f"{name}: compiled in {compile_s:.1f} s", flush=True)
  for run in runs.values():  # two warm-up steps each
    for _ in range(2):
      run["state"], _ = run["step"](run["state"], run["batch"])
    jax.block_until_ready(run["state"])
  for _ in range(_ROUNDS.value):
    for run in runs.values():
      t0 = time.perf_counter()
      run["state"], _ = run["step"](run["state"], run["batch"])
      jax.block_until_ready(run["state"])
      run["ms"].append(1000 * (time.perf_counter() - t0))
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(
    f"{config.method}, {_FIELD[config.method]}; {jax.devices()[0].device_kind}; load {load:.1f}"
  )
  print(f"{'loop':<8} {'compile s':>10} {'step ms median':>15} {'min':>8} {'max':>8}")
  for name, run in runs.items():
    ms = np.asarray(run["ms"])
    print(
      f"{name:<8} {run['compile_s']:>10.1f} {np.median(ms):>15.1f} {ms.min():>8.1f} {ms.max():>8.1f}"
    )
  names = list(runs)
  flat = {
    n: np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(runs[n]["state"].params)])
    for n in names
  }
  for other in names[1:]:
    same = bool(np.array_equal(flat[names[0]], flat[other]))
    diff = float(np.max(np.abs(flat[names[0]] - flat[other])))
    print(
      f"params after {_ROUNDS.value + 2} steps, {other} vs {names[0]}: "
      f"{'equal bit for bit' if same else f'max |difference| {diff:.3g}'}"
    )
  base = names[0]
  for other in names[1:]:
    ratio_c = runs[other]["compile_s"] / runs[base]["compile_s"]
    ratio_s = np.median(runs[other]["ms"]) / np.median(runs[base]["ms"])
    print(f"{other} / {base}: compile {ratio_c:.2f}, step {ratio_s:.2f}")


if __name__ == "__main__":
  app.run(main)
