"""Small CNN classifiers whose penultimate layer is the FID/KID/precision-recall feature space.

The repo's embedded datasets (digits 8x8x1, shapes 32x32x3) are far from ImageNet, so Inception
features would measure mostly resampling artefacts. Instead each dataset gets a tiny classifier
trained by ``common.metrics.train_feature_net``; its 128-wide ``features`` layer is the embedding.

The weights live in ``common/metrics/weights/<name>.npz`` next to ``<name>.json`` (sha256,
held-out accuracy, the training command). Both are written together by the trainer, so a
retrain cannot leave a stale hash behind. ``load_feature_net`` refuses a file whose sha256 differs
from the JSON record: a metric computed with other weights is not comparable with recorded ones.

Typical use::

  net = load_feature_net('digits')
  feats = net.extract_features(images)   # images float32 [N, R, R, C] in [-1, 1] -> [N, 128]
"""

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Mapping

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from common import fileio

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
FEATURE_DIM = 128


@dataclasses.dataclass(frozen=True)
class FeatureNetSpec:
  """Architecture and provenance of one feature network.

  ``sha256`` / ``accuracy`` / ``command`` come from ``weights/<name>.json`` (None when the net
  has not been trained yet). ``widths[i]``/``strides[i]`` describe conv stage i.
  """

  name: str
  dataset: str
  resolution: int
  channels: int
  num_classes: int
  widths: tuple[int, ...]
  strides: tuple[int, ...]
  weights_path: str
  record_path: str
  sha256: str | None = None
  accuracy: float | None = None
  command: str | None = None


def _spec(name, resolution, channels, num_classes, widths, strides) -> FeatureNetSpec:
  weights_path = os.path.join(WEIGHTS_DIR, f"{name}.npz")
  record_path = os.path.join(WEIGHTS_DIR, f"{name}.json")
  record = {}
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
  return FeatureNetSpec(
    name=name,
    dataset=name,
    resolution=resolution,
    channels=channels,
    num_classes=num_classes,
    widths=widths,
    strides=strides,
    weights_path=weights_path,
    record_path=record_path,
    sha256=record.get("sha256"),
    accuracy=record.get("test_accuracy"),
    command=record.get("command"),
  )


# Native feature resolutions: digits is 8x8 at source; shapes is rendered at any size, 32 keeps
# the small shapes (half-extent 0.16 * R) several pixels wide while staying cheap on CPU.
FEATURE_NETS: dict[str, FeatureNetSpec] = {
  "digits": _spec("digits", 8, 1, 10, (32, 64, 64), (1, 2, 2)),
  "shapes": _spec("shapes", 32, 3, 6, (16, 32, 64, 64), (1, 2, 2, 2)),
}


