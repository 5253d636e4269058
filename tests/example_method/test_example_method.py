"""The example method (``tests/example_method``) through the whole method contract: selected by
``config.method``, trained by ``common.train``, evaluated by ``common.eval`` and added to the
quickstart by one plan fragment, with nothing in ``common/`` changed for it."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from common import quickstart
from common.train.validate import ConfigError
from configs import quickstart as plan_config
from tests.example_method import config as p2_config
from tests.example_method import method as p2


def example_fragment(p: plan_config.Preset) -> dict:
  """What adding the method to the quickstart takes: this function in ``FRAGMENTS``."""
  preset = p.pick(default="digits", tiny="tiny")
  return {
    "train_p2": p.train(
      "common.train",
      "p2",
      f"tests/example_method/config.py:{preset}",
      steps=p.pick(default=600, tiny=4),
      estimate_s=p.pick(default=70, tiny=15),
    ),
    "p2": p.eval("p2", ("train_p2",), section="p2", label="P2-weighted v-DDPM", baseline="ddpm"),
  }


def test_p2_weights_are_one_lambda_for_every_parameterization():
  t = jnp.arange(0, 1000, 50, dtype=jnp.int32)
  weights = {}
  for param in ("eps", "x0", "v"):
    d = p2.P2Diffusion(**vars(p2.GaussianDiffusion.create("cosine", 1000, parameterization=param)))
    weights[param] = np.asarray(d.loss_weight(t))
  snr = np.asarray(d.snr(t))
  lam = (1.0 + snr) ** -1.0
  # lambda_t on the eps-MSE, whatever the network predicts (eps-MSE = SNR x0-MSE
  # = SNR / (SNR + 1) v-MSE).
  np.testing.assert_allclose(weights["eps"], lam, rtol=1e-6)
  np.testing.assert_allclose(weights["x0"] / snr, lam, rtol=1e-5)
  np.testing.assert_allclose(weights["v"] * (snr + 1.0) / snr, lam, rtol=1e-5)
  # gamma = 0: the baseline's L_simple.
  base = p2.GaussianDiffusion.create("cosine", 1000)
  flat = p2.P2Diffusion(**vars(base), p2_gamma=0.0)
  np.testing.assert_array_equal(flat.loss_weight(t), base.loss_weight(t))


def test_a_bad_p2_field_is_a_config_error():
  config = p2_config.get_config("tiny")
  config.p2.gamma = -1.0
  with pytest.raises(ConfigError, match="config error: p2.gamma=-1.0: must be >= 0"):
    p2.METHOD(config, None)


def test_one_fragment_adds_the_method_to_the_plan(tmp_path):
  lines = []
  config = plan_config.plan("tiny", (*plan_config.FRAGMENTS, example_fragment))
  quickstart.run_plan(config, str(tmp_path / "qs"), echo=lines.append, dry_run=True)
  n = len(quickstart.enabled_entries(plan_config.get_config("tiny"))) + 2
  assert lines[-2].startswith(f"[{n - 1}/{n}] train_p2 (~0m15s): python -m common.train ")
  assert "--config=tests/example_method/config.py:tiny" in lines[-2]
  assert lines[-1].startswith(f"[{n}/{n}] p2 (~0m08s): python -m common.eval ")
  assert f"--workdir={tmp_path}/qs/p2 --num_samples=16" in lines[-1]
  assert "p2" not in plan_config.get_config("tiny").runs  # the real plan stays as it is
  with pytest.raises(ValueError, match="two fragments define the run 'train_p2'"):
    plan_config.plan("tiny", (example_fragment, example_fragment))


@pytest.mark.slow
def test_the_fragment_trains_and_evaluates_the_method(tmp_path):
  # The fragment alone: `python -m common.train --config=tests/example_method/config.py:tiny`,
  # then `python -m common.eval --num_samples=16`, then the comparison.
  workdir = tmp_path / "qs"
  lines = []
  result = quickstart.run_plan(
    plan_config.plan("tiny", (example_fragment,)), str(workdir), echo=lines.append
  )
  assert result["ok"], "\n".join(lines)
  with open(workdir / "p2" / "config.json") as f:
    assert json.load(f)["method"] == "tests.example_method"
  with open(workdir / "p2" / "eval" / "metrics.json") as f:
    metrics = json.load(f)
  assert metrics["num_samples"] == 16 and math.isfinite(metrics["fid"])
  assert os.path.getsize(workdir / "p2" / "eval" / "samples.png") > 0
  assert "| p2 | p2 | P2-weighted v-DDPM | fid" in (workdir / "report.md").read_text()
