"""Evaluates any method's run: ``python -m common.eval --workdir=runs/ddpm``.

Loads the run's resolved config and a checkpoint (EMA weights unless ``--use_ema=false``), draws
``--num_samples`` samples through the method's own hook (``Method.eval_batches``: per-client
sampling for collab, group-routed sampling for adaptive, ...), and writes

* ``<workdir>/eval/metrics.json``: FID, KID (mean, std), precision, recall, label accuracy for
  class-conditional runs, the same per group (class / client / user), and everything needed to
  reproduce them (seed, sampler, steps and their grid, ``timestep_spacing``, feature network and
  its sha256, reference file, checkpoint step, params, FLOPs per sample over the whole chain, wall
  time per sample);
* ``<workdir>/eval/samples.png``: a labelled grid (one class or group per row).

The feature network is the dataset's own classifier for the embedded datasets (weights committed
in ``common/metrics/weights``) and the FID InceptionV3 for real datasets, loaded from the local file
given by ``--inception_weights`` (never downloaded).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, NamedTuple

import numpy as np
from absl import app, flags, logging

from common import fileio


def _define_flags() -> dict[str, Any]:
  """The binary's flags, defined only when it runs, so that importing this module as a library
  (``distribution_metrics``, ``load_params``) next to another binary's flags is safe."""
  return {
    "workdir": flags.DEFINE_string(
      "workdir", None, "Run directory written by any training binary."
    ),
    "use_ema": flags.DEFINE_bool(
      "use_ema", True, "Evaluate the EMA weights (else the raw weights)."
    ),
    "num_samples": flags.DEFINE_integer("num_samples", 1000, "Samples to draw."),
    "seed": flags.DEFINE_integer("seed", 0, "Sampling seed."),
    "sampler": flags.DEFINE_enum(
      "sampler", "", ["", "ddpm", "ddim"], "Override the run's sampler."
    ),
    "sample_steps": flags.DEFINE_integer("sample_steps", 0, "Override the run's sampling steps."),
    # uniform: IDDPM's "N" (t = T-1 included); ddim: the DDIM paper's grid, IDDPM's "ddimN".
    "timestep_spacing": flags.DEFINE_enum(
      "timestep_spacing", "", ["", "uniform", "ddim"], "Override the run's sampling grid."
    ),
    "batch_size": flags.DEFINE_integer("batch_size", 250, "Samples per sampling call."),
    "feature_net": flags.DEFINE_string(
      "feature_net", "auto", "auto | digits | shapes | inception_v3 (auto: by dataset)."
    ),
    "inception_weights": flags.DEFINE_string(
      "inception_weights", "", "Local FID InceptionV3 .npz."
    ),
    "ref_split": flags.DEFINE_string(
      "ref_split", "", "Real split to compare against (default: the method's, test for collab)."
    ),
    "ref_stats_dir": flags.DEFINE_string("ref_stats_dir", "", "Reference statistics cache dir."),
    "ref_max_examples": flags.DEFINE_integer("ref_max_examples", 0, "Cap on reference images."),
    "step": flags.DEFINE_integer("step", -1, "Checkpoint step to evaluate (-1: the latest)."),
    "out_name": flags.DEFINE_string(
      "out_name", "eval", "Folder under the workdir for metrics.json and samples.png."
    ),
  }


_KID_SUBSETS = 100
_PR_K = 3


def _fmt_eta(seconds: float) -> str:
  m, s = divmod(int(max(seconds, 0)), 60)
  return f"{m}m{s:02d}s"


