"""adaptive.train end to end on a tiny config: stage 1, grouping, pruning, stage 2, resume."""

import json
import os

import jax
import numpy as np
import pytest

from adaptive import inheritance, method, search_space, stages
from adaptive import train as adaptive_train
from common import eval as eval_lib
from common.train.validate import ConfigError
from tests.adaptive.test_tdc import tiny


def pipeline_config(**overrides):
  c = tiny(adaptive__group_models=[], adaptive__cuts=[], model__norm_group_size=4)
  c.total_steps = 10
  c.log_every_steps = 1
  c.ckpt_every_steps = 2
  c.keep_checkpoints = 10
  c.num_sample_images = 0  # no end-of-run grids: the evaluations draw their own samples
  a = c.adaptive
  a.stage1_frac = 0.2
  a.grouping.method = "uniform_t"
  a.grouping.num_groups = 2
  a.pruner.proxy_steps = 1
  a.pruner.proxy_batch = 4
  a.pruner.proxy_eval_examples = 8
  a.pruner.max_rounds = 3
  a.pruner.max_evals_per_round = 2
  c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
  return c


def _logged_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


@pytest.mark.slow
def test_pipeline_prunes_to_budget_inherits_and_resumes_mid_stage_two(tmp_path):
  workdir = str(tmp_path / "run")
  config = pipeline_config(adaptive__stage2_steps=2)
  one_device = jax.devices()[:1]  # the loop on 8 devices is tests/common's; here it only costs
  first = adaptive_train.run(config, workdir, devices=one_device)

  # Stage 1 trained the base model for stage1_frac * B steps in workdir/stage1.
  assert first["stage1_steps"] == 2
  assert os.path.isdir(os.path.join(workdir, "stage1", "checkpoints", "2"))
  # Budgets: group 0 (high SNR) keeps the full network, group 1 gets (1/2 + k/2) F = 0.75 F.
  g0, g1 = first["groups"]
  assert g0["structure"] == search_space.base_structure(config.model).to_dict()
  assert g0["proxy_evaluations"] == 0
  assert g1["target_flops"] == pytest.approx(0.75 * g0["flops"])
  assert abs(g1["flops"] / g1["target_flops"] - 1) <= config.adaptive.pruner.tol
  assert g1["proxy_evaluations"] >= 1 and len(g1["proxy_scores_per_round"]) >= 1
  assert first["sampling_flops_ratio"] < 1.0
  assert set(first["heldout"]) >= {"groups", "l_simple", "vlb_bpd"}
  assert os.path.exists(os.path.join(workdir, "summary.png"))

  # The stage-2 run is what common.eval reads: TDC with the pruned structure per group, and its
  # step-0 checkpoint holds the base weights each group inherited.
  run_config, tdc, _, _ = eval_lib.load_params(workdir)
  assert isinstance(tdc, method.TDC) and run_config.adaptive.budget_steps == 10
  _, _, start, _ = eval_lib.load_params(workdir, step=0, use_ema=False)
  _, _, base, _ = eval_lib.load_params(os.path.join(workdir, "stage1"), step=2)
  expect = inheritance.inherit_weights(
    base, config.model, search_space.Structure.from_dict(g1["structure"]), image_size=8
  )
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(start["group1"]),
    jax.tree.leaves(expect),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))

  # "Killed" after stage-2 step 2 of 4: the same command continues from step 2, without pruning
  # again and without rewriting the inherited start.
  pruning_file = os.path.join(workdir, "pruning", "group1.json")
  mtime = os.path.getmtime(pruning_file)
  second = adaptive_train.run(
    pipeline_config(adaptive__stage2_steps=4), workdir, devices=one_device
  )
  assert os.path.getmtime(pruning_file) == mtime
  assert second["groups"][1]["structure"] == g1["structure"]
  assert _logged_steps(workdir) == [1, 2, 3, 4]
  assert second["stage2_steps"] == 4


def test_stage_two_budget_is_what_the_single_model_leaves():
  config = pipeline_config()
  pruned = [{"base_flops": 100.0, "flops": 100.0}, {"base_flops": 100.0, "flops": 60.0}]
  # (B - S1) * F / sum F_g = (10 - 2) * 100 / 160 = 5 steps.
  assert stages.stage2_steps(config, 2, pruned) == 5
  config.adaptive.stage2_steps = 7
  assert stages.stage2_steps(config, 2, pruned) == 7


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"adaptive.grouping.num_groups": 50}, "num_groups"),  # N > T = 20
    ({"adaptive.stage1_frac": 1.5}, "stage1_frac"),
    ({"total_steps": -1}, "total_steps"),  # not a 1-step stage 1
    ({"adaptive.scaling.k": 0.0}, "k must be in"),
    ({"adaptive.scaling.k": 1.5}, "k must be in"),
    ({"adaptive.scaling.k": 0.01, "adaptive.scaling.rank_from": 0}, "below the smallest"),
    ({"adaptive.pruner.name": "gpt4"}, "pruner.name"),
    ({"adaptive.stage2_ema_decay": 1.0}, "stage2_ema_decay"),
  ],
)
def test_bad_pipeline_config_is_refused_before_training(tmp_path, overrides, message):
  config = pipeline_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=message):
    adaptive_train.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "stage1")


def test_stage_two_takes_its_own_ema_decay_when_given():
  config = pipeline_config()
  groups = stages.make_groups(config)
  base = search_space.base_structure(config.model).to_dict()
  pruned = [{"structure": base}] * int(config.adaptive.grouping.num_groups)
  assert stages.stage2_config(config, groups, pruned, 5, 1.0).ema_decay == config.ema_decay
  config.adaptive.stage2_ema_decay = 0.9
  assert stages.stage2_config(config, groups, pruned, 5, 1.0).ema_decay == 0.9
  # A config saved before the field (a run resumed or re-scored): stage 2 on the run's decay.
  old = pipeline_config()
  with old.unlocked():
    del old.adaptive["stage2_ema_decay"]
  assert stages.stage2_config(old, groups, pruned, 5, 1.0).ema_decay == old.ema_decay
