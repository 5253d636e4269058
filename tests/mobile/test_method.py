"""The mobile method over the shared loop: start-up errors that name the field, a tiny training
run through ``mobile.train``'s loop, and the on-device export (``jax.export`` artifacts that a
jax-only loader runs to the in-repo model's outputs)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import data
from common.eval import load_params
from common.train import loop
from common.train.validate import ConfigError
from configs import mobile as mobile_configs
from mobile import export, formulas
from mobile.method import Mobile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**overrides):
  """Config I on the 8x8 digits with D=16, N=2: a step takes milliseconds."""
  c = mobile_configs.get_config("digits_config1")
  c.model.width = 16
  c.model.depth = 2
  c.model.num_heads = 2
  c.diffusion.num_timesteps = 20
  c.diffusion.sample_steps = 3
  c.batch_size = 8
  c.total_steps = 2
  c.optimizer.warmup_steps = 1
  c.log_every_steps = 1
  c.ckpt_every_steps = 2
  c.sample_every_steps = 0
  c.num_sample_images = 4
  c.mesh.data = 1
  c.update_from_flattened_dict(overrides)
  return c


def random_params(method, seed=0, scale=0.2):
  """Every parameter random (a fresh TFDiff outputs exactly 0: adaLN-Zero and a zero head).

  Shaped abstractly and filled from numpy: an eager init compiles one program per shape.
  """
  leaves, treedef = jax.tree.flatten(jax.eval_shape(method.init_params, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
    treedef, [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves]
  )


def test_presets_keep_the_shared_keys_and_build():
  from configs import ddpm

  shared = set(ddpm.base_config().to_dict())
  for preset in ("digits_config1", "digits_config2", "shapes_config1", "shapes_config2",
                 "celeba64_config1", "celeba64_config2", "cifar10"):  # fmt: skip
    c = mobile_configs.get_config(preset)
    assert shared <= set(c.to_dict()), preset
    assert c.method == "mobile" and c.model.name == "tfdiff"
  assert mobile_configs.get_config("digits_config1").model.stride == 2
  assert mobile_configs.get_config("digits_config2").model.stride == 1
  celeba = mobile_configs.get_config("celeba64_config2")
  info = data.DatasetInfo("celeba64", 1, 1, 64, 3, 0, ())
  assert formulas.param_count(Mobile(celeba, info).spec()) == 57_908_739


@pytest.mark.parametrize(
  "overrides,field,words",
  [
    ({"model.stride": 3}, "data.resolution", "divisible by the initial conv's stride"),
    ({"model.width": 30, "model.num_heads": 4}, "model.num_heads", "model.width=30"),
    ({"model.upsample": "bilinear"}, "model.upsample", "allowed"),
    ({"model.layer_loop": "vmap"}, "model.layer_loop", "allowed"),
    ({"optimizer.schedule": "step"}, "optimizer.schedule", "allowed"),
  ],
)
def test_bad_config_is_refused_naming_the_field(tmp_path, overrides, field, words):
  with pytest.raises(ConfigError) as err:
    loop.setup(tiny_config(**overrides), devices=jax.devices()[:1])
  msg = str(err.value)
  assert msg.startswith(f"config error: {field}=") and words in msg and "\n" not in msg


def test_binary_refuses_bad_stride_with_one_line(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "mobile.train", "--config=configs/mobile.py:digits_config1",
     f"--workdir={tmp_path / 'run'}", "--config.model.stride=3"],
    cwd=REPO, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("config error: data.resolution=8:"), lines
  assert not os.path.exists(tmp_path / "run")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mobile") / "run")
  loop.train(tiny_config(), workdir, devices=jax.devices()[:1])
  return workdir


def test_training_runs_the_tfdiff_network_with_a_cosine_schedule(trained):
  with open(os.path.join(trained, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  assert [r["step"] for r in records] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in records)
  config, method, params, step = load_params(trained)
  assert step == 2 and isinstance(method, Mobile)
  assert sum(np.size(a) for a in jax.tree.leaves(params)) == formulas.param_count(method.spec())
  # FLOPs per sample are counted on the unrolled stack (a scan's body is counted once, which
  # would give ~1/N of it); at D=16 elementwise work adds ~14% to the matmul formula.
  per_call = method.flops_per_sample(params) / config.diffusion.sample_steps
  assert per_call == pytest.approx(formulas.flops(method.spec()), rel=0.2)
  # Cosine: warm-up to the peak at step 1, then down to 0 at total_steps.
  _, lr = method.make_optimizer()
  assert float(lr(1)) == pytest.approx(config.optimizer.learning_rate)
  assert float(lr(config.total_steps)) == pytest.approx(0.0, abs=1e-9)


def test_export_binary_writes_artifacts_and_manifest(trained, tmp_path):
  out = str(tmp_path / "export")
  proc = subprocess.run(
    [sys.executable, "-m", "mobile.export", f"--workdir={trained}", f"--out={out}"],
    cwd=REPO, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(os.path.join(out, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["checkpoint_step"] == 2
  assert sorted(manifest["artifacts"]) == [
    "denoiser_bfloat16", "denoiser_float32", "sampler_bfloat16", "sampler_float32"
  ]  # fmt: skip
  assert manifest["artifacts"]["sampler_float32"]["inputs"] == [
    {"name": "x_T", "shape": [1, 8, 8, 1], "dtype": "float32"}
  ]
  schedule = manifest["schedule"]
  assert schedule["levels"][0] == 20 and schedule["levels"][-1] == 0
  assert len(schedule["model_timesteps"]) == schedule["num_steps"] == 3
  for a in manifest["artifacts"].values():
    assert os.path.getsize(os.path.join(out, a["file"])) == a["bytes"]


_LOADER = """
import json, sys
import numpy as np
sys.path.insert(0, {mobile_dir!r})
import runtime  # the loader file alone, imported outside the repo's packages
art = runtime.load_export({export_dir!r})
io = np.load({io!r})
out = {{}}
for dtype in ("float32", "bfloat16"):
  out["den_" + dtype] = np.asarray(art.denoiser(dtype)(io["x"], io["t"], io["y"]))
  out["smp_" + dtype] = np.asarray(art.sampler(dtype)(io["x"], io["y"]))
