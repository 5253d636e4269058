"""The hybrid sampler against the core's sampler, batching invariance, the data split, and
hybrid.train end to end (stages, frozen cluster network, resume, load_run, errors)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from common import data, renamed_fields
from common.diffusion import sampling
from common.train import method as method_lib
from common.train.validate import ConfigError
from configs import hybrid as hybrid_configs
from hybrid import data as hdata
from hybrid import method as hmethod
from hybrid import models, train


def _tiny(**overrides):
  c = hybrid_configs.get_config("tiny")
  c.update_from_flattened_dict(overrides)
  return c


def random_params(method, seed: int):
  """Random values in every leaf (the U-Net's zero-initialised output layer would make every
  network output 0, and every comparison below trivially true)."""
  abstract = jax.eval_shape(method.init_params, jax.random.PRNGKey(0))
  leaves, tree = jax.tree.flatten(abstract)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
    tree, [0.2 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
  )


@pytest.fixture(scope="module")
def random_models():
  """Untrained networks: the cluster and each user get their own random weights."""
  config = _tiny()
  method = hmethod.Hybrid(config, data.get_info(config.data))
  return method, models.from_params(config, random_params(method, 3), programs=method.programs)


def _personal(m, user: int):
  """User ``user``'s personalized network: its slice of the stacked tree."""
  return jax.tree.map(lambda a: a[user], m.personal_params)


_ALONE = {}


def _alone(m, params, key):
  """One request sampled by the core's own sampler with one network over the whole chain."""
  if "fn" not in _ALONE:

    def run(params, key):
      return sampling.sample(
        m.diffusion,
        m.denoise_fn(params),
        (1, *m.image_shape),
        key,
        num_steps=m.num_timesteps,
        sampler=m.config.diffusion.sampler,
      )[0]

    _ALONE["fn"] = jax.jit(run)
  return _ALONE["fn"](params, key)


def test_cut_point_zero_is_the_cluster_model_and_cut_point_t_the_personal_model(random_models):
  _, m = random_models
  big_t = m.num_timesteps
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  users = np.array([0, 1, 1, 0])
  out = np.asarray(models.hybrid_sample(m, users, np.array([0, 0, big_t, big_t]), keys))
  np.testing.assert_allclose(out[0], _alone(m, m.cluster_params, keys[0]), atol=2e-5)
  np.testing.assert_allclose(out[1], _alone(m, m.cluster_params, keys[1]), atol=2e-5)
  np.testing.assert_allclose(out[2], _alone(m, _personal(m, 1), keys[2]), atol=2e-5)
  np.testing.assert_allclose(out[3], _alone(m, _personal(m, 0), keys[3]), atol=2e-5)
  # The two ends really differ (else the checks above could not tell the networks apart).
  assert np.abs(out[2] - np.asarray(_alone(m, m.cluster_params, keys[2]))).max() > 1e-2


def test_intermediate_cut_point_is_the_core_two_segment_chain(random_models):
  _, m = random_models
  big_t, n = m.num_timesteps, 9
  key = jax.random.PRNGKey(5)
  out = models.hybrid_sample(m, np.array([1]), np.array([n]), key[None])[0]
  segments = [
    sampling.Segment(m.denoise_fn(m.cluster_params), big_t, n),
    sampling.Segment(m.denoise_fn(_personal(m, 1)), n, 0),
  ]
  want = jax.jit(
    lambda key: sampling.sample_segmented(
      m.diffusion,
      segments,
      (1, *m.image_shape),
      key,
      steps_per_segment=[big_t - n, n],
      sampler=m.config.diffusion.sampler,
    )[0]
  )(key)
  np.testing.assert_allclose(out, want, atol=2e-5)


