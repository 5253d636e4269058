"""XLA:CPU settings the binaries choose for the user, set before JAX creates its CPU backend (XLA
reads ``XLA_FLAGS`` once, then).

Why (issue 24, ``benchmarks/conv_cpu.py`` and ``benchmarks/vs_pytorch.py`` on the 2-core CPU):
XLA:CPU's default convolution path computes a 3x3 convolution's weight gradient at ~32 GFLOP/s
(the shapes preset's 32x32x128 layer: forward 178 ms, weight gradient 581 ms, batch 64), a third of
its forward speed, and its large matrix products at ~65 GFLOP/s. With dots handed to YNNPACK
(``--xla_cpu_experimental_ynn_fusion_type=dot``) the same layer takes 73 ms forward and 91 ms for
the weight gradient, a 128 x 65536 x 128 product 162 GFLOP/s, and the shapes train step 13.3 s ->
7.6 s (median of 3, load ~3), the digits U-Net step 90 -> 63 ms. But the same flag makes
TFDiff's small dots slower (mobile's digits_config1 step 47-50 -> 117-274 ms, TFDiff's block
938 -> 1,407 ms), so it is set for the models it was measured to help, ``U_NET_MODELS``, named by
``config.model.name``. A flag the user already put in ``XLA_FLAGS`` is left as given;
``SEGDIFF_XLA_DEFAULTS=0`` turns the defaults off. The flags concern the CPU backend only (GPUs
and TPUs ignore them), but XLA aborts on a flag it does not know and experimental flags come and
go: they are only added for the jaxlib line they were measured with (``JAXLIB_RANGE``, 0.10.x);
re-measure with ``benchmarks/conv_cpu.py`` before widening it.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

CPU_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "dot"}
U_NET_MODELS = ("unet",)
JAXLIB_RANGE = ((0, 10, 2), (0, 11, 0))  # [first, past the last)
OPT_OUT = "SEGDIFF_XLA_DEFAULTS"


def _jaxlib_version() -> tuple[int, ...]:
  try:
    text = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ()
  return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def apply_cpu_defaults(model_name: str, env: dict | None = None) -> list[str]:
  """For a run of ``config.model.name == model_name``: adds to ``env["XLA_FLAGS"]`` (default
  ``os.environ``) each of ``CPU_DEFAULTS`` it does not set yet, when the model is one of
  ``U_NET_MODELS``; returns the flags added. Call it before anything creates a JAX backend."""
  env = os.environ if env is None else env
  if model_name not in U_NET_MODELS:
    return []
  first, past = JAXLIB_RANGE
  if env.get(OPT_OUT, "1") == "0" or not first <= _jaxlib_version() < past:
    return []
  given = env.get("XLA_FLAGS", "")
  added = [f"--{k}={v}" for k, v in CPU_DEFAULTS.items() if f"--{k}=" not in given]
  if added:
    env["XLA_FLAGS"] = " ".join([given.strip(), *added]).strip()
  return added
