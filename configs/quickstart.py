"""The quickstart's plan of runs: ``python -m common.quickstart --workdir=runs/quickstart``.

Presets (``--config=configs/quickstart.py:<preset>``):

* ``default``  every method on the embedded data, cut down to fit about 15 minutes on 2 CPU cores
               (the measured time is in README.md): the DDPM baseline; CollaFuse at t_cut = 20
               against local-only (t_cut = T); TDC groups against its own stage-1 single model;
               TFDiff Config I and II against the DDPM U-Net; the hybrid scheduler against the
               exact optimum and the simple policies; cdc's generated parameters against the static
               model and few-shot fine-tuning. Quality here is that of minutes of training: the
               figures compare arms trained alike, not the methods at their presets' budgets.
* ``tiny``     the same plan with tiny models and a handful of steps (the tests).

Each entry of ``runs`` is one binary launched as a user would launch it::

  python -m <module> [--config=<config>] --workdir=<quickstart workdir>/<workdir> \\
      [--config.<override> ...] [<args> ...]

Fields: ``module``; ``config`` (``configs/<file>.py:<preset>``, empty for binaries without one);
``workdir`` (relative to the quickstart's); ``overrides`` (``key=value`` -> ``--config.key=value``);
``args`` (other flags, verbatim); ``done`` (a file under the workdir whose existence, after a
successful exit, marks the entry finished; empty: the exit alone); ``needs`` (entries that must
succeed first); ``estimate_s`` (the ETA's prior, seconds on 2 quiet cores); ``enabled``;
``report`` (for entries whose output is a result row: ``section``, ``label``, ``baseline``,
the name of the row it is compared with, or ``baseline_arm``, an arm of its own headline;
``primary``, another figure than the run's own primary, e.g. ``fid_groups_mean``).
``{workdir}`` in overrides and args is the quickstart's workdir. ``order`` is the launch order.
Disable an entry from the command line: ``--config.runs.hybrid_models.enabled=false``.
"""

import ml_collections

# hybrid.train / hybrid.profile (the model half of hybrid) give the scheduler a profile measured
# from this run's own models. False: the scheduler runs on the paper's profile and the two entries
# are disabled (a plan without the model half's cost).
HYBRID_MEASURED_PROFILE = True


def entry(
  module,
  workdir,
  *,
  config="",
  overrides=(),
  args=(),
  done="",
  needs=(),
  estimate_s=60.0,
  enabled=True,
  section="",
  label="",
  baseline="",
  baseline_arm="",
  primary="",
):
  """One run of the plan (the fields are described in the module docstring)."""
  e = ml_collections.ConfigDict()
  e.module = module
  e.config = config
  e.workdir = workdir
  e.overrides = tuple(overrides)
  e.args = tuple(args)
  e.done = done
  e.needs = tuple(needs)
  e.estimate_s = float(estimate_s)
  e.enabled = enabled
  e.report = ml_collections.ConfigDict()
  e.report.section = section
  e.report.label = label
  e.report.baseline = baseline
  e.report.baseline_arm = baseline_arm
  e.report.primary = primary
  return e


def _eval(workdir, needs, *, samples, estimate_s, extra=(), **report):
  return entry(
    "common.eval",
    workdir,
    args=(f"--num_samples={samples}", f"--batch_size={samples}", *extra),
    done="eval/metrics.json",
    needs=needs,
    estimate_s=estimate_s,
    **report,
  )


def _train_common(steps, *, log_every, extra=()):
  """Overrides every training entry shares: its step count, logging, one final checkpoint."""
  return (
    f"total_steps={steps}",
    f"log_every_steps={log_every}",
    f"ckpt_every_steps={steps}",
    f"sample_every_steps={steps}",
    "keep_checkpoints=1",
    *extra,
  )