def test_batched_edge_segment_equals_users_one_by_one(random_models):
  _, m = random_models
  big_t = m.num_timesteps
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  x_t = models.initial_noise(m, keys)
  cut_points = np.array([0, 7, big_t, 3], np.int32)
  batched = np.asarray(models.edge_denoise(m, x_t, cut_points, keys))
  for i in range(4):
    one = np.asarray(models.edge_denoise(m, x_t[i : i + 1], cut_points[i : i + 1], keys[i : i + 1]))
    np.testing.assert_allclose(batched[i], one[0], atol=1e-5)
  # A row with n = T never leaves x_T; the device half of another row matches one by one too.
  np.testing.assert_array_equal(batched[2], np.asarray(x_t[2]))
  pick = np.array([1, 3])
  dev = np.asarray(models.device_denoise(m, 1, batched[pick], cut_points[pick], keys[pick]))
  np.testing.assert_allclose(
    dev[1], np.asarray(models.device_denoise(m, 1, batched[3], 3, keys[3])), atol=1e-5
  )
  # The edge really stops at each row's cut_point: x_7 is not x_3.
  assert np.abs(batched[1] - batched[3]).max() > 1e-3


def test_sampler_input_errors(random_models):
  _, m = random_models
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  x = models.initial_noise(m, keys)
  with pytest.raises(ValueError, match="cut points must lie in"):
    models.edge_denoise(m, x, np.array([0, m.num_timesteps + 1]), keys)
  with pytest.raises(ValueError, match="row keys"):
    models.edge_denoise(m, x, np.array([0, 1]), keys[:1])
  with pytest.raises(ValueError, match="user must be in"):
    models.device_denoise(m, 2, x, 0, keys)


def test_users_hold_few_shots_of_their_class_and_the_cluster_sees_their_union():
  config = _tiny(**{"hybrid.shots": 5})
  labels = data.load_labels(config.data, "train")
  shots = hdata.user_shot_indices(config)
  for c, idx in zip(config.hybrid.user_classes, shots, strict=True):
    assert len(set(idx.tolist())) == 5 and np.all(labels[idx] == c)
  generic = hdata.generic_indices(config)
  assert not np.isin(labels[generic], config.hybrid.user_classes).any()
  cluster = hdata.cluster_indices(config)
  union = np.concatenate(shots)
  assert np.isin(union, cluster).all() and np.isin(generic, cluster).all()
  assert len(cluster) == len(generic) + config.hybrid.union_repeats * len(union)
  everything = hdata.generic_indices(_tiny(**{"hybrid.generic": "all", "hybrid.shots": 5}))
  assert np.isin(labels[everything], config.hybrid.user_classes).any()
  assert not np.isin(union, everything).any()


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"hybrid.user_classes": (0,)}, "hybrid.user_classes"),
    ({"hybrid.user_classes": (0, 0)}, "hybrid.user_classes"),
    ({"hybrid.generic": "some"}, "hybrid.generic"),
    ({"hybrid.user_loop": "loop"}, "hybrid.user_loop"),
    ({"hybrid.eval_cut_point": 99}, "hybrid.eval_cut_point"),
    ({"model.class_conditional": True}, "model.class_conditional"),
    ({"hybrid.personal_steps": 0}, "hybrid.personal_steps"),
    ({"hybrid.personal_batch_size": 0}, "hybrid.personal_batch_size.*must be an integer"),
    ({"total_steps": 0}, "total_steps"),
  ],
)
def test_config_errors_name_the_field(tmp_path, overrides, match):
  with pytest.raises(ConfigError, match=match):
    train.run(_tiny(**overrides), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_prior_preservation_adds_a_generic_batch():
  config = _tiny(**{"hybrid.prior_weight": 1.0})
  method = hmethod.Hybrid(config, data.get_info(config.data))
  assert method.images_per_step() == 3 * config.batch_size
  batch = next(method.train_iterator(process_index=0, process_count=1))
  labels = batch["label"].reshape(3, -1)
  assert np.all(labels[0] == 0) and np.all(labels[1] == 1)
  assert not np.isin(labels[2], (0, 1)).any()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("hybrid") / "run")
  summary = train.run(_tiny(), workdir)
  return workdir, summary


