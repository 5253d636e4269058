"""Issue 19 for mobile.train: every malformed config is one line naming the field, raised before
the workdir is created (the binary's exit 2 and single stderr line: ``test_method.py``)."""

import jax
import pytest

from common.train import loop
from common.train.validate import ConfigError
from tests.mobile.test_method import tiny_config

MALFORMED = [
  ({"optimizer.schedule": "step"}, "optimizer.schedule"),
  ({"optimizer.schedule": "cosine", "optimizer.warmup_steps": 2}, "optimizer.warmup_steps"),
  ({"model.layer_loop": "vmap"}, "model.layer_loop"),
  ({"model.dropout": 0.1}, "model.dropout"),
  ({"model.depth": 0}, "model.depth"),
  ({"model.width": 30, "model.num_heads": 4}, "model.num_heads"),
  ({"model.upsample": "bilinear"}, "model.upsample"),
  ({"model.stride": 3}, "data.resolution"),
  ({"total_steps": 0}, "total_steps"),
  ({"batch_size": 0}, "batch_size"),
  ({"diffusion.sample_steps": 500}, "diffusion.sample_steps"),
]


@pytest.mark.parametrize("overrides,field", MALFORMED, ids=[f for _, f in MALFORMED])
def test_malformed_configs_are_refused_before_anything_is_written(tmp_path, overrides, field):
  # mobile.train's run is the shared loop (common.train.__main__.run); on one device here.
  with pytest.raises(ConfigError, match=f"^config error: {field}=") as err:
    loop.train(tiny_config(**overrides), str(tmp_path / "run"), devices=jax.devices()[:1])
  assert "\n" not in str(err.value)
  assert not (tmp_path / "run").exists()
