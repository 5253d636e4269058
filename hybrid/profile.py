"""Measured profiles of a hybrid run: ``python -m hybrid.profile --workdir=runs/hybrid``.

Accuracy (spec §3, §11 A). For every cut point n of ``hybrid.profile.cut_points`` and every seed s
(shared by all users, so user images of one seed start from the same noise and share the edge
half), each user's image is ``hybrid_sample`` at cut point n. With the dataset's feature classifier
(``common.metrics.feature_nets``) standing in for CLIP and LPIPS:

* Sim(n)  = mean over users and seeds of P(class = the user's subject class), the identity
  probability (CLIP similarity to "a photo of <breed>" in the paper);
* Diff(n) = mean over user pairs and seeds of the feature distance between the two users' images
  of one seed, divided by the mean feature distance between real train images of the two users'
  classes (inter-user LPIPS in the paper; the division puts it on LPIPS' 0..1 scale);
* PAI_raw(n) = scale Sim(n) sigmoid(sharpness (Diff(n) - d0)) (the paper: 3 Sim sigmoid(30 (Diff
  - 0.1)); its 3 maps CLIP cosines of ~0.33 to ~1, our Sim is a probability already, so
  ``pai_scale`` = 1 whatever U is). d0 (``hybrid.profile.d0``) is the middle of Diff's range by
  default; the spec's median of Diff over the cut points is the other rule, and both are reported:
  where Diff saturates early (digits) the median lies on the plateau, the sigmoid factor is then
  ~1/2 at n = T and PAI_raw stops at half the scale, which no sigmoid with asymptote 1 fits;

and ``A(n) = 1 / (1 + exp(-a (n - b)))`` is fitted to PAI_raw by damped Gauss-Newton
(Levenberg-Marquardt from the best point of a coarse grid).

Latency (spec §4, §11 B). One batched step of the cluster-wide model (the network call and the
update, ``hybrid.models.Programs.step``) is timed for every B of ``hybrid.profile.batch_sizes``
(``block_until_ready``, median of ``latency_repeats`` after two warm-up calls) and
``tau(B) = k B + h`` fitted by least squares, with R^2.

Preference bounds: ``profile.json`` also carries the slopes the simulator draws each user's
accuracy preference alpha between (``alpha_slopes``).

Device heterogeneity follows the spec's simulator: device types are slowdown factors over the
measured edge step, the paper's device rows 3..10 relative to its edge GPU row 0 (written into
``profile.json`` as ``latency.device_slowdowns``), drawn with weights ``linspace(1, 2)``.

Writes ``DIR/profile/accuracy.json`` (+ ``.png``, and ``cut_points.png``: the images per cut_point),
``DIR/profile/latency.json`` (+ ``.png``) and ``DIR/profile.json`` in ``hybrid.system``'s layout,
for ``python -m hybrid.optimize --config=configs/hybrid.py:sim
--config.scheduler.profile=DIR/profile.json``. The figures are drawn by ``hybrid.profile_figures``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from common import fileio
from hybrid import models as models_lib
from hybrid import system
from hybrid.profile_figures import save_accuracy_png, save_cut_points_png, save_latency_png
from hybrid.system import sigmoid

PROFILE_DIR = "profile"
PROFILE_JSON = "profile.json"


# ------------------------------------------------------------------------------------------------
# Fits.


def fit_sigmoid(n, y, num_steps: int, iters: int = 200) -> dict[str, float]:
  """Least-squares ``(a, b)`` of ``A(n)`` to points ``(n, y)``; Levenberg-Marquardt.

  Args:
    n, y: [M] cut points and values.
    num_steps: T (scales the starting grid: a in [0.1, 40] / T, b in [0, T]).

  Returns:
    {"a", "b", "r2", "rmse"}.
  """
  n = np.asarray(n, np.float64)
  y = np.asarray(y, np.float64)
  if n.shape != y.shape or n.ndim != 1 or len(n) < 2:
    raise ValueError(f"fit_sigmoid needs two 1-D arrays of >= 2 points, got {n.shape}, {y.shape}")

  def sse(a, b):
    return float(np.sum((sigmoid(n, a, b) - y) ** 2))

  grid = [(a, b) for a in np.geomspace(0.1, 40, 40) / num_steps for b in np.linspace(0, 1, 41)]
  a, b = min(((a, b * num_steps) for a, b in grid), key=lambda p: sse(*p))
  lam, cur = 1e-3, sse(a, b)
  for _ in range(iters):
    s = sigmoid(n, a, b)
    r = s - y
    ds = s * (1 - s)
    jac = np.stack([ds * (n - b), -ds * a], axis=1)
    g = jac.T @ r
    h = jac.T @ jac
    try:
      step = np.linalg.solve(h + lam * np.diag(np.diag(h) + 1e-12), -g)
    except np.linalg.LinAlgError:
      break
    a_new, b_new = a + step[0], b + step[1]
    new = sse(a_new, b_new) if a_new > 0 else np.inf
    if new < cur:
      a, b, cur, lam = a_new, b_new, new, lam / 3
      if np.max(np.abs(step) / (np.abs([a, b]) + 1e-9)) < 1e-10:
        break
    else:
      lam *= 4
      if lam > 1e12:
        break
  total = float(np.sum((y - y.mean()) ** 2))
  return {
    "a": float(a),
    "b": float(b),
    "r2": float(1 - cur / total) if total > 0 else float("nan"),
    "rmse": float(np.sqrt(cur / len(n))),
  }


def fit_linear(x, y) -> dict[str, float]:
  """Least squares ``y = k x + h`` with ``k, h >= 0``; returns {"k", "h", "r2", "constrained"}.

  A step's latency cannot fall with the batch nor be negative at B = 0, but the free fit of a few
  noisy medians can say so (on a loaded machine it gave k + h <= 0, which ``LatencyProfile``
  refuses). With two unknowns the constrained optimum is the free fit when that is feasible, else
  the better of the two one-parameter fits on the boundary (h = 0, or k = 0).
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  design = np.stack([x, np.ones_like(x)], axis=1)

  def sse(k, h):
    return float(np.sum((design @ np.array([k, h]) - y) ** 2))

  (k, h), *_ = np.linalg.lstsq(design, y, rcond=None)
  constrained = ""
  if k < 0 or h < 0:
    through_origin = (max(float(x @ y) / float(x @ x), 0.0), 0.0)
    flat = (0.0, max(float(y.mean()), 0.0))
    (k, h), constrained = min(((through_origin, "h=0"), (flat, "k=0")), key=lambda c: sse(*c[0]))
  total = float(np.sum((y - y.mean()) ** 2))
  return {
    "k": float(k),
    "h": float(h),
    "r2": float(1 - sse(k, h) / total) if total > 0 else 1.0,
    "constrained": constrained,
  }


