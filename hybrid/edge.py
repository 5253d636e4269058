"""The edge server: device requests batched per window, latents streamed back (spec §1, §4, §7).

``EdgeServer`` listens on 127.0.0.1 and reads framed requests (``hybrid.protocol``) from any
number of device connections, one reader thread each (``hybrid.connections``). A batcher opens a
window at the first queued request and closes it ``window`` seconds later (or once the policy's
state is full); the window's ``policy.Scheduler`` decides who is admitted; denied users are told
to run locally at once, and the admitted batch runs through the cluster-wide model, each user's
latent leaving as soon as its own cut point is reached (``staged``) or when the whole batch is done
(``one_shot``).
"""

from __future__ import annotations

import dataclasses
import math
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging

from hybrid import connections, policy, protocol

DEFAULT_HOST = "127.0.0.1"

# (x_T [B,H,W,C], cut_points [B], keys [B])
EdgeFn = Callable[[np.ndarray, np.ndarray, jax.Array], Any]
# (x_T, cut_points, keys) -> iterator of (rows whose latent is ready, x [B, H, W, C] holding them)
EdgeStages = Callable[[np.ndarray, np.ndarray, jax.Array], Iterator[tuple[np.ndarray, np.ndarray]]]


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
      ``(x_T [B, H, W, C] float32, cut_points [B] int32, keys [B] PRNG keys) -> iterator of (rows,
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
    scheduler: policy.Scheduler,
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
          "cut_point": int(dec.cut_point[i]),
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
          {
            "type": "local",
            "id": r.client_id,
            "cut_point": int(self.num_steps),
            "batch": dec.batch,
          },
        ):
          self.lost.append({"id": r.client_id, "stage": "local answer"})
    admitted = [i for i in range(len(live)) if dec.admit[i]]
    if not admitted:
      record["edge_seconds"] = 0.0
      return
    x = np.stack([live[i].x_T for i in admitted])
    cut_points = np.asarray([dec.cut_point[i] for i in admitted], np.int32)
    keys = jax.random.wrap_key_data(np.stack([live[i].key for i in admitted]))
    t0 = time.perf_counter()
    ready = {}
    for rows, x_n in self.edge(x, cut_points, keys):
      x_n = np.asarray(x_n, np.float32)
      if x_n.shape != x.shape:
        raise RuntimeError(f"the edge returned {x_n.shape} for a batch {x.shape}")
      for j in np.asarray(rows).reshape(-1):
        i = admitted[int(j)]
        r = live[i]
        head = {
          "type": "latent",
          "id": r.client_id,
          "cut_point": int(dec.cut_point[i]),
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

  def stages(x_T, cut_points, keys):
    yield np.arange(len(cut_points)), jax.block_until_ready(edge_fn(x_T, cut_points, keys))

  return stages


def staged(models) -> EdgeStages:
  """The batch's chain cut at each distinct cut point: user i's latent goes out after its own
  T - n_i steps, while the whole batch of B rows stays in every network call (finished rows
  frozen), which is what the latency model charges (``(T - n_i) tau_e(B)``).

  Runs ``models.programs.chain`` (the program under ``edge_denoise``) stage by stage; each
  row's levels and per-level noise are those of one ``edge_denoise`` call, so the latents are
  the same.
  """
  big_t = models.num_timesteps

  def stages(x_T, cut_points, keys):
    cut_points = np.asarray(cut_points, np.int32)
    b = len(cut_points)
    x = jax.numpy.asarray(x_T, jax.numpy.float32)
    level = big_t
    for stop in sorted({int(v) for v in cut_points}, reverse=True):
      if stop < level:
        x = models.programs.chain(
          models.cluster_params,
          x,
          np.full((b,), level, np.int32),
          np.maximum(cut_points, stop).astype(np.int32),
          keys,
        )
        level = stop
      yield np.flatnonzero(cut_points == stop), jax.block_until_ready(x)

  return stages
