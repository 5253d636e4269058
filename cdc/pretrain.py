"""Pretrains the device model on the cloud's source domain (CDC-MMPG-style, spec section 5).

``python -m cdc.pretrain --config=configs/cdc.py:moving_shapes --workdir=runs/cdc``

Trains the encoders and the head end to end on the source domain's labeled videos (QA
cross-entropy + symmetric InfoNCE), then freezes the encoders: they are what every device stores,
and the head is the "static source model" baseline and the FDA's initial base weights. Writes
``<workdir>/pretrain.npz`` (encoders + head), ``pretrain_metrics.jsonl`` and
``pretrain_eval.json`` (source test QA accuracy and R@1/R@5).

Faults: the config is validated before anything is written; ``pretrain_ckpt.npz`` (+
``pretrain_ckpt.prev.npz``) every ``ckpt_every_steps``, restored from the newest intact one
(``experiment.restore_checkpoint``); ``pretrain_metrics.jsonl`` is cut back to the restored step.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from cdc import data as cdc_data
from cdc import device, experiment, models, objectives
from common import fileio
from common.train.logger import truncate_jsonl


def _batch(dom: cdc_data.DomainData, rng: np.random.Generator, size: int) -> dict:
  q = rng.integers(0, len(dom.answers), size) if len(dom.answers) else np.zeros(0, int)
  c = rng.integers(0, len(dom.caption_video), size) if len(dom.caption_video) else np.zeros(0, int)
  qv, cv = dom.question_video[q], dom.caption_video[c]
  return {
    "q_frames": dom.frames[qv],
    "q_mask": dom.frame_mask[qv],
    "questions": dom.questions[q],
    "question_mask": dom.question_mask[q],
    "answers": dom.answers[q],
    "c_frames": dom.frames[cv],
    "c_mask": dom.frame_mask[cv],
    "captions": dom.captions[c],
    "caption_mask": dom.caption_mask[c],
  }


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs pretraining; returns the source test metrics.

  Raises:
    ConfigError: a bad config or no intact checkpoint to resume from; before anything is written.
  """
  experiment.validate(config)
  dataset = experiment.build_dataset(config)
  spec = experiment.model_spec(config, dataset)
  p, meta = config.cdc.pretrain, config.cdc.meta
  qa_w = meta.qa_weight if spec.num_answers > 0 else 0.0
  enc = experiment.new_encoders(spec, config.seed)
  graphdef, enc_state = nnx.split(enc)
  head = models.init_head(spec, jax.random.key(config.seed + 1))
  params = (enc_state, head)
  tx = experiment.make_optimizer(p.learning_rate, p.warmup_steps, config.optimizer.grad_clip_norm)
  opt_state = tx.init(params)
  source = dataset.domain(cdc_data.SOURCE, "train")
  qa_w = qa_w if len(source.answers) else 0.0
  ret_w = meta.retrieval_weight if len(source.caption_video) else 0.0
  logging.info("pretrain: %d source videos, %s", source.num_videos, spec)

  def loss_fn(params, b):
    state, theta = params
    enc = nnx.merge(graphdef, state)
    feats = {}
    if qa_w:
      feats["q_video"] = enc.video(enc.frame_features(b["q_frames"]), b["q_mask"])
      feats["question"] = enc(b["questions"], b["question_mask"])
      feats["answers"] = b["answers"]
    if ret_w:
      feats["c_video"] = enc.video(enc.frame_features(b["c_frames"]), b["c_mask"])
      feats["caption"] = enc(b["captions"], b["caption_mask"])
    return objectives.head_loss(
      theta, feats, qa_weight=qa_w, retrieval_weight=ret_w, temperature=meta.temperature
    )

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, b):
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, b)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, parts

  ckpt = os.path.join(workdir, "pretrain_ckpt.npz")
  start = 0
  restored = experiment.restore_checkpoint(ckpt, (params, opt_state))
  if restored is not None:
    (params, opt_state), start = restored
    logging.info("pretrain: resumed at step %d", start)
  experiment.write_config(workdir, config)
  log_path = os.path.join(workdir, "pretrain_metrics.jsonl")
  truncate_jsonl(log_path, start)  # a fresh run keeps nothing of an earlier one
  log = open(log_path, "a")  # appended record by record on purpose: cut back on resume
  t0 = time.time()
  for s in range(start + 1, p.steps + 1):
    b = _batch(source, np.random.default_rng([config.seed, 7, s]), p.batch_size)
    params, opt_state, loss, parts = step(params, opt_state, b)
    if s % config.log_every_steps == 0 or s == p.steps:
      rec = {"step": s, "loss": float(loss), **{k: float(v) for k, v in parts.items()}}
      rec["seconds"] = time.time() - t0
      log.write(json.dumps(rec) + "\n")
      log.flush()
      logging.info("pretrain %s", rec)
    if s % config.ckpt_every_steps == 0 and s < p.steps:
      experiment.save_checkpoint(ckpt, (params, opt_state), step=s)
  log.close()
  enc_state, head = params
  experiment.save_npz(
    os.path.join(workdir, experiment.PRETRAIN_NPZ), (enc_state, head), step=p.steps
  )
  experiment.remove_checkpoint(ckpt)
  result = evaluate_head(graphdef, enc_state, head, dataset.domain(cdc_data.SOURCE, "test"))
  fileio.write_json(os.path.join(workdir, "pretrain_eval.json"), result)
  logging.info("pretrain: source test %s", result)
  return result


def evaluate_head(graphdef, enc_state, head, dom: cdc_data.DomainData) -> dict:
  """QA accuracy and text-to-video R@1/R@5 of a head on a domain, through the device forward."""
  out = device.make_device_forward(graphdef)(
    enc_state,
    head,
    jnp.asarray(dom.frames),
    jnp.asarray(dom.frame_mask),
    jnp.asarray(dom.questions),
    jnp.asarray(dom.question_mask),
    jnp.asarray(dom.question_video),
    jnp.asarray(dom.captions),
    jnp.asarray(dom.caption_mask),
  )
  return {
    "qa_accuracy": objectives.qa_accuracy(out["qa_logits"], dom.answers),
    **objectives.recall_at_k(out["text_emb"], out["video_emb"], dom.caption_video),
  }


if __name__ == "__main__":
  from common.train import cli

  cli.config_workdir_binary(pretrain, workdir_help="Output directory.")
