"""common.quickstart: the tiny plan end to end through every method's binaries, a failing run
reported while the others go on, and a re-run that skips finished runs and relaunches the one
whose output is missing."""

import csv
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from common import compare, headline, quickstart, replicates
from configs import quickstart as plan_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The second arms of collab and mobile launch the same binaries as their first arms with one
# override changed; the test leaves them out (about 40 s of CPU) and keeps one arm per binary.
SECOND_ARMS = ("train_collab_local", "collab_local", "train_mobile_config2", "mobile_config2")
RESULT_ROWS = ("ddpm", "hybrid_paper", "cdc", "mobile_config1", "collab_cut", "adaptive_tdc")


def tiny_plan_with_a_failure():
  c = plan_config.get_config("tiny")
  for name in SECOND_ARMS:
    c.runs[name].enabled = False
  # The scheduler on the paper's profile (hybrid_paper): hybrid.train and hybrid.profile have
  # their own tests (tests/hybrid) and cost ~30 s of CPU here; the dry run below checks the
  # measured-profile plan.
  c.hybrid_measured_profile = False
  # Two at a time (nothing here measures latencies): the scheduler's path, and half the time.
  c.max_parallel = 2
  # A run that fails (evaluating a workdir nothing trained) and one that needs it, early in the
  # order so that the runs after them show that the plan goes on.
  c.runs.broken = plan_config.entry(
    "common.eval", "never_trained", done="eval/metrics.json", estimate_s=3, section="broken"
  )
  c.runs.after_broken = plan_config.entry(
    "common.eval", "never_trained", needs=("broken",), estimate_s=3
  )
  order = list(c.order)
  c.order = tuple(order[:2] + ["broken", "after_broken"] + order[2:])
  return c


def _launches(log_path):
  with open(log_path) as f:
    return sum(line.startswith("$ python") for line in f)


