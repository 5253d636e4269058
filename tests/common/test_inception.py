"""Tests for common.metrics.inception (FID InceptionV3) with random weights; no download needed."""

import re

import flax.nnx as nnx
import jax
import numpy as np
import pytest

from common.metrics import inception
from common.metrics.inception import INCEPTION_SHAPES

# torchvision's inception_v3 has 27,161,264 parameters; minus AuxLogits (3,326,696) and the
# 1000-way fc (2,049,000) leaves 21,785,568 = conv kernels + BatchNorm gamma/beta, the ~21.8M
# quoted for pytorch-fid's FID Inception without fc. Of these, 34,432 are BN gamma/beta.
CONV_PARAMS = 21_751_136
BN_AFFINE_PARAMS = 34_432


def _random_state_dict(seed=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  arrays = {}
  for key, shape in INCEPTION_SHAPES.items():
    if key.endswith("conv.weight"):
      # He-scaled so activations neither vanish nor explode through the 94 layers.
      fan_in = shape[1] * shape[2] * shape[3]
      value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith("bn.weight") or key.endswith("running_var"):
      value = rng.uniform(0.5, 1.5, size=shape)  # running_var must be positive
    else:
      value = rng.normal(size=shape) * 0.1
    arrays[key] = value.astype(np.float32)
  return arrays


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  arrays = _random_state_dict()
  path = str(tmp_path_factory.mktemp("inception") / "inception_fid.npz")
  sha = inception.save_state_dict(arrays, path)
  return arrays, path, sha


@pytest.fixture(scope="module")
def net(weights):
  _, path, sha = weights
  return inception.load_inception(path, expected_sha256=sha.upper())


def _images(shape, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


# --------------------------------------------------------------------------------- architecture


def test_parameter_count_matches_fid_inception():
  conv = sum(int(np.prod(s)) for k, s in INCEPTION_SHAPES.items() if k.endswith("conv.weight"))
  affine = sum(
    int(np.prod(s)) for k, s in INCEPTION_SHAPES.items() if k.endswith(("bn.weight", "bn.bias"))
  )
  assert conv == CONV_PARAMS
  assert affine == BN_AFFINE_PARAMS
  assert conv + affine == 21_785_568
  assert abs(conv - 21.8e6) / 21.8e6 < 0.01
  # 94 BasicConv2d layers x (conv.weight + 4 BN arrays).
  assert len(INCEPTION_SHAPES) == 94 * 5
  assert INCEPTION_SHAPES["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert INCEPTION_SHAPES["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)


def test_basic_conv2d_matches_pytorch_semantics():
  # A (1, 3) kernel with padding (0, 1) checks OIHW->HWIO, cross-correlation and the BN formula.
  rng = np.random.default_rng(0)
  spec = inception.ConvSpec(cin=2, cout=3, kernel=(1, 3), stride=1, padding=(0, 1))
  w = rng.normal(size=(3, 2, 1, 3)).astype(np.float32)  # OIHW
  gamma, beta, mean = (rng.normal(size=3).astype(np.float32) for _ in range(3))
  var = rng.uniform(0.5, 2, size=3).astype(np.float32)
  layer = inception.BasicConv2d(spec, rngs=nnx.Rngs(0))
  layer.conv.kernel[...] = w.transpose(2, 3, 1, 0)
  layer.bn.scale[...], layer.bn.bias[...] = gamma, beta
  layer.bn.mean[...], layer.bn.var[...] = mean, var
  x = rng.normal(size=(1, 4, 5, 2)).astype(np.float32)

  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
  conv = np.zeros((1, 4, 5, 3), np.float32)
  for j in range(5):
    conv[:, :, j, :] = np.einsum("bhkc,ock->bho", xp[:, :, j : j + 3, :], w[:, :, 0, :])
  ref = np.maximum((conv - mean) / np.sqrt(var + 1e-3) * gamma + beta, 0)
  np.testing.assert_allclose(np.asarray(layer(x)), ref, rtol=1e-5, atol=1e-5)


def test_avg_pool_excludes_padding_and_max_pool_pads_with_minus_inf():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1) - 20.0  # all negative
  avg = np.asarray(inception._avg_pool_exclude_pad(x))[0, :, :, 0]
  # Corner: mean of the 4 real pixels, not sum / 9 (count_include_pad=False).
  assert avg[0, 0] == pytest.approx(np.mean(x[0, :2, :2, 0]))
  assert avg[0, 1] == pytest.approx(np.mean(x[0, :2, :3, 0]))
  assert avg[1, 1] == pytest.approx(np.mean(x[0, :3, :3, 0]))
  mx = np.asarray(inception._max_pool(x, 1, 1))[0, :, :, 0]
  # Zero padding would make every border max 0; -inf padding keeps the real maxima.
  assert mx[0, 0] == x[0, 1, 1, 0]
  assert mx.shape == (4, 4)
  assert np.asarray(inception._max_pool(np.zeros((1, 35, 35, 1)), 2, 0)).shape == (1, 17, 17, 1)


# -------------------------------------------------------------------------------- preprocessing


def _torch_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of F.interpolate(mode='bilinear', align_corners=False) along one axis."""
  m = np.zeros((n_out, n_in))
  scale = n_in / n_out
  for d in range(n_out):
    src = max((d + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(np.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    lam = src - i0
    m[d, i0] += 1 - lam
    m[d, i1] += lam
  return m


def _reference_preprocess(images01: np.ndarray) -> np.ndarray:
  # pytorch-fid: resize the [0, 1] image, then map to [-1, 1].
  _, h, w, _ = images01.shape
  rh, rw = _torch_bilinear_matrix(h, 299), _torch_bilinear_matrix(w, 299)
  resized = np.einsum("ih,bhwc->biwc", rh, images01.astype(np.float64))
  resized = np.einsum("biwc,jw->bijc", resized, rw)
  return 2 * resized - 1


@pytest.mark.parametrize("hw", [(8, 8), (5, 7), (400, 350)])
def test_resize_matches_align_corners_false_bilinear(hw):
  # Upsampling (8x8, non-square 5x7) and downsampling (400x350, where antialias would differ).
  x01 = np.random.default_rng(0).uniform(size=(1, *hw, 3)).astype(np.float32)
  got = np.asarray(inception.preprocess(x01 * 2 - 1))
  ref = _reference_preprocess(x01)
  # jax computes sample positions in float32; near coordinate 400 one ulp is ~3e-5, which bounds
  # the downsampling mismatch. A wrong variant (antialias, align_corners=True) is off by >1e-2.
  np.testing.assert_allclose(got, ref, atol=1e-4 if max(hw) > 299 else 2e-6)
  if max(hw) > 299:
    aa = jax.image.resize(x01 * 2 - 1, (1, 299, 299, 3), method="bilinear", antialias=True)
    assert np.abs(np.asarray(aa) - ref).max() > 1e-2


def test_preprocess_uint8_grey_and_shapes():
  grey = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 1), dtype=np.uint8)
  out = np.asarray(inception.preprocess(grey))
  assert out.shape == (2, 299, 299, 3) and out.dtype == np.float32
  ref = _reference_preprocess(np.repeat(grey, 3, axis=-1) / 255.0)
  np.testing.assert_allclose(out, ref, atol=2e-6)
  assert inception.preprocess(_images((2, 32, 32, 3))).shape == (2, 299, 299, 3)
  with pytest.raises(ValueError, match="expected images"):
    inception.preprocess(np.zeros((2, 8, 8, 2), np.float32))


# ---------------------------------------------------------------------------------- features


def test_features_shape_finite_deterministic(net, weights):
  assert net.name == "inception_v3"
  assert net.sha256 == weights[2]
  x = _images((2, 299, 299, 3))
  f1 = net.features(x)
  assert f1.shape == (2, 2048) and f1.dtype == np.float32
  assert np.all(np.isfinite(np.asarray(f1)))
  # After a ReLU and a mean: non-negative, and not all dead with He-scaled random weights.
  assert np.all(np.asarray(f1) >= 0) and np.asarray(f1).std() > 0
  np.testing.assert_array_equal(np.asarray(net.features(x)), np.asarray(f1))


def test_loaded_kernels_are_hwio(net, weights):
  arrays = weights[0]
  state = nnx.to_pure_dict(net._state)
  kernel = np.asarray(state["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"])
  assert kernel.shape == (1, 7, 128, 128)
  np.testing.assert_array_equal(
    kernel, arrays["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0)
  )
  bn = state["Mixed_7c"]["branch_pool"]["bn"]
  np.testing.assert_array_equal(
    np.asarray(bn["var"]), arrays["Mixed_7c.branch_pool.bn.running_var"]
  )


def test_inputs_of_any_size_and_batch_padding(net):
  # Same batch shape after preprocess, so the network is compiled only once across these calls.
  rgb = _images((2, 32, 32, 3), seed=2)
  grey = np.random.default_rng(3).integers(0, 256, size=(2, 8, 8, 1), dtype=np.uint8)
  for images in (rgb, grey):
    f = np.asarray(net.features(images))
    assert f.shape == (2, 2048) and np.all(np.isfinite(f))
  # Three images in batches of two: the padded last batch must not change the real row, and
  # BatchNorm in inference mode makes each row independent of its batch mates.
  three = _images((3, 32, 32, 3), seed=4)
  feats = net.extract_features(three, batch_size=2)
  assert feats.shape == (3, 2048)
  np.testing.assert_allclose(feats[:2], np.asarray(net.features(three[:2])), rtol=1e-5, atol=1e-6)
  swapped = np.asarray(net.features(three[[2, 0]]))
  np.testing.assert_allclose(feats[2], swapped[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(feats[0], swapped[1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- refusals


def test_wrong_shape_is_refused_naming_key(weights, tmp_path):
  arrays = dict(weights[0])
  key = "Mixed_6c.branch7x7_2.conv.weight"
  arrays[key] = np.zeros((160, 160, 7, 1), np.float32)  # transposed kernel: (1, 7) vs (7, 1)
  path = str(tmp_path / "bad.npz")
  inception.save_state_dict(arrays, path)
  msg = f"{key!r} has shape (160, 160, 7, 1), expected (160, 160, 1, 7)"
  with pytest.raises(ValueError, match=re.escape(msg)):
    inception.load_inception(path)


def test_missing_and_unexpected_keys_are_refused(weights, tmp_path):
  arrays = dict(weights[0])
  del arrays["Mixed_5d.branch_pool.bn.running_mean"]
  path = str(tmp_path / "missing.npz")
  inception.save_state_dict(arrays, path)
  with pytest.raises(ValueError, match=r"missing key 'Mixed_5d\.branch_pool\.bn\.running_mean'"):
    inception.load_inception(path)

  arrays = dict(weights[0])
  arrays["fc.weight"] = np.zeros((1008, 2048), np.float32)
  path = str(tmp_path / "extra.npz")
  inception.save_state_dict(arrays, path)
  with pytest.raises(ValueError, match=r"unexpected key 'fc\.weight'"):
    inception.load_inception(path)


def test_wrong_sha256_is_refused_naming_both(weights):
  _, path, sha = weights
  wrong = "0" * 64
  with pytest.raises(ValueError, match=f"sha256 is {sha}, expected {wrong}"):
    inception.load_inception(path, expected_sha256=wrong)
  with pytest.raises(FileNotFoundError, match="convert_inception"):
    inception.load_inception(path + ".absent")


def test_save_state_dict_is_reproducible(weights, tmp_path):
  arrays = {k: weights[0][k] for k in list(INCEPTION_SHAPES)[:5]}
  a = inception.save_state_dict(arrays, str(tmp_path / "a.npz"))
  b = inception.save_state_dict(dict(reversed(list(arrays.items()))), str(tmp_path / "b.npz"))
  assert a == b


def test_converter_drops_fc_and_counters():
  from common.metrics import convert_inception

  sd = dict(_random_state_dict(seed=5))
  sd["fc.weight"] = np.zeros((1008, 2048), np.float32)
  sd["fc.bias"] = np.zeros((1008,), np.float32)
  sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)
  out = convert_inception.convert_state_dict(sd)
  assert set(out) == set(INCEPTION_SHAPES)
  assert all(v.dtype == np.float32 for v in out.values())
