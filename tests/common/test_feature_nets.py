"""Tests for common.metrics.feature_nets: committed weights, integrity checks, accuracy."""

import hashlib
import os

import numpy as np
import pytest

from common import data
from common.metrics import feature_nets
from common.metrics.feature_nets import FEATURE_NETS, label_accuracy, load_feature_net

DIGITS8 = dict(name="digits", resolution=8, data_dir="", num_examples=0)


@pytest.fixture(scope="module")
def digits_net():
  return load_feature_net("digits")


@pytest.fixture(scope="module")
def digits_test():
  return data.load_split(DIGITS8, "test")


@pytest.mark.parametrize("name", sorted(FEATURE_NETS))
def test_committed_weights_load_and_match_sha(name):
  spec = FEATURE_NETS[name]
  with open(spec.weights_path, "rb") as f:
    raw = f.read()
  assert len(raw) < 1_000_000
  assert hashlib.sha256(raw).hexdigest() == spec.sha256
  net = load_feature_net(name)
  assert net.name == name and net.sha256 == spec.sha256 and net.feature_dim == 128
  assert spec.accuracy >= 0.97


def test_digits_heldout_accuracy(digits_net, digits_test):
  images, labels = digits_test
  acc, per_class = label_accuracy(digits_net, images, labels)
  assert acc >= 0.97, acc
  assert len(per_class) == 10 and all(0.0 <= a <= 1.0 for a in per_class)
  # The recorded accuracy is what this computation gave at training time.
  np.testing.assert_allclose(acc, FEATURE_NETS["digits"].accuracy, atol=1e-6)


def test_digits_accuracy_after_internal_resize(digits_net):
  images, labels = data.load_split(dict(DIGITS8, resolution=16), "test")
  assert images.shape[1:] == (16, 16, 1)
  acc, _ = label_accuracy(digits_net, images, labels)
  assert acc >= 0.9, acc


def test_shapes_accuracy():
  net = load_feature_net("shapes")
  cfg = dict(name="shapes", resolution=32, data_dir="", num_examples=0)
  images, labels = data.load_split(cfg, "test")
  acc, per_class = label_accuracy(net, images[:500], labels[:500])
  assert acc >= 0.95, acc
  assert len(per_class) == 6


def test_features_shape_dtype_deterministic(digits_net, digits_test):
  images = digits_test[0][:37]
  a = digits_net.extract_features(images, batch_size=16)
  b = digits_net.extract_features(images)
  assert a.shape == (37, 128) and a.dtype == np.float32
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # batch size does not matter
  np.testing.assert_array_equal(b, digits_net.extract_features(images))
  np.testing.assert_allclose(np.asarray(digits_net.features(images)), b, rtol=1e-5, atol=1e-5)
  assert digits_net.logits(images).shape == (37, 10)
  assert np.isfinite(a).all() and a.std() > 0


def test_label_accuracy_absent_class_is_nan(digits_net, digits_test):
  images, labels = digits_test
  keep = labels != 3
  acc, per_class = label_accuracy(digits_net, images[keep], labels[keep])
  assert len(per_class) == 10 and np.isnan(per_class[3]) and acc >= 0.9


def test_tampered_file_is_refused(tmp_path):
  raw = bytearray(open(FEATURE_NETS["digits"].weights_path, "rb").read())
  raw[len(raw) // 2] ^= 0xFF
  path = tmp_path / "digits.npz"
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="sha256") as err:
    load_feature_net("digits", str(path))
  assert FEATURE_NETS["digits"].sha256 in str(err.value)
  assert hashlib.sha256(bytes(raw)).hexdigest() in str(err.value)


def test_wrong_shaped_array_is_refused(tmp_path, monkeypatch):
  spec = FEATURE_NETS["digits"]
  with np.load(spec.weights_path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  arrays["features/kernel"] = np.zeros((3, 3), np.float32)
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  # Record the bad file's hash so the check that fires is the architecture check, not sha256.
  sha = hashlib.sha256(path.read_bytes()).hexdigest()
  monkeypatch.setitem(FEATURE_NETS, "digits", feature_nets.dataclasses.replace(spec, sha256=sha))
  with pytest.raises(ValueError, match="features/kernel"):
    load_feature_net("digits", str(path))


def test_wrong_channels_is_refused(digits_net):
  with pytest.raises(ValueError, match="expects images"):
    digits_net.extract_features(np.zeros((2, 8, 8, 3), np.float32))


def test_unknown_name():
  with pytest.raises(KeyError, match="unknown feature net"):
    load_feature_net("cifar")


def test_weights_dir_has_only_known_nets():
  files = sorted(os.listdir(feature_nets.WEIGHTS_DIR))
  assert files == sorted(f"{n}.{e}" for n in FEATURE_NETS for e in ("json", "npz"))
