"""What a run's training cost: images read and FLOPs, in ``WORKDIR/train_compute.json``.

The shared loop (``loop._train_steps``) measures its train step once per invocation and
rewrites the file at every checkpoint, so it always describes the steps the newest checkpoint
holds::

  {
    "version": 1,
    "segments": [                     # one per invocation of the loop (a resume adds one)
      {"first_step": 0, "last_step": 600, "images_per_step": 64,
       "step_flops": 1.2e11,          # the whole step on every device (null: not measured)
       "step_flops_per_device": 1.2e11, "devices": 1, "flops_from": "lowered"}
    ],
    "steps": 600,                     # the sum over the segments
    "images_seen": 38400,             # steps x images per step
    "flops": 7.2e13,                  # steps x step FLOPs (null when a segment has none)
    "flops_per_image": 1.9e9
  }

``images_per_step`` is ``Method.images_per_step()`` (the global batch; collab: its K clients'
batches, whose cut images also train the server; TDC: every group's batch). ``step_flops`` is
XLA's cost analysis of the lowered step (forward, backward, optimizer and EMA update on every
device: the program before SPMD partitioning and fusion), the arithmetic as written, on one basis
for every method and backend. The compiled program's analysis is not used: on a GPU it leaves
cuDNN's convolutions out, and on the CPU its fusions repeat elementwise work (+2% for the digits
U-Net, +25% for a tiny TFDiff). A step with a loop inside (TFDiff's scan over its blocks, collab's
scan over its server updates under the ``vmap`` client loop) is counted from its
``Method.make_flops_counting_step`` (``flops_from: "unrolled"``): XLA counts a loop's body once,
whatever its trip count (TFDiff Config I's step read 6.6e6 FLOPs an image, under one forward
call's 1.1e7).

:func:`of_workdir` sums every such file under a workdir: a method whose stages train in one tree
(adaptive's stage 1 in ``stage1/`` and stage 2 in the workdir, hybrid's cluster and personal
stages) is counted whole. Training that does not go through the shared loop (adaptive's pruning
proxies) is not counted.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from absl import logging

from common import fileio
from common.metrics import flops as flops_lib

FILENAME = "train_compute.json"
VERSION = 1
# Directories of a run that never hold another training: skipped by of_workdir's walk.
_NOT_RUNS = ("checkpoints", "tensorboard", "samples", "logs")


def _positive(total: float | None) -> float | None:
  """A FLOP count if finite and positive, else None."""
  return total if total is not None and math.isfinite(total) and total > 0 else None


def measure_step(
  step_fn, state, batch, *, devices: int, images_per_step: int, counting_fn=None
) -> dict[str, Any]:
  """The segment record of a jitted train step, measured by XLA on ``(state, batch)``.

  Call it after the step ran once on arguments of the same shapes and shardings: the lowering
  then comes from JAX's in-memory cache. XLA's analysis of it (a second or more for a large step)
  is remembered next to the persistent compile cache (``flops.lowered_flops``), so a resume or a
  campaign's next seed reads it back; a counting step's count is remembered under the step itself
  and the repo's source (``flops.unrolled_flops``), so such a launch does not trace it again.
  A failure to measure is logged and recorded as ``step_flops: null``.

  Args:
    step_fn: the ``jax.jit``-ed ``(TrainState, batch) -> (TrainState, metrics)``.
    state, batch: arguments it was called with (their avals and shardings are read, not values).
    devices: the devices of the mesh the step runs on.
    images_per_step: ``Method.images_per_step()``.
    counting_fn: ``Method.make_flops_counting_step`` jitted, for a step with a loop inside
      (XLA's analysis counts a loop body once): the same step with the loop unrolled, counted
      in its place (``flops_from: "unrolled"``); it is lowered, never compiled.
  """
  record = {
    "images_per_step": int(images_per_step),
    "step_flops": None,
    "step_flops_per_device": None,
    "devices": int(devices),
    "flops_from": None,
  }
  try:
    if counting_fn is None:
      source, whole = "lowered", flops_lib.lowered_flops(step_fn.lower(state, batch))
    else:
      source = "unrolled"
      whole = flops_lib.unrolled_flops(
        step_fn.lower(state, batch), lambda: counting_fn.lower(state, batch)
      )
    whole = _positive(whole)
    if whole is not None:
      record.update(step_flops=whole, step_flops_per_device=whole / devices, flops_from=source)
  except Exception as e:  # noqa: BLE001 -- a missing figure must not stop a training run
    logging.warning("train step FLOPs not measured: %s: %s", type(e).__name__, e)
  return record


def read(workdir: str) -> dict[str, Any] | None:
  """``workdir/train_compute.json`` or None when the run wrote none (or it does not parse)."""
  try:
    with open(os.path.join(workdir, FILENAME)) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return None
  return data if isinstance(data, dict) and "segments" in data else None


def _totals(segments: list[dict]) -> dict[str, Any]:
  """Steps, images seen, FLOPs and FLOPs per image over ``segments``."""
  steps = sum(s["last_step"] - s["first_step"] for s in segments)
  images = sum((s["last_step"] - s["first_step"]) * s["images_per_step"] for s in segments)
  if any(s.get("step_flops") is None for s in segments):
    flops = None
  else:
    flops = float(sum((s["last_step"] - s["first_step"]) * s["step_flops"] for s in segments))
  per_image = flops / images if flops is not None and images else None
  return {"steps": steps, "images_seen": images, "flops": flops, "flops_per_image": per_image}


def record(workdir: str, start: int, done: int, segment: dict[str, Any]) -> str:
  """Rewrites ``workdir/train_compute.json`` for a checkpoint at step ``done``.

  ``segment`` (from :func:`measure_step`) covers ``start -> done``, the steps of this
  invocation; the earlier invocations' segments are kept up to ``start`` (a resume from an
  older checkpoint drops the steps it repeats, as ``metrics.jsonl`` does). Returns the path.
  """
  kept = []
  for s in (read(workdir) or {}).get("segments", []):
    if s["first_step"] < start:
      kept.append({**s, "last_step": min(s["last_step"], start)})
  segments = [*kept, {"first_step": int(start), "last_step": int(done), **segment}]
  data = {"version": VERSION, "segments": segments, **_totals(segments)}
  return fileio.write_json(os.path.join(workdir, FILENAME), data, indent=1)


def of_workdir(workdir: str) -> dict[str, Any] | None:
  """Every training recorded under ``workdir`` (it and its subdirectories), summed.

  Returns ``{"steps", "images_seen", "flops", "flops_per_image", "parts"}`` (``parts``: the
  directories counted, relative to ``workdir``), or None when none recorded any.
  """
  segments, parts = [], []
  for root, dirs, files in os.walk(workdir):
    dirs[:] = sorted(d for d in dirs if d not in _NOT_RUNS and not d.startswith("eval"))
    if FILENAME in files and (data := read(root)) is not None:
      segments += data["segments"]
      parts.append(os.path.relpath(root, workdir))
  if not parts:
    return None
  return {**_totals(segments), "parts": parts}
