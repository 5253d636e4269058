"""hybrid.train as 2 real processes (x 2 forced CPU devices each): the cluster-wide model (stage 1)
and the users' personalized models (stage 2, each process reading its own user's shots) give the
same losses as one process x 4 devices."""

import os

import pytest

from tests.common.test_train import read_losses
from tests.multiprocess import LEARN, assert_same_losses, finish, launch, run_files

HYBRID = [
  "--config=configs/hybrid.py:tiny",
  "--config.mesh.data=4",
  "--config.total_steps=4",
  "--config.log_every_steps=1",
  "--config.hybrid.personal_steps=4",
  *LEARN,
]


@pytest.mark.slow
def test_both_stages_over_two_processes_train_like_one_process(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  finish(launch(one, 1, 4, *HYBRID, module="hybrid.train"))
  finish(launch(two, 2, 2, *HYBRID, module="hybrid.train"))
  for stage in ("cluster", "."):
    got, want = read_losses(os.path.join(two, stage)), read_losses(os.path.join(one, stage))
    assert len(want) == 4
    assert_same_losses(got, want)
  assert run_files(two) == run_files(one)
  assert os.path.exists(os.path.join(two, "train_summary.json"))