def _plan(sizes: dict) -> ml_collections.ConfigDict:
  s = sizes
  r = ml_collections.ConfigDict()
  n = s["eval_samples"]
  ev = s["eval_estimate_s"]
  # --- The DDPM baseline: the U-Net every generative method is compared with. ------------------
  r.train_ddpm = entry(
    "common.train",
    "ddpm",
    config="configs/ddpm.py:digits",
    overrides=_train_common(s["ddpm_steps"], log_every=s["log_every"], extra=s["ddpm"]),
    estimate_s=s["est"]["train_ddpm"],
  )
  r.ddpm = _eval(
    "ddpm", ("train_ddpm",), samples=n, estimate_s=ev, section="ddpm", label="DDPM U-Net"
  )
  # --- CollaFuse at one cut point against local-only (t_cut = T: the server owns no step). -----
  for name, cut in (("collab_cut", s["collab_cut"]), ("collab_local", s["collab_T"])):
    r[f"train_{name}"] = entry(
      "collab.train",
      name,
      config="configs/collab.py:digits",
      overrides=_train_common(
        s["collab_steps"], log_every=s["log_every"], extra=(f"cut_point={cut}", *s["collab"])
      ),
      estimate_s=s["est"]["train_collab"],
    )
    r[name] = _eval(
      name,
      (f"train_{name}",),
      samples=n,
      estimate_s=ev,
      section="collab",
      label=f"CollaFuse t_cut={cut}" if cut < s["collab_T"] else f"local-only (t_cut=T={cut})",
      baseline="collab_local" if name == "collab_cut" else "",
      # Each client against its own held-out data: the pooled FID compares a few clients'
      # classes with every class of the test split.
      primary="fid_groups_mean",
    )
  # --- TFDiff Config I (s=2) and II (s=1) against the DDPM U-Net. -------------------------------
  for k, stride in (("1", 2), ("2", 1)):
    r[f"train_mobile_config{k}"] = entry(
      "mobile.train",
      f"mobile_config{k}",
      config=f"configs/mobile.py:digits_config{k}",
      overrides=_train_common(s["mobile_steps"], log_every=s["log_every"], extra=s["mobile"]),
      estimate_s=s["est"][f"train_mobile{k}"],
    )
    r[f"mobile_config{k}"] = _eval(
      f"mobile_config{k}",
      (f"train_mobile_config{k}",),
      samples=n,
      estimate_s=ev,
      section="mobile",
      label=f"TFDiff Config {'I' * int(k)} (stride {stride})",
      baseline="ddpm",
    )
  # --- TDC: stage 1 (the single model, adaptive/stage1) then groups, pruning, stage 2. ----------
  r.train_adaptive = entry(
    "adaptive.train",
    "adaptive",
    config="configs/adaptive.py:digits",
    overrides=_train_common(s["adaptive_steps"], log_every=s["log_every"], extra=s["adaptive"]),
    done="summary.json",
    estimate_s=s["est"]["train_adaptive"],
  )
  r.adaptive_tdc = _eval(
    "adaptive",
    ("train_adaptive",),
    samples=n,
    estimate_s=ev,
    extra=s["adaptive_eval"],
    section="adaptive",
    label="TDC groups (stage 2)",
    baseline="adaptive_single",
  )
  r.adaptive_single = _eval(
    "adaptive/stage1",
    ("train_adaptive",),
    samples=n,
    estimate_s=ev,
    extra=s["adaptive_eval"],
    section="adaptive",
    label="single model (stage 1)",
  )
  # --- Hybrid: the model half (cluster + personalized models, measured profile), then the
  # scheduler on that profile against the exact optimum and the heuristics. ---------------------
  r.hybrid_models = entry(
    "hybrid.train",
    "hybrid_models",
    config=f"configs/hybrid.py:{s['hybrid_models_preset']}",
    overrides=s["hybrid_models"],
    done="train_summary.json",
    estimate_s=s["est"]["hybrid_models"],
    enabled=HYBRID_MEASURED_PROFILE,
  )
  r.hybrid_profile = entry(
    "hybrid.profile",
    "hybrid_models",
    args=s["hybrid_profile"],
    done="profile.json",
    needs=("hybrid_models",),
    estimate_s=s["est"]["hybrid_profile"],
    enabled=HYBRID_MEASURED_PROFILE,
  )
  profile = "{workdir}/hybrid_models/profile.json" if HYBRID_MEASURED_PROFILE else "paper"
  r.hybrid = entry(
    "hybrid.optimize",
    "hybrid",
    config=f"configs/hybrid.py:{s['hybrid_preset']}",
    overrides=(f"scheduler.profile={profile}", *s["hybrid"]),
    done="headline.json",
    needs=("hybrid_profile",) if HYBRID_MEASURED_PROFILE else (),
    estimate_s=s["est"]["hybrid"],
    section="hybrid",
    label="DRL-convex scheduler"
    + (" (profile measured from this run's models)" if HYBRID_MEASURED_PROFILE else ""),
    baseline_arm="optimum",
  )
  # --- cdc: pretrain the device model, meta-train the FDA, evaluate every arm. ----------------
  r.cdc_pretrain = entry(
    "cdc.pretrain",
    "cdc",
    config=f"configs/cdc.py:{s['cdc_preset']}",
    overrides=s["cdc"],
    done="pretrain.npz",
    estimate_s=s["est"]["cdc_pretrain"],
  )
  r.cdc_train = entry(
    "cdc.train",
    "cdc",
    config=f"configs/cdc.py:{s['cdc_preset']}",
    overrides=s["cdc"],
    done="fda.npz",
    needs=("cdc_pretrain",),
    estimate_s=s["est"]["cdc_train"],
  )
  r.cdc = entry(
    "cdc.evaluate",
    "cdc",
    done="headline.json",
    needs=("cdc_train",),
    estimate_s=s["est"]["cdc_evaluate"],
    section="cdc",
    label="generated parameters (FDA)",
    baseline_arm="static",
  )
  return r


