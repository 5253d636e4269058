"""Where the CPU step's time goes: the U-Net's 3x3 convolutions alone, forward + backward, under
XLA:CPU's convolution paths, against PyTorch's on the same shapes.

  python benchmarks/conv_cpu.py                       # the shapes preset's convolutions
  python benchmarks/conv_cpu.py --batch=64 --repeats=5 --paths=default,onednn

Each XLA path runs in its own process (XLA_FLAGS are read once, at start-up); PyTorch (if
installed, ``pip install -e ".[bench]"``) runs in NHWC (channels_last) and NCHW on the same
shapes. Every line: the shape, ms per forward + backward (median), GFLOP/s (2 * MACs * 3 for
forward, input gradient and weight gradient). The load average is printed first and last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# (height = width, in channels, out channels): the 3x3 convolutions of configs/ddpm.py:shapes
# (channels (64, 128, 128) at 32, 16, 8).
SHAPES = [(32, 64, 64), (32, 128, 128), (16, 128, 128), (8, 128, 128)]

# XLA:CPU paths to compare (flags of this jaxlib's XLA; an unknown flag fails the worker). Each
# worker gets exactly these flags: the binaries' own defaults are not added.
PATHS = {
  "default": "",
  "onednn": "--xla_cpu_use_onednn=true",
  "xnnpack": "--xla_cpu_use_xnnpack=true",
  "no_multithread_eigen": "--xla_cpu_multi_thread_eigen=false",
  # What the binaries use (common/train/xla_flags.py): dots, and with them the convolutions'
  # gradients, through YNNPACK.
  "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
}


def _flops(batch: int, size: int, cin: int, cout: int) -> float:
  return 2.0 * batch * size * size * cin * cout * 9 * 3


def _time(fn, repeats: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def jax_worker(batch: int, repeats: int) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  rows = []
  for size, cin, cout in SHAPES:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) * 0.05, jnp.float32)

    def loss(x, w):
      y = jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      return jnp.sum(y * y)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    s = _time(lambda step=step, x=x, w=w: jax.block_until_ready(step(x, w)), repeats)
    rows.append(
      {
        "shape": [size, cin, cout],
        "ms": s * 1e3,
        "gflops": _flops(batch, size, cin, cout) / s / 1e9,
      }
    )
  return rows


def torch_rows(batch: int, repeats: int, threads: int) -> list[dict]:
  import torch

  torch.set_num_threads(threads)
  rows = []
  for fmt in ("channels_last", "nchw"):
    for size, cin, cout in SHAPES:
      x = torch.randn(batch, cin, size, size)
      conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False)
      if fmt == "channels_last":
        x, conv = (
          x.to(memory_format=torch.channels_last),
          conv.to(memory_format=torch.channels_last),
        )
      x.requires_grad_(True)

      def step(x=x, conv=conv):
        conv.zero_grad(set_to_none=True)
        x.grad = None
        y = conv(x)
        (y * y).sum().backward()

      s = _time(step, repeats)
      rows.append({"path": f"torch {fmt} ({threads} thr)", "shape": [size, cin, cout],
                   "ms": s * 1e3, "gflops": _flops(batch, size, cin, cout) / s / 1e9})  # fmt: skip
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--paths", default=",".join(PATHS))
  parser.add_argument("--threads", type=int, default=2, help="PyTorch threads")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(jax_worker(args.batch, args.repeats)))
    return
  print(f"load average before: {os.getloadavg()}")
  rows = []
  for name in args.paths.split(","):
    env = dict(os.environ, XLA_FLAGS=PATHS[name], JAX_PLATFORMS="cpu", SEGDIFF_XLA_DEFAULTS="0")
    proc = subprocess.run(
      [sys.executable, __file__, f"--worker={name}", f"--batch={args.batch}",
       f"--repeats={args.repeats}"],
      env=env, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode:
      print(f"{name}: FAILED {proc.stderr.strip().splitlines()[-1:]}")
      continue
    rows += [dict(r, path=f"jax {name}") for r in json.loads(proc.stdout.strip().splitlines()[-1])]
  try:
    rows += torch_rows(args.batch, args.repeats, args.threads)
  except ImportError:
    print("torch not installed: JAX paths only")
  print(f"batch {args.batch}, 3x3 convolution forward + backward (input and weight gradients)")
  print(f"{'path':34s} {'HxW':>5s} {'cin':>4s} {'cout':>4s} {'ms':>9s} {'GFLOP/s':>8s}")
  for r in rows:
    size, cin, cout = r["shape"]
    print(f"{r['path']:34s} {size:5d} {cin:4d} {cout:4d} {r['ms']:9.1f} {r['gflops']:8.1f}")
  print(f"load average after: {os.getloadavg()}")
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
