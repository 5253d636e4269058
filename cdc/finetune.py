"""Fine-tuning-based adaptation (FTA): the baseline that needs labels and backprop on the device.

The device fine-tunes the same head tensors the FDA generates (``FDASpec.generated``) with Adam on
n labeled samples of its own (QA cross-entropy + InfoNCE, as in meta-training), starting from the
pretrained head; the encoders stay frozen, so the samples are encoded once. With n = all of the
device's labeled videos this is the oracle. Kept apart from ``cdc.device``, whose path must not
differentiate.

The step is one module-level jitted function that takes the features and the fixed head tensors as
arguments, so the evaluation's devices share its compiled programs (issue 24: a closure per call
had baked them in as constants and compiled once per device and arm).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cdc import objectives
from common.metrics import flops as flops_lib

_QUESTION_KEYS = ("q_video", "question", "answers")


def _padded_rows(n: int) -> int:
  """Rows a feature array of n rows is padded to: the next power of two (at least 1)."""
  return 1 << max(n - 1, 0).bit_length()


def _pad(a: np.ndarray, rows: int) -> np.ndarray:
  a = np.asarray(a)
  return np.concatenate([a, np.zeros((rows - len(a), *a.shape[1:]), a.dtype)])


@functools.partial(
  jax.jit, static_argnames=("learning_rate", "qa_weight", "retrieval_weight", "temperature")
)
def _step(
  params, opt_state, fixed, data, qi, ci, *, learning_rate, qa_weight, retrieval_weight, temperature
):
  """One Adam update of ``params`` on the batch ``data[qi]`` / ``data[ci]``.

  Module-level, with the data and the fixed head tensors as arguments, so that every call with the
  same shapes and settings (every held-out device's ``ft/n<n>`` arm) runs one compiled program;
  the trainable names are the structure of ``params``, the batch sizes the shapes of ``qi``, ``ci``.

  Args:
    params, fixed: the trainable and the fixed head tensors (dict name -> array).
    opt_state: Adam's state of ``params``.
    data: ``q_video`` [P_q, d], ``question`` [P_q, d], ``answers`` int32 [P_q], ``c_video``
      [P_c, d], ``caption`` [P_c, d]; rows padded past the labeled ones (never indexed).
    qi: int32 [B_q], ci: int32 [B_c]: the batch's rows.
  """

  def loss_fn(params):
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
      qa_weight=qa_weight,
      retrieval_weight=retrieval_weight,
      temperature=temperature,
    )[0]

  tx = optax.adam(learning_rate)
  updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
  return optax.apply_updates(params, updates), opt_state


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

  Calls with the same trainable names, batch sizes, loss settings and learning rate, and labeled
  counts that pad to the same rows (the next power of two), run one compiled step (``_step``).
  """
  n_q, n_c = len(feats["answers"]), len(feats["caption"])
  if n_q == 0 and n_c == 0:
    raise ValueError("finetune: no labeled samples")
  fixed = jax.device_put({k: v for k, v in head.items() if k not in trainable})
  params = {k: jnp.asarray(head[k]) for k in trainable}
  opt_state = optax.adam(learning_rate).init(params)
  b_q, b_c = min(batch_size, max(n_q, 1)), min(batch_size, max(n_c, 1))
  # Padded rows are never drawn (indices are in [0, n)), so the result is that of the unpadded
  # arrays, while devices whose labeled counts differ a little share one compiled step.
  rows = {k: _padded_rows(n_q if k in _QUESTION_KEYS else n_c) for k in feats}
  data = jax.device_put({k: _pad(v, rows[k]) for k, v in feats.items()})
  settings = dict(
    learning_rate=learning_rate,
    qa_weight=qa_weight if n_q else 0.0,
    retrieval_weight=retrieval_weight if n_c > 1 else 0.0,
    temperature=temperature,
  )

  rng = np.random.default_rng(seed)

  def indices(n, b):
    if n == 0:
      return np.zeros(b, np.int32)
    # Without replacement inside a batch when possible: InfoNCE needs distinct pairs.
    return rng.choice(n, b, replace=n < b).astype(np.int32)

  qi0, ci0 = indices(n_q, b_q), indices(n_c, b_c)
  # Lowering is cached per shapes and settings: a later call with the same ones gets this
  # executable back without compiling.
  compiled = _step.lower(params, opt_state, fixed, data, qi0, ci0, **settings).compile()
  step_flops = flops_lib.compiled_flops(compiled)
  batches = [(indices(n_q, b_q), indices(n_c, b_c)) for _ in range(steps)]
  start = time.perf_counter()
  for qi, ci in batches:
    params, opt_state = compiled(params, opt_state, fixed, data, qi, ci)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  return FinetuneResult({**fixed, **params}, seconds, step_flops * steps, steps)
