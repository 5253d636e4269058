"""The standard FID InceptionV3 (pytorch-fid / TF ``pt_inception-2015-12-05``) in Flax NNX.

This is the network behind published FID numbers: pool3 features [B, 2048] of the 2015 TF
Inception graph, as ported by pytorch-fid (``FIDInceptionA/C/E_1/E_2``). It is not torchvision's
InceptionV3: the FID graph average-pools with ``count_include_pad=False`` inside the A/C/E
blocks and max-pools (not average-pools) in the last E block's pool branch. Both differences
move FID, so they are reproduced exactly here. Inference only: BatchNorm is a fixed affine map
from the stored running statistics (kept as non-trainable ``nnx.BatchStat`` variables).

Weights never ship with the repo and are never downloaded: ``load_inception`` reads a local flat
``.npz`` whose members are named by pytorch-fid's state_dict keys (``Conv2d_1a_3x3.conv.weight``
[32, 3, 3, 3] OIHW, ``...bn.running_var``, ...; no ``fc.*``), written once from the standard
``pt_inception-2015-12-05-6726825d.pth`` by ``python -m common.metrics.convert_inception`` (its
docstring says how to obtain that file).

Typical use::

  net = load_inception('inception_fid.npz', expected_sha256='...')
  feats = net.extract_features(images)   # [N, H, W, 3|1] float32 in [-1, 1] or uint8 -> [N, 2048]
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import zipfile
from collections.abc import Mapping

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from common import fileio

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """One BasicConv2d: conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU, PyTorch geometry."""

  cin: int
  cout: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)  # symmetric zero padding (rows, cols), as in nn.Conv2d


def _c(cin, cout, kernel=1, stride=1, padding=0) -> ConvSpec:
  kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
  padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
  return ConvSpec(cin, cout, kernel, stride, padding)


# Layer tables per block, in torchvision's attribute names so that nnx paths and PyTorch
# state_dict keys line up one-to-one. One table drives both the modules and INCEPTION_SHAPES, so
# the expected-shape check can never drift from the architecture.
def _stem_layers() -> dict[str, ConvSpec]:
  return {
    "Conv2d_1a_3x3": _c(3, 32, 3, stride=2),
    "Conv2d_2a_3x3": _c(32, 32, 3),
    "Conv2d_2b_3x3": _c(32, 64, 3, padding=1),
    "Conv2d_3b_1x1": _c(64, 80, 1),
    "Conv2d_4a_3x3": _c(80, 192, 3),
  }


def _a_layers(cin: int, pool_features: int) -> dict[str, ConvSpec]:
  return {
    "branch1x1": _c(cin, 64),
    "branch5x5_1": _c(cin, 48),
    "branch5x5_2": _c(48, 64, 5, padding=2),
    "branch3x3dbl_1": _c(cin, 64),
    "branch3x3dbl_2": _c(64, 96, 3, padding=1),
    "branch3x3dbl_3": _c(96, 96, 3, padding=1),
    "branch_pool": _c(cin, pool_features),
  }


def _b_layers(cin: int) -> dict[str, ConvSpec]:
  return {
    "branch3x3": _c(cin, 384, 3, stride=2),
    "branch3x3dbl_1": _c(cin, 64),
    "branch3x3dbl_2": _c(64, 96, 3, padding=1),
    "branch3x3dbl_3": _c(96, 96, 3, stride=2),
  }


def _c_layers(cin: int, c7: int) -> dict[str, ConvSpec]:
  return {
    "branch1x1": _c(cin, 192),
    "branch7x7_1": _c(cin, c7),
    "branch7x7_2": _c(c7, c7, (1, 7), padding=(0, 3)),
    "branch7x7_3": _c(c7, 192, (7, 1), padding=(3, 0)),
    "branch7x7dbl_1": _c(cin, c7),
    "branch7x7dbl_2": _c(c7, c7, (7, 1), padding=(3, 0)),
    "branch7x7dbl_3": _c(c7, c7, (1, 7), padding=(0, 3)),
    "branch7x7dbl_4": _c(c7, c7, (7, 1), padding=(3, 0)),
    "branch7x7dbl_5": _c(c7, 192, (1, 7), padding=(0, 3)),
    "branch_pool": _c(cin, 192),
  }


def _d_layers(cin: int) -> dict[str, ConvSpec]:
  return {
    "branch3x3_1": _c(cin, 192),
    "branch3x3_2": _c(192, 320, 3, stride=2),
    "branch7x7x3_1": _c(cin, 192),
    "branch7x7x3_2": _c(192, 192, (1, 7), padding=(0, 3)),
    "branch7x7x3_3": _c(192, 192, (7, 1), padding=(3, 0)),
    "branch7x7x3_4": _c(192, 192, 3, stride=2),
  }


def _e_layers(cin: int) -> dict[str, ConvSpec]:
  return {
    "branch1x1": _c(cin, 320),
    "branch3x3_1": _c(cin, 384),
    "branch3x3_2a": _c(384, 384, (1, 3), padding=(0, 1)),
    "branch3x3_2b": _c(384, 384, (3, 1), padding=(1, 0)),
    "branch3x3dbl_1": _c(cin, 448),
    "branch3x3dbl_2": _c(448, 384, 3, padding=1),
    "branch3x3dbl_3a": _c(384, 384, (1, 3), padding=(0, 1)),
    "branch3x3dbl_3b": _c(384, 384, (3, 1), padding=(1, 0)),
    "branch_pool": _c(cin, 192),
  }


# (attribute name, block kind, constructor args) in forward order, as in pytorch-fid's
# fid_inception_v3(): A blocks 5b-5d, B = Mixed_6a, C blocks 6b-6e, D = Mixed_7a, E_1, E_2.
_BLOCKS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
  ("Mixed_5b", "A", (192, 32)),
  ("Mixed_5c", "A", (256, 64)),
  ("Mixed_5d", "A", (288, 64)),
  ("Mixed_6a", "B", (288,)),
  ("Mixed_6b", "C", (768, 128)),
  ("Mixed_6c", "C", (768, 160)),
  ("Mixed_6d", "C", (768, 160)),
  ("Mixed_6e", "C", (768, 192)),
  ("Mixed_7a", "D", (768,)),
  ("Mixed_7b", "E_1", (1280,)),
  ("Mixed_7c", "E_2", (2048,)),
)
_LAYER_FNS = {"A": _a_layers, "B": _b_layers, "C": _c_layers, "D": _d_layers}


def _block_layers(kind: str, args: tuple[int, ...]) -> dict[str, ConvSpec]:
  return _e_layers(*args) if kind.startswith("E") else _LAYER_FNS[kind](*args)


def _all_layers() -> dict[str, ConvSpec]:
  """Every BasicConv2d of the network, keyed by its dotted PyTorch module path, forward order."""
  layers = dict(_stem_layers())
  for name, kind, args in _BLOCKS:
    layers.update({f"{name}.{k}": v for k, v in _block_layers(kind, args).items()})
  return layers


# PyTorch state_dict suffix -> path of the same array inside a BasicConv2d below.
_SUFFIX_TO_NNX = {
  "conv.weight": ("conv", "kernel"),
  "bn.weight": ("bn", "scale"),
  "bn.bias": ("bn", "bias"),
  "bn.running_mean": ("bn", "mean"),
  "bn.running_var": ("bn", "var"),
}


def _expected_shapes() -> dict[str, tuple[int, ...]]:
  shapes = {}
  for name, s in _all_layers().items():
    shapes[f"{name}.conv.weight"] = (s.cout, s.cin, *s.kernel)  # OIHW, as PyTorch stores it
    for suffix in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
      shapes[f"{name}.{suffix}"] = (s.cout,)
  return shapes


INCEPTION_SHAPES: dict[str, tuple[int, ...]] = _expected_shapes()


# ------------------------------------------------------------------------------------ modules


class BasicConv2d(nnx.Module):
  """conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU. NHWC.

  BatchNorm keeps its running mean/var as ``nnx.BatchStat`` (non-trainable) rather than folding
  them into the kernel, so the state maps 1:1 onto the PyTorch state_dict and a loaded file can be
  compared array by array.
  """

  def __init__(self, spec: ConvSpec, *, rngs: nnx.Rngs):
    (ph, pw) = spec.padding
    self.conv = nnx.Conv(
      spec.cin,
      spec.cout,
      spec.kernel,
      strides=spec.stride,
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      # Full float32 convolutions: TF32/bf16 matmuls on accelerators shift features enough to
      # move FID in the first decimal, and FID is compared against published float32 numbers.
      precision=jax.lax.Precision.HIGHEST,
      rngs=rngs,
    )
    self.bn = nnx.BatchNorm(spec.cout, epsilon=BN_EPS, use_running_average=True, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, cin] -> [B, H', W', cout]."""
    return jax.nn.relu(self.bn(self.conv(x)))