def load_params(workdir: str, *, use_ema: bool = True, step: int = -1):
  """Restores a run's method and parameters on one device.

  Returns:
    (config, method, params, checkpoint step).
  """
  import jax

  from common import checkpoint
  from common.train import loop

  config = loop.load_config(workdir)
  # Evaluation runs on one device whatever mesh (and process count) the run trained on; this
  # process's own, so that each process of a multi-process job can load a run by itself.
  config.mesh.data, config.mesh.fsdp, config.mesh.model = 1, 1, 1
  devices = jax.local_devices()[:1]
  mesh, method = loop.setup(config, devices=devices)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = ckpt.latest_step() if step < 0 else step
    if step is None:
      raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint to evaluate")
    if step not in ckpt.all_steps():
      raise FileNotFoundError(f"no checkpoint {step} in {workdir}/checkpoints: {ckpt.all_steps()}")
    fns = loop.build(config, method, mesh)
    state = ckpt.restore(step, fns["abstract_state"])
  finally:
    ckpt.close()
  return config, method, (state.ema_params if use_ema else state.params), step


def distribution_metrics(real: np.ndarray, fake: np.ndarray, seed: int) -> dict[str, float]:
  """FID, KID (mean, std), precision and recall (k=3) between two feature sets [N, D], [M, D]."""
  from common.metrics import fid, kid
  from common.metrics import precision_recall as pr

  mu_r, sigma_r = fid.compute_statistics(real)
  mu_f, sigma_f = fid.compute_statistics(fake)
  subset = min(1000, len(real), len(fake))
  kid_mean, kid_std = kid.kernel_inception_distance(
    real, fake, num_subsets=_KID_SUBSETS, subset_size=subset, seed=seed
  )
  precision, recall = pr.precision_recall(real, fake, k=_PR_K)
  return {
    "fid": float(fid.frechet_distance(mu_r, sigma_r, mu_f, sigma_f)),
    "kid_mean": float(kid_mean),
    "kid_std": float(kid_std),
    "precision": float(precision),
    "recall": float(recall),
  }


class _Loaded(NamedTuple):
  """The run as evaluated."""

  config: Any  # ml_collections.ConfigDict, with the sampler overrides applied
  method: Any  # common.train.method.Method
  params: Any  # the EMA or raw weights, on one device
  checkpoint_step: int
  use_ema: bool


class _Reference(NamedTuple):
  """The real images' features the samples are scored against."""

  feats: np.ndarray  # [N, D] float
  labels: np.ndarray | None  # [N] int, per reference image
  path: str  # the cached statistics file
  split: str


class _Samples(NamedTuple):
  """What ``Method.eval_batches`` drew, concatenated over its batches."""

  images: np.ndarray  # [N, H, W, C] float32 in [-1, 1]
  labels: np.ndarray | None  # [N] int, the class each sample was drawn for
  groups: np.ndarray | None  # [N] int, the group (class / client / user) of each sample
  wall_per_sample: float  # seconds, warm-up (compilation) excluded


def evaluate(
  workdir: str,
  *,
  use_ema: bool = True,
  num_samples: int = 1000,
  seed: int = 0,
  sampler: str = "",
  sample_steps: int = 0,
  timestep_spacing: str = "",
  batch_size: int = 250,
  feature_net: str = "auto",
  inception_weights: str = "",
  ref_split: str = "",
  ref_stats_dir: str = "",
  ref_max_examples: int = 0,
  step: int = -1,
  out_name: str = "eval",
) -> dict[str, Any]:
  """Runs the evaluation described in the module docstring; returns what it writes.

  ``out_name`` is the folder under ``workdir`` the metrics and grid go to, so a second
  evaluation (the raw weights, another step, the other grid) does not overwrite the first.
  ``sampler``, ``sample_steps`` and ``timestep_spacing`` override the run's (empty / 0: its own).
  """
  from common.metrics import reference

  if num_samples < 2:
    raise ValueError(f"num_samples={num_samples}: need at least 2 samples for FID")
  run = _load_for_eval(
    workdir, use_ema=use_ema, step=step, sampler=sampler, sample_steps=sample_steps,
    timestep_spacing=timestep_spacing,
  )  # fmt: skip
  config, method = run.config, run.method
  ref_split = ref_split or method.default_ref_split
  net_name = reference.resolve_name(feature_net, config.data.name)
  net = reference.load_feature_network(net_name, inception_weights=inception_weights)
  ref = _Reference(
    *reference.reference_features(
      config.data,
      ref_split,
      net,
      cache_dir=ref_stats_dir or None,
      max_examples=ref_max_examples or None,
    ),
    split=ref_split,
  )

  drawn = _sample(method, run.params, seed=seed, num_samples=num_samples, batch_size=batch_size)
  names = method.eval_group_names()
  result, per_group = _metrics(method, net, ref, drawn, names, seed)
  result.update(_run_record(workdir, run, net, ref, drawn, num_samples=num_samples, seed=seed))
  result["groups"] = per_group
  _write(os.path.join(workdir, out_name), result, drawn, names)
  return result


