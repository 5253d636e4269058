"""Tables of ``cdc/RESULTS.md`` from evaluated runs: mean +- std over seeds of the held-out means.

``python -m cdc.summarize --runs=runs/cdc`` reads every ``<runs>/seed*/eval/metrics.json`` and
prints markdown: all arms, then the spec's relative claims 1-4 with paired win rates over
(seed, held-out device). Toy-scale, CDC-MMPG-style figures: never the paper's.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from absl import app, flags


def load(runs: str) -> dict[str, dict]:
  """{seed dir name: metrics.json} for every evaluated seed under ``runs``."""
  out = {}
  for path in sorted(glob.glob(os.path.join(runs, "seed*", "eval", "metrics.json"))):
    with open(path) as f:
      out[os.path.basename(os.path.dirname(os.path.dirname(path)))] = json.load(f)
  if not out:
    raise FileNotFoundError(f"no {runs}/seed*/eval/metrics.json: run cdc.evaluate first")
  return out


def _seed_means(results, arm, key):
  return np.array([r["mean"][arm][key] for r in results.values() if arm in r["mean"]])


def _fmt(vals, scale=1.0, digits=3):
  vals = np.asarray(vals, np.float64) * scale
  return f"{vals.mean():.{digits}f} +- {vals.std():.{digits}f}"


def _paired(results, a, b, key):
  """Share of (seed, device) pairs where arm ``a`` beats arm ``b`` on ``key`` (ties: half)."""
  wins = []
  for r in results.values():
    for dev, rec in r["per_device"][a].items():
      other = r["per_device"][b][dev][key]
      wins.append(1.0 if rec[key] > other else 0.5 if rec[key] == other else 0.0)
  return float(np.mean(wins)), len(wins)


def tables(results: dict[str, dict], main_arm: str) -> str:
  """The markdown of RESULTS.md's tables."""
  seeds = list(results)
  first = next(iter(results.values()))
  arms = list(first["mean"])
  lines = [
    f"Seeds: {', '.join(seeds)}; held-out devices {first['heldout_devices']}; "
    f"generated head {first['generated_params']:,} parameters; link {first['link_mbps']} Mbit/s.",
    "",
    "| arm | QA acc | R@1 | R@5 | uplink B | downlink B | device MFLOPs | device ms | latency ms |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for arm in arms:

    def col(key, scale=1.0, digits=3, arm=arm):
      vals = _seed_means(results, arm, key) if key in first["mean"][arm] else None
      return "-" if vals is None or not len(vals) else _fmt(vals, scale, digits)

    lines.append(
      f"| {arm} | {col('qa_accuracy')} | {col('R@1')} | {col('R@5')} | "
      f"{col('uplink_bytes', digits=0)} | {col('downlink_bytes', digits=0)} | "
      f"{col('device_flops', 1e-6, 1)} | {col('device_seconds', 1e3, 1)} | "
      f"{col('latency_seconds', 1e3, 1)} |"
    )
  lines += ["", "Paired win rates of the main arm (share of seed x held-out device pairs):", ""]
  lines += ["| comparison | QA acc | R@1 | pairs |", "|---|---|---|---|"]
  for other in ["static", "fda/base", "fda/mismatched", "ft/n5", "ft/n20", "ft/n100"]:
    if other in arms:
      qa, n = _paired(results, main_arm, other, "qa_accuracy")
      r1, _ = _paired(results, main_arm, other, "R@1")
      lines.append(f"| {main_arm} > {other} | {qa:.2f} | {r1:.2f} | {n} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  results = load(flags.FLAGS.runs)
  print(tables(results, flags.FLAGS.main_arm))


if __name__ == "__main__":
  flags.DEFINE_string("runs", "runs/cdc", "directory with seed*/ workdirs")
  flags.DEFINE_string("main_arm", "fda/k_center/K16", "the arm compared with the baselines")
  app.run(main)
