"""Tests for cdc.moving_shapes (devices, held-out split, determinism, answers) and
cdc.feature_benchmark (the real-benchmark feature loader)."""

import numpy as np
import pytest

from cdc import data, feature_benchmark, moving_shapes
from common.data import shapes

SMALL = dict(
  num_devices=20,
  num_heldout=5,
  resolution=8,
  num_frames=4,
  pool_videos=4,
  train_videos=6,
  test_videos=6,
  source_train_videos=6,
  source_test_videos=4,
)


def _ds(**kw):
  return moving_shapes.MovingShapes(**{**SMALL, **kw})


# ----------------------------------------------------------------------------- held-out devices


def test_heldout_devices_are_fixed_disjoint_and_independent_of_other_seeds():
  ds = _ds()
  meta, held = ds.meta_train_devices, ds.heldout_devices
  assert len(held) == 5 and len(meta) == 15
  assert len(np.intersect1d(meta, held)) == 0
  np.testing.assert_array_equal(np.union1d(meta, held), np.arange(20))
  # The dataset seed (shifts, videos) does not move the split; the split seed does.
  np.testing.assert_array_equal(_ds(dataset_seed=3).heldout_devices, held)
  assert not np.array_equal(_ds(split_seed=1).heldout_devices, held)


def test_check_meta_train_refuses_heldout_and_unknown_devices():
  ds = _ds()
  ok = ds.check_meta_train(ds.meta_train_devices)
  np.testing.assert_array_equal(ok, ds.meta_train_devices)
  with pytest.raises(ValueError, match=f"device {ds.heldout_devices[0]} is held out"):
    ds.check_meta_train([ds.meta_train_devices[0], ds.heldout_devices[0]])
  with pytest.raises(ValueError, match="not a device id"):
    ds.check_meta_train([20])
  with pytest.raises(ValueError, match="num_heldout"):
    _ds(num_heldout=20)


# ----------------------------------------------------------------------------- videos


def test_domain_shapes_ranges_and_determinism():
  ds = _ds()
  dev = int(ds.heldout_devices[0])
  a = ds.domain(dev, "test")
  assert a.frames.shape == (6, 4, 8, 8, 3) and a.frames.dtype == np.float32
  assert a.frames.min() >= -1.0 and a.frames.max() <= 1.0
  assert a.questions.shape == (6, moving_shapes.QUESTION_LEN) and a.captions.shape == (6, 11)
  np.testing.assert_array_equal(a.question_video, np.arange(6))
  # Video i depends only on (dataset seed, device, split, i): alone, in a prefix, in a new object.
  b = _ds().domain(dev, "test", num_videos=3)
  np.testing.assert_array_equal(a.frames[:3], b.frames)
  np.testing.assert_array_equal(a.answers[:3], b.answers)
  alone = ds.render(ds.shift(dev), ds.sample_videos(dev, "test", [4]))
  np.testing.assert_array_equal(shapes.to_float(alone)[0], a.frames[4])
  # Different splits and devices give different videos.
  assert not np.array_equal(ds.domain(dev, "pool", 3).frames, b.frames)
  assert not np.array_equal(ds.domain(int(ds.heldout_devices[1]), "test", 3).frames, b.frames)


def test_answers_match_the_video_content():
  ds = _ds(resolution=16, test_videos=40)
  dev = 3
  videos = ds.sample_videos(dev, "test", range(40))
  dom = ds.domain(dev, "test")
  v = ds.vocab
  seen = set()
  for vid, q, ans in zip(videos, dom.questions, dom.answers, strict=True):
    words = [v.tokens[t] for t in q if t]
    answer = v.answers[ans]
    objs = vid["objects"]
    assert len({o["shape"] for o in objs}) == len(objs)  # distinct shapes: questions are unique
    assert len({o["colour"] for o in objs}) == len(objs)
    qtype = moving_shapes.QUESTION_TYPES[vid["qtype"]]
    seen.add(qtype)
    if qtype == "count":
      assert answer == moving_shapes.COUNT_WORDS[len(objs) - 1]
    elif qtype == "colour":
      (o,) = [o for o in objs if ds.shape_names[o["shape"]] == words[-1]]
      assert answer == moving_shapes.COLOURS[o["colour"]]
    elif qtype == "direction":
      (o,) = [o for o in objs if ds.shape_names[o["shape"]] == words[-2]]
      assert answer == moving_shapes.DIRECTIONS[o["direction"]]
    else:
      (o,) = [o for o in objs if moving_shapes.COLOURS[o["colour"]] == words[-1]]
      assert answer == ds.shape_names[o["shape"]]
  assert len(seen) >= 3


def test_objects_move_in_their_direction_and_stay_in_frame():
  ds = _ds(resolution=16, num_frames=8)
  for vid in ds.sample_videos(5, "train", range(30)):
    for o in vid["objects"]:
      d = moving_shapes.DIRECTIONS[o["direction"]]
      sign = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "static": (0, 0)}[d]
      assert np.sign(o["dx"]) == sign[0] and np.sign(o["dy"]) == sign[1]
      for t in (0, 7):
        for c in (o["x0"] + t * o["dx"], o["y0"] + t * o["dy"]):
          assert ds.object_radius <= c <= 1 - ds.object_radius


