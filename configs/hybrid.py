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
* ``tiny``       a seconds-long run for the tests: a small network, a 2 x 2 grid.

The scheduler's fields live under ``scheduler.*``; the rest of the file is ``ddpm.base_config()``
so that the model half of hybrid (cluster-wide and personalized models, T = 200) shares it.
``scheduler.profile`` is ``paper`` or the path of a measured profile JSON (the layout is in
``hybrid/system.py``). The physical transmission formula: ``--config.scheduler.system.
transmission=physical``.
"""

import ml_collections

from configs import ddpm


def _scheduler() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.profile = "paper"  # paper | path/to/profile.json (measured sigmoid and linear latency)

  # The official simulator's constants (hybrid.system.SystemParams, field for field).
  s.system = ml_collections.ConfigDict()
  s.system.num_steps = 200  # T: denoising steps per image
  s.system.min_split = 80.0  # n_min: A is concave on [n_min, T]
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
  e.fixed_splits = (80.0, 140.0, 200.0)
  return s


def get_config(preset: str = "sim") -> ml_collections.ConfigDict:
  """Returns the config for ``preset``; see the module docstring for the list."""
  c = ddpm.base_config()
  c.method = "hybrid"
  c.seed = 0
  # The paper's Stable Diffusion runs 200 inference steps; the model half trains with T = 200.
  c.diffusion.num_timesteps = 200
  c.diffusion.sample_steps = 200
  c.scheduler = _scheduler()
  s = c.scheduler
  if preset == "sim":
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
  else:
    raise ValueError(
      f"configs/hybrid.py: unknown preset {preset!r}; allowed: sim, sim_static, tiny"
    )
  return c
