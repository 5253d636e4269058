"""The main job: ``python -m common.quickstart --workdir=runs/quickstart``.

Runs the plan of ``configs/quickstart.py`` (``:default``; ``:tiny`` for the tests): every method's
binaries launched as a user would launch them (``python -m <module> --config=... --workdir=...
--config.x=y``, never imported, so ``common`` still imports no method), ``common.eval`` on each
generative workdir, then ``common.compare`` over every result into ``<workdir>/report.md``,
``report.csv`` and ``pareto.png``.

* Progress: one line per run start and end (``[i/n] name``), the binary's own progress lines
  passed through (at most one every ``progress_every_s``), elapsed time and the total ETA (the
  plan's per-run estimates, rescaled by how the runs so far compared with theirs).
* Logs: each run's stdout and stderr in ``<workdir>/logs/<name>.log``.
* Resume: a run that exited 0 with the same command and whose ``done`` file exists is skipped;
  any other is launched again with the same command (the binaries resume from their checkpoints).
  A run whose inputs were re-made in this invocation runs again.
* Failures: a failing run's error tail goes in the report, the runs that need it are marked
  blocked, the others go on, and the command exits 1 at the end.
* Runs at a time: ``max_parallel`` (1: one after the other; 0, the default: two on a machine
  without an accelerator, else one); with more, the next run to start is the first whose needs
  have ended in ``start_order`` (the longest chain of estimates first), and every run's wall time
  is measured while it shares the machine, except an entry marked ``alone`` (one that measures
  time), which runs with nothing beside it.
* Compiled programs: every launch keeps them in one persistent cache (``compile_cache``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from absl import app, flags

from common import fileio, replicates
from common.plan_report import Outcome, compile_seconds, display, load_average, plan_report
from common.train import cli, timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE_DIR = ".quickstart"  # one record per finished run: its command, status, wall time
PLAN_FILE = "runs.json"  # what common.compare reads with --plan
ERROR_TAIL_LINES = 25


class PlanError(ValueError):
  """A plan that cannot run (unknown entry, missing field, a need that comes later)."""


def _define_flags() -> dict[str, Any]:
  """Defined only when this module runs as a binary (the tests import it)."""
  from ml_collections import config_flags

  return {
    "config": config_flags.DEFINE_config_file(
      "config",
      os.path.join(REPO, "configs", "quickstart.py"),
      "The plan of runs and its preset (configs/quickstart.py:default | tiny).",
      lock_config=True,
    ),
    "workdir": flags.DEFINE_string("workdir", None, "Where every run and the report go."),
    "dry_run": flags.DEFINE_bool("dry_run", False, "Print the commands and estimates, run none."),
  }


# ------------------------------------------------------------------------------------------------
# The plan.


def is_active(config, name: str) -> bool:
  """Whether run ``name`` runs: it is ``enabled`` and its ``when`` holds (a switch of the config,
  ``not <switch>`` for its negation); PlanError when ``when`` names no boolean field."""
  e = config.runs[name]
  if not e.when:
    return bool(e.enabled)
  switch = e.when.removeprefix("not ").strip()
  if not isinstance(config.get(switch), bool):
    raise PlanError(f"quickstart run {name!r}: when={e.when!r} names no switch of the config")
  return bool(e.enabled) and config[switch] != e.when.startswith("not ")


def enabled_entries(config) -> list[str]:
  """The enabled entry names in launch order; PlanError on an inconsistent plan."""
  order = list(config.order)
  runs = config.runs
  unknown = [n for n in order if n not in runs]
  if unknown:
    raise PlanError(f"quickstart order names unknown runs {unknown}; runs are {sorted(runs)}")
  if len(set(order)) != len(order):
    raise PlanError(f"quickstart order lists a run twice: {order}")
  missing = sorted(set(runs.keys()) - set(order))
  if missing:
    raise PlanError(f"quickstart runs {missing} are not in `order`")
  active = {n for n in order if is_active(config, n)}
  names = [n for n in order if n in active]
  seen: set[str] = set()
  for n in names:
    e = runs[n]
    if not e.module or not e.workdir:
      raise PlanError(f"quickstart run {n!r} needs a module and a workdir")
    for need in e.needs:
      if need not in runs:
        raise PlanError(f"quickstart run {n!r} needs unknown run {need!r}")
      if need in active and need not in seen:
        raise PlanError(f"quickstart run {n!r} needs {need!r}, which comes later in `order`")
    seen.add(n)
  return names


def _fill(text: str, workdir: str) -> str:
  return text.replace("{workdir}", workdir)


def command(entry, workdir: str) -> list[str]:
  """The argv of one entry, as a user would type it (``workdir``: the quickstart's, absolute)."""
  argv = [sys.executable, "-m", entry.module]
  if entry.config:
    # Relative config paths are the repo's (runs start in the repo root, as WORKSPACE.md's do).
    argv.append(f"--config={entry.config}")
  argv.append(f"--workdir={os.path.join(workdir, entry.workdir)}")
  for o in entry.overrides:
    o = _fill(o, workdir)
    argv.append(o if o.startswith("--") else f"--config.{o}")
  argv += [_fill(a, workdir) for a in entry.args]
  return argv


def _record_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, STATE_DIR, f"{name}.json")


