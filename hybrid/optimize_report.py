"""The report of ``hybrid.optimize``: ``results.md``, ``results.png``, ``training.png`` and
``headline.json`` (``common.headline``) from the evaluated grid's cells."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from common import fileio
from hybrid import footprint as footprint_lib


def training_summary(agents) -> dict[str, dict[str, Any]]:
  """Per agent: episodes trained and the utility per user over its last 10% of episodes."""
  train_info = {}
  for name, (_, _, h) in agents.items():
    u = h["utility_per_user"]
    tail = u[-max(1, len(u) // 10) :]
    train_info[name] = {
      "episodes": len(u),
      "final_utility_per_user": float(np.mean(tail)) if tail else None,
    }
  return train_info


def _methods(cells) -> list[str]:
  """Every method of any cell, in first-seen order (enumeration only runs for small N)."""
  seen: dict[str, None] = {}
  for c in cells:
    seen.update(dict.fromkeys(c["summary"]))
  return list(seen)


def fmt(v, spec=".3f"):
  """``v`` in ``spec``, or ``-`` for a missing or NaN value (tables and log lines)."""
  return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def write_markdown(path: str, config, cells, summary_claims, train_info, footprint=None) -> None:
  """``results.md``: training, utility per user by (G, N), DRL-convex and the heuristics against
  the optimum, decision times, storage and memory (``footprint``: ``hybrid.footprint.measure``'s
  result, the section is left out without it), the claims."""
  s = config.scheduler
  methods = _methods(cells)
  lines = [
    "# hybrid.optimize results",
    "",
    f"Profile `{s.profile}`, transmission `{s.system.transmission}`, setting `{s.setting}`, "
    f"{s.agent.episodes} episodes per agent, {s.eval.scenarios} held-out scenarios per cell, "
    f"seed {config.seed}. Toy-scale simulator figures (seconds-equivalent), not the paper's.",
    "",
    "## Training",
    "",
  ]
  for name, info in train_info.items():
    lines.append(
      f"- `{name}`: {info['episodes']} episodes; utility/user over the last 10%: "
      f"{fmt(info['final_utility_per_user'])}"
    )
  lines += ["", "## Utility per user (mean U/N) by (G, N)", ""]
  lines.append("| G | N | " + " | ".join(methods) + " |")
  lines.append("|---|---|" + "---|" * len(methods))
  for c in cells:
    vals = [fmt(c["summary"].get(m, {}).get("utility_per_user"), ".2f") for m in methods]
    lines.append(f"| {c['num_gpus']:g} | {c['num_users']} | " + " | ".join(vals) + " |")
  lines += ["", "## DRL-convex and heuristics against the optimum", ""]
  cols = [m for m in ("drl_convex", "dqn_convex", "ga", "ga_at_drl_time", "greedy") if m in methods]
  lines.append(
    "| G | N | "
    + " | ".join(f"{m} gain share / optimal % / gap" for m in cols)
    + " | admitted opt / drl |"
  )
  lines.append("|---|---|" + "---|" * (len(cols) + 1))
  for c in cells:
    sm = c["summary"]
    vals = [
      f"{fmt(sm[m]['gain_share'])} / {100 * sm[m]['optimal_fraction']:.0f} / "
      f"{fmt(sm[m]['gap_per_user'])}"
      for m in cols
    ]
    adm = (
      f"{sm['optimum']['admitted']:.1f} / {fmt(sm.get('drl_convex', {}).get('admitted'), '.1f')}"
    )
    lines.append(f"| {c['num_gpus']:g} | {c['num_users']} | " + " | ".join(vals) + f" | {adm} |")
  lines += ["", "## Decision time (ms per scenario, mean over the grid)", ""]
  lines.append("| method | ms |")
  lines.append("|---|---|")
  for m in methods:
    ms = np.mean([c["summary"][m]["decision_ms"] for c in cells if m in c["summary"]])
    lines.append(f"| {m} | {ms:.3f} |")
  if footprint is not None:
    lines += ["", "## Storage and memory, hybrid vs a full personalized model per user", ""]
    lines += footprint_lib.markdown(footprint)
  lines += ["", "## Relative claims (spec §11 E)", "", "```", json.dumps(summary_claims, indent=2)]
  lines += ["```", ""]
  fileio.write_text(path, "\n".join(lines))


def plot(path: str, cells, config) -> None:
  """``results.png``: utility per user against N for each G, and decision time against N."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  gpus = sorted({c["num_gpus"] for c in cells})
  methods = [
    m
    for m in (
      "optimum",
      "drl_convex",
      "dqn_convex",
      "ga",
      "greedy",
      "admit_all_opt",
      "admit_all_n80",
      "admit_all_n200",
      "all_local",
    )
    if m in _methods(cells)
  ]
  fig, axes = plt.subplots(1, len(gpus) + 1, figsize=(4.2 * (len(gpus) + 1), 3.8))
  for ax, g in zip(axes[:-1], gpus, strict=True):
    sub = sorted((c for c in cells if c["num_gpus"] == g), key=lambda c: c["num_users"])
    ns = [c["num_users"] for c in sub]
    for m in methods:
      u = [c["summary"].get(m, {}).get("utility_per_user", np.nan) for c in sub]
      ax.plot(ns, u, marker="o", label=m)
    ax.set_title(f"G = {g:g}")
    ax.set_xlabel("users N")
    ax.set_ylabel("utility per user")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  ax = axes[-1]
  timed = [
    m
    for m in (
      "optimum",
      "optimum_enumeration",
      "optimum_ortools",
      "drl_convex",
      "ga",
      "ga_at_drl_time",
      "greedy",
    )
    if m in _methods(cells)
  ]
  for m in timed:
    per_n: dict[int, list[float]] = {}
    for c in cells:
      if m in c["summary"]:
        per_n.setdefault(c["num_users"], []).append(c["summary"][m]["decision_ms"])
    ns = sorted(per_n)
    ax.plot(ns, [np.mean(per_n[n]) for n in ns], marker="o", label=m)
  ax.set_yscale("log")
  ax.set_xlabel("users N")
  ax.set_ylabel("decision time (ms)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.suptitle(f"hybrid scheduler, transmission={config.scheduler.system.transmission}")
  fig.tight_layout()
  fileio.write_figure(fig, path, dpi=110)


def plot_training(path: str, agents) -> None:
  """``training.png``: each agent's utility per user over its episodes (moving mean)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 3.5))
  for name, (_, _, history) in agents.items():
    u = np.asarray(history["utility_per_user"])
    if len(u) == 0:
      continue
    w = max(1, len(u) // 50)
    ax.plot(np.convolve(u, np.ones(w) / w, mode="valid"), label=name, lw=0.8)
  ax.set_xlabel("episode")
  ax.set_ylabel("utility per user (moving mean)")
  ax.grid(alpha=0.3)
  if len(agents) <= 8:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fileio.write_figure(fig, path, dpi=110)


HEADLINE_BASELINES = ("optimum", "ga", "greedy", "admit_all_opt", "random", "all_local")
HEADLINE_KEYS = (
  "utility_per_user",
  "gain_share",
  "gap_per_user",
  "optimal_fraction",
  "decision_ms",
)


def write_headline(workdir: str, config, cells, wall_time_s: float) -> str:
  """``workdir/headline.json`` (``common.headline``): grid means of DRL-convex and the baselines."""
  from common import headline

  def mean_of(m, k):
    vals = [c["summary"][m][k] for c in cells if m in c["summary"]]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None

  u_opt, u_local = mean_of("optimum", "utility_per_user"), mean_of("all_local", "utility_per_user")

  def grid_mean(m):
    out = {k: mean_of(m, k) for k in HEADLINE_KEYS}
    # The gain share of the grid's mean utilities: a per-cell share explodes in cells where the
    # optimum barely beats all-local (a measured profile of briefly trained models has such cells).
    u = out["utility_per_user"]
    out["gain_share"] = (u - u_local) / (u_opt - u_local) if u_opt - u_local > 1e-9 else None
    return out

  methods = _methods(cells)
  arm = "drl_convex" if "drl_convex" in methods else "optimum"
  return headline.write(
    workdir,
    method="hybrid",
    kind="scheduler",
    arm=arm,
    metrics=grid_mean(arm),
    # Utility per user rather than the gain share as the one figure: the share's denominator
    # U_opt - U_local can be ~0 (a profile under which offloading barely pays).
    primary="utility_per_user",
    higher_is_better=True,
    baselines={m: grid_mean(m) for m in HEADLINE_BASELINES if m in methods and m != arm},
    wall_time_s=wall_time_s,
    note=f"profile {config.scheduler.profile}; means over {len(cells)} (G, N) cells of "
    f"{config.scheduler.eval.scenarios} held-out scenarios; gain share = (U - U_local) / "
    "(U_opt - U_local) on the grid's mean utility per user",
  )
