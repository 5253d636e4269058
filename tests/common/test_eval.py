"""The shared evaluation binaries on tiny trained runs: fields, reproducibility, sanity of scores."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from common import compare
from common import data as data_lib
from common import eval as eval_lib
from common.metrics import fid, reference
from common.train import loop
from tests.common.test_train import REPO, tiny_config

REQUIRED_FIELDS = (
  "fid", "kid_mean", "kid_std", "precision", "recall", "num_samples", "seed", "sampler",
  "sampling_steps", "feature_net", "feature_net_sha256", "reference_statistics", "params",
  "flops_per_sample", "wall_time_per_sample_s", "checkpoint_step", "use_ema", "groups",
)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A digits DDPM trained 150 steps and the same model after 1 step. Batch 32: FID 180 against
  the untrained model's 629 (batch 64 gave 183, in twice the training time)."""
  root = tmp_path_factory.mktemp("runs")
  out = {}
  for name, steps in (("trained", 150), ("untrained", 1)):
    config = tiny_config(**{
      "mesh.data": 1, "total_steps": steps, "ckpt_every_steps": 1000, "log_every_steps": 100,
      "optimizer.learning_rate": 2e-3, "ema_decay": 0.99, "diffusion.num_timesteps": 200,
      "model.channels": (32, 64), "batch_size": 32,
    })  # fmt: skip
    out[name] = str(root / name)
    loop.train(config, out[name], devices=jax.devices()[:1])
  out["ref_dir"] = str(root / "ref_stats")
  return out


def _evaluate(workdir, ref_dir, **kw):
  kw = {"num_samples": 200, "batch_size": 100, "sample_steps": 10, **kw}
  return eval_lib.evaluate(workdir, ref_stats_dir=ref_dir, **kw)


@pytest.mark.slow
def test_eval_writes_every_field_and_is_reproducible(runs):
  first = _evaluate(runs["trained"], runs["ref_dir"])
  with open(os.path.join(runs["trained"], "eval", "metrics.json")) as f:
    written = json.load(f)
  for field in REQUIRED_FIELDS:
    assert field in written, field
  assert os.path.exists(os.path.join(runs["trained"], "eval", "samples.png"))
  assert written["feature_net"] == "digits" and len(written["feature_net_sha256"]) == 64
  assert written["checkpoint_step"] == 150 and written["use_ema"] is True
  assert written["sampler"] == "ddim" and written["sampling_steps"] == 10
  assert written["flops_per_sample"] > 0 and written["params"] > 0
  assert os.path.exists(written["reference_statistics"])
  second = _evaluate(runs["trained"], runs["ref_dir"])
  for key in ("fid", "kid_mean", "kid_std", "precision", "recall"):
    assert first[key] == second[key], key


def test_trained_model_scores_better_than_untrained(runs):
  trained = _evaluate(runs["trained"], runs["ref_dir"])
  untrained = _evaluate(runs["untrained"], runs["ref_dir"])
  assert trained["fid"] < 0.5 * untrained["fid"], (trained["fid"], untrained["fid"])
  assert trained["precision"] > untrained["precision"]


def test_raw_weights_and_flops_scale_with_steps(runs):
  ema = _evaluate(runs["trained"], runs["ref_dir"])
  raw = _evaluate(runs["trained"], runs["ref_dir"], use_ema=False, sample_steps=20)
  assert raw["use_ema"] is False
  assert raw["fid"] != ema["fid"]
  # The whole chain's cost is linear in the number of denoiser calls.
  assert raw["flops_per_sample"] == pytest.approx(2 * ema["flops_per_sample"])


def test_held_out_digits_have_small_fid_and_noise_a_large_one(tmp_path):
  net = reference.load_feature_network("digits")
  cfg = tiny_config().data
  train_feats, _, _ = reference.reference_features(cfg, "train", net, cache_dir=str(tmp_path))
  test_images, _ = data_lib.load_split(cfg, "test")
  noise = np.random.default_rng(0).uniform(-1, 1, test_images.shape).astype(np.float32)
  stats_train = fid.compute_statistics(train_feats)
  held_out = fid.frechet_distance(*stats_train, *fid.compute_statistics(net.features(test_images)))
  noisy = fid.frechet_distance(*stats_train, *fid.compute_statistics(net.features(noise)))
  # 300 held-out images carry a finite-sample FID floor of about 13 on these 128-d features (300
  # *training* images score 26 against all of them), so "small" is relative to noise (~800).
  assert held_out < 20.0, held_out
  assert noisy > 30 * held_out, (held_out, noisy)


def test_compare_writes_table_csv_and_pareto(runs, tmp_path):
  for name in ("trained", "untrained"):
    _evaluate(runs[name], runs["ref_dir"])
  out = str(tmp_path / "report")
  proc = subprocess.run(
    [sys.executable, "-m", "common.compare", f"--workdirs={runs['trained']},{runs['untrained']}",
     f"--out={out}"],
    cwd=REPO, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  md = open(os.path.join(out, "report.md")).read()
  assert "| trained |" in md and "| untrained |" in md
  rows = open(os.path.join(out, "report.csv")).read().strip().splitlines()
  assert len(rows) == 3 and rows[0].startswith("run,")
  assert os.path.getsize(os.path.join(out, "pareto.png")) > 5000
  # A workdir that was never evaluated is named, with the command that fixes it.
  with pytest.raises(FileNotFoundError, match="common.eval"):
    compare.load_runs([str(tmp_path / "never_evaluated")])


def test_conditional_run_reports_per_class_groups_and_label_accuracy(tmp_path):
  config = tiny_config(**{
    "mesh.data": 1, "total_steps": 2, "data.name": "shapes", "data.num_examples": 64,
    "model.class_conditional": True, "diffusion.cond_drop_prob": 0.1,
    "diffusion.guidance_scale": 2.0,
  })  # fmt: skip
  workdir = str(tmp_path / "shapes")
  loop.train(config, workdir, devices=jax.devices()[:1])
  result = _evaluate(workdir, str(tmp_path / "ref"), num_samples=60, batch_size=30, sample_steps=4)
  assert result["feature_net"] == "shapes"
  assert [g["group"] for g in result["groups"]] == list(data_lib.get_info(config.data).class_names)
  assert all(g["num_samples"] == 10 for g in result["groups"])
  assert all(0.0 <= g["label_accuracy"] <= 1.0 for g in result["groups"])
  assert 0.0 <= result["label_accuracy"] <= 1.0
  assert np.isfinite(result["groups"][0]["fid"])
  # Guidance doubles the denoiser calls per step.
  assert result["guidance_scale"] == 2.0
