"""Compares finished runs: ``python -m common.compare --workdirs=runs/a,runs/b --out=runs/report``.

Reads each workdir's result in one of two shapes:

* a generative run: ``eval/metrics.json`` (written by ``common.eval``);
* any other run: ``headline.json`` (``common.headline``: hybrid's scheduler, cdc's adaptation),
  whose arms (the method and its baselines) become a table of their own.

A workdir may be named ``name=path`` (default name: its basename). Writes

* ``report.md``: a headline table (every run's primary figure, FLOPs, wall time), the generative
  runs' table (with a warning when they were scored against different reference statistics or
  feature networks: their numbers are then not comparable), one table per non-generative run and,
  with ``--plan``, the comparisons it names and the runs that failed;
* ``report.csv``: one row per run and per baseline arm, every scalar field;
* ``pareto.png`` (``common.pareto``): each generative run's headline FID
  (``common.headline.headline_figure``, the figure of the headline table: collab's per-client mean
  where the plan names it) against sampling FLOPs per sample (log scale), its labels placed so that
  none overlaps another.

A generative run's training compute (``common.train.compute``: images read and FLOPs of every
shared-loop training under its workdir, adaptive's two stages included) joins its row when the run
recorded it.

``--plan`` is a JSON file (``common.quickstart`` writes one) with optional keys ``title``,
``command``, ``wall_time_s``, ``runs`` (name -> ``section``, ``label``, ``baseline``: another run's
name, ``baseline_arm``: an arm of the run's own headline, ``wall_time_s``, ``status``), ``entries``
(every launch: ``name``, ``status``, ``wall_time_s``, ``command``) and ``failures`` (list of
``name``, ``command``, ``rc``, ``log``, ``error``).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any

from absl import app, flags, logging

from common import fileio, pareto, replicates
from common import headline as headline_lib
from common.train import compute as compute_lib

TABLE_COLUMNS = (
  ("run", "{}"),
  ("method", "{}"),
  ("dataset", "{}"),
  ("fid", "{:.3f}"),
  ("fid_groups_mean", "{:.3f}"),
  ("kid_mean", "{:.4f}"),
  ("precision", "{:.3f}"),
  ("recall", "{:.3f}"),
  ("label_accuracy", "{:.3f}"),
  ("params", "{:,}"),
  ("images_seen", "{:,}"),
  ("train_flops", "{:.3g}"),
  ("flops_per_sample", "{:.3g}"),
  ("wall_time_per_sample_s", "{:.4f}"),
  ("sampler", "{}"),
  ("sampling_steps", "{}"),
  ("timestep_spacing", "{}"),
  ("num_samples", "{}"),
)


def _define_flags() -> dict[str, Any]:
  """The binary's flags, defined only when it runs (quickstart and tests import this module)."""
  return {
    "workdirs": flags.DEFINE_list(
      "workdirs", None, "Comma-separated finished workdirs, each `path` or `name=path`."
    ),
    "out": flags.DEFINE_string("out", None, "Directory for report.md, report.csv, pareto.png."),
    "plan": flags.DEFINE_string(
      "plan", "", "Optional JSON: sections, labels, baselines, wall times, failures."
    ),
  }


def _split_spec(spec: str) -> tuple[str, str]:
  if "=" in spec:
    name, path = spec.split("=", 1)
    return name, path
  return os.path.basename(os.path.normpath(spec)), spec


def load_runs(workdirs: list[str]) -> list[dict]:
  """One record per workdir (``path`` or ``name=path``), each with ``run`` (its name) and ``kind``.

  Generative records are ``eval/metrics.json``; the others are ``headline.json`` records. A
  workdir's ``headline.json`` of kind ``generative`` is ignored in favour of its eval metrics.
  """
  runs = []
  for spec in workdirs:
    name, wd = _split_spec(spec)
    record = headline_lib.read(wd)
    if record is None or record["kind"] == "generative":
      path = os.path.join(wd, "eval", "metrics.json")
      if not os.path.exists(path):
        raise FileNotFoundError(
          f"{path} does not exist: run `python -m common.eval --workdir={wd}` first "
          f"(or the method's own binary that writes {wd}/{headline_lib.FILENAME})"
        )
      with open(path) as f:
        record = json.load(f)
      record["kind"] = "generative"
      # An evaluation written before the field existed sampled on the one grid there was.
      record.setdefault("timestep_spacing", "uniform")
      _with_group_means(record)
      _with_train_compute(record, wd)
    record["run"] = name
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


