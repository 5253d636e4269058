"""Where a binary's time goes: JAX's tracing, lowering and XLA compiling against the rest.

A binary started with ``$SEGDIFF_TIMING_FILE`` set (the main job sets it for every run it launches)
sums JAX's own compile-time events and writes them there as JSON when it exits:
``{"wall_s", "trace_s", "lower_s", "compile_s", "programs", "cache_hits"}``; ``compile_s`` is XLA's
backend compile (or reading it from the persistent cache), ``programs`` the compile requests,
``cache_hits`` how many of them the persistent cache served. ``wall_s`` counts from
``record_to`` (after the imports). ``xla_by_program`` lists the programs XLA spent the most on,
``[name, compiles, seconds]`` by JAX's program name (``jit(train_step)``), the largest first. A
``{pid}`` in the path is replaced by the process id, so that processes sharing the variable write
one file each (``tests/compile_profile.py``).
"""

from __future__ import annotations

import atexit
import os
import threading
import time

ENV = "SEGDIFF_TIMING_FILE"

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
# JAX's monitoring events (jax._src.dispatch) -> our field.
_DURATIONS = {
  "/jax/core/compile/jaxpr_trace_duration": "trace_s",
  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
  _BACKEND_COMPILE: "compile_s",
}
# How many programs ``summary`` lists by name.
TOP_PROGRAMS = 10
_COUNTS = {
  "/jax/compilation_cache/compile_requests_use_cache": "programs",
  "/jax/compilation_cache/cache_hits": "cache_hits",
}


class Totals:
  """JAX's compile events summed (listeners for ``jax.monitoring``), thread-safe."""

  def __init__(self):
    self.lock = threading.Lock()  # compiles may run on several threads
    self.start = time.perf_counter()
    self.values = dict.fromkeys([*_DURATIONS.values(), *_COUNTS.values()], 0.0)
    self.by_program: dict[str, list] = {}  # name -> [compiles, XLA seconds]

  def listen(self) -> Totals:
    """Registers with ``jax.monitoring``: every compile event from now on is summed here."""
    import jax

    jax.monitoring.register_event_duration_secs_listener(self.on_duration)
    jax.monitoring.register_event_listener(self.on_event)
    return self

  def on_duration(self, event: str, seconds: float, **kwargs) -> None:
    if event in _DURATIONS:
      with self.lock:
        self.values[_DURATIONS[event]] += seconds
        if event == _BACKEND_COMPILE:
          add_compiles(self.by_program, str(kwargs.get("fun_name", "?")), 1, seconds)

  def on_event(self, event: str, **_) -> None:
    if event in _COUNTS:
      with self.lock:
        self.values[_COUNTS[event]] += 1

  def programs(self) -> dict[str, list]:
    """``{program name: [compiles, XLA seconds]}`` so far (a copy)."""
    with self.lock:
      return {k: list(v) for k, v in self.by_program.items()}

  def summary(self) -> dict:
    with self.lock:
      out = {k: round(v, 3) for k, v in self.values.items()}
      out["xla_by_program"] = largest(self.by_program)
    out["wall_s"] = round(time.perf_counter() - self.start, 3)
    for k in _COUNTS.values():
      out[k] = int(out[k])
    return out


def add_compiles(by_program: dict[str, list], name: str, compiles: int, seconds: float) -> None:
  """Adds ``compiles`` compiles of ``seconds`` in all to ``by_program[name]`` (``[compiles,
  seconds]``)."""
  entry = by_program.setdefault(name, [0, 0.0])
  entry[0] += compiles
  entry[1] += seconds


def largest(by_program: dict[str, list], top: int = TOP_PROGRAMS) -> list[list]:
  """``[[name, compiles, seconds], ...]`` of the ``top`` programs by XLA seconds, largest first."""
  ranked = sorted(by_program.items(), key=lambda kv: -kv[1][1])[:top]
  return [[name, int(n), round(sec, 3)] for name, (n, sec) in ranked]


def record_to(path: str) -> None:
  """Sums JAX's compile events from now on and writes the totals to ``path`` (``{pid}``: this
  process's id) at exit."""
  import jax

  from common import fileio

  path = path.replace("{pid}", str(os.getpid()))  # one file per process when several share it
  totals = Totals().listen()

  def write():
    if jax.process_index() == 0:
      fileio.write_json(path, totals.summary())

  atexit.register(write)


def record_if_asked() -> None:
  """``record_to($SEGDIFF_TIMING_FILE)`` when that is set."""
  path = os.environ.get(ENV)
  if path:
    record_to(path)


def read(path: str) -> dict | None:
  """A timing file's totals; None when it is missing or unreadable (a run killed before exit)."""
  import json

  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return None
  return data if isinstance(data, dict) else None
