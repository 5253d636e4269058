"""Tests for common.data: datasets, ArrayRecord preparation, grain pipelines, partitions."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from common import data
from common.data import array_record as ar
from common.data import digits, partition, pipeline, prepare, shapes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS16 = dict(name="digits", resolution=16, data_dir="", num_examples=0)


def _read_split(data_dir, split: str) -> tuple[np.ndarray, np.ndarray]:
  """A prepared split read back through the pipeline (``data.load_split``), as its stored uint8."""
  res = ar.read_metadata(str(data_dir))["resolution"]
  cfg = dict(name="array_record", resolution=res, data_dir=str(data_dir), num_examples=0)
  x, y = data.load_split(cfg, split)
  return np.rint((x + 1.0) * 127.5).astype(np.uint8), y


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------- digits


def test_digits_splits_shapes_range_and_classes():
  xtr, ytr = data.load_split(DIGITS16, "train")
  xte, yte = data.load_split(DIGITS16, "test")
  assert xtr.shape == (1497, 16, 16, 1) and xte.shape == (300, 16, 16, 1)
  assert xtr.dtype == np.float32 and ytr.dtype == np.int32
  assert xtr.min() == -1.0 and xtr.max() == 1.0
  assert set(np.unique(ytr)) == set(range(10)) and np.all(np.bincount(yte) == 30)
  info = data.get_info(DIGITS16)
  assert (info.num_train, info.num_test, info.channels, info.num_classes) == (1497, 300, 1, 10)


def test_digits_heldout_split_is_fixed_and_disjoint():
  first = digits.split_indices()
  train, test = first["train"].copy(), first["test"].copy()
  assert len(np.intersect1d(train, test)) == 0
  np.testing.assert_array_equal(np.union1d(train, test), np.arange(1797))
  digits.split_indices.cache_clear()
  digits.load.cache_clear()
  again = digits.split_indices()
  np.testing.assert_array_equal(again["test"], test)
  np.testing.assert_array_equal(again["train"], train)
  # The split must not move with the run seed: iterator seeds never touch it.
  data.make_train_iterator(DIGITS16, global_batch_size=8, seed=123)
  np.testing.assert_array_equal(digits.split_indices()["test"], test)


@pytest.mark.parametrize("res", digits.RESOLUTIONS)
def test_digits_every_resolution(res):
  x, y = digits.load("test", res)
  assert x.shape == (300, res, res, 1) and x.dtype == np.float32
  assert -1.0 <= x.min() and x.max() <= 1.0
  if res == 8:
    from sklearn.datasets import load_digits

    raw = load_digits().images[digits.split_indices()["test"]]
    np.testing.assert_allclose(x[..., 0], raw / 8.0 - 1.0, atol=1e-6)


def test_digits_read_without_sklearn_are_its_load_digits():
  from sklearn.datasets import load_digits

  images, labels = digits._raw()
  ref = load_digits()
  np.testing.assert_array_equal(images, ref.images.astype(np.float32))
  np.testing.assert_array_equal(labels, ref.target)
  assert images.dtype == np.float32 and labels.dtype == np.int32


def test_digits_bad_resolution_names_field_value_and_allowed():
  with pytest.raises(ValueError, match=r"data\.resolution=12.*digits.*8, 16, 32"):
    data.get_info(dict(DIGITS16, resolution=12))
  with pytest.raises(ValueError, match=r"data\.resolution=12"):
    data.make_train_iterator(dict(DIGITS16, resolution=12), global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match=r"data\.name='mnist'.*digits, shapes, array_record"):
    data.get_info(dict(DIGITS16, name="mnist"))


# ----------------------------------------------------------------------------- shapes


def test_shapes_deterministic_per_seed_and_index():
  a = shapes.generate(5, range(24), 16)
  b = shapes.generate(5, range(24), 16)
  c = shapes.generate(6, range(24), 16)
  for x, y in zip(a, b, strict=True):
    assert x.tobytes() == y.tobytes()
  assert a[0].tobytes() != c[0].tobytes()
  # Example i alone (or in another batch) is bit-identical to example i of a bigger batch.
  alone = shapes.generate(5, [17, 3], 16)
  np.testing.assert_array_equal(alone[0], a[0][[17, 3]])
  np.testing.assert_array_equal(alone[2], a[2][[17, 3]])


def test_shapes_labels_attributes_and_rendering(tmp_path):
  n = 300
  x, y, attrs = shapes.generate(0, range(n), 32)
  assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8
  assert y.dtype == np.int32 and attrs.dtype == np.int32 and attrs.shape == (n, 4)
  np.testing.assert_array_equal(attrs[:, 0], y)
  assert set(np.unique(y)) == set(range(6))
  for k, size in enumerate(shapes.NUM_ATTRIBUTE_VALUES):
    assert set(np.unique(attrs[:, k])) == set(range(size)), shapes.ATTRIBUTE_NAMES[k]
  # The pixel at the shape's centre is pure foreground, except for the ring (hollow centre).
  palette = np.array(list(shapes.COLOURS.values()))
  for i in range(n):
    p = shapes.sample_params(0, i)
    centre = x[i, int(p["cy"] * 32), int(p["cx"] * 32)].astype(int)
    is_fg = np.abs(centre - palette[p["colour"]]).max() <= 1
    assert is_fg == (shapes.SHAPES[p["shape"]] != "ring"), (i, p)
  grid = x[:64].reshape(8, 8, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(256, 256, 3)
  Image.fromarray(grid).save(tmp_path / "shapes_grid.png")
  assert Image.open(tmp_path / "shapes_grid.png").size == (256, 256)


@pytest.mark.parametrize("res", [8, 32, 64])
def test_shapes_any_resolution(res):
  x, y, _ = shapes.generate(1, range(12), res)
  assert x.shape == (12, res, res, 3)
  # RGB with real colour, not grey, and not a constant image.
  assert np.abs(x[..., 0].astype(int) - x[..., 1]).max() > 50 and x.std() > 10


def test_shapes_pipeline_and_errors():
  cfg = dict(name="shapes", resolution=8, data_dir="", num_examples=100)
  info = data.get_info(cfg)
  assert (info.num_train, info.num_test, info.channels, info.num_classes) == (100, 2000, 3, 6)
  x, y = data.load_split(cfg, "train")
  assert x.shape == (100, 8, 8, 3) and -1.0 <= x.min() and x.max() <= 1.0
  np.testing.assert_array_equal(data.load_attributes(cfg)[:, 0], y)
  # Train and test come from different streams.
  xt, _ = data.load_split(cfg, "test", max_examples=100)
  assert not np.array_equal(x, xt)
  batch = next(data.make_train_iterator(cfg, global_batch_size=16, seed=0))
  assert batch["attributes"].shape == (16, 4) and batch["attributes"].dtype == np.int32
  assert batch["image"].shape == (16, 8, 8, 3) and batch["image"].dtype == np.float32
  with pytest.raises(ValueError, match=r"data\.resolution=4.*>= 8"):
    data.get_info(dict(cfg, resolution=4))


# ----------------------------------------------------------------------------- iterator


def test_iterator_same_seed_same_batches_different_seed_different():
  a = _take(data.make_train_iterator(DIGITS16, global_batch_size=32, seed=7), 3)
  b = _take(data.make_train_iterator(DIGITS16, global_batch_size=32, seed=7), 3)
  c = _take(data.make_train_iterator(DIGITS16, global_batch_size=32, seed=8), 3)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  assert a[0]["image"].shape == (32, 16, 16, 1) and a[0]["label"].dtype == np.int32


@pytest.mark.parametrize("n_before", [3, 45])  # 45 crosses the epoch boundary (1497 / 32)
def test_iterator_state_roundtrip_resumes_exactly(n_before):
  it = data.make_train_iterator(DIGITS16, global_batch_size=32, seed=1)
  _take(it, n_before)
  state = json.loads(json.dumps(it.get_state()))
  assert state == {"next_index": n_before}
  expected = _take(it, 5)
  fresh = data.make_train_iterator(DIGITS16, global_batch_size=32, seed=1)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 5), expected)


def test_iterator_batches_are_the_index_pipeline_gathered():
  x, y = data.load_split(DIGITS16, "train")
  idx_ds = data.train_index_dataset(len(y), batch_size=32, seed=4)
  it = data.make_train_iterator(DIGITS16, global_batch_size=32, seed=4)
  for k in range(3):
    batch, idx = next(it), idx_ds[k]
    np.testing.assert_array_equal(batch["image"], x[idx])
    np.testing.assert_array_equal(batch["label"], y[idx])


def test_iterator_epochs_are_permutations_reshuffled_each_epoch():
  subset = np.arange(0, 960, 10)  # 96 examples, 3 batches of 32 per epoch
  ds = data.train_index_dataset(1497, batch_size=32, seed=0, indices=subset)
  e0 = np.concatenate([ds[k] for k in range(3)])
  e1 = np.concatenate([ds[k] for k in range(3, 6)])
  np.testing.assert_array_equal(np.sort(e0), subset)
  np.testing.assert_array_equal(np.sort(e1), subset)
  assert not np.array_equal(e0, e1)
  # Neighbouring run seeds must not replay each other's epochs shifted by one.
  other = data.train_index_dataset(1497, batch_size=32, seed=1, indices=subset)
  assert not np.array_equal(e1, np.concatenate([other[k] for k in range(3)]))


def test_processes_read_their_block_of_one_global_batch_and_resume_at_any_count():
  n = 1497
  whole = data.train_index_dataset(n, batch_size=16, seed=3)
  for count in (2, 4):
    parts = [
      data.train_index_dataset(n, batch_size=16, seed=3, process_index=p, process_count=count)
      for p in range(count)
    ]
    for k in (0, 1, 93, 94):  # 93 -> 94 crosses an epoch (1497 // 16 = 93 batches)
      assert all(len(ds[k]) == 16 // count for ds in parts)
      np.testing.assert_array_equal(np.concatenate([ds[k] for ds in parts]), whole[k])
  it = data.make_train_iterator(
    DIGITS16, global_batch_size=32, seed=3, process_index=1, process_count=2
  )
  assert next(it)["image"].shape[0] == 16
  # The position is global batches consumed: process 1 of 2's state resumes one process.
  next(it)
  one = data.make_train_iterator(DIGITS16, global_batch_size=32, seed=3)
  one.set_state(it.get_state())
  expected = _take(data.make_train_iterator(DIGITS16, global_batch_size=32, seed=3), 3)[2]
  np.testing.assert_array_equal(next(one)["image"], expected["image"])
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.make_train_iterator(DIGITS16, global_batch_size=33, seed=3, process_count=2)

  subset = np.arange(5, n, 7)
  _, y = data.load_split(DIGITS16, "train")
  ds = data.train_index_dataset(n, batch_size=16, seed=3, indices=subset)
  assert set(np.concatenate([ds[k] for k in range(30)]).tolist()) == set(subset.tolist())
  it = data.make_train_iterator(DIGITS16, global_batch_size=16, seed=3, indices=subset)
  for k in range(3):
    np.testing.assert_array_equal(next(it)["label"], y[ds[k]])


def test_eval_iterator_one_ordered_pass():
  x, y = data.load_split(DIGITS16, "test")
  batches = list(data.make_eval_iterator(DIGITS16, global_batch_size=128))
  assert [len(b["label"]) for b in batches] == [128, 128, 44]
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), x)


# ----------------------------------------------------------------------------- prepare


def _expected(path_or_image, res, center_crop=True, mode="RGB"):
  im = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
  im = im.convert(mode)
  w, h = im.size
  if center_crop:
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
  if im.size != (res, res):
    im = im.resize((res, res), Image.BICUBIC)
  x = np.asarray(im, np.uint8)
  return x[..., None] if x.ndim == 2 else x


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  files = []
  for cls in ("dog", "cat"):  # sorted -> cat = 0, dog = 1
    for i in range(10):
      sub = root / cls / ("nested" if i >= 8 else "")
      sub.mkdir(parents=True, exist_ok=True)
      w, h = (int(v) for v in rng.integers(9, 41, size=2))
      pix = rng.integers(0, 256, size=(h, w, 4 if i == 1 else 3), dtype=np.uint8)
      im = Image.fromarray(pix)
      if i == 2:
        im = im.convert("L")
      path = sub / f"img{i:02d}.{'jpg' if i == 3 else 'png'}"
      im.save(path)
      files.append(path)
  (root / "cat" / "notes.txt").write_text("not an image")
  files.sort(key=lambda p: p.relative_to(root).parts)
  labels = [0 if p.relative_to(root).parts[0] == "cat" else 1 for p in files]
  return root, files, labels


def test_prepare_folder_bit_exact_roundtrip(image_folder, tmp_path):
  root, files, labels = image_folder
  out = tmp_path / "ds"
  meta = prepare.prepare(str(root), str(out), 16, "train", num_workers=2)
  assert meta["splits"]["train"]["count"] == 20 and meta["class_names"] == ["cat", "dog"]
  on_disk = json.loads((out / "metadata.json").read_text())
  assert on_disk["num_classes"] == 2 and on_disk["channels"] == 3
  assert on_disk["resolution"] == 16 and on_disk["format_version"] == ar.FORMAT_VERSION
  expected = np.stack([_expected(p, 16) for p in files])
  raw, raw_labels = _read_split(str(out), "train")
  np.testing.assert_array_equal(raw, expected)
  np.testing.assert_array_equal(raw_labels, labels)

  cfg = dict(name="array_record", resolution=16, data_dir=str(out), num_examples=0)
  info = data.get_info(cfg)
  assert (info.num_train, info.num_test, info.class_names) == (20, 0, ("cat", "dog"))
  x, y = data.load_split(cfg, "train")
  np.testing.assert_array_equal(np.rint((x + 1.0) * 127.5).astype(np.uint8), expected)
  np.testing.assert_array_equal(y, labels)
  it = data.make_train_iterator(cfg, global_batch_size=8, seed=0)
  by_bytes = {img.tobytes(): lab for img, lab in zip(expected, labels, strict=True)}
  for _ in range(4):  # 32 examples: crosses an epoch of 20
    b = next(it)
    pix = np.rint((b["image"] + 1.0) * 127.5).astype(np.uint8)
    assert [by_bytes[p.tobytes()] for p in pix] == b["label"].tolist()

  with pytest.raises(FileExistsError, match="overwrite"):
    prepare.prepare(str(root), str(out), 16, "train")
  # A squashed (no crop) test split can join the same directory.
  prepare.prepare(str(root), str(out), 16, "test", center_crop=False)
  xt, _ = _read_split(str(out), "test")
  np.testing.assert_array_equal(xt, np.stack([_expected(p, 16, center_crop=False) for p in files]))
  assert data.get_info(cfg).num_test == 20
  with pytest.raises(ValueError, match="resolution"):
    prepare.prepare(str(root), str(out), 8, "val")


def test_prepare_binary_subprocess(image_folder, tmp_path):
  root, files, labels = image_folder
  out = tmp_path / "bin"
  cmd = [sys.executable, "-m", "common.data.prepare", f"--input={root}", f"--output={out}"]
  cmd += ["--resolution=8", "--split=test", "--center_crop=true"]
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  run = lambda args: subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
  r = run(cmd)
  assert r.returncode == 0, r.stderr
  x, y = _read_split(str(out), "test")
  np.testing.assert_array_equal(x, np.stack([_expected(p, 8) for p in files]))
  np.testing.assert_array_equal(y, labels)
  r = run(cmd)
  assert r.returncode != 0 and "--overwrite" in r.stderr
  assert run([*cmd, "--overwrite"]).returncode == 0


def test_prepare_npz_rgb_and_grey(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(7, 20, 30, 3), dtype=np.uint8)
  labels = np.array([0, 2, 1, 2, 0, 1, 1])
  np.savez(tmp_path / "rgb.npz", images=images, labels=labels)
  meta = prepare.prepare(str(tmp_path / "rgb.npz"), str(tmp_path / "rgb"), 12)
  assert meta["class_names"] == ["0", "1", "2"] and meta["channels"] == 3
  x, y = _read_split(str(tmp_path / "rgb"), "train")
  np.testing.assert_array_equal(x, np.stack([_expected(Image.fromarray(i), 12) for i in images]))
  np.testing.assert_array_equal(y, labels)

  grey = images[..., 0]
  np.savez(tmp_path / "grey.npz", images=grey)
  meta = prepare.prepare(str(tmp_path / "grey.npz"), str(tmp_path / "grey"), 20)
  assert meta["channels"] == 1 and meta["num_classes"] == 1
  cfg = dict(name="array_record", resolution=20, data_dir=str(tmp_path / "grey"))
  xg, yg = data.load_split(cfg, "train")
  exp = np.stack([_expected(Image.fromarray(i), 20, mode="L") for i in grey])
  assert xg.shape == (7, 20, 20, 1) and not yg.any()
  np.testing.assert_array_equal(np.rint((xg + 1.0) * 127.5).astype(np.uint8), exp)


def test_array_record_config_errors(tmp_path):
  missing = str(tmp_path / "nope")
  cfg = dict(name="array_record", resolution=16, data_dir=missing)
  with pytest.raises(FileNotFoundError, match=r"data\.data_dir=.*nope.*common\.data\.prepare"):
    data.get_info(cfg)
  with pytest.raises(FileNotFoundError, match=r"data\.data_dir.*common\.data\.prepare"):
    data.make_train_iterator(dict(cfg, data_dir=""), global_batch_size=4, seed=0)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"metadata\.json.*common\.data\.prepare"):
    data.load_split(dict(cfg, data_dir=str(tmp_path / "empty")), "train")
  images = np.zeros((3, 16, 16, 3), np.uint8)
  np.savez(tmp_path / "x.npz", images=images)
  prepare.prepare(str(tmp_path / "x.npz"), str(tmp_path / "ds"), 16)
  wrong = dict(cfg, data_dir=str(tmp_path / "ds"), resolution=32)
  with pytest.raises(ValueError, match=r"data\.resolution=32.*resolution 16"):
    data.get_info(wrong)
  with pytest.raises(ValueError, match=r"no split 'test'.*\['train'\]"):
    data.load_split(dict(wrong, resolution=16), "test")
  (tmp_path / "ds" / "metadata.json").write_text('{"format": "segdiff-im')  # a torn file
  with pytest.raises(ValueError, match=r"metadata\.json: not valid JSON.*common\.data\.prepare"):
    data.get_info(dict(wrong, resolution=16))


# ----------------------------------------------------------------------------- partition


@pytest.fixture(scope="module")
def labels():
  return np.random.default_rng(0).integers(0, 10, size=2000)


def _check_disjoint_cover(parts, n):
  allidx = np.concatenate(parts)
  assert len(allidx) == len(np.unique(allidx)) == n
  np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


def test_partition_iid(labels):
  parts = partition.partition_indices(labels, 7, "iid", seed=0)
  _check_disjoint_cover(parts, len(labels))
  assert max(map(len, parts)) - min(map(len, parts)) <= 1
  again = partition.partition_indices(labels, 7, "iid", seed=0)
  other = partition.partition_indices(labels, 7, "iid", seed=1)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
  assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@pytest.mark.parametrize("num_clients,cpc", [(10, 2), (5, 2), (4, 3)])
def test_partition_by_class(labels, num_clients, cpc):
  parts = partition.partition_indices(labels, num_clients, "by_class", 0, classes_per_client=cpc)
  _check_disjoint_cover(parts, len(labels))
  held = partition.class_assignment(10, num_clients, cpc)
  holders = np.bincount(np.concatenate(held), minlength=10)
  assert holders.min() >= 1 and holders.max() - holders.min() <= 1
  for part, classes in zip(parts, held, strict=True):
    assert sorted(set(labels[part].tolist())) == classes
  again = partition.partition_indices(labels, num_clients, "by_class", 0, classes_per_client=cpc)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_partition_dirichlet_nonempty_and_skewed(labels):
  def skew(parts):  # mean over clients of the share of their most common class
    return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

  small = partition.partition_indices(labels, 10, "dirichlet", seed=0, alpha=0.1)
  _check_disjoint_cover(small, len(labels))
  assert min(map(len, small)) >= 1
  large = partition.partition_indices(labels, 10, "dirichlet", seed=0, alpha=100.0)
  _check_disjoint_cover(large, len(labels))
  assert skew(small) > 0.5 > 0.25 > skew(large)
  again = partition.partition_indices(labels, 10, "dirichlet", seed=0, alpha=0.1)
  assert all(np.array_equal(a, b) for a, b in zip(small, again, strict=True))


def test_partition_errors(labels):
  with pytest.raises(ValueError, match="unknown partition scheme 'shards'"):
    partition.partition_indices(labels, 4, "shards", 0)
  with pytest.raises(ValueError, match="classes_per_client"):
    partition.partition_indices(labels, 4, "by_class", 0, classes_per_client=11)
  with pytest.raises(ValueError, match="alpha"):
    partition.partition_indices(labels, 4, "dirichlet", 0, alpha=0.0)


def test_pipeline_module_exports():
  assert data.DatasetInfo is pipeline.DatasetInfo and "array_record" in data.NAMES