def _num(value: Any, spec: str = ".4g") -> str:
  if value is None:
    return "-"
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return str(value)
  return format(value, spec)


def _with_train_compute(record: dict, workdir: str) -> dict:
  """A generative record with ``train_steps``, ``images_seen``, ``train_flops``,
  ``train_pflop`` and ``train_flops_per_image`` from every training under ``workdir``
  (``common.train.compute.of_workdir``); unchanged when the run recorded none."""
  spent = compute_lib.of_workdir(workdir)
  if spent is None:
    return record
  flops = spent["flops"]
  record.update(
    train_steps=spent["steps"],
    images_seen=spent["images_seen"],
    train_flops=flops,
    train_pflop=None if flops is None else flops / 1e15,
    train_flops_per_image=spent["flops_per_image"],
    train_parts=spent["parts"],
  )
  return record


def _with_group_means(record: dict) -> dict:
  """A generative record with ``fid_groups_mean`` / ``label_accuracy_groups_mean`` (groups' mean)."""
  for key in ("fid", "label_accuracy"):
    vals = [g[key] for g in record.get("groups") or [] if g.get(key) is not None]
    if vals:
      record[f"{key}_groups_mean"] = float(sum(vals) / len(vals))
  return record


def _summary_rows(runs: list[dict], plan: dict) -> list[dict[str, Any]]:
  """One row per run of the headline table, with its comparison against its baseline."""
  by_name = {r["run"]: r for r in runs}
  meta = plan.get("runs", {})
  rows = []
  names = list(by_name) + [n for n in meta if n not in by_name]
  for name in names:
    m = meta.get(name, {})
    r = by_name.get(name)
    row: dict[str, Any] = {
      "run": name,
      "section": m.get("section", ""),
      "label": m.get("label", ""),
      "status": m.get("status", "ok" if r else "missing"),
      "wall_time_s": m.get("wall_time_s", None if r is None else r.get("wall_time_s")),
    }
    if r is None:
      rows.append(row)
      continue
    p = headline_lib.headline_figure(r, meta)
    flops, flops_what = headline_lib.flops_of(r)
    row.update(kind=r["kind"], primary=p["name"], value=p["value"], flops=flops)
    row["higher_is_better"] = bool(p["higher_is_better"])
    row["flops_what"] = flops_what
    ref_value, ref_name = None, ""
    if m.get("baseline") in by_name:
      ref_name = m["baseline"]
      ref_value = headline_lib.primary_of(by_name[ref_name], p["name"]).get("value")
    elif r["kind"] != "generative" and r.get("baselines"):
      ref_name = m.get("baseline_arm") or next(iter(r["baselines"]))
      ref_value = r["baselines"].get(ref_name, {}).get(p["name"])
    row["versus"] = ref_name
    if ref_value is not None and p["value"] is not None:
      row["delta"] = p["value"] - ref_value
      better = row["delta"] > 0 if p["higher_is_better"] else row["delta"] < 0
      row["better"] = "yes" if better else ("tie" if row["delta"] == 0 else "no")
    rows.append(row)
  rows = replicates.fold(rows, meta)
  order = {s: i for i, s in enumerate(dict.fromkeys(r["section"] for r in rows))}
  return sorted(rows, key=lambda r: order[r["section"]])


