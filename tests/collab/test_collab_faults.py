"""Issue 19 for collab.train: every malformed config is one line naming the field, raised before
the workdir is created; the binary exits 2."""

import json

import jax
import ml_collections
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
  ({"collab.num_clients": 0}, "collab.num_clients"),
  ({"collab.cut_point": -1}, "collab.cut_point"),
  ({"collab.server_noising": "half"}, "collab.server_noising"),
  ({"collab.server_sampling_chain": "local"}, "collab.server_sampling_chain"),
  ({"collab.client_start_offset": "paper"}, "collab.client_start_offset"),
  ({"collab.client_loop": "loop"}, "collab.client_loop"),
  ({"collab.partition": "random"}, "collab.partition"),
  ({"collab.classes_per_client": 0}, "collab.classes_per_client"),
  ({"collab.partition": "dirichlet", "collab.dirichlet_alpha": 0.0}, "collab.dirichlet_alpha"),
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
    "--config.collab.classes_per_client=0",
    f"--workdir={workdir}",
    starts="config error: collab.classes_per_client=0:",
    workdir=workdir,
  )


def test_old_command_line_names_the_new_field(tmp_path):
  # Issue 21 moved CollaFuse's fields under collab.*: the old spelling gets the new one in one line.
  workdir = tmp_path / "run"
  assert_refused_in_one_line(
    "collab.train",
    "--config=configs/collab.py:digits",
    "--config.cut_point=10",
    f"--workdir={workdir}",
    starts="error: --config.cut_point is now --config.collab.cut_point",
    workdir=workdir,
  )
  assert set(collab_configs.RENAMED) == set(collab_configs.get_config("digits").collab)


def _old_layout(config: dict) -> dict:
  """A config as runs saved it before issue 21: CollaFuse's fields at the top level."""
  old = {k: v for k, v in config.items() if k != "collab"}
  old.update(config["collab"])
  return old


@pytest.mark.slow
def test_a_run_saved_before_the_rename_evaluates_and_resumes(tmp_path):
  from collab import fields
  from common.eval import load_params
  from tests.collab.test_collab import tiny

  workdir = str(tmp_path / "old")
  loop.train(tiny(total_steps=2), workdir, devices=jax.devices()[:1])
  path = tmp_path / "old" / "config.json"
  path.write_text(json.dumps(_old_layout(json.loads(path.read_text())), indent=2))
  # Read by common.eval: the method reads either layout (collab.fields.upgrade).
  config, method, _, step = load_params(workdir)
  assert "collab" not in config and step == 2
  assert (method.cut_point, method.num_clients) == (8, 2)
  assert method.config.collab.client_mesh_axis == "data"
  # Resumed by today's command line: collab.train's run trains on in the layout the run was
  # saved with (here on one device, as it trained).
  resumed = fields.in_layout_of(tiny(), workdir)
  assert "cut_point" in resumed and "collab" not in resumed
  state = loop.train(resumed, workdir, devices=jax.devices()[:1])
  assert int(state.step) == 4
  assert "collab" not in json.loads(path.read_text())


def test_upgrade_fills_the_fields_old_runs_predate():
  from collab import fields
  from tests.collab.test_collab import tiny

  old = _old_layout(tiny().to_dict())
  del old["client_mesh_axis"], old["server_sampling_chain"]
  new = fields.upgrade(ml_collections.ConfigDict(old))
  assert new.collab.client_mesh_axis == "" and new.collab.server_sampling_chain == "global"
  assert new.collab.cut_point == 8 and "cut_point" not in new