@pytest.mark.slow
def test_train_runs_both_stages_and_freezes_the_cluster_network(trained):
  workdir, summary = trained
  config = _tiny()
  assert summary["cluster"]["source"] == os.path.join(workdir, "cluster")
  assert summary["cluster"]["step"] == config.total_steps
  assert len(summary["users"]) == 2 and summary["users"][1]["class"] == 1
  with open(os.path.join(workdir, "train_summary.json")) as f:
    assert json.load(f) == summary
  m = models.load_run(workdir)
  assert m.step == config.hybrid.personal_steps and m.num_users == 2
  # The cluster network in the hybrid run is stage 1's EMA, untouched by stage 2.
  from common import eval as eval_lib

  _, _, cluster_ema, _ = eval_lib.load_params(os.path.join(workdir, "cluster"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(cluster_ema), m.cluster_params)
  # Every user's network moved away from the cluster's, each its own way.
  deltas = [
    jax.tree.map(lambda a, b, u=u: np.abs(a[u] - b).max(), m.personal_params, m.cluster_params)
    for u in range(2)
  ]
  assert all(max(jax.tree.leaves(d)) > 0 for d in deltas)
  assert max(jax.tree.leaves(jax.tree.map(lambda a: np.abs(a[0] - a[1]).max(), m.personal_params)))
  # A second run resumes both stages at their end: nothing retrains, nothing is written.
  ckpts = {d: sorted(os.listdir(os.path.join(workdir, d, "checkpoints"))) for d in ("", "cluster")}
  again = train.run(_tiny(), workdir)
  assert again == summary
  assert ckpts == {
    d: sorted(os.listdir(os.path.join(workdir, d, "checkpoints"))) for d in ("", "cluster")
  }
  assert os.path.exists(os.path.join(workdir, "samples", f"step_{m.step:07d}.png"))


def _with_old_names(path) -> None:
  """Rewrites a saved config.json with the field names it had before issue 21 (``split``)."""
  with open(path) as f:
    saved = json.load(f)
  old = renamed_fields.move(saved, {new: old for old, new in hybrid_configs.RENAMED.items()})
  with open(path, "w") as f:
    json.dump(old, f, indent=2)


def test_a_run_saved_before_the_rename_loads_evaluates_and_resumes(trained, tmp_path):
  from common import eval as eval_lib

  workdir = str(tmp_path / "old")
  shutil.copytree(trained[0], workdir)
  for d in ("", "cluster"):
    _with_old_names(os.path.join(workdir, d, "config.json"))
  # The copy's stage 2 names its own stage 1 (as a run trained here would).
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    saved = json.load(f)
  saved["hybrid"]["cluster_source"] = os.path.join(workdir, "cluster")
  with open(path, "w") as f:
    json.dump(saved, f, indent=2)
  saved_source = os.path.join(workdir, "cluster")
  assert saved["hybrid"]["eval_split"] == 12 and "eval_cut_point" not in saved["hybrid"]
  # Read by load_run (hybrid.profile, hybrid.serve) and common.eval under today's names.
  m = models.load_run(workdir)
  assert m.config.hybrid.eval_cut_point == 12 and m.config.hybrid.profile.cut_points[-1] == 24
  assert m.config.scheduler.system.min_cut_point == 80.0
  _, method, _, _ = eval_lib.load_params(workdir)
  assert method.config.hybrid.eval_cut_point == 12
  # Resumed by today's command line: both stages under the names they were saved with (the
  # drift check would refuse the renamed fields otherwise); nothing retrains, and the saved
  # configs keep their names.
  summary = train.run(_tiny(), workdir)
  assert summary == {**trained[1], "cluster": {**trained[1]["cluster"], "source": saved_source}}
  for d in ("", "cluster"):
    with open(os.path.join(workdir, d, "config.json")) as f:
      assert "eval_split" in json.load(f)["hybrid"]


def test_cluster_workdir_reuses_a_run_and_refuses_another_model(trained, tmp_path):
  workdir, _ = trained
  cluster_dir = os.path.join(workdir, "cluster")
  other = _tiny(**{"hybrid.cluster_workdir": cluster_dir, "model.channels": (16,)})
  with pytest.raises(ConfigError, match="another model"):
    train.run(other, str(tmp_path / "other"))
  with pytest.raises(ConfigError, match="hybrid.cluster_workdir"):
    train.run(_tiny(**{"hybrid.cluster_workdir": str(tmp_path)}), str(tmp_path / "x"))
  # The same network and data: stage 2 starts from that run, no stage 1 of its own.
  reuse = str(tmp_path / "reuse")
  summary = train.run(_tiny(**{"hybrid.cluster_workdir": cluster_dir}), reuse)
  assert summary["cluster"] == {**summary["cluster"], "source": cluster_dir, "step": 4}
  assert not os.path.exists(os.path.join(reuse, "cluster"))
  assert models.load_run(reuse).step == 2
  # load_run refuses what is not a finished hybrid run.
  with pytest.raises(ValueError, match="not a hybrid.train workdir"):
    models.load_run(cluster_dir)
  with pytest.raises(FileNotFoundError):
    models.load_run(str(tmp_path))


def test_eval_hooks_group_by_user(trained):
  workdir, _ = trained
  from common import eval as eval_lib

  _, method, params, _ = eval_lib.load_params(workdir)
  assert isinstance(method, hmethod.Hybrid)
  assert method_lib.load_method(method.config, method.data_info).name == "hybrid"
  # The training grid's shapes (2 images per user), so nothing new compiles.
  batches = list(method.eval_batches(params, jax.random.PRNGKey(0), 4, 2))
  groups = np.concatenate([g for _, _, g in batches])
  np.testing.assert_array_equal(groups, [0, 0, 1, 1])
  images = np.concatenate([x for x, _, _ in batches])
  assert images.shape == (4, 8, 8, 1) and np.abs(images).max() <= 1.0
  ref_labels = data.load_labels(method.config.data, "train")
  assert np.all(ref_labels[method.eval_group_reference(1, ref_labels, "train")] == 1)


def _step_inputs(**overrides):
  """A tiny Hybrid with random weights: (method, tx, lr, its step-0 state, a real batch)."""
  from common.train.state import TrainState

  config = _tiny(**overrides)
  method = hmethod.Hybrid(config, data.get_info(config.data))
  params = random_params(method, 4)
  tx, lr = method.make_optimizer()
  state = TrainState(
    step=jax.numpy.zeros((), jax.numpy.int32),
    params=params,
    ema_params=params,
    opt_state=method.init_opt_state(tx, params),
    rng=jax.random.PRNGKey(0),
  )
  batch = next(method.train_iterator(process_index=0, process_count=1))
  return method, tx, lr, state, batch


def test_train_step_adds_the_prior_term_and_leaves_the_cluster_network_alone():
  method, tx, lr, state, batch = _step_inputs(**{"hybrid.prior_weight": 0.5})
  params = state.params
  new, metrics = jax.jit(method.make_train_step(tx, lr, 0.9))(state, batch)
  assert float(metrics["prior_loss"]) > 0
  np.testing.assert_allclose(
    float(metrics["loss"]),
    float(metrics["subject_loss"]) + 0.5 * float(metrics["prior_loss"]),
    rtol=1e-5,
  )
  jax.tree.map(np.testing.assert_array_equal, new.params["cluster"], params["cluster"])
  jax.tree.map(np.testing.assert_array_equal, new.ema_params["cluster"], params["cluster"])
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), new.params["users"], params["users"])
  assert max(jax.tree.leaves(moved)) > 0