def _max_pool(x: jax.Array, stride: int, pad: int) -> jax.Array:
  # 3x3 max pool; padding with -inf (as F.max_pool2d does) so padded cells never win.
  return jax.lax.reduce_window(
    x,
    -jnp.inf,
    jax.lax.max,
    (1, 3, 3, 1),
    (1, stride, stride, 1),
    ((0, 0), (pad, pad), (pad, pad), (0, 0)),
  )


def _avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 pad-1 average pool with count_include_pad=False: border cells divide by the
  number of real pixels in the window (4 in corners, 6 on edges), as the FID TF graph does."""
  window, strides, padding = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, padding)
  ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, padding)
  return total / count


class _Block(nnx.Module):
  """Holds one block's BasicConv2d layers as attributes named like torchvision's."""

  def __init__(self, layers: Mapping[str, ConvSpec], *, rngs: nnx.Rngs):
    for name, spec in layers.items():
      setattr(self, name, BasicConv2d(spec, rngs=rngs))


class FIDInceptionA(_Block):
  """Mixed_5b/c/d (35x35): [B, 35, 35, cin] -> [B, 35, 35, 224 + pool_features]."""

  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    super().__init__(_a_layers(cin, pool_features), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a (grid reduction): [B, 35, 35, 288] -> [B, 17, 17, 768]."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    super().__init__(_b_layers(cin), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, _max_pool(x, 2, 0)], axis=-1)


class FIDInceptionC(_Block):
  """Mixed_6b-e (17x17, factorised 7x7): [B, 17, 17, 768] -> [B, 17, 17, 768]."""

  def __init__(self, cin: int, channels_7x7: int, *, rngs: nnx.Rngs):
    super().__init__(_c_layers(cin, channels_7x7), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
      bd = layer(bd)
    bd = self.branch7x7dbl_5(bd)
    bp = self.branch_pool(_avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a (grid reduction): [B, 17, 17, 768] -> [B, 8, 8, 1280]."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    super().__init__(_d_layers(cin), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_1(x)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


class FIDInceptionE(_Block):
  """Mixed_7b (``pool='avg'``, FIDInceptionE_1) / Mixed_7c (``pool='max'``, FIDInceptionE_2).

  [B, 8, 8, cin] -> [B, 8, 8, 2048]. The max pool in Mixed_7c is a quirk of the 2015 TF graph
  that FID reference statistics were computed with; torchvision uses an average pool there.
  """

  def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
    if pool not in ("avg", "max"):
      raise ValueError(f"FIDInceptionE: pool must be 'avg' or 'max', got {pool!r}")
    super().__init__(_e_layers(cin), rngs=rngs)
    self.pool = pool

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = _avg_pool_exclude_pad(x) if self.pool == "avg" else _max_pool(x, 1, 1)
    bp = self.branch_pool(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _make_block(kind: str, args: tuple[int, ...], rngs: nnx.Rngs) -> nnx.Module:
  if kind == "A":
    return FIDInceptionA(*args, rngs=rngs)
  if kind == "B":
    return InceptionB(*args, rngs=rngs)
  if kind == "C":
    return FIDInceptionC(*args, rngs=rngs)
  if kind == "D":
    return InceptionD(*args, rngs=rngs)
  return FIDInceptionE(*args, pool="avg" if kind == "E_1" else "max", rngs=rngs)


class FIDInceptionV3(nnx.Module):
  """pytorch-fid's FID InceptionV3 up to pool3, inference mode. NHWC.

  Attribute paths mirror the PyTorch module paths (``Mixed_6b.branch7x7_2.conv``), so
  ``Mixed_6b.branch7x7_2.conv.weight`` lives at ``Mixed_6b/branch7x7_2/conv/kernel`` (HWIO).
  """

  def __init__(self, *, rngs: nnx.Rngs):
    for name, spec in _stem_layers().items():
      setattr(self, name, BasicConv2d(spec, rngs=rngs))
    for name, kind, args in _BLOCKS:
      setattr(self, name, _make_block(kind, args, rngs))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, 299, 299, 3] float32 in [-1, 1] (see ``preprocess``) -> pool3 [B, 2048] float32."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B, 147, 147, 64]
    x = _max_pool(x, 2, 0)  # [B, 73, 73, 64]
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # [B, 71, 71, 192]
    x = _max_pool(x, 2, 0)  # [B, 35, 35, 192]
    for name, _, _ in _BLOCKS:
      x = getattr(self, name)(x)  # ... -> [B, 8, 8, 2048] after Mixed_7c
    return jnp.mean(x, axis=(1, 2))


# -------------------------------------------------------------------------------- input protocol


def preprocess(images: jax.Array) -> jax.Array:
  """The standard FID input protocol.

  Args:
    images: [B, H, W, 3] or grey [B, H, W, 1]; float in [-1, 1] (the repo's convention) or
      uint8 in [0, 255] (mapped as pytorch-fid does: x / 255 * 2 - 1).

  Returns:
    [B, 299, 299, 3] float32 in [-1, 1].

  Grey images are repeated to 3 channels. Resizing is bilinear with half-pixel centres and no
  antialiasing, i.e. PyTorch ``F.interpolate(mode='bilinear', align_corners=False)`` (source
  coordinate ``(dst + 0.5) * in / out - 0.5``, clamped to the border), which is what pytorch-fid
  applies. ``jax.image.resize(method='bilinear', antialias=False)`` computes exactly that; the
  default ``antialias=True`` would widen the kernel when downsampling and differ. pytorch-fid
  resizes in [0, 1] and then maps to [-1, 1]; bilinear weights sum to one, so resizing after the
  affine map is the same up to float rounding.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"inception: expected images [B, H, W, 3] or [B, H, W, 1], got {images.shape}")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0 * 2.0 - 1.0
  else:
    x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  b, h, w, c = x.shape
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    x = jax.image.resize(x, (b, INPUT_SIZE, INPUT_SIZE, c), method="bilinear", antialias=False)
  return x


