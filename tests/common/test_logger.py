"""The metric logger: metrics.jsonl and TensorBoard events, without importing PyTorch."""

import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = """
import importlib.util, json, sys
from common.train import logger
log = logger.MetricLogger(sys.argv[1], total_steps=4, batch_size=2)
log.start(0)
log.write(1, {"loss": 0.5})
log.write(2, {"loss": 0.25})
log.close()
imported = "torch" in sys.modules
if importlib.util.find_spec("torch") is not None:
  import torch  # still importable once the writer exists
print(json.dumps({"torch_imported_by_logger": imported}))
"""


def test_logger_writes_jsonl_and_events_without_importing_torch(tmp_path):
  # A fresh interpreter: the test process may have imported torch already.
  out = subprocess.run(
    [sys.executable, "-c", _SCRIPT, str(tmp_path)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch_imported_by_logger": False}
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line)["loss"] for line in f] == [0.5, 0.25]
  assert any(n.startswith("events") for n in os.listdir(tmp_path / "tensorboard"))


def test_torch_stays_importable_after_the_writer_in_this_process(tmp_path):
  from common.train import logger

  log = logger.MetricLogger(str(tmp_path), total_steps=2, batch_size=1)
  log.write(1, {"loss": 1.0})
  log.close()
  assert sys.modules.get("torch", "absent") is not None  # no None left to block a later import
  if importlib.util.find_spec("torch") is not None:
    import torch

    assert torch.zeros(1).shape == (1,)
