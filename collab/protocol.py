"""The privacy boundary of CollaFuse, as code.

In training a client sends the server only its cut images ``x_cut`` (its batch noised to level
``cut_point``) and, if configured, the labels; in inference the server sends a client only the
hand-off latent at ``cut_point``. Both directions go through the functions here and nothing else
reaches the server's code: ``server.loss`` and ``server.sample`` take a ``ClientMessage`` and no
other data. ``tests/collab/test_collab.py`` checks that what arrives is exactly this message.
"""

from __future__ import annotations

import chex
import flax
import jax
import numpy as np


@flax.struct.dataclass
class ClientMessage:
  """Uplink of one training step: ``x_cut`` [K, B, H, W, C] float32 at level cut_point; ``labels``
  [K, B] int32 or None when labels are not shared with the server."""

  x_cut: jax.Array
  labels: jax.Array | None


def transmit(x_cut: jax.Array, labels: jax.Array | None, *, share_labels: bool) -> ClientMessage:
  """What leaves the clients: the cut images and (optionally) their labels. Nothing else."""
  chex.assert_rank(x_cut, 5)
  return ClientMessage(x_cut=x_cut, labels=labels if share_labels else None)


def uplink_bytes(message_shape: tuple[int, ...], share_labels: bool) -> int:
  """Bytes one training step sends to the server: float32 cut images (+ int32 labels)."""
  k, b = message_shape[:2]
  return int(np.prod(message_shape)) * 4 + (k * b * 4 if share_labels else 0)


def downlink_bytes_per_image(image_shape: tuple[int, ...]) -> int:
  """Bytes the server sends a client per generated image: one float32 latent at cut_point."""
  return int(np.prod(image_shape)) * 4
