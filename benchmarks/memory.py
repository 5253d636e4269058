"""Per-device memory of a preset's train step, without the hardware: compiled ahead of time for N
forced host devices (lower + compile, XLA's memory analysis), as maxtext's ``train_compile`` does.

  python benchmarks/memory.py --config=configs/ddpm.py:imagenet64 --devices=8 --config.mesh.fsdp=8
  python benchmarks/memory.py --config=configs/ddpm.py:cifar10 --devices=8 --config.mesh.data=2 \
      --config.mesh.fsdp=4 --config.batch_size=128

Prints, per device: the bytes of the step's arguments split into params, EMA params, optimizer
state and batch (from each array's shard shape under the run's shardings), XLA's argument, output
and temporary bytes, and the compile time; the last line is one JSON object. The state is never
allocated (the step is lowered on abstract arrays) and the batch is synthetic, so array_record
presets need no prepared data. XLA:CPU's temporaries stand in for an accelerator's: the layout of
the step is the same, the fusion and scheduling are not, so read ``temp`` as an estimate there.
"""

import json
import os
import sys
import time


def _forced_devices(argv: list[str]) -> int:
  for arg in argv:
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
  return 8


if __name__ == "__main__":
  # Before JAX is imported: the host platform's device count is fixed at start-up.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={_forced_devices(sys.argv)}"
  )
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def _shard_bytes(tree) -> int:
  """Bytes one device holds of ``tree`` (ShapeDtypeStructs with shardings); arrays are evenly
  split by their sharding, so device 0's shard is every device's."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def measure(config, devices: list | None = None) -> dict:
  """Compiles ``config``'s train step for ``devices`` (default: all) and returns the per-device
  bytes (``params``, ``ema``, ``opt_state``, ``batch``, XLA's ``argument``/``output``/``temp``),
  the mesh, the parameter count and the compile time."""
  from common import data, parallel
  from common.train import loop, validate
  from common.train import method as method_lib

  devices = list(jax.devices() if devices is None else devices)
  if config.data.name == "array_record" and not os.path.isdir(config.data.data_dir or "/-"):
    with config.unlocked():  # the architecture without prepared data: same shapes
      config.data.name = "shapes"
  mesh_shape = validate.validate_common(config, num_devices=len(devices))
  info = data.get_info(config.data)
  method = method_lib.load_method(config, info)
  mesh = parallel.make_mesh(mesh_shape, devices)
  fns = loop.build(config, method, mesh)
  # The images one step reads: the global batch, or K per-client batches (collab), or one per
  # group network (adaptive's stage 2).
  b, r, c = method.images_per_step(), info.resolution, info.channels
  sh = fns["batch_sharding"]
  batch = {
    "image": jax.ShapeDtypeStruct((b, r, r, c), np.float32, sharding=sh),
    "label": jax.ShapeDtypeStruct((b,), np.int32, sharding=sh),
  }
  state = fns["abstract_state"]
  t0 = time.perf_counter()
  compiled = fns["step"].lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return {
    "devices": len(devices),
    "mesh": dict(mesh.shape),
    "batch_size": int(config.batch_size),
    "images_per_step": int(b),
    "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
    "bytes_per_device": {
      "params": _shard_bytes(state.params),
      "ema": _shard_bytes(state.ema_params),
      "opt_state": _shard_bytes(state.opt_state),
      "batch": _shard_bytes(batch),
      "argument": int(mem.argument_size_in_bytes),
      "output": int(mem.output_size_in_bytes),
      "temp": int(mem.temp_size_in_bytes),
    },
    "compile_s": round(compile_s, 1),
  }


def main(argv):
  del argv
  from absl import flags

  result = {"config": flags.FLAGS["config"].serialize().split("=", 1)[1],
            **measure(flags.FLAGS.config)}  # fmt: skip
  mib = lambda n: f"{n / 2**20:10.1f} MiB"
  print(f"mesh {result['mesh']} over {result['devices']} devices, batch {result['batch_size']} "
        f"({result['images_per_step']} images a step), "
        f"{result['params']:,} params, compiled in {result['compile_s']} s")  # fmt: skip
  for k, v in result["bytes_per_device"].items():
    print(f"  {k:10s} {mib(v)} per device")
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Config file and preset.", lock_config=True)
  flags.DEFINE_integer("devices", 8, "Forced host devices to compile for.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
