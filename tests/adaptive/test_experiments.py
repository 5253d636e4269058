"""adaptive.experiments on a tiny config: arm workdirs (E6 too), the shared stage 1, resume, claims,
errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive import arms, claims, experiments, heldout, pruner_ablation, report, scoring, supernet
from adaptive import method as tdc_method
from common import eval as eval_lib
from common.train.validate import ConfigError
from tests.adaptive.test_adaptive_train import pipeline_config


def campaign_config():
  c = pipeline_config()
  c.total_steps = 6
  c.adaptive.stage1_frac = 0.5  # S1 = 3; E1's stage 2: floor(3 / 2) = 1 step of 2 networks
  e = c.experiments
  e.ks = (0.5,)
  e.num_groups = ()
  e.reversed = False
  e.groupings = ()
  e.pruners = ("proxy_memory", "uniform", "l1_oneshot")
  e.search_seeds = (0,)
  e.num_samples = 16
  e.sample_batch = 16
  e.heldout_per_group = 8
  return c


def _steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _check_e6(config, wd, rec):
  """E6 (the supernet) started from the shared stage 1, trained within B and meets the reference
  arm's sampling FLOPs."""
  e6_dir = os.path.join(wd, "seed0", "E6")
  # C7: stage 1 (3 base steps) + the supernet's steps at (1 + 0.5-width) FLOPs each <= B = 6.
  assert rec["training_cost"]["ratio"] <= 1.0 and rec["stage2_steps"] >= 1
  # The schedule keeps the reference arm's sampling FLOPs (analytic), and common.eval's XLA
  # count of the routed chain agrees.
  s = rec["supernet"]
  assert s["sampling_flops_ratio"] <= s["target_ratio"] + 1e-9
  assert abs(rec["sampling_flops_ratio"] - s["sampling_flops_ratio"]) < 0.05
  run_config, net, _, _ = eval_lib.load_params(e6_dir)
  assert isinstance(net, tdc_method.Supernet)
  assert len(run_config.adaptive.supernet.schedule) == config.diffusion.sample_steps
  with open(os.path.join(e6_dir, supernet.SEARCH_JSON)) as f:
    assert len(json.load(f)["loss_table"]) == config.diffusion.sample_steps
  assert os.path.exists(os.path.join(e6_dir, "summary.png"))
  # Step 0 is stage 1's network with its channels reordered: the same function at full width.
  _, _, start, _ = eval_lib.load_params(e6_dir, step=0, use_ema=False)
  _, base_net, base, _ = eval_lib.load_params(os.path.join(wd, "seed0", "stage1"))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)), jnp.float32)
  t = jnp.asarray([3, 15], jnp.int32)
  np.testing.assert_allclose(
    np.asarray(jax.jit(net.members[0].apply)(start, x, t)),
    np.asarray(jax.jit(base_net.apply)(base, x, t)),
    rtol=1e-4,
    atol=1e-5,
  )