def pai(sim, diff, *, scale: float, sharpness: float, d0: float) -> np.ndarray:
  """PAI_raw = scale Sim sigmoid(sharpness (Diff - d0)) (spec §3), elementwise."""
  sim = np.asarray(sim, np.float64)
  diff = np.asarray(diff, np.float64)
  return scale * sim / (1.0 + np.exp(-sharpness * (diff - d0)))


D0_RULES = ("midrange", "median")


def threshold(diff, rule) -> float:
  """d0 of the PAI: ``median`` of Diff over the cut points (spec §11 A), ``midrange`` (the middle
  of Diff's range), or a number."""
  diff = np.asarray(diff, np.float64)
  if isinstance(rule, int | float) and not isinstance(rule, bool):
    return float(rule)
  if rule == "median":
    return float(np.median(diff))
  if rule == "midrange":
    return float((diff.min() + diff.max()) / 2)
  raise ValueError(f"hybrid.profile.d0={rule!r}: allowed: midrange, median or a number")


def shape_checks(n, values, fit: dict[str, float], num_steps: int) -> dict[str, Any]:
  """Is the measured curve a monotone S that saturates before T? (claim E4)"""
  values = np.asarray(values, np.float64)
  steps = np.diff(values)
  # Sampling noise on a saturated plateau (~1e-4 here) is no dip.
  tol = 1e-3 * float(np.max(np.abs(values))) if len(values) else 0.0
  a, b = fit["a"], fit["b"]
  return {
    "monotone_fraction": float(np.mean(steps >= -tol)) if len(steps) else 1.0,
    "monotone_tolerance": tol,
    "spearman": float(_spearman(np.asarray(n, np.float64), values)),
    "A_at_0": float(sigmoid(0, a, b)),
    "A_at_T": float(sigmoid(num_steps, a, b)),
    "b_over_T": float(b / num_steps),
    "n_at_A_0.95": float(b + np.log(19.0) / a),
    "saturates_before_T": bool(b + np.log(19.0) / a < num_steps),
  }


def _spearman(x, y) -> float:
  rx = np.argsort(np.argsort(x)).astype(np.float64)
  ry = np.argsort(np.argsort(y)).astype(np.float64)
  if rx.std() == 0 or ry.std() == 0:
    return float("nan")
  return float(np.corrcoef(rx, ry)[0, 1])


# ------------------------------------------------------------------------------------------------
# Measurements.


