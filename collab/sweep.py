"""The CollaFuse sweep: ``python -m collab.sweep --config=configs/collab.py:digits --workdir=DIR``.

On the same data and seeds it trains and evaluates

* CollaFuse at every cut point of ``--cut_points`` (default 0, 0.1T, 0.2T, 0.4T, 0.7T and T);
* local-only training: the cut-point-T run, where the server owns no step and every client trains
  alone on all T steps of its own data with the same optimizer steps and batch;
* the client run from pure noise with only its t_cut-share of the steps (equal client inference
  compute; drawn from each CollaFuse run's client networks, ``client_from_noise``);
* a centralized model on all clients' data (upper bound): one network, the same architecture,
  optimizer and number of steps, with the K client batches as one batch.

Each client is scored against its own held-out data (FID/KID in the feature network's space, label
accuracy) and the disclosure of its training data is measured for everything the server sees or
can produce (``collab.disclosure``). Writes ``DIR/sweep.json``, ``DIR/sweep.md`` and
``DIR/sweep.png``; every run lives in ``DIR/seed<s>/<arm>`` and is a normal workdir
(``common.eval`` works on it). Re-running the command skips finished training and evaluation and
resumes a run that was cut off.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from common import fileio
from common.metrics import stats


def _define_flags() -> None:
  """Defined only when this module runs as a binary: importing it next to another binary
  (tests, quickstart) must not register a second ``--config``."""
  config_flags.DEFINE_config_file("config", None, "CollaFuse config and preset.")
  flags.DEFINE_string("workdir", None, "Sweep directory.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (config.seed).")
  flags.DEFINE_list(
    "cut_points", [], "Cut points t_cut in [0, T] (default: 0, 0.1T, 0.2T, 0.4T, 0.7T, T)."
  )
  flags.DEFINE_integer("samples_per_client", 200, "Generated images per client and arm.")
  flags.DEFINE_bool("centralized", True, "Also train the centralized upper bound.")
  flags.DEFINE_string("feature_net", "auto", "auto | digits | shapes | inception_v3.")
  flags.DEFINE_string("inception_weights", "", "Local FID InceptionV3 .npz file.")


EVAL_VERSION = 2  # bump when the evaluation below changes, to re-evaluate finished runs


@dataclasses.dataclass
class Run:
  """One training run of the sweep."""

  seed: int
  arm: str  # "cut<t>" or "centralized"
  cut: int | None
  workdir: str
  config: Any


def default_cut_points(num_timesteps: int) -> list[int]:
  return sorted({round(f * num_timesteps) for f in (0.0, 0.1, 0.2, 0.4, 0.7, 1.0)})


def centralized_config(config):
  """One network on all clients' data: the same model, diffusion and optimizer, batch K * B."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.method = "ddpm"
    c.batch_size = config.batch_size * config.num_clients
  return c


def plan(config, workdir: str, seeds: list[int], cuts: list[int], centralized: bool) -> list[Run]:
  """The runs of the sweep, seed-major, so one finished seed already gives a full table."""
  runs = []
  for seed in seeds:
    for cut in cuts:
      c = copy.deepcopy(config)
      with c.unlocked():
        c.seed, c.cut_point = seed, cut
      runs.append(Run(seed, f"cut{cut}", cut, os.path.join(workdir, f"seed{seed}", f"cut{cut}"), c))
    if centralized:
      c = centralized_config(config)
      with c.unlocked():
        c.seed = seed
      runs.append(
        Run(seed, "centralized", None, os.path.join(workdir, f"seed{seed}", "central"), c)
      )
  return runs


def _finished(run: Run) -> bool:
  from common import checkpoint

  path = os.path.join(run.workdir, "checkpoints")
  if not os.path.isdir(path):
    return False
  ckpt = checkpoint.Checkpointer(path)
  try:
    return ckpt.latest_step() == run.config.total_steps
  finally:
    ckpt.close()


# --- evaluation ------------------------------------------------------------------------------
class ClientData:
  """Each client's private training images and held-out test images, with their features."""

  def __init__(self, config, net):
    from collab.method import CollaFuse
    from common import data

    self.partitioner = CollaFuse(config, data.get_info(config.data))
    train_x, _ = data.load_split(config.data, "train")
    test_x, _ = data.load_split(config.data, "test")
    self.train = [train_x[i] for i in self.partitioner.client_indices("train")]
    self.test = [test_x[i] for i in self.partitioner.client_indices("test")]
    self.train_feats = [net.features(x) for x in self.train]
    self.test_feats = [net.features(x) for x in self.test]


def _quality(net, clients: ClientData, k: int, images, labels, seed: int) -> dict[str, float]:
  from common.eval import distribution_metrics

  out = distribution_metrics(clients.test_feats[k], net.features(images), seed)
  if labels is not None and net.logits is not None:
    out["label_accuracy"] = float(np.mean(np.argmax(net.logits(images), -1) == labels))
  return out


