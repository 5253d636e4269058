"""Tests for adaptive.search: the multi-round proxy search, its memory bank and the baselines.

Everything here is analytic (FLOPs from ``search_space.analytic_flops``, a synthetic score), so
nothing is compiled.
"""

import json

import pytest

from adaptive import search, search_space

_MC = dict(
  channels=(16, 32), num_res_blocks=2, attention_resolutions=(4,), num_heads=4,
  norm_group_size=4, resblock_updown=True,
)  # fmt: skip
_BASE = search_space.base_structure(_MC)
_FLOPS = search_space.make_flops_fn(_MC, 8, 1, 2)


def _synthetic_score(s):
  # A smooth proxy loss: narrowing level 0 hurts most, attention costs a little.
  return (
    3.0 * (1 - s.widths[0]) ** 2
    + 1.0 * (1 - s.widths[1]) ** 2
    + 0.2 * sum(2 - b for b in s.blocks)
    + 0.1 * sum(not a for a in s.attention)
  )


class _Counter:
  def __init__(self):
    self.calls = []

  def __call__(self, s):
    self.calls.append(s)
    return _synthetic_score(s)


def test_search_reaches_window_deterministically():
  target = 0.5 * _FLOPS(_BASE)
  a = search.proxy_search(_BASE, target, _FLOPS, _synthetic_score, seed=3)
  b = search.proxy_search(_BASE, target, _FLOPS, _synthetic_score, seed=3)
  assert a.converged and abs(a.flops / target - 1) <= 0.02
  assert a.to_dict() == b.to_dict()
  assert a.pruner == "proxy_search(det)" and a.rounds == len(a.log)
  json.dumps(a.to_dict())  # the per-round log feeds the summary JSON


def test_memory_bank_skips_scored_structures():
  counter = _Counter()
  res = search.proxy_search(_BASE, 0.5 * _FLOPS(_BASE), _FLOPS, counter)
  assert res.evaluations == len(counter.calls) == len(set(counter.calls))
  bank = search.MemoryBank()
  bank.add(_BASE, 1.0, 0.5, 1)
  assert _BASE in bank and bank.score(_BASE) == 0.5 and bank.edit_estimate(("width", 0)) == 0.0


def test_no_memory_uses_more_evaluations():
  target = 0.5 * _FLOPS(_BASE)
  with_mem = search.proxy_search(_BASE, target, _FLOPS, _synthetic_score, seed=0)
  counter = _Counter()
  without = search.proxy_search(_BASE, target, _FLOPS, counter, seed=0, use_memory=False)
  assert without.evaluations == len(counter.calls) > with_mem.evaluations
  assert len(set(counter.calls)) < len(counter.calls)  # re-scored, no cache


def test_eval_cap_orders_by_bank_estimate():
  res = search.proxy_search(
    _BASE, 0.5 * _FLOPS(_BASE), _FLOPS, _synthetic_score, max_evals_per_round=2
  )
  full = search.proxy_search(_BASE, 0.5 * _FLOPS(_BASE), _FLOPS, _synthetic_score)
  assert all(
    r["evaluations"] - p["evaluations"] <= 2 for p, r in zip(res.log, res.log[1:], strict=False)
  )
  assert res.evaluations < full.evaluations


def test_target_errors():
  low = _FLOPS(search_space.smallest_structure(_BASE))
  with pytest.raises(ValueError, match=r"below the smallest structure.*FLOPs") as e:
    search.proxy_search(_BASE, 0.5 * low, _FLOPS, _synthetic_score)
  assert f"{0.5 * low:.4g}" in str(e.value) and f"{low:.4g}" in str(e.value)
  with pytest.raises(ValueError, match="above the base"):
    search.proxy_search(_BASE, 2 * _FLOPS(_BASE), _FLOPS, _synthetic_score)
  with pytest.raises(ValueError, match="tol must be > 0"):
    search.proxy_search(_BASE, 0.5 * _FLOPS(_BASE), _FLOPS, _synthetic_score, tol=0.0)


def test_pruner_registry_and_baselines():
  target = 0.6 * _FLOPS(_BASE)
  assert set(search.PRUNERS) == {"proxy_search(det)", "uniform", "random"}
  with pytest.raises(ValueError, match="unknown pruner"):
    search.get_pruner("llm")
  uni = search.get_pruner("uniform").prune(_BASE, target, _FLOPS, _synthetic_score)
  assert len(set(uni.structure.widths)) == 1 and uni.structure.blocks == _BASE.blocks
  rnd = search.get_pruner("random", num=4).prune(_BASE, target, _FLOPS, _synthetic_score, seed=1)
  assert rnd.evaluations <= 4 and abs(rnd.flops / target - 1) <= 0.02
  assert rnd.score == min(e["score"] for e in rnd.log)
  det = search.get_pruner("proxy_search(det)").prune(_BASE, target, _FLOPS, _synthetic_score)
  assert det.converged and det.score <= rnd.score