# ------------------------------------------------------------------------------------ loading


def check_state_dict(arrays: Mapping[str, np.ndarray], source: str = "state dict") -> None:
  """ValueError naming the first missing key, unexpected key or wrongly shaped array."""
  for key in INCEPTION_SHAPES:
    if key not in arrays:
      raise ValueError(f"{source}: missing key {key!r} (expected shape {INCEPTION_SHAPES[key]})")
  for key in sorted(arrays):
    if key not in INCEPTION_SHAPES:
      raise ValueError(
        f"{source}: unexpected key {key!r} with shape {tuple(np.shape(arrays[key]))} (not part "
        f"of the FID InceptionV3 without fc)"
      )
  for key, shape in INCEPTION_SHAPES.items():
    got = tuple(np.shape(arrays[key]))
    if got != shape:
      raise ValueError(f"{source}: key {key!r} has shape {got}, expected {shape}")


def inception_from_state_dict(
  arrays: Mapping[str, np.ndarray], source: str = "state dict"
) -> FIDInceptionV3:
  """Builds an ``FIDInceptionV3`` from a flat pytorch-fid state dict (OIHW convs, no fc).

  The model is built abstractly (``nnx.eval_shape``) so no 21.8M-parameter random init is paid for
  weights that are immediately overwritten.
  """
  check_state_dict(arrays, source)
  nested: dict = {}
  for key in INCEPTION_SHAPES:
    # Every key is '<module path>.<conv|bn>.<array>'; the last two parts pick the nnx leaf.
    *module_path, layer, array = key.split(".")
    leaf_path = _SUFFIX_TO_NNX[f"{layer}.{array}"]
    value = np.asarray(arrays[key], np.float32)
    if leaf_path == ("conv", "kernel"):
      value = value.transpose(2, 3, 1, 0)  # OIHW (PyTorch) -> HWIO (lax / nnx.Conv)
    node = nested
    for part in (*module_path, leaf_path[0]):
      node = node.setdefault(part, {})
    node[leaf_path[1]] = jnp.asarray(value)
  abstract = nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, nested)
  return nnx.merge(graphdef, state)