@pytest.mark.slow
def test_campaign_shares_stage_one_lands_arms_and_resumes(tmp_path, monkeypatch):
  """Arms E0, E2 (the reference), E5 and E6 of one seed: one stage 1 for all of them, E5 and E6
  reusing the reference arm's search; then a resume that runs nothing."""
  wd = str(tmp_path / "arms")
  config = campaign_config()
  config.experiments.e6_widths = (1.0, 0.5)
  config.experiments.e6_draws_per_step = 4
  one = jax.devices()[:1]
  arm_names = ["E0", "E2", "E5", "E6"]
  summary = experiments.run_experiments(config, wd, seeds=[0], arms=arm_names, devices=one)
  seed = os.path.join(wd, "seed0")
  assert sorted(os.listdir(seed)) == ["E0", "E2_k0.5", "E5", "E6", "stage1"]

  # Stage 1 was trained once, to S1 = 3; E0 continued it (its first 3 logged steps are stage 1's
  # own lines). E0+ continues E0 the same way, by E1's stage-2 cost (1 step x 2 networks).
  stage1 = _steps(os.path.join(seed, "stage1"))
  e0 = _steps(os.path.join(seed, "E0"))
  assert [r["step"] for r in stage1] == [1, 2, 3]
  assert [r["step"] for r in e0] == [1, 2, 3, 4, 5, 6] and e0[:3] == stage1
  assert arms.extra_steps_e0plus(config) == 2
  runs = summary["runs"]
  # Stage 1's own held-out losses are reported next to the arms that start from it.
  assert runs["seed0/stage1"]["training_cost"]["ratio"] == pytest.approx(3 / 6)
  assert "l_simple" in runs["seed0/stage1"]["heldout_raw"]
  tdc_dir = os.path.join(seed, "E2_k0.5")
  assert not os.path.exists(os.path.join(tdc_dir, "stage1"))
  with open(os.path.join(tdc_dir, "summary.json")) as f:
    s = json.load(f)
  assert s["base"]["workdir"] == os.path.join(seed, "stage1") and s["base"]["step"] == 3
  assert runs["seed0/E2_k0.5"]["training_cost"]["ratio"] <= 1.0
  assert runs["seed0/E2_k0.5"]["sampling_flops_ratio"] < 0.95  # XLA's count of the pruned chain
  assert np.isfinite(runs["seed0/E2_k0.5"]["samples"]["fid"])
  # The raw weights' samples are scored too, next to (not over) the EMA evaluation.
  assert np.isfinite(runs["seed0/E2_k0.5"]["samples_raw"]["fid"])
  for sub, ema in (("eval", True), ("eval_raw", False)):
    with open(os.path.join(tdc_dir, sub, "metrics.json")) as f:
      assert json.load(f)["use_ema"] is ema

  # Every arm is scored on the same draws: for a single model the routed evaluation is the plain
  # held-out loss of that network in every group.
  ref = scoring.make_reference(arms.seed_config(config, 0))
  _, ddpm, params, _ = eval_lib.load_params(os.path.join(seed, "E0"))
  fn = heldout.make_terms_fn(ref.diffusion, ddpm.apply)
  direct = heldout.heldout_losses(ref.diffusion, ref.groups, [(fn, params)] * 2, ref.x_test,
                                  ref.draws)  # fmt: skip
  assert runs["seed0/E0"]["heldout"]["l_simple"] == pytest.approx(direct["l_simple"], rel=1e-5)
  # and for a TDC arm on the reference grouping, each draw goes to its own group's network.
  _, tdc, tdc_params, _ = eval_lib.load_params(tdc_dir)
  nets = [
    (heldout.make_terms_fn(ref.diffusion, m.apply), tdc_params[f"group{g}"])
    for g, m in enumerate(tdc.members)
  ]
  direct = heldout.heldout_losses(ref.diffusion, ref.groups, nets, ref.x_test, ref.draws)
  got = runs["seed0/E2_k0.5"]["heldout"]
  for a, b in zip(got["groups"], direct["groups"], strict=True):
    assert a["l_simple"] == pytest.approx(b["l_simple"], rel=1e-5)
    assert a["vlb_bpd_per_step"] == pytest.approx(b["vlb_bpd_per_step"], rel=1e-4)

  # E5 reused the reference arm's search for proxy_memory at proxy seed 0 (group 1 is pruned).
  e5 = runs["seed0/E5"]["pruners"]
  assert e5["groups"] == [1]
  with open(os.path.join(seed, "E2_k0.5", "pruning", "group1.json")) as f:
    searched = json.load(f)["search"]
  assert e5["variants"]["proxy_memory"]["0"]["1"]["structure"] == searched["structure"]
  assert e5["variants"]["uniform"]["0"]["1"]["evaluations"] == 1
  l1 = e5["variants"]["l1_oneshot"]["0"]["1"]
  assert l1["evaluations"] == 1 and abs(l1["flops_ratio"] / 0.75 - 1) <= 0.02

  with open(os.path.join(wd, "experiments.md")) as f:
    md = f.read()
  for heading in ("## C1", "## C2", "## C3", "## C4", "## C5", "## C6", "## C7"):
    assert heading in md
  assert "| FID | E2_k0.5 | E0 |" in md and "| proxy_memory |" in md and "## E6" in md
  assert os.path.exists(os.path.join(wd, "experiments.png"))
  # E6 reused the reference arm's search: its pruning records are E2's.
  for f in sorted(os.listdir(os.path.join(tdc_dir, "pruning"))):
    if f.endswith(".json"):
      with (
        open(os.path.join(tdc_dir, "pruning", f)) as a,
        open(os.path.join(seed, "E6", "pruning", f)) as b,
      ):
        assert json.load(a) == json.load(b), f
  _check_e6(config, wd, runs["seed0/E6"])

  # Resume: every arm has its record, so nothing trains, searches or evaluates again.
  mtimes = {a: os.path.getmtime(os.path.join(seed, a, "experiment.json")) for a in runs_arms(runs)}

  def refuse(*args, **kwargs):
    raise AssertionError("a finished arm was run again")

  monkeypatch.setattr(arms, "train_single", refuse)
  monkeypatch.setattr(arms, "train_tdc_arm", refuse)
  monkeypatch.setattr(arms, "train_supernet_arm", refuse)
  monkeypatch.setattr(pruner_ablation, "run_pruners", refuse)
  monkeypatch.setattr(eval_lib, "evaluate", refuse)
  again = experiments.run_experiments(config, wd, seeds=[0], arms=arm_names, devices=one)
  assert again["runs"] == runs
  for a, m in mtimes.items():
    assert os.path.getmtime(os.path.join(seed, a, "experiment.json")) == m
  # --report_only reports what is finished and starts nothing (E1 and seed 1 never ran).
  report = experiments.run_experiments(
    config, wd, seeds=[0, 1], arms=["E1", "E2"], devices=one, report_only=True
  )
  assert report["seeds"] == [0] and list(report["table"]) == ["stage1", "E2_k0.5"]
  assert not os.path.exists(os.path.join(wd, "seed1"))


