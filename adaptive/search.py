"""Pruning to a FLOPs budget: the multi-round proxy search (spec 4.3 items 5-6) and baselines.

The paper queried GPT-4 once per round with a memory bank of earlier rounds; here each round is a
deterministic beam step over single edits, labelled ``proxy_search(det)``, never "GPT-4". The
proxy score (short fine-tune + fixed held-out loss) belongs to the method and comes in as
``score_fn(structure) -> float`` (lower is better). Pruners sit behind :class:`Pruner` so an LLM
proposer could be registered later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from adaptive.search_space import (
  Structure,
  random_structures,
  search_space_edits,
  smallest_structure,
  uniform_width_structure,
)

ScoreFn = Callable[[Structure], float]
FlopsFn = Callable[[Structure], float]


@dataclasses.dataclass
class MemoryBank:
  """structure -> (flops, score, round) of every proxy evaluation, plus edit statistics.

  ``rejected`` holds structures scored and left out of the beam (tabu from then on);
  ``edit_costs`` the observed score increase per FLOP saved of each edit kind.
  """

  entries: dict[Structure, tuple[float, float, int]] = dataclasses.field(default_factory=dict)
  rejected: set[Structure] = dataclasses.field(default_factory=set)
  edit_costs: dict[tuple[str, int], list[float]] = dataclasses.field(default_factory=dict)

  def __contains__(self, s: Structure) -> bool:
    return s in self.entries

  def score(self, s: Structure) -> float:
    return self.entries[s][1]

  def add(self, s: Structure, flops: float, score: float, round_: int) -> None:
    self.entries[s] = (float(flops), float(score), int(round_))

  def record_edit(self, edit, parent: Structure, child: Structure) -> None:
    if parent in self.entries and child in self.entries:
      pf, ps, _ = self.entries[parent]
      cf, cs, _ = self.entries[child]
      if pf > cf:
        self.edit_costs.setdefault(edit, []).append((cs - ps) / (pf - cf))

  def edit_estimate(self, edit) -> float:
    """Mean observed score increase per FLOP saved; unseen edits get the mean of all (0 if none),
    so they are neither favoured nor starved."""
    seen = self.edit_costs.get(edit)
    if seen:
      return float(np.mean(seen))
    every = [c for v in self.edit_costs.values() for c in v]
    return float(np.mean(every)) if every else 0.0


@dataclasses.dataclass
class SearchResult:
  """Outcome of a pruner. ``log`` is JSON-serialisable (one dict per round)."""

  pruner: str
  structure: Structure
  flops: float
  score: float
  target_flops: float
  evaluations: int
  rounds: int
  converged: bool
  log: list[dict[str, Any]]

  def to_dict(self) -> dict[str, Any]:
    return {
      "pruner": self.pruner,
      "structure": self.structure.to_dict(),
      "flops": self.flops,
      "score": self.score,
      "target_flops": self.target_flops,
      "evaluations": self.evaluations,
      "rounds": self.rounds,
      "converged": self.converged,
      "log": self.log,
    }


def _check_target(base: Structure, target: float, flops_fn: FlopsFn, tol: float) -> None:
  if not tol > 0:
    raise ValueError(f"pruning: tol must be > 0, got {tol}")
  full, low = flops_fn(base), flops_fn(smallest_structure(base))
  if target > full * (1 + tol):
    raise ValueError(f"pruning: target {target:.4g} FLOPs is above the base network's {full:.4g}")
  if target * (1 + tol) < low:
    raise ValueError(
      f"pruning: target {target:.4g} FLOPs is below the smallest structure in the search space "
      f"({low:.4g} FLOPs)"
    )


class _Evaluations:
  """The proxy calls of one search, counted; with memory a structure the bank holds is free."""

  def __init__(self, score_fn: ScoreFn, flops_fn: FlopsFn, use_memory: bool):
    self.score_fn, self.flops_fn, self.use_memory = score_fn, flops_fn, use_memory
    self.bank = MemoryBank()
    # The last score seen per structure, for the final pick.
    self.scored_all: dict[Structure, float] = {}
    self.count = 0

  def __call__(self, s: Structure, round_: int) -> float:
    if self.use_memory and s in self.bank:
      return self.bank.score(s)
    self.count += 1
    v = float(self.score_fn(s))
    self.bank.add(s, self.flops_fn(s), v, round_)
    self.scored_all[s] = v
    return v


def _proposals(base: Structure, beam: list[Structure], flops_fn: FlopsFn, lo: float,
               bank: MemoryBank | None, max_evals_per_round: int | None,
               rng: np.random.Generator) -> list[tuple[Any, Structure, Structure]]:  # fmt: skip
  """One round's ``(edit, parent, child)`` moves from the beam, none below ``lo`` FLOPs.

  With a memory ``bank``: each child once, tabu ones left out, ordered by the bank's estimate,
  fresh evaluations capped; without: random draws (with repeats) of the single edits.
  """
  moves = [(e, p, c) for p in beam for e, c in search_space_edits(base, p) if flops_fn(c) >= lo]
  if bank is None:
    return [moves[i] for i in rng.integers(0, len(moves), len(moves))] if moves else []
  moves = [m for m in moves if m[2] not in bank.rejected]
  seen, uniq = set(), []
  for m in moves:
    if m[2] not in seen:
      seen.add(m[2])
      uniq.append(m)
  # Cheapest expected damage per FLOP first: the bank's bias toward levels that cut well.
  uniq.sort(key=lambda m: (bank.edit_estimate(m[0]), flops_fn(m[2]), m[2]))
  fresh = [m for m in uniq if m[2] not in bank]
  if max_evals_per_round is not None:
    keep = {m[2] for m in fresh[:max_evals_per_round]}
    uniq = [m for m in uniq if m[2] in bank or m[2] in keep]
  return uniq


def _best_scored(
  base: Structure,
  target_flops: float,
  flops_fn: FlopsFn,
  scored_all: dict[Structure, float],
  inside,
) -> tuple[Structure, float]:
  """A search that did not converge: the best scored structure inside the window, else the
  scored one closest to the target (the base, unscored, when nothing was scored)."""
  pool = {s: v for s, v in scored_all.items() if inside(s)}
  if pool:
    best = min(pool, key=lambda s: (pool[s], flops_fn(s), s))
    return best, pool[best]
  best = min(scored_all or {base: float("nan")}, key=lambda s: abs(flops_fn(s) - target_flops))
  return best, scored_all.get(best, float("nan"))


def proxy_search(
  base: Structure,
  target_flops: float,
  flops_fn: FlopsFn,
  score_fn: ScoreFn,
  *,
  tol: float = 0.02,
  beam_width: int = 2,
  max_rounds: int = 30,
  use_memory: bool = True,
  max_evals_per_round: int | None = None,
  seed: int = 0,
) -> SearchResult:
  """Multi-round beam search from the full structure down to ``target_flops`` (spec 4.3 item 5).

  Each round takes every single-edit neighbour of the beam (width one notch down, last block of
  a level dropped, one attention off) plus the beam members already inside the window, drops
  those below ``target * (1 - tol)``, scores the rest and keeps the best ``beam_width``
  (ties: lower FLOPs, then the structure's order). It stops when the best one is inside the
  window ``|flops / target - 1| <= tol``, when nothing is left to propose, or after
  ``max_rounds``; the result is then the best in-window structure scored.

  With ``use_memory`` (item 6) the bank caches scores (a cached structure costs no evaluation),
  makes rejected structures tabu and orders the unscored candidates by the bank's estimate of
  score increase per FLOP saved of their edit; ``max_evals_per_round`` then caps fresh
  evaluations to the most promising. Without memory each round draws random single edits of the
  beam (seeded, as many draws as there are neighbours) and scores every draw afresh.

  Args:
    base: the full structure (``search_space.base_structure``).
    target_flops: the budget, in ``flops_fn``'s unit.
    flops_fn: ``structure -> FLOPs`` (e.g. ``search_space.make_flops_fn``).
    score_fn: ``structure -> proxy score``; lower is better.

  Returns:
    SearchResult with ``pruner="proxy_search(det)"``.
  """
  _check_target(base, target_flops, flops_fn, tol)
  if beam_width < 1 or max_rounds < 1:
    raise ValueError(
      f"proxy_search: beam_width and max_rounds must be >= 1, got {beam_width}, {max_rounds}"
    )
  lo = target_flops * (1 - tol)

  def inside(s):
    return abs(flops_fn(s) / target_flops - 1.0) <= tol

  rng = np.random.default_rng(seed)
  evaluate = _Evaluations(score_fn, flops_fn, use_memory)
  bank = evaluate.bank
  beam = [base]
  log: list[dict[str, Any]] = []
  converged = False
  rounds = 0
  for r in range(1, max_rounds + 1):
    rounds = r
    proposals = _proposals(
      base, beam, flops_fn, lo, bank if use_memory else None, max_evals_per_round, rng
    )
    carried = [s for s in beam if inside(s)]
    if not proposals and not carried:
      log.append({"round": r, "proposals": 0, "evaluations": evaluate.count, "beam": []})
      break
    scores: dict[Structure, float] = {}
    for e, p, c in proposals:
      v = evaluate(c, r)
      scores[c] = v if c not in scores else min(scores[c], v)
      if use_memory:
        bank.record_edit(e, p, c)
    for s in carried:
      scores[s] = evaluate(s, r)
    ranked = sorted(scores, key=lambda s: (scores[s], flops_fn(s), s))
    beam = ranked[:beam_width]
    if use_memory:
      bank.rejected.update(s for s in ranked[beam_width:] if s not in carried)
    beam_log = [
      {"structure": s.to_dict(), "flops": flops_fn(s), "score": scores[s], "inside": inside(s)}
      for s in beam
    ]
    log.append(
      {"round": r, "proposals": len(proposals), "evaluations": evaluate.count, "beam": beam_log}
    )
    if inside(beam[0]):
      converged = True
      break

  if converged:
    best = beam[0]
    best_score = scores[best]
  else:
    best, best_score = _best_scored(base, target_flops, flops_fn, evaluate.scored_all, inside)
  return SearchResult(
    "proxy_search(det)", best, flops_fn(best), best_score, float(target_flops), evaluate.count,
    rounds, converged, log,
  )  # fmt: skip


class Pruner(Protocol):
  """Chooses a structure for a FLOPs budget. ``name`` labels runs (``pruner=<name>``)."""

  name: str

  def prune(
    self, base: Structure, target_flops: float, flops_fn: FlopsFn, score_fn: ScoreFn, *, seed: int
  ) -> SearchResult: ...


@dataclasses.dataclass
class ProxySearchPruner:
  """The deterministic multi-round search (our substitute for the paper's GPT-4 proxy)."""

  tol: float = 0.02
  beam_width: int = 2
  max_rounds: int = 30
  use_memory: bool = True
  max_evals_per_round: int | None = None
  name: str = "proxy_search(det)"

  def prune(self, base, target_flops, flops_fn, score_fn, *, seed=0) -> SearchResult:
    return proxy_search(
      base, target_flops, flops_fn, score_fn, tol=self.tol, beam_width=self.beam_width,
      max_rounds=self.max_rounds, use_memory=self.use_memory,
      max_evals_per_round=self.max_evals_per_round, seed=seed,
    )  # fmt: skip


@dataclasses.dataclass
class UniformPruner:
  """Baseline: one width multiplier for every level, nothing removed; scored once."""

  name: str = "uniform"

  def prune(self, base, target_flops, flops_fn, score_fn, *, seed=0) -> SearchResult:
    del seed
    s = uniform_width_structure(base, target_flops, flops_fn)
    v = float(score_fn(s))
    return SearchResult(self.name, s, flops_fn(s), v, float(target_flops), 1, 1, True, [])


@dataclasses.dataclass
class RandomPruner:
  """Baseline: best of ``num`` random structures inside the FLOPs window."""

  num: int = 8
  tol: float = 0.02
  name: str = "random"

  def prune(self, base, target_flops, flops_fn, score_fn, *, seed=0) -> SearchResult:
    _check_target(base, target_flops, flops_fn, self.tol)
    cands = random_structures(base, target_flops, flops_fn, self.num, tol=self.tol, seed=seed)
    if not cands:
      raise ValueError(
        f"random pruner: no structure within {self.tol:.0%} of {target_flops:.4g} FLOPs found"
      )
    scores = {s: float(score_fn(s)) for s in cands}
    best = min(cands, key=lambda s: (scores[s], flops_fn(s), s))
    log = [{"structure": s.to_dict(), "flops": flops_fn(s), "score": scores[s]} for s in cands]
    return SearchResult(
      self.name, best, flops_fn(best), scores[best], float(target_flops), len(cands), 1, True, log
    )


PRUNERS: dict[str, Callable[..., Pruner]] = {
  "proxy_search(det)": ProxySearchPruner,
  "uniform": UniformPruner,
  "random": RandomPruner,
}


def get_pruner(name: str, **kwargs) -> Pruner:
  """Pruner registered under ``name`` (``proxy_search(det)``, ``uniform``, ``random``)."""
  if name not in PRUNERS:
    raise ValueError(f"get_pruner: unknown pruner {name!r}; registered: {sorted(PRUNERS)}")
  return PRUNERS[name](**kwargs)
