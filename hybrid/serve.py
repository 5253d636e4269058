"""The edge loop on loopback: a real server batching many devices' requests (spec §1, §4, §7, §11 B).

``python -m hybrid.serve --workdir=runs/hybrid --users=12``

The binary starts the edge server in its own process (``--server_process``) and runs the
``--users`` devices as threads of a second process with a lower CPU priority (``--device_nice``):
the emulated devices share this machine's cores with the edge, and real devices would not slow
the edge down. Pieces, in the order a request meets them (the module holding each in brackets):

* ``EdgeServer`` (``hybrid.edge``) listens on 127.0.0.1 (``--host`` to change it) and reads framed
  requests (``hybrid.protocol``) from any number of device connections, one thread per connection. A
  frame that is malformed, over the payload cap (refused from its length prefix, before the body is
  read), of the wrong shape or dtype, or from an unknown user gets an error reply on its own
  connection; nothing else sees it. So does a header that does not parse, whatever the reason (bad
  UTF-8 or JSON, nesting past the recursion limit, not an object, wrong types). Connections
  (``hybrid.connections``) have two timeouts: a frame that has started must arrive whole within
  ``--frame_timeout`` (default 5 s), and a connection with no request awaiting its answer that sends
  nothing for ``--idle_timeout`` (default 30 s) is closed (a ``timeout`` error frame, then the
  close), so idle sockets cannot hold the ``--max_connections`` cap (default 256; ``busy`` beyond
  it).
* The batcher opens a window at the first queued request and closes it ``window`` seconds later (the
  paper's K; earlier once ``max_users`` requests are in, the most the policy's state holds).
  Requests whose device hung up are dropped at the close. The ``Scheduler`` (``hybrid.policy``) then
  decides who is admitted: users in the visiting order of the MDP (strongest device first), the
  state built from each request's alpha, device step latency and *measured* wait; the decision comes
  from the trained PER-DQN of a ``hybrid.optimize`` workdir (``agent.drl_decide``: grant/deny user
  by user, closed-form cut points at the final B), or from a fallback policy (``--fallback``,
  default the exact optimum) when no policy is given. Cut points are rounded to whole steps.
* Denied users are told to run locally at once. The admitted users' x_T go through the cluster
  model as one batch (T -> n_i per row) and each user's x_{n_i} is streamed back on its
  connection as soon as it is ready: ``--edge=staged`` (default) cuts the batch's chain at each
  distinct cut point, so user i's latent leaves after its own T - n_i steps with all B rows in every
  network call, as the latency model charges; ``--edge=one_shot`` is one ``edge_denoise`` call,
  every latent leaving after T - min n steps. A device that disconnected is skipped; the others
  are not disturbed.
* A device (``hybrid.device.run_client``) holds only its own personalized parameters and
  finishes n_i -> 0 with ``device_denoise``. **Device heterogeneity is emulated**: every device
  here is the same CPU, so a device with per-step latency tau_i takes at least ``n tau_i`` for its
  n local steps, sleeping for whatever its real computation leaves of that budget.

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
local steps). Served x_0 is checked against ``hybrid_sample`` with the same keys and cut points.

Writes (``hybrid.serve_report``) ``OUT/serve.json`` (every request with its decision, measured and
predicted latency and their parts, every window), ``OUT/serve.md`` (the table) and ``OUT/serve.png``
(measured vs predicted), with ``OUT = WORKDIR/serve`` by default.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from hybrid import connections, device, policy, protocol, serve_report, system
from hybrid import edge as edge_lib

EDGE_MODES = ("staged", "one_shot")


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
  flags.DEFINE_enum(
    "fallback", "optimum", list(policy.FALLBACKS), "Policy when no trained agent is used."
  )
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
  flags.DEFINE_string("host", edge_lib.DEFAULT_HOST, "Address the server binds.")
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
  # A request's header is ~200 bytes; a latent answer's ~120 (device.request_header).
  s.update(
    num_steps=int(num_steps),
    min_cut_point=float(s["min_cut_point"]) * scale,
    prompt_bits=8.0 * (protocol.PREFIX_BYTES + 200 + payload),
    latent_bits=8.0 * (protocol.PREFIX_BYTES + 120 + payload),
    transmission="physical",
  )
  return system.SystemParams(**s)


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
  host: str = edge_lib.DEFAULT_HOST
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
    path = policy.resolve_profile(
      self.workdir,
      self.profile_path,
      policy.chosen_policy_workdir(self.workdir, self.policy_workdir),
    )
    return sysp, system.load_profile(path, big_t), path


def _edge_side(models, spec: ServeSpec) -> edge_lib.EdgeServer:
  """The edge of the binary: scheduler, compiled programs, a started server."""
  from hybrid import models as models_lib

  sysp, profile, _ = spec.system(models)
  scheduler = policy.make_scheduler(
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
  return edge_lib.EdgeServer(
    edge_lib.staged(models) if spec.edge == "staged" else edge_lib.one_shot(edge_fn),
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


def _server_state(server: edge_lib.EdgeServer) -> dict[str, Any]:
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


def _check_run_args(
  users, rounds, warmup_rounds, edge_mode, frame_timeout, idle_timeout, max_connections
) -> None:
  """The flags ``run`` can refuse before it starts anything."""
  if users < 1:
    raise ValueError(f"--users must be >= 1, got {users}")
  if rounds < 1 or warmup_rounds < 0:
    raise ValueError(
      f"--rounds must be >= 1 and --warmup_rounds >= 0, got {rounds}, {warmup_rounds}"
    )
  if edge_mode not in EDGE_MODES:
    raise ValueError(f"--edge must be one of {EDGE_MODES}, got {edge_mode!r}")
  if not (frame_timeout > 0 and idle_timeout > 0 and max_connections >= 1):
    raise ValueError(
      "--frame_timeout and --idle_timeout must be > 0 and --max_connections >= 1, got "
      f"{frame_timeout}, {idle_timeout}, {max_connections}"
    )


def _run_rounds(
  models,
  devices: list[device.DeviceFn],
  address: tuple[str, int],
  sysp: system.SystemParams,
  profile: system.Profile,
  base: jax.Array,
  seed: int,
  rounds: int,
  warmup_rounds: int,
  num_gpus: float,
  pace: bool,
) -> list[tuple[system.Scenario, jax.Array, list[device.ClientResult]]]:
  """Every round's devices against the running edge; returns the measured rounds'
  ``(scenario, keys, results)``, results in the scenario's user order."""
  from hybrid import models as models_lib

  users, big_t = len(devices), models.num_timesteps
  rng = np.random.default_rng(seed)
  measured = []
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
    results = device.run_clients(
      address,
      specs,
      num_steps=big_t,
      pace=pace,
      timeout=max(120.0, 4 * big_t * float(scn.tau.max())),
    )
    if rnd >= 0:
      measured.append((scn, keys, results))
    answered = sum(r.kind in ("latent", "local") for r in results)
    logging.info("round %d: %d/%d answered", rnd, answered, users)
  return measured