def runs_arms(runs):
  return [k.split("/")[1] for k in runs]


def _record(arm, l_simple, fid, groups, ratio=1.0, cost=1.0):
  return {
    "arm": arm,
    "heldout": {
      "l_simple": l_simple,
      "vlb_bpd": 10 * l_simple,
      "groups": [{"l_simple": v, "vlb_bpd_per_step": v} for v in groups],
    },
    "samples": {"fid": fid, "kid_mean": fid / 100},
    "sampling_flops_ratio": ratio,
    "training_cost": {"stage1": 3, "stage2": 3 * cost, "single_model": 6, "ratio": cost},
  }


def test_claims_tables_have_a_row_per_claim_and_paired_verdicts(tmp_path):
  config = campaign_config()
  results = {}
  for s in range(3):
    jitter = 0.01 * s
    results[f"seed{s}/E0"] = _record("E0", 0.30 + jitter, 20 + s, [0.5, 0.1 + jitter])
    results[f"seed{s}/E0plus"] = _record("E0plus", 0.29 + jitter, 19 + s, [0.5, 0.09 + jitter])
    # E1 is lower than E0+ in group 1 every seed, equal in group 0.
    results[f"seed{s}/E1"] = _record("E1", 0.28 + jitter, 18 + s, [0.5, 0.05], cost=0.99)
    # The reference E2 is better than E0 on loss every seed but worse on FID in one.
    fid = 25.0 if s == 2 else 19.0 + s
    results[f"seed{s}/E2_k0.5"] = _record(
      "E2_k0.5", 0.25 + jitter, fid, [0.45, 0.05], ratio=0.8, cost=0.98
    )
  summary = claims.summarize(results, config)
  c = summary["claims"]
  c1 = c["C1"]["vs"]["E0"]
  assert c1["L_simple"]["wins"] == 3 and c1["L_simple"]["verdict"] == "better"
  assert c1["FID"]["wins"] == 2 and c1["FID"]["verdict"] == "within noise"
  assert c["C1"]["sampling_flops_ratio"]["mean"] == pytest.approx(0.8)
  assert c["C2"]["groups_won_vs_E0plus_on_seed_mean"] == 1
  assert c["C2"]["per_group"]["E0plus"][0]["l_simple"]["verdict"] == "within noise"
  assert c["C2"]["per_group"]["E0plus"][1]["l_simple"]["wins"] == 3
  assert c["C4"]["vs"]["E4"]["L_simple"]["verdict"] == "not run"
  assert set(c["C7"]["arms"]) == {"E1", "E2_k0.5"} and all(
    v["holds"] for v in c["C7"]["arms"].values()
  )
  path = str(tmp_path / "experiments.md")
  report.write_markdown(path, summary, "cmd")
  with open(path) as f:
    md = f.read()
  assert (
    "| L_simple | E2_k0.5 | E0 | 0.2600 ± 0.0100 | 0.3100 ± 0.0100 | -0.0500 ± 0.0000 | 3/3 |" in md
  )
  assert "| 1 | E0plus |" in md and "| E1 | TDC, N=2, full width |" in md


