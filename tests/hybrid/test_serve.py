"""hybrid.serve: the real edge loop on loopback with tiny random-init models (T = 24).

Served x_0 is compared with ``hybrid.models.hybrid_sample`` run one request at a time with the
same key and cut point: the network path, the batching and the per-device parameter slices change
nothing. Devices run unpaced here (their emulated speed only adds sleeps).
"""

import json
import os
import socket
import struct
import threading
import time

import jax
import numpy as np
import pytest

from common.data import get_info
from configs import hybrid as hybrid_configs
from hybrid import agent as agent_lib
from hybrid import device, env, policy, protocol, serve, system
from hybrid import edge as edge_lib
from hybrid import method as hybrid_method
from hybrid import models as models_lib

NUM_USERS = 3
CAPACITY = 8
WINDOW = 0.6


def tiny_models():
  """U = 3 random-init tiny U-Nets (T = 24); module-level so a server process can build it."""
  config = hybrid_configs.get_config("tiny")
  with config.unlocked():
    config.hybrid.num_users = NUM_USERS
    config.hybrid.user_classes = (0, 1, 2)
    config.scheduler.system.capacity = CAPACITY
  method = hybrid_method.Hybrid(config, get_info(config.data))
  params = jax.device_get(jax.jit(method.init_params)(jax.random.key(3)))
  return models_lib.from_params(config, params, programs=method.programs)


def tiny_setup():
  """(models, serving SystemParams with the test window, profile): the ``tiny`` fixture's value."""
  models = tiny_models()
  big_t = models.num_timesteps
  sysp = serve.serving_system(models.config, big_t, models.image_shape)
  sysp = system.SystemParams(**{**sysp.__dict__, "window": WINDOW})
  # Devices 4-8x slower than a batch-1 edge step: admission pays, so the capacity binds.
  profile = system.Profile.from_dict(
    {
      "accuracy": {"a": 0.4, "b": 8.0},
      "latency": {"k": 2e-4, "h": 1e-3, "device_slowdowns": [4, 6, 8]},
    },
    big_t,
  )
  return models, sysp, profile


@pytest.fixture(scope="module")
def tiny():
  return tiny_setup()


def _server(tiny, edge=None, **kw):
  models, sysp, profile = tiny
  scheduler = policy.Scheduler(
    sysp, profile, 1.0, policy.fallback_policy("optimum", sysp, profile), "optimum"
  )
  return edge_lib.EdgeServer(
    edge or edge_lib.staged(models),
    scheduler,
    image_shape=models.image_shape,
    num_users=models.num_users,
    window=kw.pop("window", WINDOW),
    **kw,
  )


def _specs(tiny, count, prefix="c", seed=0, delays=None):
  models, sysp, profile = tiny
  keys = jax.random.split(jax.random.key(seed), count)
  x_T = np.asarray(models_lib.initial_noise(models, keys))
  rng = np.random.default_rng(seed)
  taus = profile.latency.device_tau
  return [
    dict(
      request_id=f"{prefix}{i}",
      user=i % models.num_users,
      tau=float(taus[i % len(taus)]),
      alpha=float(rng.uniform(0.0, 0.2)),
      key=keys[i],
      x_T=x_T[i],
      device_fn=device.device_fn_for(models, i % models.num_users),
      delay=0.0 if delays is None else delays[i],
    )
    for i in range(count)
  ]


def _check_against_hybrid_sample(models, specs, results):
  for spec, res in zip(specs, results, strict=True):
    assert res.kind in ("latent", "local"), (res.id, res.kind, res.error)
    ref = models_lib.hybrid_sample(
      models, np.array([spec["user"]]), np.array([res.cut_point], np.int32), spec["key"][None]
    )
    np.testing.assert_allclose(res.x0, np.asarray(ref)[0], atol=1e-4, err_msg=res.id)


