"""Where the suite's time goes, test by test: making programs (JAX's tracing and lowering, XLA's
compile) against the rest, in the pytest workers and in the processes each test launches, and
which programs XLA's time goes to (by JAX's name for them, e.g. ``jit(train_step)``).

  SEGDIFF_TEST_COMPILE_PROFILE=/tmp/prof python -m pytest -n 2 --dist loadfile -q
  python -m tests.compile_profile /tmp/prof [TOP]

With the variable set, the conftest sums JAX's compile events per test in the worker
(``worker-<pid>.jsonl``, one line a test: setup, call and teardown) and points
``$SEGDIFF_TIMING_FILE`` of the processes the test launches at one file per process
(``sub-<test>-<pid>.json``, written by ``common.train.timing`` at exit, process 0 of a
multi-process launch only). A launch that sets its own timing file (the main job's runs) is not
counted. The report lists the tests by wall seconds.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import time

from common.train import timing

ENV = "SEGDIFF_TEST_COMPILE_PROFILE"
_MAKING = ("trace_s", "lower_s", "compile_s")


def test_key(nodeid: str) -> str:
  """A file-name-safe key of a test id."""
  return hashlib.sha1(nodeid.encode()).hexdigest()[:12]


class Recorder:
  """Per-test deltas of the worker's compile totals, and the timing file its launches inherit."""

  def __init__(self, directory: str):
    self.dir = directory
    os.makedirs(directory, exist_ok=True)
    self.totals = timing.Totals().listen()

  def start(self, nodeid: str) -> tuple:
    key = test_key(nodeid)
    os.environ[timing.ENV] = os.path.join(self.dir, f"sub-{key}-{{pid}}.json")
    return (self.totals.summary(), self.totals.programs()), key, time.perf_counter()

  def end(self, nodeid: str, at_start: tuple, key: str, start: float) -> None:
    os.environ.pop(timing.ENV, None)
    before, programs_before = at_start
    after = self.totals.summary()
    row = {"test": nodeid, "key": key, "wall_s": round(time.perf_counter() - start, 2)}
    for k in (*_MAKING, "programs", "cache_hits"):
      row[k] = round(after[k] - before[k], 3)
    # This test's XLA seconds by program name (every program, so that the report can sum them).
    row["xla_by_program"] = {}
    for name, (n, sec) in self.totals.programs().items():
      n0, sec0 = programs_before.get(name, (0, 0.0))
      if n > n0:
        row["xla_by_program"][name] = [n - n0, round(sec - sec0, 3)]
    with open(os.path.join(self.dir, f"worker-{os.getpid()}.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def rows(directory: str) -> list[dict]:
  """Every test's record with its launches summed in (``sub_*``), longest first."""
  out = []
  for path in glob.glob(os.path.join(directory, "worker-*.jsonl")):
    with open(path) as f:
      out += [json.loads(line) for line in f if line.strip()]
  for row in out:
    subs = [_read_json(p) for p in glob.glob(os.path.join(directory, f"sub-{row['key']}-*.json"))]
    subs = [s for s in subs if s]
    row["making_s"] = sum(row[k] for k in _MAKING)
    row["launches"] = len(subs)
    row["sub_making_s"] = sum(s.get(k, 0.0) for s in subs for k in _MAKING)
    row["sub_programs"] = sum(s.get("programs", 0) for s in subs)
    row["sub_cache_hits"] = sum(s.get("cache_hits", 0) for s in subs)
    row["sub_wall_s"] = sum(s.get("wall_s", 0.0) for s in subs)
  return sorted(out, key=lambda r: -r["wall_s"])


def xla_by_program(directory: str, table: list[dict] | None = None) -> list[list]:
  """``[[program name, compiles, XLA seconds], ...]`` over the whole run, the workers and the
  launches (their ``TOP_PROGRAMS`` largest each) together, the largest first: which programs
  the suite's compile time goes to. ``table``: ``rows(directory)`` when already read."""
  summed: dict[str, list] = {}
  for row in rows(directory) if table is None else table:
    for name, (n, sec) in row.get("xla_by_program", {}).items():
      timing.add_compiles(summed, name, n, sec)
  for path in glob.glob(os.path.join(directory, "sub-*.json")):
    for name, n, sec in (_read_json(path) or {}).get("xla_by_program", []):
      timing.add_compiles(summed, name, n, sec)
  return timing.largest(summed, top=len(summed))


def report(directory: str, top: int = 40) -> str:
  """A markdown table of the ``top`` longest tests, a line of totals, then the programs XLA
  spent the most on."""
  table = rows(directory)
  lines = [
    "| test | wall s | making programs s (trace / lower / XLA) | programs (cache hits) | launches"
    " | their making s | their programs (hits) |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in table[:top]:
    lines.append(
      f"| {r['test']} | {r['wall_s']:.1f} | {r['making_s']:.1f} ({r['trace_s']:.1f} /"
      f" {r['lower_s']:.1f} / {r['compile_s']:.1f}) | {r['programs']:.0f} ({r['cache_hits']:.0f})"
      f" | {r['launches']} | {r['sub_making_s']:.1f} | {r['sub_programs']} ({r['sub_cache_hits']}) |"
    )
  total = {k: sum(r[k] for r in table) for k in ("wall_s", *_MAKING, "sub_making_s")}
  lines.append(
    f"\n{len(table)} tests, {total['wall_s']:.0f} s in the workers, of which making programs"
    f" {sum(total[k] for k in _MAKING):.0f} s (trace {total['trace_s']:.0f}, lower"
    f" {total['lower_s']:.0f}, XLA {total['compile_s']:.0f}); their launches made programs for"
    f" {total['sub_making_s']:.0f} s"
  )
  lines += ["", "| program | compiles | XLA s |", "|---|---|---|"]
  lines += [
    f"| {name} | {n} | {sec:.1f} |" for name, n, sec in xla_by_program(directory, table)[:top]
  ]
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  if len(argv) not in (2, 3):
    print("usage: python -m tests.compile_profile DIR [TOP]", file=sys.stderr)
    return 2
  if not glob.glob(os.path.join(argv[1], "worker-*.jsonl")):
    print(f"{argv[1]}: no worker-*.jsonl (run pytest with ${ENV}={argv[1]})", file=sys.stderr)
    return 2
  print(report(argv[1], int(argv[2]) if len(argv) == 3 else 40))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