def evaluate_collab_run(run: Run, net, clients: ClientData, n: int) -> dict[str, Any]:
  """Per-client quality (CollaFuse and client-from-noise), disclosure and costs of one cut."""
  import jax

  from collab import client as client_lib
  from collab import disclosure
  from common.eval import load_params

  _, method, params, step = load_params(run.workdir)
  rng = jax.random.fold_in(jax.random.PRNGKey(run.seed), 7)
  per_client = []
  for k in range(method.num_clients):
    labels = method.client_labels(k, n, run.seed + 17)
    diag = method.sample_diagnostics(params, k, jax.random.fold_in(rng, k), n, labels)
    entry: dict[str, Any] = {
      "client": k,
      "collafuse": _quality(net, clients, k, diag["generated"], labels, run.seed),
    }
    if "client_from_noise" in diag:
      entry["client_from_noise"] = _quality(
        net, clients, k, diag["client_from_noise"], labels, run.seed
      )
    # What the server sees in training: the client's private images noised to t_cut.
    x0 = clients.train[k]
    noise = np.asarray(jax.random.normal(jax.random.fold_in(rng, 100 + k), x0.shape))
    x_cut = np.asarray(client_lib.cut_image(method.diffusion, x0, noise, method.t_cut))
    disclosed = {
      "cut_images": x_cut,
      "handoff": diag["handoff"],
      "server_alone": diag["server_alone"],
    }
    entry["disclosure"] = {
      name: disclosure.disclosure_metrics(
        images, x0, net.features(images), clients.train_feats[k], run.seed
      )
      for name, images in disclosed.items()
    }
    entry["cut_mse"] = {
      "measured": disclosure.cut_mse_measured(x0, x_cut),
      "analytic": disclosure.cut_mse_analytic(method.diffusion, method.t_cut, x0),
    }
    per_client.append(entry)
    logging.info(
      "  client %d: FID %.2f KID %.4f | server-alone FID %.2f NN %.3f",
      k, entry["collafuse"]["fid"], entry["collafuse"]["kid_mean"],
      entry["disclosure"]["server_alone"]["fid"], entry["disclosure"]["server_alone"]["nn_distance"],
    )  # fmt: skip
  return {
    "checkpoint_step": int(step),
    "clients": per_client,
    "costs": method.cost_description(params),
    "sampling": method.sampling_description(),
  }


def evaluate_centralized_run(run: Run, net, clients: ClientData, n: int) -> dict[str, Any]:
  """Per-client quality of the centralized model, asked for each client's own labels."""
  import jax

  from common.eval import load_params

  _, method, params, step = load_params(run.workdir)
  rng = jax.random.fold_in(jax.random.PRNGKey(run.seed), 7)
  per_client = []
  for k in range(clients.partitioner.num_clients):
    labels = clients.partitioner.client_labels(k, n, run.seed + 17)
    images = method.sample(params, jax.random.fold_in(rng, k), n, labels)
    per_client.append(
      {"client": k, "collafuse": _quality(net, clients, k, images, labels, run.seed)}
    )
  return {
    "checkpoint_step": int(step),
    "clients": per_client,
    "costs": {"flops_per_sample": float(method.flops_per_sample(params))},
  }


# --- aggregation -------------------------------------------------------------------------------
def _get(entry, path):
  for key in path:
    if entry is None or key not in entry:
      return None
    entry = entry[key]
  return entry


def summarize(
  results: dict[str, dict[str, Any]], cuts: list[int], num_timesteps: int, ref_cut: int
):
  """Per-(arm, cut) means over clients, then mean +- std over seeds; and the claims."""
  seeds = sorted({int(key.split("/")[0][4:]) for key in results})
  num_clients = max(len(r["clients"]) for r in results.values())

  def client_curve(arm, path):
    """[seeds, clients] of one metric (NaN where missing)."""
    out = np.full((len(seeds), num_clients), np.nan)
    for i, s in enumerate(seeds):
      r = results.get(f"seed{s}/{arm}")
      if r is None:
        continue
      for c in r["clients"]:
        v = _get(c, path)
        if v is not None:
          out[i, c["client"]] = v
    return out

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
    "rule": "at every 0 < t_cut < T, lower FID and KID than the client's own network from noise "
    "with t_cut steps, for every client (mean over seeds)",
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
    "| t_cut | CollaFuse FID | CollaFuse KID | label acc | client-from-noise FID | "
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
    "| t_cut | cut images FID | cut images NN dist | cut images pixel MSE | measured / analytic "
    "MSE(x_cut, x0) | hand-off FID | hand-off NN dist | server-alone FID | server-alone NN dist "
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
    lines.append(f"| CollaFuse t_cut={cut} | " + " | ".join(_f(v) for v in vals) + " |")
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
    ax.set_xlabel("t_cut (client steps)")
    ax.grid(alpha=0.3)
  cfn = [t["cuts"][str(c)]["client_from_noise/fid"]["mean"] for c in cuts]
  axes[0].plot(cuts, cfn, "k--", lw=1.5, label="client from noise (equal compute)")
  c = t["centralized"]
  if c and c["fid"]["n"]:
    axes[0].axhline(c["fid"]["mean"], color="tab:green", ls=":", lw=2, label="centralized")
  axes[0].set_yscale("log")
  axes[1].set_yscale("log")
  axes[0].legend(fontsize=7)
  fig.suptitle(f"CollaFuse sweep (t_cut={big_t}: local-only), seeds {summary['seeds']}")
  fig.tight_layout()
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110)
  plt.close(fig)


