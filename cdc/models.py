"""The device model and the Fast Domain Adaptor (FDA), CDC-MMPG-style (spec section 5, inferred).

**Device model.** Frozen encoders (``Encoders``) and a small generated part (the "head"):

* frame encoder E_v: a 3-layer CNN on pixels (moving shapes) or an MLP on pre-extracted features
  (real benchmarks), one feature v_t in R^d per frame; the CNN keeps a flattened spatial map so
  that features carry position (motion questions need it);
* temporal pooling: the masked mean and the least-squares slope over time of v_t, mixed by a
  linear layer (the slope is what tells left from right: a mean alone is order-free);
* text encoder E_q: token embedding (or a projection of token features) and a GRU; the final
  hidden state of the valid tokens, q in R^d. Questions and captions share it.

The head, ``theta``, is a flat dict of arrays ``"<layer>/w"``, ``"<layer>/b"``:

* ``fusion1``: [3d, h] on [v, q, v*q]; ``fusion2``: [h, f]; ``qa``: [f, A] (answer logits);
* ``ret_video``, ``ret_text``: [d, p] projections into the joint retrieval space (cosine).

``head_apply`` runs it functionally, so the device can run whatever parameters it receives.

**FDA.** A permutation-invariant set encoder (``SetEncoder``: DeepSets rho(sum_k w_k psi(a_k)) or
attention pooling with a learned query and log-weight bias) over the weighted anchors gives z;
optionally the device's recent question embeddings give a second set code added to it. Each
generated tensor has a ``Generator`` in residual form around shared base weights,
``theta = theta_base + s * Delta(z)`` with ``Delta(z) = reshape(z G + g)`` (DUET's linear
generator) or, with the low-rank option, ``Delta(z) = U(z) V(z)^T``. The factor that multiplies z
last starts at zero, so an untrained FDA returns the base model exactly; a generator whose arrays
are all zero does too (tested).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import nnx

HEAD_LAYERS = ("fusion1", "fusion2", "qa", "ret_video", "ret_text")
SET_POOLS = ("weighted_sum", "attention")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Sizes of the device model.

  Attributes:
    frame_input: ``pixels`` ([H, W, 3] frames) or ``features`` ([D_v] per frame).
    resolution: frame side (pixels only).
    frame_feature_dim: D_v (features only).
    conv_channels: CNN widths (pixels only); layers 2 and 3 have stride 2.
    text_input: ``tokens`` (ids into ``vocab_size``) or ``features`` ([D_q] per token).
    vocab_size: token vocabulary (tokens only; id 0 is padding).
    text_feature_dim: D_q (features only).
    dim: d, the width of frame, video and text features.
    fusion_hidden: h; fusion_out: f; num_answers: A; proj_dim: p.
  """

  frame_input: str = "pixels"
  resolution: int = 16
  frame_feature_dim: int = 0
  conv_channels: tuple[int, ...] = (16, 32, 64)
  text_input: str = "tokens"
  vocab_size: int = 0
  text_feature_dim: int = 0
  dim: int = 64
  fusion_hidden: int = 128
  fusion_out: int = 64
  num_answers: int = 18
  proj_dim: int = 32

  def __post_init__(self):
    if self.frame_input not in ("pixels", "features"):
      raise ValueError(f"model.frame_input={self.frame_input!r}; allowed: pixels, features")
    if self.text_input not in ("tokens", "features"):
      raise ValueError(f"model.text_input={self.text_input!r}; allowed: tokens, features")
    if self.frame_input == "pixels" and len(self.conv_channels) != 3:
      raise ValueError(f"model.conv_channels={self.conv_channels}: need 3 widths")
    if self.frame_input == "features" and self.frame_feature_dim < 1:
      raise ValueError("model.frame_feature_dim must be >= 1 when frame_input='features'")
    if self.text_input == "tokens" and self.vocab_size < 2:
      raise ValueError("model.vocab_size must be >= 2 when text_input='tokens'")
    if self.text_input == "features" and self.text_feature_dim < 1:
      raise ValueError("model.text_feature_dim must be >= 1 when text_input='features'")

  def head_shapes(self) -> dict[str, tuple[int, ...]]:
    """The shape of every head tensor, keyed ``"<layer>/w"`` and ``"<layer>/b"``."""
    d, h, f, a, p = self.dim, self.fusion_hidden, self.fusion_out, self.num_answers, self.proj_dim
    io = {
      "fusion1": (3 * d, h),
      "fusion2": (h, f),
      "qa": (f, a),
      "ret_video": (d, p),
      "ret_text": (d, p),
    }
    shapes = {}
    for name, (i, o) in io.items():
      shapes[f"{name}/w"] = (i, o)
      shapes[f"{name}/b"] = (o,)
    return shapes


