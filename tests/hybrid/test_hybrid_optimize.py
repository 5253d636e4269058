"""hybrid.optimize end to end on the tiny preset, its resumption, and config errors."""

import json
import os

import numpy as np
import pytest

from configs import hybrid as hybrid_configs
from hybrid import optimize


def _tiny(**overrides):
  c = hybrid_configs.get_config("tiny")
  c.update_from_flattened_dict(overrides)
  return c


def test_binary_trains_evaluates_and_resumes(tmp_path):
  workdir = str(tmp_path / "opt")
  config = _tiny(**{"scheduler.agent.episodes": 30, "scheduler.eval.scenarios": 2})
  result = optimize.run(config, workdir)
  for name in ("results.json", "results.md", "results.png", "training.png", "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert len(saved["cells"]) == 4 and saved["train"]["dynamic"]["episodes"] == 30
  for cell in saved["cells"]:
    sm, raw = cell["summary"], cell["raw"]
    opt = np.asarray(raw["optimum"]["utility"])
    assert len(opt) == 2
    # The three exact solvers agree; nothing beats them.
    for exact in ("optimum_enumeration", "optimum_ortools"):
      np.testing.assert_allclose(raw[exact]["utility"], opt, rtol=1e-9)
    for method, r in raw.items():
      assert np.all(np.asarray(r["utility"]) <= opt + 1e-6 * np.maximum(1, np.abs(opt))), method
    assert sm["optimum"]["gain_share"] == pytest.approx(1.0)
    assert sm["all_local"]["gain_share"] == pytest.approx(0.0)
    assert sm["drl_convex"]["decision_ms"] > 0
    assert {"admit_all_n80", "admit_all_n140", "admit_all_n200", "ga_at_drl_time"} <= set(sm)
  assert set(result["claims"]) == {"E1", "E2", "E3"}
  md = open(os.path.join(workdir, "results.md")).read()
  assert "| 16 | 8 |" in md and "drl_convex" in md
  # The storage and memory table of the config's models (hybrid.footprint), in both files.
  assert "## Storage and memory, hybrid vs a full personalized model per user" in md
  assert saved["footprint"]["storage"]["num_users"] == config.hybrid.num_users
  assert saved["footprint"]["memory"]["device"]["hybrid"]["peak"] > 0
  # A second run finds the agent trained (no retraining) and reproduces the exact figures.
  again = optimize.run(config, workdir)
  assert again["train"] == result["train"]
  for a, b in zip(again["cells"], result["cells"], strict=True):
    assert a["raw"]["optimum"]["utility"] == b["raw"]["optimum"]["utility"]
    assert a["raw"]["drl_convex"]["utility"] == b["raw"]["drl_convex"]["utility"]


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"scheduler.setting": "fixed"}, "static or dynamic"),
    ({"scheduler.eval.num_users": (0, 4)}, "user counts N"),
    ({"scheduler.eval.num_gpus": (4.0, -1.0)}, "G must be > 0"),
    ({"scheduler.train_num_users": (4, 30)}, "user counts N"),
    ({"scheduler.eval.scenarios": 0}, "scenarios"),
    ({"scheduler.system.transmission": "shannon"}, "transmission"),
    ({"scheduler.profile": "/nonexistent/profile.json"}, "profile.json"),
  ],
)
def test_bad_configs_are_refused(overrides, match):
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    optimize.build(_tiny(**overrides))


def test_presets():
  sim = hybrid_configs.get_config("sim")
  assert sim.method == "hybrid" and sim.seed == 0
  assert sim.scheduler.system.num_steps == 200 and sim.scheduler.system.capacity == 18
  assert sim.diffusion.num_timesteps == 200  # the model half's T
  plan = optimize.agent_plan(hybrid_configs.get_config("sim_static"))
  assert len(plan) == 20 and plan[0][0] == "G4_N4"
  with pytest.raises(ValueError, match="unknown preset"):
    hybrid_configs.get_config("huge")