def save_state_dict(arrays: Mapping[str, np.ndarray], path: str) -> str:
  """Writes a flat float32 ``.npz`` reproducibly and returns its sha256.

  ``np.savez`` stamps the current time into the zip, so converting the same .pth twice would give
  different hashes; sorted members, a fixed timestamp and no compression (compressor output can
  vary between zlib versions) make the sha256 a property of the weights alone.
  """
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
    for key in sorted(arrays):
      member = io.BytesIO()
      np.lib.format.write_array(member, np.ascontiguousarray(arrays[key], np.float32))
      zf.writestr(zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
  data = buf.getvalue()
  with fileio.atomic_open(path, "wb") as f:
    f.write(data)
  return hashlib.sha256(data).hexdigest()


class InceptionFeatures:
  """A loaded, frozen FID InceptionV3.

  ``features`` evaluates one batch; ``extract_features`` walks a whole array in fixed-size batches
  (the last padded) and returns numpy. Preprocessing and the network are jitted separately so that
  inputs of a new size or dtype recompile only the cheap resize, not the 94-conv network.
  """

  name = "inception_v3"
  feature_dim = FEATURE_DIM

  def __init__(self, model: FIDInceptionV3, sha256: str):
    self.sha256 = sha256
    graphdef, state = nnx.split(model)
    self._state = state
    self._preprocess = jax.jit(preprocess)
    self._net = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))

  def features(self, images) -> jax.Array:
    """images: [B, H, W, 3|1] float32 in [-1, 1] or uint8 -> pool3 features [B, 2048] float32."""
    return self._net(self._state, self._preprocess(images))

  def extract_features(self, images, batch_size: int = 50) -> np.ndarray:
    """images: [N, H, W, 3|1] float32 in [-1, 1] or uint8 -> np.float32 [N, 2048], in batches."""
    images = np.asarray(images)
    n = len(images)
    outs = []
    for start in range(0, n, batch_size):
      chunk = images[start : start + batch_size]
      # Pad the last chunk to the full batch so only one batch shape is ever compiled; BatchNorm
      # uses running stats, so padding rows cannot influence the real rows.
      pad = batch_size - len(chunk) if n > batch_size else 0
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
      out = np.asarray(self.features(chunk))
      outs.append(out[: len(out) - pad])
    if not outs:
      return np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(outs)


