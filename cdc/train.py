"""Meta-trains the Fast Domain Adaptor over simulated devices (CDC-MMPG-style, spec section 5).

``python -m cdc.train --config=configs/cdc.py:moving_shapes --workdir=runs/cdc`` (after
``cdc.pretrain`` in the same workdir).

Every step draws ``cdc.meta.devices_per_step`` meta-training devices. For each: a random subset of
its unlabeled pool frames (the episode's pool, M = ``cdc.meta.pool_videos * num_frames`` frames)
goes through the same ADR selector that devices use (``cdc.adr.selector``, in the loop, no gradient
through the selection) -> anchors -> FDA -> generated head; the loss is the task loss of that head
on a labeled query batch of the same device (QA cross-entropy + symmetric InfoNCE). Gradients reach
the FDA (and, with ``cdc.fda.train_base``, the shared base weights) only: the encoders are frozen,
so the devices' features are computed once (``build_bank``).

Held-out devices cannot enter: ``build_bank`` takes its devices through the dataset's
``check_meta_train``. Writes ``<workdir>/fda.npz`` and ``train_metrics.jsonl``.

Faults: the config is validated (``experiment.validate``) and the bank built before anything is
written; ``train_ckpt.npz`` (+ ``train_ckpt.prev.npz``) every ``ckpt_every_steps``, restored from the
newest intact one (``experiment.restore_checkpoint``); on resume ``train_metrics.jsonl`` is cut back
to the restored step (a torn last line dropped), so it reads as one uninterrupted run.
"""

from __future__ import annotations

import dataclasses
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

from cdc import adr, device, experiment, models, objectives
from common.train.logger import truncate_jsonl
from common.train.validate import ConfigError


@dataclasses.dataclass
class Bank:
  """Frozen features of a set of devices, padded to common sizes (counts give the valid rows).

  Attributes:
    devices: int32 [D] device ids.
    pool: float32 [D, M, d] valid pool frame features first; pool_count int32 [D].
    pool_text: float32 [D, N_p, d] pool question features (unlabeled); pool_text_count [D].
    video: float32 [D, V, d] labeled videos; question [D, N_q, d], answers int32 [D, N_q],
      question_video int32 [D, N_q], question_count [D]; caption [D, N_c, d], caption_video
      int32 [D, N_c], caption_count [D].
  """

  devices: np.ndarray
  pool: np.ndarray
  pool_count: np.ndarray
  pool_text: np.ndarray
  pool_text_count: np.ndarray
  video: np.ndarray
  question: np.ndarray
  answers: np.ndarray
  question_video: np.ndarray
  question_count: np.ndarray
  caption: np.ndarray
  caption_video: np.ndarray
  caption_count: np.ndarray

  def arrays(self) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in dataclasses.asdict(self).items() if k != "devices"}


