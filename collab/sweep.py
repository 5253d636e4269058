"""The CollaFuse sweep: ``python -m collab.sweep --config=configs/collab.py:digits --workdir=DIR``.

On the same data and seeds it trains and evaluates

* CollaFuse at every cut point of ``--cut_points`` (default 0, 0.1T, 0.2T, 0.4T, 0.7T and T);
* local-only training: the cut-point-T run, where the server owns no step and every client trains
  alone on all T steps of its own data with the same optimizer steps and batch;
* the client run from pure noise with only its cut_point-share of the steps (equal client inference
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

from collab import sweep_report
from common import fileio


def _define_flags() -> None:
  """Defined only when this module runs as a binary: importing it next to another binary
  (tests, quickstart) must not register a second ``--config``."""
  config_flags.DEFINE_config_file("config", None, "CollaFuse config and preset.")
  flags.DEFINE_string("workdir", None, "Sweep directory.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (config.seed).")
  flags.DEFINE_list(
    "cut_points", [], "Cut points in [0, T] (default: 0, 0.1T, 0.2T, 0.4T, 0.7T, T)."
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
    c.batch_size = config.batch_size * config.collab.num_clients
  return c


def plan(config, workdir: str, seeds: list[int], cuts: list[int], centralized: bool) -> list[Run]:
  """The runs of the sweep, seed-major, so one finished seed already gives a full table."""
  runs = []
  for seed in seeds:
    for cut in cuts:
      c = copy.deepcopy(config)
      with c.unlocked():
        c.seed, c.collab.cut_point = seed, cut
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
    # What the server sees in training: the client's private images noised to cut_point.
    x0 = clients.train[k]
    noise = np.asarray(jax.random.normal(jax.random.fold_in(rng, 100 + k), x0.shape))
    x_cut = np.asarray(client_lib.cut_image(method.diffusion, x0, noise, method.cut_point))
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
      "analytic": disclosure.cut_mse_analytic(method.diffusion, method.cut_point, x0),
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


# --- the binary --------------------------------------------------------------------------------
def _check_grids(runs: list[Run]) -> None:
  """Every cut's sampling, diagnostics included, on the configured grid before anything trains:
  on the DDIM grid a cut must be one of its levels and the client from pure noise needs a stride
  giving its share of the steps (``ConfigError`` naming ``diffusion.timestep_spacing``)."""
  from collab.method import CollaFuse
  from common import data
  from common.train.method import timestep_spacing

  for run in runs:
    if run.cut is not None and timestep_spacing(run.config) == "ddim":
      CollaFuse(run.config, data.get_info(run.config.data)).check_client_from_noise()


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
  from collab import fields
  from common import data
  from common.metrics import reference
  from common.train import loop

  big_t = config.diffusion.num_timesteps
  cuts = sorted(set(cuts or default_cut_points(big_t)))
  for c in cuts:
    if not 0 <= c <= big_t:
      from common.train.validate import ConfigError

      raise ConfigError("cut_points", c, f"must be in [0, {big_t}] (diffusion.num_timesteps)")
  fields.validate(config, data.get_info(config.data))
  runs = plan(config, workdir, seeds, cuts, centralized)
  _check_grids(runs)
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
      loop.train(fields.in_layout_of(run.config, run.workdir), run.workdir)
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

  summary = sweep_report.summarize(results, cuts, big_t, int(config.collab.cut_point))
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
  sweep_report.write_markdown(os.path.join(workdir, "sweep.md"), summary, big_t, command)
  sweep_report.write_plot(os.path.join(workdir, "sweep.png"), summary, big_t)
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
  from collab import fields

  fields.exit_if_renamed(sys.argv)
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  from common.train import cli

  app.run(main, flags_parser=cli.parse_flags_or_exit)
