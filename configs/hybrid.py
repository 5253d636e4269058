"""Multi-user hybrid inference of personalized diffusion models (arXiv 2411.15781).

Presets (``--config=configs/hybrid.py:<preset>``):

* ``sim``        the scheduler on the paper's simulator (spec §4-§8): T = 200, n in [80, 200],
                 capacity 18, up to 20 users, W = 100 MHz, eta = 10, the official code's
                 transmission formula, the paper's accuracy sigmoid and GPU table. One PER-DQN
                 agent is trained in the dynamic setting (G in {4, 8, 12, 16} and N in
                 {4, 8, ..., 20} drawn per episode) for 8,000 episodes instead of the code's
                 30,000 per setting (the spec's CPU budget, §11 D), epsilon decaying over 5,000;
                 evaluated on 30 held-out scenarios per (G, N).
* ``sim_static`` one agent per (G, N) cell of the grid (the code's ``SCOM_SUN_SUC`` layout),
                 3,000 episodes each: 20 agents, hours on a CPU.
* ``digits``     the model half (spec §11 A/B) on sklearn's 8x8 digits: U = 4 users, user i's subject
                 is digit class ``hybrid.user_classes[i]`` with ``hybrid.shots`` = 8 images of it
                 (DreamBooth's few-shot set); the cluster-wide model is a DDPM on the generic digits
                 (the other classes) plus the union of the users' shots; each personalized model is
                 fine-tuned from it on its user's shots; T = 200, linear betas, full ancestral chain.
                 About 10 minutes on 2 CPU cores (``python -m hybrid.train``).
* ``tiny``       a seconds-long run for the tests: a small network, a 2 x 2 grid, 2 users, T = 24.

The scheduler's fields live under ``scheduler.*``; the rest of the file is ``ddpm.base_config()``
so that the model half of hybrid (cluster-wide and personalized models, T = 200) shares it.
``scheduler.profile`` is ``paper`` or the path of a measured profile JSON (the layout is in
``hybrid/system.py``; ``hybrid.profile`` writes one). The physical transmission formula:
``--config.scheduler.system.transmission=physical``. Every ``scheduler.*`` field is checked by
``hybrid.optimize.validate`` before the binary reads or writes anything (one line, exit 2).
``RENAMED`` maps the names fields had before the cut point got one name
(``--config.hybrid.eval_split``) to their names now; ``hybrid.train`` and ``hybrid.optimize``
answer an old command line with the new name, and a run saved before reads and resumes as it was
(``hybrid.fields``).

The model half's fields live under ``hybrid.*`` (``_models``). Stage 1 (the cluster-wide model)
uses the top-level ``total_steps``, ``batch_size``, ``optimizer`` and ``ema_decay``; stage 2 (the
personalized models) ``hybrid.personal_*``. ``hybrid.cluster_workdir`` takes an existing
``common.train`` run (or a collab run's server) as the cluster-wide model instead of stage 1.
"""

import ml_collections

from configs import ddpm


