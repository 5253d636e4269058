"""The quickstart's plan of runs: ``python -m common.quickstart --workdir=runs/quickstart``.

Presets (``--config=configs/quickstart.py:<preset>``):

* ``default``  every method on the embedded data, cut down to fit about 13 minutes on 2 CPU cores
               (the measured time is in README.md): the DDPM baseline; CollaFuse at cut_point = 20
               against local-only (cut_point = T); TDC groups against its own stage-1 single model;
               TFDiff Config I and II against the DDPM U-Net; the hybrid scheduler against the
               exact optimum and the simple policies; cdc's generated parameters against the static
               model and few-shot fine-tuning. Every generative arm trains on the same compute,
               ``TRAIN_FLOPS`` (images seen x train FLOPs an image; ``budget``), with an EMA
               scaled to its length (TDC's single model is its stage 1: 0.8 of it). Quality here
               is that of minutes of training, not the methods' at their presets' budgets.
* ``tiny``     the same plan with tiny models and a handful of steps (the tests).

The plan is one *fragment* per method (``FRAGMENTS``, in launch order): a function
``(Preset) -> {name: entry}`` holding that method's runs with their ``default`` and ``tiny`` sizes
side by side (``Preset.pick``). Adding a method to the quickstart is adding one fragment;
``plan(preset, fragments)`` builds a plan from any list of them (the tests add one).

Each entry of ``runs`` is one binary launched as a user would launch it::

  python -m <module> [--config=<config>] --workdir=<quickstart workdir>/<workdir> \\
      [--config.<override> ...] [<args> ...]

Fields: ``module``; ``config`` (``configs/<file>.py:<preset>``, empty for binaries without one);
``workdir`` (relative to the quickstart's); ``overrides`` (``key=value`` -> ``--config.key=value``);
``args`` (other flags, verbatim); ``done`` (a file under the workdir whose existence, after a
successful exit, marks the entry finished; empty: the exit alone); ``needs`` (entries that must
succeed first); ``estimate_s`` (the ETA's prior, seconds on 2 quiet cores); ``enabled``;
``when`` (a switch of this config, ``not <switch>`` for its negation: the entry runs only when it
holds; empty: always); ``alone`` (the run measures time, so no other run may run beside it: it
waits for the running ones to end, and nothing starts until it has ended); ``report`` (for entries whose output is a result row: ``section``,
``label``, ``baseline``, the name of the row it is compared with, or ``baseline_arm``, an arm of
its own headline; ``primary``, another figure than the run's own primary, e.g.
``fid_groups_mean``). ``{workdir}`` in overrides and args is the quickstart's workdir. ``order``
is the launch order (the fragments' entries, one fragment after the other).
Disable an entry from the command line: ``--config.runs.hybrid_models.enabled=false``.

Switches (``--config.<switch>=false``):

* ``hybrid_measured_profile`` (True): ``hybrid.train`` + ``hybrid.profile`` give the scheduler a
  profile measured from this run's own models (``hybrid``); False: the scheduler on the paper's
  profile (``hybrid_paper``), a plan without the model half's cost.

``seeds`` (1): with ``--config.seeds=3`` every generative row and the trainings it needs also run
at seeds 1 and 2 (``<name>_seed<s>`` in ``<workdir>_seed<s>``: ``common.replicates``), and the
report's headline gives mean +- std over the seeds, deltas paired by seed and wins, and says
which differences are within seed noise. It multiplies the generative runs' time by the seeds.

Not a switch of the plan but of how it runs: ``compile_cache`` (True) makes every launch keep its
compiled programs in one persistent JAX cache, ``$SEGDIFF_CACHE/jax`` (``SEGDIFF_COMPILE_CACHE``
for the binaries), so a program that two launches share, or that a relaunch after a failure
repeats, is compiled once; False: every launch compiles all its programs. ``max_parallel`` (0):
how many runs may run at once, 0 for two on a machine without an accelerator and one on a GPU or
TPU host (`common.quickstart.runs_at_a_time`); a run starts when every run it needs has ended,
the longest chain of estimates first (``common.quickstart.start_order``), and an ``alone`` run
(``hybrid.profile``, whose latencies feed hybrid's scheduler) runs with nothing beside it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import ml_collections

PRESETS = ("default", "tiny")


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
  when="",
  section="",
  label="",
  baseline="",
  baseline_arm="",
  primary="",
  alone=False,
  replicate_of="",
  seed=0,
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
  e.when = when
  e.alone = alone
  e.report = ml_collections.ConfigDict()
  e.report.section = section
  e.report.label = label
  e.report.baseline = baseline
  e.report.baseline_arm = baseline_arm
  e.report.primary = primary
  e.report.replicate_of = replicate_of  # common.replicates: the seed-0 row this one repeats
  e.report.seed = seed
  return e


@dataclasses.dataclass(frozen=True)
class Preset:
  """What a fragment is given: the preset, and the sizes every method's runs share."""

  name: str  # default | tiny

  def pick(self, *, default, tiny):
    """A fragment's value for this preset: ``default`` (about 13 minutes in all) or ``tiny``."""
    return tiny if self.name == "tiny" else default

  def train(
    self,
    module: str,
    workdir: str,
    config: str,
    *,
    steps: int,
    extra=(),
    estimate_s,
    done="",
    ema_decay=None,
  ) -> ml_collections.ConfigDict:
    """A training entry: ``steps`` steps at the preset's logging rate, one checkpoint and one
    sample grid at the end, ``ema_decay`` when given, then the fragment's ``extra`` overrides."""
    overrides = (
      f"total_steps={steps}",
      *(() if ema_decay is None else (f"ema_decay={ema_decay}",)),
      f"log_every_steps={self.pick(default=50, tiny=2)}",
      f"ckpt_every_steps={steps}",
      f"sample_every_steps={steps}",
      "keep_checkpoints=1",
      *extra,
    )
    return entry(
      module, workdir, config=config, overrides=overrides, done=done, estimate_s=estimate_s
    )

  def eval(self, workdir: str, needs, *, extra=(), **report) -> ml_collections.ConfigDict:
    """``common.eval`` on a generative workdir, with the preset's sample count."""
    samples = self.pick(default=200, tiny=16)
    return entry(
      "common.eval",
      workdir,
      args=(f"--num_samples={samples}", f"--batch_size={samples}", *extra),
      done="eval/metrics.json",
      needs=needs,
      estimate_s=self.pick(default=25, tiny=8),
      **report,
    )