ORDER = (
  "train_ddpm",
  "ddpm",
  "hybrid_models",
  "hybrid_profile",
  "hybrid",
  "cdc_pretrain",
  "cdc_train",
  "cdc",
  "train_mobile_config1",
  "mobile_config1",
  "train_mobile_config2",
  "mobile_config2",
  "train_collab_cut",
  "collab_cut",
  "train_collab_local",
  "collab_local",
  "train_adaptive",
  "adaptive_tdc",
  "adaptive_single",
)


def _default_sizes() -> dict:
  return {
    "log_every": 50,
    "eval_samples": 200,
    "eval_estimate_s": 25,
    "ddpm_steps": 600,
    "ddpm": (),
    "collab_steps": 400,
    "collab_cut": 20,
    "collab_T": 100,
    "collab": ("num_clients=2",),
    "mobile_steps": 500,
    "mobile": (),
    "adaptive_steps": 500,
    "adaptive": (
      # digits' DDPM learning rate: the preset's 2e-4 is for its 4,000 steps, not 500.
      "optimizer.learning_rate=1e-3",
      "adaptive.grouping.num_groups=2",
      "adaptive.pruner.proxy_steps=5",
      "adaptive.pruner.proxy_batch=32",
      "adaptive.pruner.proxy_eval_examples=64",
      "adaptive.pruner.max_rounds=1",
      "adaptive.pruner.max_evals_per_round=1",
    ),
    "adaptive_eval": ("--sample_steps=50",),
    # digits: sim's scheduler next to the model half's fields, so its profile.json plugs in.
    "hybrid_preset": "digits" if HYBRID_MEASURED_PROFILE else "sim",
    "hybrid_models_preset": "digits",
    "hybrid_models": (
      "total_steps=400",
      "log_every_steps=50",
      "ckpt_every_steps=400",
      "hybrid.personal_steps=100",
      "hybrid.profile.splits=(0,40,80,120,160,200)",
      "hybrid.profile.batch_sizes=(1,2,4,8,12,16,20)",
    ),
    "hybrid_profile": ("--seeds_per_user=8", "--latency_repeats=5"),
    "hybrid": (
      "scheduler.agent.episodes=800",
      "scheduler.agent.eps_decay_start=100",
      "scheduler.agent.eps_decay_episodes=500",
      "scheduler.agent.learn_start=1000",
      "scheduler.agent.log_every_episodes=100",
      "scheduler.agent.ckpt_every_episodes=400",
      "scheduler.eval.num_gpus=(4.0,8.0,16.0)",
      "scheduler.eval.num_users=(4,8,12)",
      "scheduler.eval.scenarios=10",
      "scheduler.train_num_gpus=(4.0,8.0,16.0)",
      "scheduler.train_num_users=(4,8,12)",
      "scheduler.eval.enum_max_users=12",
    ),
    "cdc_preset": "moving_shapes",
    "cdc": (
      "cdc.pretrain.steps=300",
      "total_steps=300",
      "data.source_train_videos=1500",
      "data.num_heldout=4",
      "cdc.eval.selectors=('k_center','random')",
      "cdc.eval.anchor_counts=(16,)",
      "cdc.finetune.shots=(5,20)",
    ),
    # Rough seconds on 2 idle CPU cores (README.md's run on a shared machine took 1.2-2.5x
    # these); the ETA rescales them by the measured times of the runs so far.
    "est": {
      "train_ddpm": 70,
      "train_collab": 70,
      "train_mobile1": 40,
      "train_mobile2": 150,
      "train_adaptive": 200,
      "hybrid_models": 90,
      "hybrid_profile": 40,
      "hybrid": 30,
      "cdc_pretrain": 60,
      "cdc_train": 35,
      "cdc_evaluate": 40,
    },
  }