@pytest.mark.slow
def test_tiny_plan_end_to_end_with_a_failure_then_a_resumed_rerun(tmp_path):
  config = tiny_plan_with_a_failure()
  workdir = str(tmp_path / "qs")
  lines = []
  result = quickstart.run_plan(config, workdir, echo=lines.append)
  out = result["outcomes"]

  # The failure is reported, the run that needs it is blocked, every other run finished.
  assert not result["ok"]
  assert out["broken"].status == "failed" and out["broken"].rc == 2
  assert "never_trained" in out["broken"].error
  assert out["after_broken"].status == "blocked"
  enabled = quickstart.enabled_entries(config)
  assert {n for n in enabled if out[n].status == "ok"} == set(enabled) - {"broken", "after_broken"}
  assert all(
    out[n].status == "disabled" for n in (*SECOND_ARMS, "hybrid_models", "hybrid_profile", "hybrid")
  )
  for name in enabled:
    if name != "after_broken":
      assert os.path.getsize(os.path.join(workdir, "logs", f"{name}.log")) > 0

  # Progress: one start and one end line per run, with the elapsed time and the total ETA.
  text = "\n".join(lines)
  n = len(enabled)
  assert f"[1/{n}] train_ddpm: python -m common.train --config=configs/ddpm.py:digits" in text
  assert f"[{n}/{n}] adaptive_single: done in" in text and "total ETA" in text
  assert f"[3/{n}] broken: FAILED (exit 2)" in text
  # Where the time went: each launch's tracing, lowering and XLA compiling (common.train.timing).
  assert "train_ddpm: done in" in text and "(compiling " in text
  spent = out["train_ddpm"].timing
  assert spent["programs"] >= 2 and 0 < spent["compile_s"] < spent["wall_s"]
  assert out["train_ddpm"].wall_time_s > spent["trace_s"] + spent["lower_s"] + spent["compile_s"]

  # The non-generative methods wrote the agreed headline shape.
  hyb = headline.read(os.path.join(workdir, "hybrid_paper"))
  assert hyb["kind"] == "scheduler" and hyb["primary"]["name"] == "utility_per_user"
  assert {"optimum", "greedy", "all_local"} <= set(hyb["baselines"])
  with open(os.path.join(workdir, "hybrid_paper", "results.json")) as f:
    assert "footprint" not in json.load(f)  # scheduler.footprint=false: nothing compiled for it
  # The exact optimum beats every policy.
  assert "profile paper" in hyb["note"]
  best = hyb["baselines"]["optimum"]["utility_per_user"]
  assert all(
    m["utility_per_user"] <= best + 1e-9 for m in [hyb["metrics"], *hyb["baselines"].values()]
  )
  cdc = headline.read(os.path.join(workdir, "cdc"))
  assert cdc["kind"] == "adaptation" and cdc["arm"] == "fda/k_center/K4"
  assert {"static", "ft/n5", "oracle"} <= set(cdc["baselines"]) and cdc["flops"] > 0

  # One report over every kind of result, the single model of adaptive included.
  md = open(os.path.join(workdir, "report.md")).read()
  for row in (*RESULT_ROWS, "adaptive_single"):
    assert f"| {row} |" in md, row
  assert "## hybrid_paper: DRL-convex scheduler" in md and "| **drl_convex** |" in md
  assert "## cdc: generated parameters (FDA)" in md and "| static |" in md
  assert "## Failed runs" in md and "### broken (exit code 2)" in md
  assert "| 3 | broken | failed |" in md and "| 4 | after_broken | blocked |" in md
  assert "| adaptive | adaptive_tdc | TDC groups (stage 2) | fid" in md
  assert "| broken | broken | - | - | - | - | - | - | - | " in md
  assert "Making programs took" in md and "| compiling s (trace + lower + XLA) |" in md
  with open(os.path.join(workdir, "report.csv")) as f:
    rows = list(csv.DictReader(f))
  arms = {(r["run"], r["arm"], r["role"]) for r in rows}
  assert ("hybrid_paper", "optimum", "baseline") in arms and ("cdc", "static", "baseline") in arms
  assert {r["run"] for r in rows if r["kind"] == "generative"} == {
    "ddpm", "mobile_config1", "collab_cut", "adaptive_tdc", "adaptive_single",
  }  # fmt: skip
  # Training compute (common.train.compute): steps x images per step of every training under a
  # run's workdir, TDC's stage 1 (2 steps of 8) and stage 2 (2 steps of 2 groups x 8) together.
  generative = {r["run"]: r for r in rows if r["kind"] == "generative"}
  assert {name: int(r["images_seen"]) for name, r in generative.items()} == {
    "ddpm": 2 * 8, "mobile_config1": 2 * 8, "collab_cut": 2 * 2 * 4,
    "adaptive_single": 2 * 8, "adaptive_tdc": 2 * 8 + 2 * 2 * 8,
  }  # fmt: skip
  assert all(float(r["train_pflop"]) > 0 for r in generative.values())
  # The plot shows the headline's figure: collab's mean over its clients.
  assert "`fid_groups_mean` for collab_cut" in md and replicates.ONE_SEED_NOTE in md
  assert os.path.getsize(os.path.join(workdir, "pareto.png")) > 5000
  with open(os.path.join(workdir, quickstart.PLAN_FILE)) as f:
    plan = json.load(f)
  # A row's wall time includes what it needs: the TDC eval row includes adaptive.train.
  assert plan["runs"]["adaptive_tdc"]["wall_time_s"] > out["train_adaptive"].wall_time_s
  # What the figures depend on besides the code, in the plan and as one line of the report.
  env = plan["environment"]
  assert env["packages"]["jax"] == jax.__version__ and env["cpu_count"] == os.cpu_count()
  assert f"Ran with Python {env['python']}, jax {jax.__version__}, jaxlib" in md

  # Re-run after losing one output: finished runs are skipped (their logs see no new launch),
  # the run without its output is launched again and the failing one is tried again.
  os.remove(os.path.join(workdir, "ddpm", "eval", "metrics.json"))
  lines.clear()
  again = quickstart.run_plan(config, workdir, echo=lines.append)
  statuses = {k: o.status for k, o in again["outcomes"].items()}
  assert statuses["ddpm"] == "ok" and statuses["broken"] == "failed"
  assert statuses["after_broken"] == "blocked"
  skipped = {n for n in enabled if statuses[n] == "skipped"}
  assert skipped == set(enabled) - {"ddpm", "broken", "after_broken"}
  assert _launches(os.path.join(workdir, "logs", "ddpm.log")) == 2
  assert _launches(os.path.join(workdir, "logs", "hybrid_paper.log")) == 1
  # Two at a time the runs are taken up longest chain first (start_order), so the first line after
  # the header is adaptive's; each line keeps the run's number in the plan.
  assert "finished earlier" in lines[1]
  assert any(line.startswith(f"[1/{n}] train_ddpm: finished earlier") for line in lines)
  # The skipped runs keep their measured wall times in the report.
  runs = {r["run"]: r for r in compare.load_runs([f"hybrid_paper={workdir}/hybrid_paper"])}
  assert runs["hybrid_paper"]["kind"] == "scheduler"
  with open(os.path.join(workdir, quickstart.PLAN_FILE)) as f:
    assert json.load(f)["runs"]["hybrid_paper"]["wall_time_s"] > 0


