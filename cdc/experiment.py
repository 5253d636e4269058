"""What the cdc binaries share: data and model specs from a config, npz checkpoints, encoding.

Checkpoints are numpy ``.npz`` files (flat ``path -> array``) plus ``config.json``: the states are
small (< 10 MB), single-host, and have no data iterator to save (every batch is a function of
``(seed, step)``), which is what ``common.checkpoint`` (orbax + a grain iterator) is built around.
A checkpoint at step N holds the state after N updates; a resumed run continues at N + 1 and
reads the batches an uninterrupted one would.
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
from flax import nnx

from cdc import data as cdc_data
from cdc import models


def build_dataset(config: ml_collections.ConfigDict):
  """``cdc.data.MovingShapes`` or ``cdc.data.FeatureBenchmark`` of ``config.data``."""
  if config.data.name == "moving_shapes":
    return cdc_data.MovingShapes.from_config(config.data)
  if config.data.name == "features":
    return cdc_data.FeatureBenchmark(
      config.data.data_dir,
      num_heldout=config.data.num_heldout,
      split_seed=config.data.split_seed,
      source_domains=tuple(config.data.source_domains),
    )
  raise ValueError(f"data.name={config.data.name!r}; allowed: moving_shapes, features")


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
  """Atomically writes ``flatten(tree)`` (+ scalar ``meta``) to ``path``."""
  arrays = flatten(tree)
  arrays.update({f"__meta__/{k}": np.asarray(v) for k, v in meta.items()})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_npz(path: str, like: Any) -> tuple[Any, dict]:
  """(the tree of ``like`` read from ``path``, its ``meta``)."""
  with np.load(path, allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  meta = {
    k.split("/", 1)[1]: arrays.pop(k).item() for k in list(arrays) if k.startswith("__meta__/")
  }
  return unflatten(like, arrays, path), meta


def write_config(workdir: str, config: ml_collections.ConfigDict, name: str = "config.json"):
  """Writes the resolved config as JSON into ``workdir``."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, name), "w") as f:
    f.write(config.to_json(indent=2))


def read_config(workdir: str, name: str = "config.json") -> ml_collections.ConfigDict:
  """The config a binary wrote into ``workdir``.

  Raises:
    ConfigError: it is not there (the binaries print one line and exit 2).
  """
  from common.train.validate import ConfigError

  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    raise ConfigError("--workdir", workdir, f"holds no {name}: run cdc.pretrain / cdc.train first")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


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
  from common.train.validate import ConfigError

  path = os.path.join(workdir, PRETRAIN_NPZ)
  if not os.path.exists(path):
    raise ConfigError(
      "--workdir", workdir, f"holds no {PRETRAIN_NPZ}: run python -m cdc.pretrain on it first"
    )
  return path


def load_pretrained(workdir: str, config, dataset):
  """(spec, encoders graphdef, encoders state, pretrained head) from ``<workdir>/pretrain.npz``.

  Raises:
    ConfigError: no ``pretrain.npz`` in ``workdir``.
  """
  path = require_pretrained(workdir)
  spec = model_spec(config, dataset)
  graphdef, state = nnx.split(new_encoders(spec, 0))
  head = models.init_head(spec, jax.random.key(0))
  (state, head), _ = load_npz(path, (state, head))
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
      np.asarray(fn(state, *(jnp.asarray(a[i : i + chunk]) for a in arrays)))
      for i in range(0, n, chunk)
    ]
    return np.concatenate(outs)

  frames = chunks(encode_frames, dom.frames)
  questions = chunks(encode_text, dom.questions, dom.question_mask)
  captions = chunks(encode_text, dom.captions, dom.caption_mask)
  return frames, questions, captions