def _dense_init(key, fan_in, shape):
  # PyTorch's default Linear init, as common.models.unet uses.
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init_head(spec: ModelSpec, key: jax.Array) -> dict[str, jax.Array]:
  """A freshly initialised head: dict ``"<layer>/w"`` [in, out], ``"<layer>/b"`` [out]."""
  shapes = spec.head_shapes()
  keys = jax.random.split(key, len(shapes))
  out = {}
  for k, (name, shape) in zip(keys, sorted(shapes.items()), strict=True):
    fan_in = shapes[name.replace("/b", "/w")][0]
    out[name] = _dense_init(k, fan_in, shape)
  return out


def _l2norm(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


def fuse(theta: dict[str, jax.Array], video: jax.Array, text: jax.Array) -> jax.Array:
  """The fusion MLP: [N, d] video and [N, d] question features -> [N, f]."""
  x = jnp.concatenate([video, text, video * text], axis=-1)
  h = jax.nn.relu(x @ theta["fusion1/w"] + theta["fusion1/b"])
  return jax.nn.relu(h @ theta["fusion2/w"] + theta["fusion2/b"])


def qa_logits(theta: dict[str, jax.Array], video: jax.Array, question: jax.Array) -> jax.Array:
  """Answer logits [N, A] from video [N, d] and question [N, d] features."""
  return fuse(theta, video, question) @ theta["qa/w"] + theta["qa/b"]


def embed_video(theta: dict[str, jax.Array], video: jax.Array) -> jax.Array:
  """Unit-norm retrieval embeddings [N, p] of video features [N, d]."""
  return _l2norm(video @ theta["ret_video/w"] + theta["ret_video/b"])


def embed_text(theta: dict[str, jax.Array], text: jax.Array) -> jax.Array:
  """Unit-norm retrieval embeddings [N, p] of caption features [N, d]."""
  return _l2norm(text @ theta["ret_text/w"] + theta["ret_text/b"])


# -------------------------------------------------------------------------------------------------
# Frozen encoders.


class FrameEncoder(nnx.Module):
  """Pixels [N, H, W, 3] in [-1, 1] -> [N, d] (CNN), or features [N, D_v] -> [N, d] (MLP)."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    if spec.frame_input == "pixels":
      c1, c2, c3 = spec.conv_channels
      self.conv1 = nnx.Conv(3, c1, (3, 3), padding=1, rngs=rngs)
      self.conv2 = nnx.Conv(c1, c2, (3, 3), strides=(2, 2), padding=1, rngs=rngs)
      self.conv3 = nnx.Conv(c2, c3, (3, 3), strides=(2, 2), padding=1, rngs=rngs)
      side = math.ceil(math.ceil(spec.resolution / 2) / 2)  # two stride-2 convs, 'SAME'-sized
      self.out = nnx.Linear(side * side * c3, spec.dim, rngs=rngs)
    else:
      self.fc1 = nnx.Linear(spec.frame_feature_dim, spec.dim, rngs=rngs)
      self.fc2 = nnx.Linear(spec.dim, spec.dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.spec.frame_input == "pixels":
      chex.assert_rank(x, 4)
      h = jax.nn.relu(self.conv1(x))
      h = jax.nn.relu(self.conv2(h))
      h = jax.nn.relu(self.conv3(h))
      return self.out(h.reshape(h.shape[0], -1))
    chex.assert_rank(x, 2)
    return self.fc2(jax.nn.relu(self.fc1(x)))


class TemporalPool(nnx.Module):
  """Frame features [V, T, d] + mask [V, T] -> video features [V, d] (masked mean and slope)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.mix = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, feats: jax.Array, mask: jax.Array) -> jax.Array:
    chex.assert_rank(feats, 3)
    m = mask.astype(feats.dtype)[..., None]
    n = jnp.maximum(jnp.sum(m, 1), 1.0)
    mean = jnp.sum(feats * m, 1) / n
    t = jnp.arange(feats.shape[1], dtype=feats.dtype)[None, :, None]
    t_mean = jnp.sum(t * m, 1, keepdims=True) / n[:, None]
    tc = (t - t_mean) * m
    slope = jnp.sum(tc * feats, 1) / jnp.maximum(jnp.sum(tc * tc, 1), 1e-6)
    return self.mix(jnp.concatenate([mean, slope], -1))