def test_users_loop_is_the_written_out_step_bit_for_bit_and_counts_every_user():
  # XLA:CPU's default, a loop over the users (one network compiled), against the U steps
  # written out: the same sums in the same order (common.models.conv, common.models.stacked).
  from common.metrics import flops as flops_lib

  results, flops = {}, {}
  for user_loop in ("scan", "unroll"):
    overrides = {"hybrid.prior_weight": 0.5, "hybrid.user_loop": user_loop}
    method, tx, lr, state, batch = _step_inputs(**overrides)
    results[user_loop] = jax.jit(method.make_train_step(tx, lr, 0.9))(state, batch)
    counting = method.make_flops_counting_step(tx, lr, 0.9)
    assert (counting is None) == (user_loop == "unroll")
    step = counting or method.make_train_step(tx, lr, 0.9)
    flops[user_loop] = flops_lib.analysis_flops(jax.jit(step).lower(state, batch).cost_analysis())
  for a, b in zip(
    jax.tree.leaves(results["scan"]), jax.tree.leaves(results["unroll"]), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert flops["scan"] == pytest.approx(flops["unroll"], rel=1e-5)


def _pre_chain_reference(m, params, x, k_start, k_end, keys):
  """The hybrid sampler as it was before it ran on the core's chain (a masked ``while_loop`` over
  every level with per-row noise), kept to show the core gives the same samples."""
  import jax.numpy as jnp

  d, big_t = m.diffusion, m.num_timesteps
  sampler = m.config.diffusion.sampler
  eta = float(m.config.diffusion.ddim_eta) if sampler == "ddim" else 0.0
  coefs = sampling.step_coefficients(d, np.arange(big_t, -1, -1), eta)
  table = {
    n: np.asarray(v, np.int32 if v.dtype.kind == "i" else np.float32) for n, v in coefs.items()
  }

  def step(x, k):
    c = {n: jnp.asarray(v)[big_t - k] for n, v in table.items()}
    t = jnp.full((x.shape[0],), k - 1, jnp.int32)
    x0, eps, var = d.model_output_to_x0_eps(m.programs.apply(params, x, t), x, t)
    x_next, std = sampling.reverse_step_mean_std(
      d,
      c,
      x,
      t,
      x0,
      eps,
      var,
      sampler=sampler,
      clip_denoised=bool(m.config.diffusion.clip_denoised),
    )
    if sampler == "ddpm" or eta > 0:
      noise = jax.vmap(
        lambda key: jax.random.normal(jax.random.fold_in(key, k), (1, *x.shape[1:]))[0]
      )(keys)
      x_next = jnp.where(c["k_next"] > 0, x_next + std * noise, x_next)
    return x_next.astype(x.dtype)

  def body(carry):
    k, x = carry
    active = (k <= k_start) & (k > k_end)
    return k - 1, jnp.where(active[:, None, None, None], step(x, k), x)

  hi, lo = jnp.max(k_start).astype(jnp.int32), jnp.min(k_end).astype(jnp.int32)
  return jax.lax.while_loop(lambda c: c[0] > lo, body, (hi, x))[1]


def test_core_chain_gives_the_pre_refactor_samples_bit_exactly(random_models):
  _, m = random_models
  big_t = m.num_timesteps
  keys = jax.random.split(jax.random.PRNGKey(5), 5)
  cut_points = np.array([0, 3, 12, big_t, 7], np.int32)
  x_t = models.initial_noise(m, keys)
  start = np.full((5,), big_t, np.int32)
  edge = models.edge_denoise(m, x_t, cut_points, keys)
  reference = jax.jit(lambda *args: _pre_chain_reference(m, *args))
  want = reference(m.cluster_params, x_t, start, cut_points, keys)
  np.testing.assert_array_equal(np.asarray(edge), np.asarray(want))
  device = models.device_denoise(m, 1, edge, cut_points, keys)
  want = reference(_personal(m, 1), edge, cut_points, np.zeros(5, np.int32), keys)
  np.testing.assert_array_equal(np.asarray(device), np.asarray(want))
  assert np.abs(np.asarray(device) - np.asarray(edge)).max() > 1e-2  # the device really ran
