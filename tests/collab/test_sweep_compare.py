"""collab.sweep_compare: sweeps with different settings, paired by seed and client."""

import json
import os
import subprocess
import sys

import pytest

from collab import sweep_compare

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_sweep(root, fids, handoff=50.0, cut=20):
  """A finished sweep's evaluations: ``fids[seed][client]`` CollaFuse FIDs."""
  for seed, per_client in fids.items():
    d = os.path.join(root, f"seed{seed}", f"cut{cut}")
    os.makedirs(d)
    clients = [
      {
        "client": k,
        "collafuse": {"fid": fid, "kid_mean": fid / 10, "label_accuracy": 0.9},
        "disclosure": {"handoff": {"fid": handoff + k}},
      }
      for k, fid in enumerate(per_client)
    ]
    with open(os.path.join(d, "sweep_eval.json"), "w") as f:
      json.dump({"clients": clients[::-1], "seed": seed}, f)  # client order must not matter


def test_deltas_and_wins_are_paired_by_seed_and_client(tmp_path):
  base, arm = str(tmp_path / "base"), str(tmp_path / "arm")
  _write_sweep(base, {0: [50.0, 60.0], 1: [52.0, 58.0], 2: [40.0, 40.0]})
  # Seed 2 exists only in the base: it is left out of every figure.
  _write_sweep(arm, {0: [45.0, 61.0], 1: [50.0, 54.0]}, handoff=80.0)
  (row,) = sweep_compare.compare(base, [arm], 20)["rows"]
  assert row["seeds"] == [0, 1]
  fid = row["metrics"]["FID"]
  assert fid["base"]["mean"] == pytest.approx(55.0) and fid["arm"]["mean"] == pytest.approx(52.5)
  # Seed deltas -2.0 and -3.0; clients better in 3 of 4 pairs (61 > 60 is a loss).
  assert fid["delta"]["mean"] == pytest.approx(-2.5)
  assert fid["delta"]["std"] == pytest.approx(0.7071, abs=1e-4)
  assert (fid["seed_wins"], fid["client_wins"], fid["client_pairs"]) == (2, 3, 4)
  acc = row["metrics"]["label accuracy"]
  assert acc["seed_wins"] == 0 and acc["delta"]["mean"] == pytest.approx(0.0)
  hand = row["metrics"]["hand-off FID (disclosure)"]
  assert hand["delta"]["mean"] == pytest.approx(30.0) and "seed_wins" not in hand
  assert "cut images FID (disclosure)" not in row["metrics"]  # not in these runs' records
  text = sweep_compare.markdown(sweep_compare.compare(base, [arm], 20))
  assert "| FID | 52.50 ± 0.71 | 55.00 ± 0.00 | -2.50 ± 0.71 | 2/2, 3/4 |" in text


def test_binary_writes_the_table_and_refuses_a_missing_cut_in_one_line(tmp_path):
  base, arm = str(tmp_path / "base"), str(tmp_path / "arm")
  _write_sweep(base, {0: [50.0, 60.0]})
  _write_sweep(arm, {0: [45.0, 61.0]})
  out = str(tmp_path / "out")
  cmd = [sys.executable, "-m", "collab.sweep_compare", f"--base={base}", f"--arms={arm}"]
  proc = subprocess.run([*cmd, f"--out={out}"], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| FID |" in proc.stdout
  with open(os.path.join(out, "compare.json")) as f:
    assert json.load(f)["rows"][0]["metrics"]["FID"]["client_wins"] == 1
  assert os.path.getsize(os.path.join(out, "compare.md")) > 0
  proc = subprocess.run([*cmd, "--cut_point=40"], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("collab.sweep_compare: ")
  assert "cut40" in proc.stderr