class TextEncoder(nnx.Module):
  """Tokens int32 [N, L] (or features [N, L, D_q]) + mask [N, L] -> [N, d]: a masked GRU."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    if spec.text_input == "tokens":
      self.embed = nnx.Embed(spec.vocab_size, spec.dim, rngs=rngs)
    else:
      self.proj = nnx.Linear(spec.text_feature_dim, spec.dim, rngs=rngs)
    self.gru = nnx.GRUCell(spec.dim, spec.dim, rngs=rngs)

  def __call__(self, text: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.embed(text) if self.spec.text_input == "tokens" else self.proj(text)
    chex.assert_rank(x, 3)
    h = jnp.zeros((x.shape[0], self.spec.dim), x.dtype)
    for i in range(x.shape[1]):  # L is a handful of tokens: unrolled
      new, _ = self.gru(h, x[:, i])
      h = jnp.where(mask[:, i, None], new, h)
    return h


class Encoders(nnx.Module):
  """The device's frozen encoders: frames, temporal pooling, text."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    self.frame = FrameEncoder(spec, rngs=rngs)
    self.temporal = TemporalPool(spec.dim, rngs=rngs)
    self.text = TextEncoder(spec, rngs=rngs)

  def frame_features(self, frames: jax.Array) -> jax.Array:
    """[V, T, H, W, 3] pixels (or [V, T, D_v] features) -> [V, T, d]."""
    v, t = frames.shape[:2]
    return self.frame(frames.reshape(v * t, *frames.shape[2:])).reshape(v, t, -1)

  def video(self, frame_features: jax.Array, frame_mask: jax.Array) -> jax.Array:
    """[V, T, d] frame features + bool [V, T] -> [V, d]."""
    return self.temporal(frame_features, frame_mask)

  def __call__(self, text: jax.Array, mask: jax.Array) -> jax.Array:
    """Text [N, L] (or [N, L, D_q]) + mask -> [N, d]."""
    return self.text(text, mask)


# -------------------------------------------------------------------------------------------------
# The Fast Domain Adaptor.


@dataclasses.dataclass(frozen=True)
class FDASpec:
  """Sizes and options of the FDA (all inferred, spec section 5).

  Attributes:
    generated: head layers the FDA generates (``HEAD_LAYERS``); the others stay at the device's
      pretrained values and are never sent.
    set_hidden: width of psi and rho; z_dim: the code z.
    set_pool: ``weighted_sum`` (DeepSets) or ``attention`` (learned query, log-weight bias).
    text_context: also encode a set of the device's question features.
    rank: 0 = full linear generators; r > 0 = low-rank Delta = U V^T for weight matrices.
    residual_scale_init: s at initialisation.
    zero_init: start the last generator factor at zero (the FDA starts at the base model).
  """

  generated: tuple[str, ...] = HEAD_LAYERS
  set_hidden: int = 128
  z_dim: int = 128
  set_pool: str = "weighted_sum"
  text_context: bool = False
  rank: int = 8
  residual_scale_init: float = 1.0
  zero_init: bool = True

  def __post_init__(self):
    unknown = [g for g in self.generated if g not in HEAD_LAYERS]
    if unknown or not self.generated or len(set(self.generated)) != len(self.generated):
      raise ValueError(f"fda.generated={self.generated}: a non-empty subset of {HEAD_LAYERS}")
    if self.set_pool not in SET_POOLS:
      raise ValueError(f"fda.set_pool={self.set_pool!r}; allowed: {SET_POOLS}")
    if self.rank < 0:
      raise ValueError(f"fda.rank={self.rank} must be >= 0")

  def generated_names(self, model: ModelSpec) -> tuple[str, ...]:
    """The head tensors the FDA outputs (and the cloud sends), sorted."""
    return tuple(sorted(n for n in model.head_shapes() if n.split("/")[0] in self.generated))


class SetEncoder(nnx.Module):
  """A permutation-invariant code of a weighted set: x [..., K, d], w [..., K] -> [..., out].

  ``weighted_sum``: rho(sum_k w_k psi(x_k)) with w normalised to sum 1 (DeepSets);
  ``attention``: rho(sum_k softmax_k(q . psi(x_k) / sqrt(h) + log w_k) psi(x_k)).
  """

  def __init__(self, in_dim: int, hidden: int, out: int, pool: str, *, rngs: nnx.Rngs):
    self.pool = pool
    self.psi1 = nnx.Linear(in_dim, hidden, rngs=rngs)
    self.psi2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.rho1 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.rho2 = nnx.Linear(hidden, out, rngs=rngs)
    if pool == "attention":
      self.query = nnx.Param(jax.random.normal(rngs.params(), (hidden,)) / math.sqrt(hidden))

  def __call__(self, x: jax.Array, w: jax.Array) -> jax.Array:
    chex.assert_equal_shape_prefix([x, w], w.ndim)
    h = jax.nn.relu(self.psi2(jax.nn.relu(self.psi1(x))))  # [..., K, hidden]
    w = w / jnp.sum(w, -1, keepdims=True)
    if self.pool == "attention":
      logits = h @ self.query[...] / math.sqrt(h.shape[-1]) + jnp.log(jnp.maximum(w, 1e-30))
      w = jax.nn.softmax(logits, axis=-1)
    pooled = jnp.einsum("...k,...kh->...h", w, h)
    return self.rho2(jax.nn.relu(self.rho1(pooled)))


