"""Start-up validation: every bad config value ends the run before anything compiles or is written.

Each error is one line naming the field, the value and what is allowed, so a researcher who typed
``--config.mesh.data=3`` on 8 devices sees exactly that and nothing else.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import ml_collections

SCHEDULES = ("linear", "cosine")
PARAMETERIZATIONS = ("eps", "x0", "v")
LOSSES = ("simple", "hybrid")
SAMPLERS = ("ddpm", "ddim")
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")  # common.train.method.make_optimizer


class ConfigError(ValueError):
  """A config value the run cannot use. ``str(err)`` is the one-line message for the user."""

  def __init__(self, field: str, value: Any, allowed: str):
    self.field, self.value, self.allowed = field, value, allowed
    super().__init__(f"config error: {field}={value!r}: {allowed}")


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  node = config
  for part in field.split("."):
    if part not in node:
      raise ConfigError(field, None, "missing from the config")
    node = node[part]
  return node


def require(config, field: str, ok: Callable[[Any], bool], allowed: str) -> Any:
  """Checks ``ok(config.<field>)``; raises ``ConfigError`` naming the field otherwise."""
  value = _get(config, field)
  try:
    good = ok(value)
  except Exception:  # a type error in the predicate is a bad value too
    good = False
  if not good:
    raise ConfigError(field, value, allowed)
  return value


def require_choice(config, field: str, choices: Iterable[str]) -> Any:
  choices = tuple(choices)
  return require(config, field, lambda v: v in choices, "allowed: " + ", ".join(choices))


def integer(lo: int, hi: float = float("inf")) -> Callable[[Any], bool]:
  """The predicate for ``require``: an int (not a bool) in ``[lo, hi]``."""
  return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def number(ok: Callable[[Any], bool] = lambda v: True) -> Callable[[Any], bool]:
  """The predicate for ``require``: a finite int or float (not a bool) with ``ok(v)``."""
  return lambda v: (
    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v)
  )


def boolean(v: Any) -> bool:
  """The predicate for ``require``: ``True`` or ``False`` (not 0 / 1)."""
  return isinstance(v, bool)


def each(ok: Callable[[Any], bool], *, nonempty: bool = True) -> Callable[[Any], bool]:
  """The predicate for ``require``: a list or tuple (non-empty unless told) whose every item
  passes ``ok``."""
  return lambda v: isinstance(v, (tuple, list)) and bool(len(v) or not nonempty) and all(map(ok, v))


def validate_common(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int = 1):
  """Checks the fields every method shares (see ``configs/ddpm.py:base_config``).

  Returns:
    The resolved mesh shape ``{'data': d, 'fsdp': f, 'model': m}``.
  Raises:
    ConfigError: the first bad field.
  """
  from common import parallel

  require(config, "seed", integer(0), "must be an integer >= 0")
  require(config, "total_steps", integer(1), "must be an integer >= 1")
  batch = require(config, "batch_size", integer(1), "must be an integer >= 1")
  require(config, "log_every_steps", integer(1), "must be an integer >= 1")
  require(config, "ckpt_every_steps", integer(1), "must be an integer >= 1")
  require(config, "sample_every_steps", integer(0), "must be an integer >= 0 (0: only at the end)")
  require(config, "keep_checkpoints", integer(1), "must be an integer >= 1")
  require(config, "num_sample_images", integer(0), "must be an integer >= 0 (0: no sample grids)")
  require(config, "ema_decay", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")

  for axis in parallel.MESH_AXES:
    require(config, f"mesh.{axis}", lambda v: integer(1)(v) or v == -1, "must be >= 1 or -1")
  try:
    mesh_shape = parallel.resolve_mesh_shape(dict(config.mesh), num_devices)
  except ValueError as e:
    raise ConfigError(
      "mesh", dict(config.mesh), f"{e} (devices available: {num_devices})"
    ) from None
  shards = mesh_shape["data"] * mesh_shape["fsdp"]
  if batch % shards:
    raise ConfigError(
      "batch_size",
      batch,
      f"must be divisible by mesh.data*mesh.fsdp = {shards} (the batch is split over both)",
    )
  if batch % process_count:
    raise ConfigError("batch_size", batch, f"must be divisible by the {process_count} processes")

  require(config, "diffusion.num_timesteps", integer(1), "must be an integer >= 1")
  require_choice(config, "diffusion.schedule", SCHEDULES)
  require_choice(config, "diffusion.parameterization", PARAMETERIZATIONS)
  require_choice(config, "diffusion.loss", LOSSES)
  validate_sampler(config)
  require(config, "diffusion.ddim_eta", lambda v: v >= 0.0, "must be >= 0")
  require(config, "diffusion.min_snr_gamma", lambda v: v >= 0.0, "must be >= 0 (0 disables it)")
  require(config, "diffusion.vlb_weight", lambda v: v >= 0.0, "must be >= 0")
  require(config, "diffusion.cond_drop_prob", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
  require(config, "diffusion.guidance_scale", lambda v: v >= 0.0, "must be >= 0")
  if config.diffusion.loss == "hybrid" and config.diffusion.parameterization != "eps":
    raise ConfigError(
      "diffusion.parameterization",
      config.diffusion.parameterization,
      "the hybrid (learned-variance) loss is defined for eps only",
    )

  require_choice(config, "model.dtype", DTYPES)
  require(config, "model.dropout", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
  require_choice(config, "optimizer.name", OPTIMIZERS)
  require(config, "optimizer.learning_rate", lambda v: v > 0, "must be > 0")
  require(config, "optimizer.warmup_steps", integer(0), "must be an integer >= 0")
  require(config, "optimizer.grad_clip_norm", lambda v: v >= 0, "must be >= 0 (0 disables it)")
  require(config, "optimizer.weight_decay", lambda v: v >= 0, "must be >= 0")
  if "schedule" in config.optimizer:  # absent in configs saved before it was a common field
    if require_choice(config, "optimizer.schedule", LR_SCHEDULES) == "cosine":
      require(
        config, "optimizer.warmup_steps", lambda v: v < config.total_steps,
        f"must be < total_steps={config.total_steps} for the cosine schedule",
      )  # fmt: skip
  return mesh_shape


def validate_sampler(config: ml_collections.ConfigDict) -> None:
  """Checks ``diffusion.sampler``, ``diffusion.sample_steps``, ``diffusion.timestep_spacing``
  (also after ``common.eval`` overrides them) and the x0_hat clipping (``diffusion.x0_clipping``,
  ``diffusion.dynamic_threshold_percentile``): a "ddim" grid needs a stride giving exactly
  sample_steps steps, as IDDPM's "ddimN" does.

  Raises:
    ConfigError: the first bad field.
  """
  from common.diffusion import gaussian, steps

  t = require(config, "diffusion.num_timesteps", integer(1), "must be an integer >= 1")
  require_choice(config, "diffusion.sampler", SAMPLERS)
  n = require(config, "diffusion.sample_steps", integer(1, t), f"must be an integer in [1, {t}]")
  # Both absent in configs saved before the fields (static clipping, the only one there was).
  if "x0_clipping" in config.diffusion:
    require_choice(config, "diffusion.x0_clipping", gaussian.X0_CLIPPINGS)
  if "dynamic_threshold_percentile" in config.diffusion:
    require(
      config, "diffusion.dynamic_threshold_percentile", number(lambda v: 0.0 < v <= 1.0),
      "must be in (0, 1] (the quantile of |x0_hat| that dynamic thresholding scales by)",
    )  # fmt: skip
  if "timestep_spacing" not in config.diffusion:  # absent in configs saved before the field
    return
  if require_choice(config, "diffusion.timestep_spacing", steps.TIMESTEP_SPACINGS) == "ddim":
    try:
      steps.ddim_stride(t, n)
    except ValueError as err:  # already names the nearest counts that have one: add the field
      raise ConfigError(
        "diffusion.sample_steps", n, f"diffusion.timestep_spacing=ddim: {err}"
      ) from None


def validate_data(config: ml_collections.ConfigDict):
  """Checks ``data.*`` and returns the dataset's ``DatasetInfo``."""
  from common import data

  require_choice(config, "data.name", data.NAMES)
  if config.data.name == "array_record":
    path = config.data.data_dir
    if not path or not os.path.isdir(path):
      raise ConfigError(
        "data.data_dir",
        path,
        "must be an existing directory written by "
        "`python -m common.data.prepare --input=... --output=DIR`",
      )
  try:
    return data.get_info(config.data)
  except (ValueError, FileNotFoundError) as e:
    msg = str(e).splitlines()[0]
    # The data package already names the field ("data.resolution=12 ..."): keep its wording.
    named = re.match(r"(data\.\w+)=(\S+?):? (.*)", msg)
    if named:
      raise ConfigError(named[1], config.data[named[1][5:]], named[3]) from None
    raise ConfigError("data", config.data.name, msg) from None


def validate_model(config: ml_collections.ConfigDict, build_abstract: Callable[[], Any]) -> Any:
  """Checks the model name and that the network can take the data (shape-only, no compile)."""
  from common import models

  require_choice(config, "model.name", models.registered_models())
  try:
    return build_abstract()
  except ValueError as e:
    msg = str(e).splitlines()[0]
    raise ConfigError(
      "model", config.model.name, f"{msg} (data.resolution={config.data.resolution})"
    ) from None