def _load_for_eval(
  workdir: str, *, use_ema: bool, step: int, sampler: str, sample_steps: int, timestep_spacing: str
) -> _Loaded:
  """``load_params``, with the method rebuilt when the sampler, its steps or its grid are
  overridden (checked like the run's own: a DDIM grid needs a stride giving the steps)."""
  config, method, params, ckpt_step = load_params(workdir, use_ema=use_ema, step=step)
  if sampler or sample_steps or timestep_spacing:
    if sampler:
      config.diffusion.sampler = sampler
    if sample_steps:
      config.diffusion.sample_steps = sample_steps
    if timestep_spacing:
      config.diffusion.timestep_spacing = timestep_spacing
    from common.train.method import load_method
    from common.train.validate import validate_sampler

    validate_sampler(config)
    method = load_method(config, method.data_info)
  return _Loaded(config, method, params, ckpt_step, use_ema)


def _sample(method, params, *, seed: int, num_samples: int, batch_size: int) -> _Samples:
  """Draws ``num_samples`` through ``method.eval_batches``, logging progress and ETA.

  A warm-up call first draws (and compiles) one batch, so the timing is steady state.
  """
  import jax

  rng = jax.random.fold_in(jax.random.PRNGKey(seed), 2024)
  first = min(batch_size, num_samples)
  next(iter(method.eval_batches(params, rng, first, batch_size)))
  samples, labels, groups = [], [], []
  t0 = time.perf_counter()
  for images, lab, grp in method.eval_batches(params, rng, num_samples, batch_size):
    samples.append(np.asarray(images, np.float32))
    labels.append(lab)
    groups.append(grp)
    done = sum(len(s) for s in samples)
    rate = done / max(time.perf_counter() - t0, 1e-9)
    logging.info(
      "sampled %d/%d | %.1f samples/s | ETA %s", done, num_samples, rate,
      _fmt_eta((num_samples - done) / rate),
    )  # fmt: skip
  wall_per_sample = (time.perf_counter() - t0) / num_samples
  return _Samples(
    images=np.concatenate(samples),
    labels=None if labels[0] is None else np.concatenate(labels),
    groups=None if groups[0] is None else np.concatenate(groups),
    wall_per_sample=wall_per_sample,
  )