def _feature_network(config):
  from common.metrics import reference

  return reference.load_feature_network(reference.resolve_name("auto", config.data.name))


def reference_distance(config, net, classes) -> float:
  """Mean feature distance between real train images of two different users' classes."""
  from common import data

  x, y = data.load_split(config.data, "train")
  feats = [np.asarray(net.features(x[y == c]), np.float64) for c in classes]
  dists = []
  for i in range(len(classes)):
    for j in range(i + 1, len(classes)):
      d = np.linalg.norm(feats[i][:, None, :] - feats[j][None, :, :], axis=-1)
      dists.append(d.mean())
  return float(np.mean(dists))


def sample_cut_points(models, cut_points, seeds: int, seed: int, batch_size: int) -> np.ndarray:
  """Hybrid samples [len(cut_points), U, seeds, H, W, C]; seed s gives every user the same key."""
  keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), 7), seeds)
  x_t = models_lib.initial_noise(models, keys)
  out = np.zeros((len(cut_points), models.num_users, seeds, *models.image_shape), np.float32)
  for i, n in enumerate(cut_points):
    for lo in range(0, seeds, batch_size):
      sl = slice(lo, min(seeds, lo + batch_size))
      b = sl.stop - sl.start
      x_n = models_lib.edge_denoise(models, x_t[sl], np.full((b,), n, np.int32), keys[sl])
      for u in range(models.num_users):
        x0 = models_lib.device_denoise(models, u, x_n, np.full((b,), n, np.int32), keys[sl])
        out[i, u, sl] = np.asarray(x0)
  return out


def accuracy_profile(models, *, net=None, seed: int = 0) -> dict[str, Any]:
  """The PAI sweep of the module docstring and its sigmoid fit (plus the images, unsaved)."""
  config = models.config
  p = config.hybrid.profile
  big_t = models.num_timesteps
  u_count = models.num_users
  if u_count < 2:
    raise ValueError("the accuracy profile compares users' images: needs hybrid.num_users >= 2")
  classes = [int(c) for c in config.hybrid.user_classes]
  cut_points = [int(n) for n in p.cut_points]
  if any(not 0 <= n <= big_t for n in cut_points) or len(cut_points) < 2:
    raise ValueError(
      f"hybrid.profile.cut_points must be >= 2 points in [0, {big_t}], got {cut_points}"
    )
  net = net or _feature_network(config)
  seeds = int(p.seeds_per_user)
  t0 = time.perf_counter()
  images = sample_cut_points(models, cut_points, seeds, seed, int(p.batch_size))
  sample_s = time.perf_counter() - t0
  flat = images.reshape(-1, *models.image_shape)
  logits = np.asarray(net.logits(flat), np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True)).reshape(len(cut_points), u_count, seeds, -1)
  feats = np.asarray(net.features(flat), np.float64).reshape(len(cut_points), u_count, seeds, -1)
  ref = reference_distance(config, net, classes)
  sim_user = np.stack([probs[:, u, :, c].mean(-1) for u, c in enumerate(classes)], axis=1)
  hit_user = np.stack(
    [(probs[:, u].argmax(-1) == c).mean(-1) for u, c in enumerate(classes)], axis=1
  )
  pair_d = [
    np.linalg.norm(feats[:, u] - feats[:, v], axis=-1).mean(-1)
    for u in range(u_count)
    for v in range(u + 1, u_count)
  ]
  diff = np.mean(pair_d, axis=0) / ref
  sim = sim_user.mean(1)
  scale, sharpness = float(p.pai_scale), float(p.diff_sharpness)
  # Both threshold rules, so the choice can be judged from one sweep.
  alternatives = {}
  for rule in D0_RULES:
    d0_rule = threshold(diff, rule)
    v = pai(sim, diff, scale=scale, sharpness=sharpness, d0=d0_rule)
    alternatives[rule] = {
      "d0": d0_rule,
      "pai": v.tolist(),
      "fit": fit_sigmoid(cut_points, v, big_t),
    }
  d0 = threshold(diff, p.get("d0", "midrange"))
  values = pai(sim, diff, scale=scale, sharpness=sharpness, d0=d0)
  fit = fit_sigmoid(cut_points, values, big_t)
  return {
    "cut_points": cut_points,
    "num_timesteps": big_t,
    "seeds_per_user": seeds,
    "users": [{"user": u, "class": c} for u, c in enumerate(classes)],
    "sim": sim.tolist(),
    "sim_per_user": sim_user.tolist(),
    "identity_accuracy_per_user": hit_user.tolist(),
    "diff": diff.tolist(),
    "diff_reference_distance": ref,
    "d0": d0,
    "d0_rule": p.get("d0", "midrange"),
    "pai_scale": float(p.pai_scale),
    "diff_sharpness": float(p.diff_sharpness),
    "pai": values.tolist(),
    "fit": fit,
    "checks": shape_checks(cut_points, values, fit, big_t),
    "by_d0_rule": alternatives,
    "feature_net": getattr(net, "name", "custom"),
    "feature_net_sha256": getattr(net, "sha256", None),
    "checkpoint_step": int(models.step),
    "sampling_seconds": sample_s,
    "_images": images,
  }