def test_plan_errors_are_named():
  c = plan_config.get_config("tiny")
  c.order = (*c.order, "nope")
  with pytest.raises(quickstart.PlanError, match="unknown runs \\['nope'\\]"):
    quickstart.enabled_entries(c)
  c = plan_config.get_config("tiny")
  c.order = ("ddpm", "train_ddpm", *[n for n in c.order if n not in ("ddpm", "train_ddpm")])
  with pytest.raises(quickstart.PlanError, match="needs 'train_ddpm', which comes later"):
    quickstart.enabled_entries(c)
  c = plan_config.get_config("tiny")
  c.runs.cdc.when = "not fast"
  with pytest.raises(quickstart.PlanError, match="run 'cdc': when='not fast' names no switch"):
    quickstart.enabled_entries(c)
  with pytest.raises(ValueError, match="unknown preset"):
    plan_config.get_config("huge")


def test_the_measured_profile_switch_chooses_the_hybrid_runs():
  c = plan_config.get_config("default")
  hybrid = [n for n in quickstart.enabled_entries(c) if n.startswith("hybrid")]
  assert hybrid == ["hybrid_models", "hybrid_profile", "hybrid"]
  c.hybrid_measured_profile = False  # --config.hybrid_measured_profile=false
  hybrid = [n for n in quickstart.enabled_entries(c) if n.startswith("hybrid")]
  assert hybrid == ["hybrid_paper"]
  argv = quickstart.command(c.runs.hybrid_paper, "/qs")
  assert "--config=configs/hybrid.py:sim" in argv and "--config.scheduler.profile=paper" in argv
  # The storage and memory table (compiled programs) is RESULTS.md's, not the plan's.
  assert "--config.scheduler.footprint=false" in argv
  # A run switched off by `enabled` stays off whatever the switch says.
  c.runs.hybrid_paper.enabled = False
  assert not any(n.startswith("hybrid") for n in quickstart.enabled_entries(c))


def test_eta_rescales_the_estimates_by_measured_time():
  eta = quickstart.Eta({"a": 10.0, "b": 20.0, "c": 30.0})
  assert eta.remaining() == 60.0
  eta.finish("a", 20.0, ran=True)  # twice as slow as estimated
  assert eta.remaining() == pytest.approx(100.0)
  assert eta.remaining("b", 15.0) == pytest.approx(85.0)
  eta.finish("b", None, ran=False)  # skipped: removed, does not rescale
  assert eta.remaining() == pytest.approx(60.0)


def test_error_tail_starts_at_the_traceback():
  lines = [f"I1201 07:00:00.000 1 loop.py:1] step {i}" for i in range(100)]
  lines += ["Traceback (most recent call last):", '  File "x.py"', "ValueError: bad input"]
  tail = quickstart.error_tail(lines)
  assert tail.splitlines()[0] == "Traceback (most recent call last):"
  assert tail.endswith("ValueError: bad input")
  assert quickstart.error_tail(lines[:30]).splitlines()[0] == "step 5"


def test_dry_run_lists_the_commands_without_running_them(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "common.quickstart", f"--workdir={tmp_path / 'qs'}", "--dry_run",
     "--config.runs.cdc.enabled=false"],
    cwd=REPO, capture_output=True, text=True, timeout=60,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  qs = tmp_path / "qs"
  assert "[1/" in proc.stdout and "-m hybrid.optimize --config=configs/hybrid.py:" in proc.stdout
  assert f"--config.scheduler.profile={qs}/hybrid_models/profile.json" in proc.stdout
  assert "cdc.evaluate" not in proc.stdout and not os.path.exists(tmp_path / "qs")


def _sleep_plan(max_parallel):
  c = plan_config.get_config("tiny")
  c.runs = {
    "a": plan_config.entry("tests.common.sleep_run", "a", args=("--seconds=2",), estimate_s=2),
    "b": plan_config.entry("tests.common.sleep_run", "b", args=("--seconds=1",), estimate_s=1),
    "c": plan_config.entry(
      "tests.common.sleep_run", "c", args=("--seconds=0.5",), needs=("a",), estimate_s=1
    ),
  }
  c.order = ("a", "b", "c")
  c.max_parallel = max_parallel
  c.compile_cache = False
  return c


