"""Fine-tuning-based adaptation (FTA): the baseline that needs labels and backprop on the device.

The device fine-tunes the same head tensors the FDA generates (``FDASpec.generated``) with Adam on
n labeled samples of its own (QA cross-entropy + InfoNCE, as in meta-training), starting from the
pretrained head; the encoders stay frozen, so the samples are encoded once. With n = all of the
device's labeled videos this is the oracle. Kept apart from ``cdc.device``, whose path must not
differentiate.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cdc import objectives


def compiled_flops(compiled) -> float:
  """XLA's FLOP count of a compiled program (as ``common.metrics.flops.count_flops``)."""
  analysis = compiled.cost_analysis()
  analyses = [analysis] if isinstance(analysis, dict) else list(analysis or [])
  found = [a["flops"] for a in analyses if a and "flops" in a]
  if not found:
    raise RuntimeError(f"XLA cost analysis has no 'flops' on {jax.default_backend()!r}")
  return float(sum(found))


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
  """The adapted head, device seconds of the training loop, its XLA FLOPs and the steps run."""

  head: dict
  seconds: float
  flops: float
  steps: int


def finetune(
  head: dict,
  trainable: tuple[str, ...],
  feats: dict,
  *,
  steps: int,
  batch_size: int,
  learning_rate: float,
  qa_weight: float,
  retrieval_weight: float,
  temperature: float,
  seed: int,
) -> FinetuneResult:
  """Adam on ``trainable`` head tensors over labeled features.

  Args:
    head: the starting head (dict name -> array).
    trainable: names of the tensors to train; the others stay fixed.
    feats: ``q_video`` [n, d], ``question`` [n, d], ``answers`` int32 [n], ``c_video`` [n_c, d],
      ``caption`` [n_c, d].
    steps, batch_size, learning_rate: the loop (batches drawn with replacement when n < batch).
    qa_weight, retrieval_weight, temperature: the loss, as in meta-training.
    seed: batch sampling.

  Returns:
    ``FinetuneResult``; ``seconds`` excludes compilation.
  """
  n_q, n_c = len(feats["answers"]), len(feats["caption"])
  if n_q == 0 and n_c == 0:
    raise ValueError("finetune: no labeled samples")
  fixed = {k: v for k, v in head.items() if k not in trainable}
  params = {k: jnp.asarray(head[k]) for k in trainable}
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)
  b_q, b_c = min(batch_size, max(n_q, 1)), min(batch_size, max(n_c, 1))
  data = {k: jnp.asarray(v) for k, v in feats.items()}

  def loss_fn(params, qi, ci):
    batch = {
      "q_video": data["q_video"][qi],
      "question": data["question"][qi],
      "answers": data["answers"][qi],
      "c_video": data["c_video"][ci],
      "caption": data["caption"][ci],
    }
    return objectives.head_loss(
      {**fixed, **params},
      batch,
      qa_weight=qa_weight if n_q else 0.0,
      retrieval_weight=retrieval_weight if n_c > 1 else 0.0,
      temperature=temperature,
    )[0]

  def step(params, opt_state, qi, ci):
    grads = jax.grad(loss_fn)(params, qi, ci)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)

  def indices(n, b):
    if n == 0:
      return np.zeros(b, np.int32)
    # Without replacement inside a batch when possible: InfoNCE needs distinct pairs.
    return rng.choice(n, b, replace=n < b).astype(np.int32)

  qi0, ci0 = indices(n_q, b_q), indices(n_c, b_c)
  compiled = jax.jit(step).lower(params, opt_state, qi0, ci0).compile()
  step_flops = compiled_flops(compiled)
  batches = [(indices(n_q, b_q), indices(n_c, b_c)) for _ in range(steps)]
  start = time.perf_counter()
  for qi, ci in batches:
    params, opt_state = compiled(params, opt_state, qi, ci)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  return FinetuneResult({**fixed, **params}, seconds, step_flops * steps, steps)
