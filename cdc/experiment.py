"""What the cdc binaries share: data and model specs from a config, npz checkpoints, encoding.

Checkpoints are numpy ``.npz`` files (flat ``path -> array``) plus ``config.json``: the states are
small (< 10 MB), single-host, and have no data iterator to save (every batch is a function of
``(seed, step)``), which is what ``common.checkpoint`` (orbax + a grain iterator) is built around.
A checkpoint at step N holds the state after N updates; a resumed run continues at N + 1 and
reads the batches an uninterrupted one would.

Faults (issue 19). Every npz is written atomically with a sha256 per array
(``common.fileio.save_npz_checked``) and read back through ``read_npz``: checksums verified, float
arrays finite. A training checkpoint ``<name>.npz`` keeps the one before it as ``<name>.prev.npz``:
``save_checkpoint`` writes the new one to ``<name>.next.npz``, reads it back intact, and only then
rotates (old -> ``.prev``, new -> ``<name>.npz``). ``restore_checkpoint`` takes the newest intact of
the two, with one warning line naming a damaged or missing newer one (a damaged file is set aside
as ``<name>.damaged.npz``, so the next rotation keeps the intact one); none intact is a
``ConfigError`` naming both files (exit 2). ``validate`` checks every field of ``configs/cdc.py`` the
binaries use before anything is read or written.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from cdc import adr, feature_benchmark, models, moving_shapes
from cdc import data as cdc_data
from common import fileio
from common.train.validate import (
  ConfigError,
  boolean,
  each,
  integer,
  number,
  require,
  require_choice,
)


def build_dataset(config: ml_collections.ConfigDict):
  """``cdc.moving_shapes.MovingShapes`` or ``cdc.feature_benchmark.FeatureBenchmark`` of
  ``config.data``.

  Raises:
    ConfigError: the data cannot be built from the config (a bad field, missing feature files).
  """
  try:
    if config.data.name == "moving_shapes":
      return moving_shapes.MovingShapes.from_config(config.data)
    if config.data.name == "features":
      return feature_benchmark.FeatureBenchmark(
        config.data.data_dir,
        num_heldout=config.data.num_heldout,
        split_seed=config.data.split_seed,
        source_domains=tuple(config.data.source_domains),
      )
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError("data", config.data.name, _one_line(e)) from None
  raise ConfigError("data.name", config.data.name, "allowed: moving_shapes, features")


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())


# -------------------------------------------------------------------------------------------------
# Start-up validation.

SELECTORS = adr.SELECTORS + ("gaussian",)  # what a device can run (cdc.adr.selector, eval arms)
WIRE_DTYPES = ("float32", "float16")


def _ints(config, lo: int, *fields: str) -> None:
  for f in fields:
    require(config, f, integer(lo), f"must be an integer >= {lo}")


def _bools(config, *fields: str) -> None:
  for f in fields:
    require(config, f, boolean, "must be true or false")


def _validate_run(config) -> None:
  """The shared keys cdc uses and ``optimizer.*`` (the FDA's Adam)."""
  _ints(config, 0, "seed", "total_steps")
  _ints(config, 1, "batch_size", "log_every_steps", "ckpt_every_steps", "keep_checkpoints")
  require_choice(config, "optimizer.name", ("adam",))
  require(config, "optimizer.learning_rate", number(lambda v: v > 0), "must be > 0")
  _ints(config, 0, "optimizer.warmup_steps")
  require(config, "optimizer.grad_clip_norm", number(lambda v: v >= 0), "must be >= 0 (0: off)")
  for b in ("optimizer.b1", "optimizer.b2"):
    require(config, b, number(lambda v: 0 <= v < 1), "must be in [0, 1)")


def _validate_data_and_model(config) -> None:
  name = require_choice(config, "data.name", ("moving_shapes", "features"))
  d = config.data
  if name == "moving_shapes":
    from common.data import shapes

    lo = shapes.MIN_RESOLUTION
    require(config, "data.resolution", integer(lo), f"must be an integer >= {lo}")
    require(config, "data.num_frames", integer(2), "must be an integer >= 2 (motion)")
    require(config, "data.num_devices", integer(3), "must be an integer >= 3")
    _ints(config, 0, "data.split_seed", "data.dataset_seed")
    require(
      config,
      "data.num_heldout",
      integer(2, d.num_devices - 1),
      f"must be an integer in [2, data.num_devices - 1 = {d.num_devices - 1}] (cdc.evaluate's "
      "drift demo switches between two held-out devices)",
    )
    n_words = len(moving_shapes.COUNT_WORDS)
    require(
      config, "data.max_objects", integer(1, n_words), f"must be an integer in [1, {n_words}]"
    )
    require(
      config, "data.object_radius", number(lambda v: 0.05 <= v <= 0.3), "must be in [0.05, 0.3]"
    )
    require(
      config,
      "data.shape_names",
      lambda v: len(set(v)) == len(v) >= 3 and set(v) <= set(shapes.SHAPES),
      f"need >= 3 distinct names from {shapes.SHAPES}",
    )
    require(config, "data.shift_scale", number(lambda v: v >= 0), "must be >= 0")
    _ints(config, 1, *(f"data.{k}" for k in ("pool_videos", "train_videos", "test_videos")))
    _ints(config, 1, "data.source_train_videos", "data.source_test_videos")
  else:
    require(config, "data.data_dir", lambda v: os.path.isdir(v), "must be an existing directory")
    _ints(config, 1, "data.num_heldout", "data.num_frames")
    _ints(config, 0, "data.split_seed")
    require(
      config, "data.source_domains", each(integer(0), nonempty=False), "must be integers >= 0"
    )
  frames, text = ("pixels", "tokens") if name == "moving_shapes" else ("features", "features")
  for field, want in (("model.frame_input", frames), ("model.text_input", text)):
    require(config, field, lambda v, want=want: v == want, f"must be {want} for data.name={name}")
  if name == "moving_shapes":
    require(
      config,
      "model.conv_channels",
      lambda v: len(v) == 3 and all(map(integer(1), v)),
      "must be 3 integers >= 1",
    )
  _ints(config, 1, *(f"model.{k}" for k in ("dim", "fusion_hidden", "fusion_out", "proj_dim")))


def _validate_fda_adr(config) -> None:
  f = config.cdc.fda
  require(
    config,
    "cdc.fda.generated",
    each(lambda v: v in models.HEAD_LAYERS),
    f"must be a non-empty subset of {', '.join(models.HEAD_LAYERS)}",
  )
  require(config, "cdc.fda.generated", lambda v: len(set(v)) == len(v), "must not repeat a name")
  _ints(config, 1, "cdc.fda.set_hidden", "cdc.fda.z_dim")
  _ints(config, 0, "cdc.fda.rank")
  require_choice(config, "cdc.fda.set_pool", models.SET_POOLS)
  _bools(config, "cdc.fda.text_context", "cdc.fda.zero_init", "cdc.fda.train_base")
  require(config, "cdc.fda.residual_scale_init", number(), "must be a finite number")
  require(config, "cdc.fda.delta_l2", number(lambda v: v >= 0), "must be >= 0 (0: off)")
  require_choice(config, "cdc.adr.selector", SELECTORS)
  pool = config.cdc.meta.pool_videos * config.data.num_frames
  require(
    config,
    "cdc.adr.num_anchors",
    integer(1, pool),
    f"must be an integer in [1, cdc.meta.pool_videos * data.num_frames = {pool}]",
  )
  require_choice(config, "cdc.adr.weighting", adr.WEIGHTINGS)
  _ints(config, 1, "cdc.adr.kmedoids_iters", "cdc.adr.summary_samples")
  _ints(config, 1 if f.text_context else 0, "cdc.adr.text_anchors")
  for k in ("uplink_dtype", "downlink_dtype"):
    require_choice(config, f"cdc.adr.{k}", WIRE_DTYPES)


def _validate_meta(config) -> None:
  m, d = config.cdc.meta, config.data
  per_step = require(config, "cdc.meta.devices_per_step", integer(1), "must be an integer >= 1")
  if d.name == "moving_shapes" and per_step > d.num_devices - d.num_heldout:
    raise ConfigError(
      "cdc.meta.devices_per_step",
      per_step,
      f"must be <= the {d.num_devices - d.num_heldout} meta-train devices "
      "(data.num_devices - data.num_heldout)",
    )
  if config.batch_size % per_step:
    raise ConfigError(
      "batch_size",
      config.batch_size,
      f"must be a multiple of cdc.meta.devices_per_step={per_step} (queries per device)",
    )
  hi = d.pool_videos if d.name == "moving_shapes" else float("inf")
  require(
    config,
    "cdc.meta.pool_videos",
    integer(1, hi),
    "must be an integer >= 1"
    + (f" and <= data.pool_videos={hi}" if d.name == "moving_shapes" else ""),
  )
  for k in ("qa_weight", "retrieval_weight"):
    require(config, f"cdc.meta.{k}", number(lambda v: v >= 0), "must be >= 0")
  if not m.qa_weight and not m.retrieval_weight:
    raise ConfigError("cdc.meta.qa_weight", m.qa_weight, "and retrieval_weight are both 0")
  require(config, "cdc.meta.temperature", number(lambda v: v > 0), "must be > 0")


def _validate_pretrain_finetune_eval(config) -> None:
  _ints(config, 1, "cdc.pretrain.steps", "cdc.pretrain.batch_size")
  require(config, "cdc.pretrain.learning_rate", number(lambda v: v > 0), "must be > 0")
  _ints(config, 0, "cdc.pretrain.warmup_steps")
  require(config, "cdc.finetune.shots", each(integer(1), nonempty=False), "must be integers >= 1")
  _ints(config, 1, *(f"cdc.finetune.{k}" for k in ("steps", "batch_size", "oracle_steps")))
  require(config, "cdc.finetune.learning_rate", number(lambda v: v > 0), "must be > 0")
  require(
    config, "cdc.eval.selectors", each(lambda v: v in SELECTORS), "allowed: " + ", ".join(SELECTORS)
  )
  require(config, "cdc.eval.anchor_counts", each(integer(1)), "a non-empty list of integers >= 1")
  require(config, "cdc.eval.link_mbps", number(lambda v: v > 0), "must be > 0")
  require(config, "cdc.eval.drift_threshold", number(lambda v: v >= 0), "must be >= 0")
  windows = require(config, "cdc.eval.drift_windows", integer(2), "must be an integer >= 2")
  require(
    config,
    "cdc.eval.drift_switch_at",
    integer(1, windows - 1),
    f"must be an integer in [1, cdc.eval.drift_windows - 1 = {windows - 1}]",
  )
  _ints(config, 1, "cdc.eval.drift_window_videos")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field of ``configs/cdc.py`` that the cdc binaries use, before anything is read
  or written.

  Raises:
    ConfigError: the first bad field (one line naming it, the value and what is allowed).
  """
  _validate_run(config)
  _validate_data_and_model(config)
  _validate_meta(config)
  _validate_fda_adr(config)
  _validate_pretrain_finetune_eval(config)


def model_spec(config: ml_collections.ConfigDict, dataset) -> models.ModelSpec:
  """The device model's sizes; vocabulary, answers and feature widths come from the data."""
  m = config.model
  kw = dict(
    frame_input=m.frame_input,
    conv_channels=tuple(m.conv_channels),
    text_input=m.text_input,
    dim=m.dim,
    fusion_hidden=m.fusion_hidden,
    fusion_out=m.fusion_out,
    proj_dim=m.proj_dim,
  )
  if config.data.name == "moving_shapes":
    if m.frame_input != "pixels" or m.text_input != "tokens":
      raise ValueError(
        "data.name='moving_shapes' needs model.frame_input=pixels, text_input=tokens"
      )
    return models.ModelSpec(
      resolution=dataset.resolution,
      vocab_size=len(dataset.vocab.tokens),
      num_answers=len(dataset.vocab.answers),
      **kw,
    )
  split = dataset.train
  text = split.question_features if split.question_features is not None else split.caption_features
  if m.frame_input != "features" or m.text_input != "features":
    raise ValueError("data.name='features' needs model.frame_input=features, text_input=features")
  return models.ModelSpec(
    frame_feature_dim=int(split.frame_features.shape[-1]),
    text_feature_dim=int(text.shape[-1]),
    num_answers=max(len(dataset.answer_vocab), 1),
    **kw,
  )


def fda_spec(config: ml_collections.ConfigDict) -> models.FDASpec:
  """The FDA's options from ``config.cdc.fda``."""
  f = config.cdc.fda
  return models.FDASpec(
    generated=tuple(f.generated),
    set_hidden=f.set_hidden,
    z_dim=f.z_dim,
    set_pool=f.set_pool,
    text_context=f.text_context,
    rank=f.rank,
    residual_scale_init=f.residual_scale_init,
    zero_init=f.zero_init,
  )


def make_optimizer(
  learning_rate: float, warmup_steps: int, clip: float, b1: float = 0.9, b2: float = 0.999
):
  """Adam (b1, b2) with linear warm-up and optional global-norm clipping."""
  schedule = (
    optax.join_schedules(
      [
        optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
        optax.constant_schedule(learning_rate),
      ],
      [max(warmup_steps, 1)],
    )
    if warmup_steps > 0
    else learning_rate
  )
  tx = optax.adam(schedule, b1=b1, b2=b2)
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


# -------------------------------------------------------------------------------------------------
# npz checkpoints.


def _key_str(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
  return "/".join(parts)


def flatten(tree: Any) -> dict[str, np.ndarray]:
  """A pytree as ``{"a/b/c": array}`` (PRNG keys as their raw data)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    out[_key_str(path)] = np.asarray(leaf)
  return out


def unflatten(like: Any, arrays: dict[str, np.ndarray], source: str) -> Any:
  """Fills the structure of ``like`` with ``arrays`` (from ``flatten``), checking names/shapes.

  Raises:
    ValueError: naming the first missing or mis-shaped entry.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  out = []
  for path, leaf in leaves:
    name = _key_str(path)
    if name not in arrays:
      raise ValueError(f"{source}: no array {name!r}; written by a different model or config")
    a = arrays[name]
    if tuple(a.shape) != tuple(np.shape(leaf)):
      raise ValueError(f"{source}: {name!r} has shape {a.shape}, the model {np.shape(leaf)}")
    out.append(jnp.asarray(a, dtype=leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def save_npz(path: str, tree: Any, **meta) -> None:
  """Atomically writes ``flatten(tree)`` (+ scalar ``meta``) to ``path``, with checksums."""
  arrays = flatten(tree)
  arrays.update({f"__meta__/{k}": np.asarray(v) for k, v in meta.items()})
  fileio.save_npz_checked(path, **arrays)


def read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of a ``save_npz`` file, each checked against its sha256, float arrays finite.

  Raises:
    fileio.DamagedFileError: naming the file and what failed (unreadable, a checksum, NaN/inf).
  """
  arrays = fileio.load_npz_checked(path)
  for k, a in sorted(arrays.items()):
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
      raise fileio.DamagedFileError(f"{path}: array {k!r} has non-finite values")
  return arrays


def _split_meta(arrays: dict[str, np.ndarray]) -> dict:
  return {
    k.split("/", 1)[1]: arrays.pop(k).item() for k in list(arrays) if k.startswith("__meta__/")
  }


def load_npz(path: str, like: Any) -> tuple[Any, dict]:
  """(the tree of ``like`` read from ``path``, its ``meta``); ``read_npz``'s checks first."""
  arrays = read_npz(path)
  meta = _split_meta(arrays)
  return unflatten(like, arrays, path), meta


def prev_path(path: str) -> str:
  """``<name>.prev.npz``: the checkpoint ``save_checkpoint`` kept before ``<name>.npz``."""
  return fileio.rotated_paths(path)[1]


def checkpoint_files(path: str) -> tuple[str, str, str]:
  """Every file of the checkpoint ``path``: itself, the previous one, a staged next one."""
  return fileio.rotated_paths(path)


def save_checkpoint(path: str, tree: Any, step: int) -> None:
  """Writes the checkpoint at ``step``; the one it replaces is kept as ``prev_path(path)``
  (``fileio.save_npz_rotated``: staged, read back intact, then rotated)."""
  arrays = flatten(tree)
  arrays["__meta__/step"] = np.asarray(step)
  fileio.save_npz_rotated(path, read_npz, **arrays)


def restore_checkpoint(path: str, like: Any) -> tuple[Any, int] | None:
  """(the tree of ``like``, its step) from the newest intact of ``path`` and ``prev_path(path)``.

  A damaged or missing newer file costs one warning line naming it and what failed. Returns None
  when neither file exists (a fresh run).

  Raises:
    ConfigError: files exist but none is intact (the message names each and what failed), or an
      intact one was written by another model or config.
  """
  try:
    found = fileio.newest_intact_npz(path, read_npz)
  except fileio.NoIntactFileError as e:
    raise ConfigError(
      "--workdir", os.path.dirname(path), f"{e} (delete them to start over)"
    ) from None
  if found is None:
    return None
  used, arrays, failures = found
  meta = _split_meta(arrays)
  try:
    tree, step = unflatten(like, arrays, used), int(meta["step"])
  except (ValueError, KeyError) as e:
    raise ConfigError("--workdir", os.path.dirname(used), _one_line(e)) from None
  if failures:
    damaged = any(not f.endswith(": missing") for f in failures)
    logging.warning(
      "checkpoint %s; resuming from %s (step %d)%s",
      "; ".join(failures),
      used,
      step,
      " (the damaged file is kept as *.damaged.npz)" if damaged else "",
    )
  return tree, step


def remove_checkpoint(path: str) -> None:
  """Deletes every file of the checkpoint ``path`` (a finished run)."""
  for p in checkpoint_files(path):
    if os.path.exists(p):
      os.remove(p)


def write_config(workdir: str, config: ml_collections.ConfigDict, name: str = "config.json"):
  """Writes the resolved config as JSON into ``workdir`` (atomically)."""
  fileio.write_text(os.path.join(workdir, name), config.to_json(indent=2))


def read_config(workdir: str, name: str = "config.json") -> ml_collections.ConfigDict:
  """The config a binary wrote into ``workdir``.

  Raises:
    ConfigError: it is not there or not readable (the binaries print one line and exit 2).
  """
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    raise ConfigError("--workdir", workdir, f"holds no {name}: run cdc.pretrain / cdc.train first")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise ConfigError("--workdir", workdir, f"{name} is unreadable: {_one_line(e)}") from None


# -------------------------------------------------------------------------------------------------
# The pretrained (frozen) device model.


def new_encoders(spec: models.ModelSpec, seed: int) -> models.Encoders:
  """Freshly initialised encoders."""
  return models.Encoders(spec, rngs=nnx.Rngs(seed))


PRETRAIN_NPZ = "pretrain.npz"


def require_pretrained(workdir: str) -> str:
  """The path of ``<workdir>/pretrain.npz``.

  Raises:
    ConfigError: it does not exist (the binaries print one line and exit 2).
  """
  return _require(workdir, PRETRAIN_NPZ, "cdc.pretrain")


def _require(workdir: str, name: str, binary: str) -> str:
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    raise ConfigError("--workdir", workdir, f"holds no {name}: run python -m {binary} on it first")
  return path


def load_result(workdir: str, name: str, binary: str, like: Any) -> tuple[Any, dict]:
  """``load_npz`` of a binary's final output ``<workdir>/<name>`` (``pretrain.npz``, ``fda.npz``).

  Raises:
    ConfigError: missing, damaged (checksum, torn, non-finite) or of another model; the message
      names the file and says which binary writes it again.
  """
  path = _require(workdir, name, binary)
  try:
    return load_npz(path, like)
  except ValueError as e:  # DamagedFileError, or a shape / name mismatch
    raise ConfigError("--workdir", workdir, f"{_one_line(e)}: rerun python -m {binary}") from None


def load_pretrained(workdir: str, config, dataset):
  """(spec, encoders graphdef, encoders state, pretrained head) from ``<workdir>/pretrain.npz``.

  Raises:
    ConfigError: no intact ``pretrain.npz`` of this model in ``workdir``.
  """
  require_pretrained(workdir)
  spec = model_spec(config, dataset)
  # Shapes only, every leaf is read from the file: a real initialisation would compile and run
  # dozens of small random-init programs for nothing.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: new_encoders(spec, 0)))
  head = jax.eval_shape(lambda: models.init_head(spec, jax.random.key(0)))
  (state, head), _ = load_result(workdir, PRETRAIN_NPZ, "cdc.pretrain", (state, head))
  return spec, graphdef, state, head


def encode_domain(encode_frames, encode_text, state, dom: cdc_data.DomainData, chunk: int = 256):
  """Frozen features of a domain: frame features [V, T, d], questions [N_q, d], captions [N_c, d].

  Encoded in chunks of ``chunk`` videos / texts to bound memory.
  """

  def chunks(fn, *arrays):
    n = len(arrays[0])
    if n == 0:
      return None
    outs = [
      np.asarray(fn(state, *(np.asarray(a[i : i + chunk]) for a in arrays)))
      for i in range(0, n, chunk)
    ]
    return np.concatenate(outs)

  frames = chunks(encode_frames, dom.frames)
  questions = chunks(encode_text, dom.questions, dom.question_mask)
  captions = chunks(encode_text, dom.captions, dom.caption_mask)
  return frames, questions, captions
