"""Name -> network-constructor registry, so configs pick the denoiser by ``config.model.name``.

A constructor has the signature ``fn(config, *, in_channels, num_classes, rngs) -> nnx.Module``
where ``config`` is the whole run config. Method packages register their own networks with
``@register("name")``; the module importing them must be imported before ``build_model``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from common.models.unet import UNet

ModelBuilder = Callable[..., nnx.Module]

_REGISTRY: dict[str, ModelBuilder] = {}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def register(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
  """Decorator registering ``fn(config, *, in_channels, num_classes, rngs)`` under ``name``.

  Re-registering the same function (same module and qualified name, e.g. after a module
  reload) replaces the entry; a different function under a taken name raises ValueError,
  because silently shadowing another package's network would be a hard-to-find bug.
  """

  def decorator(fn: ModelBuilder) -> ModelBuilder:
    old = _REGISTRY.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
      raise ValueError(
        f"register: model name {name!r} is already taken by {old.__module__}.{old.__qualname__}"
      )
    _REGISTRY[name] = fn
    return fn

  return decorator


class InitRngs:
  """The ``rngs`` a network is built with: ``params()`` returns fold_in(key, i) for the i-th call,
  the keys ``nnx.Rngs(params=key)`` hands out, so the weights are bit for bit the same.

  Why not ``nnx.Rngs``: its stream counts calls in an ``nnx.Variable``, and under a trace each
  count update asks the tracer for ``.sharding``, whose AttributeError message walks the whole
  trace so far. That is one walk per parameter tensor: building the digits U-Net under a trace took
  3-4x as long (graphdef 1.8 s -> 0.5 s, the init's trace 2.0 s -> 0.6 s; shapes 4.8 s -> 1.1 s
  and 3.8 s -> 1.0 s), and every run, eval and test builds its networks under a trace. Here the
  count is a Python int. Only the ``params`` stream exists; a network that stores its rngs (a
  dropout layer built with them) needs ``nnx.Rngs`` and gets an AttributeError naming it.
  """

  def __init__(self, key: jax.Array | int):
    """``key``: a typed key, a raw uint32 key or an int seed, as ``nnx.Rngs`` accepts."""
    if isinstance(key, int):
      key = jax.random.key(key)
    elif key.dtype == jnp.uint32:
      key = jax.random.wrap_key_data(key)
    self._key, self._count = key, 0

  def params(self) -> jax.Array:
    key = jax.random.fold_in(self._key, self._count)
    self._count += 1
    return key

  def __getattr__(self, name: str):
    raise AttributeError(
      f"InitRngs has only the 'params' stream, not {name!r}: build this network with nnx.Rngs"
    )


def compute_dtype(config: ml_collections.ConfigDict):
  """The network's compute dtype from ``config.model.dtype`` ("float32" | "bfloat16"); every
  registered builder reads it here, so a bad value is one message whatever the network."""
  name = config.model.dtype
  if name not in _DTYPES:
    raise ValueError(f"model.dtype={name!r}: allowed: {', '.join(_DTYPES)}")
  return _DTYPES[name]


def registered_models() -> list[str]:
  """Sorted names accepted by ``build_model``."""
  return sorted(_REGISTRY)


def build_model(
  config: ml_collections.ConfigDict, *, in_channels: int, num_classes: int, rngs: nnx.Rngs
) -> nnx.Module:
  """Builds the network named by ``config.model.name`` from the whole run config.

  Args:
    config: run config (``model.*``, ``data.resolution``, ``diffusion.loss`` are read by the
      built-in "unet"; other builders may read anything).
    in_channels: channels of the data images.
    num_classes: number of classes in the data set; the "unet" builder ignores it unless
      ``config.model.class_conditional``.
    rngs: initialisation keys.

  Returns:
    An ``nnx.Module`` called as ``model(x, t, y=None, *, dropout_rng=None)``.
  """
  name = config.model.name
  if name not in _REGISTRY:
    raise ValueError(
      f"build_model: unknown config.model.name {name!r}; registered: {registered_models()}"
    )
  return _REGISTRY[name](config, in_channels=in_channels, num_classes=num_classes, rngs=rngs)


def count_params(model_or_state) -> int:
  """Number of scalar parameters.

  Args:
    model_or_state: an ``nnx.Module`` (its ``nnx.Param`` variables are counted), or any pytree
      of arrays / ``jax.ShapeDtypeStruct`` (e.g. an ``nnx.State`` or ``nnx.eval_shape`` output).

  Returns:
    The total element count, as a Python int.
  """
  tree = model_or_state
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  return sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(tree))


def unet_arguments(
  config: ml_collections.ConfigDict, *, in_channels: int, num_classes: int
) -> dict:
  """The U-Net's architecture arguments for ``config`` (no dtype, no rngs): what the "unet"
  builder passes, and what another framework's copy of the network reads
  (``benchmarks/torch_unet.py``)."""
  m = config.model
  # Learned-variance (hybrid) training needs the interpolation coefficients as extra channels.
  out_channels = in_channels * (2 if config.diffusion.loss == "hybrid" else 1)
  return dict(
    image_size=config.data.resolution,
    in_channels=in_channels,
    out_channels=out_channels,
    channels=tuple(m.channels),
    num_res_blocks=m.num_res_blocks,
    attention_resolutions=tuple(m.attention_resolutions),
    num_heads=m.num_heads,
    num_head_channels=m.num_head_channels,
    dropout=m.dropout,
    # A data set without labels (num_classes == 0) gives an unconditional model even when
    # class_conditional is set, matching common.train's Method.class_conditional.
    num_classes=num_classes if m.class_conditional else 0,
    use_scale_shift_norm=m.use_scale_shift_norm,
    resblock_updown=m.resblock_updown,
    # .get: configs saved before these fields existed build the network they always did.
    norm_group_size=m.get("norm_group_size", 0),
    time_embed_channels=m.get("time_embed_channels", 0),
    base_channels=tuple(m.get("base_channels", ())) or None,
  )


@register("unet")
def _build_unet(
  config: ml_collections.ConfigDict, *, in_channels: int, num_classes: int, rngs: nnx.Rngs
) -> UNet:
  arguments = unet_arguments(config, in_channels=in_channels, num_classes=num_classes)
  return UNet(**arguments, dtype=compute_dtype(config), rngs=rngs)
