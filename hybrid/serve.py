"""The edge loop on loopback: a real server batching many devices' requests (spec §1, §4, §7, §11 B).

``python -m hybrid.serve --workdir=runs/hybrid --users=12``

The binary starts the edge server in its own process (``--server_process``) and runs the
``--users`` devices as threads of a second process with a lower CPU priority (``--device_nice``):
the emulated devices share this machine's cores with the edge, and real devices would not slow
the edge down. Pieces, in the order a request meets them:

* ``EdgeServer`` listens on 127.0.0.1 (``--host`` to change it) and reads framed requests
  (``hybrid.protocol``) from any number of device connections, one thread per connection. A frame
  that is malformed, over the payload cap (refused from its length prefix, before the body is
  read), of the wrong shape or dtype, or from an unknown user gets an error reply on its own
  connection; nothing else sees it. So does a header that does not parse, whatever the reason
  (bad UTF-8 or JSON, nesting past the recursion limit, not an object, wrong types). Connections
  (``hybrid.connections``) have two timeouts: a frame that has started must arrive whole within
  ``--frame_timeout`` (default 5 s), and a connection with no request awaiting its answer that
  sends nothing for ``--idle_timeout`` (default 30 s) is closed (a ``timeout`` error frame, then
  the close), so idle sockets cannot hold the ``--max_connections`` cap (default 256; ``busy``
  beyond it).
* The batcher opens a window at the first queued request and closes it ``window`` seconds later
  (the paper's K; earlier once ``max_users`` requests are in, the most the policy's state holds).
  Requests whose device hung up are dropped at the close. The ``Scheduler`` then decides who is
  admitted: users in the visiting order of the MDP (strongest device first), the state built from
  each request's alpha, device step latency and *measured* wait; the decision comes from the
  trained PER-DQN of a ``hybrid.optimize`` workdir (``agent.drl_decide``: grant/deny user by user,
  closed-form splits at the final B), or from a fallback policy (``--fallback``, default the
  exact optimum) when no policy is given. Splits are rounded to whole steps.
* Denied users are told to run locally at once. The admitted users' x_T go through the cluster
  model as one batch (T -> n_i per row) and each user's x_{n_i} is streamed back on its
  connection as soon as it is ready: ``--edge=staged`` (default) cuts the batch's chain at each
  distinct split, so user i's latent leaves after its own T - n_i steps with all B rows in every
  network call, as the latency model charges; ``--edge=one_shot`` is one ``edge_denoise`` call,
  every latent leaving after T - min n steps. A device that disconnected is skipped; the others
  are not disturbed.
* A device (``run_client``) holds only its own personalized parameters and finishes
  n_i -> 0 with ``device_denoise``. **Device heterogeneity is emulated**: every device here is the
  same CPU, so a device with per-step latency tau_i finishes its n local steps no sooner than
  ``n tau_i`` after starting them: the real computation runs inside that budget and the device
  then sleeps for the rest (if the computation takes longer, e.g. under CPU contention, the
  measured latency shows it).

Each device gets its own seed's x_T and key, alpha and tau from a scenario drawn as the simulator
draws one (``system.sample_scenario``: device types by the profile's weights, arrivals
r_i ~ U(0, K), which the devices keep), for ``--rounds`` windows. Measured end-to-end latency
(request sent -> x_0 ready, on the device's clock) is reported next to
the latency model's prediction for the same decisions (``system.user_latency``: the measured
wait, ``(T - n) tau_e(B) + L^tx(B) + n tau_i`` admitted, ``T tau_i`` denied). The prediction uses
the run's measured profile (``WORKDIR/profile.json`` from ``hybrid.profile``) when present, else
the paper's, with the edge as ``--num_gpus`` (default 1: the profile measured this machine's one
edge) accelerators. The link is loopback, not a radio: L^tx uses the physical formula with the
real frame sizes and the config's W and eta (microseconds). Not in the model, so in the
measurement only: the decision itself, Python and socket overheads, and the CPU the emulated
devices and the edge share.

Both are split at the answer: until it (wait, decision, edge steps, link) and after it (the n
local steps). Served x_0 is checked against ``hybrid_sample`` with the same keys and splits.

Writes ``OUT/serve.json`` (every request with its decision, measured and predicted latency and
their parts, every window), ``OUT/serve.md`` (the table) and ``OUT/serve.png`` (measured vs
predicted), with ``OUT = WORKDIR/serve`` by default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx

from common import fileio
from hybrid import agent as agent_lib
from hybrid import baselines, connections, env, protocol, system

DEFAULT_HOST = "127.0.0.1"
FALLBACKS = ("optimum", "greedy", "admit_all", "all_local")
EDGE_MODES = ("staged", "one_shot")

EdgeFn = Callable[[np.ndarray, np.ndarray, jax.Array], Any]  # (x_T [B,H,W,C], splits [B], keys [B])
# (x_T, splits, keys) -> iterator of (rows whose latent is ready, x [B, H, W, C] holding them)
EdgeStages = Callable[[np.ndarray, np.ndarray, jax.Array], Iterator[tuple[np.ndarray, np.ndarray]]]
DeviceFn = Callable[[np.ndarray, int, jax.Array], Any]  # (x_n [H,W,C], n, key) -> x_0 [H,W,C]


def _define_flags() -> None:
  """Defined only when this module runs as a binary (tests import it next to other binaries)."""
  flags.DEFINE_string("workdir", None, "A hybrid.train run (cluster-wide + personalized models).")
  flags.DEFINE_integer("users", 12, "Device clients, one thread each (user id = client mod U).")
  flags.DEFINE_string(
    "policy_workdir",
    "",
    "hybrid.optimize workdir holding the trained agent ('': WORKDIR/optimize or WORKDIR if they "
    "hold agents/; 'none': use --fallback).",
  )
  flags.DEFINE_string("agent", "", "Agent name under agents/ ('': dynamic, else the nearest G, N).")
  flags.DEFINE_enum("fallback", "optimum", list(FALLBACKS), "Policy when no trained agent is used.")
  flags.DEFINE_string(
    "profile",
    "",
    "Latency/accuracy profile JSON ('': the policy's training profile, else "
    "WORKDIR/profile.json, else the paper's).",
  )
  flags.DEFINE_float("num_gpus", 1.0, "G of the latency model's edge (the profile's k, h / G).")
  flags.DEFINE_float(
    "window", -1.0, "Scheduling window K in seconds (-1: scheduler.system.window)."
  )
  flags.DEFINE_enum(
    "edge",
    "staged",
    list(EDGE_MODES),
    "staged: each latent leaves after its own T - n_i batched steps; one_shot: one "
    "edge_denoise call, every latent leaves after T - min n.",
  )
  flags.DEFINE_integer("rounds", 3, "Measured windows, each with a freshly drawn scenario.")
  flags.DEFINE_integer("warmup_rounds", 1, "Rounds run first and not reported.")
  flags.DEFINE_bool("server_process", True, "The edge server in its own process (else a thread).")
  flags.DEFINE_integer(
    "device_nice", 5, "CPU priority the device side gives up after starting the server process."
  )
  flags.DEFINE_integer("seed", 0, "Scenario, noise and key seed.")
  flags.DEFINE_string("host", DEFAULT_HOST, "Address the server binds.")
  flags.DEFINE_integer("port", 0, "Port (0: any free one).")
  flags.DEFINE_float(
    "frame_timeout",
    connections.FRAME_TIMEOUT_S,
    "Seconds a device has to send a whole frame once its first byte arrived (and the edge to "
    "send an answer); then a 'timeout' error and the connection is closed.",
  )
  flags.DEFINE_float(
    "idle_timeout",
    connections.IDLE_TIMEOUT_S,
    "Seconds a connection with no request awaiting its answer may send nothing before it gets "
    "a 'timeout' error and is closed (so idle sockets cannot hold --max_connections).",
  )
  flags.DEFINE_integer(
    "max_connections", connections.MAX_CONNECTIONS, "Open connections; more are refused 'busy'."
  )
  flags.DEFINE_string("out", "", "Output directory ('': WORKDIR/serve).")


# ------------------------------------------------------------------------------------------------
# Scheduling: who is admitted and where each admitted user's chain is split.


@dataclasses.dataclass
class WindowDecision:
  """One window's decision, indexed in request (arrival) order.

  Attributes:
    admit: [N] bool.
    split: [N] int local steps n_i (T for denied users).
    batch: B, the number admitted.
    predicted: [N] float64 latency model's L_i (seconds) for these decisions and waits.
    utility: U of the decision (closed-form objective with the rounded splits).
    scenario: the scheduler's view, users in visiting order; ``order[j]`` is the request index of
      scenario row j.
    seconds: wall time of the decision.
  """

  admit: np.ndarray
  split: np.ndarray
  batch: int
  predicted: np.ndarray
  utility: float
  scenario: system.Scenario
  order: np.ndarray
  seconds: float


class Scheduler:
  """Turns a window's requests into admissions and splits with a policy ``Scenario -> Decision``."""

  def __init__(
    self,
    sysp: system.SystemParams,
    profile: system.Profile,
    num_gpus: float,
    policy: Callable[[system.Scenario], baselines.Decision],
    name: str,
  ):
    self.sysp, self.profile, self.policy, self.name = sysp, profile, policy, name
    self.num_gpus = float(num_gpus)
    self.edge_k, self.edge_h = profile.latency.edge(num_gpus)

  def scenario(self, alpha, tau, wait) -> tuple[system.Scenario, np.ndarray]:
    """The window as the MDP sees it: users sorted by device step latency, strongest first."""
    alpha, tau, wait = (np.asarray(v, np.float64) for v in (alpha, tau, wait))
    order = np.argsort(tau, kind="stable")
    types = np.abs(self.profile.latency.device_tau[None, :] - tau[order, None]).argmin(-1)
    scn = system.Scenario(
      alpha=alpha[order],
      tau=tau[order],
      wait=wait[order],
      device_type=types,
      num_gpus=self.num_gpus,
      edge_k=self.edge_k,
      edge_h=self.edge_h,
    )
    return scn, order

  def decide(self, alpha, tau, wait) -> WindowDecision:
    """Args: [N] alpha, device step latency tau (s) and measured wait (s), in request order."""
    t0 = time.perf_counter()
    n = len(alpha)
    if not 1 <= n <= self.sysp.max_users:
      raise ValueError(f"Scheduler: a window holds 1..{self.sysp.max_users} requests, got {n}")
    scn, order = self.scenario(alpha, tau, wait)
    d = self.policy(scn)
    t = self.sysp.num_steps
    split = np.where(d.admit, np.rint(d.split), t).astype(np.int64)
    predicted = system.user_latency(scn, self.sysp, d.admit, split)
    utility = float(system.objective(scn, self.sysp, self.profile, d.admit, split))
    seconds = time.perf_counter() - t0
    inverse = np.empty(n, np.int64)
    inverse[order] = np.arange(n)
    return WindowDecision(
      admit=np.asarray(d.admit, bool)[inverse],
      split=split[inverse],
      batch=int(np.sum(d.admit)),
      predicted=predicted[inverse],
      utility=utility,
      scenario=scn,
      order=order,
      seconds=seconds,
    )


