"""Tests for cdc.finetune: one compiled step shared by calls of equal shapes and settings (issue 24),
and the same results as the per-call closure it replaced."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cdc import finetune, models, objectives
from common.metrics import flops as flops_lib

# Sizes no other test uses, so that the first call here is the step's first compile.
SPEC = models.ModelSpec(
  resolution=8,
  conv_channels=(4, 4, 4),
  vocab_size=12,
  dim=10,
  fusion_hidden=14,
  fusion_out=6,
  num_answers=7,
  proj_dim=5,
)
HEAD = models.init_head(SPEC, jax.random.key(3))
ALL = tuple(sorted(HEAD))
SETTINGS = dict(
  steps=3,
  batch_size=4,
  learning_rate=1e-2,
  qa_weight=1.0,
  retrieval_weight=0.5,
  temperature=0.1,
  seed=0,
)


def _feats(seed: int, n_q: int, n_c: int) -> dict:
  rng = np.random.default_rng(seed)
  d = SPEC.dim
  return {
    "q_video": rng.normal(size=(n_q, d)).astype(np.float32),
    "question": rng.normal(size=(n_q, d)).astype(np.float32),
    "answers": rng.integers(0, SPEC.num_answers, n_q).astype(np.int32),
    "c_video": rng.normal(size=(n_c, d)).astype(np.float32),
    "caption": rng.normal(size=(n_c, d)).astype(np.float32),
  }


@contextlib.contextmanager
def _step_compiles():
  """Counts XLA compiles of ``finetune._step`` inside the block (persistent-cache hits too)."""
  names = []

  def on_duration(event, seconds, **kw):
    del seconds
    if event == "/jax/core/compile/backend_compile_duration" and "_step" in kw.get("fun_name", ""):
      names.append(kw["fun_name"])

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)


def test_calls_of_equal_shapes_and_settings_share_one_compiled_step():
  with _step_compiles() as first:
    finetune.finetune(HEAD, ALL, _feats(0, 6, 7), **SETTINGS)
  assert len(first) <= 1
  # Other data, another seed, and other labeled counts that pad to the same rows (8): no compile.
  with _step_compiles() as later:
    for seed, (n_q, n_c) in enumerate([(6, 7), (5, 8), (7, 5)], start=1):
      res = finetune.finetune(HEAD, ALL, _feats(seed, n_q, n_c), **{**SETTINGS, "seed": seed})
      assert res.flops > 0 and res.steps == SETTINGS["steps"]
  assert later == []
  # A static setting is part of the program: another temperature compiles once, then is shared.
  with _step_compiles() as other:
    for seed in (0, 1):
      finetune.finetune(HEAD, ALL, _feats(seed, 6, 7), **{**SETTINGS, "temperature": 0.2})
  assert len(other) == 1


def _closure_finetune(
  head,
  trainable,
  feats,
  *,
  steps,
  batch_size,
  learning_rate,
  qa_weight,
  retrieval_weight,
  temperature,
  seed,
):
  """The form before issue 24: a fresh ``jax.jit`` closure per call, data and fixed tensors baked
  in as constants (one compile per call)."""
  n_q, n_c = len(feats["answers"]), len(feats["caption"])
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
    return rng.choice(n, b, replace=n < b).astype(np.int32)

  qi0, ci0 = indices(n_q, b_q), indices(n_c, b_c)
  compiled = jax.jit(step).lower(params, opt_state, qi0, ci0).compile()
  step_flops = flops_lib.compiled_flops(compiled)
  for qi, ci in [(indices(n_q, b_q), indices(n_c, b_c)) for _ in range(steps)]:
    params, opt_state = compiled(params, opt_state, qi, ci)
  return {**fixed, **params}, step_flops * steps


@pytest.mark.parametrize(
  "n_q, n_c",
  [
    (6, 7),  # padded to 8 rows each
    (4, 1),  # one caption: no retrieval loss
  ],
)
def test_results_equal_the_per_call_closure(n_q, n_c):
  # Every head tensor trained, as cdc.evaluate does with every preset (cdc.fda.generated = all).
  feats = _feats(7, n_q, n_c)
  res = finetune.finetune(HEAD, ALL, feats, **SETTINGS)
  want, want_flops = _closure_finetune(HEAD, ALL, feats, **SETTINGS)
  assert sorted(res.head) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(res.head[k]), np.asarray(want[k]), err_msg=k)
  assert res.flops == want_flops


def test_results_with_fixed_tensors_match_the_closure_to_rounding():
  # The closure baked the fixed tensors into the program as constants, and XLA compiles a dot
  # with a constant operand in another summation order: the two agree to float32 rounding only
  # (measured 3e-8 absolute) and XLA counts a few hundred FLOPs less for the argument form.
  trainable = ("fusion2/b", "fusion2/w", "qa/b", "qa/w")
  feats = _feats(7, 5, 3)
  res = finetune.finetune(HEAD, trainable, feats, **SETTINGS)
  want, _ = _closure_finetune(HEAD, trainable, feats, **SETTINGS)
  for k in want:
    np.testing.assert_allclose(
      np.asarray(res.head[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-7, err_msg=k
    )
    if k not in trainable:
      np.testing.assert_array_equal(np.asarray(res.head[k]), np.asarray(HEAD[k]), err_msg=k)


def test_captions_only():
  # No questions: the closure's gather from an empty array failed to trace; the padded row is
  # never read, and the tensors only the QA loss reaches keep their values.
  res = finetune.finetune(HEAD, ALL, _feats(7, 0, 9), **SETTINGS)
  for k in ("fusion1/w", "fusion2/b", "qa/w", "qa/b"):
    np.testing.assert_array_equal(np.asarray(res.head[k]), np.asarray(HEAD[k]), err_msg=k)
  assert not np.array_equal(np.asarray(res.head["ret_text/w"]), np.asarray(HEAD["ret_text/w"]))
