"""Issue 19 for adaptive.train: every malformed config is one line naming the field, raised before
the workdir is created; the binary exits 2."""

import jax
import pytest

from adaptive import train as adaptive_train
from common.train.validate import ConfigError
from tests.adaptive.test_adaptive_train import pipeline_config
from tests.faults import assert_refused_in_one_line

MALFORMED = [
  ({"adaptive.pruner.beam": 0}, "adaptive.pruner.beam"),
  ({"adaptive.pruner.selection": "l2"}, "adaptive.pruner.selection"),
  ({"adaptive.pruner.proxy_batch": 0}, "adaptive.pruner.proxy_batch"),
  ({"adaptive.pruner.tol": -0.1}, "adaptive.pruner.tol"),
  ({"adaptive.pruner.max_evals_per_round": -1}, "adaptive.pruner.max_evals_per_round"),
  ({"adaptive.grouping.method": "kmeans"}, "adaptive.grouping.method"),
  ({"adaptive.grouping.num_groups": 0}, "adaptive.grouping.num_groups"),
  ({"adaptive.grouping.clip_lo_db": 30.0}, "adaptive.grouping.clip_lo_db"),
  ({"adaptive.scaling.full_model_end": "middle"}, "adaptive.scaling.full_model_end"),
  ({"adaptive.scaling.rank_from": 2}, "adaptive.scaling.rank_from"),
  ({"adaptive.base_step": -3}, "adaptive.base_step"),
  ({"adaptive.stage2_steps": -2}, "adaptive.stage2_steps"),
  ({"adaptive.base_workdir": "/nonexistent/run"}, "adaptive.base_workdir"),
  ({"batch_size": 0}, "batch_size"),
  ({"optimizer.learning_rate": -1.0}, "optimizer.learning_rate"),
  ({"data.name": "bogus"}, "data.name"),
  ({"diffusion.sampler": "euler"}, "diffusion.sampler"),
]


@pytest.mark.parametrize("overrides,field", MALFORMED, ids=[f for _, f in MALFORMED])
def test_malformed_configs_are_refused_before_anything_is_written(tmp_path, overrides, field):
  config = pipeline_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=f"^config error: {field}=") as err:
    adaptive_train.run(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  assert "\n" not in str(err.value)
  assert not (tmp_path / "run").exists()


def test_binary_exits_2_with_one_line(tmp_path):
  workdir = tmp_path / "run"
  assert_refused_in_one_line(
    "adaptive.train",
    "--config=configs/adaptive.py:digits",
    "--config.adaptive.pruner.beam=0",
    f"--workdir={workdir}",
    starts="config error: adaptive.pruner.beam=0:",
    workdir=workdir,
  )
