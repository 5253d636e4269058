"""benchmarks/vs_pytorch.py: the PyTorch U-Net and TFDiff block are the JAX ones, and the driver runs.

Same parameter counts from the same config, the same outputs from the same weights (copied from
JAX by ``torch_unet.load_jax_params``), the same loss, learning rates and DDIM samples; then the
driver's quick mode end to end. PyTorch is an optional extra: without it every test here skips.
"""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch_ddpm  # noqa: E402
import torch_tfdiff  # noqa: E402
import torch_unet  # noqa: E402

from common import data, models  # noqa: E402
from common.diffusion import sampling  # noqa: E402
from common.train import method as method_lib  # noqa: E402
from configs import ddpm  # noqa: E402
from configs import mobile as mobile_configs  # noqa: E402

# Float32 reassociation (XLA vs oneDNN convolutions, fused vs split softmax) over ~20 layers.
ATOL = 5e-5


def _method(preset, **overrides):
  config = ddpm.get_config(preset)
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  info = data.get_info(config.data)
  return config, info, method_lib.load_method(config, info)


def _perturbed(params, seed=1, scale=0.05):
  """Every weight moved off its init, so the zero-initialised layers carry signal too."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    treedef, [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
  )


def _nchw(a):
  return torch.from_numpy(np.array(a, np.float32)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("preset, expected", [("digits", 826_337), ("shapes", 7_662_723)])
def test_parameter_count_equals_jax(preset, expected):
  config, info, method = _method(preset)
  jax_count = models.count_params(jax.eval_shape(method.init_params, jax.random.key(0)))
  net = torch_unet.unet_from_config(config, in_channels=info.channels, num_classes=info.num_classes)
  assert torch_unet.count_params(net) == jax_count == expected


@pytest.mark.parametrize("preset", ["digits", "shapes"])
def test_same_weights_same_output(preset):
  config, info, method = _method(preset)
  params = _perturbed(method.init_params(jax.random.key(0)))
  net = torch_unet.unet_from_config(config, in_channels=info.channels, num_classes=info.num_classes)
  torch_unet.load_jax_params(net, params)  # raises on any name or shape that does not match
  r, c = info.resolution, info.channels
  x = np.random.default_rng(0).normal(size=(3, r, r, c)).astype(np.float32)
  t = np.array([0, 417, 999], np.int32)
  y = np.array([1, 4, info.num_classes], np.int32) if method.class_conditional else None
  want = np.asarray(method.apply(params, x, t, None if y is None else jnp.asarray(y)))
  with torch.no_grad():
    got = net.eval()(
      _nchw(x), torch.from_numpy(t).long(), None if y is None else torch.from_numpy(y).long()
    )
  got = got.permute(0, 2, 3, 1).numpy()
  assert np.abs(want).max() > 0.1  # the comparison is not between two zero outputs
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-4)


def test_loss_learning_rate_and_ddim_samples_match():
  config, info, method = _method("digits", **{"diffusion.sample_steps": 5})
  params = _perturbed(method.init_params(jax.random.key(0)), scale=0.02)
  net = torch_unet.unet_from_config(config, in_channels=info.channels, num_classes=info.num_classes)
  torch_unet.load_jax_params(net, params)
  net.eval()
  schedule = torch_ddpm.Schedule(config.diffusion)

  # The training loss for the same (x0, t, noise).
  rng = np.random.default_rng(1)
  x0 = rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
  noise = rng.normal(size=x0.shape).astype(np.float32)
  t = np.array([3, 250, 600, 998], np.int32)
  terms = method.diffusion.training_losses(
    lambda x, tt, yy: method.apply(params, x, tt, yy), x0, t, noise
  )
  with torch.no_grad():
    loss = torch_ddpm.DiffusionLoss(net, schedule)(
      _nchw(x0), torch.from_numpy(t).long(), _nchw(noise), None
    )
  np.testing.assert_allclose(float(loss), float(jnp.mean(terms["loss"])), rtol=1e-5)

  # The learning-rate schedule (warm-up, then constant) at every update index.
  _, lr = method.make_optimizer()
  for step in (0, 1, 50, 99, 100, 1999):
    assert torch_ddpm.lr_at(config.optimizer, config.total_steps, step) == pytest.approx(
      float(lr(step)),
      rel=1e-5,  # optax computes it in float32
    )

  # DDIM (eta 0) from the same x_T: deterministic, so the two chains must meet.
  key = jax.random.key(7)
  want = method.sample(params, key, 4)
  x_t = sampling.initial_noise(key, (4, 8, 8, 1))
  got = torch_ddpm.sample(net, config, schedule, _nchw(x_t)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_trainer_updates_params_and_ema():
  config, info, _ = _method("shapes", **{"batch_size": 2})
  net = torch_unet.unet_from_config(config, in_channels=info.channels, num_classes=info.num_classes)
  trainer = torch_ddpm.TorchTrainer(net, config, num_classes=info.num_classes)
  before = [p.detach().clone() for p in trainer.params]
  x0 = torch.rand(2, 3, 32, 32) * 2 - 1
  labels = torch.tensor([0, 5])
  for _ in range(2):  # step 0 has lr 0 (warm-up from 0, as optax's schedule)
    loss = trainer.step(x0, labels)
  assert torch.isfinite(loss)
  moved = sum(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.params, strict=True))
  assert moved > 0
  decay = config.ema_decay
  # Two EMA updates of a parameter that moved only in the second step.
  p = trainer.params[0].detach()
  expected = before[0] + (1 - decay) * (p - before[0])
  torch.testing.assert_close(trainer.ema[0], expected, atol=1e-7, rtol=1e-6)


def test_tfdiff_block_matches_jax():
  from flax import nnx

  from mobile import formulas
  from mobile.model import CoreBlock
  from mobile.spec import spec_from_config

  config = mobile_configs.get_config("digits_config1")
  info = data.get_info(config.data)
  spec = spec_from_config(config, in_channels=info.channels, num_classes=info.num_classes)
  block = CoreBlock(spec, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(block, nnx.Param)
  params = _perturbed(nnx.to_pure_dict(state), scale=0.1)  # adaLN-Zero gates off zero
  ours = torch_tfdiff.CoreBlock(spec)
  assert torch_unet.count_params(ours) == formulas.block_params(spec)
  torch_unet.load_jax_params(ours, params)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 4, 4, spec.width)).astype(np.float32)
  c = rng.normal(size=(2, spec.d_cond)).astype(np.float32)
  nnx.replace_by_pure_dict(state, params)
  want = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(x), jnp.asarray(c)))
  with torch.no_grad():
    got = ours(torch.from_numpy(x), torch.from_numpy(c)).numpy()
  assert np.abs(want - x).max() > 0.1  # the block is not the identity here
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-4)


@pytest.mark.slow
def test_driver_quick_mode_prints_json_ratio():
  # torch.compile is left out: on 2 CPU cores its three compiles take minutes.
  cmd = [
    sys.executable,
    os.path.join(ROOT, "benchmarks", "vs_pytorch.py"),
    "--config=configs/ddpm.py:digits",
    "--config.batch_size=8",
    "--config.diffusion.sample_steps=3",
    "--variants=jax,jax-xla,eager@1",
    "--quick",
  ]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  summary = json.loads(lines[-1])
  assert summary["errors"] == {}
  assert summary["params"] == {"jax": 826_337, "jax-xla": 826_337, "eager@1": 826_337}
  # jax-xla (XLA's own defaults) is JAX, never the PyTorch side, nor the headline's JAX figure.
  assert summary["best_torch"] == "eager@1"
  assert summary["ratio_jax_over_best_torch"] > 0
  for variant in ("jax", "jax-xla", "eager@1"):
    assert set(summary["results"][variant]) == {"train", "sample", "block"}
  assert summary["flops"]["train"] > 0
  assert any(line.startswith("headline: JAX train step / best PyTorch") for line in lines)
  assert "load average" in out.stdout
