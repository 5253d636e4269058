"""The example method (``tests/example_method``): P2-weighted v-prediction DDPM on digits.

Presets (``--config=tests/example_method/config.py:<preset>``): ``digits`` (``configs/ddpm.py``'s
digits preset with P2 weights), ``tiny`` (a few seconds, for the tests).
"""

import ml_collections

from configs import ddpm


def get_config(preset: str = "digits") -> ml_collections.ConfigDict:
  """Returns the config for ``preset``; see the module docstring for the list."""
  if preset not in ("digits", "tiny"):
    raise ValueError(f"unknown preset {preset!r}; allowed: digits, tiny")
  c = ddpm.get_config("digits")
  c.method = "tests.example_method"  # load_method imports tests.example_method.method
  c.diffusion.parameterization = "v"
  c.p2 = ml_collections.ConfigDict()
  c.p2.gamma = 1.0  # Choi et al.'s gamma; 0 gives the baseline's L_simple
  c.p2.k = 1.0
  if preset == "tiny":
    c.model.channels = (8, 16)
    c.model.attention_resolutions = ()
    c.batch_size = 8
    c.mesh.data = 1
    c.total_steps = c.ckpt_every_steps = c.sample_every_steps = 4
    c.log_every_steps = 2
    c.optimizer.warmup_steps = 0
    c.diffusion.sample_steps = 4
    c.num_sample_images = 4
  return c
