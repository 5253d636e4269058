"""The spec's campaign, arms E0-E6 (§8.3) and claims C1-C7 (§8.4):
``python -m adaptive.experiments --config=configs/adaptive.py:digits --workdir=DIR``.

For every seed, every selected arm is trained as an ordinary workdir ``DIR/seed<s>/<arm>``
(``adaptive.arms``: what each arm is and how it is trained, stage 1 shared per seed; E5's pruner
searches in ``adaptive.pruner_ablation``), then scored (``adaptive.scoring``: paired held-out
losses, FID/KID and FLOPs) into its ``experiment.json``. Writes ``DIR/experiments.json``
(``adaptive.claims``: per arm mean +- std over seeds, the claims with paired wins),
``DIR/experiments.md`` and ``DIR/experiments.png`` (``adaptive.report``). Re-running skips arms
with a current ``experiment.json`` and resumes a cut-off one (every stage of ``adaptive.train``
resumes); ``--report_only`` only rewrites the reports.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from adaptive import arms as arms_lib
from adaptive import claims, pruner_ablation, report, scoring
from common import fileio
from common.train import drift
from common.train.validate import ConfigError

ARM_RECORD = "experiment.json"
CAMPAIGN_CONFIG = "campaign_config.json"


def _e5_key(config) -> dict[str, list]:
  e = config.experiments
  return {"pruners": [str(p) for p in e.pruners], "search_seeds": [int(q) for q in e.search_seeds]}


def _load_record(path: str, num_samples: int) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    rec = json.load(f)
  if rec.get("eval_version") != scoring.EVAL_VERSION or rec.get("num_samples") != num_samples:
    return None
  return rec


def check_campaign_config(config, workdir: str) -> None:
  """Records the config a campaign directory was made with; refuses another one.

  Finished arms are skipped by their records alone, so a directory trained with another B,
  model or pruner must not be reused. ``experiments.*`` (which arms exist) may change.

  Raises:
    ConfigError: the first field that differs from the recorded config.
  """
  now = json.loads(config.to_json_best_effort())
  now.pop("experiments", None)
  path = os.path.join(workdir, CAMPAIGN_CONFIG)
  if not os.path.exists(path):
    fileio.write_json(path, now, indent=1)
    return
  now_flat = drift.flatten(now)
  with open(path) as f:
    before = drift.with_added_fields(drift.flatten(json.load(f)), now_flat)
  for key in sorted(set(before) | set(now_flat)):
    if before.get(key) != now_flat.get(key):
      raise ConfigError(
        key,
        now_flat.get(key),
        f"{workdir} was made with {before.get(key)!r}; use another --workdir for this config",
      )


def run_experiments(
  config,
  workdir: str,
  *,
  seeds: list[int],
  arms: list[str] | None = None,
  devices=None,
  command: str = "",
  report_only: bool = False,
) -> dict[str, Any]:
  """Trains, evaluates and reports the selected arms for every seed; returns the summary.

  Args:
    config: a ``configs/adaptive.py`` config (``total_steps`` is B).
    workdir: the campaign directory (``seed<s>/<arm>`` below it).
    seeds: training seeds, paired across arms.
    arms: ``--arms`` names (families or arms; empty: all).
    devices: the devices every run trains on (default: all).
    command: recorded in the reports.
    report_only: write the reports from the finished arms' records; train nothing.
  """
  from adaptive import proxy

  selected = arms_lib.select_arms(config, arms)
  _validate(config, selected, seeds)
  os.makedirs(workdir, exist_ok=True)
  check_campaign_config(config, workdir)
  programs = proxy.ProgramCache()
  results: dict[str, dict] = {}
  t_start = time.time()
  for seed in seeds:
    _run_seed(
      config, workdir, seed, selected, results, programs=programs, devices=devices,
      report_only=report_only, t_start=t_start,
    )  # fmt: skip

  if not results:
    raise FileNotFoundError(f"{workdir}: no finished arm to report")
  summary = claims.summarize(results, config)
  summary.update(
    {
      "command": command,
      "config": json.loads(config.to_json_best_effort()),
      "arms_run": [a.name for a in selected],
      "runs": results,
    }
  )
  fileio.write_json(os.path.join(workdir, "experiments.json"), summary, indent=1)
  report.write_markdown(os.path.join(workdir, "experiments.md"), summary, command)
  report.write_plot(os.path.join(workdir, "experiments.png"), summary)
  logging.info("wrote %s/experiments.{json,md,png}", workdir)
  return summary


def _validate(config, selected: list[arms_lib.Arm], seeds: list[int]) -> None:
  """Every selected arm's config and the seeds, checked before anything is written."""
  from adaptive import stages

  stages.validate(config)
  for arm in selected:
    if arm.is_tdc:
      stages.validate(arms_lib.arm_config(config, arm, ""))
    if arm.family == "E6":
      from adaptive import supernet

      supernet.validate_widths(config.experiments.e6_widths)
  if not seeds:
    raise ConfigError("--seeds", seeds, "give at least one seed")