class FeatureNet(nnx.Module):
  """conv3x3 stages (SiLU, no norm) -> global average pool -> ``features`` dense -> logits.

  No normalisation layers: the net has no batch statistics, so features of an image do not depend
  on what else is in the batch (FID must not depend on the evaluation batch size).
  """

  def __init__(self, spec: FeatureNetSpec, *, rngs: nnx.Rngs):
    chans = (spec.channels, *spec.widths)
    self.convs = nnx.List(
      [
        nnx.Conv(cin, cout, (3, 3), strides=s, padding="SAME", rngs=rngs)
        for cin, cout, s in zip(chans[:-1], chans[1:], spec.strides, strict=True)
      ]
    )
    self.features = nnx.Linear(chans[-1], FEATURE_DIM, rngs=rngs)
    self.logits = nnx.Linear(FEATURE_DIM, spec.num_classes, rngs=rngs)

  def embed(self, x: jax.Array) -> jax.Array:
    """[B, R, R, C] in [-1, 1] at the native resolution -> features [B, 128] (pre-activation)."""
    for conv in self.convs:
      x = nnx.silu(conv(x))
    return self.features(jnp.mean(x, axis=(1, 2)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, R, R, C] -> logits [B, num_classes]."""
    return self.logits(nnx.silu(self.embed(x)))


def flatten_params(model: FeatureNet) -> dict[str, np.ndarray]:
  """The model's ``nnx.Param`` pure dict flattened to ``{'convs/0/kernel': array, ...}``."""
  flat = {}

  def walk(tree, prefix):
    for k, v in tree.items():
      # nnx.List children have int keys; '/'-joined strings keep the .npz member names flat.
      path = f"{prefix}/{k}" if prefix else str(k)
      if isinstance(v, Mapping):
        walk(v, path)
      else:
        flat[path] = np.asarray(v)

  walk(nnx.to_pure_dict(nnx.state(model, nnx.Param)), "")
  return flat


def save_params(model: FeatureNet, path: str) -> str:
  """Writes the params as an .npz and returns its sha256.

  The zip is written by hand with a fixed timestamp and sorted members because ``np.savez``
  stamps the current time into the archive, which would change the hash of identical weights.
  """
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for key, value in sorted(flatten_params(model).items()):
      member = io.BytesIO()
      np.lib.format.write_array(member, np.ascontiguousarray(value, np.float32))
      info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      zf.writestr(info, member.getvalue())
  data = buf.getvalue()
  with fileio.atomic_open(path, "wb") as f:
    f.write(data)
  return hashlib.sha256(data).hexdigest()


def _resize(images: jax.Array, resolution: int) -> jax.Array:
  b, h, w, c = images.shape
  if (h, w) == (resolution, resolution):
    return images
  return jax.image.resize(images, (b, resolution, resolution, c), "linear", antialias=True)


class FeatureExtractor:
  """A loaded, frozen feature net.

  ``features``/``logits`` take one batch (jitted, compiled once per input shape);
  ``extract_features`` walks a whole array in fixed-size batches (the last is padded, so only one
  shape is ever compiled) and returns numpy. Images at any resolution are resized (bilinear,
  antialiased) to ``spec.resolution`` first.
  """

  def __init__(self, spec: FeatureNetSpec, model: FeatureNet, sha256: str):
    self.spec, self.name, self.sha256 = spec, spec.name, sha256
    self.feature_dim, self.num_classes = FEATURE_DIM, spec.num_classes
    graphdef, state = nnx.split(model)

    def run(state, images):
      net = nnx.merge(graphdef, state)
      x = _resize(jnp.asarray(images, jnp.float32), spec.resolution)
      feats = net.embed(x)
      return feats, net.logits(nnx.silu(feats))

    self._state = state
    self._run = jax.jit(run)

  def _check(self, images) -> None:
    if images.ndim != 4 or images.shape[-1] != self.spec.channels:
      raise ValueError(
        f"feature net {self.name!r} expects images [B, H, W, {self.spec.channels}], "
        f"got shape {tuple(images.shape)}"
      )

  def features(self, images) -> jax.Array:
    """float32 [B, H, W, C] in [-1, 1] -> features float32 [B, 128]."""
    self._check(images)
    return self._run(self._state, images)[0]

  def logits(self, images) -> jax.Array:
    """float32 [B, H, W, C] in [-1, 1] -> logits float32 [B, num_classes]."""
    self._check(images)
    return self._run(self._state, images)[1]

  def _batched(self, images, batch_size: int, index: int) -> np.ndarray:
    images = np.asarray(images, np.float32)
    self._check(images)
    n = len(images)
    outs = []
    for start in range(0, n, batch_size):
      chunk = images[start : start + batch_size]
      pad = batch_size - len(chunk) if n > batch_size else 0
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
      out = np.asarray(self._run(self._state, chunk)[index])
      outs.append(out[: len(out) - pad])
    if not outs:
      width = FEATURE_DIM if index == 0 else self.num_classes
      return np.zeros((0, width), np.float32)
    return np.concatenate(outs)

  def extract_features(self, images, batch_size: int = 500) -> np.ndarray:
    """float32 [N, H, W, C] in [-1, 1] -> np.float32 [N, 128], evaluated in batches."""
    return self._batched(images, batch_size, 0)

  def extract_logits(self, images, batch_size: int = 500) -> np.ndarray:
    """float32 [N, H, W, C] in [-1, 1] -> np.float32 [N, num_classes], evaluated in batches."""
    return self._batched(images, batch_size, 1)


def load_params(model: FeatureNet, arrays: Mapping[str, np.ndarray], source: str) -> None:
  """Copies flat ``arrays`` into ``model``; ValueError naming the first mismatching parameter."""
  expected = flatten_params(model)
  missing = sorted(set(expected) - set(arrays))
  extra = sorted(set(arrays) - set(expected))
  if missing or extra:
    raise ValueError(
      f"{source} does not match the FeatureNet architecture: missing parameters {missing}, "
      f"unexpected parameters {extra}"
    )
  for key, ref in expected.items():
    if arrays[key].shape != ref.shape:
      raise ValueError(
        f"{source}: parameter {key!r} has shape {arrays[key].shape}, the architecture needs "
        f"{ref.shape}"
      )
  nested: dict = {}
  for key in expected:
    node, *parts = nested, *key.split("/")
    # Back to the int keys that nnx.List uses for its children.
    parts = [int(p) if p.isdigit() else p for p in parts]
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = jnp.asarray(arrays[key], jnp.float32)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, nested)
  nnx.update(model, state)


