"""PER-DQN for the admission MDP (spec §7), in Flax NNX + optax, replay from flashbax.

The official agent, component for component:

* Q-network: status through ``Embed(4, 3)``, the 3 other features of each of the ``max_users``
  rows next to it (6 per row), the 6 global features in front: 126 inputs -> 256 -> 256 -> 256 -> 2,
  LeakyReLU(0.01). PyTorch's default initialization (the code's), so the hyper-parameters mean
  the same.
* Loss: MSE between Q(s, a) and ``r + gamma (1 - done) max_a' Q_target(s', a')``; gamma = 1;
  Adam 1e-4 with PyTorch-style (coupled) weight decay 4e-4, gradient-norm clip 2.0; hard target
  copy every 2000 learner steps (at the first one too); one update per environment step once more
  than 5000 non-terminal transitions are stored; batch 128.
* Prioritized replay: two buffers, non-terminal transitions (7/8 of the capacity, 112 per batch)
  and terminal ones (1/8, 16 per batch), stratified sampling. A transition enters with priority
  ``(|TD| + 2e-5)^0.7`` of its TD error at storage time (the code's ``push``, not PER's max
  priority); after an update its priority is ``min(|TD| + 2e-5, 1)^0.7``. The importance-sampling
  exponent beta goes 0.3 -> 1 by 1.3e-6 per sample; the weights are computed but, as in the code,
  not applied unless ``apply_is_weights``.
* Exploration: epsilon-greedy, epsilon = 0.5 decaying linearly after episode 500 by
  0.5 / 10,000 per episode to 0.001. (The code's Boltzmann temperature is dead code there: its
  softmax branch is commented out.)

``replay="uniform"`` makes the same buffers sample uniformly (priority exponent 0): plain DQN.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import chex
import flashbax as fbx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx, struct

from common import fileio
from common.train.validate import ConfigError
from hybrid import baselines, env, system

REPLAYS = ("prioritized", "uniform")
LOOP_KEYS = {"episodes", "log_every_episodes", "ckpt_every_episodes"}  # scheduler.agent, not ours


@dataclasses.dataclass(frozen=True)
class AgentConfig:
  """PER-DQN hyper-parameters; the defaults are the official code's (spec §7)."""

  hidden: int = 256
  depth: int = 3  # hidden layers
  embed_dim: int = 3
  learning_rate: float = 1e-4
  weight_decay: float = 4e-4
  grad_clip_norm: float = 2.0
  gamma: float = 1.0
  batch_size: int = 128
  terminal_fraction: float = 0.125  # of the batch and of the capacity
  capacity: int = 400_000
  learn_start: int = 5000  # learn once more than this many non-terminal transitions are stored
  target_every: int = 2000
  replay: str = "prioritized"
  priority_exponent: float = 0.7
  priority_eps: float = 2e-5
  priority_clip: float = 1.0
  beta_start: float = 0.3
  beta_increment: float = 1.3e-6
  apply_is_weights: bool = False
  eps_start: float = 0.5
  eps_min: float = 0.001
  eps_decay_start: int = 500
  eps_decay_episodes: int = 10_000

  def __post_init__(self):
    if self.replay not in REPLAYS:
      raise ValueError(f"AgentConfig: replay must be one of {REPLAYS}, got {self.replay!r}")
    if not 0 < self.terminal_fraction < 1:
      raise ValueError("AgentConfig: terminal_fraction must lie in (0, 1)")
    if self.terminal_batch < 1 or self.nonterminal_batch < 1:
      raise ValueError(
        f"AgentConfig: batch_size {self.batch_size} x terminal_fraction "
        f"{self.terminal_fraction} leaves an empty part"
      )
    if self.capacity * self.terminal_fraction < 1:
      raise ValueError("AgentConfig: capacity too small for the terminal buffer")
    if not 0 <= self.priority_exponent <= 1:
      raise ValueError("AgentConfig: priority_exponent must lie in [0, 1]")
    if self.hidden < 1 or self.depth < 1 or self.target_every < 1:
      raise ValueError("AgentConfig: hidden, depth and target_every must be >= 1")

  @property
  def terminal_batch(self) -> int:
    return int(self.batch_size * self.terminal_fraction)

  @property
  def nonterminal_batch(self) -> int:
    return self.batch_size - self.terminal_batch

  @classmethod
  def from_config(cls, c) -> AgentConfig:
    """From a ``scheduler.agent`` ConfigDict; the training loop's keys are skipped."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(c.keys()) - names - LOOP_KEYS
    if unknown:
      raise ValueError(f"scheduler.agent: unknown fields {sorted(unknown)}")
    return cls(**{k: c[k] for k in c.keys() if k in names})

  def epsilon(self, episode: int) -> float:
    """Exploration rate of episode ``episode`` (0-based), as the code's per-episode decrement."""
    decayed = max(0, episode - self.eps_decay_start - 1)
    return max(self.eps_start - self.eps_start / self.eps_decay_episodes * decayed, self.eps_min)