def latency_profile(models, *, seed: int = 0) -> dict[str, Any]:
  """Per-step latency (s) of the batched cluster-wide step for each B and its linear fit."""
  p = models.config.hybrid.profile
  sizes = [int(b) for b in p.batch_sizes]
  repeats = int(p.latency_repeats)
  if len(sizes) < 2 or min(sizes) < 1 or repeats < 1:
    raise ValueError(
      f"hybrid.profile: need >= 2 batch sizes >= 1 and latency_repeats >= 1, got {sizes}, {repeats}"
    )
  step = models.programs.step
  level = jnp.int32(models.num_timesteps)
  inputs = {}
  for b in sizes:
    keys = jax.random.split(jax.random.PRNGKey(seed), b)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (b, *models.image_shape), jnp.float32)
    inputs[b] = (x, keys)
    for _ in range(2):  # compile and warm up
      jax.block_until_ready(step(models.cluster_params, x, level, keys))
  # Round robin over B: on a shared machine a burst of load then hits every batch size alike
  # instead of biasing the few measured during it.
  times = {b: [] for b in sizes}
  for _ in range(repeats):
    for b in sizes:
      x, keys = inputs[b]
      t0 = time.perf_counter()
      jax.block_until_ready(step(models.cluster_params, x, level, keys))
      times[b].append(time.perf_counter() - t0)
  medians = [statistics.median(times[b]) for b in sizes]
  spreads = [[float(v) for v in np.percentile(times[b], [25, 75])] for b in sizes]
  fit = fit_linear(sizes, medians)
  dev = jax.devices()[0]
  return {
    "batch_sizes": sizes,
    "seconds_median": medians,
    "seconds_iqr": spreads,
    "repeats": repeats,
    "fit": fit,
    "unit": "s",
    "device": f"{dev.platform}:{dev.device_kind}",
  }


def paper_device_slowdowns() -> list[float]:
  """The paper's device step latencies over its edge GPU's batch-1 step (rows 3..10 / row 0)."""
  lat = system.Profile.paper().latency
  return [float(v) for v in lat.device_tau / (lat.edge_k + lat.edge_h)]


# The paper's preference bounds 0.01 and 0.0002 (spec §5): the upper slope is 1/50 of the lower.
PAPER_ALPHA_SLOPE_RATIO = 0.0002 / 0.01


def alpha_slopes(a: float, b: float, num_steps: int) -> tuple[float, float]:
  """``(alpha_lo_slope, alpha_hi_slope)`` of the preference draw for a measured sigmoid.

  The code's rule (A's largest slope a / 4, and its slope at T) unless the curve is saturated at
  T: a slope of ~1e-16 there would draw preferences of ~1e12 seconds-equivalent, so the upper
  slope is floored at the paper's ratio of its two constants (a / 4 / 50; for the paper's own
  curve the two rules agree to 1%).
  """
  lo = a / 4.0
  at_t = float(system.AccuracyProfile(a=a, b=b).slope(num_steps))
  return lo, max(at_t, lo * PAPER_ALPHA_SLOPE_RATIO)


def profile_dict(
  accuracy: dict[str, Any], latency: dict[str, Any], num_steps: int
) -> dict[str, Any]:
  """The ``hybrid.system.Profile.from_dict`` layout of a measured profile."""
  a, b = accuracy["fit"]["a"], accuracy["fit"]["b"]
  lo, hi = alpha_slopes(a, b, num_steps)
  return {
    "accuracy": {"a": a, "b": b, "alpha_lo_slope": lo, "alpha_hi_slope": hi},
    "latency": {
      "k": latency["fit"]["k"],
      "h": latency["fit"]["h"],
      "unit": "s",
      "device_slowdowns": paper_device_slowdowns(),
    },
  }


# ------------------------------------------------------------------------------------------------
# The binary.