def test_pruner_claims_pair_every_search_and_measure_the_proxy_seed_spread():
  def res(score, evals):
    return {"score": score, "evaluations": evals, "rounds": 2, "flops_ratio": 0.75}

  results = {}
  for s in range(2):
    # Group 1: memory ties uniform at proxy seed 0 and beats it at seed 1; group 2: loses once.
    mem = {"0": {"1": res(0.10, 5), "2": res(0.20, 6)}, "1": {"1": res(0.12, 5), "2": res(0.22, 6)}}
    uni = {"0": {"1": res(0.10, 1), "2": res(0.19, 1)}, "1": {"1": res(0.15, 1), "2": res(0.30, 1)}}
    results[f"seed{s}/E5"] = {
      "pruners": {"groups": [1, 2], "variants": {"proxy_memory": mem, "uniform": uni}}
    }
  c6 = claims.pruner_claims(results, [0, 1])
  u = c6["variants"]["uniform"]
  assert u["cells"] == {"lower": 4, "tie": 2, "higher": 2}
  assert c6["variants"]["proxy_memory"]["cells"] == {"lower": 0, "tie": 8, "higher": 0}
  assert u["evaluations_all_cells"]["mean"] == 1.0
  assert c6["variants"]["proxy_memory"]["evaluations_all_cells"]["mean"] == 5.5
  # Std over the two proxy seeds, per (seed, group): group 1 0.0354, group 2 0.0778.
  assert u["spread_over_proxy_seeds"] == pytest.approx((0.05 + 0.11) / 2 / np.sqrt(2))
  # At proxy seed 0 (the per-seed means 0.15 vs 0.145), memory is not lower on either seed.
  assert u["proxy_memory_wins"] == 0 and u["n"] == 2


def test_bad_arms_are_refused_with_the_valid_names():
  config = campaign_config()
  with pytest.raises(ConfigError, match=r"--arms='E9'.*E2_k0.5"):
    arms.select_arms(config, ["E1", "E9"])
  # E0+ continues E0; a family expands to its arms.
  names = [a.name for a in arms.select_arms(config, ["E0+", "E2"])]
  assert names == ["E0", "E0plus", "E2_k0.5"]
  full = campaign_config()
  full.experiments.ks = (0.3, 0.7)
  full.experiments.num_groups = (4,)
  full.experiments.reversed = True
  full.experiments.groupings = ("uniform_t", "random")
  names = [a.name for a in arms.select_arms(full, ["E2", "E3"])]
  # The config's own grouping (uniform_t here) is E2's reference, not an E3 arm.
  assert names == ["E2_k0.3", "E2_k0.5", "E2_k0.7", "E2_N4", "E2_rev", "E3_random"]


def test_binary_reports_a_bad_arm_in_one_line(tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "adaptive.experiments", "--config=configs/adaptive.py:digits",
     f"--workdir={tmp_path / 'x'}", "--arms=E1,E7"],
    capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), timeout=120,
  )  # fmt: skip
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith("error: config error: --arms='E7'")
  assert not os.path.exists(tmp_path / "x")


def test_a_campaign_directory_refuses_another_config(tmp_path):
  wd = str(tmp_path / "arms")
  os.makedirs(wd)
  config = campaign_config()
  experiments.check_campaign_config(config, wd)
  config.experiments.ks = (0.3, 0.5)  # which arms exist may change
  experiments.check_campaign_config(config, wd)
  config.total_steps = 12
  with pytest.raises(ConfigError, match=r"total_steps=12.*was made with 6"):
    experiments.check_campaign_config(config, wd)