def _pad(arrays: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
  n = max(max(len(a) for a in arrays), 1)
  out = np.zeros((len(arrays), n, *arrays[0].shape[1:]), dtype)
  for i, a in enumerate(arrays):
    out[i, : len(a)] = a
  return out, np.array([len(a) for a in arrays], np.int32)


def make_encoders(graphdef):
  """Jitted encoders: frames -> [V, T, d], (frame feats, mask) -> videos [V, d], text -> [N, d]."""

  @jax.jit
  def video(state, frame_feats, mask):
    return nnx.merge(graphdef, state).video(frame_feats, mask)

  return device.make_encode_frames(graphdef), video, device.make_encode_text(graphdef)


def device_features(encoders, enc_state, dataset, dev: int, split: str):
  """Frozen features of one device split: (valid frames [M, d], videos [V, d], questions [N_q, d],
  captions [N_c, d], the ``DomainData``)."""
  enc_frames, enc_video, enc_text = encoders
  dom = dataset.domain(dev, split)
  frames, questions, captions = experiment.encode_domain(enc_frames, enc_text, enc_state, dom)
  # numpy in: ``jnp.asarray`` on a numpy array compiles a program per shape.
  videos = np.asarray(enc_video(enc_state, frames, np.asarray(dom.frame_mask)))
  d = frames.shape[-1]
  empty = np.zeros((0, d), np.float32)
  questions = empty if questions is None else questions
  captions = empty if captions is None else captions
  return frames[dom.frame_mask], videos, questions, captions, dom


def build_bank(config, dataset, graphdef, enc_state, devices) -> Bank:
  """The frozen features of meta-training ``devices`` (held-out devices raise ``ValueError``)."""
  devices = dataset.check_meta_train(devices)
  encoders = make_encoders(graphdef)
  cols = {
    k: [] for k in ("pool", "pool_text", "video", "question", "answers", "qv", "caption", "cv")
  }
  for dev in devices:
    pool, _, pool_text, _, _ = device_features(encoders, enc_state, dataset, int(dev), "pool")
    _, video, question, caption, dom = device_features(
      encoders, enc_state, dataset, int(dev), "train"
    )
    for k, v in (
      ("pool", pool),
      ("pool_text", pool_text),
      ("video", video),
      ("question", question),
      ("answers", dom.answers),
      ("qv", dom.question_video),
      ("caption", caption),
      ("cv", dom.caption_video),
    ):
      cols[k].append(v)
  pool, pool_count = _pad(cols["pool"], np.float32)
  pool_text, pool_text_count = _pad(cols["pool_text"], np.float32)
  video, _ = _pad(cols["video"], np.float32)
  question, question_count = _pad(cols["question"], np.float32)
  answers, _ = _pad(cols["answers"], np.int32)
  qv, _ = _pad(cols["qv"], np.int32)
  caption, caption_count = _pad(cols["caption"], np.float32)
  cv, _ = _pad(cols["cv"], np.int32)
  return Bank(
    devices=devices,
    pool=pool,
    pool_count=pool_count,
    pool_text=pool_text,
    pool_text_count=pool_text_count,
    video=video,
    question=question,
    answers=answers,
    question_video=qv,
    question_count=question_count,
    caption=caption,
    caption_video=cv,
    caption_count=caption_count,
  )


def adr_features(pool, key, *, selector: str, k: int, weighting: str, iters: int, samples: int):
  """What the FDA sees of one pool [M, d] under a selector (traceable; no gradient flows).

  ``gaussian`` fits the G = k component summary on the device and draws ``samples``
  pseudo-features in the cloud; ``all`` is every frame with uniform weights.

  Returns:
    (features [K', d], weights [K']).
  """
  pool = jax.lax.stop_gradient(pool)
  if selector == "all":
    return pool, jnp.full(pool.shape[0], 1.0 / pool.shape[0])
  k_sel, k_sample = jax.random.split(key)
  if selector == "gaussian":
    means, stds, w = adr.gaussian_summary_jax(pool, k, k_sel)
    return adr.sample_summary_jax(means, stds, w, samples, k_sample)
  idx, w = adr.select_jax(pool, k, selector, k_sel, weighting=weighting, kmedoids_iters=iters)
  return pool[idx], w


def _episode(bank, pos, key, *, pool_size, query, text_anchors):
  """One device's episode: a random pool subset and a labeled query batch (indices in bank)."""
  k_pool, k_q, k_c, k_t = jax.random.split(key, 4)
  m = bank["pool"].shape[1]
  # Random order of the valid pool frames (padding rows sort last).
  order = jnp.argsort(
    jax.random.uniform(k_pool, (m,)) + 2.0 * (jnp.arange(m) >= bank["pool_count"][pos])
  )
  pool = bank["pool"][pos][order[:pool_size]]
  qi = jax.random.randint(k_q, (query,), 0, jnp.maximum(bank["question_count"][pos], 1))
  ci = jax.random.randint(k_c, (query,), 0, jnp.maximum(bank["caption_count"][pos], 1))
  batch = {
    "q_video": bank["video"][pos][bank["question_video"][pos][qi]],
    "question": bank["question"][pos][qi],
    "answers": bank["answers"][pos][qi],
    "c_video": bank["video"][pos][bank["caption_video"][pos][ci]],
    "caption": bank["caption"][pos][ci],
  }
  ti = jax.random.randint(
    k_t, (max(text_anchors, 1),), 0, jnp.maximum(bank["pool_text_count"][pos], 1)
  )
  return pool, batch, bank["pool_text"][pos][ti]


def meta_train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs meta-training; returns the final logged record.

  Raises:
    ConfigError: a bad config, no intact ``pretrain.npz``, no intact checkpoint to resume from;
      raised before anything is written.
  """
  experiment.validate(config)
  experiment.require_pretrained(workdir)  # before the dataset is built
  dataset = experiment.build_dataset(config)
  spec, graphdef, enc_state, head = experiment.load_pretrained(workdir, config, dataset)
  fspec = experiment.fda_spec(config)
  meta = config.cdc.meta
  query = config.batch_size // meta.devices_per_step
  pool_size = meta.pool_videos * config.data.num_frames
  bank = build_bank(config, dataset, graphdef, enc_state, dataset.meta_train_devices)
  _check_bank(bank, config, pool_size)
  logging.info(
    "meta-train: %d devices, pool %d frames, %d queries each", len(bank.devices), pool_size, query
  )

  fda = models.FDA(spec, fspec, head, rngs=nnx.Rngs(config.seed + 2))
  fda_graphdef, params = nnx.split(fda, nnx.Param)
  o = config.optimizer
  tx = experiment.make_optimizer(o.learning_rate, o.warmup_steps, o.grad_clip_norm, o.b1, o.b2)
  opt_state = tx.init(params)
  step = _make_meta_step(
    config, spec, fspec, head, fda_graphdef, tx, bank.arrays(), pool_size=pool_size, query=query
  )
  params, rec = _train_loop(config, workdir, step, params, opt_state, len(bank.devices))
  experiment.save_npz(os.path.join(workdir, "fda.npz"), params, step=config.total_steps)
  experiment.remove_checkpoint(os.path.join(workdir, "train_ckpt.npz"))
  return rec


def _check_bank(bank: Bank, config, pool_size: int) -> None:
  """Raises ``ConfigError`` when the bank cannot fill an episode or a meta-batch."""
  meta = config.cdc.meta
  if bank.pool_count.min() < pool_size:
    raise ConfigError(
      "cdc.meta.pool_videos",
      meta.pool_videos,
      f"a device has {bank.pool_count.min()} pool frames < cdc.meta.pool_videos * num_frames = "
      f"{pool_size}",
    )
  if len(bank.devices) < meta.devices_per_step:
    raise ConfigError(
      "cdc.meta.devices_per_step",
      meta.devices_per_step,
      f"> {len(bank.devices)} meta-train devices",
    )


def _make_meta_step(config, spec, fspec, head, fda_graphdef, tx, arrays, *, pool_size, query):
  """The jitted meta-training update ``(params, opt_state, positions, key) -> (params, opt_state,
  loss, parts)``.

  One update: per bank row in ``positions`` (int32 [devices_per_step]) an episode (``_episode``),
  its ADR selection (``adr_features``), the FDA's generated head, and the task loss of that head
  on the episode's queries; the gradient reaches the FDA only (its base too with
  ``cdc.fda.train_base``). ``arrays`` is ``Bank.arrays()``, closed over.
  """
  a, meta, f = config.cdc.adr, config.cdc.meta, config.cdc.fda
  base_names = {n.replace("/", "__") for n in fspec.generated_names(spec)}
  train_base = bool(f.train_base)
  select = functools.partial(
    adr_features,
    selector=a.selector,
    k=a.num_anchors,
    weighting=a.weighting,
    iters=a.kmedoids_iters,
    samples=a.summary_samples,
  )
  episode = functools.partial(
    _episode, pool_size=pool_size, query=query, text_anchors=a.text_anchors
  )
  weights = dict(
    qa_weight=meta.qa_weight, retrieval_weight=meta.retrieval_weight, temperature=meta.temperature
  )

  def loss_fn(params, positions, key):
    keys = jax.random.split(key, positions.shape[0])
    pools, batches, texts = jax.vmap(episode, in_axes=(None, 0, 0))(arrays, positions, keys)
    feats, w = jax.vmap(select)(pools, jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))
    fda = nnx.merge(fda_graphdef, params)
    theta = fda(feats, w, texts if fspec.text_context else None)
    full = {n: jnp.broadcast_to(v, (positions.shape[0], *v.shape)) for n, v in head.items()}
    theta = {**full, **theta}
    loss, parts = jax.vmap(functools.partial(objectives.head_loss, **weights))(theta, batches)
    total = jnp.mean(loss)
    if f.delta_l2:
      base = fda.base()
      total += f.delta_l2 * sum(jnp.mean((theta[n] - base[n]) ** 2) for n in base)
    return total, {k: jnp.mean(v) for k, v in parts.items()}

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, positions, key):
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, positions, key)
    if not train_base:
      grads = _zero_base(grads, base_names)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, parts

  return step


def _train_loop(config, workdir: str, step, params, opt_state, num_devices: int):
  """Steps from the newest intact checkpoint (or 0) to ``total_steps``: logs, checkpoints.

  Each step's meta-batch (``devices_per_step`` of the ``num_devices`` bank rows) and key are
  functions of ``(seed, step)``, so a resumed run takes the steps an uninterrupted one would.

  Returns:
    (the final params, the last logged record).
  """
  meta = config.cdc.meta
  ckpt = os.path.join(workdir, "train_ckpt.npz")
  start = 0
  restored = experiment.restore_checkpoint(ckpt, (params, opt_state))
  if restored is not None:
    (params, opt_state), start = restored
    logging.info("meta-train: resumed at step %d", start)
  experiment.write_config(workdir, config, "train_config.json")
  log_path = os.path.join(workdir, "train_metrics.jsonl")
  truncate_jsonl(log_path, start)  # a fresh run keeps nothing of an earlier one
  log = open(log_path, "a")  # appended record by record on purpose: cut back on resume
  t0, rec = time.time(), {}
  for s in range(start + 1, config.total_steps + 1):
    rng = np.random.default_rng([config.seed, 11, s])
    positions = rng.choice(num_devices, meta.devices_per_step, replace=False).astype(np.int32)
    key = jax.random.fold_in(jax.random.key(config.seed), s)
    params, opt_state, loss, parts = step(params, opt_state, positions, key)
    if s % config.log_every_steps == 0 or s == config.total_steps:
      rec = {"step": s, "loss": float(loss), **{k: float(v) for k, v in parts.items()}}
      rec["seconds"] = time.time() - t0
      if not np.isfinite(rec["loss"]):
        raise FloatingPointError(f"meta-train: non-finite loss at step {s}: {rec}")
      log.write(json.dumps(rec) + "\n")
      log.flush()
      logging.info("meta-train %s", rec)
    if s % config.ckpt_every_steps == 0 and s < config.total_steps:
      experiment.save_checkpoint(ckpt, (params, opt_state), step=s)
  log.close()
  return params, rec


def _zero_base(grads, base_names):
  def zero(path, g):
    keys = [str(getattr(p, "key", p)) for p in path]
    return jnp.zeros_like(g) if "base" in keys and any(n in keys for n in base_names) else g

  return jax.tree_util.tree_map_with_path(zero, grads)


def load_fda(workdir: str, config, dataset, spec, head):
  """(graphdef, params) of the meta-trained FDA in ``workdir``.

  Raises:
    ConfigError: no intact ``fda.npz`` of this config in ``workdir``.
  """
  # Shapes only (as ``experiment.load_pretrained``): every parameter is read from the file.
  fda = nnx.eval_shape(
    lambda: models.FDA(spec, experiment.fda_spec(config), head, rngs=nnx.Rngs(0))
  )
  graphdef, params = nnx.split(fda, nnx.Param)
  params, _ = experiment.load_result(workdir, "fda.npz", "cdc.train", params)
  return graphdef, params


if __name__ == "__main__":
  from common.train import cli

  cli.config_workdir_binary(meta_train, workdir_help="Output directory.")
