"""Issue 19 for collab.train: every malformed config is one line naming the field, raised before
the workdir is created; the binary exits 2."""

import jax
import pytest

from common.train import loop
from common.train.validate import ConfigError
from configs import collab as collab_configs
from tests.faults import assert_refused_in_one_line


def _config(**overrides):
  c = collab_configs.get_config("digits")
  c.update_from_flattened_dict(overrides)
  return c


MALFORMED = [
  ({"num_clients": 0}, "num_clients"),
  ({"cut_point": -1}, "cut_point"),
  ({"server_noising": "half"}, "server_noising"),
  ({"server_sampling_chain": "local"}, "server_sampling_chain"),
  ({"client_start_offset": "paper"}, "client_start_offset"),
  ({"client_loop": "scan"}, "client_loop"),
  ({"partition": "random"}, "partition"),
  ({"classes_per_client": 0}, "classes_per_client"),
  ({"partition": "dirichlet", "dirichlet_alpha": 0.0}, "dirichlet_alpha"),
  ({"diffusion.loss": "hybrid"}, "diffusion.loss"),
  ({"batch_size": -1}, "batch_size"),
  ({"total_steps": 0}, "total_steps"),
  ({"ema_decay": 1.0}, "ema_decay"),
]


@pytest.mark.parametrize("overrides,field", MALFORMED, ids=[f for _, f in MALFORMED])
def test_malformed_configs_are_refused_before_anything_is_written(tmp_path, overrides, field):
  # collab.train's run is the shared loop (common.train.__main__.run) on all devices; one here.
  with pytest.raises(ConfigError, match=f"^config error: {field}=") as err:
    loop.train(_config(**overrides), str(tmp_path / "run"), devices=jax.devices()[:1])
  assert "\n" not in str(err.value)
  assert not (tmp_path / "run").exists()


def test_binary_exits_2_with_one_line(tmp_path):
  workdir = tmp_path / "run"
  assert_refused_in_one_line(
    "collab.train",
    "--config=configs/collab.py:digits",
    "--config.classes_per_client=0",
    f"--workdir={workdir}",
    starts="config error: classes_per_client=0:",
    workdir=workdir,
  )
