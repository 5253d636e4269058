"""``common.data.prepare`` on bad input: one line naming the file, exit 2, nothing left behind."""

import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from common import data
from common.data import array_record as ar
from common.data import prepare
from common.train.validate import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read_split(data_dir, split: str) -> tuple[np.ndarray, np.ndarray]:
  """A prepared split read back through the pipeline (``data.load_split``), as its stored uint8."""
  res = ar.read_metadata(str(data_dir))["resolution"]
  cfg = dict(name="array_record", resolution=res, data_dir=str(data_dir), num_examples=0)
  x, y = data.load_split(cfg, split)
  return np.rint((x + 1.0) * 127.5).astype(np.uint8), y


def _png_bytes(w: int, h: int, seed: int = 0) -> bytes:
  pix = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pix).save(buf, format="PNG")
  return buf.getvalue()


def _declaring(w: int, h: int) -> bytes:
  """A valid 1x1 PNG whose IHDR (checksum fixed) declares w x h: a decompression bomb's header."""
  data = bytearray(_png_bytes(1, 1))
  assert data[12:16] == b"IHDR"
  data[16:24] = struct.pack(">II", w, h)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  return bytes(data)


def _folder(root, bad_name: str | None = None, bad: bytes = b"") -> str:
  """Two classes of small good images; ``bad`` written as ``dog/<bad_name>`` (sorted last)."""
  for cls in ("cat", "dog"):
    os.makedirs(root / cls, exist_ok=True)
    for i in range(3):
      (root / cls / f"img{i}.png").write_bytes(_png_bytes(12 + i, 10, seed=i))
  if bad_name:
    (root / "dog" / bad_name).write_bytes(bad)
  return str(root)


def _snapshot(directory) -> dict[str, bytes] | None:
  if not os.path.isdir(directory):
    return None
  return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))}


BAD_FILES = {
  "empty.png": (b"", r"is empty \(0 bytes\)"),
  "truncated.png": (_png_bytes(64, 64)[:600], r"cannot be read or decoded \(OSError: .*truncated"),
  # In process PIL's own limit (2 x Image.MAX_IMAGE_PIXELS) refuses it inside Image.open.
  "bomb.png": (_declaring(20000, 20000), r"refused before decoding.*400000000 pixels"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_image_refused_naming_it_and_new_output_dir_not_left(tmp_path, name):
  bad, message = BAD_FILES[name]
  src = _folder(tmp_path / "in", name, bad)
  out = tmp_path / "out"
  with pytest.raises(ConfigError, match=message) as err:
    prepare.prepare(src, str(out), 8, num_workers=2)
  line = str(err.value)
  assert "\n" not in line and os.path.join(src, "dog", name) in line
  assert not out.exists()  # created by the failed call, removed again


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_image_leaves_an_existing_output_dir_as_it_was(tmp_path, name):
  bad, message = BAD_FILES[name]
  good, out = _folder(tmp_path / "good"), tmp_path / "out"
  prepare.prepare(good, str(out), 8, "train")
  before = _snapshot(out)
  src = _folder(tmp_path / "in", name, bad)
  for split, overwrite in (("train", True), ("test", False)):  # replacing a split, adding one
    with pytest.raises(ConfigError, match=message):
      prepare.prepare(src, str(out), 8, split, overwrite=overwrite, num_workers=2)
    assert _snapshot(out) == before  # no temporary file, the old split and metadata intact
  assert _read_split(str(out), "train")[0].shape == (6, 8, 8, 3)


def test_declared_size_over_the_cap_is_refused_before_decoding(tmp_path):
  src = _folder(tmp_path / "in", "big.png", _png_bytes(40, 30))
  with pytest.raises(ConfigError, match=r"big\.png.*declares 40x30 = 1,200 pixels.*--max_pixels"):
    prepare.prepare(src, str(tmp_path / "out"), 8, max_pixels=1000)
  assert prepare.default_max_pixels(64) == prepare.PIL_DEFAULT_MAX_PIXELS
  assert prepare.default_max_pixels(4096) == (8 * 4096) ** 2
  prepare.prepare(src, str(tmp_path / "out"), 8, max_pixels=1200)  # at the cap: accepted


def test_binary_exits_2_with_one_line_for_a_decompression_bomb(tmp_path):
  src = _folder(tmp_path / "in", "bomb.png", _declaring(20000, 20000))
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "common.data.prepare", f"--input={src}", f"--output={out}"]
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run(
    [*cmd, "--resolution=8"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
  )
  assert r.returncode == 2, r.stderr
  lines = [line for line in r.stderr.splitlines() if "bomb.png" in line]
  assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
  # The binary lifts PIL's global limit: its own check of the declared size refuses the file.
  assert "declares 20000x20000 = 400,000,000 pixels, over the cap of 89,478,485" in lines[0]
  assert "refused before decoding" in lines[0] and r.stderr.rstrip().endswith(lines[0])
  assert not out.exists()


def test_symlink_out_of_the_input_folder_refused_unless_asked(tmp_path):
  src = _folder(tmp_path / "in")
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  (outside / "x.png").write_bytes(_png_bytes(9, 9, seed=7))
  link = os.path.join(src, "cat", "z_link.png")
  os.symlink(outside / "x.png", link)
  with pytest.raises(ConfigError, match=r"z_link\.png.*symlink to .*elsewhere.*--follow_symlinks"):
    prepare.prepare(src, str(tmp_path / "out"), 8)
  assert not (tmp_path / "out").exists()
  meta = prepare.prepare(src, str(tmp_path / "out"), 8, follow_symlinks=True)
  assert meta["splits"]["train"]["count"] == 7

  os.remove(link)
  os.symlink(outside, os.path.join(src, "dog", "more"))  # a folder link pointing out
  with pytest.raises(ConfigError, match=r"dog/more'.*outside --input.*--follow_symlinks"):
    prepare.prepare(src, str(tmp_path / "out2"), 8)
  os.symlink(os.path.join(src, "dog"), os.path.join(src, "dog", "loop"))  # a cycle
  meta = prepare.prepare(src, str(tmp_path / "out2"), 8, follow_symlinks=True)
  assert meta["splits"]["train"]["count"] == 7  # the linked folder once, the cycle not followed


def test_symlink_inside_the_input_folder_is_read_as_before(tmp_path):
  src = _folder(tmp_path / "in")
  os.symlink(os.path.join(src, "cat", "img0.png"), os.path.join(src, "dog", "img9.png"))
  meta = prepare.prepare(src, str(tmp_path / "out"), 8)
  assert meta["splits"]["train"]["count"] == 7
  x, y = _read_split(str(tmp_path / "out"), "train")
  np.testing.assert_array_equal(x[0], x[-1])  # cat/img0 and its link dog/img9
  assert y.tolist() == [0, 0, 0, 1, 1, 1, 1]