# Equal training compute (the default plan): every generative arm trains on TRAIN_FLOPS, images
# seen x train FLOPs an image (``common.train.compute``: XLA's count of the lowered step, forward,
# backward, optimizer and EMA, its loops unrolled). 2e12 costs about what the plan's unequal
# budgets cost before (DDPM 3.5e12, TDC 3.6e12, TFDiff Config I 0.54e12 and II 2.3e12).
TRAIN_FLOPS = 2e12
# Train FLOPs an image of each arm at the plan's sizes (``common.train.loop.step_cost``, checked
# by tests/common/test_quickstart.py; on the CPU, where the U-Net's GroupNorm has its hand-written
# backward, common/models/norm_act.py: 0.1% more than autodiff's). TDC's entry is its single
# model's (stage 1): stage 2 gets the FLOPs stage 1 leaves of B steps of it (spec §3.1, C7).
TRAIN_FLOPS_PER_IMAGE = {
  "ddpm": 9.236e7,  # configs/ddpm.py:digits, batch 64
  "mobile_config1": 3.357e7,  # batch 32
  "mobile_config2": 1.444e8,  # batch 32
  "collab_cut": 4.445e7,  # 2 clients x 32: the clients' steps and the server's on the cut images
  "collab_local": 2.230e7,  # cut_point = T: the server trains on nothing
  "adaptive": 1.1273e8,  # the single model, batch 64
}
# Each arm's EMA averages about its last tenth of the steps: decay 1 - 10 / steps leaves the
# random init e^-10 of the average at the end, whatever the arm's length. The presets' decays
# are for their own lengths: adaptive's 0.999 over the 400 stage-1 steps it had here kept
# 0.999^400 = 67% of the init in the weights it scored (FID 546).
EMA_WINDOW_FRACTION = 0.1


def budget(arm: str, images_per_step: int) -> dict:
  """``{"steps", "ema_decay"}`` of ``arm`` under ``TRAIN_FLOPS`` at ``images_per_step``."""
  steps = max(1, round(TRAIN_FLOPS / (TRAIN_FLOPS_PER_IMAGE[arm] * images_per_step)))
  return {"steps": steps, "ema_decay": round(1.0 - 1.0 / (EMA_WINDOW_FRACTION * steps), 6)}