def load_feature_net(name: str, weights_path: str | None = None) -> FeatureExtractor:
  """Loads the committed feature net ``name`` ('digits' | 'shapes').

  Args:
    name: key of ``FEATURE_NETS``.
    weights_path: alternative .npz to load; it must still hash to the recorded sha256.

  Raises:
    KeyError: unknown name.
    FileNotFoundError: weights or their JSON record missing (the message says how to train).
    ValueError: sha256 mismatch, or arrays that do not fit the architecture.
  """
  if name not in FEATURE_NETS:
    raise KeyError(f"unknown feature net {name!r}; known: {', '.join(FEATURE_NETS)}")
  spec = FEATURE_NETS[name]
  path = weights_path or spec.weights_path
  if spec.sha256 is None or not os.path.exists(path):
    raise FileNotFoundError(
      f"feature net {name!r}: missing {path} or its record {spec.record_path}; train it with "
      f"`python -m common.metrics.train_feature_net --dataset={spec.dataset}`"
    )
  with open(path, "rb") as f:
    data = f.read()
  sha = hashlib.sha256(data).hexdigest()
  if sha != spec.sha256:
    raise ValueError(
      f"feature net {name!r}: sha256 of {path} is {sha}, but {spec.record_path} records "
      f"{spec.sha256}; refusing weights that would make metrics incomparable"
    )
  with np.load(io.BytesIO(data)) as npz:
    arrays = {k: npz[k] for k in npz.files}
  model = FeatureNet(spec, rngs=nnx.Rngs(0))
  load_params(model, arrays, path)
  return FeatureExtractor(spec, model, sha)


def label_accuracy(
  extractor: FeatureExtractor, images, labels, batch_size: int = 500
) -> tuple[float, list[float]]:
  """Classifier accuracy on (e.g. class-conditional generated) images.

  Args:
    images: float32 [N, H, W, C] in [-1, 1].
    labels: int [N] intended classes.

  Returns:
    (overall accuracy, per-class accuracies: list of length num_classes, nan for absent classes).
  """
  labels = np.asarray(labels)
  pred = extractor.extract_logits(images, batch_size).argmax(-1)
  correct = pred == labels
  per_class = [
    float(correct[labels == c].mean()) if np.any(labels == c) else float("nan")
    for c in range(extractor.num_classes)
  ]
  return float(correct.mean()) if len(labels) else float("nan"), per_class