class Generator(nnx.Module):
  """theta = base + s * Delta(z) for one head tensor of shape S; z [..., z_dim] -> [..., *S]."""

  def __init__(
    self, shape: Sequence[int], base: jax.Array, z_dim: int, fda: FDASpec, *, rngs: nnx.Rngs
  ):
    self.shape = tuple(int(s) for s in shape)
    self.lowrank = fda.rank > 0 and len(self.shape) == 2
    self.base = nnx.Param(jnp.asarray(base, jnp.float32).reshape(self.shape))
    self.scale = nnx.Param(jnp.asarray(fda.residual_scale_init, jnp.float32))
    zero = lambda shape: jnp.zeros(shape, jnp.float32)
    std = 1.0 / math.sqrt(z_dim)
    last = zero if fda.zero_init else (lambda s: 0.01 * std * jax.random.normal(rngs.params(), s))
    if self.lowrank:
      i, o = self.shape
      r = fda.rank
      # U(z) starts at zero (so Delta does), V(z) random: gradients reach U at once, as in LoRA.
      self.u_gen = nnx.Param(last((z_dim, i * r)))
      self.u_bias = nnx.Param(zero((i * r,)))
      self.v_gen = nnx.Param(std * jax.random.normal(rngs.params(), (z_dim, o * r)))
      self.v_bias = nnx.Param(jax.random.normal(rngs.params(), (o * r,)) / math.sqrt(r))
    else:
      n = math.prod(self.shape)
      self.gen = nnx.Param(last((z_dim, n)))
      self.gen_bias = nnx.Param(zero((n,)))

  def delta(self, z: jax.Array) -> jax.Array:
    """Delta(z): [..., z_dim] -> [..., *S]."""
    lead = z.shape[:-1]
    if self.lowrank:
      i, o = self.shape
      u = (z @ self.u_gen[...] + self.u_bias[...]).reshape(*lead, i, -1)
      v = (z @ self.v_gen[...] + self.v_bias[...]).reshape(*lead, o, -1)
      return jnp.einsum("...ir,...or->...io", u, v)
    return (z @ self.gen[...] + self.gen_bias[...]).reshape(*lead, *self.shape)

  def __call__(self, z: jax.Array) -> jax.Array:
    return self.base[...] + self.scale[...] * self.delta(z)


class FDA(nnx.Module):
  """The Fast Domain Adaptor: weighted anchors -> generated head tensors.

  Args:
    model: the device model's sizes.
    fda: the FDA's options.
    base_head: the shared base weights (the pretrained head), dict name -> array.
  """

  def __init__(self, model: ModelSpec, fda: FDASpec, base_head: dict, *, rngs: nnx.Rngs):
    self.model_spec = model
    self.fda_spec = fda
    self.names = fda.generated_names(model)
    self.anchors = SetEncoder(model.dim, fda.set_hidden, fda.z_dim, fda.set_pool, rngs=rngs)
    if fda.text_context:
      self.text_set = SetEncoder(model.dim, fda.set_hidden, fda.z_dim, fda.set_pool, rngs=rngs)
    shapes = model.head_shapes()
    # Keys with "/" are not valid attribute paths; generators are stored under "layer__w".
    self.generators = nnx.Dict(
      {
        n.replace("/", "__"): Generator(shapes[n], base_head[n], fda.z_dim, fda, rngs=rngs)
        for n in self.names
      }
    )

  def code(self, anchors, weights, text=None, text_weights=None) -> jax.Array:
    """z [..., z_dim] of anchors [..., K, d] with weights [..., K] (+ text set [..., Kq, d])."""
    chex.assert_axis_dimension(anchors, -1, self.model_spec.dim)
    z = self.anchors(anchors, weights)
    if self.fda_spec.text_context:
      if text is None:
        raise ValueError("fda.text_context=True: the FDA needs the device's question features")
      tw = jnp.ones(text.shape[:-1], text.dtype) if text_weights is None else text_weights
      z = z + self.text_set(text, tw)
    return z

  def __call__(self, anchors, weights, text=None, text_weights=None) -> dict[str, jax.Array]:
    """Generated head tensors {name: [..., *shape]} for the leading batch of ``anchors``."""
    z = self.code(anchors, weights, text, text_weights)
    return {n: self.generators[n.replace("/", "__")](z) for n in self.names}

  def base(self) -> dict[str, jax.Array]:
    """The shared base weights of the generated tensors."""
    return {n: self.generators[n.replace("/", "__")].base[...] for n in self.names}


def merge_head(local_head: dict, generated: dict) -> dict:
  """The head a device runs: its stored (pretrained) tensors, replaced by the generated ones."""
  missing = sorted(set(generated) - set(local_head))
  if missing:
    raise ValueError(f"generated tensor {missing[0]!r} is not a head tensor")
  return {**local_head, **generated}
