"""CollaFuse measurements: disclosure distances, the analytic cut MSE, client compute, multi-process
input and the sweep binary end to end."""

import json
import os

import jax
import numpy as np
import pytest

from collab import client, disclosure, sweep
from collab import method as collab_method
from common import data
from common.train import loop
from tests.collab.test_collab import build, tiny


def test_pixel_mse_and_nn_distance_match_brute_force():
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (7, 4, 4, 3)).astype(np.float32)
  b = rng.uniform(-1, 1, (5, 4, 4, 3)).astype(np.float32)
  pairs = ((a[:, None] - b[None]) ** 2).reshape(7, 5, -1).mean(-1)
  np.testing.assert_allclose(disclosure.pixel_mse_all_pairs(a, b), pairs.mean(), rtol=1e-6)
  np.testing.assert_allclose(
    disclosure.nearest_neighbour_distance(a, b, chunk=3), np.sqrt(pairs.min(1)).mean(), rtol=1e-6
  )
  # A server that reproduces training images exactly has distance 0 to them.
  assert disclosure.nearest_neighbour_distance(b[[4, 0, 2]], b) < 1e-6


def test_cut_image_mse_matches_the_analytic_formula():
  config = tiny()
  m = collab_method.CollaFuse(config, data.get_info(config.data))
  x0, _ = data.load_split(config.data, "train")
  x0 = np.tile(x0, (8, 1, 1, 1))  # 8 noise draws of every training image
  for cut_point in (1, 5, 12, 20):
    noise = np.asarray(jax.random.normal(jax.random.key(cut_point), x0.shape))
    x_cut = np.asarray(client.cut_image(m.diffusion, x0, noise, cut_point))
    measured = disclosure.cut_mse_measured(x0, x_cut)
    analytic = disclosure.cut_mse_analytic(m.diffusion, cut_point, x0)
    assert abs(measured - analytic) < 0.01 * analytic, (cut_point, measured, analytic)
  assert disclosure.cut_mse_analytic(m.diffusion, 0, x0) == 0.0


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_read_their_clients_rows_of_one_client_major_batch(processes):
  config = tiny(**{"batch_size": 6, "collab.num_clients": 4, "collab.classes_per_client": 2})
  m = collab_method.CollaFuse(config, data.get_info(config.data))
  one = m.train_iterator(process_index=0, process_count=1)
  whole = [next(one) for _ in range(3)]
  iters = [m.train_iterator(process_index=p, process_count=processes) for p in range(processes)]
  parts = [[next(it) for _ in range(3)] for it in iters]
  train_labels = data.load_labels(config.data, "train")
  for step in range(3):
    # The processes' blocks, stacked, are the one-process global batch, at every step.
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), whole[step][key])
    per_client = np.asarray(m._client_major(jax.numpy.asarray(whole[step]["label"])))
    assert per_client.shape == (4, 6)
    for k in range(4):  # client k's row holds only client k's data
      assert set(per_client[k].tolist()) <= set(train_labels[m.client_indices("train")[k]])
  # P divides K: each process reads only its own clients' partitions.
  for p, it_parts in enumerate(parts):
    own = np.concatenate(
      [m.client_indices("train")[k] for k in range(4) if k * processes // 4 == p]
    )
    assert set(it_parts[0]["label"].tolist()) <= set(train_labels[own].tolist())
  # The position is global: a state saved by one process count resumes another.
  state = iters[-1].get_state()
  fresh = m.train_iterator(process_index=0, process_count=1)
  fresh.set_state(state)
  np.testing.assert_array_equal(next(fresh)["image"], next(_skip(m, 3))["image"])
  with pytest.raises(Exception, match="batch_size"):
    m.train_iterator(process_index=0, process_count=5)


def _skip(m, n):
  it = m.train_iterator(process_index=0, process_count=1)
  for _ in range(n):
    next(it)
  return it


def test_diagnostics_and_client_compute():
  config = tiny()
  m, _, _, state, _ = build(config)
  # 8 samples, as the sweep test below draws: the persistent compile cache serves both.
  rng, y = jax.random.key(1), m.client_labels(0, 8, 17)
  diag = m.sample_diagnostics(state.params, 0, rng, 8, y)
  assert set(diag) == {"generated", "handoff", "server_alone", "client_from_noise"}
  np.testing.assert_allclose(diag["generated"], m.sample_client(state.params, 0, rng, 8, y))
  assert all(v.shape == (8, 8, 8, 1) for v in diag.values())
  # The client's network runs exactly cut_point times per image, and its FLOPs follow.
  costs = m.cost_description(state.params)
  assert costs["client_network_calls_per_image"] == config.collab.cut_point
  one = jax.tree.map(lambda a: a[0], state.params["clients"])
  np.testing.assert_allclose(
    costs["client_inference_flops_per_image"],
    config.collab.cut_point * m.denoiser_call_flops(one, 1),
  )
  assert costs["uplink_bytes_per_client_step"] == 8 * 64 * 4 + 8 * 4
  assert costs["downlink_bytes_per_image"] == 64 * 4
  assert (
    costs["client_train_flops_per_step"]
    > 2 * config.batch_size * costs["client_inference_flops_per_image"] / config.collab.cut_point
  )
  m0 = collab_method.CollaFuse(tiny(**{"collab.cut_point": 0}), m.data_info)
  assert m0.client_network_calls_per_image(state.params) == 0
  assert "client_from_noise" not in m0.sample_diagnostics(state.params, 0, rng, 8, y)


@pytest.mark.slow
def test_sweep_end_to_end(tmp_path, monkeypatch):
  config = tiny(total_steps=2, ckpt_every_steps=2)
  workdir = str(tmp_path / "sweep")
  # Cut 0 (the server does every step) is covered by test_collab's cut extremes; each cut here
  # compiles its own train step, the bulk of this test's time.
  summary = sweep.run_sweep(config, workdir, seeds=[0], cuts=[8, 20], samples_per_client=8)
  for name in ("sweep.json", "sweep.md", "sweep.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  cuts = summary["table"]["cuts"]
  assert sorted(cuts, key=int) == ["8", "20"]
  assert [cuts[c]["costs"]["client_network_calls_per_image"] for c in ("8", "20")] == [8, 20]
  assert summary["table"]["centralized"]["fid"]["n"] == 1
  assert summary["claims"]["client_flops_scale_with_cut"]["verdict"] == "supported"
  assert summary["claims"]["cut_mse_matches_analytic"]["verdict"] == "supported"
  assert summary["claims"]["beats_local_only"]["fid"]["clients"] == 2
  assert cuts["8"]["disclosure/cut_images/nn_distance"]["mean"] > 0.1
  # The logger counts all K client batches of a step.
  rec = json.loads(open(os.path.join(workdir, "seed0", "cut8", "metrics.jsonl")).readline())
  np.testing.assert_allclose(rec["images_per_s"], rec["steps_per_s"] * 2 * 8, rtol=1e-6)
  # A second run finds everything done: nothing is trained or evaluated again.
  monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("retrained a finished run"))
  monkeypatch.setattr(
    sweep, "evaluate_collab_run", lambda *a, **k: pytest.fail("re-evaluated a finished run")
  )
  again = sweep.run_sweep(config, workdir, seeds=[0], cuts=[8, 20], samples_per_client=8)
  assert again["table"]["cuts"]["8"]["collafuse/fid"] == cuts["8"]["collafuse/fid"]


def test_sweep_refuses_a_cut_outside_the_chain(tmp_path):
  from common.train.validate import ConfigError

  with pytest.raises(ConfigError, match="cut_points=21"):
    sweep.run_sweep(tiny(), str(tmp_path / "s"), seeds=[0], cuts=[0, 21])


@pytest.mark.slow
def test_client_axis_is_sharded_over_the_mesh_and_trains_like_unsplit_clients():
  """Clients split over the mesh's data axis (shard_map) against the same step with the client
  axis not split (the clients' data kept whole on every device, as on one device)."""
  from jax.sharding import PartitionSpec as P

  metrics_by_axis, state0 = {}, None
  for client_axis in ("", "data"):
    config = tiny(
      **{
        "collab.client_loop": "vmap",
        "collab.num_clients": 2,
        "collab.client_mesh_axis": client_axis,
      }
    )
    config.mesh.data = 2
    mesh, m = loop.setup(config, devices=jax.devices()[:2])
    fns = loop.build(config, m, mesh)
    client_leaf = jax.tree.leaves(fns["state_shardings"].params["clients"])[0]
    if client_axis:
      assert client_leaf.spec == P("data", *([None] * (len(client_leaf.spec) - 1)))
      opt = jax.tree.leaves(fns["state_shardings"].opt_state["clients"])
      assert all(s.spec[0] == "data" for s in opt if s.spec)
    batch_np = next(m.train_iterator(process_index=0, process_count=1))
    # One init, kept on the host and placed on each layout (the step donates its state; compiling
    # a second init would cost ~10 s).
    state0 = jax.device_get(fns["init"]()) if state0 is None else state0
    state, metrics_by_axis[client_axis] = fns["step"](
      jax.device_put(state0, fns["state_shardings"]),
      loop.parallel.global_batch(batch_np, fns["batch_sharding"]),
    )
    assert jax.tree.leaves(state.params["clients"])[0].sharding.spec == client_leaf.spec
  # Parameters after one Adam step are sign(g) * lr wherever g is float noise, so the comparison
  # is on the losses and gradient norms.
  for key in ("client_loss", "server_loss", "grad_norm", "server_grad_norm"):
    np.testing.assert_allclose(
      float(metrics_by_axis["data"][key]), float(metrics_by_axis[""][key]), rtol=1e-4, err_msg=key
    )
