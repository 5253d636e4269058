"""Test-wide setup: 8 forced CPU devices, set before anything imports JAX."""

import os

# Tests are dominated by XLA:CPU compiling many small programs, not by running them: LLVM at -O0
# compiles a collab train step in 21 s instead of 32 s.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same small programs (a train step, a sampler); a persistent cache shared
# by the xdist workers compiles each once.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.path.dirname(os.path.abspath(__file__)), ".jax_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