def profile_models(models, out_dir: str, *, net=None, seed: int = 0) -> dict[str, Any]:
  """Measures both profiles of ``models`` and writes every output under ``out_dir``.

  ``out_dir/profile/{accuracy,latency}.{json,png}``, ``out_dir/profile/cut_points.png`` and
  ``out_dir/profile.json``. Returns the ``profile.json`` dict with both measurements.
  """
  prof_dir = os.path.join(out_dir, PROFILE_DIR)
  os.makedirs(prof_dir, exist_ok=True)
  acc = accuracy_profile(models, net=net, seed=seed)
  logging.info(
    "accuracy: a=%.4f b=%.2f (R2 %.3f) in %.0f s",
    acc["fit"]["a"],
    acc["fit"]["b"],
    acc["fit"]["r2"],
    acc["sampling_seconds"],
  )
  save_cut_points_png(os.path.join(prof_dir, "cut_points.png"), acc)
  acc = {k: v for k, v in acc.items() if not k.startswith("_")}
  lat = latency_profile(models, seed=seed)
  fit = lat["fit"]
  logging.info(
    "latency: k=%.3g s h=%.3g s (R2 %.4f)%s",
    fit["k"],
    fit["h"],
    fit["r2"],
    f" (free fit negative: held at {fit['constrained']})" if fit["constrained"] else "",
  )
  for name, obj in (("accuracy", acc), ("latency", lat)):
    fileio.write_json(os.path.join(prof_dir, f"{name}.json"), obj, indent=1)
  save_accuracy_png(os.path.join(prof_dir, "accuracy.png"), acc)
  save_latency_png(os.path.join(prof_dir, "latency.png"), lat)
  prof = profile_dict(acc, lat, models.num_timesteps)
  # The optimizer's reader must accept it: fail here rather than in hybrid.optimize.
  system.Profile.from_dict(prof, models.num_timesteps)
  fileio.write_json(os.path.join(out_dir, PROFILE_JSON), prof, indent=1)
  return {**prof, "measured": {"accuracy": acc, "latency": lat}}


def rewrite(workdir: str) -> dict[str, Any]:
  """``profile.json`` and the figures again from the saved ``profile/*.json``, measuring nothing."""
  prof_dir = os.path.join(workdir, PROFILE_DIR)
  with open(os.path.join(prof_dir, "accuracy.json")) as f:
    acc = json.load(f)
  if "splits" in acc:  # measured before the cut point got one name (issue 21)
    acc["cut_points"] = acc.pop("splits")
  with open(os.path.join(prof_dir, "latency.json")) as f:
    lat = json.load(f)
  save_accuracy_png(os.path.join(prof_dir, "accuracy.png"), acc)
  save_latency_png(os.path.join(prof_dir, "latency.png"), lat)
  prof = profile_dict(acc, lat, int(acc["num_timesteps"]))
  system.Profile.from_dict(prof, int(acc["num_timesteps"]))
  fileio.write_json(os.path.join(workdir, PROFILE_JSON), prof, indent=1)
  return {**prof, "measured": {"accuracy": acc, "latency": lat}}


def run(workdir: str, *, seed: int = 0, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """Loads the finished run in ``workdir`` and profiles it (``overrides``: hybrid.profile.*)."""
  models = models_lib.load_run(workdir)
  if overrides:
    with models.config.unlocked():
      for k, v in overrides.items():
        models.config.hybrid.profile[k] = v
  return profile_models(models, workdir, seed=seed)


def _define_flags() -> dict[str, Any]:
  """Defined only when this module runs as a binary (see ``common.eval``)."""
  return {
    "workdir": flags.DEFINE_string("workdir", None, "A finished hybrid.train run directory."),
    "seed": flags.DEFINE_integer("seed", 0, "Sampling seed."),
    "seeds_per_user": flags.DEFINE_integer(
      "seeds_per_user", 0, "Override hybrid.profile.seeds_per_user."
    ),
    "latency_repeats": flags.DEFINE_integer(
      "latency_repeats", 0, "Override hybrid.profile.latency_repeats."
    ),
    "rewrite_only": flags.DEFINE_bool(
      "rewrite_only", False, "Rewrite profile.json and the PNGs from the saved measurements."
    ),
  }


def main(argv, flag_values):
  del argv
  from common.train import cli

  cli.start_binary()
  overrides = {
    name: flag_values[name].value
    for name in ("seeds_per_user", "latency_repeats")
    if flag_values[name].value > 0
  }
  workdir = flag_values["workdir"].value
  try:
    if flag_values["rewrite_only"].value:
      out = rewrite(workdir)
    else:
      out = run(workdir, seed=flag_values["seed"].value, overrides=overrides)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(2)
  print(json.dumps({k: v for k, v in out.items() if k != "measured"}, indent=1))


if __name__ == "__main__":
  _flags = _define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(lambda argv: main(argv, _flags))
