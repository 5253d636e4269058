"""The driver of ``benchmarks/gpu_check.sh`` (issue 24, item 4): every figure of the GPU check.

  python benchmarks/gpu_check.py --out=DIR [--mode=gpu|cpu --budget_s=440 --peak_tflops=989]

Runs the repo's own benchmarks as subprocesses, each under a timeout cut to what is left of one
overall budget (``--budget_s``), so a slow part cannot eat the others: a part that does not fit is
recorded as ``timeout`` or ``skipped``, never silently lost. Writes into ``--out``:

* ``gpu_check.json``: every figure (rewritten after each run, so a killed check leaves what it
  measured), ``headline`` on top;
* ``gpu_check.log``: progress with UTC timestamps, then each run's command line and its whole
  output;
* ``shapes_samples.png``: the shapes run's final EMA sample grid.

The parts, in the order they run (``--mode=gpu``: the sizes below; ``--mode=cpu``: every part at
tiny sizes, a test of this script, not a measurement):

1. ``env``: versions of the stack, the devices JAX and PyTorch see, ``nvidia-smi``.
2. ``hybrid_edge``: ``benchmarks/hybrid_edge_batch.py`` at B = 1, 4, 16: the edge server's
   batched step (``hybrid.profile.latency_profile``) and ``edge_denoise`` chain; headline: the
   throughput at B = 16 over B = 1. Networks: ``configs/hybrid.py:digits`` (the model hybrid
   trains) and the same chain with ``ddpm.py:shapes``' U-Net at 32x32x3.
3. ``train_shapes``: ``python -m common.train --config=configs/ddpm.py:shapes`` for a few hundred
   real steps on the procedural data: first and last logged loss, steps/s. Meanwhile the train
   steps of part 4 compile in the background (``train_step.py --compile_only``, 2 at a time, into
   JAX's persistent compilation cache), so their compiles overlap; the shapes run's steps/s is
   therefore measured next to those compiles (recorded as ``background_compiles``).
4. ``train_step``: ``benchmarks/train_step.py`` (synthetic batches of the preset's shape, the
   trainer's real step): step time, images/s, XLA FLOPs and MFU against the card's dense bf16
   peak (model FLOPs: 3 x one forward per image; ``hfu``: XLA's count of the whole step, which
   counts TFDiff's scanned blocks once; collab has XLA's count only), for ``ddpm.py:imagenet64`` in bf16 and float32 (batch 64), ``mobile.py:celeba64_config1``
   in bf16 (batch 16: 12 blocks of full attention over 1,024 tokens), ``ddpm.py:cifar10`` in bf16
   (batch 128) and ``collab.py:celeba64`` in bf16 (4 per client, 20 images: ~1 GiB of float32
   temporaries an image, benchmarks/RESULTS.md; it has no target in issue 24 and compiles the
   slowest, so it is timed last, after part 5). A run that runs out of memory is retried once at
   half the batch when time allows.
5. ``vs_pytorch``: ``benchmarks/vs_pytorch.py`` on the GPU: the JAX step against PyTorch eager
   and ``torch.compile`` on the same U-Net (``ddpm.py:imagenet64``, batch 64), bf16 (JAX: bf16
   compute; PyTorch: autocast), train step only, 3 interleaved rounds of 5 steps. The PyTorch
   port has the simple loss only, so both sides run ``--config.diffusion.loss=simple`` (the
   preset's hybrid loss adds learned-variance output channels and the VLB term), on 64x64x3
   synthetic batches (``data.name=shapes`` stands in for the unprepared ImageNet-64). Its JAX
   program is compiled in the background of part 3 too. Skipped (recorded) without PyTorch.

Peak: ``nvidia-smi``'s name, H100 or H200 (the same chip: 989 TFLOP/s dense bf16, SXM);
``--peak_tflops`` overrides it. In CPU mode MFU is against an estimate of the CPU's float32 peak.

The code: this file runs the parts in order and writes the summary's ``headline``;
``gpu_check_parts.py`` holds what each part runs per mode (command lines, sizes, timeouts, the
card's peak) and how its output becomes figures; ``gpu_check_budget.py`` runs the subprocesses
under the budget and keeps the log and the summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import sys
import time

# The parts' sibling modules (gpu_check_budget, gpu_check_parts), however this file is started.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_check_budget import (  # noqa: E402
  LOG,
  ROOT,
  SUMMARY,
  Background,
  Check,
  end_all,
  finite,
  json_default,
  skipped,
)
from gpu_check_parts import (  # noqa: E402
  BUDGETS_CPU,
  BUDGETS_GPU,
  HYBRID_CPU,
  HYBRID_GPU,
  SHAPES_CPU,
  SHAPES_GPU,
  TRAIN_STEP_CPU,
  TRAIN_STEP_GPU,
  VS_CONFIG,
  VS_CPU,
  VS_GPU,
  card_peak,
  part_env,
  part_hybrid,
  part_shapes,
  part_train_step,
  part_vs_pytorch,
  train_step_cmd,
)

# ==============================================================================================
# The check.
# ==============================================================================================


def _headline(s: dict) -> dict:
  h: dict = {}
  parts = s["parts"]
  env = parts.get("env", {})
  h["device"] = env.get("gpu_name") or (env.get("jax_devices") or ["?"])[0]
  h["peak_tflops"] = s.get("peak_tflops")
  for name, r in parts.get("train_step", {}).get("runs", {}).items():
    if r.get("status") == "ok":
      h[f"{name}_step_ms"] = r["step_ms_median"]
      h[f"{name}_images_per_s"] = r["images_per_s"]
      h[f"{name}_mfu"] = r.get("mfu")
  vs = parts.get("vs_pytorch", {})
  for k in (
    "jax_ms",
    "eager_ms",
    "compile_ms",
    "speedup_jax_over_eager",
    "speedup_jax_over_compile",
  ):
    if vs.get(k) is not None:
      h[f"vs_pytorch_{k}"] = vs[k]
  for name, r in parts.get("hybrid_edge", {}).get("variants", {}).items():
    if r.get("status") == "ok":
      h[f"hybrid_{name}_throughput_ratio"] = r["throughput_ratio"]
  sh = parts.get("train_shapes", {})
  for k in ("first_loss", "last_loss", "steps_per_s"):
    if sh.get(k) is not None:
      h[f"shapes_{k}"] = sh[k]
  return h


def _args() -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="Folder for gpu_check.json / .log.")
  ap.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
  ap.add_argument("--budget_s", type=float, default=0, help="Overall budget (0: 440 gpu, 480 cpu).")
  ap.add_argument("--peak_tflops", type=float, default=0, help="Override the card's bf16 peak.")
  ap.add_argument(
    "--precompile_jobs",
    type=int,
    default=-1,
    help="Background compiles at a time (-1: 2 gpu, 1 cpu; 0: none, each timed run compiles).",
  )
  ap.add_argument(
    "--parts", default="hybrid,shapes,train_step,vs_pytorch", help="Parts to run (env always runs)."
  )
  return ap.parse_args()


def _queue_precompiles(
  check: Check, bg: Background, runs, parts: set, gpu: bool, peak: float, budget: float
) -> dict:
  """Queues part 4's compiles (``--compile_only``) on ``bg``; returns {run name: its JSON path}."""
  precompiled: dict = {}
  has_torch = importlib.util.find_spec("torch") is not None
  # CPU mode: the first program only, to exercise the path (there, a process's start-up and
  # tracing dominate, which the cache does not save; 2 cores gain little from overlap).
  for i, (name, config, overrides) in enumerate(runs if gpu else runs[:1]):
    path = os.path.join(check.work, f"precompile_{name}.json")
    cmd = train_step_cmd(config, overrides, path, peak, compile_only=True)
    bg.add(name, cmd, budget)
    precompiled[name] = path
    if i == 0 and gpu and "vs_pytorch" in parts and has_torch:
      # Part 5's JAX worker compiles the program train_step.py compiles with its overrides.
      path = os.path.join(check.work, "precompile_vs_pytorch_jax.json")
      cmd = train_step_cmd(VS_CONFIG, VS_GPU, path, peak, compile_only=True)
      bg.add("vs_pytorch_jax", cmd, budget)
  return precompiled


