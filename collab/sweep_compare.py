"""Settings compared at one cut: finished ``collab.sweep`` directories, paired by seed and client.

  python -m collab.sweep_compare --base=runs/collab_ratio20 \
      --arms=runs/collab_full20_nooffset,runs/collab_ratio20_dynamic --cut_point=20 [--out=DIR]

Each directory is a sweep run with one setting (``collab.server_noising``,
``diffusion.x0_clipping``, ...) over the same seeds and data; the sweep itself varies only the cut.
For every metric the row gives the mean over the clients, then mean +- std over the seeds (as
``sweep.md``), and against ``--base`` the delta paired by seed (mean +- std) and the wins: of the
seeds (client means) and of the client-seed pairs. Lower is better for FID and KID, and for the
disclosure rows lower means the server's images are closer to the client's data, i.e. more
disclosed. Reads each run's ``seed<s>/cut<c>/sweep_eval.json``; writes ``compare.md`` and
``compare.json`` into ``--out`` when given.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Any

import numpy as np

from collab import sweep_report
from common import fileio
from common.metrics import stats

# (label, path into a client's entry, lower_is_better)
METRICS = (
  ("FID", ("collafuse", "fid"), True),
  ("KID", ("collafuse", "kid_mean"), True),
  ("label accuracy", ("collafuse", "label_accuracy"), False),
  ("hand-off FID (disclosure)", ("disclosure", "handoff", "fid"), None),
  ("server-alone FID (disclosure)", ("disclosure", "server_alone", "fid"), None),
  ("cut images FID (disclosure)", ("disclosure", "cut_images", "fid"), None),
)


def load_grid(sweep_dir: str, cut_point: int) -> dict[int, list[dict[str, Any]]]:
  """{seed: the clients' entries, ordered by client} of one sweep directory at one cut.

  Raises:
    FileNotFoundError: no finished evaluation of that cut in the directory.
  """
  grid = {}
  for path in sorted(
    glob.glob(os.path.join(sweep_dir, "seed*", f"cut{cut_point}", "sweep_eval.json"))
  ):
    with open(path) as f:
      record = json.load(f)
    grid[int(record["seed"])] = sorted(record["clients"], key=lambda c: c["client"])
  if not grid:
    raise FileNotFoundError(f"{sweep_dir}: no seed*/cut{cut_point}/sweep_eval.json")
  return grid


def _values(grid, seeds, path) -> np.ndarray:
  """[seeds, clients] of one metric, NaN where missing."""
  num_clients = max(len(grid[s]) for s in seeds)
  return sweep_report.client_values([grid[s] for s in seeds], num_clients, path)


def compare(base_dir: str, arm_dirs: list[str], cut_point: int) -> dict[str, Any]:
  """Every arm against the base on the seeds they share: per metric, the arm's and the base's
  mean +- std over seeds, the paired delta and the wins (seeds, client-seed pairs).

  Raises:
    FileNotFoundError: a directory without that cut; ValueError: an arm sharing no seed with the
    base.
  """
  base = load_grid(base_dir, cut_point)
  rows = []
  for arm_dir in arm_dirs:
    arm = load_grid(arm_dir, cut_point)
    seeds = sorted(set(base) & set(arm))
    if not seeds:
      raise ValueError(f"{arm_dir} shares no seed with {base_dir}: {sorted(arm)} vs {sorted(base)}")
    metrics = {}
    for label, path, lower_better in METRICS:
      a, b = _values(arm, seeds, path), _values(base, seeds, path)
      if not (np.isfinite(a).all(axis=1).any() and np.isfinite(b).all(axis=1).any()):
        continue  # not recorded by these runs
      a_seed, b_seed = np.nanmean(a, axis=1), np.nanmean(b, axis=1)
      entry = {
        "arm": stats.mean_std(a_seed),
        "base": stats.mean_std(b_seed),
        "delta": stats.mean_std(a_seed - b_seed),
        "lower_is_better": lower_better,
      }
      if lower_better is not None:
        sign = -1.0 if lower_better else 1.0
        pairs = sign * (a - b)
        entry["seed_wins"] = int(np.sum(sign * (a_seed - b_seed) > 0))
        entry["client_wins"] = int(np.sum(pairs > 0))
        entry["client_pairs"] = int(np.sum(np.isfinite(pairs)))
      metrics[label] = entry
    rows.append({"arm": arm_dir, "seeds": seeds, "metrics": metrics})
  return {"base": base_dir, "cut_point": cut_point, "rows": rows}


def _pm(d: dict[str, float], digits: int = 2) -> str:
  return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
  """One table per arm: metric, arm, base, paired delta, wins."""
  lines = [f"Base: `{result['base']}`, cut_point={result['cut_point']}.", ""]
  for row in result["rows"]:
    lines += [
      f"### `{row['arm']}` against the base (seeds {', '.join(map(str, row['seeds']))})",
      "",
      "| metric | arm | base | arm - base, paired by seed | arm better: seeds, client-seed pairs |",
      "|---|---|---|---|---|",
    ]
    n = len(row["seeds"])
    for label, m in row["metrics"].items():
      wins = (
        f"{m['seed_wins']}/{n}, {m['client_wins']}/{m['client_pairs']}"
        if "seed_wins" in m
        else "- (higher: less disclosed)"
      )
      d = 3 if label == "label accuracy" else 2
      lines.append(
        f"| {label} | {_pm(m['arm'], d)} | {_pm(m['base'], d)} | {_pm(m['delta'], d)} | {wins} |"
      )
    lines.append("")
  return "\n".join(lines)


def main(argv):
  from absl import flags

  del argv
  f = flags.FLAGS
  try:
    result = compare(f.base, list(f.arms), f.cut_point)
  except (FileNotFoundError, ValueError) as e:
    print(f"collab.sweep_compare: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  text = markdown(result)
  print(text)
  if f.out:
    fileio.write_text(os.path.join(f.out, "compare.md"), text)
    fileio.write_json(os.path.join(f.out, "compare.json"), result, indent=1)


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("base", None, "The sweep directory the others are compared with.")
  flags.DEFINE_list("arms", None, "Sweep directories with another setting, same seeds and data.")
  flags.DEFINE_integer("cut_point", 20, "The cut every directory ran.")
  flags.DEFINE_string("out", "", "Also write compare.md and compare.json here.")
  flags.mark_flags_as_required(["base", "arms"])
  app.run(main)