def _read_record(workdir: str, name: str) -> dict | None:
  try:
    with open(_record_path(workdir, name)) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _write_record(workdir: str, name: str, record: dict) -> None:
  fileio.write_json(_record_path(workdir, name), record)


def is_finished(entry, name: str, workdir: str, argv: list[str]) -> dict | None:
  """The record of an earlier successful run of exactly this command whose output exists."""
  rec = _read_record(workdir, name)
  if rec is None or rec.get("status") != "ok" or rec.get("command") != argv[1:]:
    return None
  if entry.done and not os.path.exists(os.path.join(workdir, entry.workdir, entry.done)):
    return None
  return rec


# ------------------------------------------------------------------------------------------------
# Progress and ETA.


def fmt_seconds(seconds: float | None) -> str:
  if seconds is None:
    return "?"
  m, s = divmod(int(round(max(seconds, 0.0))), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Eta:
  """The total ETA: the estimates of what is left, rescaled by measured / estimated so far, over
  ``parallel`` runs at a time (their measured times include their sharing the machine)."""

  def __init__(self, estimates: dict[str, float], parallel: int = 1):
    self.estimates = dict(estimates)
    self.pending = list(estimates)
    self.parallel = max(1, parallel)
    self.measured = 0.0
    self.estimated = 0.0
    self.lock = threading.Lock()  # runs finish on their launch threads

  def scale(self) -> float:
    if self.estimated <= 0:
      return 1.0
    return min(max(self.measured / self.estimated, 0.25), 4.0)

  def finish(self, name: str, seconds: float | None, ran: bool) -> None:
    with self.lock:
      if name in self.pending:
        self.pending.remove(name)
      if ran and seconds is not None:
        self.measured += seconds
        self.estimated += self.estimates[name]

  def remaining(self, current: str | None = None, current_elapsed: float = 0.0) -> float:
    with self.lock:
      k = self.scale()
      left = sum(self.estimates[n] for n in self.pending if n != current) * k
      if current is not None:
        left += max(self.estimates[current] * k - current_elapsed, 0.0)
    return left / self.parallel


_ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ (?:\S+:\d+)\] ")


def _launch(
  argv: list[str],
  log_path: str,
  on_line: Callable[[str], None],
  env_extra: dict[str, str] | None = None,
) -> tuple[int, list[str]]:
  """Runs ``argv`` from the repo root, output to ``log_path``; returns (rc, last lines)."""
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
  tail: deque[str] = deque(maxlen=200)
  with open(log_path, "a") as log:
    log.write(f"\n$ {display(argv)}\n")
    log.flush()
    proc = subprocess.Popen(
      argv,
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      bufsize=1,
      errors="replace",
    )
    with _LIVE_LOCK:
      _LIVE.add(proc)
    try:
      assert proc.stdout is not None
      for line in proc.stdout:
        log.write(line)
        log.flush()  # `tail -f logs/<name>.log` follows the run live
        line = line.rstrip("\n")
        tail.append(line)
        on_line(line)
      rc = proc.wait()
    except BaseException:
      proc.terminate()  # Ctrl-C or a kill of the quickstart: leave no orphan behind
      proc.wait()
      raise
    finally:
      with _LIVE_LOCK:
        _LIVE.discard(proc)
  return rc, list(tail)


# The launched processes still running: a Ctrl-C reaches the main thread only, which stops them
# (the threads that read their output then return).
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def _stop_live() -> None:
  with _LIVE_LOCK:
    procs = list(_LIVE)
  for proc in procs:
    proc.terminate()
  for proc in procs:
    proc.wait()


