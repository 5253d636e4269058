"""The edge loop's report: ``serve.json`` (every request and window), ``serve.md``, ``serve.png``.

Each request is reported next to the latency model's prediction for the same decision, whole and
in two halves: until the answer (wait, decision, edge steps, link) and after it (the device's n
local steps).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from common import fileio


def request_rows(measured, windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per request of the measured rounds, joined with the edge's record of its window.

  Args:
    measured: per round, ``(scenario, keys, [device.ClientResult])`` with the results in the
      scenario's user order.
    windows: the edge server's window records (``EdgeServer.windows``) of those rounds.
  """
  decided = {u["id"]: (i, u) for i, w in enumerate(windows) for u in w["users"]}
  rows = []
  for rnd, (scn, _, results) in enumerate(measured):
    for c, res in enumerate(results):
      wi, u = decided.get(res.id, (None, {}))
      w = windows[wi] if wi is not None else None
      rows.append(
        {
          "round": rnd,
          "window": wi,
          "id": res.id,
          "user": res.user,
          "tau": float(scn.tau[c]),
          "alpha": float(scn.alpha[c]),
          "device_type": int(scn.device_type[c]),
          "kind": res.kind,
          "cut_point": res.cut_point,
          "batch": res.batch,
          "wait": u.get("wait"),
          "edge_seconds": u.get("edge_ready") if res.kind == "latent" else None,
          "decision_seconds": w["decision_seconds"] if w else None,
          "local_compute": res.local_compute,
          "predicted": u.get("predicted"),
          "measured": res.latency,
          # The halves: until the answer arrives (wait, decision, edge, link), then local.
          "predicted_answer": (
            u["predicted"] - res.cut_point * float(scn.tau[c])
            if u and res.cut_point is not None
            else None
          ),
          "measured_answer": res.answered - res.sent,
          "predicted_local": res.cut_point * float(scn.tau[c])
          if res.cut_point is not None
          else None,
          "measured_local": res.done - res.answered,
        }
      )
  return rows


def _ratio(rows, meas: str, pred: str) -> float | None:
  vals = [r[meas] / r[pred] for r in rows if r.get(pred)]
  return float(np.mean(vals)) if vals else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean measured / predicted over answered requests: total, and the two halves of a request
  (until the answer: wait, decision, edge steps, link; after it: the device's local steps)."""
  ok = [r for r in rows if r["kind"] in ("latent", "local")]
  meas = np.array([r["measured"] for r in ok])
  pred = np.array([r["predicted"] for r in ok])
  out: dict[str, Any] = {"answered": len(ok), "requests": len(rows)}
  if not ok:
    return out
  out.update(
    mean_measured=float(meas.mean()),
    mean_predicted=float(pred.mean()),
    mean_abs_error=float(np.abs(meas - pred).mean()),
    mean_ratio=float(np.mean(meas / pred)),
    median_ratio=float(np.median(meas / pred)),
    correlation=float(np.corrcoef(meas, pred)[0, 1]) if len(ok) > 2 else None,
  )
  for kind in ("latent", "local"):
    sub = [r for r in ok if r["kind"] == kind]
    if sub:
      out[f"{kind}_count"] = len(sub)
      out[f"{kind}_mean_ratio"] = _ratio(sub, "measured", "predicted")
      out[f"{kind}_answer_mean_ratio"] = _ratio(sub, "measured_answer", "predicted_answer")
      out[f"{kind}_local_mean_ratio"] = _ratio(sub, "measured_local", "predicted_local")
  per_round: dict[int, set] = {}
  for r in ok:
    per_round.setdefault(r["round"], set()).add(r.get("window"))
  out["windows_per_round"] = float(np.mean([len(v) for v in per_round.values()]))
  return out


def write_report(out: str, result: dict[str, Any]) -> None:
  """``serve.json``, ``serve.md`` and ``serve.png`` in ``out``."""
  fileio.write_json(os.path.join(out, "serve.json"), result, indent=1)
  rows, s = result["rows"], result["summary"]
  lines = [
    "# hybrid.serve: measured edge loop vs the latency model",
    "",
    f"`{result['command']}`",
    "",
    f"Scheduler `{result['scheduler']}`; profile `{result['profile']}`; edge G = "
    f"{result['num_gpus']:g}; T = {result['num_steps']}, n in [{result['min_cut_point']:.1f}, "
    f"{result['num_steps']}]; window K = {result['window']:g} s; {result['rounds']} rounds of "
    f"{result['users']} devices on {result['address']}. Device speed emulated (each device's "
    "n local steps take at least n tau_i); the link is loopback. Served x_0 vs `hybrid_sample` "
    f"with the same keys and decisions: max |diff| {_fmt(result.get('max_abs_diff_vs_hybrid_sample'), '.2e')}.",
    "",
    "Each request in two halves, predicted / measured: until the answer (wait, decision, edge "
    "steps, link; `edge` is the edge's own time to this latent) and after it (the n local "
    "steps; `compute` is the device's real computation inside them).",
    "",
    "| round | client | user | tau (ms/step) | alpha | decision | n | B | wait (s) | edge (s) "
    "| answer pred / meas (s) | local pred / meas (s) | compute (s) | total pred / meas (s) "
    "| meas / pred |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['round']} | {r['id']} | {r['user']} | {1e3 * r['tau']:.2f} | {r['alpha']:.3g} | "
      f"{r['kind']} | {_fmt(r.get('cut_point'), 'd')} | {_fmt(r.get('batch'), 'd')} | "
      f"{_fmt(r.get('wait'), '.3f')} | {_fmt(r.get('edge_seconds'), '.3f')} | "
      f"{_fmt(r.get('predicted_answer'), '.3f')} / {_fmt(r.get('measured_answer'), '.3f')} | "
      f"{_fmt(r.get('predicted_local'), '.3f')} / {_fmt(r.get('measured_local'), '.3f')} | "
      f"{_fmt(r.get('local_compute'), '.3f')} | "
      f"{_fmt(r.get('predicted'), '.3f')} / {_fmt(r.get('measured'), '.3f')} | "
      f"{_fmt(r['measured'] / r['predicted'] if r.get('predicted') else None, '.3f')} |"
    )
  lines += ["", "```", json.dumps(s, indent=2), "```", ""]
  fileio.write_text(os.path.join(out, "serve.md"), "\n".join(lines))
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
  panels = (
    ("predicted", "measured", "end to end"),
    ("predicted_answer", "measured_answer", "until the answer (wait, edge, link)"),
    ("predicted_local", "measured_local", "the device's local steps"),
  )
  for ax, (pk, mk, title) in zip(axes, panels, strict=True):
    vals = []
    for kind, marker in (("latent", "o"), ("local", "s")):
      sub = [r for r in rows if r["kind"] == kind and r.get(pk) is not None]
      if sub:
        xs, ys = [r[pk] for r in sub], [r[mk] for r in sub]
        vals += xs + ys
        ax.scatter(xs, ys, marker=marker, s=18, label="admitted" if kind == "latent" else "denied")
    if vals:
      hi = 1.05 * max(vals)
      ax.plot([0, hi], [0, hi], "k--", lw=0.8, label="measured = predicted")
    ax.set_xlabel("latency model (s)")
    ax.set_ylabel("measured (s)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(f"hybrid.serve: {result['users']} devices x {result['rounds']} rounds", fontsize=10)
  fig.tight_layout()
  fileio.write_figure(fig, os.path.join(out, "serve.png"), dpi=110)


def _fmt(v, spec: str) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "-"
  return format(v, spec)
