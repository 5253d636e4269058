"""Fault injection shared by the packages' fault tests: damaged npz checkpoints and the binaries'
one-line refusals."""

import os
import subprocess
import sys

import numpy as np

from common import fileio

# What a checkpoint file meets: bytes overwritten, a truncation, a deletion, a valid zip whose
# array no longer matches its checksum, intact checksums over a NaN.
NPZ_DAMAGE = ("overwrite", "truncate", "delete", "altered", "nonfinite")


def damage_npz(path: str, how: str, key: str) -> None:
  """Damages the ``fileio.save_npz_checked`` file ``path`` the ``how`` way (``key``: the array
  that ``altered`` and ``nonfinite`` change)."""
  if how == "overwrite":
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 3)
      f.write(b"\x00garbage\xff" * 8)
  elif how == "truncate":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif how == "delete":
    os.remove(path)
  elif how == "altered":
    with np.load(path) as z:
      arrays = {k: z[k] for k in z.files}
    arrays[key] = arrays[key] + 1
    np.savez(path, **arrays)
  elif how == "nonfinite":
    arrays = fileio.load_npz_checked(path)
    arrays[key] = np.full_like(arrays[key], np.nan)
    fileio.save_npz_checked(path, **arrays)
  else:
    raise ValueError(how)


def run_binary(*args: str) -> tuple[int, list[str]]:
  """``python -m *args``: (exit code, stderr lines)."""
  out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
  return out.returncode, out.stderr.strip().splitlines()


def assert_refused_in_one_line(*args: str, starts: str, workdir) -> None:
  """``python -m *args`` exits 2 with one stderr line starting with ``starts``, and ``workdir``
  was not created."""
  rc, lines = run_binary(*args)
  assert rc == 2 and len(lines) == 1, lines
  assert lines[0].startswith(starts), lines
  assert not os.path.exists(str(workdir))