def error_tail(lines: list[str], n: int = ERROR_TAIL_LINES) -> str:
  """The informative end of a failed run's output: from its last traceback or error line."""
  start = max(0, len(lines) - n)
  for i in range(len(lines) - 1, -1, -1):
    if lines[i].startswith("Traceback") or lines[i].lower().startswith("error"):
      start = max(i, len(lines) - 4 * n)
      break
  return "\n".join(_ABSL_PREFIX.sub("", ln) for ln in lines[start:][-4 * n :])


_EXCEPTION_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Exit)\b|^error:", re.IGNORECASE)


def headline_error(tail: str) -> str:
  """The one line that says what went wrong: the last exception or ``error:`` line."""
  lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
  for ln in reversed(lines):
    if _EXCEPTION_LINE.match(ln.strip()):
      return ln.strip()
  return lines[-1] if lines else ""


# ------------------------------------------------------------------------------------------------
# The run.


def run_plan(
  config, workdir: str, *, echo: Callable[[str], None] | None = None, dry_run: bool = False
) -> dict[str, Any]:
  """Runs every enabled entry of the plan, then the comparison.

  Returns:
    ``{"outcomes": {name: Outcome}, "report": path or None, "ok": bool, "wall_time_s": float}``.
  """
  echo = echo or (lambda s: print(s, flush=True))
  shown_workdir, workdir = workdir, os.path.abspath(workdir)
  try:
    config = replicates.expand(config)
  except ValueError as e:
    raise PlanError(str(e)) from None
  names = enabled_entries(config)
  runs = config.runs
  argvs = {n: command(runs[n], workdir) for n in names}
  if dry_run:
    for i, n in enumerate(names, 1):
      echo(f"[{i}/{len(names)}] {n} (~{fmt_seconds(runs[n].estimate_s)}): {display(argvs[n])}")
    return {"outcomes": {}, "report": None, "ok": True, "wall_time_s": 0.0}
  os.makedirs(workdir, exist_ok=True)
  parallel = runs_at_a_time(config)
  echo = _one_line_at_a_time(echo)
  estimates = {n: float(runs[n].estimate_s) for n in names}
  session = _Session(config, workdir, echo, Eta(estimates, parallel))
  echo(
    f"quickstart ({config.preset}): {len(names)} runs in {workdir}, {parallel} at a time, "
    f"estimated {fmt_seconds(session.eta.remaining())}"
  )
  _run_entries(session, names, argvs, parallel)
  # In plan order (runs at a time end in any order), the disabled ones included.
  outcomes = {
    name: session.outcomes.get(name) or Outcome(name, "disabled", command(runs[name], workdir), "")
    for name in config.order
  }
  total = time.perf_counter() - session.t_start
  report = _compare(config, workdir, outcomes, total, echo, shown_workdir, session.load_at_start)
  ok = report is not None and all(
    o.status in ("ok", "skipped", "disabled") for o in outcomes.values()
  )
  failed = [o.name for o in outcomes.values() if o.status in ("failed", "blocked")]
  echo(
    f"quickstart: {'all runs finished' if not failed else 'FAILED: ' + ', '.join(failed)} in "
    f"{fmt_seconds(total)}; report {report or '(not written)'}"
  )
  return {"outcomes": outcomes, "report": report, "ok": ok, "wall_time_s": total}


# Device files of accelerators JAX would use (NVIDIA GPUs, TPU chips): with one of them, runs at
# a time would share its memory (each JAX process preallocates most of a GPU's), so "auto" is one.
_ACCELERATOR_DEVICE_FILES = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0")


def runs_at_a_time(config) -> int:
  """``config.max_parallel``, where 0 (auto) is 2 on a machine with two or more cores and no
  accelerator (compiles leave a core idle: the plan's CPU use was 155% of two cores, and two at a
  time ran 9 of its runs in 284 s against 356 and 370 s one at a time), else 1."""
  n = int(config.get("max_parallel", 1))
  if n > 0:
    return n
  if (os.cpu_count() or 1) < 2 or any(os.path.exists(f) for f in _ACCELERATOR_DEVICE_FILES):
    return 1
  return 2


def _one_line_at_a_time(echo: Callable[[str], None]) -> Callable[[str], None]:
  lock = threading.Lock()

  def locked(line: str) -> None:
    with lock:
      echo(line)

  return locked