def _scheduler() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.profile = "paper"  # paper | path/to/profile.json (measured sigmoid and linear latency)

  # The official simulator's constants (hybrid.system.SystemParams, field for field).
  s.system = ml_collections.ConfigDict()
  s.system.num_steps = 200  # T: denoising steps per image
  s.system.min_cut_point = 80.0  # n_min: A is concave on [n_min, T]
  s.system.capacity = 18  # C: users per edge batch
  s.system.max_users = 20  # rows of the agent's state
  s.system.window = 1.0  # K (s)
  s.system.bandwidth_hz = 100e6  # W
  s.system.spectral_efficiency = 10.0  # eta
  s.system.prompt_bits = 216.0  # S_p
  s.system.latent_bits = 4.4e6  # S_z
  s.system.transmission = "code"  # code: B S / W * eta (released) | physical: B S / (W eta)
  s.system.alpha_upper_scale = 0.05

  # Training scenarios: static = one agent per (G, N) of the eval grid; dynamic = one agent,
  # G and N drawn per episode from these lists.
  s.setting = "dynamic"
  s.train_num_gpus = (4.0, 8.0, 12.0, 16.0)
  s.train_num_users = (4, 8, 12, 16, 20)

  # PER-DQN (hybrid.agent.AgentConfig, field for field) and the loop; the code's values.
  a = s.agent = ml_collections.ConfigDict()
  a.episodes = 30_000  # per agent
  a.hidden = 256
  a.depth = 3
  a.embed_dim = 3
  a.learning_rate = 1e-4
  a.weight_decay = 4e-4
  a.grad_clip_norm = 2.0
  a.gamma = 1.0
  a.batch_size = 128
  a.terminal_fraction = 0.125
  a.capacity = 400_000
  a.learn_start = 5000
  a.target_every = 2000
  a.replay = "prioritized"  # prioritized | uniform
  a.priority_exponent = 0.7
  a.priority_eps = 2e-5
  a.priority_clip = 1.0
  a.beta_start = 0.3
  a.beta_increment = 1.3e-6
  a.apply_is_weights = False  # the code computes the IS weights but does not use them
  a.eps_start = 0.5
  a.eps_min = 0.001
  a.eps_decay_start = 500
  a.eps_decay_episodes = 10_000
  a.log_every_episodes = 500
  a.ckpt_every_episodes = 1000
  s.plain_dqn = False  # also train the same agent with uniform replay (plain DQN) and compare
  # results.md's storage and memory table (hybrid.footprint): compiles the models' sampling
  # programs (~10 s on 2 CPU cores), which the main job's scheduler run skips.
  s.footprint = True

  # Evaluation on held-out scenarios (seeded apart from training).
  e = s.eval = ml_collections.ConfigDict()
  e.num_gpus = (4.0, 8.0, 12.0, 16.0)
  e.num_users = (4, 8, 12, 16, 20)
  e.scenarios = 30  # per (G, N)
  e.seed_offset = 1_000_003  # eval scenarios: seed + seed_offset, never a training stream
  e.enum_max_users = 16  # exhaustive enumeration (2^N admissions) up to this N
  e.ortools_solver = "cp_sat"  # cp_sat | scip
  e.ortools_max_users = 20
  e.ga_population = 100
  e.ga_generations = 200
  e.ga_mutation = 0.1
  e.fixed_cut_points = (80.0, 140.0, 200.0)
  return s


def _models() -> ml_collections.ConfigDict:
  h = ml_collections.ConfigDict()
  h.num_users = 4  # U: personalized models, one stacked parameter tree
  h.user_classes = (0, 1, 2, 3)  # user i's subject: this digit class (len == num_users)
  h.shots = 8  # few-shot images per user (DreamBooth: 5-10), drawn from the train split
  # Generic data of the cluster-wide model besides the users' shots: other_classes (every train
  # image of a class no user has) | all (every train image, the users' classes included).
  h.generic = "other_classes"
  h.union_repeats = 5  # the union of the shots is repeated this often in the cluster's data
  h.cluster_workdir = ""  # an existing common.train / collab run as the cluster-wide model
  h.cluster_step = -1  # its checkpoint (-1: the latest)
  # Stage 2: every user's model fine-tuned from the cluster-wide EMA weights on its own shots.
  h.personal_steps = 300
  h.personal_batch_size = 16  # per user
  h.personal_learning_rate = 5e-4
  h.personal_warmup_steps = 20
  h.personal_ema_decay = 0.98
  # DreamBooth's prior preservation: + prior_weight * the same loss on a batch of generic images
  # (real generic data stands in for the frozen model's class-prior samples). 0 disables it.
  h.prior_weight = 0.0
  # How the U users' steps are laid out (common.train.parties, as collab's client_loop): vmap
  # (accelerators), scan (XLA:CPU: one user's network compiled, 15 s of XLA against 30 s on
  # digits), unroll (U networks compiled; the same bits as scan). A resume may change it.
  h.user_loop = "scan"
  h.eval_cut_point = 100  # cut point n of the samples common.eval and the training grid draw
  # hybrid.profile: the personalized-accuracy index at these cut points, the latency fit.
  p = h.profile = ml_collections.ConfigDict()
  p.cut_points = tuple(range(0, 201, 20))
  p.seeds_per_user = 32  # samples per (user, cut point); seed s is shared by every user
  p.pai_scale = 1.0  # the paper's 3 maps CLIP cosine (~0.33) to ~1; our Sim is a probability
  p.diff_sharpness = 30.0  # PAI_raw = scale Sim sigmoid(sharpness (Diff - d0))
  p.d0 = "midrange"  # midrange (of Diff over the cut points) | median (spec §11 A) | a number
  p.batch_sizes = tuple(range(1, 21))
  p.latency_repeats = 30
  p.batch_size = 128  # rows per edge call of the accuracy sweep
  return h