def fallback_policy(
  name: str, sysp: system.SystemParams, profile: system.Profile
) -> Callable[[system.Scenario], baselines.Decision]:
  """A ``hybrid.baselines`` policy by name (see ``FALLBACKS``)."""
  fns = {
    "optimum": baselines.optimum_by_batch,
    "greedy": baselines.greedy,
    "admit_all": baselines.admit_all,
    "all_local": baselines.all_local,
  }
  if name not in fns:
    raise ValueError(f"fallback policy must be one of {FALLBACKS}, got {name!r}")
  fn = fns[name]
  return lambda scn: fn(scn, sysp, profile)


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def find_policy_workdir(workdir: str) -> str | None:
  """The default ``hybrid.optimize`` workdir of a hybrid run: ``WORKDIR/optimize`` or ``WORKDIR``."""
  for d in (os.path.join(workdir, "optimize"), workdir):
    if os.path.isdir(os.path.join(d, "agents")):
      return d
  return None


def _pick_agent(agents_dir: str, name: str, num_gpus: float, num_users: int) -> str:
  names = sorted(
    d for d in os.listdir(agents_dir) if os.path.exists(os.path.join(agents_dir, d, "agent.npz"))
  )
  if not names:
    raise FileNotFoundError(f"{agents_dir} holds no trained agent (agents/<name>/agent.npz)")
  if name:
    if name not in names:
      raise FileNotFoundError(f"agent {name!r} not in {agents_dir}: {names}")
    return name
  if "dynamic" in names:
    return "dynamic"

  def distance(n: str):
    try:
      g, u = n.split("_")[:2]
      return (abs(float(g[1:]) - num_gpus), abs(int(u[1:]) - num_users), n)
    except (ValueError, IndexError):
      return (math.inf, math.inf, n)

  return min(names, key=distance)


