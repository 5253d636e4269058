"""Where one training step's time goes, op by op: XLA's own trace of a few steps of any config.

  python benchmarks/step_profile.py --config=configs/ddpm.py:shapes --steps=2
  python benchmarks/step_profile.py --config=configs/mobile.py:digits_config2 --top=25

Builds and compiles the step exactly as ``benchmarks/train_step.py`` does (the binaries' XLA:CPU
defaults for the model included), runs ``--steps`` steps under ``jax.profiler`` and sums the
trace's per-op events: by kind (the HLO op of each thunk: ``convolution``, ``dot``, ``fusion``,
``custom-call``, ...) and the ``--top`` ops by total time, each with its share of the step. The
shares are what to read on a shared machine; the milliseconds move with the load. Only ops with
an event of their own are counted (on XLA:CPU 0.10 not every convolution thunk has one): the
first line compares their total with the step's wall time. On the shapes preset under load the
reductions (``reduce fusion``, ``reduce-window``: XLA:CPU splits large reductions into
reduce-window trees) came out at ~40% of the step, yet a GroupNorm with half the forward +
backward time left the whole step unchanged (``benchmarks/RESULTS.md``): read a share as where to
look, and confirm a change with ``train_step.py`` A/B runs.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

# Its flags (--config) and its build and compile of the step, so both scripts time the same thing.
from benchmarks import train_step  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 3, "Profiled steps (after 2 warm-up steps).")
_TOP = flags.DEFINE_integer("top", 20, "Ops listed by total time.")

# An op's event is named by its HLO instruction (``fusion.3``, ``wrapped_reduce-window``); the
# runtime's own events have C++ names or spaces. Control flow ops hold other ops' events.
_OP_NAME = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)?$")
_CONTAINERS = ("while", "call", "conditional")


def op_kind(name: str) -> str:
  """What a thunk's op is, from its event name: ``convolution.12`` (or, named after JAX's
  primitive, ``conv_general_dilated.12``) -> ``convolution``, ``transpose_copy_fusion.3`` ->
  ``layout fusion``, ``multiply_add_fusion.5`` -> ``fusion``."""
  base = re.sub(r"\.\d+$", "", name)
  if base == "conv_general_dilated":
    return "convolution"
  if "ynn" in base:
    return "ynn fusion"
  if base.endswith("fusion"):
    parts = set(base.removesuffix("fusion").strip("_").split("_"))
    if "convolution" in parts or "conv" in parts:
      return "convolution fusion"
    if "dot" in parts:
      return "dot fusion"
    if parts and parts <= {"transpose", "copy", "bitcast", "slice", "concatenate", "pad"}:
      return "layout fusion"
    if "reduce" in parts:
      return "reduce fusion"
    return "fusion"
  return base.removeprefix("wrapped_")


def op_events(trace: dict) -> list[tuple[str, float]]:
  """``(name, microseconds)`` of every op event in a Chrome/Perfetto trace object (control flow
  ops left out: their bodies' ops have their own events)."""
  out = []
  for e in trace.get("traceEvents", []):
    if e.get("ph") != "X" or "dur" not in e:
      continue
    name = str(e.get("name", ""))
    if not _OP_NAME.match(name) or re.sub(r"\.\d+$", "", name) in _CONTAINERS:
      continue
    out.append((name, float(e["dur"])))
  return out


def summarize(events: list[tuple[str, float]], steps: int, step_ms: float, top: int) -> str:
  """The table: per kind, then the ``top`` ops; ms per step and share of the step's wall time."""
  by_kind, by_op = collections.Counter(), collections.Counter()
  for name, us in events:
    by_kind[op_kind(name)] += us
    by_op[name] += us
  total = sum(by_kind.values()) / 1e3 / steps
  lines = [
    f"step {step_ms:.1f} ms wall (median of {steps}); ops {total:.1f} ms per step, summed over"
    " threads (more than the wall time where ops ran side by side)"
  ]
  lines.append(f"{'kind':<28}{'ms/step':>10}{'of step':>9}")
  for kind, us in by_kind.most_common():
    ms = us / 1e3 / steps
    lines.append(f"{kind:<28}{ms:>10.1f}{ms / step_ms:>9.0%}")
  lines.append(f"\n{'op':<48}{'ms/step':>10}{'of step':>9}")
  for name, us in by_op.most_common(top):
    ms = us / 1e3 / steps
    lines.append(f"{name[:47]:<48}{ms:>10.1f}{ms / step_ms:>9.0%}")
  return "\n".join(lines)


def _read_trace(log_dir: str) -> dict:
  paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
  paths += glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"step_profile: jax.profiler wrote no trace JSON under {log_dir}")
  with gzip.open(sorted(paths)[-1], "rt") as f:
    return json.load(f)


def main(argv):
  del argv
  from benchmarks import jitted_step

  config = train_step._CONFIG.value
  jitted_step.as_the_binaries(config.model.name)
  _, fns, batch, shape = train_step._build_step(config)
  state = fns["init"]()
  compiled, record = train_step._compile_step(config, fns, state, batch, shape)
  state, _, times = train_step._time_steps(compiled, state, batch, 2)
  with tempfile.TemporaryDirectory() as log_dir:
    walls = []
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(_STEPS.value):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        walls.append(time.perf_counter() - t)
    trace = _read_trace(log_dir)
  step_ms = sorted(walls)[len(walls) // 2] * 1e3
  print(
    f"{config.model.name}, batch {shape[0]}, {shape[1]}x{shape[1]}x{shape[2]}, "
    f"compile {record['compile_s']:.1f} s, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  print(summarize(op_events(trace), _STEPS.value, step_ms, _TOP.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