def test_device_shifts_differ_from_the_source_and_scale_to_zero():
  ds = _ds()
  src = ds.shift(data.SOURCE)
  assert src.hue_deg == 0 and src.noise_std == 0 and src.texture == "plain"
  shifts = [ds.shift(d) for d in range(20)]
  assert len({round(s.hue_deg, 3) for s in shifts}) == 20
  assert max(abs(s.hue_deg) for s in shifts) > 10 and max(s.noise_std for s in shifts) > 10
  assert not np.allclose(shifts[0].question_mix, 0.25)
  calm = _ds(shift_scale=0.0).shift(0)
  assert calm.hue_deg == 0 and calm.noise_std == 0 and np.allclose(calm.count_prior, 1 / 3)
  with pytest.raises(ValueError, match="split 'pool'"):
    ds.domain(data.SOURCE, "pool")


def test_drift_stream_switches_device():
  ds = _ds()
  frames, source = ds.drift_stream(1, 2, num_windows=3, switch_at=1, videos_per_window=2)
  assert frames.shape == (3, 2, 4, 8, 8, 3)
  np.testing.assert_array_equal(source, [1, 2, 2])
  np.testing.assert_array_equal(frames[0], ds.domain(1, "pool", 2).frames)
  np.testing.assert_array_equal(frames[2], ds.domain(2, "pool", 4).frames[2:])


# ----------------------------------------------------------------------------- feature files


def _write_split(path, rng, v=12, t=5, dv=6, dq=4, domains=(0, 1, 2), qa=True, ret=True):
  arrays = {
    "frame_features": rng.normal(size=(v, t, dv)).astype(np.float16),
    "frame_mask": np.arange(t)[None] < rng.integers(1, t + 1, v)[:, None],
    "video_domain": np.array([domains[i % len(domains)] for i in range(v)]),
  }
  if qa:
    arrays.update(
      question_features=rng.normal(size=(2 * v, 3, dq)).astype(np.float32),
      question_mask=np.ones((2 * v, 3), bool),
      question_video=np.repeat(np.arange(v), 2),
      answers=rng.integers(0, 5, 2 * v),
      answer_vocab=np.array(["a", "b", "c", "d", "e"]),
    )
  if ret:
    arrays.update(
      caption_features=rng.normal(size=(v, 7, dq)).astype(np.float32),
      caption_video=np.arange(v)[::-1].copy(),
    )
  np.savez(path, **arrays)
  return arrays


def test_feature_split_loads_and_remaps_domains(tmp_path):
  rng = np.random.default_rng(0)
  arrays = _write_split(tmp_path / "train.npz", rng)
  split = feature_benchmark.load_feature_split(tmp_path / "train.npz")
  assert split.frame_features.dtype == np.float32 and split.answer_vocab == tuple("abcde")
  np.testing.assert_array_equal(split.domains, [0, 1, 2])
  dom = split.domain(1)
  vids = np.flatnonzero(arrays["video_domain"] == 1)
  np.testing.assert_array_equal(dom.frames, arrays["frame_features"][vids].astype(np.float32))
  assert dom.num_videos == len(vids) and len(dom.answers) == 2 * len(vids)
  # Every question / caption points at the remapped index of its original video.
  for i, qv in enumerate(dom.question_video):
    orig = vids[qv]
    j = np.flatnonzero(arrays["question_video"] == orig)
    assert any(np.array_equal(dom.questions[i], arrays["question_features"][jj]) for jj in j)
  for i, cv in enumerate(dom.caption_video):
    j = np.flatnonzero(arrays["caption_video"] == vids[cv])[0]
    np.testing.assert_array_equal(dom.captions[i], arrays["caption_features"][j])
  assert dom.caption_mask.all()  # default mask


def test_feature_benchmark_devices_and_qa_only_files(tmp_path):
  rng = np.random.default_rng(1)
  domains = tuple(range(6))
  _write_split(tmp_path / "train.npz", rng, v=24, domains=domains, ret=False)
  _write_split(tmp_path / "test.npz", rng, v=12, domains=domains, ret=False)
  bench = feature_benchmark.FeatureBenchmark(
    str(tmp_path), num_heldout=2, split_seed=0, source_domains=(5,)
  )
  assert len(bench.heldout_devices) == 2 and len(bench.meta_train_devices) == 3
  assert 5 not in bench.heldout_devices and 5 not in bench.meta_train_devices
  with pytest.raises(ValueError, match="held out"):
    bench.check_meta_train(bench.heldout_devices)
  test = bench.domain(int(bench.heldout_devices[0]), "test")
  assert test.captions.shape[0] == 0 and len(test.answers) > 0
  src = bench.domain(data.SOURCE, "train")
  assert src.num_videos == 4 and src.question_video.max() < 4


@pytest.mark.parametrize(
  "drop,edit,match",
  [
    ("video_domain", {}, "missing array 'video_domain'"),
    (None, {"question_video": np.full(24, 99)}, "question_video has an index outside"),
    (None, {"answers": np.full(24, 7)}, "answers has an id outside"),
    (None, {"frame_features": np.zeros((12, 5))}, "'frame_features' has shape"),
    (None, {"caption_video": np.arange(3)}, "do not match"),
    (None, {"caption_features": np.zeros((12, 7, 9), np.float32)}, "width 4 != caption_features"),
  ],
)
def test_feature_split_errors_name_the_key(tmp_path, drop, edit, match):
  arrays = _write_split(tmp_path / "x.npz", np.random.default_rng(2))
  if drop:
    arrays.pop(drop)
  arrays.update(edit)
  np.savez(tmp_path / "x.npz", **arrays)
  with pytest.raises(ValueError, match=match):
    feature_benchmark.load_feature_split(tmp_path / "x.npz")
  with pytest.raises(FileNotFoundError):
    feature_benchmark.load_feature_split(tmp_path / "missing.npz")
