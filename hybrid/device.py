"""A device of the edge loop: it holds only its own personalized slice and finishes x_0 locally.

``run_client`` sends x_T, takes the edge's answer (a latent x_{n_i}, or "run locally") and runs
the remaining n_i steps with ``device_denoise``. **Device heterogeneity is emulated**: every
device here is the same CPU, so a device with per-step latency tau_i finishes its n local steps
no sooner than ``n tau_i`` after starting them: the real computation runs inside that budget and
the device then sleeps for the rest (if the computation takes longer, e.g. under CPU contention,
the measured latency shows it). ``run_clients`` runs many devices as threads.
"""

from __future__ import annotations

import dataclasses
import math
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from hybrid import protocol

DeviceFn = Callable[[np.ndarray, int, jax.Array], Any]  # (x_n [H,W,C], n, key) -> x_0 [H,W,C]


@dataclasses.dataclass
class ClientResult:
  """What one device saw. Times are its monotonic clock (seconds)."""

  id: str
  user: int
  kind: str  # latent | local | error | no_answer
  cut_point: int | None = None
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
  """The header of a device's request frame; its payload is x_T's float32 bytes."""
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
  n = header.get("cut_point")
  if not isinstance(n, int) or not 0 <= n <= num_steps:
    raise protocol.RequestError(
      protocol.BAD_FIELD, f"answer's cut_point {n!r} not in [0, {num_steps}]"
    )
  res.kind, res.cut_point, res.batch = kind, n, header.get("batch")
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
