"""hybrid.profile: the sigmoid and linear fits, the PAI formula, and a profile of untrained models
written in the layout hybrid.optimize reads."""

import json
import os

import jax
import numpy as np
import pytest

from common import data
from configs import hybrid as hybrid_configs
from hybrid import method as hmethod
from hybrid import models, profile, system


def test_sigmoid_fit_recovers_the_papers_curve_from_noisy_points():
  n = np.arange(0, 201, 20)
  rng = np.random.default_rng(0)
  y = profile.sigmoid(n, 0.0413, 71.44) + rng.normal(0, 0.01, n.shape)
  fit = profile.fit_sigmoid(n, y, 200)
  assert fit["a"] == pytest.approx(0.0413, rel=0.1)
  assert fit["b"] == pytest.approx(71.44, abs=3)
  assert fit["r2"] > 0.99
  checks = profile.shape_checks(n, profile.sigmoid(n, 0.0413, 71.44), fit, 200)
  assert checks["monotone_fraction"] == 1.0 and checks["saturates_before_T"]
  # A decreasing curve is no S: the checks say so.
  flat = profile.shape_checks(n, -n, profile.fit_sigmoid(n, 1 - n / 200, 200), 200)
  assert flat["monotone_fraction"] == 0.0 and flat["spearman"] == pytest.approx(-1.0)


def test_linear_fit_and_pai_formula():
  b = np.arange(1, 21)
  fit = profile.fit_linear(b, 0.003 * b + 0.01)
  assert fit["k"] == pytest.approx(0.003) and fit["h"] == pytest.approx(0.01)
  assert fit["r2"] == pytest.approx(1.0)
  noisy = profile.fit_linear(b, 0.003 * b + 0.01 + np.where(b % 2, 0.02, -0.02))
  assert noisy["r2"] < 0.95 and noisy["constrained"] == ""
  # Load that hits the large batches only: the free fit's offset is negative (k + h < 0 at B = 1
  # for steeper bursts), so the fit goes through the origin and stays a valid latency profile.
  loaded = profile.fit_linear([1, 2, 3, 4], [0.001, 0.002, 0.030, 0.060])
  free_k, free_h = np.polyfit([1, 2, 3, 4], [0.001, 0.002, 0.030, 0.060], 1)
  assert free_k + free_h < 0
  assert loaded["constrained"] == "h=0" and loaded["h"] == 0.0
  assert loaded["k"] == pytest.approx(np.dot([1, 2, 3, 4], [0.001, 0.002, 0.030, 0.060]) / 30)
  system.LatencyProfile(
    edge_k=loaded["k"], edge_h=loaded["h"], device_k=(0.0,), device_h=(1.0,), device_weights=(1.0,)
  )
  # A falling curve (a burst during B = 1): the best flat line, its mean.
  falling = profile.fit_linear([1, 2, 3, 4], [0.04, 0.03, 0.02, 0.01])
  assert falling == {"k": 0.0, "h": pytest.approx(0.025), "r2": 0.0, "constrained": "k=0"}
  # The paper's index: 3 Sim sigmoid(30 (Diff - 0.1)).
  v = profile.pai([0.3, 0.3], [0.1, 0.2], scale=3.0, sharpness=30.0, d0=0.1)
  np.testing.assert_allclose(v, [0.45, 0.9 / (1 + np.exp(-3.0))])


class _ClassNet:
  """A stand-in feature network: features = the pixels, logits favour bright images as class 1."""

  name, sha256 = "pixels", None

  def features(self, x):
    return np.asarray(x, np.float32).reshape(len(x), -1)

  def logits(self, x):
    m = np.asarray(x, np.float32).reshape(len(x), -1).mean(-1)
    return np.stack([-4 * m, 4 * m] + [np.full_like(m, -9.0)] * 8, axis=-1)


def test_profile_of_untrained_models_is_what_the_optimizer_reads(tmp_path):
  config = hybrid_configs.get_config("tiny")
  method = hmethod.Hybrid(config, data.get_info(config.data))
  abstract = jax.eval_shape(method.init_params, jax.random.PRNGKey(0))
  leaves, tree = jax.tree.flatten(abstract)
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(
    tree, [0.2 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
  )
  m = models.from_params(config, params, programs=method.programs)
  out = profile.profile_models(m, str(tmp_path), net=_ClassNet())
  for name in ("accuracy.json", "accuracy.png", "latency.json", "latency.png", "cut_points.png"):
    assert os.path.getsize(tmp_path / "profile" / name) > 0, name
  acc = out["measured"]["accuracy"]
  assert acc["cut_points"] == [0, 6, 12, 18, 24]
  # n = 0: every user's image of a seed is the cluster model's, so the users cannot differ;
  # at n = T each user's own network made it.
  assert acc["diff"][0] == pytest.approx(0.0, abs=1e-6)
  assert acc["diff"][-1] > 0.05
  mid = (min(acc["diff"]) + max(acc["diff"])) / 2
  assert acc["d0"] == pytest.approx(mid) and acc["d0_rule"] == "midrange"
  np.testing.assert_allclose(
    acc["pai"], profile.pai(acc["sim"], acc["diff"], scale=1.0, sharpness=30.0, d0=mid)
  )
  median = acc["by_d0_rule"]["median"]
  assert median["d0"] == pytest.approx(np.median(acc["diff"]))
  np.testing.assert_allclose(
    median["pai"],
    profile.pai(acc["sim"], acc["diff"], scale=1.0, sharpness=30.0, d0=median["d0"]),
  )
  assert acc["by_d0_rule"]["midrange"]["fit"] == acc["fit"]
  lat = out["measured"]["latency"]
  assert lat["batch_sizes"] == [1, 2, 3, 4] and min(lat["seconds_median"]) > 0
  with open(tmp_path / "profile.json") as f:
    saved = json.load(f)
  assert saved == {k: out[k] for k in ("accuracy", "latency")}
  prof = system.load_profile(str(tmp_path / "profile.json"), m.num_timesteps)
  assert prof.accuracy.a == pytest.approx(acc["fit"]["a"])
  assert prof.latency.edge_k == pytest.approx(lat["fit"]["k"])
  # Device types: the paper's slowdowns over its edge GPU, applied to the measured step.
  paper = system.Profile.paper().latency
  ratio = prof.latency.device_tau / (prof.latency.edge_k + prof.latency.edge_h)
  np.testing.assert_allclose(ratio, paper.device_tau / (paper.edge_k + paper.edge_h), rtol=1e-9)


def test_preference_slopes_follow_the_code_and_floor_a_saturated_curve():
  # The paper's curve: a / 4 and A's slope at T, the code's 0.01 and 0.0002 within 5%.
  lo, hi = profile.alpha_slopes(0.0413, 71.44, 200)
  assert lo == pytest.approx(0.01, rel=0.05) and hi == pytest.approx(0.0002, rel=0.05)
  assert hi == pytest.approx(system.AccuracyProfile().slope(200), rel=0.03)
  # A curve saturated long before T: the slope at T (~1e-16) would draw alphas of ~1e12.
  lo, hi = profile.alpha_slopes(0.2, 34.0, 200)
  assert system.AccuracyProfile(a=0.2, b=34.0).slope(200) < 1e-12
  assert hi == pytest.approx(lo / 50)
