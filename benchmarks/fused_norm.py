"""What the hand-written GroupNorm backward (``common/models/norm_act.py``) buys on the CPU: the
whole train step of a config with and without it, compiled in one process and timed in
alternating steps, then the op alone (forward + backward) on the U-Net's largest activations.

  python benchmarks/fused_norm.py --config=configs/ddpm.py:shapes --rounds=8
  python benchmarks/fused_norm.py --config=configs/ddpm.py:digits --rounds=60 --op_shapes=

``SEGDIFF_FUSED_NORM`` is read when a step is traced, so both steps are built here, one after the
other with the variable set each way (fresh jitted functions, so no trace is shared), and then run
in turn: A B, B A, A B, ... The step is the real one (``benchmarks/train_step.py``'s build, the
binaries' XLA:CPU defaults). Prints each median, min and the ratio, then the load average.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import train_step  # noqa: E402  (its --config flag and its build of the step)

_ROUNDS = flags.DEFINE_integer("rounds", 8, "Timed steps of each variant, alternating.")
_OP_SHAPES = flags.DEFINE_list(
  "op_shapes", ["64x32x128", "64x32x64", "64x16x128"], "BxHxC activations for the op alone."
)

VARIANTS = {"autodiff": "0", "hand-written": "1"}


def _build(config, flag: str):
  os.environ["SEGDIFF_FUSED_NORM"] = flag
  _, fns, batch, shape = train_step._build_step(config)
  state = fns["init"]()
  compiled, _ = train_step._compile_step(config, fns, state, batch, shape)
  state, _, _ = train_step._time_steps(compiled, state, batch, 1)
  return [compiled, state, batch]


def time_steps(config, rounds: int) -> dict[str, list[float]]:
  """Seconds per step of each variant, ``rounds`` each, alternating which goes first."""
  steps = {name: _build(config, flag) for name, flag in VARIANTS.items()}
  times = {name: [] for name in VARIANTS}
  for r in range(rounds):
    for name in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
      compiled, state, batch = steps[name]
      t = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times[name].append(time.perf_counter() - t)
      steps[name][1] = state
  return times


def time_op(b: int, h: int, c: int, repeats: int = 7) -> dict[str, float]:
  """ms of ``group_norm_act`` with scale-shift, forward + backward, on [b, h, h, c]."""
  from flax import nnx

  from common.models import norm_act

  r = np.random.default_rng(0)
  norm = nnx.GroupNorm(c, num_groups=min(32, c), epsilon=1e-5, rngs=nnx.Rngs(0))
  x = jnp.asarray(r.standard_normal((b, h, h, c)), jnp.float32)
  film = jnp.asarray(0.1 * r.standard_normal((2, b, 1, 1, c)), jnp.float32)
  w = jnp.asarray(r.standard_normal((b, h, h, c)), jnp.float32)
  out = {}
  for name, flag in VARIANTS.items():
    os.environ["SEGDIFF_FUSED_NORM"] = flag

    def loss(x, film):
      return jnp.sum(norm_act.group_norm_act(norm, x, film[0], film[1]) * w)

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(fn(x, film))
    ts = []
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(fn(x, film))
      ts.append(time.perf_counter() - t)
    out[name] = statistics.median(ts) * 1e3
  return out


def main(argv):
  del argv
  from benchmarks import jitted_step

  config = train_step._CONFIG.value
  jitted_step.as_the_binaries(config.model.name)
  print(f"load before {os.getloadavg()}", flush=True)
  times = time_steps(config, _ROUNDS.value)
  med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
  for name, ts in times.items():
    print(f"step, {name:<13} median {med[name]:9.1f} ms  min {min(ts) * 1e3:9.1f} ms")
  wins = sum(a < b for a, b in zip(times["hand-written"], times["autodiff"], strict=True))
  print(
    f"step ratio hand-written / autodiff = {med['hand-written'] / med['autodiff']:.3f}"
    f" (faster in {wins} of {_ROUNDS.value} rounds)"
  )
  for spec in _OP_SHAPES.value:
    b, h, c = (int(v) for v in spec.split("x"))
    op = time_op(b, h, c)
    print(
      f"op [{b},{h},{h},{c}] fwd+bwd: autodiff {op['autodiff']:.1f} ms, hand-written "
      f"{op['hand-written']:.1f} ms ({op['hand-written'] / op['autodiff']:.2f})"
    )
  print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
