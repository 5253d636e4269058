"""The one shape every method's headline metrics take: ``<workdir>/headline.json``.

``common.compare`` puts runs of different kinds in one report. Generative runs are described by
``common.eval``'s ``eval/metrics.json`` (FID against sampling FLOPs); a method whose result is not a
generative model (hybrid's scheduler, cdc's adaptation) writes its headline here instead, through
:func:`write`, so compare never needs to know a method's own result files::

  {
    "version": 1,
    "method": "hybrid",                     # config.method
    "kind": "scheduler",                    # generative | scheduler | adaptation
    "arm": "drl_convex",                    # the row the method's own metrics describe
    "metrics": {"utility_per_user": -1.58, ...},   # the method's headline figures, scalars only
    "primary": {"name": "utility_per_user", "value": -1.58, "higher_is_better": true},
    "baselines": {"optimum": {"utility_per_user": -1.07, ...}, ...},  # same keys where they apply
    "flops": 7.1e8,                         # per what: flops_what; null when not measured
    "flops_what": "device FLOPs per adaptation",
    "wall_time_s": 12.3,                    # the binary's own measured time
    "note": "toy-scale simulator figures"
  }

:func:`from_eval_metrics` gives a generative run's ``eval/metrics.json`` the same shape, so a report
can list every run's primary figure in one table.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from common import fileio

FILENAME = "headline.json"
VERSION = 1
KINDS = ("generative", "scheduler", "adaptation")


def _scalar(value: Any) -> float | int | str | bool | None:
  """A JSON scalar (numpy scalars converted; NaN and inf become null)."""
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, int):
    return value
  try:
    f = float(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"headline metrics must be scalars, got {type(value).__name__}") from e
  return f if math.isfinite(f) else None


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
  return {str(k): _scalar(v) for k, v in metrics.items()}


def make(
  *,
  method: str,
  kind: str,
  arm: str,
  metrics: dict[str, Any],
  primary: str,
  higher_is_better: bool,
  baselines: dict[str, dict[str, Any]] | None = None,
  flops: float | None = None,
  flops_what: str = "",
  wall_time_s: float | None = None,
  note: str = "",
) -> dict[str, Any]:
  """The headline record (the shape in the module docstring); ValueError on a bad field."""
  if kind not in KINDS:
    raise ValueError(f"headline kind must be one of {KINDS}, got {kind!r}")
  if primary not in metrics:
    raise ValueError(f"headline primary metric {primary!r} is not in metrics {sorted(metrics)}")
  clean = _scalars(metrics)
  return {
    "version": VERSION,
    "method": str(method),
    "kind": kind,
    "arm": str(arm),
    "metrics": clean,
    "primary": {
      "name": primary,
      "value": clean[primary],
      "higher_is_better": bool(higher_is_better),
    },
    "baselines": {str(k): _scalars(v) for k, v in (baselines or {}).items()},
    "flops": _scalar(flops),
    "flops_what": flops_what,
    "wall_time_s": _scalar(wall_time_s),
    "note": note,
  }


def write(workdir: str, **fields: Any) -> str:
  """Writes ``make(**fields)`` to ``<workdir>/headline.json``; returns the path."""
  record = make(**fields)
  # Whole or not at all (common.fileio): a reader (quickstart's resume) never sees half a file.
  return fileio.write_json(os.path.join(workdir, FILENAME), record)


def read(workdir: str) -> dict[str, Any] | None:
  """``<workdir>/headline.json`` or None when the run wrote none; ValueError on a bad file."""
  path = os.path.join(workdir, FILENAME)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  for key in ("method", "kind", "metrics", "primary"):
    if key not in record:
      raise ValueError(f"{path}: not a headline record (no {key!r})")
  if record["kind"] not in KINDS:
    raise ValueError(f"{path}: kind {record['kind']!r} is not one of {KINDS}")
  return record


def from_eval_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
  """A generative run's ``eval/metrics.json`` as a headline record (primary: FID, lower better)."""
  keys = ("fid", "kid_mean", "precision", "recall", "label_accuracy", "flops_per_sample")
  return make(
    method=metrics.get("method", "?"),
    kind="generative",
    arm=metrics.get("method", "?"),
    metrics={k: metrics[k] for k in keys if k in metrics},
    primary="fid",
    higher_is_better=False,
    flops=metrics.get("flops_per_sample"),
    flops_what="FLOPs per sample (whole sampling chain)",
    wall_time_s=(
      metrics["wall_time_per_sample_s"] * metrics["num_samples"]
      if "wall_time_per_sample_s" in metrics and "num_samples" in metrics
      else None
    ),
    note=(
      f"{metrics.get('feature_net', '?')} features, reference {metrics.get('reference_split')}; "
      f"{metrics.get('sampler', '?')}, {metrics.get('sampling_steps', '?')} steps on the "
      f"{metrics.get('timestep_spacing', 'uniform')} grid"
    ),
  )


def primary_of(record: dict, name: str = "") -> dict[str, Any]:
  """``{"name", "value", "higher_is_better"}`` of any record (generative: FID, lower is better).

  ``name``: another figure of the record instead (generative: lower is better for ``fid*`` and
  ``kid*``; headline records: a key of ``metrics``, with the primary's direction).
  """
  if record["kind"] == "generative":
    name = name or "fid"
    lower = name.startswith(("fid", "kid"))
    return {"name": name, "value": record.get(name), "higher_is_better": not lower}
  if name:
    hib = record["primary"]["higher_is_better"]
    return {"name": name, "value": record["metrics"].get(name), "higher_is_better": hib}
  return record["primary"]


def headline_figure(record: dict, meta: dict | None = None) -> dict[str, Any]:
  """The figure a run is judged by: ``primary_of`` the record, with the plan's ``primary`` for
  the run where it names one (collab's ``fid_groups_mean``). The headline table's ``value`` and the
  point ``pareto.png`` plots both come from here.

  Args:
    record: from :func:`load_runs`.
    meta: the plan's ``runs`` (name -> ``primary``, ...); None: the record's own primary.
  """
  return primary_of(record, (meta or {}).get(record["run"], {}).get("primary", ""))


def flops_of(record: dict) -> tuple[float | None, str]:
  if record["kind"] == "generative":
    return record.get("flops_per_sample"), "per sample"
  return record.get("flops"), record.get("flops_what", "")