def _metrics(
  method, net, ref: _Reference, drawn: _Samples, names, seed: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """The sample-quality metrics: totals, label accuracy, per group.

  Returns:
    (FID, KID, precision, recall and, where the feature network classifies the run's classes,
    ``label_accuracy``; one entry per group of ``names``, empty without groups).
  """
  fake_feats = net.features(drawn.images)
  result: dict[str, Any] = distribution_metrics(ref.feats, fake_feats, seed)
  use_label_acc = (
    drawn.labels is not None
    and net.logits is not None
    and net.num_classes == method.data_info.num_classes
  )
  predicted = np.argmax(net.logits(drawn.images), axis=-1) if use_label_acc else None
  if use_label_acc:
    result["label_accuracy"] = float(np.mean(predicted == drawn.labels))
  per_group = []
  if drawn.groups is not None and names is not None:
    for g, name in enumerate(names):
      per_group.append(_group_metrics(method, g, name, ref, drawn, fake_feats, predicted, seed))
  return result, per_group


def _group_metrics(
  method, g: int, name, ref: _Reference, drawn: _Samples, fake_feats, predicted, seed: int
) -> dict[str, Any]:
  """One group's entry: its sample count, its distribution metrics against the group's own
  reference images (when both sides have enough for k-NN precision/recall) and label accuracy."""
  mask = drawn.groups == g
  ref_idx = method.eval_group_reference(g, ref.labels, ref.split)
  entry: dict[str, Any] = {"group": name, "num_samples": int(mask.sum())}
  if mask.sum() >= 2 and len(ref_idx) >= _PR_K + 2 and mask.sum() >= _PR_K + 2:
    entry.update(distribution_metrics(ref.feats[ref_idx], fake_feats[mask], seed))
  if predicted is not None and mask.any():
    entry["label_accuracy"] = float(np.mean(predicted[mask] == drawn.labels[mask]))
  return entry


def _run_record(
  workdir: str, run: _Loaded, net, ref: _Reference, drawn: _Samples, *, num_samples: int, seed: int
) -> dict[str, Any]:
  """Everything needed to reproduce the metrics: the run, checkpoint, sampler, feature network,
  reference, and the costs (params, FLOPs per sample over the whole chain, wall time)."""
  import jax

  from common.metrics import flops as flops_lib

  config, method, params = run.config, run.method, run.params
  return {
    "method": config.method,
    "workdir": os.path.abspath(workdir),
    "dataset": config.data.name,
    "resolution": int(method.data_info.resolution),
    "checkpoint_step": int(run.checkpoint_step),
    "use_ema": bool(run.use_ema),
    "num_samples": int(num_samples),
    "seed": int(seed),
    **method.sampling_description(),
    "feature_net": net.name,
    "feature_net_sha256": net.sha256,
    "feature_net_weights": net.weights_path,
    "reference_statistics": ref.path,
    "reference_split": ref.split,
    "reference_count": int(len(ref.feats)),
    "kid_subsets": _KID_SUBSETS,
    "pr_k": _PR_K,
    "params": int(flops_lib.count_params(params)),
    "flops_per_sample": float(method.flops_per_sample(params)),
    **method.cost_description(params),
    "wall_time_per_sample_s": float(drawn.wall_per_sample),
    "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
  }


def _write(out_dir: str, result: dict[str, Any], drawn: _Samples, names) -> None:
  """``metrics.json`` and ``samples.png`` under ``out_dir``, then the headline log line."""
  os.makedirs(out_dir, exist_ok=True)
  fileio.write_json(os.path.join(out_dir, "metrics.json"), result, sort_keys=True)
  _save_grid(os.path.join(out_dir, "samples.png"), drawn.images, drawn.groups, names)
  logging.info(
    "FID %.3f | KID %.4f +- %.4f | precision %.3f | recall %.3f -> %s",
    result["fid"], result["kid_mean"], result["kid_std"], result["precision"], result["recall"],
    os.path.join(out_dir, "metrics.json"),
  )  # fmt: skip


def _save_grid(path, samples, groups, names, per_row: int = 10) -> None:
  from common import images as images_lib

  if groups is None or names is None:
    n = min(len(samples), 100)
    images_lib.save_grid(path, samples[:n])
    return
  rows, row_names = [], []
  for g, name in enumerate(names):
    idx = np.flatnonzero(groups == g)[:per_row]
    if len(idx) == 0:
      continue
    row = samples[idx]
    if len(idx) < per_row:  # pad short rows with blank (white) cells to keep the grid aligned
      row = np.concatenate([row, np.ones((per_row - len(idx), *samples.shape[1:]), np.float32)])
    rows.append(row)
    row_names.append(str(name))
  images_lib.save_grid(path, np.concatenate(rows), ncols=per_row, row_labels=row_names)


def main(argv, flag_values):
  del argv
  from common.train import cli
  from common.train.validate import ConfigError

  cli.start_binary()
  try:
    evaluate(**{name: flag.value for name, flag in flag_values.items()})
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _flags = _define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(lambda argv: main(argv, _flags))