@pytest.mark.parametrize("max_parallel", [1, 2])
def test_runs_at_a_time_and_needs_first(tmp_path, max_parallel):
  """``max_parallel=2``: two independent runs overlap; a run starts only after what it needs has
  ended; ``1``: one after the other, in plan order."""
  lines = []
  out = quickstart.run_plan(_sleep_plan(max_parallel), str(tmp_path), echo=lines.append)
  assert all(out["outcomes"][n].status == "ok" for n in "abc"), lines
  ran = {n: json.load(open(tmp_path / n / "ran.json")) for n in "abc"}
  assert ran["c"]["start"] >= ran["a"]["end"]
  overlap = ran["a"]["start"] < ran["b"]["end"] and ran["b"]["start"] < ran["a"]["end"]
  assert overlap == (max_parallel == 2)
  if max_parallel == 1:
    assert ran["a"]["end"] <= ran["b"]["start"] and ran["b"]["end"] <= ran["c"]["start"]
  assert f"{max_parallel} at a time" in lines[0]
  # The outcomes (and the report's runs table) are in plan order, whatever order the runs ended in.
  assert list(out["outcomes"]) == ["a", "b", "c"]


def test_an_alone_run_has_nothing_beside_it(tmp_path):
  """Two at a time, but ``b`` measures time: it waits for ``a`` to end, and ``c``, free to start
  beside either, waits for ``b`` to end."""
  c = _sleep_plan(2)
  c.runs.b.alone = True
  c.runs.c.needs = ()
  out = quickstart.run_plan(c, str(tmp_path), echo=[].append)
  assert all(out["outcomes"][n].status == "ok" for n in "abc")
  ran = {n: json.load(open(tmp_path / n / "ran.json")) for n in "abc"}
  assert ran["b"]["start"] >= ran["a"]["end"]
  assert ran["c"]["start"] >= ran["b"]["end"]


def test_longest_chain_starts_first_when_runs_share_the_machine():
  """Two at a time, the run heading the longest chain of estimates is offered a slot first (the
  default plan: adaptive's training, whose two evaluations follow it); one at a time, plan order."""
  c = _sleep_plan(2)
  c.runs.a.estimate_s, c.runs.b.estimate_s, c.runs.c.estimate_s = 1.0, 2.5, 2.0
  names = ["a", "b", "c"]
  # a's chain is a + c = 3.0, b's 2.5, c's 2.0.
  assert quickstart.start_order(c.runs, names, 2) == ["a", "b", "c"]
  c.runs.b.estimate_s = 4.0
  assert quickstart.start_order(c.runs, names, 2) == ["b", "a", "c"]
  assert quickstart.start_order(c.runs, names, 1) == names
  default = plan_config.get_config("default")
  order = quickstart.start_order(default.runs, quickstart.enabled_entries(default), 2)
  assert order[0] == "train_adaptive"


def test_auto_runs_two_at_a_time_only_without_an_accelerator(monkeypatch):
  config = plan_config.get_config("default")
  assert config.max_parallel == 0  # auto: hybrid.profile is marked alone
  assert config.runs.hybrid_profile.alone
  config.max_parallel = 0  # auto
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  monkeypatch.setattr(quickstart, "_ACCELERATOR_DEVICE_FILES", ())
  assert quickstart.runs_at_a_time(config) == 2
  monkeypatch.setattr(quickstart, "_ACCELERATOR_DEVICE_FILES", (os.devnull,))  # a GPU's file
  assert quickstart.runs_at_a_time(config) == 1
  monkeypatch.setattr(quickstart, "_ACCELERATOR_DEVICE_FILES", ())
  monkeypatch.setattr(os, "cpu_count", lambda: 1)
  assert quickstart.runs_at_a_time(config) == 1
  config.max_parallel = 3
  assert quickstart.runs_at_a_time(config) == 3


def _entry_config(e):
  """The config a train entry of the plan launches with (its preset and --config overrides)."""
  import ast
  import importlib

  path, preset = e.config.split(":")
  c = importlib.import_module(path.removesuffix(".py").replace("/", ".")).get_config(preset)
  for override in e.overrides:
    key, value = override.split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    c.update_from_flattened_dict({key: value})
  return c