def _run_seed(config, workdir: str, seed: int, selected: list[arms_lib.Arm],
              results: dict[str, dict], *, programs, devices, report_only: bool,
              t_start: float) -> None:  # fmt: skip
  """One training seed: each selected arm's record into ``results`` (trained and scored where
  it is missing), then stage 1's own held-out losses."""
  from adaptive import stages, start_checkpoint

  cfg = arms_lib.seed_config(config, seed)
  seed_dir = os.path.join(workdir, f"seed{seed}")
  stage1_dir = os.path.join(seed_dir, arms_lib.STAGE1)
  # Made on first need: a campaign whose records are all current reads no test split.
  reference = functools.cache(lambda: scoring.make_reference(cfg))
  stage1_key = f"seed{seed}/{arms_lib.STAGE1}"
  stage1_record = os.path.join(stage1_dir, ARM_RECORD)
  cached = _load_record(stage1_record, int(config.experiments.num_samples))
  if cached is not None:
    results[stage1_key] = cached
  for arm in selected:
    key = f"seed{seed}/{arm.name}"
    record_path = os.path.join(seed_dir, arm.name, ARM_RECORD)
    rec = _finished_record(cfg, arm, record_path, reference, report_only=report_only)
    if rec is None and not report_only:
      logging.info("[%s] %s (elapsed %.0f s)", key, arm.label, time.time() - t_start)
      rec = _run_arm(cfg, arm, seed_dir, reference, key, programs=programs, devices=devices)
      fileio.write_json(record_path, rec, indent=1)
    if rec is not None:
      results[key] = rec
  s1 = stages.stage1_steps(cfg)
  if (
    stage1_key not in results and not report_only and start_checkpoint.latest_step(stage1_dir) == s1
  ):
    rec = scoring.evaluate_stage1(cfg, stage1_dir, reference(), s1)
    fileio.write_json(stage1_record, rec, indent=1)
    results[stage1_key] = rec


def _finished_record(cfg, arm: arms_lib.Arm, record_path: str, reference, *,
                     report_only: bool) -> dict | None:  # fmt: skip
  """The arm's current record; None where it has to run (again)."""
  cached = _load_record(record_path, int(cfg.experiments.num_samples))
  if cached is not None and arm.family == "E5" and cached.get("e5") != _e5_key(cfg):
    return None  # other pruners or proxy seeds: the finished searches are reused
  if cached is not None and arm.family != "E5" and not report_only:
    arm_dir = os.path.dirname(record_path)
    # Records from before the raw-weight figures were measured: add them, keep the rest.
    missing = {"heldout_raw", "samples_raw"} - set(cached)
    if "heldout_raw" in missing:
      cached["heldout_raw"] = scoring.heldout_raw(arm_dir, reference())
    if "samples_raw" in missing:
      cached["samples_raw"] = scoring.raw_sample_metrics(cfg, arm_dir)
    if missing:
      fileio.write_json(record_path, cached, indent=1)
  return cached


def _run_arm(cfg, arm: arms_lib.Arm, seed_dir: str, reference, key: str, *, programs,
             devices) -> dict[str, Any]:  # fmt: skip
  """Trains (or resumes) one arm after the shared stage 1 and scores it; returns its record."""
  from adaptive import stages

  stage1_dir = os.path.join(seed_dir, arms_lib.STAGE1)
  arms_lib.train_single(cfg, stage1_dir, stages.stage1_steps(cfg), devices=devices)
  arm_dir = os.path.join(seed_dir, arm.name)
  if arm.family == "E5":
    ref_dir = os.path.join(seed_dir, arms_lib.reference_arm_name(cfg))
    return {
      "eval_version": scoring.EVAL_VERSION,
      "arm": arm.name,
      "family": arm.family,
      "seed": int(cfg.seed),
      "num_samples": int(cfg.experiments.num_samples),
      "e5": _e5_key(cfg),
      "pruners": pruner_ablation.run_pruners(cfg, arm_dir, stage1_dir, ref_dir, programs=programs),
    }
  extra = arms_lib.train_arm(cfg, arm, seed_dir, programs=programs, devices=devices)
  rec = scoring.evaluate_arm(cfg, arm, arm_dir, reference(), extra)
  logging.info(
    "[%s] L_simple %.4f VLB %.3f bits/dim FID %.2f, sampling FLOPs %.3f, training %.3f",
    key, rec["heldout"]["l_simple"], rec["heldout"]["vlb_bpd"], rec["samples"]["fid"],
    rec["sampling_flops_ratio"], rec["training_cost"]["ratio"],
  )  # fmt: skip
  return rec


def _define_flags() -> None:
  """Defined only when this module runs as a binary: importing it next to another binary
  (tests, quickstart) must not register a second ``--config``."""
  config_flags.DEFINE_config_file("config", None, "TDC config and preset.")
  flags.DEFINE_string("workdir", None, "Campaign directory (seed<s>/<arm> below it).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds, paired across arms.")
  flags.DEFINE_list("arms", [], f"Arms or families ({', '.join(arms_lib.FAMILIES)}); empty: all.")
  flags.DEFINE_bool("report_only", False, "Only rewrite the reports from finished arms.")


def main(argv):
  del argv
  from common.train import cli

  # A restarted campaign (or the next seed) compiles the same train steps and proxy programs.
  cli.start_binary(persistent_compile_cache=True)
  try:
    run_experiments(
      flags.FLAGS.config,
      flags.FLAGS.workdir,
      seeds=[int(s) for s in flags.FLAGS.seeds],
      arms=list(flags.FLAGS.arms),
      report_only=flags.FLAGS.report_only,
      command="python -m adaptive.experiments " + " ".join(sys.argv[1:]),
    )
  except (ConfigError, FileNotFoundError) as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(2)
  except RuntimeError as e:  # preempted: every finished step is saved
    print(f"stopped: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  from common.train import cli

  app.run(main, flags_parser=cli.parse_flags_or_exit)