def load_agent(
  policy_workdir: str, name: str = "", num_gpus: float = 1.0, num_users: int = 1
) -> tuple[agent_lib.PerDQN, Any, str, int]:
  """The trained Q-network of a ``hybrid.optimize`` workdir, without its replay buffers.

  ``Trainer.save`` writes ``jax.tree.leaves(TrainState)``; the Q-network's parameters are the
  first leaves (``TrainState.params`` is its first field), checked leaf by leaf against a fresh
  network of the saved agent settings.

  Returns:
    (agent, params, agent name, max_users of its state).
  """
  cfg_path = os.path.join(policy_workdir, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{policy_workdir} is not a hybrid.optimize workdir (no config.json)")
  sched = _read_json(cfg_path)["scheduler"]
  max_users = int(sched["system"]["max_users"])
  agents_dir = os.path.join(policy_workdir, "agents")
  if not os.path.isdir(agents_dir):
    raise FileNotFoundError(f"{policy_workdir} has no agents/ (train with hybrid.optimize)")
  name = _pick_agent(agents_dir, name, num_gpus, num_users)
  meta = _read_json(os.path.join(agents_dir, name, "agent.json"))
  cfg = agent_lib.AgentConfig(**meta["agent"])
  ag = agent_lib.PerDQN(cfg, max_users)
  _, template = nnx.split(
    agent_lib.QNetwork(max_users, cfg.hidden, cfg.depth, cfg.embed_dim, rngs=nnx.Rngs(0))
  )
  leaves, treedef = jax.tree.flatten(template)
  # Checksums verified and the state finite (fileio.DamagedFileError names a damaged file).
  arrays, _ = agent_lib.read_checkpoint(os.path.join(agents_dir, name, "agent.npz"))
  loaded = [arrays[f"leaf{i:05d}"] for i in range(len(leaves))]
  for i, (a, b) in enumerate(zip(loaded, leaves, strict=True)):
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(
        f"{agents_dir}/{name}: leaf {i} is {a.shape} {a.dtype}, the Q-network's is "
        f"{b.shape} {b.dtype}"
      )
  params = jax.tree.unflatten(treedef, [jax.numpy.asarray(v) for v in loaded])
  return ag, params, name, max_users


def drl_policy(
  ag: agent_lib.PerDQN, params, sysp: system.SystemParams, profile: system.Profile
) -> Callable[[system.Scenario], baselines.Decision]:
  """DRL-convex: the trained agent's greedy admissions, closed-form splits."""
  if ag.max_users != sysp.max_users:
    raise ValueError(
      f"the agent's state has {ag.max_users} user rows, the serving system {sysp.max_users}"
    )
  hybrid_env = env.HybridEnv(sysp, profile)
  lock = threading.Lock()  # the env is stateful; one window at a time

  def policy(scn):
    with lock:
      return agent_lib.drl_decide(ag, params, hybrid_env, scn)

  return policy


# ------------------------------------------------------------------------------------------------
# The edge server.


@dataclasses.dataclass
class _Request:
  rid: int
  client_id: str
  user: int
  tau: float
  alpha: float
  key: np.ndarray  # [words] uint32
  x_T: np.ndarray  # [H, W, C] float32
  arrival: float  # server's monotonic clock
  conn: connections.Connection


class EdgeServer:
  """Receives device requests, batches the admitted ones per window, streams latents back.

  Args:
    edge: the cluster-wide model's T -> n_i steps for each row of the admitted batch, as stages
      ``(x_T [B, H, W, C] float32, splits [B] int32, keys [B] PRNG keys) -> iterator of (rows,
      x [B, H, W, C])``: the latents of ``rows`` are ready in ``x`` and go out at once
      (``one_shot(edge_denoise)`` or ``staged(models)``).
    scheduler: the window's decision maker.
    image_shape: (H, W, C) of x_T.
    num_users: U; requests name a user in [0, U).
    window: K in seconds.
    max_requests: the most requests one window takes (the policy's state rows by default).
    host, port: where to bind (127.0.0.1 unless told otherwise; port 0 picks a free one).
    frame_timeout: seconds a started frame has to arrive whole (and an answer to go out).
    idle_timeout: seconds a connection with no request awaiting its answer may stay silent.
    max_connections: connections beyond this are refused with ``busy``.
  """

  def __init__(
    self,
    edge: EdgeStages,
    scheduler: Scheduler,
    *,
    image_shape: tuple[int, int, int],
    num_users: int,
    window: float,
    max_requests: int | None = None,
    host: str = DEFAULT_HOST,
    port: int = 0,
    frame_timeout: float = connections.FRAME_TIMEOUT_S,
    idle_timeout: float = connections.IDLE_TIMEOUT_S,
    max_connections: int = connections.MAX_CONNECTIONS,
  ):
    for name, v in (
      ("window", window),
      ("frame_timeout", frame_timeout),
      ("idle_timeout", idle_timeout),
    ):
      if not v > 0:
        raise ValueError(f"EdgeServer: {name} must be > 0 seconds, got {v}")
    if max_connections < 1:
      raise ValueError(f"EdgeServer: max_connections must be >= 1, got {max_connections}")
    cap = scheduler.sysp.max_users
    self.max_requests = cap if max_requests is None else int(max_requests)
    if not 1 <= self.max_requests <= cap:
      raise ValueError(f"EdgeServer: max_requests must lie in [1, {cap}], got {max_requests}")
    self.edge, self.scheduler = edge, scheduler
    self.image_shape = tuple(int(v) for v in image_shape)
    self.num_users, self.window = int(num_users), float(window)
    self.frame_timeout, self.idle_timeout = float(frame_timeout), float(idle_timeout)
    self.max_connections = int(max_connections)
    self.max_payload = math.prod(self.image_shape) * 4  # exactly one float32 x_T
    self.key_words = int(jax.random.key_data(jax.random.key(0)).shape[-1])
    self.num_steps = scheduler.sysp.num_steps
    self._host, self._port = host, port
    self._queue: queue.Queue[_Request] = queue.Queue()
    self._stop = threading.Event()
    self._lock = threading.Lock()
    self._threads: list[threading.Thread] = []
    self._handlers: list[threading.Thread] = []  # one reader per connection
    self._conns: set[connections.Connection] = set()
    self._next_id = 0
    self.windows: list[dict[str, Any]] = []  # one record per decided window
    self.errors: list[dict[str, Any]] = []  # refusals and timeouts: code, message, id
    self.lost: list[dict[str, Any]] = []  # requests whose device hung up before its answer
    self._sock: socket.socket | None = None

  # --- life cycle -------------------------------------------------------------------------------
  @property
  def address(self) -> tuple[str, int]:
    if self._sock is None:
      raise RuntimeError("EdgeServer: not started")
    return self._sock.getsockname()[:2]

  def start(self) -> EdgeServer:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((self._host, self._port))
    sock.listen(128)
    sock.settimeout(0.1)
    self._sock = sock
    for target, name in ((self._accept_loop, "accept"), (self._batch_loop, "batcher")):
      t = threading.Thread(target=target, name=f"edge-{name}", daemon=True)
      t.start()
      self._threads.append(t)
    logging.info("edge server on %s:%d", *self.address)
    return self

  def close(self, timeout: float = 5.0) -> None:
    """Stops accepting, finishes nothing new, closes every connection, joins the threads."""
    self._stop.set()
    for t in list(self._threads):
      t.join(timeout)
    if self._sock is not None:
      self._sock.close()
    # Readers poll the stop flag every 0.1 s; a shutdown also ends one inside a frame.
    with self._lock:
      handlers, conns = list(self._handlers), list(self._conns)
    for c in conns:
      c.abort()
    for t in handlers:
      t.join(timeout)

  def __enter__(self) -> EdgeServer:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()

  # --- connections ------------------------------------------------------------------------------
  def _accept_loop(self) -> None:
    while not self._stop.is_set():
      try:
        sock, peer = self._sock.accept()
      except TimeoutError:
        continue
      except OSError:
        break
      conn = connections.Connection(sock, peer, send_timeout=self.frame_timeout)
      with self._lock:
        # A connection being closed (lingering, see connections.Connection.close) holds no slot.
        self._conns = {c for c in self._conns if not c.closed.is_set()}
        full = len(self._conns) >= self.max_connections
        if not full:
          self._conns.add(conn)
      if full:
        conn.send(
          protocol.error_header(protocol.RequestError(protocol.BUSY, "too many connections"))
        )
        conn.close(0.0)  # no lingering: the accept loop goes straight on
        continue
      t = threading.Thread(target=self._handle, args=(conn,), name="edge-conn", daemon=True)
      t.start()
      with self._lock:
        self._handlers = [h for h in self._handlers if h.is_alive()] + [t]

  def _refuse(self, conn: connections.Connection, err: protocol.ProtocolError, header=None):
    rid = protocol.request_id(header)
    self.errors.append({"code": err.code, "message": err.message, "id": rid})
    conn.send(protocol.error_header(err, id=rid))

  def _handle(self, conn: connections.Connection) -> None:
    """The connection's reader (``connections.serve_connection``): frame and idle deadlines,
    an error frame for every refused frame."""
    try:
      connections.serve_connection(
        conn,
        stop=self._stop,
        max_payload=self.max_payload,
        frame_timeout=self.frame_timeout,
        idle_timeout=self.idle_timeout,
        on_frame=self._take,
        on_refused=self._refuse,
      )
    finally:
      with self._lock:
        self._conns.discard(conn)

  def _take(self, conn: connections.Connection, header: dict[str, Any], payload: bytes) -> None:
    req = self._parse(header, payload, conn)
    conn.expect(req.rid)  # not idle until answered
    self._queue.put(req)

  def _parse(
    self, header: dict[str, Any], payload: bytes, conn: connections.Connection
  ) -> _Request:
    if header.get("type") != "request":
      raise protocol.RequestError(
        protocol.BAD_TYPE, f"expected a 'request', got {protocol.show(header.get('type'))}"
      )
    user = header.get("user")
    if not isinstance(user, int) or isinstance(user, bool):
      raise protocol.RequestError(
        protocol.BAD_FIELD, f"field 'user' must be an integer, got {protocol.show(user)}"
      )
    if not 0 <= user < self.num_users:
      raise protocol.RequestError(
        protocol.UNKNOWN_USER, f"user {user} is not one of this cluster's {self.num_users}"
      )
    tau = protocol.get_float(header, "tau", 1e-6, 3600.0)
    if tau <= 0:
      raise protocol.RequestError(protocol.BAD_FIELD, "field 'tau' must be > 0")
    alpha = protocol.get_float(header, "alpha", 0.0, 1e12)
    key = protocol.get_key(header, self.key_words)
    x_T = protocol.decode_array(header, payload, self.image_shape)
    with self._lock:
      rid, self._next_id = self._next_id, self._next_id + 1
    return _Request(
      rid=rid,
      client_id=protocol.request_id(header) or "",
      user=user,
      tau=tau,
      alpha=alpha,
      key=key,
      x_T=x_T,
      arrival=time.monotonic(),
      conn=conn,
    )

  # --- windows ----------------------------------------------------------------------------------
  def _batch_loop(self) -> None:
    while not self._stop.is_set():
      try:
        first = self._queue.get(timeout=0.1)
      except queue.Empty:
        continue
      batch = [first]
      closes = first.arrival + self.window
      while len(batch) < self.max_requests and not self._stop.is_set():
        remaining = closes - time.monotonic()
        if remaining <= 0:
          break
        try:
          batch.append(self._queue.get(timeout=remaining))
        except queue.Empty:
          break
      try:
        self._run_window(batch, time.monotonic())
      except Exception as e:  # noqa: BLE001 -- one bad window must not stop the server
        logging.exception("edge window failed")
        err = protocol.RequestError(protocol.INTERNAL, f"the edge failed on this window: {e}")
        for r in batch:
          r.conn.answer(r.rid, protocol.error_header(err, id=r.client_id))

  def _run_window(self, batch: list[_Request], closed_at: float) -> None:
    live = []
    for r in batch:
      if r.conn.closed.is_set():
        self.lost.append({"id": r.client_id, "stage": "before the decision"})
      else:
        live.append(r)
    if not live:
      return
    wait = np.array([closed_at - r.arrival for r in live])
    dec = self.scheduler.decide([r.alpha for r in live], [r.tau for r in live], wait)
    # The record is complete (but for the edge time) before any device hears back, so whoever
    # reads it after a device finished finds that device's decision.
    record = {
      "opened": live[0].arrival,
      "closed": closed_at,
      "requests": len(batch),
      "dropped": len(batch) - len(live),
      "batch": dec.batch,
      "decision_seconds": dec.seconds,
      "edge_seconds": None,
      "utility": dec.utility,
      "scheduler": self.scheduler.name,
      "users": [
        {
          "id": r.client_id,
          "user": r.user,
          "tau": r.tau,
          "alpha": r.alpha,
          "wait": float(wait[i]),
          "admitted": bool(dec.admit[i]),
          "split": int(dec.split[i]),
          "predicted": float(dec.predicted[i]),
        }
        for i, r in enumerate(live)
      ],
    }
    self.windows.append(record)
    # Denied users start their T local steps as soon as the window closes.
    for i, r in enumerate(live):
      if not dec.admit[i]:
        if not r.conn.answer(
          r.rid,
          {"type": "local", "id": r.client_id, "split": int(self.num_steps), "batch": dec.batch},
        ):
          self.lost.append({"id": r.client_id, "stage": "local answer"})
    admitted = [i for i in range(len(live)) if dec.admit[i]]
    if not admitted:
      record["edge_seconds"] = 0.0
      return
    x = np.stack([live[i].x_T for i in admitted])
    splits = np.asarray([dec.split[i] for i in admitted], np.int32)
    keys = jax.random.wrap_key_data(np.stack([live[i].key for i in admitted]))
    t0 = time.perf_counter()
    ready = {}
    for rows, x_n in self.edge(x, splits, keys):
      x_n = np.asarray(x_n, np.float32)
      if x_n.shape != x.shape:
        raise RuntimeError(f"the edge returned {x_n.shape} for a batch {x.shape}")
      for j in np.asarray(rows).reshape(-1):
        i = admitted[int(j)]
        r = live[i]
        head = {
          "type": "latent",
          "id": r.client_id,
          "split": int(dec.split[i]),
          "batch": dec.batch,
          **protocol.array_header(x_n[j]),
        }
        # A device that hung up loses its own latent; the loop goes on to the next one.
        if not r.conn.answer(r.rid, head, protocol.array_bytes(x_n[j])):
          self.lost.append({"id": r.client_id, "stage": "latent"})
        ready[r.client_id] = time.perf_counter() - t0
    record["edge_seconds"] = time.perf_counter() - t0
    missing = [live[i].client_id for i in admitted if live[i].client_id not in ready]
    for u in record["users"]:
      u["edge_ready"] = ready.get(u["id"])
    if missing:
      raise RuntimeError(f"the edge never produced the latents of {missing}")


def one_shot(edge_fn: EdgeFn) -> EdgeStages:
  """One batched call (``models.edge_denoise``): every latent goes out when the longest edge
  chain (T - min n) is done."""

  def stages(x_T, splits, keys):
    yield np.arange(len(splits)), jax.block_until_ready(edge_fn(x_T, splits, keys))

  return stages


def staged(models) -> EdgeStages:
  """The batch's chain cut at each distinct split: user i's latent goes out after its own
  T - n_i steps, while the whole batch of B rows stays in every network call (finished rows
  frozen), which is what the latency model charges (``(T - n_i) tau_e(B)``).

  Runs ``models.programs.chain`` (the program under ``edge_denoise``) stage by stage; each
  row's levels and per-level noise are those of one ``edge_denoise`` call, so the latents are
  the same.
  """
  big_t = models.num_timesteps

  def stages(x_T, splits, keys):
    splits = np.asarray(splits, np.int32)
    b = len(splits)
    x = jax.numpy.asarray(x_T, jax.numpy.float32)
    level = big_t
    for stop in sorted({int(v) for v in splits}, reverse=True):
      if stop < level:
        x = models.programs.chain(
          models.cluster_params,
          x,
          np.full((b,), level, np.int32),
          np.maximum(splits, stop).astype(np.int32),
          keys,
        )
        level = stop
      yield np.flatnonzero(splits == stop), jax.block_until_ready(x)

  return stages


# ------------------------------------------------------------------------------------------------
# A device.


@dataclasses.dataclass
class ClientResult:
  """What one device saw. Times are its monotonic clock (seconds)."""

  id: str
  user: int
  kind: str  # latent | local | error | no_answer
  split: int | None = None
  batch: int | None = None
  x0: np.ndarray | None = None
  error: dict[str, Any] | None = None
  sent: float = math.nan
  answered: float = math.nan
  done: float = math.nan
  local_compute: float = math.nan  # seconds the device's own steps took to compute

  @property
  def latency(self) -> float:
    return self.done - self.sent


def request_header(
  request_id: str, user: int, tau: float, alpha: float, key: jax.Array, x_T: np.ndarray
) -> dict[str, Any]:
  data = np.asarray(jax.random.key_data(key)).reshape(-1)
  return {
    "type": "request",
    "id": request_id,
    "user": int(user),
    "tau": float(tau),
    "alpha": float(alpha),
    "key": [int(v) for v in data],
    **protocol.array_header(np.asarray(x_T, np.float32)),
  }


def run_client(
  address: tuple[str, int],
  *,
  request_id: str,
  user: int,
  tau: float,
  alpha: float,
  key: jax.Array,
  x_T: np.ndarray,
  device_fn: DeviceFn,
  num_steps: int,
  pace: bool = True,
  timeout: float = 60.0,
) -> ClientResult:
  """One device's request: send x_T, take the answer, finish x_0 locally.

  Args:
    address: the edge server.
    key: the request's PRNG key (one typed key); x_T: [H, W, C] float32.
    device_fn: ``(x_n [H, W, C], n, key) -> x_0 [H, W, C]``, the device's personalized model
      (it holds only its own parameters).
    num_steps: T (a denied device runs all of them from x_T).
    pace: emulate the device's speed: its n local steps take at least ``n tau`` seconds.

  Returns:
    ``kind`` latent / local with x_0, or error with the server's reply, or no_answer.
  """
  x_T = np.asarray(x_T, np.float32)
  res = ClientResult(id=request_id, user=int(user), kind="no_answer")
  res.sent = time.monotonic()
  with socket.create_connection(address, timeout=timeout) as sock:
    protocol.send_frame(
      sock, request_header(request_id, user, tau, alpha, key, x_T), protocol.array_bytes(x_T)
    )
    try:
      header, payload = protocol.recv_frame(sock, max_payload=x_T.nbytes, timeout_s=timeout)
    except (protocol.ConnectionClosed, protocol.ProtocolError, OSError):
      return res
  res.answered = time.monotonic()
  kind = header.get("type")
  if kind == "error":
    res.kind, res.error = "error", header
    return res
  if kind == "latent":
    x_n = protocol.decode_array(header, payload, x_T.shape)
  elif kind == "local":
    x_n = x_T
  else:
    raise protocol.RequestError(protocol.BAD_TYPE, f"unexpected answer type {kind!r}")
  n = header.get("split")
  if not isinstance(n, int) or not 0 <= n <= num_steps:
    raise protocol.RequestError(protocol.BAD_FIELD, f"answer's split {n!r} not in [0, {num_steps}]")
  res.kind, res.split, res.batch = kind, n, header.get("batch")
  start = time.monotonic()
  x0 = np.asarray(jax.block_until_ready(device_fn(x_n, n, key)))
  res.local_compute = time.monotonic() - start
  if pace:
    time.sleep(max(0.0, start + n * tau - time.monotonic()))
  res.done = time.monotonic()
  res.x0 = x0
  return res


def run_clients(
  address: tuple[str, int],
  specs: list[dict[str, Any]],
  *,
  num_steps: int,
  pace: bool = True,
  timeout: float = 60.0,
) -> list[ClientResult]:
  """Runs devices concurrently, one thread each; ``specs[i]`` holds ``run_client``'s keyword
  arguments plus ``delay``, the seconds after the common start at which device i sends."""
  results: list[ClientResult | None] = [None] * len(specs)
  start = time.monotonic() + 0.02

  def one(i: int) -> None:
    spec = dict(specs[i])
    time.sleep(max(0.0, start + spec.pop("delay", 0.0) - time.monotonic()))
    try:
      results[i] = run_client(address, num_steps=num_steps, pace=pace, timeout=timeout, **spec)
    except OSError as e:
      results[i] = ClientResult(
        id=spec["request_id"], user=spec["user"], kind="no_answer", error={"message": str(e)}
      )

  threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(specs))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout + 30.0)
  return [
    r if r is not None else ClientResult(id=s["request_id"], user=s["user"], kind="no_answer")
    for r, s in zip(results, specs, strict=True)
  ]


