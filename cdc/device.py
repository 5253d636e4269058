"""The device side of CDC-MMPG-style adaptation: forward passes only, no labels, no gradients.

What a device does (spec section 5, "Deployment"):

1. encode its recent unlabeled frames with the frozen frame encoder -> a pool [M, d];
2. pick K anchors with the ADR (``cdc.adr``) and upload their features and weights (or, in the
   Gaussian-summary variant, the mixture's means, stds and weights);
3. receive the generated head tensors, install them over its stored head;
4. answer questions and embed videos/captions with ``device_forward``, one jitted function that
   takes the head as an argument;
5. watch its frame distribution (``DriftMonitor``) and ask again when the MMD between its recent
   pool and what it last uploaded exceeds a threshold.

Nothing here differentiates: this module never calls a JAX differentiation transform (a test reads
its source), and the compiled forward has no backward pass (a test reads the program).

**Wire format.** ``pack`` concatenates the raw bytes of a payload's arrays in ``Layout`` order;
both sides know the layout (names, shapes, dtypes) from the config, so nothing else is sent. The
bytes reported for a transfer are ``len()`` of what ``pack`` returned, i.e. of the arrays sent.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cdc import adr, models

Layout = tuple[tuple[str, tuple[int, ...], str], ...]


# -------------------------------------------------------------------------------------------------
# Wire.


def pack(payload: Mapping[str, np.ndarray], layout: Layout) -> bytes:
  """The bytes on the wire: the arrays' raw bytes in ``layout`` order (C order).

  Raises:
    ValueError: when the payload does not match the layout (a missing, extra or mis-shaped array).
  """
  if set(payload) != {name for name, _, _ in layout}:
    raise ValueError(f"payload keys {sorted(payload)} != layout {[n for n, _, _ in layout]}")
  chunks = []
  for name, shape, dtype in layout:
    a = np.asarray(payload[name])
    if a.shape != shape or str(a.dtype) != dtype:
      raise ValueError(
        f"payload {name!r} is {a.dtype}{list(a.shape)}, layout says {dtype}{list(shape)}"
      )
    chunks.append(np.ascontiguousarray(a).tobytes())
  return b"".join(chunks)


def unpack(buffer: bytes, layout: Layout) -> dict[str, np.ndarray]:
  """Inverse of ``pack``.

  Raises:
    ValueError: if the buffer's length is not the layout's.
  """
  sizes = [
    int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for _, shape, dtype in layout
  ]
  if len(buffer) != sum(sizes):
    raise ValueError(f"buffer has {len(buffer)} bytes, layout needs {sum(sizes)}")
  out, offset = {}, 0
  for (name, shape, dtype), size in zip(layout, sizes, strict=True):
    out[name] = np.frombuffer(buffer, dtype, count=size // np.dtype(dtype).itemsize, offset=offset)
    out[name] = out[name].reshape(shape)
    offset += size
  return out


def uplink_layout(
  dim: int, k: int, kind: str = "anchors", dtype: str = "float32", text_anchors: int = 0
) -> Layout:
  """What a device uploads.

  Args:
    dim: feature width d.
    k: anchors (``kind="anchors"``) or mixture components (``kind="gaussian"``).
    kind: ``anchors``: ``anchors`` [K, d] + ``weights`` [K]; ``gaussian``: ``means``, ``stds``
      [G, d] + ``weights`` [G].
    dtype: of the feature arrays (weights stay float32).
    text_anchors: > 0 adds ``text`` [K_q, d], question features for the FDA's text context.
  """
  if kind == "anchors":
    out = [("anchors", (k, dim), dtype), ("weights", (k,), "float32")]
  elif kind == "gaussian":
    out = [("means", (k, dim), dtype), ("stds", (k, dim), dtype), ("weights", (k,), "float32")]
  else:
    raise ValueError(f"uplink kind {kind!r}; allowed: anchors, gaussian")
  if text_anchors > 0:
    out.append(("text", (text_anchors, dim), dtype))
  return tuple(sorted(out))


def downlink_layout(model: models.ModelSpec, fda: models.FDASpec, dtype: str = "float32") -> Layout:
  """What the cloud sends: the generated head tensors, in ``dtype``."""
  shapes = model.head_shapes()
  return tuple((n, shapes[n], dtype) for n in fda.generated_names(model))


@dataclasses.dataclass(frozen=True)
class Transfer:
  """One message: ``payload`` (the bytes on the wire) and its ``layout``."""

  payload: bytes
  layout: Layout

  @property
  def nbytes(self) -> int:
    return len(self.payload)


# -------------------------------------------------------------------------------------------------
# The jitted device functions. Cached per encoder structure: every ``Device`` of one model (one
# per held-out device in ``cdc.evaluate``) shares their compiled programs; the weights are
# arguments. Inputs go in as numpy arrays: ``jnp.asarray`` on one compiles a program per shape.


@functools.cache
def make_encode_frames(graphdef: nnx.GraphDef):
  """Jitted ``(encoder_state, frames [V, T, ...]) -> frame features [V, T, d]``."""

  @jax.jit
  def encode(state, frames):
    return nnx.merge(graphdef, state).frame_features(frames)

  return encode


@functools.cache
def make_encode_text(graphdef: nnx.GraphDef):
  """Jitted ``(encoder_state, text [N, L(, D_q)], mask [N, L]) -> [N, d]``."""

  @jax.jit
  def encode(state, text, mask):
    return nnx.merge(graphdef, state)(text, mask)

  return encode


@functools.cache
def make_device_forward(graphdef: nnx.GraphDef):
  """The device's one forward function, jitted; the head ``theta`` is an argument.

  Returns:
    ``forward(encoder_state, theta, frames [V, T, ...], frame_mask [V, T], questions [N, L(,
    D_q)], question_mask [N, L], question_video int32 [N], captions [N_c, L_c(, D_q)],
    caption_mask [N_c, L_c])`` -> dict with ``qa_logits`` [N, A], ``video_emb`` [V, p],
    ``text_emb`` [N_c, p].
  """

  @jax.jit
  def forward(
    state, theta, frames, frame_mask, questions, question_mask, question_video, captions, cmask
  ):
    enc = nnx.merge(graphdef, state)
    video = enc.video(enc.frame_features(frames), frame_mask)
    q = enc(questions, question_mask)
    return {
      "qa_logits": models.qa_logits(theta, video[question_video], q),
      "video_emb": models.embed_video(theta, video),
      "text_emb": models.embed_text(theta, enc(captions, cmask)),
    }

  return forward


@functools.partial(jax.jit, static_argnames=("k", "method", "weighting", "iters"))
def _anchors(pool, key, *, k, method, weighting, iters):
  idx, w = adr.select_jax(pool, k, method, key, weighting=weighting, kmedoids_iters=iters)
  return pool[idx], w, idx


@functools.partial(jax.jit, static_argnames=("g",))
def _summary(pool, key, *, g):
  return adr.gaussian_summary_jax(pool, g, key)


@dataclasses.dataclass
class Device:
  """A device: frozen encoders, its stored head, and the adaptation requests it makes.

  Args:
    spec: the device model's sizes.
    graphdef, encoder_state: the frozen encoders (``nnx.split(Encoders)``).
    local_head: the head it stores (the pretrained one), dict name -> array.
    selector: an ``adr.SELECTORS`` name or ``"gaussian"`` (the Gaussian-summary variant).
    num_anchors: K (anchors), or G (mixture components) for ``gaussian``.
    weighting, kmedoids_iters: ADR options.
    uplink_dtype: dtype of the uploaded features.
    text_anchors: question features uploaded for the FDA's text context (0: none).
  """

  spec: models.ModelSpec
  graphdef: nnx.GraphDef
  encoder_state: nnx.State
  local_head: dict
  selector: str = "k_center"
  num_anchors: int = 16
  weighting: str = "assignment"
  kmedoids_iters: int = 10
  uplink_dtype: str = "float32"
  text_anchors: int = 0

  def __post_init__(self):
    self.encode_frames = make_encode_frames(self.graphdef)
    self.encode_text = make_encode_text(self.graphdef)
    self.forward_fn = make_device_forward(self.graphdef)
    self.head = dict(self.local_head)

  def pool(self, frames, frame_mask) -> np.ndarray:
    """The frame pool float32 [M, d]: features of the valid frames of videos [V, T, ...]."""
    feats = np.asarray(self.encode_frames(self.encoder_state, np.asarray(frames)))
    return feats[np.asarray(frame_mask, bool)]

  def uplink(self, pool, *, seed: int = 0, text=None) -> tuple[Transfer, np.ndarray | None]:
    """Selects anchors of ``pool`` [M, d] and packs the upload.

    Args:
      pool: float32 [M, d] frame features.
      seed: for the randomised selectors.
      text: float32 [N_q, d] question features (only with ``text_anchors`` > 0; the first
        ``text_anchors`` are sent).

    Returns:
      (the transfer, the selected pool indices int32 [K] or None for ``gaussian``).

    Raises:
      ValueError: bad pool (see ``adr.check_pool``), missing or too few question features.
    """
    k = self.num_anchors
    pool = adr.check_pool(pool, k, self.spec.dim, name=f"ADR {self.selector}")
    key = jax.random.key(seed)
    dtype = np.dtype(self.uplink_dtype)
    if self.selector == "gaussian":
      means, stds, w = _summary(pool, key, g=k)
      payload = {
        "means": np.asarray(means).astype(dtype),
        "stds": np.asarray(stds).astype(dtype),
        "weights": np.asarray(w, np.float32),
      }
      kind, idx = "gaussian", None
    else:
      if self.selector not in adr.SELECTORS:
        raise ValueError(f"selector {self.selector!r}; allowed: {adr.SELECTORS + ('gaussian',)}")
      feats, w, idx = _anchors(
        pool,
        key,
        k=k,
        method=self.selector,
        weighting=self.weighting,
        iters=self.kmedoids_iters,
      )
      payload = {"anchors": np.asarray(feats).astype(dtype), "weights": np.asarray(w, np.float32)}
      kind, idx = "anchors", np.asarray(idx)
    if self.text_anchors > 0:
      if text is None or len(text) < self.text_anchors:
        raise ValueError(f"text context needs >= {self.text_anchors} question features")
      if np.shape(text)[1:] != (self.spec.dim,):
        raise ValueError(f"question features of shape {np.shape(text)}, need [N, {self.spec.dim}]")
      payload["text"] = np.asarray(text[: self.text_anchors]).astype(dtype)
    layout = uplink_layout(self.spec.dim, k, kind, self.uplink_dtype, self.text_anchors)
    return Transfer(pack(payload, layout), layout), idx

  def install(self, downlink: Transfer) -> dict:
    """Installs generated tensors over the stored head; returns the head now in use (float32)."""
    received = unpack(downlink.payload, downlink.layout)
    generated = {k: jnp.asarray(v, jnp.float32) for k, v in received.items()}
    self.head = models.merge_head(self.local_head, generated)
    return self.head

  def forward(self, data, theta: dict | None = None) -> dict:
    """``device_forward`` on a ``cdc.data.DomainData`` with ``theta`` (default: the installed
    head)."""
    theta = self.head if theta is None else theta
    arrays = (
      data.frames,
      data.frame_mask,
      data.questions,
      data.question_mask,
      data.question_video,
      data.captions,
      data.caption_mask,
    )
    return self.forward_fn(self.encoder_state, theta, *(np.asarray(a) for a in arrays))


# -------------------------------------------------------------------------------------------------
# Drift trigger.


@jax.jit
def _drift_mmd2(pool, anchors, weights, sigma2):
  return adr.mmd2(pool, anchors, None, weights, sigma2)


@dataclasses.dataclass
class DriftMonitor:
  """Re-requests parameters when the recent frames move away from what was last uploaded.

  The statistic is MMD^2 (RBF kernel) between the recent pool (uniform weights) and the last
  uploaded anchors (their weights); the bandwidth is the median heuristic of the pool at upload
  time, kept fixed until the next upload so that statistics are comparable.

  Args:
    threshold: request new parameters when MMD^2 > threshold.
  """

  threshold: float
  anchors: np.ndarray | None = None
  weights: np.ndarray | None = None
  sigma2: float | None = None

  def uploaded(self, pool: np.ndarray, anchors: np.ndarray, weights: np.ndarray) -> None:
    """Records an upload: the pool [M, d] it summarised, the anchors [K, d] and weights [K]."""
    self.anchors = np.asarray(anchors, np.float32)
    self.weights = np.asarray(weights, np.float32)
    self.sigma2 = float(adr.median_bandwidth(jnp.asarray(pool, jnp.float32)))

  def statistic(self, pool: np.ndarray) -> float:
    """MMD^2 between the recent pool [M, d] and the last upload."""
    if self.anchors is None:
      raise ValueError("DriftMonitor: nothing uploaded yet")
    pool = np.asarray(pool)
    if pool.ndim != 2 or pool.shape[1] != self.anchors.shape[1]:
      raise ValueError(
        f"DriftMonitor: pool of shape {pool.shape}; expected [M, {self.anchors.shape[1]}]"
      )
    return float(_drift_mmd2(pool, self.anchors, self.weights, self.sigma2))

  def check(self, pool: np.ndarray) -> tuple[bool, float]:
    """(whether to request new parameters, the statistic); always True before any upload."""
    if self.anchors is None:
      return True, float("inf")
    stat = self.statistic(pool)
    return stat > self.threshold, stat
