"""hybrid.footprint: the byte counts against the parameter trees, the hybrid's storage and memory
against a full personalized model per user, the table in hybrid.optimize's report, the binary."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from common import data
from common.train import loop
from common.train.method import DDPM
from configs import hybrid as hybrid_configs
from hybrid import footprint, optimize_report
from hybrid import method as hmethod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _nbytes(tree) -> int:
  return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def tiny():
  return hybrid_configs.get_config("tiny")


@pytest.fixture(scope="module")
def measured(tiny):
  # Edge batch 1: the tiny network is so small that 18 rows of activations outweigh its
  # parameters, which would hide what the edge holds.
  return footprint.measure(tiny, edge_batch=1)


def test_storage_is_the_sum_of_the_real_parameter_leaves(tiny):
  method = hmethod.Hybrid(tiny, data.get_info(tiny.data))
  params = jax.jit(method.init_params)(jax.random.key(0))
  u = int(tiny.hybrid.num_users)
  s = footprint.storage(tiny, params)
  assert s["num_users"] == u and s["dtypes"] == ["float32"]
  assert s["cluster"] == _nbytes(params["cluster"])
  for user in range(u):
    assert s["per_user"]["hybrid"] == _nbytes(jax.tree.map(lambda a, i=user: a[i], params["users"]))
  full = jax.jit(lambda k: DDPM.init_params(method, k))(jax.random.key(1))
  assert s["per_user"]["full"] == _nbytes(full)
  assert s["edge_total"] == {"hybrid": _nbytes(params["cluster"]), "full": u * _nbytes(full)}
  assert s["total"] == {"hybrid": _nbytes(params), "full": u * _nbytes(full)}
  # Stage 2's real train state: params, EMA and each user's Adam state.
  tx, _ = method.make_optimizer()
  state = jax.jit(loop.make_init_fn(method, tx, 0))()
  users = (state.params["users"], state.ema_params["users"], state.opt_state["users"])
  assert s["train_state_per_user"]["hybrid"] * u == _nbytes(users)
  # The shape-only count of the config is the same.
  assert footprint.storage(tiny) == s


def test_hybrid_saves_storage_at_the_edge_not_per_user(tiny):
  s = footprint.storage(tiny)
  u = s["num_users"]
  assert u >= 2
  # A personalized model is a whole fine-tuned network (DreamBooth, as the paper's): a user
  # stores as much as a full model of its own, and the cluster-wide network comes on top.
  assert s["per_user"]["hybrid"] == s["per_user"]["full"] > 0
  assert s["train_state_per_user"]["hybrid"] == s["train_state_per_user"]["full"]
  assert s["total"]["hybrid"] == s["total"]["full"] + s["cluster"]
  # The edge stores one network for the cluster instead of one per user.
  assert s["edge_total"]["full"] == u * s["edge_total"]["hybrid"]


def test_memory_figures(measured, tiny):
  m = measured["memory"]
  for side in ("device", "edge"):
    for arm in ("hybrid", "full"):
      f = m[side][arm]
      assert f["peak"] > 0 and f["argument"] > 0 and f["temp"] >= 0, (side, arm)
      assert f["peak"] == f["argument"] + f["output"] - f["alias"] + f["temp"]
  per_user = measured["storage"]["per_user"]["full"]
  dev = m["device"]
  # The device holds one network either way and runs it on one request: the hybrid's device
  # program (n of T levels) needs what the full chain needs, within the two programs' loop forms.
  assert dev["hybrid"]["argument"] >= per_user and dev["full"]["argument"] >= per_user
  assert dev["hybrid"]["peak"] == pytest.approx(dev["full"]["peak"], rel=0.05)
  # The edge: one cluster-wide network against all U personalized ones, at the same batch.
  edge = m["edge"]
  u = measured["storage"]["num_users"]
  assert edge["full"]["argument"] >= u * per_user > edge["hybrid"]["argument"] >= per_user
  assert edge["hybrid"]["peak"] < edge["full"]["peak"]


def test_report_has_the_table(measured, tiny, tmp_path):
  cells = [
    {
      "num_gpus": 4.0,
      "num_users": 4,
      "summary": {"optimum": {"utility_per_user": 1.0, "admitted": 2.0, "decision_ms": 0.1}},
    }
  ]
  path = str(tmp_path / "results.md")
  optimize_report.write_markdown(path, tiny, cells, {}, {}, measured)
  md = open(path).read()
  assert "## Storage and memory, hybrid vs a full personalized model per user" in md
  assert "| quantity | hybrid | full personalized model per user | full / hybrid |" in md
  table = [line for line in md.splitlines() if line.startswith("| stored at the edge")]
  assert len(table) == 1 and table[0].rstrip(" |").endswith(f"{tiny.hybrid.num_users:.2f}")
  assert sum(line.startswith(("| device peak", "| edge peak")) for line in md.splitlines()) == 2
  # Without the figures the section is left out.
  optimize_report.write_markdown(path, tiny, cells, {}, {})
  assert "Storage and memory" not in open(path).read()


def test_binary(tmp_path):
  out = str(tmp_path / "footprint.json")
  proc = subprocess.run(
    [sys.executable, "-m", "hybrid.footprint", "--config=configs/hybrid.py:tiny",
     "--edge_batch=2", f"--out={out}"],
    cwd=REPO, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| stored per user: its personalized parameters" in proc.stdout
  with open(out) as f:
    saved = json.load(f)
  assert saved["memory"]["edge_batch"] == 2 and saved["memory"]["device_batch"] == 1
  assert saved["storage"] == footprint.storage(hybrid_configs.get_config("tiny"))
  assert np.isfinite(saved["memory"]["device"]["hybrid"]["peak"])