def _max_diff_vs_hybrid_sample(models, measured) -> float | None:
  """Largest |served x_0 - ``hybrid_sample``| over the answered requests of ``measured``."""
  from hybrid import models as models_lib

  diffs = []
  for _, keys, results in measured:
    # The network path changes nothing: the same keys and decisions through hybrid_sample.
    ok = [c for c, r in enumerate(results) if r.kind in ("latent", "local")]
    if ok:
      ref = models_lib.hybrid_sample(
        models,
        np.array([results[c].user for c in ok]),
        np.array([results[c].cut_point for c in ok], np.int32),
        keys[np.array(ok)],
      )
      served = np.stack([results[c].x0 for c in ok])
      diffs.append(float(np.max(np.abs(np.asarray(ref) - served))))
  return max(diffs) if diffs else None


def _record(
  spec: ServeSpec,
  models,
  sysp: system.SystemParams,
  *,
  profile_path: str,
  scheduler: str,
  address: tuple[str, int],
  measured,
  state: dict[str, Any],
  rounds: int,
  warmup_rounds: int,
  server_process: bool,
  device_nice: int,
  command: str,
) -> dict[str, Any]:
  """What ``serve.json`` holds: the run's settings, every measured request joined with its
  window's decision (warm-up windows left out), the server's errors and losses, the summary."""
  windows = [
    w for w in state["windows"] if not all(u["id"].startswith("warmup") for u in w["users"])
  ]
  rows = serve_report.request_rows(measured, windows)
  return {
    "command": command or f"python -m hybrid.serve --workdir={spec.workdir} --users={spec.users}",
    "workdir": spec.workdir,
    "scheduler": scheduler,
    "profile": profile_path,
    "num_gpus": spec.num_gpus,
    "num_steps": models.num_timesteps,
    "min_cut_point": sysp.min_cut_point,
    "window": sysp.window,
    "rounds": rounds,
    "warmup_rounds": warmup_rounds,
    "users": spec.users,
    "edge": spec.edge,
    "server_process": server_process,
    "device_nice": device_nice if server_process else 0,
    "address": f"{address[0]}:{address[1]}",
    "timeouts": {"frame": spec.frame_timeout, "idle": spec.idle_timeout},
    "max_connections": spec.max_connections,
    "system": dataclasses.asdict(sysp),
    "max_abs_diff_vs_hybrid_sample": _max_diff_vs_hybrid_sample(models, measured),
    "rows": rows,
    "windows": windows,
    "errors": state["errors"],
    "lost": state["lost"],
    "summary": serve_report.summarize(rows),
  }


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
  host: str = edge_lib.DEFAULT_HOST,
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
  from hybrid import models as models_lib

  _check_run_args(users, rounds, warmup_rounds, edge, frame_timeout, idle_timeout, max_connections)
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
  devices = [device.device_fn_for(models, c % models.num_users) for c in range(users)]
  base = jax.random.key(seed)
  jax.block_until_ready(devices[0](np.zeros(models.image_shape, np.float32), 1, base))
  info = handle.ready()
  address = tuple(info["address"])
  logging.info("edge server on %s:%d, scheduler %s", *address, info["scheduler"])
  measured = _run_rounds(
    models, devices, address, sysp, profile, base, seed, rounds, warmup_rounds, num_gpus, pace
  )
  result = _record(
    spec,
    models,
    sysp,
    profile_path=path,
    scheduler=info["scheduler"],
    address=address,
    measured=measured,
    state=handle.finish(),
    rounds=rounds,
    warmup_rounds=warmup_rounds,
    server_process=server_process,
    device_nice=device_nice,
    command=command,
  )
  serve_report.write_report(out or os.path.join(workdir, "serve"), result)
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