def start_order(runs, names: list[str], parallel: int) -> list[str]:
  """The order runs are offered a free slot in: the plan order one at a time; with more at a
  time, the longest chain of estimates first (a run's ``estimate_s`` plus the longest chain of
  the runs that need it), ties in plan order, so that a long chain (adaptive's training and its
  two evaluations) does not start last and run on alone while the other core idles."""
  if parallel <= 1:
    return list(names)
  chain: dict[str, float] = {}
  for name in reversed(names):  # needs come first in ``names``, so dependents are done first
    after = [chain[n] for n in names if n in chain and name in runs[n].needs]
    chain[name] = float(runs[name].estimate_s) + max(after, default=0.0)
  return sorted(names, key=lambda n: -chain[n])  # stable: plan order among equals


def _run_entries(session: _Session, names: list[str], argvs: dict, parallel: int) -> None:
  """Launches ``names`` (in plan order, needs first) with at most ``parallel`` running at once:
  the next run to start is the first in ``start_order`` whose needs have all settled, so
  ``parallel=1`` is the plan order, one run after the other; an ``alone`` run waits for the
  running ones to end and nothing starts beside it. Ctrl-C stops the running ones (``_launch``)."""
  heads = {n: f"[{i}/{len(names)}] {n}" for i, n in enumerate(names, 1)}
  pending, running = start_order(session.config.runs, names, parallel), {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    try:
      _schedule(session, pending, running, pool, argvs, heads, parallel)
    except BaseException:
      _stop_live()
      raise


def _schedule(session, pending, running, pool, argvs, heads, parallel) -> None:
  """``_run_entries``' loop: start what may start, then wait for one running entry to end."""
  runs = session.config.runs
  while pending or running:
    for name in list(pending):
      if len(running) >= parallel or any(runs[n].get("alone", False) for n in running):
        break
      if any(n in pending or n in running for n in runs[name].needs):
        continue
      if runs[name].get("alone", False) and running:
        break  # it may start once the running ones end; nothing else starts before it
      pending.remove(name)
      settled = session.settled(name, argvs[name], heads[name])
      if settled is not None:
        session.outcomes[name] = settled
        continue
      running[name] = pool.submit(session.launch, name, argvs[name], heads[name])
    if not running:
      if pending:  # enabled_entries orders needs first, so the first pending one may start
        raise PlanError(f"quickstart: no run can start among {pending}")
      continue
    done, _ = concurrent.futures.wait(
      running.values(), return_when=concurrent.futures.FIRST_COMPLETED
    )
    for name in [n for n, f in running.items() if f in done]:
      session.outcomes[name] = running.pop(name).result()


@dataclasses.dataclass
class _Session:
  """One invocation of the plan: what has happened so far, the ETA and the console."""

  config: Any
  workdir: str  # absolute
  echo: Callable[[str], None]
  eta: Eta
  outcomes: dict[str, Outcome] = dataclasses.field(default_factory=dict)
  remade: set[str] = dataclasses.field(default_factory=set)  # entries run (not skipped) here
  t_start: float = dataclasses.field(default_factory=time.perf_counter)
  load_at_start: float | None = dataclasses.field(default_factory=load_average)

  def elapsed(self) -> str:
    return fmt_seconds(time.perf_counter() - self.t_start)

  def log(self, name: str) -> str:
    return os.path.join(self.workdir, "logs", f"{name}.log")

  def settled(self, name: str, argv: list[str], head: str) -> Outcome | None:
    """The outcome of a run that is not launched: blocked by a need that did not finish, or
    finished earlier (same command, output there, no need re-made now); None otherwise."""
    entry, log = self.config.runs[name], self.log(name)
    bad = [
      nd
      for nd in entry.needs
      if nd in self.outcomes and self.outcomes[nd].status in ("failed", "blocked")
    ]
    if bad:
      self.eta.finish(name, None, ran=False)
      self.echo(f"{head}: blocked (needs {', '.join(bad)}, which did not finish)")
      return Outcome(name, "blocked", argv, log, error=f"needs {', '.join(bad)}")
    rec = is_finished(entry, name, self.workdir, argv)
    if rec is None or any(nd in self.remade for nd in entry.needs):
      return None
    self.eta.finish(name, None, ran=False)
    self.echo(f"{head}: finished earlier ({fmt_seconds(rec.get('wall_time_s'))}), skipped")
    return Outcome(
      name, "skipped", argv, log, wall_time_s=rec.get("wall_time_s"), timing=rec.get("timing")
    )

  def launch(self, name: str, argv: list[str], head: str) -> Outcome:
    """Runs one entry to its end, passing its progress lines through; records the outcome."""
    entry, log, workdir = self.config.runs[name], self.log(name), self.workdir
    self.echo(
      f"{head}: {display(argv)}\n    log {log} | estimate {fmt_seconds(entry.estimate_s)} | "
      f"elapsed {self.elapsed()} | total ETA {fmt_seconds(self.eta.remaining())}"
    )
    timing_path = os.path.join(workdir, "logs", f"{name}.timing.json")
    if os.path.exists(timing_path):
      os.remove(timing_path)
    env = {timing.ENV: os.path.abspath(timing_path)}
    if self.config.compile_cache:
      env[cli.COMPILE_CACHE_ENV] = cli.default_compile_cache_dir()
    t0 = time.perf_counter()
    rc, tail = _launch(argv, log, self._progress_lines(name, t0), env)
    seconds = time.perf_counter() - t0
    self.remade.add(name)
    self.eta.finish(name, seconds, ran=True)
    missing_output = entry.done and not os.path.exists(
      os.path.join(workdir, entry.workdir, entry.done)
    )
    spent = timing.read(timing_path)
    record = {"status": "ok", "command": argv[1:], "wall_time_s": seconds, "timing": spent}
    if rc == 0 and not missing_output:
      _write_record(workdir, name, record)
      self.echo(
        f"{head}: done in {fmt_seconds(seconds)}{_compile_note(spent)} | elapsed "
        f"{self.elapsed()} | total ETA {fmt_seconds(self.eta.remaining())}"
      )
      return Outcome(name, "ok", argv, log, wall_time_s=seconds, rc=0, timing=spent)
    err = error_tail(tail)
    if rc == 0:
      err = f"exited 0 but wrote no {entry.workdir}/{entry.done}\n{err}"
    _write_record(workdir, name, {**record, "status": "failed", "rc": rc})
    self.echo(
      f"{head}: FAILED (exit {rc}) after {fmt_seconds(seconds)}: {headline_error(err)}\n"
      f"    see {log}"
    )
    return Outcome(name, "failed", argv, log, wall_time_s=seconds, rc=rc, error=err, timing=spent)

  def _progress_lines(self, name: str, t0: float) -> Callable[[str], None]:
    """What the output lines of run ``name`` (launched at ``t0``) go through: the console shows
    those matching the config's ``progress_pattern``, at most one every ``progress_every_s``."""
    pattern, every_s = re.compile(self.config.progress_pattern), self.config.progress_every_s
    last_echo = [0.0]

    def on_line(line):
      now = time.perf_counter()
      if now - last_echo[0] < every_s or not pattern.search(line):
        return
      last_echo[0] = now
      msg = _ABSL_PREFIX.sub("", line)[:160]
      left = self.eta.remaining(name, now - t0)
      self.echo(f"    {name} | {msg} | total ETA {fmt_seconds(left)}")

    return on_line


def _compile_note(spent: dict | None) -> str:
  """`` (compiling 41 s)``: JAX's tracing, lowering and XLA compiling in a run, or nothing."""
  if not spent:
    return ""
  return f" (compiling {fmt_seconds(compile_seconds(spent))})"


def _compare(config, workdir, outcomes, total, echo, shown_workdir, load_at_start) -> str | None:
  plan = plan_report(
    config, workdir, outcomes, total, shown_workdir, load_at_start, runs_at_a_time(config)
  )
  fileio.write_json(os.path.join(workdir, PLAN_FILE), plan)
  specs = [f"{n}={r['workdir']}" for n, r in plan["runs"].items() if r["status"] == "ok"]
  argv = [
    sys.executable,
    "-m",
    "common.compare",
    f"--workdirs={','.join(specs)}",
    f"--out={workdir}",
    f"--plan={os.path.join(workdir, PLAN_FILE)}",
  ]
  echo(f"compare: {display(argv)}")
  log = os.path.join(workdir, "logs", "compare.log")
  rc, tail = _launch(argv, log, lambda line: None)
  if rc != 0:
    echo(f"compare FAILED (exit {rc}):\n{error_tail(tail)}\n    see {log}")
    return None
  return os.path.join(workdir, "report.md")


def main(argv, flag_values):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    result = run_plan(
      flag_values["config"].value,
      flag_values["workdir"].value,
      dry_run=flag_values["dry_run"].value,
    )
  except PlanError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
  _flags = _define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(lambda argv: main(argv, _flags))