def _tiny_sizes() -> dict:
  # One device: the tests force 8 CPU devices, which would only add collectives here.
  tiny_unet = ("model.channels=(8,16)", "model.num_res_blocks=1", "batch_size=8", "mesh.data=1")
  return {
    "log_every": 2,
    "eval_samples": 16,
    "eval_estimate_s": 8,
    "ddpm_steps": 2,
    "ddpm": (*tiny_unet, "diffusion.sample_steps=4", "num_sample_images=4"),
    "collab_steps": 2,
    "collab_cut": 4,
    "collab_T": 10,
    "collab": (
      "num_clients=2",
      "mesh.data=1",
      "model.channels=(8,)",
      "model.num_res_blocks=1",
      "batch_size=4",
      "diffusion.num_timesteps=10",
      "diffusion.sample_steps=10",
      "num_sample_images=4",
    ),
    "mobile_steps": 2,
    "mobile": (
      "mesh.data=1",
      "model.width=16",
      "model.depth=2",
      "model.num_heads=2",
      "optimizer.warmup_steps=1",
      "batch_size=8",
      "diffusion.sample_steps=4",
      "num_sample_images=4",
    ),
    "adaptive_steps": 10,
    "adaptive": (
      *tiny_unet,
      "model.attention_resolutions=()",
      "diffusion.num_timesteps=20",
      "diffusion.sample_steps=5",
      "num_sample_images=4",
      "adaptive.stage1_frac=0.2",
      "adaptive.stage2_steps=2",
      "adaptive.grouping.method=uniform_t",
      "adaptive.grouping.num_groups=2",
      "adaptive.pruner.proxy_steps=1",
      "adaptive.pruner.proxy_batch=4",
      "adaptive.pruner.proxy_eval_examples=8",
      "adaptive.pruner.max_rounds=1",
      "adaptive.pruner.max_evals_per_round=1",
    ),
    "adaptive_eval": (),
    "hybrid_preset": "tiny",
    "hybrid_models_preset": "tiny",
    # T = 200 (tiny's 24 would not match the scheduler's T); the network stays tiny.
    "hybrid_models": (
      "diffusion.num_timesteps=200",
      "diffusion.sample_steps=200",
      "hybrid.eval_split=100",
      "hybrid.profile.splits=(0,50,100,150,200)",
    ),
    "hybrid_profile": (),
    "hybrid": (),
    "cdc_preset": "tiny",
    "cdc": (),
    "est": {
      "train_ddpm": 15,
      "train_collab": 20,
      "train_mobile1": 15,
      "train_mobile2": 15,
      "train_adaptive": 30,
      "hybrid_models": 18,
      "hybrid_profile": 11,
      "hybrid": 7,
      "cdc_pretrain": 8,
      "cdc_train": 9,
      "cdc_evaluate": 13,
    },
  }


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  """Returns the plan for ``preset``; see the module docstring for the list."""
  if preset == "default":
    sizes = _default_sizes()
  elif preset == "tiny":
    sizes = _tiny_sizes()
  else:
    raise ValueError(f"configs/quickstart.py: unknown preset {preset!r}; allowed: default, tiny")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.title = "Quickstart: every method on the embedded data"
  c.runs = _plan(sizes)
  c.order = ORDER
  # Lines of a binary's output that the console shows (its log file keeps everything), at most
  # one every `progress_every_s` seconds per run.
  c.progress_pattern = r"ETA|step \d|episode|sampled|error|Error"
  c.progress_every_s = 10.0
  return c
