"""The hybrid edge server's batched denoising step against the batch size B.

  python benchmarks/hybrid_edge_batch.py --config=configs/hybrid.py:digits
  python benchmarks/hybrid_edge_batch.py --config=configs/hybrid.py:tiny --batch_sizes=1,2 \
      --repeats=3 --chain_levels=2

The edge runs the cluster-wide network on every admitted request in one batch, one network call
per level (``hybrid/models.py``; the latency model charges ``tau_e(B) = k B + h`` per level). What
is timed here is the repo's own code on the configured network with freshly initialised weights
(timing does not depend on the values):

* ``step``: ``hybrid.profile.latency_profile``, the measurement behind ``hybrid.profile``'s
  latency fit: one batched step of ``Programs.step`` leaving level T, median of ``--repeats`` after
  two warm-up calls, round robin over B, with its linear fit ``k B + h``;
* ``chain``: ``hybrid.models.edge_denoise`` (the edge's one-shot call, the program under the
  ``staged`` edge loop too) from level T down to ``T - chain_levels`` for every row, per level:
  the steps as the edge server runs them, inside one compiled loop.

Reported per B: ms per step, image-steps per second (``B / step``), and the headline
``throughput_ratio`` = throughput at the largest B over that at the smallest (a GPU that is
latency-bound at B = 1 gives up to B_max). The last line printed is one JSON object (also written
to ``--json_out``).
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "A hybrid config and preset (configs/hybrid.py:<preset>).", lock_config=True
)
_SIZES = flags.DEFINE_list("batch_sizes", ["1", "4", "16"], "Batch sizes B (at least two).")
_REPEATS = flags.DEFINE_integer("repeats", 30, "Timed calls per B (after two warm-up calls).")
_CHAIN = flags.DEFINE_integer(
  "chain_levels", 10, "Levels of the timed edge_denoise chain (0: time the single step only)."
)
_CHAIN_REPEATS = flags.DEFINE_integer("chain_repeats", 5, "Timed edge_denoise calls per B.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and inputs.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the JSON summary to this file.")


def _models(config, seed: int):
  """``HybridModels`` over freshly initialised weights of ``config``'s network (one user)."""
  from common import data
  from common.train.method import DDPM
  from hybrid import models as models_lib

  params = DDPM(config, data.get_info(config.data)).init_params(jax.random.key(seed))
  users = jax.tree.map(lambda a: a[None], params)  # one personalized copy: the stacked layout
  return models_lib.from_params(config, {"cluster": params, "users": users})


def time_chain(models, sizes, levels: int, repeats: int, seed: int) -> dict[int, float]:
  """Median seconds of one ``edge_denoise`` call from T to T - ``levels``, per B."""
  from hybrid import models as models_lib

  big_t = models.num_timesteps
  inputs = {}
  for b in sizes:
    keys = jax.random.split(jax.random.key(seed + 2), b)
    x_t = models_lib.initial_noise(models, keys)
    cut = np.full((b,), big_t - levels, np.int32)
    inputs[b] = (x_t, cut, keys)
    jax.block_until_ready(models_lib.edge_denoise(models, x_t, cut, keys))  # compile, warm up
  times = {b: [] for b in sizes}
  for _ in range(repeats):  # round robin, as hybrid.profile
    for b in sizes:
      t0 = time.perf_counter()
      jax.block_until_ready(models_lib.edge_denoise(models, *inputs[b]))
      times[b].append(time.perf_counter() - t0)
  return {b: statistics.median(times[b]) for b in sizes}


