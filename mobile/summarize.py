"""Tables of mobile/RESULTS.md from evaluated runs: ``python -m mobile.summarize --runs=runs/mobile``.

Reads ``<runs>/<name>/eval/metrics.json`` as written by ``common.eval`` for the run names of
``mobile/experiments.sh`` and prints markdown: per-run figures and mean +- std over seeds. Runs not
evaluated yet are listed as missing.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from common.metrics import stats

_RUNS = flags.DEFINE_string("runs", "runs/mobile", "Directory holding the runs.")


def _load(runs: str, name: str) -> dict | None:
  path = os.path.join(runs, name, "eval", "metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _row(name: str, m: dict) -> str:
  acc = f"{100 * m['label_accuracy']:.1f}%" if "label_accuracy" in m else "-"
  return (
    f"| {name} | {m['fid']:.2f} | {m['kid_mean']:.1f} | {m['precision']:.3f} | "
    f"{m['recall']:.3f} | {acc} | {m['params']:,} | {m['flops_per_sample']:.3g} | "
    f"{1e3 * m['wall_time_per_sample_s']:.1f} ms |"
  )


_HEADER = (
  "| run | digits-FD | KID | precision | recall | label acc. | params | FLOPs / sample "
  "| wall / sample |\n|---|---|---|---|---|---|---|---|---|"
)


def _table(runs: str, names: list[str]) -> list[str]:
  lines = [_HEADER]
  for name in names:
    m = _load(runs, name)
    lines.append(_row(name, m) if m else f"| {name} | (not evaluated) |")
  return lines


_SEED_HEADER = (
  "| config | seeds | digits-FD | KID | precision | recall | FLOPs / sample |\n"
  "|---|---|---|---|---|---|---|"
)


def _seed_summary(runs: str, prefix: str, seeds=(0, 1, 2)) -> str:
  ms = [m for m in (_load(runs, f"{prefix}_s{s}") for s in seeds) if m]
  if not ms:
    return f"| {prefix} | (no evaluated seed) |"
  return (
    f"| {prefix} | {len(ms)} | {_mean_std([m['fid'] for m in ms])} | "
    f"{_mean_std([m['kid_mean'] for m in ms], digits=1)} | "
    f"{np.mean([m['precision'] for m in ms]):.3f} | {np.mean([m['recall'] for m in ms]):.3f} | "
    f"{ms[0]['flops_per_sample']:.3g} |"
  )


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
  """``mean +- sample std`` over seeds (``common.metrics.stats``; std 0 for one seed)."""
  s = stats.mean_std(scale * np.asarray(values))
  return f"{s['mean']:.{digits}f} +- {s['std']:.{digits}f}"


def _guidance_summary(runs: str, suffix: str, scale: str, seeds=(0, 1, 2)) -> str:
  """One guidance scale over the conditional seeds ``cond_s<k><suffix>``; accuracy in %."""
  ms = [m for m in (_load(runs, f"cond_s{s}{suffix}") for s in seeds) if m]
  if not ms:
    return f"| {scale} | (no evaluated seed) |"
  return (
    f"| {scale} | {len(ms)} | {_mean_std([m['label_accuracy'] for m in ms], 100, 1)}% | "
    f"{_mean_std([m['fid'] for m in ms])} | {_mean_std([m['kid_mean'] for m in ms], digits=1)} | "
    f"{np.mean([m['precision'] for m in ms]):.3f} | {np.mean([m['recall'] for m in ms]):.3f} |"
  )


def _paired_wins(runs: str, arm: str, against: str = "c1", seeds=(0, 1, 2)) -> str:
  """Seeds where ``against`` has the lower digits-FD than ``arm``, of those where both exist."""
  pairs = [(_load(runs, f"{against}_s{s}"), _load(runs, f"{arm}_s{s}")) for s in seeds]
  pairs = [(a, b) for a, b in pairs if a and b]
  return f"{sum(a['fid'] < b['fid'] for a, b in pairs)}/{len(pairs)}"


# M7's arms (mobile/experiments.sh, section m7): run prefix -> what it is, all at Config I's (or
# II's) training compute.
_M7_ARMS = (
  ("c1", "TFDiff Config I"),
  ("uvit_f1", "U-ViT p=2 at Config I's FLOPs"),
  ("uvit_p1", "U-ViT p=2 at Config I's params"),
  ("unet", "U-Net (24, 48)"),
  ("c2", "TFDiff Config II"),
  ("uvit_f2", "U-ViT p=1 at Config II's FLOPs"),
  ("uvit_p2", "U-ViT p=1 at Config II's params"),
)


def _m7_section(runs: str) -> list[str]:
  out = ["## M7: the tokenized arm and the U-Net at equal training compute (mean +- std)", ""]
  out += [
    "| arm | seeds | digits-FD | KID | precision | recall | params | FLOPs / sample "
    "| TFDiff (c1 / c2) wins |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for prefix, what in _M7_ARMS:
    ms = [m for m in (_load(runs, f"{prefix}_s{s}") for s in (0, 1, 2)) if m]
    if not ms:
      continue
    ref = "c2" if prefix.endswith("2") else "c1"
    wins = "-" if prefix in ("c1", "c2") else _paired_wins(runs, prefix, ref)
    out.append(
      f"| {what} (`{prefix}`) | {len(ms)} | {_mean_std([m['fid'] for m in ms])} | "
      f"{_mean_std([m['kid_mean'] for m in ms], digits=1)} | "
      f"{np.mean([m['precision'] for m in ms]):.3f} | {np.mean([m['recall'] for m in ms]):.3f} | "
      f"{ms[0]['params']:,} | {ms[0]['flops_per_sample']:.3g} | {wins} |"
    )
  return out + [""]


def main(argv):
  del argv
  runs = _RUNS.value
  out = ["## M2: Config I vs II (mean +- sample std over seeds)", ""]
  out.append(_SEED_HEADER)
  out += [_seed_summary(runs, "c1"), _seed_summary(runs, "c2"), ""]
  out += _table(runs, [f"c{c}_s{s}" for c in (1, 2) for s in (0, 1, 2)]) + [""]
  out += ["## M3: spatial mechanism (Config I; mean +- sample std over seeds)", ""]
  out.append(_SEED_HEADER)
  out += [_seed_summary(runs, p) for p in ("c1", "c1_nodw", "c1_pos")] + [""]
  out += _table(runs, ["c1_s0", "c1_nodw", "c1_pos"]) + [""]
  out += ["## M4: depth N at D=64 (Config I; N = 6 is c1; mean +- sample std over seeds)", ""]
  out.append(_SEED_HEADER)
  out += [_seed_summary(runs, p) for p in ("c1_n2", "c1_n4", "c1", "c1_n8")] + [""]
  out += _table(runs, [f"c1_n{n}_s{s}" for n in (2, 4, 8) for s in (0, 1, 2)]) + [""]
  out += _m7_section(runs)
  out += ["## M6: class-conditional Config I, guidance scale 1 + w (mean +- std over seeds)", ""]
  out += [
    "| guidance | seeds | label acc. | digits-FD | KID | precision | recall |",
    "|---|---|---|---|---|---|---|",
  ]
  for suffix, scale in (("", "1 (w = 0)"), ("_g2.0", "2 (w = 1)"), ("_g4.0", "4 (w = 3)")):
    out.append(_guidance_summary(runs, suffix, scale))
  out.append("")
  out += _table(runs, [f"cond_s{s}{g}" for s in (0, 1, 2) for g in ("", "_g2.0", "_g4.0")])
  out += ["", "M6 at 6,000 steps (seed 0):", ""]
  out += _table(runs, [f"cond6k_s0{g}" for g in ("", "_g2.0", "_g4.0")])
  print("\n".join(out))


if __name__ == "__main__":
  app.run(main)
