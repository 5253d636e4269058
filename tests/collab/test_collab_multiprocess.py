"""CollaFuse with its clients spread over 2 real processes (one CPU device each): the same
losses as one process x 2 devices, process 0 alone writing the run's files."""

import os

import pytest

from tests.common.test_train import read_losses
from tests.multiprocess import LEARN, assert_same_losses, finish, launch, run_files

# 2 clients of 5 digit classes each, 8 images per client: 16 rows a step, so each of 2 processes
# reads one client's partition whole (tests/collab/test_sweep.py checks which rows it reads), and
# with mesh.data=2 the clients' parameters are split over the data axis too (client_mesh_axis).
COLLAB = [
  "--config=configs/collab.py:digits",
  "--config.collab.num_clients=2",
  "--config.collab.classes_per_client=5",
  "--config.collab.cut_point=8",
  "--config.model.channels=(8,16)",
  "--config.model.num_heads=2",
  "--config.diffusion.num_timesteps=20",
  "--config.diffusion.sample_steps=20",
  "--config.batch_size=8",
  "--config.total_steps=4",
  "--config.log_every_steps=1",
  "--config.ckpt_every_steps=4",
  "--config.sample_every_steps=0",
  "--config.num_sample_images=4",
  "--config.mesh.data=2",
  *LEARN,
]


@pytest.mark.slow
def test_clients_over_two_processes_train_like_one_process(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  procs = launch(one, 1, 2, *COLLAB, module="collab.train")
  finish(procs)
  finish(launch(two, 2, 1, *COLLAB, module="collab.train"))
  assert_same_losses(read_losses(two), read_losses(one))
  assert sorted(read_losses(two)) == list(range(1, 5))
  # Process 0 alone writes: one log, one event file, one sample grid.
  assert run_files(two) == run_files(one), (run_files(two), run_files(one))
  assert sorted(s for s in os.listdir(os.path.join(two, "checkpoints")) if s.isdigit()) == ["4"]