# --- the binary --------------------------------------------------------------------------------
def run_sweep(
  config,
  workdir: str,
  *,
  seeds: list[int],
  cuts: list[int] | None = None,
  samples_per_client: int = 200,
  centralized: bool = True,
  feature_net: str = "auto",
  inception_weights: str = "",
  command: str = "",
) -> dict[str, Any]:
  """Trains, evaluates and reports every run; returns the summary written to sweep.json."""
  from collab.method import validate
  from common import data
  from common.metrics import reference
  from common.train import loop

  big_t = config.diffusion.num_timesteps
  cuts = sorted(set(cuts or default_cut_points(big_t)))
  for c in cuts:
    if not 0 <= c <= big_t:
      from common.train.validate import ConfigError

      raise ConfigError("cut_points", c, f"must be in [0, {big_t}] (diffusion.num_timesteps)")
  validate(config, data.get_info(config.data))
  runs = plan(config, workdir, seeds, cuts, centralized)
  os.makedirs(workdir, exist_ok=True)
  net = reference.load_feature_network(
    reference.resolve_name(feature_net, config.data.name), inception_weights=inception_weights
  )
  clients = ClientData(config, net)
  results: dict[str, dict[str, Any]] = {}
  t_start, trained = time.perf_counter(), 0
  for i, run in enumerate(runs):
    key = f"seed{run.seed}/{run.arm}"
    eval_path = os.path.join(run.workdir, "sweep_eval.json")
    cached = None
    if os.path.exists(eval_path):
      with open(eval_path) as f:
        cached = json.load(f)
      if cached.get("eval_version") != EVAL_VERSION or cached.get("samples") != samples_per_client:
        cached = None
    if cached is not None and _finished(run):
      results[key] = cached
      continue
    elapsed = time.perf_counter() - t_start
    eta = elapsed / trained * (len(runs) - i) if trained else float("nan")
    logging.info(
      "[run %d/%d] %s: train to %d steps (elapsed %.0fs, ETA %s)", i + 1, len(runs), key,
      run.config.total_steps, elapsed, "?" if math.isnan(eta) else f"{eta / 60:.0f}m",
    )  # fmt: skip
    if not _finished(run):
      loop.train(run.config, run.workdir)
      if not _finished(run):  # preempted (SIGTERM): the run saved its state; so do we
        logging.warning("%s stopped before %d steps; run the sweep again to resume", key,
                        run.config.total_steps)  # fmt: skip
        return {}
    logging.info("[run %d/%d] %s: evaluate", i + 1, len(runs), key)
    if run.cut is None:
      res = evaluate_centralized_run(run, net, clients, samples_per_client)
    else:
      res = evaluate_collab_run(run, net, clients, samples_per_client)
    res.update(
      {
        "eval_version": EVAL_VERSION,
        "samples": samples_per_client,
        "seed": run.seed,
        "arm": run.arm,
      }
    )
    fileio.write_json(eval_path, res, indent=1)
    results[key] = res
    trained += 1

  summary = summarize(results, cuts, big_t, int(config.cut_point))
  summary.update(
    {
      "config": json.loads(config.to_json_best_effort()),
      "feature_net": net.name,
      "feature_net_sha256": net.sha256,
      "samples_per_client": samples_per_client,
      "command": command,
      "runs": results,
    }
  )
  fileio.write_json(os.path.join(workdir, "sweep.json"), summary, indent=1)
  write_markdown(os.path.join(workdir, "sweep.md"), summary, big_t, command)
  write_plot(os.path.join(workdir, "sweep.png"), summary, big_t)
  logging.info("wrote %s/sweep.{json,md,png}", workdir)
  return summary


def main(argv):
  del argv
  from common.train import cli
  from common.train.validate import ConfigError

  # Seeds of one cut compile the same programs; a persistent cache compiles them once.
  cli.start_binary(persistent_compile_cache=True)
  try:
    run_sweep(
      flags.FLAGS.config,
      flags.FLAGS.workdir,
      seeds=[int(s) for s in flags.FLAGS.seeds],
      cuts=[int(c) for c in flags.FLAGS.cut_points],
      samples_per_client=flags.FLAGS.samples_per_client,
      centralized=flags.FLAGS.centralized,
      feature_net=flags.FLAGS.feature_net,
      inception_weights=flags.FLAGS.inception_weights,
      command="python -m collab.sweep " + " ".join(sys.argv[1:]),
    )
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  from common.train import cli

  app.run(main, flags_parser=cli.parse_flags_or_exit)