def test_many_concurrent_clients_all_answered(tiny):
  models, sysp, profile = tiny
  big_t = models.num_timesteps
  specs = _specs(tiny, 16, delays=list(np.linspace(0.0, 0.15, 16)))
  with _server(tiny) as server:
    assert server.address[0] == "127.0.0.1"  # loopback unless told otherwise
    results = device.run_clients(server.address, specs, num_steps=big_t, pace=False, timeout=30)
  assert [w["requests"] for w in server.windows] == [16]
  w = server.windows[0]
  kinds = [r.kind for r in results]
  assert 1 <= w["batch"] <= CAPACITY and kinds.count("latent") == w["batch"]
  assert kinds.count("local") == 16 - w["batch"]
  # Staged edge: the latent of a user with more local steps leaves no later than one with fewer.
  ready = sorted((-u["cut_point"], u["edge_ready"]) for u in w["users"] if u["admitted"])
  assert all(a[1] <= b[1] for a, b in zip(ready[:-1], ready[1:], strict=True) if a[0] < b[0])
  _check_against_hybrid_sample(models, specs, results)
  # The prediction is the latency model's for this window's decisions and measured waits.
  edge_k, edge_h = profile.latency.edge(1.0)
  b = w["batch"]
  for u in w["users"]:
    n = u["cut_point"]
    if u["admitted"]:
      assert sysp.min_cut_point - 0.5 <= n <= big_t
      want = (big_t - n) * (edge_k * b + edge_h) + sysp.transmission_latency(b) + n * u["tau"]
    else:
      assert n == big_t
      want = big_t * u["tau"]
    assert u["predicted"] == pytest.approx(want + u["wait"], rel=1e-9)
    assert 0 <= u["wait"] <= WINDOW + 0.5  # the window closes late only on a loaded machine


def _send_raw(address, data: bytes, read=True):
  with socket.create_connection(address, timeout=10) as s:
    s.sendall(data)
    if not read:
      return None
    return protocol.recv_frame(s, max_payload=1 << 16, timeout_s=10)[0]


def _request(spec, **over):
  head = device.request_header(
    spec["request_id"], spec["user"], spec["tau"], spec["alpha"], spec["key"], spec["x_T"]
  )
  head.update(over)
  return head


def test_malformed_requests_refused_while_a_batch_completes(tiny):
  models = tiny[0]
  good = _specs(tiny, 4, prefix="good", seed=1, delays=[0.0, 0.05, 0.1, 0.15])
  bad_spec = _specs(tiny, 1, prefix="bad", seed=2)[0]
  x = bad_spec["x_T"]
  payload = protocol.array_bytes(x)
  nan = x.copy()
  nan[0, 0, 0] = np.nan
  cases = {
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", protocol.MALFORMED),
    "json": (
      struct.pack("!4sII", protocol.MAGIC, 5, 0) + b"{nope",
      protocol.MALFORMED,
    ),
    # Only the prefix is sent: the refusal must not wait for the 1 GB it announces.
    "oversized": (struct.pack("!4sII", protocol.MAGIC, 2, 1 << 30), protocol.OVERSIZED),
    "shape": (
      protocol.encode_frame(_request(bad_spec, shape=[4, 8, 2]), payload),
      protocol.BAD_SHAPE,
    ),
    "short_payload": (protocol.encode_frame(_request(bad_spec), payload[:-4]), protocol.BAD_SHAPE),
    "dtype": (
      protocol.encode_frame(_request(bad_spec, dtype="float64"), payload),
      protocol.BAD_DTYPE,
    ),
    "user": (protocol.encode_frame(_request(bad_spec, user=99), payload), protocol.UNKNOWN_USER),
    "alpha": (protocol.encode_frame(_request(bad_spec, alpha=-1.0), payload), protocol.BAD_FIELD),
    "key": (protocol.encode_frame(_request(bad_spec, key=[1]), payload), protocol.BAD_FIELD),
    "nan": (
      protocol.encode_frame(_request(bad_spec), protocol.array_bytes(nan)),
      protocol.BAD_VALUE,
    ),
    "type": (protocol.encode_frame({"type": "hello"}), protocol.BAD_TYPE),
  }
  replies = {}
  # A long window: the good batch must be whole even when a loaded machine delays the clients'
  # thread behind the malformed sends (with 0.6 s its last request once missed the window).
  with _server(tiny, window=3.0) as server:
    out = {}
    t = threading.Thread(
      target=lambda: out.setdefault(
        "r",
        device.run_clients(
          server.address, good, num_steps=models.num_timesteps, pace=False, timeout=30
        ),
      )
    )
    t.start()
    time.sleep(0.05)  # inside the good clients' window
    for name, (data, _) in cases.items():
      t0 = time.monotonic()
      replies[name] = _send_raw(server.address, data)
      assert time.monotonic() - t0 < 2.0, name
    t.join(60)
  for name, (_, code) in cases.items():
    assert replies[name]["type"] == "error" and replies[name]["code"] == code, (name, replies[name])
  assert sorted(e["code"] for e in server.errors) == sorted(code for _, code in cases.values())
  # The good batch is whole and unchanged.
  assert [w["requests"] for w in server.windows] == [4]
  _check_against_hybrid_sample(models, good, out["r"])