@pytest.mark.parametrize("arm", sorted(plan_config.TRAIN_FLOPS_PER_IMAGE))
def test_default_plan_gives_every_generative_arm_the_same_training_compute(arm):
  # The table the budgets are computed from is what XLA counts for the plan's own configs today,
  # so each arm's steps x images x FLOPs is TRAIN_FLOPS (one step's rounding at most).
  from adaptive import stages
  from common.train import loop

  plan = plan_config.get_config("default")
  e = plan.runs[f"train_{arm}"]
  config = _entry_config(e)
  if arm == "adaptive":
    config = stages.stage1_config(config)
  cost = loop.step_cost(config, devices=jax.devices()[:1])
  assert cost["flops_per_image"] == pytest.approx(plan_config.TRAIN_FLOPS_PER_IMAGE[arm], rel=1e-3)
  steps = config.total_steps if arm != "adaptive" else int(e.overrides[0].split("=")[1])
  spent = steps * cost["images_per_step"] * cost["flops_per_image"]
  assert spent == pytest.approx(plan_config.TRAIN_FLOPS, rel=0.01)
  decay = float(dict(o.split("=", 1) for o in e.overrides)["ema_decay"])
  # The random init's share of the EMA at the end: about e^-10 ((1 - 10 / n)^n), whatever n.
  assert -10.5 < steps * math.log(decay) < -10.0


def test_seeds_replicate_every_generative_row_and_its_trainings(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "common.quickstart", f"--workdir={tmp_path / 'qs'}", "--dry_run",
     "--config=configs/quickstart.py:tiny", "--config.seeds=3"],
    cwd=REPO, capture_output=True, text=True, timeout=60,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  qs = tmp_path / "qs"
  lines = proc.stdout.splitlines()
  one = plan_config.get_config("tiny")
  generative = [n for n in one.order if one.runs[n].module == "common.eval" and n != "broken"]
  trainings = sorted({need for n in generative for need in one.runs[n].needs})
  assert len(lines) == len(quickstart.enabled_entries(one)) + 2 * (len(generative) + len(trainings))
  seed2 = {line.split("] ")[1].split(" ")[0]: line for line in lines if "_seed2 " in line}
  assert sorted(seed2) == sorted(f"{n}_seed2" for n in generative + trainings)
  assert f"--workdir={qs}/adaptive_seed2 " in seed2["train_adaptive_seed2"]
  assert "--config.seed=2" in seed2["train_adaptive_seed2"]
  # TDC's single model is stage 1 of the seed's own run, sampled with the seed.
  assert f"--workdir={qs}/adaptive_seed2/stage1 " in seed2["adaptive_single_seed2"]
  assert seed2["adaptive_single_seed2"].endswith("--seed=2")
  bad = subprocess.run(
    [sys.executable, "-m", "common.quickstart", f"--workdir={tmp_path / 'qs'}", "--dry_run",
     "--config.seeds=0"],
    cwd=REPO, capture_output=True, text=True, timeout=60,
  )  # fmt: skip
  assert bad.returncode == 2 and "seeds=0: must be >= 1" in bad.stderr


def test_replicates_fold_into_mean_std_paired_deltas_and_wins():
  def row(run, value, versus="", delta=None):
    return {"run": run, "section": "s", "label": run, "status": "ok", "value": value,
            "higher_is_better": False, "versus": versus, "delta": delta}  # fmt: skip

  rows = [row("base", 10.0), row("arm", 8.0, "base", -2.0), row("other", 5.0)]
  meta = {"base": {}, "arm": {}, "other": {}}
  for s, (b, a) in enumerate([(12.0, 11.0), (9.0, 10.0)], 1):
    rows += [row(f"base_seed{s}", b), row(f"arm_seed{s}", a, f"base_seed{s}", a - b)]
    meta[f"base_seed{s}"] = {"replicate_of": "base", "seed": s}
    meta[f"arm_seed{s}"] = {"replicate_of": "arm", "seed": s}
  folded = {r["run"]: r for r in replicates.fold(rows, meta)}
  assert sorted(folded) == ["arm", "base", "other"]
  assert folded["base"]["value"] == pytest.approx(31 / 3) and folded["base"]["seeds"] == 3
  assert folded["base"]["value_std"] == pytest.approx(np.std([10, 12, 9], ddof=1))
  arm = folded["arm"]
  assert arm["delta"] == pytest.approx((-2 - 1 + 1) / 3) and arm["wins"] == "2/3"
  assert arm["better"] == "within seed noise"
  assert folded["other"] == rows[2]  # one seed: unchanged
  md = "\n".join(compare._headline_table(list(folded.values())))
  assert "+- " in md and "(3 seeds)" in md and "within seed noise (2/3)" in md
  assert replicates.note(list(folded.values())) == replicates.SEEDS_NOTE