# ------------------------------------------------------------------------------------------------
# The Q-network.


def _torch_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# PyTorch Linear: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class QNetwork(nnx.Module):
  """Q(s, .) of the admission MDP: [B, max_users, 4] and [B, 6] -> [B, 2]."""

  def __init__(self, max_users: int, hidden: int, depth: int, embed_dim: int, *, rngs: nnx.Rngs):
    self.max_users = max_users
    self.status = nnx.Embed(
      env.NUM_STATUS, embed_dim, embedding_init=nnx.initializers.normal(1.0), rngs=rngs
    )
    width = env.GLOBAL_FEATURES + max_users * (embed_dim + env.LOCAL_FEATURES - 1)
    layers = []
    for out in [hidden] * depth + [2]:
      layers.append(
        nnx.Linear(
          width,
          out,
          kernel_init=_torch_kernel_init,
          bias_init=_torch_bias_init(width),
          rngs=rngs,
        )
      )
      width = out
    self.layers = nnx.List(layers)

  def __call__(self, s_l: jax.Array, s_g: jax.Array) -> jax.Array:
    chex.assert_rank([s_l, s_g], [3, 2])
    chex.assert_shape(s_l, (None, self.max_users, env.LOCAL_FEATURES))
    status = self.status(s_l[..., 0].astype(jnp.int32))
    rows = jnp.concatenate([status, s_l[..., 1:]], axis=-1).reshape(s_l.shape[0], -1)
    h = jnp.concatenate([s_g, rows], axis=-1)
    for layer in self.layers[:-1]:
      h = nnx.leaky_relu(layer(h), negative_slope=0.01)
    return self.layers[-1](h)


# ------------------------------------------------------------------------------------------------
# Train state and the jitted pieces.


@struct.dataclass
class TrainState:
  params: Any
  target_params: Any
  opt_state: Any
  replay: tuple[Any, Any]  # flashbax states: (non-terminal, terminal)
  stored: jax.Array  # [2] int32 transitions ever stored in each
  learn_steps: jax.Array  # int32
  beta: jax.Array  # float32
  key: jax.Array


def _item(max_users: int) -> dict[str, jax.Array]:
  return {
    "s_l": jnp.zeros((max_users, env.LOCAL_FEATURES), jnp.float32),
    "s_g": jnp.zeros((env.GLOBAL_FEATURES,), jnp.float32),
    "action": jnp.zeros((), jnp.int32),
    "reward": jnp.zeros((), jnp.float32),
    "next_s_l": jnp.zeros((max_users, env.LOCAL_FEATURES), jnp.float32),
    "next_s_g": jnp.zeros((env.GLOBAL_FEATURES,), jnp.float32),
    "done": jnp.zeros((), jnp.float32),
  }


