"""The cloud side of CDC-MMPG-style adaptation: uplink bytes -> FDA forward -> downlink bytes.

The cloud sees only what the device packed (``cdc.device.pack``): anchor features and weights, or
the Gaussian summary, from which it draws pseudo-features (``adr.sample_summary_jax``) with a fixed
key. One jitted FDA forward per request; no gradient either (the cloud trains the FDA offline,
``cdc.train``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cdc import adr, models
from cdc.device import Transfer, downlink_layout, pack, unpack


class Cloud:
  """Hosts a trained FDA.

  Args:
    graphdef, state: the FDA (``nnx.split(FDA)``).
    downlink_dtype: dtype of the sent tensors (``float32`` or ``float16``).
    summary_samples: pseudo-features drawn from a Gaussian-summary upload.
    seed: the key of those draws.
  """

  def __init__(
    self,
    graphdef: nnx.GraphDef,
    state: nnx.State,
    *,
    downlink_dtype: str = "float32",
    summary_samples: int = 64,
    seed: int = 0,
  ):
    self.graphdef, self.state = graphdef, state
    fda = nnx.merge(graphdef, state)
    self.model_spec, self.fda_spec = fda.model_spec, fda.fda_spec
    self.layout = downlink_layout(self.model_spec, self.fda_spec, downlink_dtype)
    self.summary_samples = summary_samples
    self.key = jax.random.key(seed)
    self.generate = _make_generate(graphdef)

  def features(self, received: dict) -> tuple[jax.Array, jax.Array]:
    """(features [K, d], weights [K]) the FDA sees for a decoded upload."""
    if "anchors" in received:
      return jnp.asarray(received["anchors"], jnp.float32), received["weights"]
    return adr.sample_summary_jax(
      jnp.asarray(received["means"], jnp.float32),
      jnp.asarray(received["stds"], jnp.float32),
      jnp.asarray(received["weights"]),
      self.summary_samples,
      self.key,
    )

  def adapt(self, uplink: Transfer) -> Transfer:
    """Decodes an upload, generates the head tensors, packs them for the device."""
    received = unpack(uplink.payload, uplink.layout)
    feats, w = self.features(received)
    text = received.get("text")
    theta = self.generate(self.state, feats, w, None if text is None else np.asarray(text))
    dtype = np.dtype(self.layout[0][2])
    payload = {k: np.asarray(v).astype(dtype) for k, v in theta.items()}
    return Transfer(pack(payload, self.layout), self.layout)


@functools.cache
def _make_generate(graphdef):
  # Cached per FDA structure: every Cloud of the same FDA shares one compiled program.
  @jax.jit
  def generate(state, feats, weights, text):
    fda = nnx.merge(graphdef, state)
    return fda(feats, weights, text)

  return generate


def generated_nbytes(model: models.ModelSpec, fda: models.FDASpec, dtype: str = "float32") -> int:
  """Downlink bytes of one adaptation, from the layout (equal to ``len`` of the packed bytes)."""
  return sum(
    int(np.prod(shape)) * np.dtype(dt).itemsize
    for _, shape, dt in downlink_layout(model, fda, dtype)
  )