# Fields renamed when the level where a request's latent leaves the edge got one name across the
# methods, ``cut_point`` (issue 21): the old dotted name -> the new one. Read by ``hybrid.fields``
# (old command lines, runs saved with the old names).
RENAMED = {
  "scheduler.system.min_split": "scheduler.system.min_cut_point",
  "scheduler.eval.fixed_splits": "scheduler.eval.fixed_cut_points",
  "hybrid.eval_split": "hybrid.eval_cut_point",
  "hybrid.profile.splits": "hybrid.profile.cut_points",
}


def get_config(preset: str = "sim") -> ml_collections.ConfigDict:
  """Returns the config for ``preset``; see the module docstring for the list."""
  c = ddpm.base_config()
  c.method = "hybrid"
  c.seed = 0
  # The paper's Stable Diffusion runs 200 inference steps; the model half trains with T = 200.
  c.diffusion.num_timesteps = 200
  c.diffusion.sample_steps = 200
  c.scheduler = _scheduler()
  c.hybrid = _models()
  s = c.scheduler
  # The model half: the ddpm digits network without attention (the cluster model and U
  # personalized copies train in one process), T = 200 linear (spec §11 A), full ancestral chain.
  c.data.name = "digits"
  c.data.resolution = 8
  c.model.channels = (32, 64)
  c.model.num_res_blocks = 1
  c.model.attention_resolutions = ()
  c.diffusion.schedule = "linear"
  c.diffusion.sampler = "ddpm"
  c.total_steps = 1500  # stage 1, the cluster-wide model
  c.batch_size = 64
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.ema_decay = 0.995
  c.log_every_steps = 100
  c.ckpt_every_steps = 500
  c.sample_every_steps = 0
  c.num_sample_images = 32
  # One device: the stacked users' batch is not split over a mesh (XLA:CPU mis-sharded vmapped
  # convs in collab; on 2 cores more devices buy nothing).
  c.mesh.data = 1
  if preset in ("digits", "sim"):
    # digits keeps sim's scheduler so that its measured profile.json plugs into the same run.
    # ~50 ms an episode on 2 CPU cores (one learner step per environment step).
    s.agent.episodes = 8000
    s.agent.eps_decay_episodes = 5000
  elif preset == "sim_static":
    s.setting = "static"
    s.agent.episodes = 3000
    s.agent.learn_start = 2000
    s.agent.eps_decay_episodes = 2000
  elif preset == "tiny":
    s.agent.episodes = 60
    s.agent.hidden = 32
    s.agent.depth = 2
    s.agent.batch_size = 16
    s.agent.capacity = 4000
    s.agent.learn_start = 50
    s.agent.target_every = 50
    s.agent.learning_rate = 1e-3
    s.agent.eps_decay_start = 10
    s.agent.eps_decay_episodes = 40
    s.agent.log_every_episodes = 20
    s.agent.ckpt_every_episodes = 30
    s.train_num_gpus = (4.0, 16.0)
    s.train_num_users = (4, 8)
    s.eval.num_gpus = (4.0, 16.0)
    s.eval.num_users = (4, 8)
    s.eval.scenarios = 3
    s.eval.ga_population = 20
    s.eval.ga_generations = 10
    s.eval.enum_max_users = 8
    # A seconds-long model half: 2 users, T = 24 (the linear schedule needs T > 20).
    c.diffusion.num_timesteps = 24
    c.diffusion.sample_steps = 24
    c.model.channels = (8,)  # one level: half the compile time of two
    c.model.num_heads = 1
    c.total_steps = 4
    c.batch_size = 8
    c.ckpt_every_steps = 4
    c.log_every_steps = 2
    c.optimizer.warmup_steps = 0
    c.num_sample_images = 4
    h = c.hybrid
    h.num_users = 2
    h.user_classes = (0, 1)
    h.shots = 3
    h.personal_steps = 2
    h.personal_batch_size = 4
    h.personal_warmup_steps = 0
    h.eval_cut_point = 12
    h.profile.cut_points = (0, 6, 12, 18, 24)
    h.profile.seeds_per_user = 4
    h.profile.batch_sizes = (1, 2, 3, 4)
    h.profile.latency_repeats = 3
  else:
    raise ValueError(
      f"configs/hybrid.py: unknown preset {preset!r}; allowed: digits, sim, sim_static, tiny"
    )
  return c