def test_client_disconnecting_mid_batch_loses_nothing_for_the_others(tiny):
  models = tiny[0]
  big_t = models.num_timesteps
  edge_started = threading.Event()

  def slow_edge(x, s, k):
    edge_started.set()
    time.sleep(0.4)  # the hung-up devices are gone before their latents are ready
    return models_lib.edge_denoise(models, x, s, k)

  good = _specs(tiny, 4, prefix="good", seed=4)
  quitters = _specs(tiny, 3, prefix="quit", seed=5)
  for q in quitters:
    q["tau"] = 10.0  # slow devices: admitted, so their latents go out during the batch
  with _server(tiny, edge=edge_lib.one_shot(slow_edge)) as server:
    out = {}
    t = threading.Thread(
      target=lambda: out.setdefault(
        "r", device.run_clients(server.address, good, num_steps=big_t, pace=False, timeout=30)
      )
    )
    t.start()
    socks = []
    for q in quitters:
      s = socket.create_connection(server.address, timeout=10)
      s.sendall(protocol.encode_frame(_request(q), protocol.array_bytes(q["x_T"])))
      socks.append(s)
    socks.pop(0).close()  # before the window closes: dropped from the batch
    assert edge_started.wait(10)
    for s in socks:  # while the edge runs the batch
      s.close()
    t.join(60)
    # The server goes on serving.
    again = _specs(tiny, 1, prefix="again", seed=6)
    later = device.run_clients(server.address, again, num_steps=big_t, pace=False, timeout=30)
  _check_against_hybrid_sample(models, good, out["r"])
  _check_against_hybrid_sample(models, again, later)
  assert server.windows[0]["requests"] == 7 and server.windows[0]["dropped"] == 1
  lost = {e["id"]: e["stage"] for e in server.lost}
  assert lost["quit0"] == "before the decision"
  admitted = {u["id"] for u in server.windows[0]["users"] if u["admitted"]}
  assert {"quit1", "quit2"} <= admitted
  assert lost["quit1"] == lost["quit2"] == "latent"


def _tiny_policy_workdir(tmp_path, sysp, profile):
  """A hybrid.optimize-layout workdir with a briefly trained agent (tiny network)."""
  c = hybrid_configs.get_config("tiny").scheduler
  cfg = agent_lib.AgentConfig.from_config(c.agent)
  ag = agent_lib.PerDQN(cfg, sysp.max_users)
  stream = env.ScenarioStream(sysp, profile, "dynamic", (1.0,), (4, 8))
  workdir = tmp_path / "optimize"
  trainer = agent_lib.Trainer(ag, stream, seed=0, ckpt_dir=str(workdir / "agents" / "dynamic"))
  trainer.run(30, log_every=30, ckpt_every=30)
  with open(workdir / "config.json", "w") as f:
    json.dump({"scheduler": {"system": {"max_users": sysp.max_users}}}, f)
  return str(workdir), ag, trainer.ts.params


