"""Runs that start from given weights: a step-0 checkpoint the shared loop resumes from.

Stage 2 starts from the weights each group inherits from stage 1's network, E6's supernet from
stage 1's network in L1 channel order. Written as an ordinary checkpoint, the start makes the
run an ordinary run of ``common.train.loop``: a killed one resumes like any other.
"""

from __future__ import annotations

import os

from adaptive import inheritance, method, search_space


def latest_step(workdir: str) -> int | None:
  """The latest checkpoint step of the run in ``workdir``; None if it has none (or no
  ``checkpoints/`` folder, which is then not created)."""
  from common import checkpoint

  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return None
  ckpt = checkpoint.Checkpointer(path)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def write_start_checkpoint(config, workdir: str, params, *, devices: list | None = None) -> None:
  """Writes ``config``'s run a step-0 checkpoint holding ``params`` (EMA = params, fresh Adam).

  Args:
    config: the run's config (its method's fresh init fixes the tree and shapes).
    params: pure dict of numpy arrays with that tree.
  """
  from common import checkpoint
  from common.train import loop

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    if ckpt.latest_step() is not None:
      return
    mesh, run_method = loop.setup(config, devices=devices)
    fns = loop.build(config, run_method, mesh)
    # Not fns["init"](): its random init of every group's network (28 s of tracing and
    # compiling in the main job's stage 2) would only be overwritten.
    state = loop.start_state(config, run_method, fns, params)
    data_iter = run_method.train_iterator(process_index=0, process_count=1)
    ckpt.save(0, state, data_iter, config.to_json_best_effort(sort_keys=True, indent=2), force=True)
  finally:
    ckpt.close()


def write_inherited_start(
  config, workdir: str, base_params, pruned, *, seed: int, devices: list | None = None
) -> None:
  """Writes the stage-2 run's step-0 checkpoint: each group's inherited weights, fresh Adam.

  The EMA starts from the pruned weights (spec §3.4). The shared loop then resumes from it, so
  stage 2 is an ordinary run of the loop (and a killed stage 2 resumes like any run).
  """
  if latest_step(workdir) is not None:
    return
  inherited = {
    method.group_key(g): inheritance.inherit_weights(
      base_params,
      config.model,
      search_space.Structure.from_dict(p["structure"]),
      image_size=int(config.data.resolution),
      selection=str(config.adaptive.pruner.selection),
      seed=seed,
    )
    for g, p in enumerate(pruned)
  }
  write_start_checkpoint(config, workdir, inherited, devices=devices)
