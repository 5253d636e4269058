"""Seed replicates of a plan's generative rows: run each at seeds 1 .. n-1 too, then fold them.

A quickstart plan (``configs/quickstart.py``) with ``seeds = n > 1`` gets, for every generative
result row (a ``common.eval`` entry with a report section) and the training entries it needs, a
copy per extra seed ``s``: ``<name>_seed<s>``, in ``<workdir>_seed<s>`` (the first path component
suffixed, so ``adaptive/stage1`` becomes ``adaptive_seed1/stage1``), trained with
``--config.seed=<s>`` and sampled with ``--seed=<s>``. Their report rows carry
``replicate_of`` (the seed-0 row) and ``seed``.

``fold`` turns the headline rows of one seed each into one row per arm: the mean and std of the
primary figure over the seeds and, against a baseline row with replicates of its own, the delta
paired by seed, its std, and how many seeds the arm won. ``better`` says ``yes`` or ``no`` only
when every seed agrees; otherwise ``within seed noise``.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

SUFFIX = "_seed"

# What one seed per run can and cannot say (issue 22).
ONE_SEED_NOTE = (
  "Every figure here is one seed, so this report cannot say which deltas are within seed noise: "
  "a delta smaller than the 3-seed std in the method's RESULTS.md (at other budgets) is not "
  "conclusive. `python -m common.quickstart --config.seeds=3` runs every generative arm at 3 "
  "seeds and says so."
)
SEEDS_NOTE = (
  "A figure with `+-` is the mean +- std over that many seeds (training seed and sampling seed "
  "s); its delta is the mean +- std of the deltas paired by seed, and `better` is yes or no only "
  "when every seed agrees (the wins in brackets), else `within seed noise`. Figures without it "
  "are one seed."
)


def note(rows: list[dict[str, Any]]) -> str:
  """What the headline's figures say about seed noise: folded rows or one seed each."""
  return SEEDS_NOTE if any("value_std" in r for r in rows) else ONE_SEED_NOTE


def _suffixed_workdir(workdir: str, seed: int) -> str:
  head, sep, rest = workdir.partition("/")
  return f"{head}{SUFFIX}{seed}{sep}{rest}"


def _replicable(runs, name: str) -> bool:
  e = runs[name]
  return bool(e.report.section) and e.module == "common.eval" and not e.report.replicate_of


def expand(config):
  """``config`` with every generative row and its trainings replicated over ``config.seeds``.

  Returns ``config`` itself when ``seeds`` is 1; a copy otherwise, the replicates appended to
  ``order`` after the plan's own runs. ValueError when ``seeds`` < 1.
  """
  n = int(config.get("seeds", 1))
  if n < 1:
    raise ValueError(f"quickstart: seeds={n}: must be >= 1")
  if n == 1:
    return config
  c = copy.deepcopy(config)
  rows = [name for name in config.order if _replicable(config.runs, name)]
  order = list(config.order)
  with c.unlocked():  # config_flags locks a --config file's dict
    for s in range(1, n):
      for row in rows:
        for name in [*config.runs[row].needs, row]:
          twin = f"{name}{SUFFIX}{s}"
          if twin in c.runs:
            continue
          e = copy.deepcopy(config.runs[name])
          e.workdir = _suffixed_workdir(e.workdir, s)
          e.needs = tuple(f"{need}{SUFFIX}{s}" for need in e.needs)
          if name == row:
            e.args = (*e.args, f"--seed={s}")
            e.report.replicate_of = row
            e.report.seed = s
            if e.report.baseline:
              e.report.baseline = f"{e.report.baseline}{SUFFIX}{s}"
          else:
            e.overrides = (*e.overrides, f"seed={s}")
          c.runs[twin] = e
          order.append(twin)
    c.order = tuple(order)
  return c


def fold(rows: list[dict[str, Any]], meta: dict[str, dict]) -> list[dict[str, Any]]:
  """Headline rows (``compare._summary_rows``) with each replicate folded into its seed-0 row.

  A folded row gains ``seeds`` (how many had a figure), ``value_std``, and against a replicated
  baseline ``delta_std`` and ``wins`` (seeds where the arm was better); ``value`` and ``delta``
  become means over the seeds. Rows without replicates are returned unchanged.
  """
  by_run = {r["run"]: r for r in rows}
  replicas: dict[str, list[dict]] = {}
  for r in rows:
    of = meta.get(r["run"], {}).get("replicate_of")
    if of:
      replicas.setdefault(of, []).append(r)
  out = []
  for r in rows:
    if meta.get(r["run"], {}).get("replicate_of"):
      continue
    if r["run"] not in replicas:
      out.append(r)
      continue
    group = [r, *replicas[r["run"]]]
    values = [g["value"] for g in group if g.get("value") is not None]
    folded = dict(r)
    folded["seeds"] = len(values)
    if values:
      folded["value"] = statistics.fmean(values)
      folded["value_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    deltas = [g["delta"] for g in group if g.get("delta") is not None]
    if deltas and r.get("versus") in by_run:
      higher = bool(r.get("higher_is_better"))
      wins = sum(1 for d in deltas if (d > 0 if higher else d < 0))
      folded["delta"] = statistics.fmean(deltas)
      folded["delta_std"] = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
      folded["wins"] = f"{wins}/{len(deltas)}"
      folded["better"] = (
        "yes" if wins == len(deltas) else "no" if wins == 0 else "within seed noise"
      )
    out.append(folded)
  return out