def measure(config, sizes, *, repeats: int, chain_levels: int, chain_repeats: int, seed: int = 0):
  """Every figure of this benchmark as a dict (see the module docstring)."""
  from hybrid import profile

  sizes = sorted({int(b) for b in sizes})
  if len(sizes) < 2 or sizes[0] < 1:
    raise app.UsageError(f"--batch_sizes: need >= 2 sizes >= 1, got {sizes}")
  with config.unlocked():
    config.hybrid.profile.batch_sizes = tuple(sizes)
    config.hybrid.profile.latency_repeats = int(repeats)
  models = _models(config, seed)
  big_t = models.num_timesteps
  if not 0 <= chain_levels <= big_t:
    raise app.UsageError(f"--chain_levels must be in [0, T={big_t}], got {chain_levels}")
  t0 = time.perf_counter()
  step = profile.latency_profile(models, seed=seed)
  step_wall = time.perf_counter() - t0
  step_s = dict(zip(step["batch_sizes"], step["seconds_median"], strict=True))
  chain_s = {}
  if chain_levels:
    chain_s = time_chain(models, sizes, chain_levels, chain_repeats, seed)
  lo, hi = sizes[0], sizes[-1]
  rows = []
  for b in sizes:
    row = {
      "batch": b,
      "step_ms": step_s[b] * 1e3,
      "image_steps_per_s": b / step_s[b],
      "images_per_s_full_chain": b / (step_s[b] * big_t),
    }
    if chain_s:
      per_level = chain_s[b] / chain_levels
      row.update(chain_ms_per_level=per_level * 1e3, chain_image_steps_per_s=b / per_level)
    rows.append(row)
  by_b = {r["batch"]: r for r in rows}
  dev = jax.devices()[0]
  params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(models.cluster_params))
  out = {
    "device": f"{dev.platform} {dev.device_kind}",
    "image_shape": list(models.image_shape),
    "num_timesteps": big_t,
    "params": params,
    "dtype": str(config.model.dtype),
    "sampler": str(config.diffusion.sampler),
    "repeats": int(repeats),
    "chain_levels": int(chain_levels),
    "chain_repeats": int(chain_repeats) if chain_levels else 0,
    "rows": rows,
    "fit_k_ms": step["fit"]["k"] * 1e3,
    "fit_h_ms": step["fit"]["h"] * 1e3,
    "fit_r2": step["fit"]["r2"],
    "ratio_of": [lo, hi],
    "throughput_ratio": by_b[hi]["image_steps_per_s"] / by_b[lo]["image_steps_per_s"],
    "step_wall_s": step_wall,
  }
  if chain_s:
    out["chain_throughput_ratio"] = (
      by_b[hi]["chain_image_steps_per_s"] / by_b[lo]["chain_image_steps_per_s"]
    )
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config.get("method") != "hybrid":
    raise app.UsageError("--config must be a hybrid config (configs/hybrid.py:<preset>)")
  out = measure(
    config,
    _SIZES.value,
    repeats=_REPEATS.value,
    chain_levels=_CHAIN.value,
    chain_repeats=_CHAIN_REPEATS.value,
    seed=_SEED.value,
  )
  h, w, c = out["image_shape"]
  print(
    f"hybrid edge batched step: {out['device']}; network {out['params']:,} params, {h}x{w}x{c},"
    f" T={out['num_timesteps']}, {out['dtype']}; step: median of {out['repeats']}"
    + (f"; chain: edge_denoise over {out['chain_levels']} levels" if out["chain_levels"] else "")
  )
  head = f"  {'B':>4}{'step ms':>11}{'image-steps/s':>15}"
  if out["chain_levels"]:
    head += f"{'chain ms/level':>16}{'image-steps/s':>15}"
  print(head)
  for r in out["rows"]:
    line = f"  {r['batch']:>4}{r['step_ms']:>11.3f}{r['image_steps_per_s']:>15.1f}"
    if "chain_ms_per_level" in r:
      line += f"{r['chain_ms_per_level']:>16.3f}{r['chain_image_steps_per_s']:>15.1f}"
    print(line)
  lo, hi = out["ratio_of"]
  print(
    f"fit tau(B) = {out['fit_k_ms']:.4f} ms x B + {out['fit_h_ms']:.4f} ms (R2 {out['fit_r2']:.3f});"
    f" throughput B={hi} / B={lo}: step {out['throughput_ratio']:.2f}x"
    + (f", chain {out['chain_throughput_ratio']:.2f}x" if "chain_throughput_ratio" in out else "")
  )
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(out, f, indent=1)
  print(json.dumps(out))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