# One device: the tests force 8 CPU devices, which would only add collectives here.
TINY_UNET = ("model.channels=(8,16)", "model.num_res_blocks=1", "batch_size=8", "mesh.data=1")

Fragment = Callable[[Preset], dict]


# ------------------------------------------------------------------------------------------------
# The fragments, one per method. Estimates: rough seconds on 2 idle CPU cores (README.md's run on
# a shared machine took 1.2-2.5x the defaults); the ETA rescales them by the runs so far.


def ddpm(p: Preset) -> dict:
  """The DDPM baseline: the U-Net every generative method is compared with."""
  s = p.pick(
    default=dict(**budget("ddpm", 64), extra=(), estimate_s=45),
    tiny=dict(
      steps=2,
      extra=(*TINY_UNET, "diffusion.sample_steps=4", "num_sample_images=4"),
      estimate_s=15,
    ),
  )
  return {
    "train_ddpm": p.train("common.train", "ddpm", "configs/ddpm.py:digits", **s),
    "ddpm": p.eval("ddpm", ("train_ddpm",), section="ddpm", label="DDPM U-Net"),
  }


def _scheduler(s: dict, workdir: str, preset: str, profile: str, **rest):
  """hybrid's scheduler (``hybrid.optimize``) on ``profile`` against the exact optimum and the
  heuristics, with the sizes ``s`` of the fragment below."""
  return entry(
    "hybrid.optimize",
    workdir,
    config=f"configs/hybrid.py:{preset}",
    # The storage and memory table is hybrid/RESULTS.md's; compiling its programs here would
    # only add to the plan's time.
    overrides=(f"scheduler.profile={profile}", "scheduler.footprint=false", *s["scheduler"]),
    done="headline.json",
    estimate_s=s["est"]["scheduler"],
    section="hybrid",
    baseline_arm="optimum",
    **rest,
  )


