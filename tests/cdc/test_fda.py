"""Tests for cdc.models: the generated head, the FDA's set encoder and its residual generators."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cdc import models

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


@functools.cache
def _jitted(graphdef, method):
  return jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args))


def _call(module, *args, method="__call__"):
  """``module.method(*args)`` compiled once per module structure (eager nnx ops are slow)."""
  graphdef, state = nnx.split(module)
  return _jitted(graphdef, method)(state, *args)


def code(fda, feats, w):
  return _call(fda, feats, w, method="code")


def _fda(**kw):
  fspec = models.FDASpec(**{"set_hidden": 16, "z_dim": 6, "rank": 2, **kw})
  head = models.init_head(SPEC, jax.random.key(0))
  return models.FDA(SPEC, fspec, head, rngs=nnx.Rngs(1)), head


def _anchors(seed, k=5, lead=()):
  rng = np.random.default_rng(seed)
  feats = jnp.asarray(rng.normal(size=(*lead, k, SPEC.dim)), jnp.float32)
  w = jnp.asarray(rng.uniform(0.1, 1.0, size=(*lead, k)), jnp.float32)
  return feats, w


def _zero_generators(fda):
  for gen in fda.generators.values():
    for name in ("u_gen", "u_bias", "v_gen", "v_bias", "gen", "gen_bias"):
      if hasattr(gen, name):
        var = getattr(gen, name)
        var[...] = jnp.zeros_like(var[...])


def _features_head_out(theta, seed=0):
  rng = np.random.default_rng(seed)
  v = jnp.asarray(rng.normal(size=(3, SPEC.dim)), jnp.float32)
  q = jnp.asarray(rng.normal(size=(3, SPEC.dim)), jnp.float32)
  out = jax.jit(lambda t: (models.qa_logits(t, v, q), models.embed_video(t, v)))(theta)
  return np.asarray(out[0]), np.asarray(out[1])


@pytest.mark.parametrize("rank", [0, 2])
def test_zero_generator_gives_exactly_the_base_model(rank):
  fda, head = _fda(rank=rank, zero_init=False)
  feats, w = _anchors(0)
  before = _call(fda, feats, w)
  # A trained (here: randomly initialised) generator moves the head off its base ...
  assert any(not np.array_equal(before[n], head[n]) for n in before)
  _zero_generators(fda)
  theta = _call(fda, feats, w)
  # ... a zero generator returns the base weights bit for bit, whatever the anchors.
  for n in theta:
    np.testing.assert_array_equal(theta[n], head[n])
  full = models.merge_head(head, theta)
  for a, b in zip(_features_head_out(full), _features_head_out(head), strict=True):
    np.testing.assert_array_equal(a, b)


def test_untrained_fda_starts_at_the_base_model_but_can_learn():
  fda, head = _fda(rank=2, zero_init=True)
  feats, w = _anchors(1, lead=(2,))
  theta = _call(fda, feats, w)
  for n in theta:
    assert theta[n].shape == (2, *head[n].shape)
    np.testing.assert_array_equal(theta[n][1], head[n])
  graphdef, params = nnx.split(fda, nnx.Param)

  def loss(params):
    t = nnx.merge(graphdef, params)(feats, w)
    return sum(jnp.sum(jnp.sin(v)) for v in t.values())

  grads = jax.jit(jax.grad(loss))(params)
  # The zero factor gets gradient at once, so meta-training can move away from the base.
  assert float(jnp.abs(grads["generators"]["qa__w"]["u_gen"][...]).max()) > 0


@pytest.mark.parametrize("pool", models.SET_POOLS)
def test_set_encoder_is_invariant_to_anchor_order(pool):
  fda, _ = _fda(set_pool=pool, zero_init=False)
  feats, w = _anchors(2, k=7)
  perm = jnp.asarray(np.random.default_rng(0).permutation(7))
  z, z_perm = code(fda, feats, w), code(fda, feats[perm], w[perm])
  np.testing.assert_allclose(z, z_perm, rtol=1e-5, atol=1e-6)
  theta, theta_perm = _call(fda, feats, w), _call(fda, feats[perm], w[perm])
  for n in theta:
    np.testing.assert_allclose(theta[n], theta_perm[n], rtol=1e-5, atol=1e-6)
  # Order-free but not weight-free: moving mass between anchors changes the code ...
  assert np.abs(np.asarray(z - code(fda, feats, w[::-1]))).max() > 1e-4
  # ... while a weight is a multiplicity: anchor 0 at weight 2w_0 == anchor 0 twice at w_0.
  twice_f = jnp.concatenate([feats, feats[:1]])
  twice_w = jnp.concatenate([w, w[:1]])
  np.testing.assert_allclose(
    code(fda, feats, w.at[0].multiply(2.0)), code(fda, twice_f, twice_w), rtol=1e-5, atol=1e-6
  )
  # Weights are normalised: only their proportions matter.
  np.testing.assert_allclose(z, code(fda, feats, 3.0 * w), rtol=1e-5, atol=1e-6)


def test_low_rank_delta_has_rank_at_most_r_and_full_rank_does_not():
  feats, w = _anchors(3)
  low, _ = _fda(rank=2, zero_init=False)
  delta = np.asarray(
    _call(low.generators["fusion1__w"], _call(low, feats, w, method="code"), method="delta")
  )
  assert np.linalg.matrix_rank(delta, tol=1e-6 * np.abs(delta).max()) <= 2
  full, _ = _fda(rank=0, zero_init=False)
  delta = np.asarray(
    _call(full.generators["fusion1__w"], _call(full, feats, w, method="code"), method="delta")
  )
  assert np.linalg.matrix_rank(delta, tol=1e-6 * np.abs(delta).max()) > 2
  n_low = sum(x.size for x in jax.tree.leaves(nnx.state(low.generators, nnx.Param)))
  n_full = sum(x.size for x in jax.tree.leaves(nnx.state(full.generators, nnx.Param)))
  assert n_low < n_full


def test_generated_subset_and_text_context():
  fda, head = _fda(generated=("qa",), text_context=True)
  feats, w = _anchors(4)
  with pytest.raises(ValueError, match="question features"):
    _call(fda, feats, w)
  theta = _call(fda, feats, w, feats[:3])
  assert sorted(theta) == ["qa/b", "qa/w"]
  merged = models.merge_head(head, theta)
  assert sorted(merged) == sorted(head)
  with pytest.raises(ValueError, match="not a head tensor"):
    models.merge_head(head, {"nope/w": theta["qa/w"]})
  with pytest.raises(ValueError, match="fda.generated"):
    models.FDASpec(generated=("fusion3",))


def test_reference_sizes_of_the_generated_head():
  spec = models.ModelSpec(vocab_size=29, num_answers=18)
  # The spec's fusion 192 -> 128 -> 64, QA head 64 -> 18, retrieval projections 64 -> 32.
  sizes = {n: int(np.prod(s)) for n, s in spec.head_shapes().items()}
  assert sum(sizes.values()) == 38_290
  assert spec.head_shapes()["fusion1/w"] == (192, 128)


def test_encoders_shapes_and_temporal_order_matters():
  enc = models.Encoders(SPEC, rngs=nnx.Rngs(0))
  frames = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 8, 8, 3)), jnp.float32)
  feats = _call(enc, frames, method="frame_features")
  assert feats.shape == (2, 4, SPEC.dim)
  mask = jnp.ones((2, 4), bool)
  video = _call(enc, feats, mask, method="video")
  # Playing a video backwards flips the slope: left and right can be told apart.
  backwards = _call(enc, feats[:, ::-1], mask, method="video")
  assert np.abs(np.asarray(video - backwards)).max() > 1e-4
  tokens = jnp.array([[3, 4, 0, 0], [3, 4, 5, 0]], jnp.int32)
  text = _call(enc, tokens, tokens > 0)
  assert text.shape == (2, SPEC.dim)
  # Padding is ignored: trailing pads do not change the encoding.
  padded = jnp.array([[3, 4, 0, 0, 0, 0]], jnp.int32)
  np.testing.assert_allclose(_call(enc, padded, padded > 0), text[:1], rtol=1e-6, atol=1e-6)
