r"""Converts pytorch-fid's FID Inception weights (.pth) into the flat .npz that JAX loads.

One-time setup, on a machine with internet access (this repo never downloads anything):

  1. Download ``pt_inception-2015-12-05-6726825d.pth`` (the standard FID Inception weights, a port
     of TF's 2015-12-05 Inception graph) from the pytorch-fid GitHub releases:
       https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
     The ``6726825d`` in the name is the start of the file's sha256; check it with ``sha256sum``.
  2. With PyTorch installed (only this converter needs it):
       python -m common.metrics.convert_inception \
         --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz
     It drops ``fc.*`` (pool3 features do not use the classifier) and ``num_batches_tracked``,
     checks every array against ``INCEPTION_SHAPES``, writes the .npz and prints its sha256.
  3. Copy ``inception_fid.npz`` wherever it is needed and load it with
       ``load_inception('inception_fid.npz', expected_sha256='<printed sha256>')``.
     The .npz is written reproducibly (fixed timestamps, sorted, uncompressed members), so the same
     .pth gives the same sha256 on every machine; pin that hash in configs.
"""

import sys

import numpy as np
from absl import app, flags

from common.metrics import inception

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
flags.DEFINE_string("output", "inception_fid.npz", "Where to write the flat float32 .npz.")
flags.mark_flag_as_required("input")


def convert_state_dict(state_dict) -> dict[str, np.ndarray]:
  """PyTorch state dict (tensors or arrays) -> checked flat {key: float32 array}, no fc/counters."""
  arrays = {}
  for key, value in state_dict.items():
    # fc.* is the 1008-way classifier (unused for pool3); num_batches_tracked is a training
    # counter that some BatchNorm versions save. Neither is a feature-network weight.
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
      continue
    if hasattr(value, "detach"):
      value = value.detach().cpu().numpy()
    arrays[key] = np.asarray(value, np.float32)
  inception.check_state_dict(arrays, FLAGS.input if FLAGS.is_parsed() else "state dict")
  return arrays


def main(argv):
  del argv
  try:
    # Imported here so the rest of the repo (and its tests) never depends on PyTorch.
    import torch
  except ImportError:
    sys.exit(
      "convert_inception needs PyTorch to read the .pth file (`pip install torch`, CPU build is "
      "enough); it is only needed for this one-time conversion."
    )
  state_dict = torch.load(FLAGS.input, map_location="cpu")
  # Some releases wrap the weights (e.g. {'state_dict': ...}); pytorch-fid's file is the bare dict.
  if isinstance(state_dict, dict) and "state_dict" in state_dict:
    state_dict = state_dict["state_dict"]
  arrays = convert_state_dict(state_dict)
  sha = inception.save_state_dict(arrays, FLAGS.output)
  n_params = sum(a.size for a in arrays.values())
  print(f"wrote {FLAGS.output}: {len(arrays)} arrays, {n_params} values")
  print(f"sha256 {sha}")


if __name__ == "__main__":
  app.run(main)