def load_inception(path: str, expected_sha256: str | None = None) -> InceptionFeatures:
  """Loads FID InceptionV3 weights from a local flat ``.npz`` (see ``convert_inception``).

  Args:
    path: .npz whose members are pytorch-fid state_dict keys (``INCEPTION_SHAPES``).
    expected_sha256: if given, the file's sha256 must equal it (hex, case-insensitive).

  Raises:
    FileNotFoundError: no file at ``path`` (the message says how to make one).
    ValueError: sha256 mismatch (naming both hashes), or missing / unexpected / wrongly shaped
      arrays (naming the first offending key and both shapes).
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise FileNotFoundError(
      f"FID Inception weights {path} not found; convert pytorch-fid's "
      f"pt_inception-2015-12-05-6726825d.pth once with `python -m "
      f"common.metrics.convert_inception --input=... --output={path}`"
    ) from e
  sha = hashlib.sha256(data).hexdigest()
  if expected_sha256 is not None and sha != expected_sha256.lower():
    raise ValueError(
      f"FID Inception weights {path}: sha256 is {sha}, expected {expected_sha256.lower()}; "
      f"refusing weights that would make FID incomparable"
    )
  with np.load(io.BytesIO(data)) as npz:
    arrays = {k: npz[k] for k in npz.files}
  return InceptionFeatures(inception_from_state_dict(arrays, path), sha)
