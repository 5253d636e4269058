"""Compares evaluated runs: ``python -m common.compare --workdirs=runs/a,runs/b --out=runs/report``.

Reads each workdir's ``eval/metrics.json`` (written by ``common.eval``) and writes

* ``report.md``: one row per run, plus a warning when runs were scored against different
  reference statistics or feature networks (their numbers are then not comparable);
* ``report.csv``: the same rows, every scalar field;
* ``pareto.png``: FID against FLOPs per sample (log scale), one labelled point per run.
"""

from __future__ import annotations

import csv
import json
import os
import sys

from absl import app, flags, logging

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Comma-separated evaluated workdirs.")
_OUT = flags.DEFINE_string("out", None, "Directory for report.md, report.csv, pareto.png.")

TABLE_COLUMNS = (
  ("run", "{}"),
  ("method", "{}"),
  ("dataset", "{}"),
  ("fid", "{:.3f}"),
  ("kid_mean", "{:.4f}"),
  ("precision", "{:.3f}"),
  ("recall", "{:.3f}"),
  ("label_accuracy", "{:.3f}"),
  ("params", "{:,}"),
  ("flops_per_sample", "{:.3g}"),
  ("wall_time_per_sample_s", "{:.4f}"),
  ("sampler", "{}"),
  ("sampling_steps", "{}"),
  ("num_samples", "{}"),
)


def load_runs(workdirs: list[str]) -> list[dict]:
  """The ``eval/metrics.json`` of each workdir, with a ``run`` name (the workdir's basename)."""
  runs = []
  for wd in workdirs:
    path = os.path.join(wd, "eval", "metrics.json")
    if not os.path.exists(path):
      raise FileNotFoundError(
        f"{path} does not exist: run `python -m common.eval --workdir={wd}` first"
      )
    with open(path) as f:
      record = json.load(f)
    record["run"] = os.path.basename(os.path.normpath(wd))
    runs.append(record)
  return runs


def _cell(record: dict, key: str, fmt: str) -> str:
  value = record.get(key)
  if value is None:
    return "-"
  try:
    return fmt.format(value)
  except (ValueError, TypeError):
    return str(value)


def write_report(runs: list[dict], out_dir: str) -> dict[str, str]:
  """Writes report.md, report.csv and pareto.png; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {
    "md": os.path.join(out_dir, "report.md"),
    "csv": os.path.join(out_dir, "report.csv"),
    "png": os.path.join(out_dir, "pareto.png"),
  }
  header = [name for name, _ in TABLE_COLUMNS]
  lines = ["# Comparison", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in runs:
    lines.append("| " + " | ".join(_cell(r, k, fmt) for k, fmt in TABLE_COLUMNS) + " |")
  refs = {
    (r.get("feature_net"), r.get("feature_net_sha256"), r.get("reference_statistics")) for r in runs
  }
  lines.append("")
  if len(refs) > 1:
    lines.append(
      "**Warning:** these runs were scored with different feature networks or reference "
      "statistics; their FID/KID/precision/recall are not comparable."
    )
  else:
    ((net, sha, ref),) = refs
    lines.append(f"Feature network `{net}` (sha256 `{str(sha)[:16]}...`), reference `{ref}`.")
  for r in runs:
    if r.get("groups"):
      lines += [
        "",
        f"## {r['run']}: per group",
        "",
        "| group | n | fid | label_accuracy |",
        "|---|---|---|---|",
      ]
      for g in r["groups"]:
        lines.append(
          f"| {g['group']} | {g['num_samples']} | {_cell(g, 'fid', '{:.3f}')} | "
          f"{_cell(g, 'label_accuracy', '{:.3f}')} |"
        )
  with open(paths["md"], "w") as f:
    f.write("\n".join(lines) + "\n")

  scalar_keys = sorted({k for r in runs for k, v in r.items() if not isinstance(v, (list, dict))})
  scalar_keys.remove("run")
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["run", *scalar_keys])
    for r in runs:
      writer.writerow([r["run"], *(r.get(k, "") for k in scalar_keys)])

  _pareto_plot(runs, paths["png"])
  return paths


def _pareto_plot(runs: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
  for r in runs:
    x, y = r.get("flops_per_sample"), r.get("fid")
    if x is None or y is None:
      continue
    ax.scatter([x], [y], s=40)
    ax.annotate(r["run"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
  ax.set_xscale("log")
  ax.set_xlabel("FLOPs per sample (whole sampling chain)")
  ax.set_ylabel(f"FID ({runs[0].get('feature_net', '?')} features)")
  ax.set_title("Quality against compute (lower left is better)")
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv):
  del argv
  try:
    runs = load_runs(_WORKDIRS.value)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  paths = write_report(runs, _OUT.value)
  logging.info("wrote %s", ", ".join(paths.values()))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdirs", "out"])
  app.run(main)
