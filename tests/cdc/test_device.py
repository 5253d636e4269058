"""Tests for cdc.device and cdc.cloud: no gradients on the device path, bytes on the wire, the
drift trigger, input errors."""

import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cdc import adr, cloud, device, models

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = models.ModelSpec(
  resolution=8,
  conv_channels=(4, 4, 4),
  vocab_size=12,
  dim=8,
  fusion_hidden=12,
  fusion_out=8,
  num_answers=5,
  proj_dim=4,
)
FSPEC = models.FDASpec(set_hidden=16, z_dim=6, rank=2, zero_init=False)
DIFF_TRANSFORMS = {
  "grad",
  "value_and_grad",
  "vjp",
  "jvp",
  "jacrev",
  "jacfwd",
  "hessian",
  "linearize",
  "linear_transpose",
  "custom_vjp",
  "custom_jvp",
}


def _setup():
  enc = models.Encoders(SPEC, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(enc)
  head = models.init_head(SPEC, jax.random.key(1))
  return graphdef, state, head


def _inputs(seed=0, v=3, t=4, n=5):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.uniform(-1, 1, (v, t, 8, 8, 3)), jnp.float32),
    jnp.ones((v, t), bool),
    jnp.asarray(rng.integers(1, 12, (n, 4)), jnp.int32),
    jnp.ones((n, 4), bool),
    jnp.asarray(rng.integers(0, v, n), jnp.int32),
    jnp.asarray(rng.integers(1, 12, (v, 6)), jnp.int32),
    jnp.ones((v, 6), bool),
  )


# ----------------------------------------------------------------------------- no gradients


def _walk(jaxpr, out):
  for eqn in jaxpr.eqns:
    out.append(eqn)
    for p in eqn.params.values():
      for sub in p if isinstance(p, list | tuple) else [p]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _walk(inner, out)
  return out


def backward_markers(fn, *args) -> list[str]:
  """Operations that reverse-mode differentiation emits and a forward pass of this model does not:
  ``transpose`` (the transpose rule of dot_general), dot_generals that contract the leading (batch)
  axis of both operands (weight gradients x^T delta), and convolutions with dilated inputs or
  kernels (gradients of strided convolutions)."""
  found = []
  for eqn in _walk(jax.make_jaxpr(fn)(*args).jaxpr, []):
    name = eqn.primitive.name
    if name == "transpose":
      found.append(name)
    elif name == "dot_general":
      (lc, rc), _ = eqn.params["dimension_numbers"]
      if 0 in lc and 0 in rc:
        found.append("dot_general contracting the batch axis")
    elif name == "conv_general_dilated":
      if any(d != 1 for d in (*eqn.params["lhs_dilation"], *eqn.params["rhs_dilation"])):
        found.append("dilated conv")
  return found


def test_device_forward_program_has_no_backward_pass():
  graphdef, state, head = _setup()
  forward = device.make_device_forward(graphdef)
  args = (state, head, *_inputs())
  assert backward_markers(forward, *args) == []
  lowered = forward.lower(*args).as_text()
  assert "transpose" not in lowered

  def loss(state, theta, *rest):
    return jnp.sum(forward(state, theta, *rest)["qa_logits"])

  # Positive controls: the same checks see a gradient step on the head and one on the encoders.
  def head_step(state, theta, *rest):
    g = jax.grad(loss, argnums=1)(state, theta, *rest)
    return forward(state, jax.tree.map(lambda a, b: a - b, theta, g), *rest)

  def encoder_step(state, theta, *rest):
    return jax.grad(loss)(state, theta, *rest)

  assert "transpose" in backward_markers(head_step, *args)
  assert "dot_general contracting the batch axis" in backward_markers(head_step, *args)
  assert "dilated conv" in backward_markers(encoder_step, *args)
  assert "transpose" in jax.jit(head_step).lower(*args).as_text()


def _diff_calls(path):
  tree = ast.parse(open(path).read(), path)
  hits = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and node.attr in DIFF_TRANSFORMS:
      hits.append(node.attr)
    elif isinstance(node, ast.Name) and node.id in DIFF_TRANSFORMS:
      hits.append(node.id)
    elif isinstance(node, ast.ImportFrom):
      hits += [a.name for a in node.names if a.name in DIFF_TRANSFORMS]
  return hits


def test_device_code_never_calls_a_differentiation_transform():
  for module in ("device.py", "adr.py"):
    assert _diff_calls(os.path.join(REPO, "cdc", module)) == [], module
  # The fine-tuning baseline does backprop on the device: the same reader finds it.
  assert "grad" in _diff_calls(os.path.join(REPO, "cdc", "finetune.py"))


# ----------------------------------------------------------------------------- bytes


def _cloud(head, downlink_dtype="float32"):
  fda = models.FDA(SPEC, FSPEC, head, rngs=nnx.Rngs(2))
  graphdef, state = nnx.split(fda)
  return cloud.Cloud(graphdef, state, downlink_dtype=downlink_dtype, summary_samples=6), fda


