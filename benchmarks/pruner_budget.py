"""What adaptive's pruner budget costs: proxy evaluations, proxy training steps and their FLOPs.

  python benchmarks/pruner_budget.py --config=configs/adaptive.py:cifar10 [--xla_flops]

Each candidate structure the pruner scores costs ``adaptive.pruner.proxy_steps`` fine-tune steps
at ``proxy_batch`` plus one held-out forward over ``proxy_eval_examples`` draws
(``adaptive.proxy``). How many candidates ``proxy_search(det)`` scores depends on the scores (they
pick the beam), not only on the budget; so the search is replayed exactly as
``adaptive.pruning.prune_groups`` runs it (same base structure, analytic FLOPs, per-group targets,
tol, beam, rounds, memory bank) with surrogate scores in place of the proxy:

* ``slowest``: lower score = more FLOPs kept, so every round takes the smallest cut;
* ``fastest``: lower score = fewer FLOPs, so every round takes the largest cut;
* ``random<s>``: a fixed pseudo-random score per structure (seeds 0-4).

The hard cap is ``max_rounds x beam x edits`` fresh evaluations per searched group. With
``--xla_flops`` the base network's train step at ``proxy_batch`` is compiled (one device, not run)
for XLA's FLOPs of one proxy step: the cost of a step of the unpruned network, so an upper bound
for a candidate's (whose mean analytic FLOPs relative to the base are printed per group). The last
line is one JSON object.
"""

import hashlib
import json
import os
import sys

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

SURROGATE_SEEDS = range(5)


def _dataset_info(config):
  """The dataset's description; a stand-in of the preset's shape where it is not prepared."""
  from common import data

  if config.data.name != "array_record" or os.path.isdir(config.data.data_dir or "/-"):
    return data.get_info(config.data)
  from common.data.pipeline import DatasetInfo

  classes = 1000 if "imagenet" in config.data.data_dir else 10
  names = tuple(str(i) for i in range(classes))
  return DatasetInfo("array_record", 1, 1, int(config.data.resolution), 3, classes, names)


def replay(config) -> dict:
  """Evaluations per group of the configured ``proxy_search(det)`` under each surrogate score."""
  from adaptive import pruning, search_space, stages
  from adaptive.search import proxy_search

  info = _dataset_info(config)
  flops_fn = pruning.flops_fn_for(config, info)
  groups = stages.make_groups(config)
  base = search_space.base_structure(config.model)
  full = flops_fn(base)
  targets = pruning.flops_targets(config, groups, flops_fn)
  p = config.adaptive.pruner
  if p.name != "proxy_search(det)":
    raise ValueError(f"pruner_budget: replays proxy_search(det) only, not {p.name!r}")
  cap = int(p.get("max_evals_per_round", 0))
  scores = {
    "slowest": lambda s: -flops_fn(s),
    "fastest": flops_fn,
    **{
      f"random{seed}": lambda s, seed=seed: int.from_bytes(
        hashlib.sha256(f"{seed}{s}".encode()).digest()[:8], "little"
      )
      for seed in SURROGATE_SEEDS
    },
  }
  surrogates = {}
  for name, score in scores.items():
    per_group = []
    for g, target in enumerate(targets):
      if abs(full / target - 1.0) <= float(p.tol):  # the full network meets it: no search
        per_group.append({"group": g, "evaluations": 0})
        continue
      seen = []

      def score_fn(s, seen=seen, score=score):
        seen.append(flops_fn(s))
        return score(s)

      r = proxy_search(
        base, target, flops_fn, score_fn, tol=float(p.tol), beam_width=int(p.beam),
        max_rounds=int(p.max_rounds), use_memory=bool(p.use_memory),
        max_evals_per_round=cap if cap > 0 else None, seed=int(config.seed),
      )  # fmt: skip
      per_group.append(
        {
          "group": g,
          "evaluations": r.evaluations,
          "rounds": r.rounds,
          "converged": r.converged,
          "found_over_base": r.flops / full,
          "mean_candidate_over_base": float(np.mean(seen)) / full,
        }
      )
    surrogates[name] = {
      "total_evaluations": sum(x["evaluations"] for x in per_group),
      "per_group": per_group,
    }
  searched = sum(abs(full / t - 1.0) > float(p.tol) for t in targets)
  edits = len(search_space.search_space_edits(base, base))
  return {
    "groups": [list(map(int, iv)) for iv in groups.intervals],
    "targets_over_base": [t / full for t in targets],
    "searched_groups": int(searched),
    "base_forward_flops": full,
    "proxy": {k: p[k] for k in ("proxy_steps", "proxy_batch", "proxy_eval_examples", "tol", "beam", "max_rounds")},
    "cap_evaluations": int(searched * int(p.max_rounds) * int(p.beam) * edits),
    "surrogates": surrogates,
  }  # fmt: skip


def xla_step_flops(config) -> float:
  """XLA's FLOPs of the base network's train step at ``proxy_batch`` (compiled, not run)."""
  import jax

  from common import data, parallel
  from common.train import loop, validate
  from common.train import method as method_lib

  with config.unlocked():
    config.batch_size = int(config.adaptive.pruner.proxy_batch)
    config.mesh.data = 1
    if config.data.name == "array_record" and not os.path.isdir(config.data.data_dir or "/-"):
      config.data.name = "shapes"  # the architecture without prepared data: same shapes
  mesh_shape = validate.validate_common(config, num_devices=1)
  info = data.get_info(config.data)
  method = method_lib.load_method(config, info)
  fns = loop.build(config, method, parallel.make_mesh(mesh_shape, jax.devices()[:1]))
  b, r, c = config.batch_size, info.resolution, info.channels
  sh = fns["batch_sharding"]
  batch = {
    "image": jax.ShapeDtypeStruct((b, r, r, c), np.float32, sharding=sh),
    "label": jax.ShapeDtypeStruct((b,), np.int32, sharding=sh),
  }
  cost = fns["step"].lower(fns["abstract_state"], batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def main(argv):
  del argv
  from absl import flags

  config = flags.FLAGS.config
  result = {"config": flags.FLAGS["config"].serialize().split("=", 1)[1], **replay(config)}
  if flags.FLAGS.xla_flops:
    result["xla_proxy_step_flops"] = xla_step_flops(config)
  for name, s in result["surrogates"].items():
    groups = ", ".join(f"g{x['group']}: {x['evaluations']}" for x in s["per_group"])
    print(f"{name:9s} {s['total_evaluations']:5d} evaluations ({groups})")
  print(f"cap       {result['cap_evaluations']:5d} evaluations")
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Config file and preset.", lock_config=True)
  flags.DEFINE_bool("xla_flops", False, "Also compile the proxy step for XLA's FLOPs.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
