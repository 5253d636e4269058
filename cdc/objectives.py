"""Losses and metrics of the device model's two tasks (QA, text-to-video retrieval).

Used by pretraining (whole model on the source), meta-training (through the FDA's generated head)
and the fine-tuning baselines, so that every arm optimises and is scored the same way.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cdc import models


def qa_loss(theta: dict, video: jax.Array, question: jax.Array, answers: jax.Array) -> jax.Array:
  """Mean cross-entropy of answers int32 [N] given video [N, d] and question [N, d] features."""
  chex.assert_equal_shape([video, question])
  logits = models.qa_logits(theta, video, question)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, answers))


def retrieval_loss(
  theta: dict, video: jax.Array, caption: jax.Array, temperature: float
) -> jax.Array:
  """Symmetric InfoNCE over a batch of matched (video [N, d], caption [N, d]) pairs."""
  chex.assert_equal_shape([video, caption])
  sim = models.embed_text(theta, caption) @ models.embed_video(theta, video).T / temperature
  labels = jnp.arange(sim.shape[0])
  t2v = optax.softmax_cross_entropy_with_integer_labels(sim, labels)
  v2t = optax.softmax_cross_entropy_with_integer_labels(sim.T, labels)
  return 0.5 * (jnp.mean(t2v) + jnp.mean(v2t))


def head_loss(theta: dict, batch: dict, *, qa_weight, retrieval_weight, temperature):
  """Weighted task loss on precomputed features.

  Args:
    theta: the head.
    batch: ``q_video`` [N, d], ``question`` [N, d], ``answers`` int32 [N], ``c_video`` [N_c, d],
      ``caption`` [N_c, d].

  Returns:
    (loss scalar, dict of the two task losses).
  """
  parts = {}
  loss = 0.0
  if qa_weight:
    parts["qa"] = qa_loss(theta, batch["q_video"], batch["question"], batch["answers"])
    loss = loss + qa_weight * parts["qa"]
  if retrieval_weight:
    parts["retrieval"] = retrieval_loss(theta, batch["c_video"], batch["caption"], temperature)
    loss = loss + retrieval_weight * parts["retrieval"]
  return loss, parts


def qa_accuracy(logits, answers) -> float:
  """Top-1 accuracy of logits [N, A] against answers [N]; NaN when N = 0."""
  logits, answers = np.asarray(logits), np.asarray(answers)
  if answers.size == 0:
    return float("nan")
  return float(np.mean(np.argmax(logits, -1) == answers))


def recall_at_k(text_emb, video_emb, caption_video, ks=(1, 5)) -> dict[str, float]:
  """Text-to-video recall@k: the share of captions whose video ranks in the top k of the gallery.

  Args:
    text_emb: [N_c, p] caption embeddings; video_emb: [V, p] gallery; caption_video: int [N_c].

  Ties count against the caption (a rank is 1 + the number of videos scoring >= the true one,
  other than itself), so a collapsed embedding scores 0, not 1.
  """
  text_emb, video_emb = np.asarray(text_emb, np.float64), np.asarray(video_emb, np.float64)
  caption_video = np.asarray(caption_video)
  if caption_video.size == 0:
    return {f"R@{k}": float("nan") for k in ks}
  sim = text_emb @ video_emb.T
  true = sim[np.arange(len(sim)), caption_video][:, None]
  rank = np.sum(sim >= true, axis=1)  # includes the true video itself: rank 1 = best
  return {f"R@{k}": float(np.mean(rank <= k)) for k in ks}
