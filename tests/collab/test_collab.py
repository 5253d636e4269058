"""CollaFuse: privacy boundary, stacked clients, cut extremes, ratio noising, hand-off, resume, errors."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab import method as collab_method
from collab import protocol, server
from common import data
from common.diffusion import sampling
from common.train import loop
from common.train.method import DDPM
from common.train.validate import ConfigError
from configs import collab as collab_config


def tiny(**overrides):
  c = collab_config.get_config("digits")
  c.collab.num_clients = 2
  c.collab.classes_per_client = 5
  c.collab.cut_point = 8
  c.model.channels = (16, 32)
  c.model.num_heads = 2
  c.diffusion.num_timesteps = 20
  c.diffusion.sample_steps = 20
  c.batch_size = 8
  c.total_steps = 4
  c.log_every_steps = 1
  c.ckpt_every_steps = 2
  c.sample_every_steps = 0
  c.num_sample_images = 0  # no end-of-run grid (3-4 s a run); the resume test below asks for one
  c.mesh.data = 1
  c.update_from_flattened_dict(overrides)
  return c


def build(config):
  m = collab_method.CollaFuse(config, data.get_info(config.data))
  tx, lr = m.make_optimizer()
  state = jax.jit(loop.make_init_fn(m, tx, config.seed))()
  batch = {
    k: jnp.asarray(v) for k, v in next(m.train_iterator(process_index=0, process_count=1)).items()
  }
  return m, tx, lr, state, batch


def test_privacy_boundary_server_sees_only_the_cut_images(monkeypatch):
  config = tiny()
  m, tx, lr, state, batch = build(config)
  sent, received = [], []
  real_transmit, real_server_loss = protocol.transmit, server.train_message_loss

  def spy_transmit(*a, **k):
    msg = real_transmit(*a, **k)
    jax.debug.callback(lambda x: sent.append(np.asarray(x)), msg.x_cut)
    return msg

  def spy_server(d, f, msg, *a, **k):
    # Every array the server's training code is handed, whatever the traced structure.
    jax.debug.callback(
      lambda *xs: received.append([np.asarray(x) for x in xs]), *jax.tree.leaves(msg)
    )
    return real_server_loss(d, f, msg, *a, **k)

  monkeypatch.setattr(protocol, "transmit", spy_transmit)
  monkeypatch.setattr(server, "train_message_loss", spy_server)
  jax.block_until_ready(jax.jit(m.make_train_step(tx, lr, 0.99))(state, batch))
  assert len(sent) == 1 and len(received) == config.collab.num_clients
  # What the server's code gets is the transmitted message and nothing else: its cut images and
  # (because this config shares them) the labels.
  for arrays in received:
    assert len(arrays) == 2
    np.testing.assert_array_equal(arrays[0], sent[0])
    # The server applies its own classifier-free-guidance label dropout (null label 10).
    got, true = arrays[1].reshape(-1), np.asarray(batch["label"])
    assert np.all((got == true) | (got == 10))
  x_cut = sent[0].reshape(-1, 8, 8, 1)
  x0 = np.asarray(batch["image"])
  # x_cut is x0 noised to exactly level cut_point: the residual after removing sqrt(abar) x0 is
  # N(0, 1 - abar(cut_point)); x0 itself (residual 0) or a lower level (smaller residual) would
  # fail.
  abar = float(m.diffusion.np_alpha_bar_levels()[config.collab.cut_point])
  residual = x_cut - np.sqrt(abar) * x0
  assert abs(residual.std() - np.sqrt(1 - abar)) < 0.05 * np.sqrt(1 - abar)
  assert abs(residual.mean()) < 0.05
  # The server's functions take no argument through which x0 or the clients' noise could enter.
  import inspect

  assert "x0" not in inspect.signature(server.loss).parameters
  assert list(inspect.signature(m.server_handoff).parameters) == [
    "server_params",
    "rng",
    "shape",
    "labels",
    "num_steps",
  ]


def test_labels_stay_private_when_not_shared(monkeypatch):
  m, tx, lr, state, batch = build(tiny(**{"collab.share_labels": False}))
  received = []
  real = server.train_message_loss
  monkeypatch.setattr(
    server,
    "train_message_loss",
    lambda d, f, msg, *a, **k: received.append(msg) or real(d, f, msg, *a, **k),
  )
  jax.jit(m.make_train_step(tx, lr, 0.99))(state, batch)
  assert received and all(msg.labels is None for msg in received)


def _leaf_tolerance(grad):
  # float32 gradients summed over a few thousand products in another order differ by about
  # eps * sqrt(n) ~ 1e-5 of the leaf's largest entry; the step's subtraction (new - old params,
  # |params| < 1) adds an ulp near 1, 1.2e-7. 1e-4 of the largest entry plus 1e-6 bounds both
  # with room, and is still far below a wrong client's or a wrong batch's gradient.
  return 1e-4 * float(np.max(np.abs(grad))) + 1e-6


@pytest.mark.slow
def test_stacked_client_step_equals_separate_steps():
  # Adam's first step moves every weight by about lr whatever its gradient's size, so comparing
  # parameters after it compares the signs of float noise wherever a gradient is near zero (the
  # zero-initialised output layer). Plain SGD with lr 1 from random, non-degenerate weights makes
  # each step's parameter change the gradient itself, which is well-conditioned.
  import optax

  config = tiny()
  m, _, _, state, batch = build(config)
  # The tree: the server and K clients stacked on a leading axis, each one DDPM network (the
  # paper-scale presets' counts in test_collab_presets.py rely on it).
  one = jax.eval_shape(lambda key: DDPM.init_params(m, key), jax.random.key(0))
  k = config.collab.num_clients
  assert jax.tree.structure(state.params["server"]) == jax.tree.structure(one)
  assert [a.shape for a in jax.tree.leaves(state.params["server"])] == [
    a.shape for a in jax.tree.leaves(one)
  ]
  assert [a.shape for a in jax.tree.leaves(state.params["clients"])] == [
    (k, *a.shape) for a in jax.tree.leaves(one)
  ]
  tx, lr = optax.sgd(1.0), optax.constant_schedule(1.0)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: jnp.asarray(rng.normal(0, 0.2, a.shape), jnp.float32), state.params
  )
  state = state.replace(params=params, ema_params=params, opt_state=m.init_opt_state(tx, params))
  assert config.collab.client_loop == "scan"  # the digits preset's, on a CPU
  scanned, _ = jax.jit(m.make_train_step(tx, lr, 0.99))(state, batch)
  mv = collab_method.CollaFuse(tiny(**{"collab.client_loop": "vmap"}), m.data_info)
  vmapped, _ = jax.jit(mv.make_train_step(tx, lr, 0.99))(state, batch)
  change = lambda new: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new, params)
  d_scanned, d_vmapped = change(scanned.params), change(vmapped.params)
  for a, b in zip(jax.tree.leaves(d_scanned), jax.tree.leaves(d_vmapped), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=_leaf_tolerance(a))
  # The loop over the clients (and the server's updates) is the written-out step bit for bit:
  # the same sums in the same order (common.models.conv, common.models.stacked).
  mu = collab_method.CollaFuse(tiny(**{"collab.client_loop": "unroll"}), m.data_info)
  unrolled, _ = jax.jit(mu.make_train_step(tx, lr, 0.99))(state, batch)
  for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(unrolled), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Client 1 on its own: the same objective's gradient outside the stacked tree.
  rng_c = jax.random.split(jax.random.fold_in(state.rng, state.step))[0]
  rng_1 = jax.random.split(rng_c, config.collab.num_clients)[1]
  p1 = jax.tree.map(lambda a: a[1], params["clients"])
  x0 = batch["image"].reshape(config.collab.num_clients, -1, 8, 8, 1)[1]
  y = batch["label"].reshape(config.collab.num_clients, -1)[1]

  def objective(p):
    r_y, r_loss, r_drop = jax.random.split(rng_1, 3)
    from collab import client

    yy = m._labels_for_net(y, r_y)
    apply = functools.partial(m.apply, p, dropout_rng=r_drop)
    return client.loss(
      m.diffusion, lambda x, t, lab: apply(x, t, lab), x0, yy, r_loss, config.collab.cut_point
    )[0]

  alone = jax.tree.leaves(jax.jit(jax.grad(objective))(p1))
  stacked_1 = [-a[1] for a in jax.tree.leaves(d_scanned["clients"])]
  # The comparison has teeth: client 1's gradient is far from client 0's (another batch part).
  other = [-a[0] for a in jax.tree.leaves(d_scanned["clients"])]
  assert max(float(np.max(np.abs(a - o))) for a, o in zip(stacked_1, other, strict=True)) > 1e-2
  for g, s in zip(alone, stacked_1, strict=True):
    np.testing.assert_allclose(s, np.asarray(g), rtol=0, atol=_leaf_tolerance(np.asarray(g)))


@pytest.mark.parametrize("cut", [0, 20])
def test_cut_extremes(cut):
  config = tiny(**{"collab.cut_point": cut})
  m, tx, lr, state, batch = build(config)
  new, metrics = jax.jit(m.make_train_step(tx, lr, 0.99))(state, batch)
  changed = lambda a, b: any(
    not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )
  if cut == 0:  # the server owns every step; clients train nothing and send x0 itself
    assert float(metrics["client_loss"]) == 0.0
    assert not changed(state.params["clients"], new.params["clients"])
    assert changed(state.params["server"], new.params["server"])
    assert m.steps_split() == (20, 0)
  else:  # cut_point = T: the clients own every step; the server sees nothing it can learn from
    assert float(metrics["server_loss"]) == 0.0
    assert not changed(state.params["server"], new.params["server"])
    assert changed(state.params["clients"], new.params["clients"])
    assert m.steps_split() == (0, 20)


@pytest.mark.parametrize("noising", ["ratio", "full"])
def test_server_loss_noises_the_cut_images_by_its_formulation(noising):
  # What the server's network sees at model timestep t (level t + 1) in server.loss, for cut
  # images x_cut ~ q(x_cut | x_0 = 0.7): ``ratio`` gives exactly the global marginal
  # q(x_{t+1} | x_0); ``full`` (the official code) noises x_cut as if it were data with the full
  # schedule, abar(t + 1) * abar(cut_point) of the signal in total.
  m = collab_method.CollaFuse(tiny(), data.get_info(tiny().data))
  d, cut_point, n = m.diffusion, 8, 240000
  x0 = jnp.full((n, 1, 1, 1), 0.7)
  x_cut = d.q_sample(
    x0, jnp.full((n,), cut_point - 1), jax.random.normal(jax.random.key(0), x0.shape)
  )
  seen = {}

  def apply_fn(x, t, y):
    seen["x"], seen["t"] = np.asarray(x).reshape(-1), np.asarray(t)
    return jnp.zeros_like(x)

  server.loss(d, apply_fn, x_cut, None, jax.random.key(1), cut_point=cut_point, noising=noising)
  x, t = seen["x"], seen["t"]
  big_t = d.num_timesteps
  assert t.min() == cut_point and t.max() == big_t - 1  # the server's levels cut_point + 1..T only
  abar = d.np_alpha_bar_levels()
  for level in (cut_point + 1, cut_point + 5, big_t):
    at = x[t == level - 1]
    assert at.size > 15000
    if noising == "ratio":
      mean, var = np.sqrt(abar[level]) * 0.7, 1 - abar[level]
    else:
      mean = np.sqrt(abar[level] * abar[cut_point]) * 0.7
      var = abar[level] * (1 - abar[cut_point]) + 1 - abar[level]
    assert abs(float(at.mean()) - mean) < 0.02, (level, at.mean(), mean)
    assert abs(float(at.var()) - var) < 0.02, (level, at.var(), var)


def test_handoff_with_one_shared_model_equals_plain_sampling():
  config = tiny(**{"collab.server_noising": "full"})
  m, _, _, state, _ = build(config)
  params = state.params
  # Perturb the zero-initialised output layer so the network is not the trivial zero map, then
  # give every client exactly the server's network.
  net = jax.tree.map(
    lambda a: a + 0.01 * jnp.sin(jnp.arange(a.size).reshape(a.shape)), params["server"]
  )
  shared = {
    "server": net,
    "clients": jax.tree.map(lambda s, c: jnp.broadcast_to(s, c.shape), net, params["clients"]),
  }
  rng = jax.random.key(3)
  y = jnp.asarray([5, 6, 7, 8], jnp.int32)
  split = m.sample_client(shared, 1, rng, 4, y)
  fn = lambda x, t, yy: m.apply(shared["server"], x, t, yy)
  x_T = jax.random.normal(jax.random.fold_in(rng, 1 << 20), (4, 8, 8, 1))
  plain = sampling.sample_segmented(
    m.diffusion, [sampling.Segment(fn, 20, 0)], (4, 8, 8, 1), rng, steps_per_segment=[20],
    x_start=x_T, sampler="ddpm", y=y,
  )  # fmt: skip
  np.testing.assert_allclose(split, np.asarray(plain), atol=1e-5)


@pytest.mark.slow
def test_resume_continues_like_an_uninterrupted_run(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  assert tiny().collab.client_loop == "scan"
  loop.train(tiny(), straight, devices=jax.devices()[:1])
  # The first half written out: the client loop is a layout (Method.layout_fields), so the resume
  # under the preset's scan takes its checkpoint without a flag and gives the same losses.
  loop.train(
    tiny(total_steps=2, **{"collab.client_loop": "unroll"}), resumed, devices=jax.devices()[:1]
  )
  loop.train(tiny(num_sample_images=6), resumed, devices=jax.devices()[:1])
  read = lambda wd: [json.loads(line)["loss"] for line in open(os.path.join(wd, "metrics.jsonl"))]
  np.testing.assert_allclose(read(straight), read(resumed), rtol=1e-5)
  assert os.path.exists(os.path.join(resumed, "samples", "step_0000004.png"))


@pytest.mark.parametrize(
  "overrides,field",
  [
    ({"collab.cut_point": -1}, "collab.cut_point"),
    ({"collab.cut_point": 21}, "collab.cut_point"),
    ({"collab.num_clients": 11, "collab.classes_per_client": 1}, "collab.num_clients"),
    ({"collab.server_noising": "half"}, "collab.server_noising"),
    ({"collab.partition": "iid", "collab.num_clients": 2000}, "collab.partition"),
    (
      {"collab.partition": "by_attribute", "collab.partition_attribute": "colour"},
      "collab.partition_attribute",
    ),
  ],
)
def test_bad_input_names_the_field(tmp_path, overrides, field):
  with pytest.raises(ConfigError, match=rf"^config error: {field}="):
    loop.train(tiny(**overrides), str(tmp_path / "run"), devices=jax.devices()[:1])
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("chain", ["global", "rebased"])
def test_ratio_handoff_with_the_optimal_server_samples_the_cut_marginal(chain):
  # Data is the point mass x0 = c, so the server's optimal noise estimate is known in closed form:
  # E[eps_s | x_k] = sqrt(1 - abar'_k) (x_k - sqrt(abar_k) c) / (1 - abar_k). Its hand-off must
  # then be a sample of q(x_cut | x0 = c) = N(sqrt(abar_cut) c, 1 - abar_cut).
  m = collab_method.CollaFuse(tiny(), data.get_info(tiny().data))
  d, cut_point, c = m.diffusion, 8, 0.6
  abar = jnp.asarray(d.np_alpha_bar_levels(), jnp.float32)

  def optimal_server(x, t, y):
    del y
    ab = abar[t + 1].reshape(-1, 1, 1, 1)
    ab_rebased = ab / abar[cut_point]
    return jnp.sqrt(1 - ab_rebased) * (x - jnp.sqrt(ab) * c) / (1 - ab)

  x_cut = server.sample(
    d, optimal_server, (20000, 1, 1, 1), jax.random.key(0), cut_point=cut_point, noising="ratio",
    num_steps=20, chain=chain, sampler="ddpm",
  )  # fmt: skip
  assert abs(float(x_cut.mean()) - float(jnp.sqrt(abar[cut_point])) * c) < 0.02
  if chain == "global":
    assert abs(float(x_cut.var()) - float(1 - abar[cut_point])) < 0.02
  else:
    # The spec's rebased posterior ends on its x_cut *estimate* (no noise on the step into its
    # level 0), so the hand-off is too smooth: one reason the default is the global chain.
    assert float(x_cut.var()) < float(1 - abar[cut_point]) - 0.1


def test_train_flops_count_every_client_and_server_update_of_the_loops():
  # The K server updates are a loop under every client loop, and so are the clients' steps
  # under vmap and scan: XLA counts a loop's body once, so the step's own analysis misses K - 1
  # of them; the counting step writes them out, and every loop counts the same arithmetic.
  from common.metrics import flops as flops_lib

  def lowered_flops(fn, state, batch):
    return flops_lib.analysis_flops(jax.jit(fn).lower(state, batch).cost_analysis())

  counted = {}
  for client_loop in ("vmap", "scan", "unroll"):
    m, tx, lr, state, batch = build(tiny(**{"collab.client_loop": client_loop}))
    own = lowered_flops(m.make_train_step(tx, lr, 0.999), state, batch)
    counted[client_loop] = lowered_flops(m.make_flops_counting_step(tx, lr, 0.999), state, batch)
    assert own < 0.9 * counted[client_loop]
  assert counted["vmap"] == pytest.approx(counted["unroll"], rel=1e-3)
  # (The written-out scan adds its indices' arithmetic: 512 of 7.2e8 here.)
  assert counted["scan"] == pytest.approx(counted["unroll"], rel=1e-5)
