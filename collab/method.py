"""CollaFuse wired into the shared loop: K private clients (one stacked, vmapped parameter tree)
and one shared server, trained split at the cut level ``cut_point`` and sampled server-then-client.

One training step follows the official code (spec §2.1): every client takes one Adam step on its
own batch (all K at once: ``collab.client_loop``, ``common.train.parties``), computes its cut
images from the same noise draw and ``transmit``s them; the server then takes one Adam step per
client message, in client order (``lax.scan``), so it gets K updates per step. Nothing flows back.

Sampling (the DDIM grid and its split, the server's half, the hand-off, the client's half,
``sample_diagnostics``) is the ``collab.handoff.HandoffSampling`` mixin; this module holds the data
partition, the networks, the train step, client cost and per-client evaluation.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from collab import client, fields, protocol, server
from collab.handoff import HandoffSampling
from common import data
from common.metrics import flops as flops_lib
from common.models import conv as conv_lib
from common.train import parties
from common.train import state as state_lib
from common.train.method import DDPM, x0_clipping_description
from common.train.validate import ConfigError


class CollaFuse(HandoffSampling, DDPM):
  """The CollaFuse method; ``params = {'server': tree, 'clients': tree with a leading K axis}``."""

  name = "collab"
  layout_fields = ("collab.client_loop",)
  default_ref_split = "test"  # each client's held-out data is its test set

  def __init__(self, config, data_info):
    config = fields.upgrade(config)  # a run saved before collab.* reads the same
    super().__init__(config, data_info)
    fields.validate(config, data_info)
    self.num_clients = int(config.collab.num_clients)
    self.cut_point = int(config.collab.cut_point)
    self.noising = config.collab.server_noising
    # The clients' and the server's loops written out, in the step lowered to count FLOPs.
    self.for_flops = False
    self._splits: dict[str, list[np.ndarray]] = {}
    try:
      train_parts = self.client_indices("train")
    except ValueError as e:
      raise ConfigError(
        "collab.partition", config.collab.partition, str(e).splitlines()[0]
      ) from None
    for k, idx in enumerate(train_parts):
      if len(idx) < 1:
        raise ConfigError(
          "collab.num_clients", self.num_clients, f"client {k} has no training data"
        )
    self._check_ddim_grid()

  # --- data: each client's private partition --------------------------------------------------
  def _partition_labels(self, split: str) -> np.ndarray:
    if self.config.collab.partition == "by_attribute":
      names = list(self.data_info.attribute_names)
      column = names.index(self.config.collab.partition_attribute)
      return data.load_attributes(self.config.data, split)[:, column]
    return data.load_labels(self.config.data, split)

  def client_indices(self, split: str) -> list[np.ndarray]:
    """Each client's example indices in ``split`` ('train': private data, 'test': held-out).

    Class / attribute splits give a client the same classes in both splits; iid and Dirichlet
    splits partition each split with the run's seed.
    """
    if split not in self._splits:
      labels = self._partition_labels(split)
      scheme = (
        "by_class"
        if self.config.collab.partition == "by_attribute"
        else self.config.collab.partition
      )
      self._splits[split] = data.partition_indices(
        labels,
        self.num_clients,
        scheme,
        self.config.seed + (0 if split == "train" else 1),
        classes_per_client=self.config.collab.classes_per_client,
        alpha=self.config.collab.dirichlet_alpha,
      )
    return self._splits[split]

  def train_iterator(self, *, process_index: int, process_count: int):
    """This process's rows of the client-major global batch ``[K * B, ...]``: with P processes
    dividing K, process ``i`` reads clients ``i K/P .. (i+1) K/P - 1`` only, each from its own
    partition (``data.party_train_iterator``)."""
    if (self.num_clients * self.config.batch_size) % process_count:
      raise ConfigError(
        "batch_size",
        self.config.batch_size,
        f"the {self.num_clients} clients' batches must split evenly over {process_count} processes",
      )
    return data.party_train_iterator(
      self.config.data,
      self.client_indices("train"),
      batch_size=self.config.batch_size,
      seed=self.config.seed,
      process_index=process_index,
      process_count=process_count,
    )

  def images_per_step(self) -> int:
    return self.num_clients * int(self.config.batch_size)

  def _client_major(self, x: jax.Array) -> jax.Array:
    """The global batch [K * B, ...] (client-major at any process count) -> [K, B, ...]."""
    return x.reshape(self.num_clients, -1, *x.shape[1:])

  # --- networks and optimizer: the clients are one stacked tree ---------------------------------
  def init_params(self, rng):
    one = functools.partial(DDPM.init_params, self)
    keys = jax.random.split(jax.random.fold_in(rng, 1), self.num_clients)
    return {"server": one(jax.random.fold_in(rng, 0)), "clients": jax.vmap(one)(keys)}

  def init_opt_state(self, tx, params):
    return {"server": tx.init(params["server"]), "clients": jax.vmap(tx.init)(params["clients"])}

  def client_axis(self, mesh=None) -> str | None:
    """The mesh axis the clients are split over, or None (axis unset, of size 1, or K not
    divisible by it)."""
    mesh = mesh or self.mesh
    axis = self.config.collab.client_mesh_axis
    if mesh is None or not axis or mesh.shape[axis] == 1 or self.num_clients % mesh.shape[axis]:
      return None
    return axis

  def state_shardings(self, mesh, abstract_state):
    """The client axis of every client tensor (params, EMA, optimizer) split over the mesh axis
    ``config.collab.client_mesh_axis``, so K clients train in parallel across devices under ``vmap``;
    the server and anything K does not divide follow the FSDP rule."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from common import parallel

    default = parallel.state_shardings(mesh, abstract_state)
    axis = self.client_axis(mesh)
    if not axis:
      return default

    def pick(path, leaf, fallback):
      in_clients = any(getattr(p, "key", None) == "clients" for p in path)
      if in_clients and leaf.ndim >= 1 and leaf.shape[0] == self.num_clients:
        return NamedSharding(mesh, P(axis, *([None] * (leaf.ndim - 1))))
      return fallback

    return jax.tree_util.tree_map_with_path(pick, abstract_state, default)

  def _labels_for_net(self, labels, rng):
    """CFG label dropout on each side independently (None for an unconditional model)."""
    if not self.class_conditional or labels is None:
      return None
    return self.conditioning({"label": labels}, rng)

  # --- one training step: K client steps, the uplink, K server steps ---------------------------
  def _client_objective(self, p_k, x0_k, y_k, rng_k):
    """One client's loss on its own batch: (loss, x_cut) (``client.loss``)."""
    r_y, r_loss, r_drop = jax.random.split(rng_k, 3)
    apply = functools.partial(self.apply, p_k, dropout_rng=r_drop)
    y = self._labels_for_net(y_k, r_y)
    return client.loss(
      self.diffusion, lambda x, t, yy: apply(x, t, yy), x0_k, y, r_loss, self.cut_point
    )

  def _server_objective(self, p_s, message, k, rng_k):
    """The server's loss on client ``k``'s message (``server.train_message_loss``)."""
    r_y, r_loss, r_drop = jax.random.split(rng_k, 3)
    apply = functools.partial(self.apply, p_s, dropout_rng=r_drop)
    wrapped = protocol.ClientMessage(
      x_cut=message.x_cut,
      labels=None if message.labels is None else self._labels_for_net(message.labels, r_y),
    )
    return server.train_message_loss(
      self.diffusion,
      lambda x, t, y: apply(x, t, y),
      wrapped,
      k,
      r_loss,
      cut_point=self.cut_point,
      noising=self.noising,
    )

  def _clients_step(self, tx):
    """``(c_params, c_opt, x0, labels, rngs) -> (params, opt state, losses, x_cut, squared grad
    norms)`` for any number of clients (the leading axis), laid out by ``collab.client_loop``
    (``common.train.parties``)."""
    grad_fn = jax.value_and_grad(self._client_objective, has_aux=True)
    client_loop = self.config.collab.client_loop
    for_flops = self.for_flops

    def clients_step(c_params, c_opt, x0, labels, rngs):
      (c_loss, x_cut), c_grads = parties.map_parties(
        grad_fn, (c_params, x0, labels, rngs), loop=client_loop, for_flops=for_flops
      )
      updates, c_opt = jax.vmap(tx.update)(c_grads, c_opt, c_params)
      sumsq = sum(
        jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(c_grads)
      )
      return optax.apply_updates(c_params, updates), c_opt, c_loss, x_cut, sumsq

    return clients_step

  def _run_clients(self, clients_step, client_args):
    """All K clients' steps, laid out over the mesh: split over ``client_axis()`` (shard_map) or
    whole on every device."""
    client_axis = self.client_axis()
    if client_axis:
      # Each device group steps its own K / n clients (vmapped locally). Left to GSPMD, the
      # vmapped weight-gradient convs split over the client axis came out wrong on XLA:CPU
      # (tests/collab/test_sweep.py compares with one device), and shard_map is the explicit
      # pod layout anyway.
      spec = jax.sharding.PartitionSpec(client_axis)
      return jax.shard_map(
        clients_step, mesh=self.mesh, in_specs=(spec,) * 5, out_specs=(spec,) * 5
      )(*client_args)
    if self.mesh is not None and self.mesh.size > 1:
      # Clients not split over the mesh (axis unset or K not divisible by it): keep their
      # data whole on every device rather than let GSPMD split the vmapped convs' batch,
      # which gave wrong weight gradients on XLA:CPU (same test as above).
      whole = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      client_args = jax.lax.with_sharding_constraint(client_args, whole)
    return clients_step(*client_args)

  def _server_steps(self, tx, server_p, server_o, message, rng_s):
    """One server update per client message, in client order, as the official loop does:
    (params, opt state, losses [K], gradient norms [K])."""

    def server_update(carry, k):
      p_s, o_s = carry
      s_loss, g = jax.value_and_grad(self._server_objective)(
        p_s, message, k, jax.random.fold_in(rng_s, k)
      )
      u, o_s = tx.update(g, o_s, p_s)
      return (optax.apply_updates(p_s, u), o_s), (s_loss, optax.tree.norm(g))

    def looped_update(carry, k):
      with conv_lib.in_loop_body():  # the U-Net's gradients in XLA:CPU's loop-safe form
        return server_update(carry, k)

    # A loop whatever collab.client_loop says: the updates are sequential anyway, so the loop
    # costs no step time, and the program holds the server's network once, not K times. Written
    # out (unroll) in the step lowered to count FLOPs, where XLA would count its body once.
    (server_p, server_o), (s_loss, s_gnorm) = jax.lax.scan(
      server_update if self.for_flops else looped_update,
      (server_p, server_o),
      jnp.arange(self.num_clients),
      unroll=True if self.for_flops else 1,
    )
    return server_p, server_o, s_loss, s_gnorm

  def make_flops_counting_step(self, tx, lr_schedule, ema_decay):
    """The train step with the server's updates (and, unless ``client_loop=unroll`` writes them
    out already, the clients' steps) written out: XLA counts a loop body once."""
    unrolled = copy.copy(self)
    unrolled.for_flops = True
    return unrolled.make_train_step(tx, lr_schedule, ema_decay)

  def make_train_step(self, tx, lr_schedule, ema_decay):
    share = bool(self.config.collab.share_labels) and self.class_conditional
    clients_step = self._clients_step(tx)

    def train_step(state, batch):
      rng = jax.random.fold_in(state.rng, state.step)
      rng_c, rng_s = jax.random.split(rng)
      x0 = self._client_major(batch["image"])
      labels = self._client_major(batch["label"])
      params, opt = state.params, state.opt_state

      # Clients: K independent steps at once.
      client_args = (
        params["clients"], opt["clients"], x0, labels, jax.random.split(rng_c, self.num_clients)
      )  # fmt: skip
      clients, c_opt, c_loss, x_cut, c_sumsq = self._run_clients(clients_step, client_args)

      # The uplink: cut images (and labels if shared). Nothing else reaches the server.
      message = protocol.transmit(jax.lax.stop_gradient(x_cut), labels, share_labels=share)

      # Server: one update per client message.
      server_p, server_o, s_loss, s_gnorm = self._server_steps(
        tx, params["server"], opt["server"], message, rng_s
      )
      new_params = {"server": server_p, "clients": clients}
      metrics = {
        # The official code logs 0.5 * client + 0.5 * server; it is not an objective.
        "loss": 0.5 * jnp.mean(c_loss) + 0.5 * jnp.mean(s_loss),
        "client_loss": jnp.mean(c_loss),
        "client_loss_max": jnp.max(c_loss),
        "server_loss": jnp.mean(s_loss),
        "grad_norm": jnp.sqrt(jnp.sum(c_sumsq)),
        "server_grad_norm": jnp.mean(s_gnorm),
        "lr": lr_schedule(state.step),
      }
      new_state = state.replace(
        step=state.step + 1,
        params=new_params,
        ema_params=state_lib.ema_update(state.ema_params, new_params, ema_decay),
        opt_state={"server": server_o, "clients": c_opt},
      )
      return new_state, metrics

    return train_step

  # --- client compute and communication -----------------------------------------------------
  @staticmethod
  def _first_client(params):
    """Client 0's network: every client shares one architecture, so it prices them all."""
    return jax.tree.map(lambda a: a[0], params["clients"])

  def client_network_calls_per_image(self, params) -> int:
    """How many times a client's network runs to finish one image, counted by running it."""
    calls = []
    res, ch = self.data_info.resolution, self.data_info.channels
    one_client = self._first_client(params)

    def counted(x, t, y):
      jax.debug.callback(lambda: calls.append(1))
      return self.apply(one_client, x, t, y)

    labels = jnp.zeros((1,), jnp.int32) if self.class_conditional else None
    x = jnp.zeros((1, res, res, ch), jnp.float32)
    out = self.client_finish(one_client, x, jax.random.key(0), labels, network=counted)
    jax.block_until_ready(out)
    jax.effects_barrier()
    return len(calls)

  def client_train_flops_per_step(self, params) -> float:
    """FLOPs of one client's training step (forward + backward of its network, its batch)."""
    if self.cut_point == 0:
      return 0.0
    res, ch = self.data_info.resolution, self.data_info.channels
    b = int(self.config.batch_size)
    one_client = self._first_client(params)
    y = jnp.zeros((b,), jnp.int32) if self.class_conditional else None

    def objective(p, x0, rng):
      apply = functools.partial(self.apply, p)
      return client.loss(self.diffusion, apply, x0, y, rng, self.cut_point)[0]

    x0 = jax.ShapeDtypeStruct((b, res, res, ch), jnp.float32)
    return flops_lib.count_flops(jax.grad(objective), one_client, x0, jax.random.key(0))

  def cost_description(self, params) -> dict[str, Any]:
    res, ch = self.data_info.resolution, self.data_info.channels
    b = int(self.config.batch_size)
    share = bool(self.config.collab.share_labels) and self.class_conditional
    calls = self.client_network_calls_per_image(params)
    one_client = self._first_client(params)
    return {
      "client_network_calls_per_image": calls,
      "client_inference_flops_per_image": float(self.denoiser_call_flops(one_client, 1) * calls),
      "client_train_flops_per_step": float(self.client_train_flops_per_step(params)),
      "uplink_bytes_per_client_step": protocol.uplink_bytes((1, b, res, res, ch), share),
      "downlink_bytes_per_image": protocol.downlink_bytes_per_image((res, res, ch)),
    }

  @functools.cached_property
  def _train_labels(self) -> np.ndarray:
    return data.load_labels(self.config.data, "train")

  def client_labels(self, k: int, n: int, seed: int) -> np.ndarray | None:
    """Conditions client k asks for: drawn from its own training labels (None if unconditional)."""
    if not self.class_conditional:
      return None
    own = self._train_labels[self.client_indices("train")[k]]
    return np.random.default_rng([seed, k]).choice(own, size=n).astype(np.int32)

  def sample_client(self, params, k, rng, n, labels=None):
    """``n`` CollaFuse samples for client ``k`` [n, H, W, C] float32 in [-1, 1]."""
    y = None if labels is None else jnp.asarray(labels, jnp.int32)
    return np.asarray(self._client_sample_jit(params, jnp.int32(k), rng, y, n))

  def sample(self, params, rng, num_samples, labels=None):
    """Samples spread over the clients in order (client k gets the k-th block)."""
    per = int(np.ceil(num_samples / self.num_clients))
    out = []
    for k in range(self.num_clients):
      y = self.client_labels(k, per, int(self.config.seed)) if labels is None else None
      out.append(self.sample_client(params, k, jax.random.fold_in(rng, k), per, y))
    return np.concatenate(out)[:num_samples]

  def sample_grid(self, params, rng, num_samples):
    per = max(1, num_samples // self.num_clients)
    images = self.sample(params, rng, per * self.num_clients)
    return images, per, [f"client {k}" for k in range(self.num_clients)]

  # --- evaluation: per client, against its own held-out data ------------------------------------
  def eval_group_names(self):
    return [f"client{k}" for k in range(self.num_clients)]

  def eval_batches(self, params, rng, num_samples, batch_size):
    per_client = [len(a) for a in np.array_split(np.arange(num_samples), self.num_clients)]
    for k, n_k in enumerate(per_client):
      for start in range(0, n_k, batch_size):
        b = min(batch_size, n_k - start)
        labels = self.client_labels(k, n_k, int(self.config.seed) + 17)
        labels = None if labels is None else labels[start : start + b]
        images = self.sample_client(
          params, k, jax.random.fold_in(rng, k * 1_000_003 + start), b, labels
        )
        yield images, labels, np.full((b,), k, np.int32)

  def eval_group_reference(self, group, ref_labels, split):
    # This client's partition of the reference split: its own held-out data for 'test', its
    # private training data for 'train'.
    del ref_labels
    return self.client_indices(split)[group]

  def flops_per_sample(self, params):
    # Server and clients share one architecture, so any one network prices every call.
    one_client = self._first_client(params)
    return self.denoiser_call_flops(one_client, sum(self.steps_split()))

  def sampling_description(self) -> dict[str, Any]:
    s_steps, c_steps = self.steps_split()
    return {
      **super().sampling_description(),
      **x0_clipping_description(self.config, True),  # both sides always bound x0_hat
      "server_steps": s_steps,
      "client_steps": c_steps,
      "cut_point": self.cut_point,
      "server_noising": self.noising,
      "client_start_level": self.client_start_level(),
      "server_sampling_chain": self.config.collab.server_sampling_chain,
    }


METHOD = CollaFuse