def hybrid(p: Preset) -> dict:
  """Hybrid: the model half (cluster + personalized models, measured profile), then the
  scheduler on that profile against the exact optimum and the heuristics; with
  ``hybrid_measured_profile=False`` the scheduler on the paper's profile instead."""
  s = p.pick(
    default=dict(
      # digits: sim's scheduler next to the model half's fields, so its profile.json plugs in.
      preset="digits",
      paper_preset="sim",
      models=(
        "total_steps=400",
        "log_every_steps=50",
        "ckpt_every_steps=400",
        "hybrid.personal_steps=100",
        "hybrid.profile.cut_points=(0,40,80,120,160,200)",
        "hybrid.profile.batch_sizes=(1,2,4,8,12,16,20)",
      ),
      profile=("--seeds_per_user=8", "--latency_repeats=5"),
      scheduler=(
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
      est=dict(models=90, profile=40, scheduler=30),
    ),
    tiny=dict(
      preset="tiny",
      paper_preset="tiny",
      # T = 200 (tiny's 24 would not match the scheduler's T); the network stays tiny.
      models=(
        "diffusion.num_timesteps=200",
        "diffusion.sample_steps=200",
        "hybrid.eval_cut_point=100",
        "hybrid.profile.cut_points=(0,50,100,150,200)",
      ),
      profile=(),
      scheduler=(),
      est=dict(models=18, profile=11, scheduler=7),
    ),
  )
  measured = "hybrid_measured_profile"
  return {
    "hybrid_models": entry(
      "hybrid.train",
      "hybrid_models",
      config=f"configs/hybrid.py:{s['preset']}",
      overrides=s["models"],
      done="train_summary.json",
      estimate_s=s["est"]["models"],
      when=measured,
    ),
    "hybrid_profile": entry(
      "hybrid.profile",
      "hybrid_models",
      args=s["profile"],
      done="profile.json",
      needs=("hybrid_models",),
      estimate_s=s["est"]["profile"],
      when=measured,
      alone=True,  # its latencies are the scheduler's input
    ),
    "hybrid": _scheduler(
      s,
      "hybrid",
      s["preset"],
      "{workdir}/hybrid_models/profile.json",
      needs=("hybrid_profile",),
      when=measured,
      label="DRL-convex scheduler (profile measured from this run's models)",
    ),
    "hybrid_paper": _scheduler(
      s,
      "hybrid_paper",
      s["paper_preset"],
      "paper",
      when=f"not {measured}",
      label="DRL-convex scheduler",
    ),
  }


def cdc(p: Preset) -> dict:
  """cdc: pretrain the device model, meta-train the FDA, evaluate every arm."""
  s = p.pick(
    default=dict(
      preset="moving_shapes",
      overrides=(
        "cdc.pretrain.steps=300",
        "total_steps=300",
        "data.source_train_videos=1500",
        "data.num_heldout=4",
        "cdc.eval.selectors=('k_center','random')",
        "cdc.eval.anchor_counts=(16,)",
        "cdc.finetune.shots=(5,20)",
      ),
      est=dict(pretrain=60, train=35, evaluate=40),
    ),
    tiny=dict(preset="tiny", overrides=(), est=dict(pretrain=8, train=9, evaluate=13)),
  )
  config = f"configs/cdc.py:{s['preset']}"
  return {
    "cdc_pretrain": entry(
      "cdc.pretrain",
      "cdc",
      config=config,
      overrides=s["overrides"],
      done="pretrain.npz",
      estimate_s=s["est"]["pretrain"],
    ),
    "cdc_train": entry(
      "cdc.train",
      "cdc",
      config=config,
      overrides=s["overrides"],
      done="fda.npz",
      needs=("cdc_pretrain",),
      estimate_s=s["est"]["train"],
    ),
    "cdc": entry(
      "cdc.evaluate",
      "cdc",
      done="headline.json",
      needs=("cdc_train",),
      estimate_s=s["est"]["evaluate"],
      section="cdc",
      label="generated parameters (FDA)",
      baseline_arm="static",
    ),
  }


def mobile(p: Preset) -> dict:
  """TFDiff Config I (s=2) and II (s=1) against the DDPM U-Net."""
  s = p.pick(
    default=dict(
      budgets={k: budget(f"mobile_config{k}", 32) for k in "12"}, extra=(), est={"1": 170, "2": 150}
    ),
    tiny=dict(
      extra=(
        "mesh.data=1",
        "model.width=16",
        "model.depth=2",
        "model.num_heads=2",
        "optimizer.warmup_steps=1",
        "batch_size=8",
        "diffusion.sample_steps=4",
        "num_sample_images=4",
      ),
      budgets={k: {"steps": 2} for k in "12"},
      est={"1": 15, "2": 15},
    ),
  )
  runs = {}
  for k, stride in (("1", 2), ("2", 1)):
    runs[f"train_mobile_config{k}"] = p.train(
      "mobile.train",
      f"mobile_config{k}",
      f"configs/mobile.py:digits_config{k}",
      **s["budgets"][k],
      extra=s["extra"],
      estimate_s=s["est"][k],
    )
    runs[f"mobile_config{k}"] = p.eval(
      f"mobile_config{k}",
      (f"train_mobile_config{k}",),
      section="mobile",
      label=f"TFDiff Config {'I' * int(k)} (stride {stride})",
      baseline="ddpm",
    )
  return runs


def collab(p: Preset) -> dict:
  """CollaFuse at one cut point against local-only (cut_point = T: the server owns no step)."""
  s = p.pick(
    default=dict(
      budgets={"collab_cut": budget("collab_cut", 64), "collab_local": budget("collab_local", 64)},
      cut=20,
      T=100,
      extra=("collab.num_clients=2",),
      est=90,
    ),
    tiny=dict(
      budgets={"collab_cut": {"steps": 2}, "collab_local": {"steps": 2}},
      cut=4,
      T=10,
      extra=(
        "collab.num_clients=2",
        "mesh.data=1",
        "model.channels=(8,)",
        "model.num_res_blocks=1",
        "batch_size=4",
        "diffusion.num_timesteps=10",
        "diffusion.sample_steps=10",
        "num_sample_images=4",
      ),
      est=20,
    ),
  )
  runs = {}
  for name, cut in (("collab_cut", s["cut"]), ("collab_local", s["T"])):
    runs[f"train_{name}"] = p.train(
      "collab.train",
      name,
      "configs/collab.py:digits",
      **s["budgets"][name],
      extra=(f"collab.cut_point={cut}", *s["extra"]),
      estimate_s=s["est"],
    )
    runs[name] = p.eval(
      name,
      (f"train_{name}",),
      section="collab",
      label=f"CollaFuse cut_point={cut}" if cut < s["T"] else f"local-only (cut_point=T={cut})",
      baseline="collab_local" if name == "collab_cut" else "",
      # Each client against its own held-out data: the pooled FID compares a few clients'
      # classes with every class of the test split.
      primary="fid_groups_mean",
    )
  return runs


def adaptive(p: Preset) -> dict:
  """TDC: stage 1 (the single model, adaptive/stage1) then groups, pruning, stage 2."""
  s = p.pick(
    default=dict(
      **budget("adaptive", 64),
      extra=(
        # digits' DDPM learning rate: the preset's 2e-4 is for its 4,000 steps, not a few hundred.
        "optimizer.learning_rate=1e-3",
        "adaptive.grouping.num_groups=2",
        "adaptive.pruner.proxy_steps=5",
        "adaptive.pruner.proxy_batch=32",
        "adaptive.pruner.proxy_eval_examples=64",
        "adaptive.pruner.max_rounds=1",
        "adaptive.pruner.max_evals_per_round=1",
      ),
      estimate_s=200,
    ),
    tiny=dict(
      steps=10,
      extra=(
        *TINY_UNET,
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
      estimate_s=30,
    ),
  )
  # Both networks scored alike: the TDC groups (stage 2) and the single model they start from.
  score = functools.partial(
    p.eval,
    needs=("train_adaptive",),
    extra=p.pick(default=("--sample_steps=50",), tiny=()),
    section="adaptive",
  )
  return {
    "train_adaptive": p.train(
      "adaptive.train", "adaptive", "configs/adaptive.py:digits", done="summary.json", **s
    ),
    "adaptive_tdc": score("adaptive", label="TDC groups (stage 2)", baseline="adaptive_single"),
    "adaptive_single": score(
      "adaptive/stage1",
      label=p.pick(
        default="single model (stage 1: 0.8 of the budget)", tiny="single model (stage 1)"
      ),
    ),
  }


# The launch order, one method after the other: the cheap baseline, then the runs without a
# U-Net (hybrid's scheduler, cdc), then the generative methods.
FRAGMENTS: tuple[Fragment, ...] = (ddpm, hybrid, cdc, mobile, collab, adaptive)


def plan(preset: str, fragments=FRAGMENTS) -> ml_collections.ConfigDict:
  """The quickstart config of ``preset`` whose runs are the ``fragments``' entries, in order."""
  if preset not in PRESETS:
    raise ValueError(
      f"configs/quickstart.py: unknown preset {preset!r}; allowed: {', '.join(PRESETS)}"
    )
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.title = "Quickstart: every method on the embedded data"
  c.hybrid_measured_profile = True
  # Seeds per generative arm (common.replicates): 1 is one seed each; n > 1 also trains and
  # scores every generative row at seeds 1 .. n-1 (n times their training) and the report gives
  # mean +- std, deltas paired by seed and wins.
  c.seeds = 1
  c.compile_cache = True
  # Auto: two at a time on a CPU host, where compiles leave a core idle (14 min 47 s against
  # 20 min 12 s one at a time, every figure but hybrid's the same). hybrid.profile is `alone` so
  # that no run beside it inflates the latencies it measures; hybrid's headline still moves
  # between runs (-2.27 to -2.60 in four, two of them with the profile alone: its DRL scheduler
  # answers small latency differences with different plans; benchmarks/RESULTS.md).
  c.max_parallel = 0
  c.runs = ml_collections.ConfigDict()
  order = []
  for fragment in fragments:
    for name, e in fragment(Preset(preset)).items():
      if name in c.runs:
        raise ValueError(f"configs/quickstart.py: two fragments define the run {name!r}")
      c.runs[name] = e
      order.append(name)
  c.order = tuple(order)
  # Lines of a binary's output that the console shows (its log file keeps everything), at most
  # one every `progress_every_s` seconds per run.
  c.progress_pattern = r"ETA|step \d|episode|sampled|error|Error"
  c.progress_every_s = 10.0
  return c


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  """Returns the plan for ``preset``; see the module docstring for the list."""
  return plan(preset)
