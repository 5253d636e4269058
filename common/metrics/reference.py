"""Feature networks by name, and reference statistics computed once and cached.

Every run of a dataset is compared against the same numbers: the reference features of
(dataset, split, resolution, feature network, its weights' sha256) are computed on first use and
stored as ``.npz`` under the cache directory; later evaluations load them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np
from absl import logging

from common import fileio
from common.metrics import fid

EMBEDDED_FEATURE_NETS = ("digits", "shapes")
FEATURE_NETS = (*EMBEDDED_FEATURE_NETS, "inception_v3")


def cache_root() -> str:
  """The repo's cache directory: ``$SEGDIFF_CACHE``, else ``~/.cache/segdiff``."""
  return os.environ.get("SEGDIFF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "segdiff"))


def default_cache_dir() -> str:
  """``$SEGDIFF_CACHE/reference_stats``, else ``~/.cache/segdiff/reference_stats``."""
  return os.path.join(cache_root(), "reference_stats")


@dataclasses.dataclass
class FeatureNetwork:
  """A feature extractor as the evaluation sees it.

  ``features(images [N, H, W, C] float32 in [-1, 1]) -> [N, D] float32``; ``logits`` is None for
  networks without a classifier head over the dataset's labels.
  """

  name: str
  sha256: str
  weights_path: str
  features: Callable[[np.ndarray], np.ndarray]
  logits: Callable[[np.ndarray], np.ndarray] | None = None
  num_classes: int = 0


def resolve_name(name: str, data_name: str) -> str:
  """``auto`` -> the dataset's own classifier for embedded data, InceptionV3 otherwise."""
  if name == "auto":
    return data_name if data_name in EMBEDDED_FEATURE_NETS else "inception_v3"
  if name not in FEATURE_NETS:
    raise ValueError(f"feature_net={name!r}: allowed: auto, {', '.join(FEATURE_NETS)}")
  return name


def load_feature_network(
  name: str,
  *,
  inception_weights: str = "",
  inception_sha256: str | None = None,
  batch_size: int = 500,
) -> FeatureNetwork:
  """Loads a feature network by name; InceptionV3 only from a local weights file."""
  if name in EMBEDDED_FEATURE_NETS:
    from common.metrics import feature_nets

    net = feature_nets.load_feature_net(name)
    return FeatureNetwork(
      name=name,
      sha256=net.sha256,
      weights_path=net.spec.weights_path,
      features=lambda x: net.extract_features(x, batch_size=batch_size),
      logits=lambda x: net.extract_logits(x, batch_size=batch_size),
      num_classes=net.spec.num_classes,
    )
  if name == "inception_v3":
    if not inception_weights:
      raise ValueError(
        "feature_net=inception_v3 needs --inception_weights=PATH (a local .npz written by "
        "`python -m common.metrics.convert_inception`); weights are never downloaded"
      )
    from common.metrics import inception

    net = inception.load_inception(inception_weights, expected_sha256=inception_sha256)

    def features(x):
      return np.concatenate(
        [np.asarray(net.features(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
      )

    return FeatureNetwork(
      name=name,
      sha256=net.sha256,
      weights_path=os.path.abspath(inception_weights),
      features=features,
    )
  raise ValueError(f"feature_net={name!r}: allowed: {', '.join(FEATURE_NETS)}")


def reference_path(
  cache_dir: str, data_name: str, split: str, resolution: int, net: FeatureNetwork
) -> str:
  return os.path.join(
    cache_dir, f"{data_name}_{split}_{resolution}px_{net.name}_{net.sha256[:12]}.npz"
  )


def reference_features(
  data_config,
  split: str,
  net: FeatureNetwork,
  *,
  cache_dir: str | None = None,
  max_examples: int | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
  """Features [N, D] float32 and labels [N] int32 of the real ``split``, and their cache file.

  The file also holds the FID statistics (``mu``, ``sigma``) so other tools can read them alone.
  """
  from common import data

  cache_dir = cache_dir or default_cache_dir()
  path = reference_path(cache_dir, data_config.name, split, int(data_config.resolution), net)
  if data_config.get("num_examples"):  # a generated dataset's size changes its statistics
    path = path.replace(".npz", f"_gen{int(data_config.num_examples)}.npz")
  if max_examples:
    path = path.replace(".npz", f"_n{max_examples}.npz")
  if os.path.exists(path):
    try:
      with np.load(path, allow_pickle=False) as f:
        return f["features"], f["labels"], path
    except Exception as e:  # a damaged cache file (zip, zlib, key, EOF errors): recompute it
      logging.warning("%s unreadable (%s: %s); recomputing it", path, type(e).__name__, e)
  t0 = time.perf_counter()
  images, labels = data.load_split(data_config, split, max_examples=max_examples)
  feats = net.features(images)
  mu, sigma = fid.compute_statistics(feats)
  # A unique temporary file, replaced into place whole: concurrent evaluations computing the same
  # statistics never share a temporary file, and a reader never sees half a file.
  fileio.save_npz(
    path,
    features=feats,
    labels=labels,
    mu=mu,
    sigma=sigma,
    dataset=data_config.name,
    split=split,
    resolution=int(data_config.resolution),
    feature_net=net.name,
    feature_net_sha256=net.sha256,
    count=len(feats),
  )
  logging.info(
    "reference statistics of %s/%s (%d images) -> %s in %.1fs",
    data_config.name,
    split,
    len(feats),
    path,
    time.perf_counter() - t0,
  )
  return feats, labels, path