np.savez({result!r}, **out)
banned = [m for m in sys.modules if m.split(".")[0] in ("flax", "common", "mobile", "optax")]
print(json.dumps(banned))
"""


def test_exported_artifacts_match_the_model_and_need_only_jax(tmp_path):
  config = tiny_config(**{"model.class_conditional": True, "diffusion.cond_drop_prob": 0.1,
                          "diffusion.guidance_scale": 2.0})  # fmt: skip
  _, method = loop.setup(config, devices=jax.devices()[:1])
  params = random_params(method)
  out = str(tmp_path / "export")
  manifest = export.export_run(method, params, out, batch_size=2)
  assert manifest["num_classes"] == 10 and manifest["schedule"]["guidance_scale"] == 2.0

  rng = np.random.default_rng(0)
  io = {
    "x": rng.standard_normal((2, 8, 8, 1)).astype(np.float32),
    "t": np.array([3, 17], np.int32),
    "y": np.array([4, 10], np.int32),  # 10: the null label
  }
  np.savez(tmp_path / "io.npz", **io)
  script = _LOADER.format(
    mobile_dir=os.path.join(REPO, "mobile"), export_dir=out, io=str(tmp_path / "io.npz"),
    result=str(tmp_path / "result.npz"),
  )  # fmt: skip
  env = dict(os.environ, PYTHONPATH="")
  proc = subprocess.run(
    [sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True, text=True,
    timeout=300, env=env,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []  # no model code was imported
  got = np.load(tmp_path / "result.npz")

  x, t, y = jnp.asarray(io["x"]), jnp.asarray(io["t"]), jnp.asarray(io["y"])
  want_den = jax.jit(lambda p: method.apply(p, x, t, y))(params)
  assert float(jnp.abs(want_den).mean()) > 0.1
  np.testing.assert_allclose(got["den_float32"], want_den, rtol=1e-5, atol=1e-5)
  want_smp = jax.jit(lambda p: export.sampler_fn(method, p)(x, y))(params)
  np.testing.assert_allclose(got["smp_float32"], want_smp, rtol=1e-4, atol=1e-4)
  # bfloat16 weights and compute: close to float32, not equal.
  scale = float(jnp.abs(want_den).mean())
  assert float(np.abs(got["den_bfloat16"] - want_den).mean()) < 0.05 * scale
  assert not np.array_equal(got["den_bfloat16"], got["den_float32"])
  assert np.all(np.abs(got["smp_bfloat16"]) <= 1.0 + 1e-6)


def test_train_flops_count_every_block_of_the_scanned_stack(tmp_path):
  # XLA counts a loop's body once: the scanned stack's step read as one block (TFDiff Config I:
  # 6.6e6 FLOPs an image, under a forward call's 1.1e7). Counted unrolled, both loops agree.
  from common.train import compute

  spent = {}
  for layer_loop in ("scan", "unroll"):
    config = tiny_config(**{"model.depth": 4, "model.layer_loop": layer_loop})
    wd = str(tmp_path / layer_loop)
    loop.train(config, wd, devices=jax.devices()[:1])
    spent[layer_loop] = compute.read(wd)
  assert spent["scan"]["segments"][0]["flops_from"] == "unrolled"
  assert spent["unroll"]["segments"][0]["flops_from"] == "lowered"
  assert spent["scan"]["flops_per_image"] == pytest.approx(
    spent["unroll"]["flops_per_image"], rel=1e-4
  )
  method = Mobile(tiny_config(**{"model.depth": 4}), data.get_info(tiny_config().data))
  forward = method.denoiser_call_flops(random_params(method), 1)
  assert spent["scan"]["flops_per_image"] > 2.5 * forward
