"""What ``common.compare --plan`` reads from the main job (``runs.json``): the result rows with
their sections, labels and baselines, every launch's wall time and compile time, the failures, and
the environment the figures were measured in."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys


@dataclasses.dataclass
class Outcome:
  """What became of one entry of the plan."""

  name: str
  status: str  # ok | skipped (finished earlier) | failed | blocked | disabled
  command: list[str]
  log: str
  wall_time_s: float | None = None
  rc: int | None = None
  error: str = ""
  timing: dict | None = None  # common.train.timing's totals: tracing, lowering, XLA compiling


def display(argv: list[str]) -> str:
  """The command as a shell line, with ``python`` for the interpreter."""
  return shlex.join(["python", *argv[1:]])


def load_average() -> float | None:
  """The machine's load, one minute's average (None where the OS has none)."""
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def compile_seconds(spent: dict) -> float:
  """What a run spent making programs: tracing, lowering to StableHLO and XLA's compile."""
  return sum(float(spent.get(k) or 0.0) for k in ("trace_s", "lower_s", "compile_s"))


def _cost(name: str, runs, outcomes: dict[str, Outcome]) -> float | None:
  """Wall time of a run and of everything it needs (what it costs from scratch)."""
  seen: set[str] = set()
  stack, total = [name], 0.0
  while stack:
    n = stack.pop()
    if n in seen:
      continue
    seen.add(n)
    t = outcomes[n].wall_time_s if n in outcomes else None
    if t is None and outcomes.get(n) and outcomes[n].status != "disabled":
      return None
    total += t or 0.0
    stack += list(runs[n].needs)
  return total


ENVIRONMENT_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy")


def environment(load_at_start: float | None = None) -> dict:
  """What the figures of a report depend on besides the code: package versions, the CPU, XLA's
  flags and the machine's load (one minute's average, at the start and at the end), so that two
  reports can be told apart when a figure moves without a code change."""
  from importlib import metadata

  versions = {}
  for name in ENVIRONMENT_PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
  except OSError:
    pass
  return {
    "python": sys.version.split()[0],
    "packages": versions,
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "load_at_start": load_at_start,
    "load_at_end": load_average(),
  }


def plan_report(
  config,
  workdir: str,
  outcomes: dict[str, Outcome],
  total: float,
  shown_workdir: str = "",
  load_at_start: float | None = None,
  parallel_runs: int = 1,
) -> dict:
  """What ``common.compare --plan`` reads: rows, their sections, labels, baselines, failures.

  ``shown_workdir``: the workdir as the user typed it, for the command line in the report;
  ``load_at_start``: the machine's load when the invocation started (``environment``).
  """
  runs = config.runs
  parallel = parallel_runs
  rows = {}
  for name in config.order:
    e = runs[name]
    if not e.report.section or outcomes[name].status == "disabled":
      continue
    rows[name] = {
      "section": e.report.section,
      "label": e.report.label,
      "baseline": e.report.baseline,
      "baseline_arm": e.report.baseline_arm,
      "primary": e.report.primary,
      "replicate_of": e.report.get("replicate_of", ""),
      "seed": e.report.get("seed", 0),
      "status": outcomes[name].status if outcomes[name].status != "skipped" else "ok",
      "wall_time_s": _cost(name, runs, outcomes),
      "workdir": os.path.join(workdir, e.workdir),
    }
  failures = [
    {
      "name": o.name,
      "command": display(o.command),
      "rc": o.rc,
      "log": os.path.relpath(o.log, workdir) if o.log else "",
      "error": o.error,
    }
    for o in outcomes.values()
    if o.status in ("failed", "blocked")
  ]
  entries = [
    {
      "name": o.name,
      "status": o.status,
      "wall_time_s": o.wall_time_s,
      "timing": o.timing,
      "command": display(o.command),
    }
    for o in outcomes.values()
    if o.status != "disabled"
  ]
  return {
    "title": config.title,
    "command": f"python -m common.quickstart --workdir={shown_workdir or workdir}"
    + ("" if config.preset == "default" else f" --config=configs/quickstart.py:{config.preset}"),
    "note": "wall s: the run and every run it needs, on this machine"
    + ("" if parallel == 1 else f", {parallel} runs at a time"),
    "wall_time_s": total,
    # Every run's own wall time, those of earlier invocations included: what the whole plan cost.
    "runs_wall_time_s": sum(e["wall_time_s"] or 0.0 for e in entries),
    "environment": environment(load_at_start),
    "runs": rows,
    "entries": entries,
    "failures": failures,
  }