def test_decisions_come_from_the_trained_policy(tiny, tmp_path):
  models, sysp, profile = tiny
  workdir, ag, params = _tiny_policy_workdir(tmp_path, sysp, profile)
  sched = policy.make_scheduler(str(tmp_path), sysp, profile, 1.0, 8, policy_workdir=workdir)
  assert sched.name.startswith("drl_convex")
  # Found next to the run (RUN/optimize) without the flag, too; 'none' takes the fallback.
  assert policy.make_scheduler(str(tmp_path), sysp, profile, 1.0, 8).name == sched.name
  assert policy.make_scheduler(str(tmp_path), sysp, profile, 1.0, 8, "none").name == "optimum"
  hybrid_env = env.HybridEnv(sysp, profile)
  rng = np.random.default_rng(0)
  admitted = []
  for _ in range(5):
    scn = system.sample_scenario(rng, profile, sysp, 8, 1.0)
    # Requests arrive in any order; the scheduler visits them strongest device first.
    perm = rng.permutation(8)
    got = sched.decide(scn.alpha[perm], scn.tau[perm], scn.wait[perm])
    seen = got.scenario
    assert np.all(np.diff(seen.tau) >= 0)
    np.testing.assert_array_equal(seen.alpha, scn.alpha[perm][got.order])
    want = agent_lib.drl_decide(ag, params, hybrid_env, seen)
    np.testing.assert_array_equal(got.admit[got.order], want.admit)
    np.testing.assert_array_equal(
      got.cut_point[got.order], np.where(want.admit, np.rint(want.cut_point), sysp.num_steps)
    )
    admitted.append(got.batch)
  assert sum(admitted) > 0


def test_binary_reports_measured_against_predicted(tiny, tmp_path):
  """The binary's path: the edge server in its own process, paced devices in this one."""
  profile_path = tmp_path / "profile.json"
  with open(profile_path, "w") as f:
    json.dump({"accuracy": {"a": 0.4, "b": 8.0}, "latency": {"k": 2e-4, "h": 1e-3}}, f)
  out = str(tmp_path / "serve")
  result = serve.run(
    str(tmp_path),
    users=4,
    policy_workdir="none",
    profile_path=str(profile_path),
    window=0.3,
    rounds=2,
    warmup_rounds=1,
    out=out,
    models_factory=tiny_models,
    models=tiny[0],
    device_nice=0,  # the pytest process keeps its priority
  )
  for name in ("serve.json", "serve.md", "serve.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert result["server_process"] and result["scheduler"] == "optimum"
  assert result["summary"]["answered"] == 8 and len(result["windows"]) == 2
  assert result["max_abs_diff_vs_hybrid_sample"] < 1e-4
  for r in result["rows"]:
    # Paced devices: a device never finishes its n local steps before n tau_i.
    assert r["measured_local"] >= r["predicted_local"] == pytest.approx(r["cut_point"] * r["tau"])
    assert r["predicted_answer"] >= r["wait"] > 0
    assert r["predicted_answer"] + r["predicted_local"] == pytest.approx(r["predicted"])
    assert r["measured_answer"] + r["measured_local"] == pytest.approx(r["measured"])
  assert "| meas / pred |" in open(os.path.join(out, "serve.md")).read()


def test_protocol_refuses_a_peer_of_the_old_format():
  # HYB1 answers said ``split`` where HYB2 says ``cut_point``: an old peer is refused at its
  # first frame instead of misreading the answer.
  assert protocol.MAGIC == b"HYB2"
  a, b = socket.socketpair()
  try:
    head = json.dumps({"type": "latent", "split": 3}).encode()
    a.sendall(struct.pack("!4sII", b"HYB1", len(head), 0) + head)
    with pytest.raises(protocol.FramingError, match="bad frame magic b'HYB1'"):
      protocol.recv_frame(b, max_payload=4, timeout_s=2)
  finally:
    a.close()
    b.close()


def test_protocol_refuses_oversized_prefix_before_reading_the_body():
  a, b = socket.socketpair()
  try:
    a.sendall(struct.pack("!4sII", protocol.MAGIC, 2, 4097))
    with pytest.raises(protocol.FramingError, match="oversized"):
      protocol.recv_frame(b, max_payload=4096, timeout_s=2)
    a.sendall(struct.pack("!4sII", protocol.MAGIC, 1 << 20, 0))
    with pytest.raises(protocol.FramingError, match="oversized"):
      protocol.recv_frame(b, max_payload=4096, timeout_s=2)
    frame = protocol.encode_frame({"type": "x", "v": 1}, b"abcd")
    a.sendall(frame)
    assert protocol.recv_frame(b, max_payload=4, timeout_s=2) == ({"type": "x", "v": 1}, b"abcd")
    a.close()
    with pytest.raises(protocol.ConnectionClosed):
      protocol.recv_frame(b, max_payload=4, timeout_s=2)
  finally:
    b.close()