class PerDQN:
  """The agent: the network's graph, the optimizer, the two replay buffers, jitted steps."""

  def __init__(self, cfg: AgentConfig, max_users: int):
    self.cfg = cfg
    self.max_users = max_users
    model = QNetwork(max_users, cfg.hidden, cfg.depth, cfg.embed_dim, rngs=nnx.Rngs(0))
    self.graphdef, _ = nnx.split(model)
    # torch.optim.Adam's weight_decay is L2 added to the gradient (after the norm clip), not AdamW.
    self.tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm),
      optax.add_decayed_weights(cfg.weight_decay),
      optax.adam(cfg.learning_rate),
    )
    exponent = cfg.priority_exponent if cfg.replay == "prioritized" else 0.0
    terminal_capacity = int(cfg.capacity * cfg.terminal_fraction)
    self.capacities = (cfg.capacity - terminal_capacity, terminal_capacity)
    self.buffers = (
      fbx.make_prioritised_item_buffer(
        max_length=self.capacities[0],
        min_length=1,
        sample_batch_size=cfg.nonterminal_batch,
        priority_exponent=exponent,
      ),
      fbx.make_prioritised_item_buffer(
        max_length=self.capacities[1],
        min_length=1,
        sample_batch_size=cfg.terminal_batch,
        priority_exponent=exponent,
      ),
    )
    self._q = jax.jit(self._q_values)
    self.learn = jax.jit(self._learn, donate_argnums=0)
    self.store = jax.jit(self._store, donate_argnums=0)

  # --- state ------------------------------------------------------------------------------------
  def init(self, seed: int) -> TrainState:
    """A fresh agent: network from ``seed``, empty buffers."""
    model = QNetwork(
      self.max_users, self.cfg.hidden, self.cfg.depth, self.cfg.embed_dim, rngs=nnx.Rngs(seed)
    )
    _, params = nnx.split(model)
    item = _item(self.max_users)
    return TrainState(
      params=params,
      target_params=jax.tree.map(jnp.copy, params),
      opt_state=self.tx.init(params),
      replay=(self.buffers[0].init(item), self.buffers[1].init(item)),
      stored=jnp.zeros((2,), jnp.int32),
      learn_steps=jnp.zeros((), jnp.int32),
      beta=jnp.asarray(self.cfg.beta_start, jnp.float32),
      key=jax.random.key_data(jax.random.key(seed + 1)),
    )

  def _q_values(self, params, s_l, s_g):
    return nnx.merge(self.graphdef, params)(s_l, s_g)

  def q_values(self, params, s_l, s_g) -> jax.Array:
    """Q(s, .): s_l [B, max_users, 4], s_g [B, 6] -> [B, 2] float32."""
    return self._q(params, jnp.asarray(s_l, jnp.float32), jnp.asarray(s_g, jnp.float32))

  def greedy_action(self, params, s_l: np.ndarray, s_g: np.ndarray) -> int:
    """argmax_a Q(s, a) for one state (s_l [max_users, 4], s_g [6]); ties deny."""
    q = np.asarray(self.q_values(params, s_l[None], s_g[None]))[0]
    return int(q[1] > q[0])

  # --- replay -----------------------------------------------------------------------------------
  def _td(self, params, target_params, batch):
    q = self._q_values(params, batch["s_l"], batch["s_g"])
    q_sa = jnp.take_along_axis(q, batch["action"][:, None], axis=1)[:, 0]
    q_next = self._q_values(target_params, batch["next_s_l"], batch["next_s_g"]).max(-1)
    target = batch["reward"] + self.cfg.gamma * (1.0 - batch["done"]) * q_next
    return q_sa - jax.lax.stop_gradient(target)

  def _store(self, ts: TrainState, episode: dict, length) -> TrainState:
    """Adds an episode's transitions with their TD-error priorities.

    Args:
      episode: ``pad_episode`` arrays, leading axis max_users (s_l [U, max_users, 4], s_g [U, 6],
        action, reward, done [U], next_s_l, next_s_g); the first ``length`` are valid and the
        last valid one is the terminal transition.
    """
    err = jnp.abs(self._td(ts.params, ts.target_params, episode))
    priority = err + self.cfg.priority_eps
    one = lambda i: jax.tree.map(lambda v: v[i], episode)

    def add(which, state, i):
      index = state.current_index
      state = self.buffers[which].add(state, one(i))
      return self.buffers[which].set_priorities(state, index[None], priority[i][None])

    nonterminal = jax.lax.fori_loop(0, length - 1, lambda i, s: add(0, s, i), ts.replay[0])
    terminal = add(1, ts.replay[1], length - 1)
    stored = ts.stored + jnp.stack([length - 1, 1]).astype(jnp.int32)
    return ts.replace(replay=(nonterminal, terminal), stored=stored)

  def _learn(self, ts: TrainState) -> tuple[TrainState, jax.Array]:
    """One learner step on 112 non-terminal + 16 terminal samples; returns (state, MSE loss)."""
    cfg = self.cfg
    copy = ts.learn_steps % cfg.target_every == 0
    target = jax.tree.map(lambda p, t: jnp.where(copy, p, t), ts.params, ts.target_params)
    key, k0, k1 = jax.random.split(jax.random.wrap_key_data(ts.key), 3)
    samples = (self.buffers[0].sample(ts.replay[0], k0), self.buffers[1].sample(ts.replay[1], k1))
    batch = jax.tree.map(
      lambda a, b: jnp.concatenate([a, b]), samples[0].experience, samples[1].experience
    )
    beta = jnp.minimum(1.0, ts.beta + cfg.beta_increment)
    sizes = jnp.minimum(ts.stored, jnp.array(self.capacities, jnp.int32))
    weights = []
    for s, size in zip(samples, sizes, strict=True):
      w = (size * s.probabilities) ** (-beta)
      weights.append(w / w.max())
    weights = jnp.concatenate(weights)

    def loss_fn(params):
      td = self._td(params, target, batch)
      if cfg.apply_is_weights:
        return jnp.mean(weights * td**2), td
      return jnp.mean(td**2), td

    (loss, td), grads = jax.value_and_grad(loss_fn, has_aux=True)(ts.params)
    updates, opt_state = self.tx.update(grads, ts.opt_state, ts.params)
    params = optax.apply_updates(ts.params, updates)
    priority = jnp.minimum(jnp.abs(td) + cfg.priority_eps, cfg.priority_clip)
    n0 = cfg.nonterminal_batch
    replay = (
      self.buffers[0].set_priorities(ts.replay[0], samples[0].indices, priority[:n0]),
      self.buffers[1].set_priorities(ts.replay[1], samples[1].indices, priority[n0:]),
    )
    ts = ts.replace(
      params=params,
      target_params=target,
      opt_state=opt_state,
      replay=replay,
      learn_steps=ts.learn_steps + 1,
      beta=beta,
      key=jax.random.key_data(key),
    )
    return ts, loss


