"""benchmarks/gpu_check.sh: its CPU mode runs every part of the GPU check at tiny sizes.

The device run itself needs a GPU (issue 24); this checks that the script, its driver
(``benchmarks/gpu_check.py``) and the benchmarks it calls work end to end and that the JSON summary
holds a finite figure for every part. PyTorch is optional: without it (CI) the comparison part is
recorded as skipped and everything else must still pass.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _finite(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.mark.slow
def test_cpu_mode_writes_every_part_with_finite_figures(tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
  cmd = ["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--cpu"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-3000:]
  s = json.loads((out / "gpu_check.json").read_text())
  parts = s["parts"]
  assert s["mode"] == "cpu"
  assert set(parts) == {"env", "hybrid_edge", "train_shapes", "train_step", "vs_pytorch"}, parts
  assert _finite(s["peak_tflops"]) and s["peak_tflops"] > 0

  assert parts["env"]["status"] == "ok", parts["env"]
  assert parts["env"]["import_errors"] == []

  # The edge's batched step at every B, its fit, and the throughput ratio of the largest B.
  hybrid = parts["hybrid_edge"]
  assert hybrid["status"] == "ok", hybrid
  for v in hybrid["variants"].values():
    assert [r["batch"] for r in v["rows"]] == [1, 2]
    for r in v["rows"]:
      for k in ("step_ms", "image_steps_per_s", "chain_ms_per_level"):
        assert _finite(r[k]) and r[k] > 0, (k, r)
    assert _finite(v["throughput_ratio"]) and v["throughput_ratio"] > 0
    assert _finite(v["chain_throughput_ratio"]) and _finite(v["fit_k_ms"])

  # Real training steps with a logged loss at each.
  shapes = parts["train_shapes"]
  assert shapes["status"] == "ok", shapes
  assert shapes["last_step"] == 3 and len(shapes["logged"]) == 3
  for k in ("first_loss", "last_loss", "steps_per_s", "images_per_s"):
    assert _finite(shapes[k]) and shapes[k] > 0, (k, shapes)
  assert (out / "shapes_samples.png").exists()

  # Every preset's step: time, images/s, XLA FLOPs and MFU; the first came from the background
  # compile through the persistent cache.
  steps = parts["train_step"]
  assert steps["status"] == "ok", steps
  assert set(steps["runs"]) == {
    "ddpm_imagenet64_bf16",
    "ddpm_imagenet64_f32",
    "ddpm_cifar10_bf16",
    "mobile_celeba64_config1_bf16",
    "collab_celeba64_bf16",
  }
  for name, r in steps["runs"].items():
    for k in ("step_ms_median", "images_per_s", "flops_per_step", "achieved_tflops", "mfu"):
      assert _finite(r[k]) and r[k] > 0, (name, k, r)
    assert r["dtype"] == ("float32" if name.endswith("f32") else "bfloat16")
  assert steps["runs"]["collab_celeba64_bf16"]["batch"] == 2  # K = 2 clients x 1 image
  assert steps["runs"]["ddpm_imagenet64_bf16"]["precompile"]["status"] == "ok"

  vs = parts["vs_pytorch"]
  if HAS_TORCH:
    assert vs["status"] == "ok", vs
    assert vs["dtype"] == "bfloat16" and vs["errors"] == {}
    for k in ("jax_ms", "eager_ms", "speedup_jax_over_eager"):
      assert _finite(vs[k]) and vs[k] > 0, (k, vs)
    assert vs["params"]["jax"] == vs["params"]["eager"]
  else:
    assert vs["status"] == "skipped" and "PyTorch" in vs["reason"]

  h = s["headline"]
  assert _finite(h["hybrid_tiny_throughput_ratio"]) and _finite(h["shapes_last_loss"])
  assert _finite(h["ddpm_imagenet64_bf16_mfu"])
  assert "done in" in log