def _headline_table(rows: list[dict[str, Any]]) -> list[str]:
  lines = [
    "| section | run | what | primary | value | versus | delta | better | FLOPs | wall s | status |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    arrow = {True: " (higher better)", False: " (lower better)"}.get(r.get("higher_is_better"), "")
    flops = "-" if r.get("flops") is None else f"{r['flops']:.3g} {r.get('flops_what', '')}"
    value, delta, better = _num(r.get("value")), _num(r.get("delta"), "+.4g"), r.get("better", "-")
    if "value_std" in r:  # folded seed replicates (common.replicates)
      value = f"{value} +- {_num(r['value_std'])} ({r['seeds']} seeds)"
    if "delta_std" in r:
      delta = f"{delta} +- {_num(r['delta_std'])}"
      better = f"{better} ({r['wins']})"
    lines.append(
      f"| {r['section'] or '-'} | {r['run']} | {r['label'] or r.get('kind', '-')} | "
      f"{r.get('primary', '-')}{arrow} | {value} | {r.get('versus') or '-'} | "
      f"{delta} | {better} | {flops} | "
      f"{_num(r.get('wall_time_s'), '.0f')} | {r['status']} |"
    )
  return lines


def _arm_table(record: dict) -> list[str]:
  """The method's arm and its baselines, one row each, over the union of their metric keys."""
  arms = {f"**{record['arm']}**": record["metrics"], **record.get("baselines", {})}
  keys = list(dict.fromkeys(k for v in arms.values() for k in v))
  lines = ["| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for arm, metrics in arms.items():
    lines.append(f"| {arm} | " + " | ".join(_num(metrics.get(k)) for k in keys) + " |")
  return lines


def write_report(runs: list[dict], out_dir: str, plan: dict | None = None) -> dict[str, str]:
  """Writes report.md, report.csv and pareto.png; returns their paths.

  Args:
    runs: records from :func:`load_runs`.
    out_dir: created if missing.
    plan: optional sections, labels, baselines, wall times and failures (module docstring).
  """
  plan = plan or {}
  os.makedirs(out_dir, exist_ok=True)
  paths = {
    "md": os.path.join(out_dir, "report.md"),
    "csv": os.path.join(out_dir, "report.csv"),
    "png": os.path.join(out_dir, "pareto.png"),
  }
  meta = plan.get("runs", {})
  generative = [r for r in runs if r["kind"] == "generative"]
  others = [r for r in runs if r["kind"] != "generative"]
  summary = _summary_rows(runs, plan)
  lines = _title_section(plan)
  lines += _headline_section(summary)
  if generative:
    lines += _generative_section(generative, meta)
  for r in others:
    lines += _arm_section(r, meta)
  if plan.get("entries"):
    lines += _entries_section(plan["entries"])
  lines += _failures_section(plan.get("failures", []))
  fileio.write_text(paths["md"], "\n".join(lines).rstrip() + "\n")

  _write_csv(runs, summary, paths["csv"])
  # One point per arm: its seed-0 run (the table has every seed's).
  pareto.write(
    [r for r in generative if not meta.get(r["run"], {}).get("replicate_of")], paths["png"], meta
  )
  return paths


def _title_section(plan: dict) -> list[str]:
  """The title, the command that made the report, and the wall time."""
  lines = [f"# {plan.get('title', 'Comparison')}", ""]
  if plan.get("command"):
    lines += [f"`{plan['command']}`" + (f" ({plan['note']})" if plan.get("note") else ""), ""]
  if plan.get("runs_wall_time_s") is not None:
    lines += [
      f"Wall time of all runs {plan['runs_wall_time_s']:.0f} s (this invocation "
      f"{plan.get('wall_time_s', 0):.0f} s; a run finished by an earlier one keeps its time).",
      "",
    ]
  elif plan.get("wall_time_s") is not None:
    lines += [f"Total wall time {plan['wall_time_s']:.0f} s.", ""]
  if plan.get("environment"):
    lines += [_environment_line(plan["environment"]), ""]
  return lines


def _environment_line(env: dict) -> str:
  """One line: package versions, CPU, XLA flags and load, from ``plan_report.environment``."""
  packages = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items() if v)
  cpu = f"{env.get('cpu_count')} cores" + (f" of {env['cpu']}" if env.get("cpu") else "")
  load = f"load {env.get('load_at_start')} at the start, {env.get('load_at_end')} at the end"
  flags = f"XLA_FLAGS `{env['xla_flags']}`" if env.get("xla_flags") else "no XLA_FLAGS"
  return f"Ran with Python {env.get('python')}, {packages}; {cpu}; {flags}; {load}."


TRAIN_COMPUTE_NOTE = (
  "`images_seen`: images read from the data by every training under the run's workdir (steps x "
  "images per step: the global batch; collab: its clients' batches, whose cut images also train "
  "the server; TDC: stage 1 in `stage1/` and every group's batch of stage 2); `train_flops`: "
  "the FLOPs of those steps (XLA's cost analysis of the lowered train step, loops unrolled: "
  "forward, backward, optimizer and EMA, over all devices; `report.csv` also has them in PFLOP). "
  "Not counted: adaptive's pruning proxies, the evaluation. `-`: the run recorded none."
)


def _headline_section(summary: list[dict[str, Any]]) -> list[str]:
  """Every run's primary figure against its baseline (``_summary_rows``)."""
  return [
    "## Headline",
    "",
    *_headline_table(summary),
    "",
    "`delta` is the primary figure minus the same figure of `versus` (another run, or an arm of "
    "the run's own baselines). Generative FLOPs are per sample over the whole sampling chain.",
    "",
    replicates.note(summary),
  ]


def _generative_section(generative: list[dict], meta: dict | None = None) -> list[str]:
  """The generative runs' table, what its training compute counts, whether their scores are
  comparable, the Pareto plot (with the figure it plots per run), and each run's per-group
  table."""
  header = [name for name, _ in TABLE_COLUMNS]
  lines = ["", "## Generative runs", "", "| " + " | ".join(header) + " |"]
  lines.append("|" + "---|" * len(header))
  for r in generative:
    lines.append("| " + " | ".join(_cell(r, k, fmt) for k, fmt in TABLE_COLUMNS) + " |")
  refs: dict[tuple, list[str]] = {}
  for r in generative:
    key = (r.get("feature_net"), r.get("feature_net_sha256"), r.get("reference_statistics"))
    refs.setdefault(key, []).append(r["run"])
  lines.append("")
  if len(refs) > 1:
    scored = "; ".join(
      f"{', '.join(runs)}: `{net}` (sha256 `{str(sha)[:16]}...`), reference "
      f"`{os.path.basename(str(ref))}`"
      for (net, sha, ref), runs in refs.items()
    )
    lines.append(
      "**Warning:** these runs were scored with different feature networks or reference "
      "statistics; FID/KID/precision/recall compare only between runs scored alike "
      f"({scored})."
    )
  else:
    ((net, sha, ref),) = refs
    lines.append(f"Feature network `{net}` (sha256 `{str(sha)[:16]}...`), reference `{ref}`.")
  lines += ["", TRAIN_COMPUTE_NOTE]
  lines += [
    "",
    "![quality against sampling FLOPs](pareto.png)",
    "",
    _plotted_note(generative, meta),
  ]
  for r in generative:
    if r.get("groups"):
      lines += _group_table(r)
  return lines


def _plotted_note(generative: list[dict], meta: dict | None) -> str:
  """Which figure ``pareto.png`` plots for each run (the headline table's)."""
  by_figure: dict[str, list[str]] = {}
  for r in generative:
    by_figure.setdefault(headline_lib.headline_figure(r, meta)["name"], []).append(r["run"])
  if list(by_figure) == ["fid"]:
    return "The plot shows each run's `fid`, the headline table's figure."
  parts = [f"`{name}` for {', '.join(runs)}" for name, runs in by_figure.items()]
  return f"The plot shows each run's headline figure: {'; '.join(parts)}."


def _group_table(record: dict) -> list[str]:
  """A generative run's per-group sample count, FID and label accuracy."""
  lines = [
    "",
    f"### {record['run']}: per group",
    "",
    "| group | n | fid | label_accuracy |",
    "|---|---|---|---|",
  ]
  for g in record["groups"]:
    lines.append(
      f"| {g['group']} | {g['num_samples']} | {_cell(g, 'fid', '{:.3f}')} | "
      f"{_cell(g, 'label_accuracy', '{:.3f}')} |"
    )
  return lines


def _arm_section(record: dict, meta: dict) -> list[str]:
  """A non-generative run: its arm table, then its FLOPs, wall time and note."""
  title = meta.get(record["run"], {}).get("label") or f"{record['method']} ({record['kind']})"
  lines = ["", f"## {record['run']}: {title}", ""]
  lines += _arm_table(record)
  extra = []
  if record.get("flops") is not None:
    extra.append(f"FLOPs {record['flops']:.3g} ({record.get('flops_what', '')})")
  if record.get("wall_time_s") is not None:
    extra.append(f"binary wall time {record['wall_time_s']:.1f} s")
  if record.get("note"):
    extra.append(record["note"])
  if extra:
    lines += ["", "; ".join(extra) + "."]
  return lines


def _entries_section(entries: list[dict]) -> list[str]:
  """Every launch of the plan, in order, with its status, wall time, the part of it spent making
  programs (``common.train.timing``: JAX's tracing and lowering, XLA's compile) and command."""
  lines = [
    "", "## Runs", "",
    "| # | run | status | wall s | compiling s (trace + lower + XLA) | programs (cached) | command |",
    "|---|---|---|---|---|---|---|",
  ]  # fmt: skip
  wall = making = 0.0
  for i, e in enumerate(entries, 1):
    t = e.get("timing") or {}
    parts = [t.get(k) for k in ("trace_s", "lower_s", "compile_s")]
    spent = sum(p or 0.0 for p in parts) if t else None
    if spent is not None and e.get("wall_time_s"):
      wall, making = wall + e["wall_time_s"], making + spent
    split = f" ({' + '.join(_num(p, '.0f') for p in parts)})" if t else ""
    programs = f"{t.get('programs', 0)} ({t.get('cache_hits', 0)})" if t else "-"
    lines.append(
      f"| {i} | {e['name']} | {e['status']} | {_num(e.get('wall_time_s'), '.0f')} | "
      f"{_num(spent, '.0f')}{split} | {programs} | `{e['command']}` |"
    )
  lines += ["", "`skipped`: finished by an earlier invocation (its wall time is that run's)."]
  if wall:
    lines += [
      f"Making programs took {making:.0f} s of these runs' {wall:.0f} s "
      f"({100 * making / wall:.0f}%); the rest is Python start-up, data, running the programs "
      "and writing results."
    ]
  return lines


def _failures_section(failures: list[dict]) -> list[str]:
  """Each failed run's exit code, command, log and error (nothing when none failed)."""
  if not failures:
    return []
  lines = ["", "## Failed runs", ""]
  for fl in failures:
    lines += [
      f"### {fl['name']} (exit code {fl.get('rc')})",
      "",
      f"`{fl.get('command', '')}`" + (f", log `{fl['log']}`" if fl.get("log") else ""),
      "",
      "```",
      str(fl.get("error", "")).rstrip(),
      "```",
      "",
    ]
  return lines


def _write_csv(runs: list[dict], summary: list[dict], path: str) -> None:
  """One row per run (generative: every scalar of metrics.json) and per baseline arm."""
  extra = {r["run"]: r for r in summary}
  rows = []
  for r in runs:
    s = extra.get(r["run"], {})
    base = {
      "run": r["run"],
      "arm": r.get("arm", r.get("method")),
      "role": "method",
      "kind": r["kind"],
      "section": s.get("section", ""),
      "wall_time_s": s.get("wall_time_s"),
    }
    if r["kind"] == "generative":
      rows.append({**{k: v for k, v in r.items() if not isinstance(v, (list, dict))}, **base})
      continue
    rows.append({**r["metrics"], **base, "flops": r.get("flops"), "method": r["method"]})
    for arm, metrics in r.get("baselines", {}).items():
      rows.append({**metrics, **base, "arm": arm, "role": "baseline", "method": r["method"]})
  first = ["run", "arm", "role", "kind", "section", "method", "wall_time_s"]
  keys = sorted({k for row in rows for k in row} - set(first))
  with fileio.atomic_open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow([*first, *keys])
    for row in rows:
      writer.writerow([row.get(k, "") if row.get(k) is not None else "" for k in first + keys])


# A label's places around its point, tried in turn: right of it, then left, then both again one
# and more label heights up and down.
def main(argv, flag_values):
  del argv
  plan = {}
  try:
    if flag_values["plan"].value:
      with open(flag_values["plan"].value) as f:
        plan = json.load(f)
    runs = load_runs(flag_values["workdirs"].value or [])
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(2)
  if not runs and not plan.get("runs"):
    print("error: no runs to compare (--workdirs is empty)", file=sys.stderr)
    sys.exit(2)
  paths = write_report(runs, flag_values["out"].value, plan)
  logging.info("wrote %s", ", ".join(paths.values()))


if __name__ == "__main__":
  _flags = _define_flags()
  flags.mark_flags_as_required(["out"])
  app.run(lambda argv: main(argv, _flags))