def pad_episode(batch: dict[str, np.ndarray], max_users: int) -> tuple[dict[str, np.ndarray], int]:
  """An ``env.rollout`` episode as fixed-shape arrays for ``PerDQN.store``."""
  length = len(batch["action"])
  out = {}
  for k, dtype in (
    ("s_l", np.float32),
    ("s_g", np.float32),
    ("action", np.int32),
    ("reward", np.float32),
    ("next_s_l", np.float32),
    ("next_s_g", np.float32),
    ("done", np.float32),
  ):
    v = np.asarray(batch[k], dtype)
    pad = np.zeros((max_users - length,) + v.shape[1:], dtype)
    out[k] = np.concatenate([v, pad])
  return out, length


# ------------------------------------------------------------------------------------------------
# Deciding with a trained agent.


def drl_decide(
  agent: PerDQN,
  params,
  hybrid_env: env.HybridEnv,
  scn: system.Scenario,
) -> baselines.Decision:
  """DRL-convex: the greedy policy decides admissions user by user, the convex solver the cut
  points."""
  policy = lambda s_l, s_g: agent.greedy_action(params, s_l, s_g)
  s_l, s_g = hybrid_env.reset(scn)
  done = False
  while not done:
    s_l, s_g, done = hybrid_env.step(policy(s_l, s_g))
  utility, admit, cut_points = hybrid_env.outcome()
  return baselines.Decision(admit, cut_points, utility, len(hybrid_env.actions))


# ------------------------------------------------------------------------------------------------
# Training, with resumable checkpoints.


