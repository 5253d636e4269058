"""The paper-scale CollaFuse presets: six networks sized like the official code's EfficientUNet.

The official CelebA code gives the server and every client an imagen-pytorch EfficientUNet (dim 32,
mults (1, 2, 4, 8), res blocks (2, 4, 8, 8), attention at levels 2-4, 8 heads;
SimeonAllmendinger/collafuse_imagen, configs/model/config_efficient_unet.yaml). Our presets build
the ADM U-Net at that size; the exact counts below keep the size from drifting silently. They are
taken with the method's own ``init_params`` (server + K stacked clients) under ``jax.eval_shape``,
on a tiny prepared dataset whose class count is the preset's (the label table is (classes + 1) x
128 parameters a network).
"""

import jax
import numpy as np

from common import data
from common.data import prepare
from common.train import method as method_lib
from common.train.method import DDPM
from configs import collab as collab_config

# preset -> (classes of the prepared data, parameters of one network, all six networks)
_COUNTS = {
  # CelebA: one class per attribute-group client (5).
  "celeba64": (5, 46_217_475, 277_304_850),
  "cifar10": (10, 46_218_115, 277_308_690),
}


def _prepared(tmp_path, resolution: int, num_classes: int) -> str:
  rng = np.random.default_rng(0)
  n = 2 * num_classes
  npz = tmp_path / "in.npz"
  np.savez(
    npz,
    images=rng.integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8),
    labels=np.arange(n) % num_classes,
  )
  out = str(tmp_path / "data")
  prepare.prepare(str(npz), out, resolution, num_workers=1)
  return out


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _check_shape(config):
  """The official network's shape, as our U-Net spells it."""
  res = config.data.resolution
  assert tuple(config.model.channels) == (32, 64, 128, 256)
  assert tuple(config.model.num_res_blocks) == (2, 4, 8, 8)
  assert tuple(config.model.attention_resolutions) == (res // 2, res // 4, res // 8)
  assert config.model.num_heads == 8 and config.model.num_head_channels <= 0
  assert config.collab.num_clients == 5


def _preset_method(preset: str, tmp_path):
  """The preset's CollaFuse over a tiny prepared dataset with the preset's class count, and its
  expected (per-network, total) parameter counts."""
  num_classes, per_network, total = _COUNTS[preset]
  config = collab_config.get_config(preset)
  config.data.data_dir = _prepared(tmp_path, config.data.resolution, num_classes)
  _check_shape(config)
  return config, method_lib.load_method(config, data.get_info(config.data)), per_network, total


def test_celeba64_six_networks_counted_exactly(tmp_path):
  """One network at 64x64; CollaFuse's ``init_params`` holds the server and the K clients stacked,
  each this network (tests/collab/test_collab.py checks that structure at a small size; tracing
  the six here costs ~30 s more than one)."""
  config, method, per_network, total = _preset_method("celeba64", tmp_path)
  one = jax.eval_shape(lambda key: DDPM.init_params(method, key), jax.random.key(0))
  assert _count(one) == per_network
  assert total == (config.collab.num_clients + 1) * per_network


def test_cifar10_network_counted_exactly(tmp_path):
  """One network at 32x32 (attention at 16, 8, 4); the six are the same network."""
  _, method, per_network, total = _preset_method("cifar10", tmp_path)
  one = jax.eval_shape(lambda key: DDPM.init_params(method, key), jax.random.key(0))
  assert _count(one) == per_network and total == 6 * per_network
