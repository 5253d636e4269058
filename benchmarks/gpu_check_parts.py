"""The parts of ``benchmarks/gpu_check.py``: what each runs per mode (command lines, sizes,
timeouts, the card's peak) and how its output becomes the summary's figures.

``benchmarks/gpu_check.py``'s docstring describes each part and its sizes; each part runs through
``gpu_check_budget.run`` and returns its dict of the summary's ``parts``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import cpu_peak
from gpu_check_budget import Background, Check, finite, last_json, run, skipped

PY = sys.executable

# Dense bf16 tensor-core peak (TFLOP/s) by a substring of nvidia-smi's name, first match wins. The
# H200 is the H100's chip with more and faster memory: the same compute peak (SXM). Others: pass
# --peak_tflops.
GPU_PEAKS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H200", 989.0), ("H100", 989.0)]  # fmt: skip
SAMPLES = "shapes_samples.png"


# ==============================================================================================
# What runs, per mode.
# ==============================================================================================

# (name, config, overrides) of part 4. GPU batches: what fits one 80 GB card (see the docstring).
TRAIN_STEP_GPU = [
  ("ddpm_imagenet64_bf16", "configs/ddpm.py:imagenet64", {"model.dtype": "bfloat16", "batch_size": 64}),
  ("mobile_celeba64_config1_bf16", "configs/mobile.py:celeba64_config1", {"model.dtype": "bfloat16", "batch_size": 16}),
  ("ddpm_imagenet64_f32", "configs/ddpm.py:imagenet64", {"model.dtype": "float32", "batch_size": 64}),
  ("ddpm_cifar10_bf16", "configs/ddpm.py:cifar10", {"model.dtype": "bfloat16", "batch_size": 128}),
  ("collab_celeba64_bf16", "configs/collab.py:celeba64", {"model.dtype": "bfloat16", "batch_size": 4}),
]  # fmt: skip
# CPU mode: the same presets cut to seconds (16x16, one or two narrow levels, batch 2).
_TINY_UNET = {
  "data.resolution": 16,
  "model.channels": "(16,32)",
  "model.num_res_blocks": 1,
  "model.attention_resolutions": "(8,)",
  "model.num_heads": 2,
}
TRAIN_STEP_CPU = [
  ("ddpm_imagenet64_bf16", "configs/ddpm.py:imagenet64", {"model.dtype": "bfloat16", "batch_size": 2, **_TINY_UNET}),
  ("mobile_celeba64_config1_bf16", "configs/mobile.py:celeba64_config1",
   {"model.dtype": "bfloat16", "batch_size": 2, "data.resolution": 16, "model.width": 32, "model.depth": 2, "model.num_heads": 2}),
  ("ddpm_imagenet64_f32", "configs/ddpm.py:imagenet64", {"model.dtype": "float32", "batch_size": 2, **_TINY_UNET}),
  ("ddpm_cifar10_bf16", "configs/ddpm.py:cifar10", {"model.dtype": "bfloat16", "batch_size": 2, **_TINY_UNET}),
  # collab at 8x8 with 2 clients (its six vmapped networks take 3 s a step at 16x16 on 2 cores; 5
  # clients' step took 16 s to compile against ~5 s for the other presets).
  ("collab_celeba64_bf16", "configs/collab.py:celeba64",
   {"model.dtype": "bfloat16", "batch_size": 1, **_TINY_UNET, "data.resolution": 8, "model.channels": "(8,16)",
    "model.num_res_blocks": "(1,1)", "model.attention_resolutions": "(4,)", "collab.num_clients": 2}),
]  # fmt: skip

_SHAPES_UNET = {
  "data.name": "shapes",
  "data.resolution": 32,
  "model.channels": "(64,128,128)",
  "model.num_res_blocks": 2,
  "model.attention_resolutions": "(8,)",
}
HYBRID_GPU = [
  ("digits", "configs/hybrid.py:digits", {}, ["--batch_sizes=1,4,16", "--repeats=30", "--chain_levels=20", "--chain_repeats=5"]),
  ("shapes32", "configs/hybrid.py:digits", _SHAPES_UNET, ["--batch_sizes=1,4,16", "--repeats=20", "--chain_levels=10", "--chain_repeats=3"]),
]  # fmt: skip
HYBRID_CPU = [
  ("tiny", "configs/hybrid.py:tiny", {}, ["--batch_sizes=1,2", "--repeats=3", "--chain_levels=2", "--chain_repeats=2"]),
]  # fmt: skip

SHAPES_GPU = {
  "total_steps": 300,
  "log_every_steps": 20,
  "ckpt_every_steps": 300,
  "sample_every_steps": 0,
  "num_sample_images": 16,
}
SHAPES_CPU = {
  "total_steps": 3,
  "log_every_steps": 1,
  "ckpt_every_steps": 3,
  "sample_every_steps": 0,
  "num_sample_images": 2,
  "batch_size": 4,
  "data.num_examples": 64,
  "data.resolution": 16,
  "model.channels": "(16,32)",
  "model.num_res_blocks": 1,
  "diffusion.sample_steps": 2,
}

VS_CONFIG = "configs/ddpm.py:imagenet64"
# vs_pytorch reads the dataset's shape from data.*: shapes at 64x64 stands in for the unprepared
# ImageNet-64 (the preset is class-unconditional: the labels are unused).
VS_GPU = {
  "model.dtype": "bfloat16",
  "diffusion.loss": "simple",
  "batch_size": 64,
  "data.name": "shapes",
}
VS_CPU = {
  "model.dtype": "bfloat16",
  "diffusion.loss": "simple",
  "batch_size": 2,
  "data.name": "shapes",
  **_TINY_UNET,
}

# Seconds each run may take at most (then cut to what is left of --budget_s).
BUDGETS_GPU = {
  "env": 60,
  "hybrid": 60,
  "precompile": 200,
  "shapes": 150,
  "train_step": 60,
  "vs": 200,
}
BUDGETS_CPU = {
  "env": 60,
  "hybrid": 60,
  "precompile": 120,
  "shapes": 120,
  "train_step": 90,
  "vs": 120,
}


def _overrides(d: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in d.items()]


_ENV_PROBE = r"""
import importlib.metadata as md, json, os, sys
out = {"python": sys.version.split()[0], "versions": {}}
for n in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "grain", "array_record",
          "ml_collections", "tensorboardX", "numpy", "torch", "triton"):
  try:
    out["versions"][n] = md.version(n)
  except md.PackageNotFoundError:
    out["versions"][n] = None