# ------------------------------------------------------------------------------------------------
# The binary: a measured edge loop against the latency model.


def serving_system(config, num_steps: int, image_shape) -> system.SystemParams:
  """The scheduler's constants for the real loop over models of ``num_steps`` levels.

  ``scheduler.system`` of the run's config with T the models' chain length (n_min scaled with
  it) and a loopback link: the physical formula over the frames' real sizes.
  """
  s = dict(config.scheduler.system)
  scale = num_steps / float(s["num_steps"])
  h, w, c = image_shape
  payload = h * w * c * 4
  # A request's header is ~200 bytes; a latent answer's ~120 (protocol.request_header).
  s.update(
    num_steps=int(num_steps),
    min_split=float(s["min_split"]) * scale,
    prompt_bits=8.0 * (protocol.PREFIX_BYTES + 200 + payload),
    latent_bits=8.0 * (protocol.PREFIX_BYTES + 120 + payload),
    transmission="physical",
  )
  return system.SystemParams(**s)


def device_fn_for(models, user: int) -> DeviceFn:
  """A device's ``device_fn``: it holds its own personalized slice only (no cluster model)."""
  from hybrid import models as models_lib

  own = dataclasses.replace(
    models,
    personal_params=jax.tree.map(lambda a: a[user : user + 1], models.personal_params),
    num_users=1,
    cluster_params=None,
  )
  return lambda x_n, n, key: models_lib.device_denoise(own, 0, x_n, n, key)


