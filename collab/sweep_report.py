"""The CollaFuse sweep's report: ``collab.sweep``'s per-run results (``sweep_eval.json`` of every
``seed<s>/<arm>``) aggregated per cut point (mean over clients, then mean +- std over seeds), the
claims checked against them, and ``sweep.md`` / ``sweep.png``."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from common import fileio
from common.metrics import stats


# --- aggregation -------------------------------------------------------------------------------
def _get(entry, path):
  for key in path:
    if entry is None or key not in entry:
      return None
    entry = entry[key]
  return entry


def client_values(
  clients_per_seed: list[list[dict[str, Any]] | None], num_clients: int, path: tuple[str, ...]
) -> np.ndarray:
  """[seeds, clients] of one metric from each seed's client entries (``sweep_eval.json``'s
  ``clients``; None for a missing run), NaN where missing."""
  out = np.full((len(clients_per_seed), num_clients), np.nan)
  for i, clients in enumerate(clients_per_seed):
    for c in clients or ():
      v = _get(c, path)
      if v is not None:
        out[i, c["client"]] = v
  return out


def summarize(
  results: dict[str, dict[str, Any]], cuts: list[int], num_timesteps: int, ref_cut: int
):
  """Per-(arm, cut) means over clients, then mean +- std over seeds; and the claims."""
  seeds = sorted({int(key.split("/")[0][4:]) for key in results})
  num_clients = max(len(r["clients"]) for r in results.values())

  def client_curve(arm, path):
    """[seeds, clients] of one metric (NaN where missing)."""
    runs = [results.get(f"seed{s}/{arm}") for s in seeds]
    return client_values([r and r["clients"] for r in runs], num_clients, path)

  metrics = ("fid", "kid_mean", "label_accuracy")
  table: dict[str, Any] = {"cuts": {}, "centralized": {}}
  for cut in cuts:
    row: dict[str, Any] = {}
    for arm in ("collafuse", "client_from_noise"):
      for m in metrics:
        grid = client_curve(f"cut{cut}", (arm, m))
        row[f"{arm}/{m}"] = stats.mean_std(
          np.nanmean(grid, axis=1) if np.isfinite(grid).any() else []
        )
        row[f"{arm}/{m}/per_client"] = _nan_list(
          np.nanmean(grid, axis=0) if np.isfinite(grid).any() else []
        )
    for src in ("cut_images", "handoff", "server_alone"):
      for m in ("fid", "kid_mean", "pixel_mse", "nn_distance"):
        grid = client_curve(f"cut{cut}", ("disclosure", src, m))
        row[f"disclosure/{src}/{m}"] = stats.mean_std(np.nanmean(grid, axis=1))
        row[f"disclosure/{src}/{m}/per_client"] = _nan_list(np.nanmean(grid, axis=0))
    for m in ("measured", "analytic"):
      row[f"cut_mse/{m}"] = stats.mean_std(
        np.nanmean(client_curve(f"cut{cut}", ("cut_mse", m)), axis=1)
      )
    costs = [results[f"seed{s}/cut{cut}"]["costs"] for s in seeds if f"seed{s}/cut{cut}" in results]
    row["costs"] = costs[0] if costs else {}
    table["cuts"][str(cut)] = row
  for m in metrics:
    grid = client_curve("centralized", ("collafuse", m))
    table["centralized"][m] = stats.mean_std(
      np.nanmean(grid, axis=1) if np.isfinite(grid).any() else []
    )
    table["centralized"][f"{m}/per_client"] = _nan_list(
      np.nanmean(grid, axis=0) if np.isfinite(grid).any() else []
    )

  claims = _claims(client_curve, cuts, num_timesteps, ref_cut, table)
  return {"seeds": seeds, "num_clients": num_clients, "table": table, "claims": claims}


def _nan_list(x) -> list[float | None]:
  return [None if not math.isfinite(float(v)) else float(v) for v in np.asarray(x).ravel()]


def _claims(client_curve, cuts, big_t, ref_cut, table) -> dict[str, Any]:
  claims: dict[str, Any] = {}
  mids = [c for c in cuts if 0 < c < big_t]

  def versus(arm_a, cut_a, arm_b, cut_b):
    """Per metric: client-seed pairs where a beats b (lower), and clients won on the seed mean."""
    out = {}
    for m in ("fid", "kid_mean"):
      a = client_curve(f"cut{cut_a}", (arm_a, m))
      b = client_curve(f"cut{cut_b}", (arm_b, m))
      won = np.nanmean(a, 0) < np.nanmean(b, 0)
      out[m] = {
        "client_seed_pairs_won": int((a < b).sum()),
        "client_seed_pairs": int(np.isfinite(a * b).sum()),
        "clients_won_on_seed_mean": int(won.sum()),
        "clients": int(won.size),
      }
    return out

  def verdict(per_metric):
    wins = [v["clients_won_on_seed_mean"] == v["clients"] for v in per_metric.values()]
    return "supported" if all(wins) else ("mixed" if any(wins) else "not supported")

  if ref_cut in cuts and big_t in cuts:
    res = versus("collafuse", ref_cut, "collafuse", big_t)
    claims["beats_local_only"] = {
      "cut": ref_cut,
      **res,
      "verdict": verdict(res),
      "rule": "lower FID and KID than local-only for every client (mean over seeds)",
    }
  eq = {str(c): versus("collafuse", c, "client_from_noise", c) for c in mids}
  claims["beats_equal_compute_client_only"] = {
    "per_cut": eq,
    "verdict": "supported"
    if eq and all(verdict(v) == "supported" for v in eq.values())
    else ("not supported" if all(verdict(v) == "not supported" for v in eq.values()) else "mixed"),
    "rule": "at every 0 < cut_point < T, lower FID and KID than the client's own network from "
    "noise with cut_point steps, for every client (mean over seeds)",
  }
  if 0 in cuts and mids:
    zero = table["cuts"]["0"]
    first = table["cuts"][str(mids[0])]
    jump = {}
    for src in ("handoff", "server_alone"):
      for m in ("fid", "nn_distance"):
        a = zero[f"disclosure/{src}/{m}"]["mean"]
        b = first[f"disclosure/{src}/{m}"]["mean"]
        jump[f"{src}/{m}"] = {"cut0": a, f"cut{mids[0]}": b, "ratio": b / a if a else float("inf")}
    claims["disclosure_drops_when_cut_positive"] = {
      "distances": jump,
      "verdict": "supported" if all(v["ratio"] > 2.0 for v in jump.values()) else "not supported",
      "rule": "every server-side distance at the first cut > 0 is more than twice its cut-0 value",
    }
  calls = {
    str(c): table["cuts"][str(c)]["costs"].get("client_network_calls_per_image") for c in cuts
  }
  claims["client_flops_scale_with_cut"] = {
    "client_network_calls_per_image": calls,
    "verdict": "supported"
    if all(v == c for c, v in zip(cuts, calls.values(), strict=True) if v is not None)
    else "not supported",
  }
  errs = {}
  for c in cuts:
    m = table["cuts"][str(c)]["cut_mse/measured"]["mean"]
    a = table["cuts"][str(c)]["cut_mse/analytic"]["mean"]
    errs[str(c)] = {"measured": m, "analytic": a, "relative_error": abs(m - a) / a if a else abs(m)}
  claims["cut_mse_matches_analytic"] = {
    "per_cut": errs,
    "verdict": "supported"
    if all(v["relative_error"] < 0.05 for v in errs.values())
    else "not supported",
    "rule": "relative error < 5% (sampling error of one noise draw over a client's images)",
  }
  return claims


# --- reports -----------------------------------------------------------------------------------
def _pm(d: dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
  if not d or d.get("n", 0) == 0:
    return "-"
  return f"{d['mean'] * scale:.{digits}f} ± {d['std'] * scale:.{digits}f}"


def write_markdown(path: str, summary: dict[str, Any], big_t: int, command: str) -> None:
  t = summary["table"]
  lines = [
    "# CollaFuse sweep",
    "",
    f"Seeds {summary['seeds']}, {summary['num_clients']} clients; mean over clients, then mean ± std "
    "over seeds. Quality is against each client's held-out data (lower FID/KID is better); "
    "disclosure distances are against each client's training data (higher = less disclosed). "
    f"Cut {big_t} is local-only training. Regenerate: `{command}`.",
    "",
    "## Quality and client cost",
    "",
    "| cut_point | CollaFuse FID | CollaFuse KID | label acc | client-from-noise FID | "
    "client-from-noise KID | client calls / image | client inference MFLOPs / image | "
    "client train MFLOPs / step | uplink B / client step | downlink B / image |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for cut, row in t["cuts"].items():
    costs = row["costs"]
    name = f"{cut} (local-only)" if int(cut) == big_t else cut
    lines.append(
      f"| {name} | {_pm(row['collafuse/fid'])} | {_pm(row['collafuse/kid_mean'])} | "
      f"{_pm(row['collafuse/label_accuracy'], 1, 3)} | {_pm(row['client_from_noise/fid'])} | "
      f"{_pm(row['client_from_noise/kid_mean'])} | "
      f"{costs.get('client_network_calls_per_image', '-')} | "
      f"{costs.get('client_inference_flops_per_image', float('nan')) / 1e6:.2f} | "
      f"{costs.get('client_train_flops_per_step', float('nan')) / 1e6:.1f} | "
      f"{costs.get('uplink_bytes_per_client_step', '-')} | {costs.get('downlink_bytes_per_image', '-')} |"
    )
  c = t["centralized"]
  if c and c["fid"]["n"]:
    lines.append(
      f"| centralized | {_pm(c['fid'])} | {_pm(c['kid_mean'])} | {_pm(c['label_accuracy'], 1, 3)} "
      "| - | - | - | - | - | - | - |"
    )
  lines += [
    "",
    "## Disclosure (server-side images vs the client's training images)",
    "",
    "| cut_point | cut images FID | cut images NN dist | cut images pixel MSE | measured / "
    "analytic MSE(x_cut, x0) | hand-off FID | hand-off NN dist | server-alone FID | server-alone NN dist "
    "| server-alone pixel MSE |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for cut, row in t["cuts"].items():

    def d(src, m, row=row):
      return row[f"disclosure/{src}/{m}"]

    lines.append(
      f"| {cut} | {_pm(d('cut_images', 'fid'))} | {_pm(d('cut_images', 'nn_distance'), 1, 3)} | "
      f"{_pm(d('cut_images', 'pixel_mse'), 1, 3)} | {row['cut_mse/measured']['mean']:.4f} / "
      f"{row['cut_mse/analytic']['mean']:.4f} | {_pm(d('handoff', 'fid'))} | "
      f"{_pm(d('handoff', 'nn_distance'), 1, 3)} | {_pm(d('server_alone', 'fid'))} | "
      f"{_pm(d('server_alone', 'nn_distance'), 1, 3)} | {_pm(d('server_alone', 'pixel_mse'), 1, 3)} |"
    )
  lines += ["", "## Per client (KID, mean over seeds)", ""]
  k = summary["num_clients"]
  lines.append("| arm | " + " | ".join(f"client {i}" for i in range(k)) + " |")
  lines.append("|---|" + "---|" * k)
  for cut, row in t["cuts"].items():
    vals = row["collafuse/kid_mean/per_client"]
    lines.append(f"| CollaFuse cut_point={cut} | " + " | ".join(_f(v) for v in vals) + " |")
  if c and c["fid"]["n"]:
    lines.append("| centralized | " + " | ".join(_f(v) for v in c["kid_mean/per_client"]) + " |")
  lines += ["", "## Claims", ""]
  for name, claim in summary["claims"].items():
    details = json.dumps({k: v for k, v in claim.items() if k != "verdict"})
    lines.append(f"- **{name}**: {claim['verdict']}. `{details}`")
  fileio.write_text(path, "\n".join(lines) + "\n")


def _f(v, scale=1.0) -> str:
  return "-" if v is None else f"{v * scale:.2f}"


def write_plot(path: str, summary: dict[str, Any], big_t: int) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  t = summary["table"]
  cuts = [int(c) for c in t["cuts"]]
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  panels = [
    (axes[0], "collafuse/fid", "CollaFuse FID vs client held-out (lower better)"),
    (
      axes[1],
      "disclosure/server_alone/fid",
      "server-alone FID vs client train (higher = less disclosed)",
    ),
    (axes[2], "disclosure/handoff/nn_distance", "hand-off NN distance to client train (RMS px)"),
  ]
  for ax, key, title in panels:
    per_client = np.array(
      [[np.nan if v is None else v for v in t["cuts"][str(c)][f"{key}/per_client"]] for c in cuts]
    )
    for k in range(per_client.shape[1]):
      ax.plot(cuts, per_client[:, k], "-", lw=0.9, alpha=0.6, label=f"client {k}")
    mean = [t["cuts"][str(c)][key]["mean"] for c in cuts]
    std = [t["cuts"][str(c)][key]["std"] for c in cuts]
    ax.errorbar(cuts, mean, yerr=std, color="k", lw=2.2, capsize=3, label="mean ± std (seeds)")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("cut_point (client steps)")
    ax.grid(alpha=0.3)
  cfn = [t["cuts"][str(c)]["client_from_noise/fid"]["mean"] for c in cuts]
  axes[0].plot(cuts, cfn, "k--", lw=1.5, label="client from noise (equal compute)")
  c = t["centralized"]
  if c and c["fid"]["n"]:
    axes[0].axhline(c["fid"]["mean"], color="tab:green", ls=":", lw=2, label="centralized")
  axes[0].set_yscale("log")
  axes[1].set_yscale("log")
  axes[0].legend(fontsize=7)
  fig.suptitle(f"CollaFuse sweep (cut_point={big_t}: local-only), seeds {summary['seeds']}")
  fig.tight_layout()
  fileio.write_figure(fig, path, dpi=110)