missing = []
for m in ("grain", "ml_collections", "array_record", "tensorboardX", "flax", "optax", "orbax.checkpoint"):
  try:
    __import__(m)
  except Exception as e:
    missing.append(f"{m}: {type(e).__name__}: {e}")
out["import_errors"] = missing
import jax
out["jax_devices"] = [f"{d.platform} {d.device_kind}" for d in jax.devices()]
out["jax_backend"] = jax.default_backend()
try:
  import torch
  out["torch_cuda"] = torch.cuda.is_available()
  out["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except ImportError:
  out["torch_cuda"] = None
print(json.dumps(out))
"""


def part_env(check: Check, budgets: dict) -> dict:
  info: dict = {}
  smi = shutil.which("nvidia-smi")
  if smi:
    q = "name,memory.total,driver_version,clocks.max.sm"
    r = subprocess.run(
      [smi, f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
    )
    info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    info["gpu_name"] = (
      r.stdout.strip().splitlines()[0].split(",")[0].strip() if r.stdout.strip() else None
    )
    check.say(f"nvidia-smi: {info['nvidia_smi']}")
  p = run(check, "env", [PY, "-c", _ENV_PROBE], budgets["env"])
  probe = last_json(p.output()) if p is not None else None
  if probe:
    info.update(probe)
    v = probe["versions"]
    check.say("versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    check.say(f"JAX devices: {probe['jax_devices']}; PyTorch CUDA: {probe.get('torch_cuda')}")
    if probe["import_errors"]:
      check.say(
        "IMPORT ERRORS (carry the wheels: bash benchmarks/fetch_gpu_wheels.sh): "
        + "; ".join(probe["import_errors"])
      )
  info["status"] = "ok" if probe and not probe["import_errors"] else "failed"
  if p is not None and info["status"] != "ok":
    info["error"] = p.status().get("error") or "; ".join(probe["import_errors"] if probe else [])
  return info


def card_peak(check: Check, env_info: dict, given: float) -> tuple[float, str]:
  if given > 0:
    return given, "given (--peak_tflops)"
  if check.mode == "cpu":
    return _cpu_peak_tflops()
  name = env_info.get("gpu_name") or ""
  for key, peak in GPU_PEAKS:
    if key in name:
      return peak, f"{name}: {key} dense bf16"
  return float("nan"), f"unknown card {name!r}: pass --peak_tflops"


def _cpu_peak_tflops() -> tuple[float, str]:
  """float32 FMA peak of this machine's cores (``cpu_peak``), in TFLOP/s; a nominal 0.1 when
  /proc/cpuinfo cannot be read, so the CPU mode's figures stay finite."""
  gflops, how = cpu_peak.estimate_peak_gflops()
  if gflops != gflops:
    return 0.1, "CPU: no /proc/cpuinfo, nominal 0.1 TFLOP/s"
  return gflops / 1e3, f"CPU float32 peak, {how}"


def part_hybrid(check: Check, variants, budget: float) -> dict:
  out = {"status": "ok", "variants": {}}
  for name, config, overrides, args in variants:
    path = os.path.join(check.work, f"hybrid_{name}.json")
    cmd = [
      PY,
      "benchmarks/hybrid_edge_batch.py",
      f"--config={config}",
      *_overrides(overrides),
      *args,
      f"--json_out={path}",
    ]
    p = run(check, f"hybrid_edge {name}", cmd, budget)
    if p is None:
      out["variants"][name] = skipped("no time left")
      continue
    st = p.status()
    if st["status"] == "ok" and os.path.exists(path):
      with open(path) as f:
        st.update(json.load(f))
      st["config"], st["overrides"] = config, overrides
      lo, hi = st["ratio_of"]
      check.say(
        f"  {name}: "
        + ", ".join(f"B={r['batch']} {r['step_ms']:.3f} ms" for r in st["rows"])
        + f"; throughput B={hi}/B={lo} = {st['throughput_ratio']:.2f}x (step),"
        f" {st.get('chain_throughput_ratio', float('nan')):.2f}x (edge_denoise chain)"
      )
    out["variants"][name] = st
  statuses = {v["status"] for v in out["variants"].values()}
  out["status"] = "ok" if statuses == {"ok"} else ("failed" if "ok" not in statuses else "partial")
  return out


def train_step_cmd(config, overrides, json_out, peak, *, compile_only=False, repeats=20):
  cmd = [
    PY,
    "benchmarks/train_step.py",
    f"--config={config}",
    *_overrides(overrides),
    f"--json_out={json_out}",
  ]
  if compile_only:
    return cmd + ["--compile_only"]
  return (
    cmd
    + [f"--repeats={repeats}"]
    + ([f"--peak_tflops={peak}"] if finite(peak) and peak > 0 else [])
  )


def _oom(text: str) -> bool:
  return bool(re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|OOM when allocating", text))


def _utilisation(st: dict, peak: float) -> None:
  """MFU: model FLOPs (3 x forward x images) over the peak; XLA's count of the whole step where
  the model count is missing (collab). ``hfu``: XLA's count (optimizer and EMA included; a loop
  body, as TFDiff's scanned blocks, counted once)."""
  step_s = st["step_ms_median"] / 1e3
  ok = finite(peak) and peak > 0
  st["hfu"] = st["flops_per_step"] / step_s / (peak * 1e12) if ok else None
  model = st.get("model_flops_per_step")
  st["mfu_from"] = "model FLOPs, 3 x forward" if finite(model) else "XLA FLOPs of the step"
  flops = model if finite(model) else st["flops_per_step"]
  st["mfu"] = flops / step_s / (peak * 1e12) if ok else None


def part_train_step(
  check: Check, runs, peak: float, budget: float, repeats: int, precompiled: dict, out=None
) -> dict:
  """Times ``runs``, adding them to ``out`` (a new part's dict when None)."""
  out = out if out is not None else {"status": "ok", "peak_tflops": peak, "runs": {}}
  for name, config, overrides in runs:
    overrides = dict(overrides)
    for attempt in range(2):
      path = os.path.join(check.work, f"train_step_{name}.json")
      cmd = train_step_cmd(config, overrides, path, peak, repeats=repeats)
      p = run(check, f"train_step {name}", cmd, budget)
      if p is None:
        st = skipped("no time left")
        break
      st = p.status()
      if st["status"] == "ok" and os.path.exists(path):
        with open(path) as f:
          st.update(json.load(f))
        _utilisation(st, peak)
        mfu = f"{100 * st['mfu']:.1f}%" if st["mfu"] is not None else "n/a"
        check.say(
          f"  {name}: batch {st['batch']} {st['dtype']}, step {st['step_ms_median']:.2f} ms,"
          f" {st['images_per_s']:.1f} img/s, {st['achieved_tflops']:.3g} TFLOP/s (XLA count),"
          f" MFU {mfu} ({st['mfu_from']}; compile {st['compile_s']:.1f}s)"
        )
      halved = max(1, int(overrides["batch_size"]) // 2)
      if (
        st["status"] == "failed"
        and _oom(p.output())
        and halved < int(overrides["batch_size"])
        and attempt == 0
      ):
        check.say(
          f"  {name}: out of memory at batch {overrides['batch_size']}; once more at {halved}"
        )
        st_first = st
        overrides["batch_size"] = halved
        continue
      break
    if attempt == 1:
      st["first_attempt"] = st_first
    st["config"], st["overrides"] = config, overrides
    if name in precompiled:
      st["precompile"] = precompiled[name]
    out["runs"][name] = st
  statuses = {v["status"] for v in out["runs"].values()}
  out["status"] = "ok" if statuses == {"ok"} else ("failed" if "ok" not in statuses else "partial")
  return out


def part_shapes(check: Check, overrides: dict, budget: float, bg: Background) -> dict:
  workdir = os.path.join(check.work, "shapes_run")
  cmd = [
    PY,
    "-m",
    "common.train",
    "--config=configs/ddpm.py:shapes",
    f"--workdir={workdir}",
    *_overrides(overrides),
  ]
  bg_at_start = bg.active()
  p = run(check, "train_shapes", cmd, budget, bg=bg)
  if p is None:
    return skipped("no time left")
  st = p.status()
  st.update(config="configs/ddpm.py:shapes", overrides=overrides, background_compiles=bg_at_start)
  records = []
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          pass
  records = [r for r in records if "loss" in r]
  if records:
    # The first logged window holds the compile: the rate is the median of the later ones.
    later = [r for r in records[1:] if "steps_per_s" in r]
    rates = [r["steps_per_s"] for r in later]
    st.update(
      steps=records[-1]["step"],
      logged=[{"step": r["step"], "loss": r["loss"]} for r in records],
      first_step=records[0]["step"],
      first_loss=records[0]["loss"],
      last_step=records[-1]["step"],
      last_loss=records[-1]["loss"],
      steps_per_s=statistics.median(rates) if rates else None,
      images_per_s=statistics.median(r["images_per_s"] for r in later) if rates else None,
    )
    check.say(
      f"  shapes: loss {st['first_loss']:.4f} (step {st['first_step']}) -> {st['last_loss']:.4f}"
      f" (step {st['last_step']}), {st['steps_per_s'] or float('nan'):.2f} steps/s"
      f" (median over the logged windows after the first; {bg_at_start} compiles queued beside it)"
    )
  elif st["status"] == "ok":
    st.update(status="failed", error="no loss in metrics.jsonl")
  grids = (
    sorted(os.listdir(os.path.join(workdir, "samples")))
    if os.path.isdir(os.path.join(workdir, "samples"))
    else []
  )
  if grids:
    shutil.copy(os.path.join(workdir, "samples", grids[-1]), os.path.join(check.out, SAMPLES))
    st["samples_png"] = SAMPLES
  return st


def part_vs_pytorch(
  check: Check, overrides: dict, variants: list[str], args: list[str], budget: float, peak: float
) -> dict:
  if importlib.util.find_spec("torch") is None:
    check.say("vs_pytorch: skipped, PyTorch is not installed")
    return skipped("PyTorch is not installed (pip install -e '.[bench]')")
  cmd = [
    PY,
    "benchmarks/vs_pytorch.py",
    f"--config={VS_CONFIG}",
    *_overrides(overrides),
    "--parts=train",
    f"--variants={','.join(variants)}",
    *args,
  ]
  if finite(peak) and peak > 0:
    cmd.append(f"--peak_gflops={peak * 1e3}")
  p = run(check, "vs_pytorch", cmd, budget)
  if p is None:
    return skipped("no time left")
  st = p.status()
  st.update(config=VS_CONFIG, overrides=overrides, variants=variants, loss="simple (both sides)")
  summary = last_json(p.output())
  if summary is None:
    if st["status"] == "ok":
      st.update(status="failed", error="no JSON line")
    return st
  results = summary.get("results", {})
  train = {v: results.get(v, {}).get("train") for v in variants}
  flops = (summary.get("flops") or {}).get("train")
  st.update(
    batch=summary.get("batch"),
    dtype=summary.get("dtype"),
    params=summary.get("params"),
    flops_per_step=flops,
    errors=summary.get("errors"),
    setup_s=summary.get("setup_s"),
    jax_device=summary.get("jax_device"),
    torch_device=summary.get("torch_device"),
    rounds=summary.get("rounds"),
    steps_per_round=summary.get("steps_per_round"),
  )
  for v in variants:
    r = train[v]
    st[f"{v}_ms"] = r["median_ms"] if r else None
    if r and finite(flops) and finite(peak) and peak > 0:
      st[f"{v}_mfu"] = flops / (r["median_ms"] / 1e3) / (peak * 1e12)
  jax_ms = st.get("jax_ms")
  for v in variants:
    if v != "jax" and jax_ms and st.get(f"{v}_ms"):
      st[f"speedup_jax_over_{v}"] = st[f"{v}_ms"] / jax_ms  # > 1: JAX is faster
  if not jax_ms:
    st["status"] = "failed"
  elif any(st.get(f"{v}_ms") is None for v in variants):
    st["status"] = "partial"  # a PyTorch variant failed: its error is in ``errors``
  check.say(
    "  vs_pytorch: "
    + ", ".join(
      f"{v} {st[f'{v}_ms']:.2f} ms" if st.get(f"{v}_ms") else f"{v} FAILED" for v in variants
    )
    + "".join(
      f"; {k.split('_over_')[1]} / JAX step time {st[k]:.2f} (> 1: JAX is faster)"
      for k in st
      if k.startswith("speedup_jax_over_")
    )
  )
  return st