def test_reported_bytes_are_the_arrays_sent():
  graphdef, state, head = _setup()
  dev = device.Device(SPEC, graphdef, state, head, selector="k_medoids", num_anchors=6)
  pool = np.random.default_rng(0).normal(size=(40, SPEC.dim)).astype(np.float32)
  up, idx = dev.uplink(pool, seed=1)
  sent = device.unpack(up.payload, up.layout)
  assert up.nbytes == len(up.payload) == sum(a.nbytes for a in sent.values())
  assert up.nbytes == 6 * SPEC.dim * 4 + 6 * 4
  # What was sent is exactly the selected frames and their weights, nothing else.
  assert sorted(sent) == ["anchors", "weights"]
  np.testing.assert_array_equal(sent["anchors"], pool[idx])
  np.testing.assert_array_equal(sent["weights"], adr.select(pool, 6, "k_medoids", seed=1).weights)

  the_cloud, fda = _cloud(head)
  down = the_cloud.adapt(up)
  received = device.unpack(down.payload, down.layout)
  direct = jax.jit(lambda a, w: fda(a, w))(sent["anchors"], sent["weights"])
  assert sorted(received) == sorted(direct) == list(FSPEC.generated_names(SPEC))
  assert down.nbytes == sum(np.asarray(v).nbytes for v in direct.values())
  assert (
    down.nbytes
    == cloud.generated_nbytes(SPEC, FSPEC)
    == 4 * sum(int(np.prod(s)) for s in SPEC.head_shapes().values())
  )
  theta = dev.install(down)
  for n in direct:
    np.testing.assert_array_equal(theta[n], direct[n])

  # Half-precision links halve the feature / parameter bytes; the Gaussian summary sends 2 G d + G.
  dev16 = device.Device(SPEC, graphdef, state, head, num_anchors=6, uplink_dtype="float16")
  assert dev16.uplink(pool)[0].nbytes == 6 * SPEC.dim * 2 + 6 * 4
  assert _cloud(head, "float16")[0].adapt(up).nbytes == down.nbytes // 2
  gauss = device.Device(SPEC, graphdef, state, head, selector="gaussian", num_anchors=3)
  up_g, none = gauss.uplink(pool)
  assert none is None and up_g.nbytes == 2 * 3 * SPEC.dim * 4 + 3 * 4
  assert the_cloud.adapt(up_g).nbytes == down.nbytes


def test_device_forward_runs_the_installed_head():
  graphdef, state, head = _setup()
  dev = device.Device(SPEC, graphdef, state, head, selector="k_center", num_anchors=4)
  frames, fmask, q, qmask, qv, cap, cmask = _inputs(1)
  pool = dev.pool(np.asarray(frames), np.asarray(fmask))
  assert pool.shape == (12, SPEC.dim)
  the_cloud, _ = _cloud(head)
  theta = dev.install(the_cloud.adapt(dev.uplink(pool)[0]))
  out = dev.forward_fn(state, theta, frames, fmask, q, qmask, qv, cap, cmask)
  base = dev.forward_fn(state, head, frames, fmask, q, qmask, qv, cap, cmask)
  assert out["qa_logits"].shape == (5, 5) and out["video_emb"].shape == (3, 4)
  assert np.abs(np.asarray(out["qa_logits"] - base["qa_logits"])).max() > 1e-5


def test_devices_of_one_model_share_their_compiled_functions():
  # cdc.evaluate makes a Device per held-out device: its jitted functions must not be recompiled.
  graphdef, state, head = _setup()
  a = device.Device(SPEC, graphdef, state, head)
  b = device.Device(SPEC, graphdef, state, dict(head), selector="random")
  assert a.encode_frames is b.encode_frames
  assert a.encode_text is b.encode_text
  assert a.forward_fn is b.forward_fn


# ----------------------------------------------------------------------------- drift, errors


def test_drift_monitor_triggers_on_a_shift_only():
  rng = np.random.default_rng(0)
  first = rng.normal(size=(200, 8)).astype(np.float32)
  monitor = device.DriftMonitor(threshold=0.05)
  assert monitor.check(first) == (True, float("inf"))  # nothing uploaded yet
  a = adr.select(first, 16, "k_center")
  monitor.uploaded(first, first[a.indices], a.weights)
  same, stat_same = monitor.check(rng.normal(size=(200, 8)).astype(np.float32))
  moved, stat_moved = monitor.check((rng.normal(size=(200, 8)) + 1.5).astype(np.float32))
  assert not same and moved and stat_moved > 5 * stat_same
  with pytest.raises(ValueError, match=r"expected \[M, 8\]"):
    monitor.check(first[:, :4])


@pytest.mark.parametrize(
  "pool,k,match",
  [
    (np.zeros((0, 8)), 2, "pool is empty"),
    (np.zeros((3, 8)), 4, "K = 4 anchors requested from a pool of only M = 3"),
    (np.zeros((10, 5)), 2, "width 5 but the frame encoder's width is 8"),
  ],
)
def test_device_uplink_bad_input(pool, k, match):
  graphdef, state, head = _setup()
  dev = device.Device(SPEC, graphdef, state, head, num_anchors=k)
  with pytest.raises(ValueError, match=match):
    dev.uplink(pool)


def test_wire_refuses_mismatched_payloads():
  layout = device.uplink_layout(4, 2)
  good = {"anchors": np.zeros((2, 4), np.float32), "weights": np.ones(2, np.float32) / 2}
  buf = device.pack(good, layout)
  with pytest.raises(ValueError, match="layout says"):
    device.pack({**good, "anchors": np.zeros((3, 4), np.float32)}, layout)
  with pytest.raises(ValueError, match="payload keys"):
    device.pack({"anchors": good["anchors"]}, layout)
  with pytest.raises(ValueError, match="buffer has 39 bytes"):
    device.unpack(buf[:-1], layout)