CKPT_NAME = "agent.npz"
PREV_NAME = "agent.prev.npz"


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """(arrays, meta) of one ``Trainer.save`` file: checksums verified, the state's floats finite.

  Raises:
    fileio.DamagedFileError: naming the file and what failed.
  """
  arrays = fileio.load_npz_checked(path)
  if "__meta__" not in arrays:
    raise fileio.DamagedFileError(f"{path}: no __meta__ record")
  meta = json.loads(str(arrays.pop("__meta__")))
  for k, a in sorted(arrays.items()):
    # The loss history holds NaN on purpose (episodes before learning starts): state leaves only.
    if k.startswith("leaf") and a.dtype.kind == "f" and not np.all(np.isfinite(a)):
      raise fileio.DamagedFileError(f"{path}: array {k!r} has non-finite values")
  return arrays, meta


class Trainer:
  """Trains a PerDQN on a scenario stream; checkpoints (params, optimizer, replay, RNGs) to a dir.

  A checkpoint is written at episode boundaries, so a resumed run continues with the same
  replay contents, network, optimizer moments, epsilon and scenario draws as an uninterrupted one.

  Layout (issue 19): ``agent.npz`` holds the state's leaves, the history and the metadata (episode,
  RNG state, agent settings) in one file with a sha256 per array; ``agent.prev.npz`` is the one
  before it. ``save`` stages the new file as ``agent.next.npz``, reads it back intact, and only
  then rotates (old -> ``.prev``, staged -> ``agent.npz``); ``agent.json`` repeats the metadata for
  readers of the network alone (``hybrid.policy``). ``restore`` takes the newest intact file
  (checksums, finite state), with one warning line naming a damaged or missing newer one (a
  damaged ``agent.npz`` is set aside as ``agent.damaged.npz``, so the next rotation keeps the
  intact one); none intact, or one of other agent settings, is a ``ConfigError`` (exit 2 in the
  binaries).
  """

  def __init__(
    self,
    agent: PerDQN,
    stream: env.ScenarioStream,
    seed: int,
    ckpt_dir: str | None = None,
  ):
    self.agent = agent
    self.stream = stream
    self.env = env.HybridEnv(stream.sysp, stream.profile)
    self.seed = seed
    self.ckpt_dir = ckpt_dir
    self.ts = agent.init(seed)
    self.rng = np.random.default_rng(seed)
    self.episode = 0
    self.history: dict[str, list[float]] = {"utility_per_user": [], "loss": [], "epsilon": []}
    self.stored_nonterminal = 0  # host copy of ts.stored[0]: no device sync per step
    if ckpt_dir and any(os.path.exists(self._path(n)) for n in (CKPT_NAME, PREV_NAME)):
      self.restore()

  def _path(self, name: str) -> str:
    return os.path.join(self.ckpt_dir, name)

  @property
  def _ckpt_path(self) -> str:
    return self._path(CKPT_NAME)

  # --- checkpoints ------------------------------------------------------------------------------
  def save(self) -> None:
    """Writes the whole training state (see the class docstring for the files and the order)."""
    if not self.ckpt_dir:
      return
    leaves = jax.tree.leaves(self.ts)
    arrays = {f"leaf{i:05d}": np.asarray(v) for i, v in enumerate(leaves)}
    for k, v in self.history.items():
      arrays[f"history_{k}"] = np.asarray(v, np.float64)
    meta = {
      "episode": self.episode,
      "rng": self.rng.bit_generator.state,
      "num_leaves": len(leaves),
      "seed": self.seed,
      "agent": dataclasses.asdict(self.agent.cfg),
    }
    arrays["__meta__"] = np.asarray(json.dumps(meta))
    fileio.save_npz_rotated(self._ckpt_path, read_checkpoint, **arrays)
    fileio.write_json(self._path("agent.json"), meta, indent=None)

  def _newest_intact(self) -> tuple[str, dict[str, np.ndarray], dict]:
    try:
      found = fileio.newest_intact_npz(self._ckpt_path, read_checkpoint)
    except fileio.NoIntactFileError as e:
      raise ConfigError(
        "--workdir",
        self.ckpt_dir,
        f"no intact agent checkpoint: {'; '.join(e.failures)} (delete them to start over)",
      ) from None
    path, (arrays, meta), failures = found
    if failures:
      damaged = any(not f.endswith(": missing") for f in failures)
      logging.warning(
        "agent checkpoint %s; resuming from %s (episode %d)%s",
        "; ".join(failures),
        path,
        meta["episode"],
        " (the damaged file is kept as agent.damaged.npz)" if damaged else "",
      )
    return path, arrays, meta

  def restore(self) -> None:
    """Loads the newest intact checkpoint (see the class docstring)."""
    path, arrays, meta = self._newest_intact()
    if meta["agent"] != dataclasses.asdict(self.agent.cfg):
      raise ConfigError(
        "--workdir",
        self.ckpt_dir,
        f"the checkpoint was written with other agent settings ({meta['agent']}); "
        "use a fresh workdir",
      )
    template, treedef = jax.tree.flatten(self.ts)
    leaves = [arrays.get(f"leaf{i:05d}") for i in range(meta["num_leaves"])]
    if len(leaves) != len(template) or any(
      a is None or a.shape != np.shape(b) or a.dtype != np.asarray(b).dtype
      for a, b in zip(leaves, template, strict=True)
    ):
      raise ConfigError("--workdir", self.ckpt_dir, f"{path} does not match the agent's structure")
    self.history = {k: arrays[f"history_{k}"].tolist() for k in self.history}
    self.ts = jax.tree.unflatten(treedef, [jnp.asarray(v) for v in leaves])
    self.rng.bit_generator.state = meta["rng"]
    self.episode = int(meta["episode"])
    self.stored_nonterminal = int(self.ts.stored[0])
    logging.info("resumed agent from %s at episode %d", path, self.episode)

  # --- the loop ---------------------------------------------------------------------------------
  def run_episode(self) -> tuple[float, float]:
    """One training episode; returns (U / N, mean loss of its learner steps or nan)."""
    agent, cfg = self.agent, self.agent.cfg
    eps = cfg.epsilon(self.episode)
    scn = self.stream(self.rng)
    losses = []

    def policy(s_l, s_g):
      if self.rng.random() < eps:
        action = int(self.rng.integers(2))
      else:
        action = agent.greedy_action(self.ts.params, s_l, s_g)
      # The code learns inside the step loop, right after acting, once warmed up.
      if self.stored_nonterminal > cfg.learn_start:
        self.ts, loss = agent.learn(self.ts)
        losses.append(loss)
      return action

    batch = env.rollout(self.env, scn, policy)
    padded, length = pad_episode(batch, agent.max_users)
    self.ts = agent.store(self.ts, padded, length)
    self.stored_nonterminal += length - 1
    self.episode += 1
    u = batch["utility"] / scn.num_users
    loss = float(np.mean(jax.device_get(losses))) if losses else float("nan")
    self.history["utility_per_user"].append(u)
    self.history["loss"].append(loss)
    self.history["epsilon"].append(eps)
    return u, loss

  def run(
    self,
    episodes: int,
    log_every: int = 500,
    ckpt_every: int = 2000,
    stop: Callable[[], bool] | None = None,
  ) -> TrainState:
    """Trains until ``episodes`` episodes in total (resumed ones count); returns the state."""
    start, t0 = self.episode, time.perf_counter()
    while self.episode < episodes:
      self.run_episode()
      if self.episode % log_every == 0 or self.episode == episodes:
        recent = slice(-log_every, None)
        losses = [v for v in self.history["loss"][recent] if not math.isnan(v)]
        rate = (self.episode - start) / max(time.perf_counter() - t0, 1e-9)
        logging.info(
          "episode %d/%d: utility/user %.3f, loss %s, epsilon %.3f, stored %s, %.1f episodes/s",
          self.episode,
          episodes,
          float(np.mean(self.history["utility_per_user"][recent])),
          f"{np.mean(losses):.4f}" if losses else "-",
          self.history["epsilon"][-1],
          np.asarray(self.ts.stored).tolist(),
          rate,
        )
      if self.ckpt_dir and (self.episode % ckpt_every == 0 or self.episode == episodes):
        self.save()
      if stop is not None and stop():
        self.save()
        break
    return self.ts
