"""Progress in three places: the console, ``metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import logging as py_logging
import math
import os
import sys
import time

from absl import logging

from common import fileio

_CHATTY_LIBRARIES = ("/orbax/", "/grain/", "/etils/")


class _DropLibraryInfo(py_logging.Filter):
  """Orbax logs a dozen INFO lines per save; keep its warnings, drop the rest from the console."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(
      lib in record.pathname for lib in _CHATTY_LIBRARIES
    )


def quiet_library_logs() -> None:
  """Keeps the training log readable: our progress lines, and only warnings from libraries."""
  logging.get_absl_handler().addFilter(_DropLibraryInfo())
  for handler in py_logging.getLogger().handlers:
    handler.addFilter(_DropLibraryInfo())


def _summary_writer(directory: str):
  """tensorboardX's ``SummaryWriter``, imported on first use (it pulls in protobuf, slow for runs
  that never log) and without PyTorch: tensorboardX imports torch when it is installed, only to
  accept torch tensors, and that import cost 1.6-1.9 s of a launch on 2 cores; the loop logs floats.
  """
  hidden = "torch" not in sys.modules
  if hidden:
    sys.modules["torch"] = None  # makes ``import torch`` raise ImportError, which it catches
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hidden:
      del sys.modules["torch"]
  return SummaryWriter(directory)


def _fmt_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def truncate_jsonl(path: str, step: int, *, key: str = "step") -> int:
  """Rewrites the JSON-lines log ``path`` (atomically) keeping the records with ``key <= step``.

  What a resumed run calls with its restored step, so the log reads as one clean run. A line that
  does not parse (the torn last line a kill mid-write leaves, or any damaged one) is dropped with a
  warning instead of blocking the resume. A missing file is left missing. Returns the records kept.
  """
  if not os.path.exists(path):
    return 0
  keep, torn = [], []
  with open(path, errors="replace") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        torn.append(number)
        continue
      if not isinstance(record, dict) or record.get(key, 0) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
  if torn:
    logging.warning("%s: dropped %d unreadable line(s) (line %s): a write cut off", path,
                    len(torn), ", ".join(map(str, torn)))  # fmt: skip
  fileio.write_text(path, "".join(keep))
  return len(keep)


class MetricLogger:
  """Writes one record per logged step; only process 0 writes files.

  ``metrics.jsonl`` holds one JSON object per logged step with at least ``step`` and ``loss``.
  On resume, records past the restored step are dropped so the file reads as one clean run.
  """

  def __init__(self, workdir: str, *, total_steps: int, batch_size: int, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.enabled = enabled
    self._tb = None
    self._tb_dir = os.path.join(workdir, "tensorboard")
    self._last_time = None
    self._last_step = None

  def truncate_after(self, step: int) -> None:
    """Keeps only the records with ``step <= step`` (called when resuming from a checkpoint)."""
    if self.enabled:
      truncate_jsonl(self.path, step)

  def start(self, step: int) -> None:
    self._last_time, self._last_step = time.perf_counter(), step

  def write(self, step: int, scalars: dict[str, float]) -> dict[str, float]:
    """Logs ``scalars`` at ``step`` with throughput and ETA; returns the full record."""
    now = time.perf_counter()
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    if self._last_time is not None and step > self._last_step:
      dt = now - self._last_time
      steps_per_s = (step - self._last_step) / max(dt, 1e-9)
      record["steps_per_s"] = steps_per_s
      record["images_per_s"] = steps_per_s * self.batch_size
      record["eta_s"] = (self.total_steps - step) / max(steps_per_s, 1e-9)
    self._last_time, self._last_step = now, step
    if not self.enabled:
      return record
    parts = [f"step {step}/{self.total_steps}"]
    for k in ("loss", "grad_norm", "lr"):
      if k in record:
        parts.append(f"{k} {record[k]:.4g}")
    if "steps_per_s" in record:
      parts.append(f"{record['steps_per_s']:.2f} steps/s")
      parts.append(f"{record['images_per_s']:.0f} img/s")
      parts.append(f"ETA {_fmt_seconds(record['eta_s'])}")
    logging.info(" | ".join(parts))
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is None:
      self._tb = _summary_writer(self._tb_dir)
    for k, v in record.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)
    return record

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