def _ratio(rows, meas: str, pred: str) -> float | None:
  vals = [r[meas] / r[pred] for r in rows if r.get(pred)]
  return float(np.mean(vals)) if vals else None


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean measured / predicted over answered requests: total, and the two halves of a request
  (until the answer: wait, decision, edge steps, link; after it: the device's local steps)."""
  ok = [r for r in rows if r["kind"] in ("latent", "local")]
  meas = np.array([r["measured"] for r in ok])
  pred = np.array([r["predicted"] for r in ok])
  out: dict[str, Any] = {"answered": len(ok), "requests": len(rows)}
  if not ok:
    return out
  out.update(
    mean_measured=float(meas.mean()),
    mean_predicted=float(pred.mean()),
    mean_abs_error=float(np.abs(meas - pred).mean()),
    mean_ratio=float(np.mean(meas / pred)),
    median_ratio=float(np.median(meas / pred)),
    correlation=float(np.corrcoef(meas, pred)[0, 1]) if len(ok) > 2 else None,
  )
  for kind in ("latent", "local"):
    sub = [r for r in ok if r["kind"] == kind]
    if sub:
      out[f"{kind}_count"] = len(sub)
      out[f"{kind}_mean_ratio"] = _ratio(sub, "measured", "predicted")
      out[f"{kind}_answer_mean_ratio"] = _ratio(sub, "measured_answer", "predicted_answer")
      out[f"{kind}_local_mean_ratio"] = _ratio(sub, "measured_local", "predicted_local")
  per_round: dict[int, set] = {}
  for r in ok:
    per_round.setdefault(r["round"], set()).add(r.get("window"))
  out["windows_per_round"] = float(np.mean([len(v) for v in per_round.values()]))
  return out


def write_report(out: str, result: dict[str, Any]) -> None:
  """``serve.json``, ``serve.md`` and ``serve.png`` in ``out``."""
  fileio.write_json(os.path.join(out, "serve.json"), result, indent=1)
  rows, s = result["rows"], result["summary"]
  lines = [
    "# hybrid.serve: measured edge loop vs the latency model",
    "",
    f"`{result['command']}`",
    "",
    f"Scheduler `{result['scheduler']}`; profile `{result['profile']}`; edge G = "
    f"{result['num_gpus']:g}; T = {result['num_steps']}, n in [{result['min_split']:.1f}, "
    f"{result['num_steps']}]; window K = {result['window']:g} s; {result['rounds']} rounds of "
    f"{result['users']} devices on {result['address']}. Device speed emulated (each device's "
    "n local steps take at least n tau_i); the link is loopback. Served x_0 vs `hybrid_sample` "
    f"with the same keys and decisions: max |diff| {_fmt(result.get('max_abs_diff_vs_hybrid_sample'), '.2e')}.",
    "",
    "Each request in two halves, predicted / measured: until the answer (wait, decision, edge "
    "steps, link; `edge` is the edge's own time to this latent) and after it (the n local "
    "steps; `compute` is the device's real computation inside them).",
    "",
    "| round | client | user | tau (ms/step) | alpha | decision | n | B | wait (s) | edge (s) "
    "| answer pred / meas (s) | local pred / meas (s) | compute (s) | total pred / meas (s) "
    "| meas / pred |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['round']} | {r['id']} | {r['user']} | {1e3 * r['tau']:.2f} | {r['alpha']:.3g} | "
      f"{r['kind']} | {_fmt(r.get('split'), 'd')} | {_fmt(r.get('batch'), 'd')} | "
      f"{_fmt(r.get('wait'), '.3f')} | {_fmt(r.get('edge_seconds'), '.3f')} | "
      f"{_fmt(r.get('predicted_answer'), '.3f')} / {_fmt(r.get('measured_answer'), '.3f')} | "
      f"{_fmt(r.get('predicted_local'), '.3f')} / {_fmt(r.get('measured_local'), '.3f')} | "
      f"{_fmt(r.get('local_compute'), '.3f')} | "
      f"{_fmt(r.get('predicted'), '.3f')} / {_fmt(r.get('measured'), '.3f')} | "
      f"{_fmt(r['measured'] / r['predicted'] if r.get('predicted') else None, '.3f')} |"
    )
  lines += ["", "```", json.dumps(s, indent=2), "```", ""]
  fileio.write_text(os.path.join(out, "serve.md"), "\n".join(lines))
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
  panels = (
    ("predicted", "measured", "end to end"),
    ("predicted_answer", "measured_answer", "until the answer (wait, edge, link)"),
    ("predicted_local", "measured_local", "the device's local steps"),
  )
  for ax, (pk, mk, title) in zip(axes, panels, strict=True):
    vals = []
    for kind, marker in (("latent", "o"), ("local", "s")):
      sub = [r for r in rows if r["kind"] == kind and r.get(pk) is not None]
      if sub:
        xs, ys = [r[pk] for r in sub], [r[mk] for r in sub]
        vals += xs + ys
        ax.scatter(xs, ys, marker=marker, s=18, label="admitted" if kind == "latent" else "denied")
    if vals:
      hi = 1.05 * max(vals)
      ax.plot([0, hi], [0, hi], "k--", lw=0.8, label="measured = predicted")
    ax.set_xlabel("latency model (s)")
    ax.set_ylabel("measured (s)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(f"hybrid.serve: {result['users']} devices x {result['rounds']} rounds", fontsize=10)
  fig.tight_layout()
  with fileio.atomic_path(os.path.join(out, "serve.png")) as tmp:
    fig.savefig(tmp, dpi=110)
  plt.close(fig)


def _fmt(v, spec: str) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "-"
  return format(v, spec)


def make_scheduler(
  workdir: str,
  sysp: system.SystemParams,
  profile: system.Profile,
  num_gpus: float,
  users: int,
  policy_workdir: str = "",
  agent_name: str = "",
  fallback: str = "optimum",
) -> Scheduler:
  """The trained policy of ``policy_workdir`` (default: found next to the run), else ``fallback``."""
  if policy_workdir == "none":
    found = None
  elif policy_workdir:
    found = policy_workdir
  else:
    found = find_policy_workdir(workdir)
  if found is None:
    logging.warning("no trained admission policy given or found: deciding with %r", fallback)
    return Scheduler(sysp, profile, num_gpus, fallback_policy(fallback, sysp, profile), fallback)
  ag, params, name, max_users = load_agent(found, agent_name, num_gpus, users)
  if max_users != sysp.max_users:
    sysp = dataclasses.replace(sysp, max_users=max_users)
  policy = drl_policy(ag, params, sysp, profile)
  ag.greedy_action(params, np.zeros((max_users, 4), np.float32), np.zeros(6, np.float32))
  return Scheduler(sysp, profile, num_gpus, policy, f"drl_convex ({found}/agents/{name})")


def _policy_dir(workdir: str, policy_workdir: str) -> str | None:
  if policy_workdir == "none":
    return None
  return policy_workdir or find_policy_workdir(workdir)


def resolve_profile(workdir: str, profile_path: str, policy_dir: str | None) -> str:
  """The profile the decisions and predictions use: ``--profile``; else the one the policy was
  trained on (its ``scheduler.profile``); else ``WORKDIR/profile.json``; else the paper's."""
  if profile_path:
    return profile_path
  if policy_dir is not None:
    cfg = os.path.join(policy_dir, "config.json")
    if not os.path.exists(cfg):
      raise FileNotFoundError(f"{policy_dir} is not a hybrid.optimize workdir (no config.json)")
    trained = _read_json(cfg)["scheduler"]["profile"]
    if trained == "paper" or os.path.exists(trained):
      return trained
  candidate = os.path.join(workdir, "profile.json")
  return candidate if os.path.exists(candidate) else "paper"


@dataclasses.dataclass(frozen=True)
class ServeSpec:
  """What both sides of the binary derive their system from (picklable for the server process)."""

  workdir: str
  users: int
  policy_workdir: str = ""
  agent_name: str = ""
  fallback: str = "optimum"
  profile_path: str = ""
  num_gpus: float = 1.0
  window: float = -1.0
  edge: str = "staged"
  host: str = DEFAULT_HOST
  port: int = 0
  frame_timeout: float = connections.FRAME_TIMEOUT_S
  idle_timeout: float = connections.IDLE_TIMEOUT_S
  max_connections: int = connections.MAX_CONNECTIONS

  def system(self, models) -> tuple[system.SystemParams, system.Profile, str]:
    """(serving SystemParams, profile, profile path) for ``models``."""
    big_t = models.num_timesteps
    sysp = serving_system(models.config, big_t, models.image_shape)
    if self.window > 0:
      sysp = dataclasses.replace(sysp, window=float(self.window))
    path = resolve_profile(
      self.workdir, self.profile_path, _policy_dir(self.workdir, self.policy_workdir)
    )
    return sysp, system.load_profile(path, big_t), path


def _edge_side(models, spec: ServeSpec) -> EdgeServer:
  """The edge of the binary: scheduler, compiled programs, a started server."""
  from hybrid import models as models_lib

  sysp, profile, _ = spec.system(models)
  scheduler = make_scheduler(
    spec.workdir,
    sysp,
    profile,
    spec.num_gpus,
    spec.users,
    spec.policy_workdir,
    spec.agent_name,
    spec.fallback,
  )
  edge_fn = lambda x, s, k: models_lib.edge_denoise(models, x, s, k)  # noqa: E731
  # Compile outside the measurement: one edge program per batch size.
  t0 = time.perf_counter()
  top = min(scheduler.sysp.capacity, spec.users)
  for b in range(1, top + 1):
    keys = jax.random.split(jax.random.key(0), b)
    x = np.zeros((b, *models.image_shape), np.float32)
    jax.block_until_ready(edge_fn(x, np.full((b,), models.num_timesteps - 1, np.int32), keys))
  logging.info("compiled the edge programs (B = 1..%d) in %.1f s", top, time.perf_counter() - t0)
  return EdgeServer(
    staged(models) if spec.edge == "staged" else one_shot(edge_fn),
    scheduler,
    image_shape=models.image_shape,
    num_users=models.num_users,
    window=scheduler.sysp.window,
    host=spec.host,
    port=spec.port,
    frame_timeout=spec.frame_timeout,
    idle_timeout=spec.idle_timeout,
    max_connections=spec.max_connections,
  ).start()


def _server_state(server: EdgeServer) -> dict[str, Any]:
  return {"windows": server.windows, "errors": server.errors, "lost": server.lost}


def _server_process(conn, models_factory, spec: ServeSpec) -> None:
  """The edge server as its own process: ready -> (address, scheduler), then serve until told
  to stop, then send back every window's record."""
  try:
    server = _edge_side(models_factory(), spec)
  except Exception as e:  # noqa: BLE001 -- reported to the parent, which raises
    conn.send({"error": f"{type(e).__name__}: {e}"})
    return
  conn.send({"address": server.address, "scheduler": server.scheduler.name})
  conn.recv()
  server.close()
  conn.send(_server_state(server))


class _ServerHandle:
  """The binary's view of its server, in this process (a thread) or in its own process."""

  def __init__(self, models_factory, spec: ServeSpec, in_process_models=None):
    self.server, self.proc, self.conn = None, None, None
    if in_process_models is not None:
      self.server = _edge_side(in_process_models, spec)
      self.info = {"address": self.server.address, "scheduler": self.server.scheduler.name}
      return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a fork of an initialized JAX is unsafe
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=_server_process, args=(child, models_factory, spec), daemon=True)
    self.proc.start()
    self.info = None

  def ready(self, timeout: float = 900.0) -> dict[str, Any]:
    if self.info is None:
      if not self.conn.poll(timeout):
        raise TimeoutError("the edge server process did not start")
      self.info = self.conn.recv()
      if "error" in self.info:
        raise RuntimeError(f"the edge server process failed: {self.info['error']}")
    return self.info

  def finish(self) -> dict[str, Any]:
    if self.server is not None:
      self.server.close()
      return _server_state(self.server)
    self.conn.send("stop")
    if not self.conn.poll(60.0):
      raise TimeoutError("the edge server process did not report back")
    state = self.conn.recv()
    self.proc.join(30.0)
    return state


def run(
  workdir: str,
  *,
  users: int = 12,
  policy_workdir: str = "",
  agent_name: str = "",
  fallback: str = "optimum",
  profile_path: str = "",
  num_gpus: float = 1.0,
  window: float = -1.0,
  rounds: int = 3,
  warmup_rounds: int = 1,
  seed: int = 0,
  host: str = DEFAULT_HOST,
  port: int = 0,
  frame_timeout: float = connections.FRAME_TIMEOUT_S,
  idle_timeout: float = connections.IDLE_TIMEOUT_S,
  max_connections: int = connections.MAX_CONNECTIONS,
  out: str = "",
  edge: str = "staged",
  server_process: bool = True,
  device_nice: int = 5,
  pace: bool = True,
  models_factory=None,
  models=None,
  command: str = "",
) -> dict[str, Any]:
  """The whole binary; returns what ``serve.json`` holds.

  Args:
    server_process: run the edge server in its own process (the binary); else in a thread of
      this one.
    device_nice: with a server process, the device side lowers its CPU priority by this much
      after starting the server (the emulated devices share this machine's cores with the edge;
      without it their computation slows the edge, which real devices would not).
    pace: emulate the devices' speed (off only to test the plumbing fast).
    models_factory: a picklable ``() -> HybridModels`` instead of ``load_run(workdir)``.
    models: this side's models if already loaded (else ``models_factory()``).
  """
  import functools

  from hybrid import models as models_lib

  if users < 1:
    raise ValueError(f"--users must be >= 1, got {users}")
  if rounds < 1 or warmup_rounds < 0:
    raise ValueError(
      f"--rounds must be >= 1 and --warmup_rounds >= 0, got {rounds}, {warmup_rounds}"
    )
  if edge not in EDGE_MODES:
    raise ValueError(f"--edge must be one of {EDGE_MODES}, got {edge!r}")
  if not (frame_timeout > 0 and idle_timeout > 0 and max_connections >= 1):
    raise ValueError(
      "--frame_timeout and --idle_timeout must be > 0 and --max_connections >= 1, got "
      f"{frame_timeout}, {idle_timeout}, {max_connections}"
    )
  factory = models_factory or functools.partial(models_lib.load_run, workdir)
  spec = ServeSpec(
    workdir=workdir,
    users=users,
    policy_workdir=policy_workdir,
    agent_name=agent_name,
    fallback=fallback,
    profile_path=profile_path,
    num_gpus=float(num_gpus),
    window=float(window),
    edge=edge,
    host=host,
    port=port,
    frame_timeout=float(frame_timeout),
    idle_timeout=float(idle_timeout),
    max_connections=int(max_connections),
  )
  # The server process starts before this process touches JAX, so that the nice below reaches
  # every XLA thread of the device side and none of the edge's.
  handle = None if not server_process else _ServerHandle(factory, spec)
  if handle is not None and device_nice:
    os.nice(device_nice)
  models = factory() if models is None else models
  sysp, profile, path = spec.system(models)
  if users > sysp.max_users:
    raise ValueError(f"--users={users} exceeds the state rows (max_users={sysp.max_users})")
  if handle is None:
    handle = _ServerHandle(None, spec, in_process_models=models)
  big_t = models.num_timesteps
  devices = [device_fn_for(models, c % models.num_users) for c in range(users)]
  base = jax.random.key(seed)
  jax.block_until_ready(devices[0](np.zeros(models.image_shape, np.float32), 1, base))
  info = handle.ready()
  address = tuple(info["address"])
  logging.info("edge server on %s:%d, scheduler %s", *address, info["scheduler"])

  rng = np.random.default_rng(seed)
  rounds_out = []
  # Round -1 warms both sides up (first calls, thread pools, caches) and is not reported.
  for rnd in range(-warmup_rounds, rounds):
    scn = system.sample_scenario(rng, profile, sysp, users, num_gpus)
    keys = jax.random.split(jax.random.fold_in(base, rnd + 1), users)
    x_T = np.asarray(models_lib.initial_noise(models, keys))
    arrival = sysp.window - scn.wait  # r_i ~ U(0, K), sorted
    specs = [
      dict(
        request_id=f"r{rnd}c{c}" if rnd >= 0 else f"warmup{-rnd}c{c}",
        user=c % models.num_users,
        tau=float(scn.tau[c]),
        alpha=float(scn.alpha[c]),
        key=keys[c],
        x_T=x_T[c],
        device_fn=devices[c],
        delay=float(arrival[c]),
      )
      for c in range(users)
    ]
    results = run_clients(
      address,
      specs,
      num_steps=big_t,
      pace=pace,
      timeout=max(120.0, 4 * big_t * float(scn.tau.max())),
    )
    if rnd >= 0:
      rounds_out.append((scn, keys, results))
    answered = sum(r.kind in ("latent", "local") for r in results)
    logging.info("round %d: %d/%d answered", rnd, answered, users)
  state = handle.finish()
  state["windows"] = [
    w for w in state["windows"] if not all(u["id"].startswith("warmup") for u in w["users"])
  ]
  decided = {u["id"]: (i, u) for i, w in enumerate(state["windows"]) for u in w["users"]}
  rows, diffs = [], []
  for rnd, (scn, keys, results) in enumerate(rounds_out):
    for c, res in enumerate(results):
      wi, u = decided.get(res.id, (None, {}))
      w = state["windows"][wi] if wi is not None else None
      rows.append(
        {
          "round": rnd,
          "window": wi,
          "id": res.id,
          "user": res.user,
          "tau": float(scn.tau[c]),
          "alpha": float(scn.alpha[c]),
          "device_type": int(scn.device_type[c]),
          "kind": res.kind,
          "split": res.split,
          "batch": res.batch,
          "wait": u.get("wait"),
          "edge_seconds": u.get("edge_ready") if res.kind == "latent" else None,
          "decision_seconds": w["decision_seconds"] if w else None,
          "local_compute": res.local_compute,
          "predicted": u.get("predicted"),
          "measured": res.latency,
          # The halves: until the answer arrives (wait, decision, edge, link), then local.
          "predicted_answer": (
            u["predicted"] - res.split * float(scn.tau[c]) if u and res.split is not None else None
          ),
          "measured_answer": res.answered - res.sent,
          "predicted_local": res.split * float(scn.tau[c]) if res.split is not None else None,
          "measured_local": res.done - res.answered,
        }
      )
    # The network path changes nothing: the same keys and decisions through hybrid_sample.
    ok = [c for c, r in enumerate(results) if r.kind in ("latent", "local")]
    if ok:
      ref = models_lib.hybrid_sample(
        models,
        np.array([results[c].user for c in ok]),
        np.array([results[c].split for c in ok], np.int32),
        keys[np.array(ok)],
      )
      served = np.stack([results[c].x0 for c in ok])
      diffs.append(float(np.max(np.abs(np.asarray(ref) - served))))
  result = {
    "command": command or f"python -m hybrid.serve --workdir={workdir} --users={users}",
    "workdir": workdir,
    "scheduler": info["scheduler"],
    "profile": path,
    "num_gpus": float(num_gpus),
    "num_steps": big_t,
    "min_split": sysp.min_split,
    "window": sysp.window,
    "rounds": rounds,
    "warmup_rounds": warmup_rounds,
    "users": users,
    "edge": edge,
    "server_process": server_process,
    "device_nice": device_nice if server_process else 0,
    "address": f"{address[0]}:{address[1]}",
    "timeouts": {"frame": spec.frame_timeout, "idle": spec.idle_timeout},
    "max_connections": spec.max_connections,
    "system": dataclasses.asdict(sysp),
    "max_abs_diff_vs_hybrid_sample": max(diffs) if diffs else None,
    "rows": rows,
    "windows": state["windows"],
    "errors": state["errors"],
    "lost": state["lost"],
    "summary": _summary(rows),
  }
  write_report(out or os.path.join(workdir, "serve"), result)
  logging.info("summary: %s", json.dumps(result["summary"]))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    _run_from_flags(f)
  except (ValueError, FileNotFoundError) as e:
    # A bad flag or workdir: one line, not a traceback.
    sys.exit(f"hybrid.serve: {e}")


def _run_from_flags(f) -> None:
  run(
    f.workdir,
    users=f.users,
    policy_workdir=f.policy_workdir,
    agent_name=f.agent,
    fallback=f.fallback,
    profile_path=f.profile,
    num_gpus=f.num_gpus,
    window=f.window,
    rounds=f.rounds,
    warmup_rounds=f.warmup_rounds,
    seed=f.seed,
    host=f.host,
    port=f.port,
    frame_timeout=f.frame_timeout,
    idle_timeout=f.idle_timeout,
    max_connections=f.max_connections,
    out=f.out,
    edge=f.edge,
    server_process=f.server_process,
    device_nice=f.device_nice,
    command="python -m hybrid.serve " + " ".join(sys.argv[1:]),
  )


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["workdir"])
  from common.train import cli

  app.run(main, flags_parser=cli.parse_flags_or_exit)