def _precompile_results(bg: Background, precompiled: dict) -> dict:
  """Each background compile's status and compile time, by run name (after ``bg.wait``)."""
  pre = {}
  for name, path in precompiled.items():
    p = bg.done.get(name)
    st = p.status() if p is not None else skipped("no time left")
    if os.path.exists(path):
      with open(path) as f:
        st["compile_s"] = json.load(f).get("compile_s")
    pre[name] = st
  return pre


def _vs_pytorch(check: Check, gpu: bool, budget: float, peak: float) -> dict:
  """Part 5 with the mode's variants and arguments."""
  if gpu:
    variants = ["jax", "eager", "compile"]
    args = ["--torch_device=cuda", "--rounds=3", "--steps_per_round=5", "--worker_timeout=150"]
  else:
    # torch.compile takes minutes on 2 CPU cores: the CPU mode checks the wiring only.
    variants = ["jax", "eager"]
    args = ["--quick", "--threads=1", "--worker_timeout=100"]
  st = part_vs_pytorch(check, VS_GPU if gpu else VS_CPU, variants, args, budget, peak)
  if not gpu and st["status"] != "skipped":
    st["compile_ms"] = None
    st["compile_skipped"] = "cpu mode: torch.compile takes minutes on 2 cores"
  return st


def main() -> int:
  a = _args()
  gpu = a.mode == "gpu"
  os.makedirs(a.out, exist_ok=True)
  # CPU mode is a test of this script: 128 s in the test suite on 2 cores, but 300 s next to a
  # training run, where the 300 s budget it had cut its last part off; the test allows 600 s.
  check = Check(a.out, a.mode, a.budget_s or (440 if gpu else 480))
  budgets = BUDGETS_GPU if gpu else BUDGETS_CPU
  parts = set(a.parts.split(","))
  s = check.summary
  check.say(f"gpu_check ({a.mode} mode) in {ROOT}; budget {s['budget_s']:.0f}s; out {a.out}")
  signal.signal(signal.SIGTERM, end_all)
  try:
    s["parts"]["env"] = env_info = part_env(check, budgets)
    peak, how = card_peak(check, env_info, a.peak_tflops)
    s["peak_tflops"], s["peak_source"] = (peak if finite(peak) else None), how
    check.say(f"peak {peak:.1f} TFLOP/s ({how})")
    check.save()

    if "hybrid" in parts:
      s["parts"]["hybrid_edge"] = part_hybrid(
        check, HYBRID_GPU if gpu else HYBRID_CPU, budgets["hybrid"]
      )
      check.save()

    # Part 4's programs compile in the background while part 3 trains (into the persistent cache):
    # the vs_pytorch JAX program second, collab's (the slowest, ~2 min) last.
    runs = TRAIN_STEP_GPU if gpu else TRAIN_STEP_CPU
    jobs = a.precompile_jobs if a.precompile_jobs >= 0 else (2 if gpu else 1)
    bg = Background(check, jobs)
    precompiled: dict = {}
    if "train_step" in parts and jobs > 0:
      precompiled = _queue_precompiles(check, bg, runs, parts, gpu, peak, budgets["precompile"])
    if "shapes" in parts:
      s["parts"]["train_shapes"] = part_shapes(
        check, SHAPES_GPU if gpu else SHAPES_CPU, budgets["shapes"], bg
      )
      check.save()
    bg.wait()
    pre = _precompile_results(bg, precompiled)

    # Part 4 then 5, with collab's step (no target in issue 24, the slowest) after part 5.
    repeats = 20 if gpu else 2
    if "train_step" in parts:
      s["parts"]["train_step"] = part_train_step(
        check, runs[:-1], peak, budgets["train_step"], repeats, pre
      )
      check.save()

    if "vs_pytorch" in parts:
      s["parts"]["vs_pytorch"] = _vs_pytorch(check, gpu, budgets["vs"], peak)
      check.save()

    if "train_step" in parts:
      part_train_step(
        check, runs[-1:], peak, budgets["train_step"], repeats, pre, out=s["parts"]["train_step"]
      )
      check.save()
  finally:
    end_all()
    s["headline"] = _headline(s)
    check.save()
    shutil.rmtree(check.work, ignore_errors=True)
  check.say("summary: " + json.dumps(s["headline"], default=json_default))
  check.say(
    f"done in {time.monotonic() - check.t0:.0f}s: {os.path.join(a.out, SUMMARY)}, {os.path.join(a.out, LOG)}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
