"""The clock, log and summary of ``benchmarks/gpu_check.py``: subprocesses under one budget.

Every run is a subprocess in its own process group, its output in a file that goes into the log
(``gpu_check.log``) when it ends, under a timeout cut to what is left of the check's overall budget;
``Background`` runs queued commands (part 4's compiles) while a foreground run goes on. ``Check``
holds the summary (``gpu_check.json``), rewritten by ``save`` after each part.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = "gpu_check.json"
LOG = "gpu_check.log"


def _stamp() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")


class Check:
  """The log, the summary and the clock of one check."""

  def __init__(self, out: str, mode: str, budget_s: float):
    self.out, self.mode = out, mode
    self.t0 = time.monotonic()
    self.deadline = self.t0 + budget_s
    self.work = tempfile.mkdtemp(prefix="gpu_check_")
    self.log_path = os.path.join(out, LOG)
    self.summary = {
      "version": 1,
      "mode": mode,
      "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "budget_s": budget_s,
      "headline": {},
      "parts": {},
    }
    self.env = self._child_env()

  def _child_env(self) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # One-device benchmarks: a forced host device count (the tests set 8) would split the batch.
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = " ".join(flags.split())
    # The persistent cache carries the background compiles of part 3 to the timed runs of part 4
    # (every program, however quick to compile).
    env.setdefault(
      "JAX_COMPILATION_CACHE_DIR",
      os.path.join(tempfile.gettempdir(), f"gpu_check_jax_cache_{self.mode}"),
    )
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if self.mode == "cpu":
      env["JAX_PLATFORMS"] = "cpu"
    else:
      # Several processes share the card (PyTorch beside JAX in part 5, compiles beside a run in
      # part 3): each takes the memory it uses, not 75% of the card up front.
      env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
      # The binaries' XLA:CPU defaults (common/train/xla_flags.py) tune the CPU backend only; on
      # the device's newer jaxlib an unknown flag would abort XLA, so the GPU check runs without.
      env.setdefault("SEGDIFF_XLA_DEFAULTS", "0")
    return env

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def say(self, msg: str) -> None:
    line = f"[{_stamp()} +{time.monotonic() - self.t0:6.1f}s] {msg}"
    print(line, flush=True)
    with open(self.log_path, "a") as f:
      f.write(line + "\n")

  def append_log(self, title: str, cmd: list[str], out_path: str) -> None:
    with open(self.log_path, "a") as f:
      f.write(f"\n----- {title}: {shlex.join(cmd)}\n")
      if os.path.exists(out_path):
        with open(out_path, errors="replace") as g:
          shutil.copyfileobj(g, f)
      f.write(f"----- end of {title}\n\n")

  def save(self) -> None:
    self.summary["wall_s"] = round(time.monotonic() - self.t0, 1)
    path = os.path.join(self.out, SUMMARY)
    with open(path + ".tmp", "w") as f:
      json.dump(self.summary, f, indent=1, default=json_default, allow_nan=True)
    os.replace(path + ".tmp", path)


def json_default(v):
  return str(v)


_LIVE: list = []  # every Proc still running, ended by end_all on the way out


def end_all(*_):
  """Ends the runs still going (their own process groups: setsid children outlive the check)."""
  for p in list(_LIVE):
    p.kill()
  if _:  # called as a signal handler: leave through main's finally, which saves the summary
    raise SystemExit(143)


class Proc:
  """One subprocess, its output in a file, its own process group (killed whole on timeout)."""

  def __init__(
    self, check: Check, name: str, cmd: list[str], timeout: float, env: dict | None = None
  ):
    self.check, self.name, self.cmd = check, name, cmd
    self.out_path = os.path.join(check.work, re.sub(r"\W", "_", name) + ".out")
    self.f = open(self.out_path, "w")
    self.t0 = time.monotonic()
    self.timeout = timeout
    self.proc = subprocess.Popen(
      cmd,
      cwd=ROOT,
      env={**check.env, **(env or {})},
      stdout=self.f,
      stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL,
      start_new_session=True,
    )
    self.rc: int | None = None
    self.timed_out = False
    _LIVE.append(self)

  def poll(self) -> bool:
    """True once the process has ended (killed when past its timeout)."""
    if self.rc is not None:
      return True
    rc = self.proc.poll()
    if rc is None and time.monotonic() - self.t0 > self.timeout:
      self.timed_out = True
      self.kill()
      rc = self.proc.returncode
    if rc is None:
      return False
    self.rc = rc
    if self in _LIVE:
      _LIVE.remove(self)
    self.wall_s = time.monotonic() - self.t0
    self.f.close()
    self.check.append_log(self.name, self.cmd, self.out_path)
    return True

  def kill(self) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
      try:
        os.killpg(self.proc.pid, sig)  # this run's own process group (start_new_session)
      except ProcessLookupError:
        break
      try:
        self.proc.wait(timeout=wait)
        break
      except subprocess.TimeoutExpired:
        continue

  def output(self) -> str:
    with open(self.out_path, errors="replace") as f:
      return f.read()

  def status(self) -> dict:
    s = {"status": "ok" if self.rc == 0 else ("timeout" if self.timed_out else "failed")}
    s["wall_s"] = round(self.wall_s, 1)
    if s["status"] != "ok":
      tail = [ln for ln in self.output().strip().splitlines() if ln.strip()][-6:]
      s["error"] = " | ".join(tail)[-1500:] or f"exit code {self.rc}"
      s["rc"] = self.rc
    return s


class Background:
  """Runs queued commands ``jobs`` at a time while the foreground runs (``pump``)."""

  def __init__(self, check: Check, jobs: int):
    self.check, self.jobs = check, max(1, jobs)
    self.pending: list[tuple[str, list[str], float]] = []
    self.running: list[Proc] = []
    self.done: dict[str, Proc] = {}

  def add(self, name: str, cmd: list[str], timeout: float) -> None:
    self.pending.append((name, cmd, timeout))

  def pump(self) -> None:
    for p in list(self.running):
      if p.poll():
        self.running.remove(p)
        self.done[p.name] = p
        self.check.say(f"  background {p.name}: {p.status()['status']} in {p.wall_s:.0f}s")
    while self.pending and len(self.running) < self.jobs:
      name, cmd, timeout = self.pending.pop(0)
      left = self.check.left() - 30
      if left < 10:
        self.check.say(f"  background {name}: skipped, no time left")
        continue
      self.running.append(Proc(self.check, name, cmd, min(timeout, left)))
      self.check.say(f"  background {name}: started")

  def active(self) -> int:
    return len(self.running) + len(self.pending)

  def wait(self) -> None:
    while self.running or self.pending:
      self.pump()
      time.sleep(0.5)


def run(
  check: Check, name: str, cmd: list[str], budget: float, *, bg: Background | None = None, env=None
):
  """Runs ``cmd`` in the foreground under ``min(budget, time left)``; None when no time is left."""
  timeout = min(budget, check.left())
  if timeout < 15:
    check.say(f"{name}: skipped, {check.left():.0f}s of the budget left")
    return None
  check.say(f"{name}: start (timeout {timeout:.0f}s)")
  p = Proc(check, name, cmd, timeout, env)
  while not p.poll():
    if bg is not None:
      bg.pump()
    time.sleep(0.2)
  st = p.status()
  check.say(
    f"{name}: {st['status']} in {p.wall_s:.1f}s"
    + (f": {st['error'][-300:]}" if "error" in st else "")
  )
  return p


def skipped(reason: str) -> dict:
  return {"status": "skipped", "reason": reason}


def finite(v) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v)


def last_json(text: str) -> dict | None:
  for line in reversed(text.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        return None
  return None
