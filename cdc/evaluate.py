"""Evaluates CDC-MMPG-style adaptation on the held-out devices, against every baseline.

``python -m cdc.evaluate --workdir=runs/cdc`` (after ``cdc.pretrain`` and ``cdc.train``).

Per held-out device (never seen in meta-training), arms:

* ``static``            the pretrained source head, no adaptation;
* ``fda/<sel>/K<k>``    the device encodes its unlabeled pool, the ADR selector ``<sel>`` picks K
                        anchors (``gaussian``: a K-component summary), the cloud's FDA generates the
                        head, the device installs it: real bytes, timed, through ``cdc.device`` and
                        ``cdc.cloud``;
* ``fda/all``           the FDA fed every pool frame (the upper bound of the generation path);
* ``ft/n<n>``           fine-tuning the same tensors on n labeled device samples (backprop, timed);
* ``oracle``            fine-tuning on all of the device's labeled videos.

Metrics: QA accuracy, text-to-video R@1 / R@5 (the gallery is the device's test videos), uplink and
downlink bytes, device FLOPs (XLA) and device seconds per adaptation, cloud seconds, and the
end-to-end latency at ``cdc.eval.link_mbps`` (device + upload + cloud + download + install). A drift
demonstration runs the trigger on a stream that switches between two held-out devices.

Writes ``<workdir>/eval/metrics.json`` (per device and means) and ``eval/summary.md``, each
atomically; the recorded ``train_config.json`` is validated and ``pretrain.npz`` / ``fda.npz`` are
checked (checksums, finite) before anything is written: a bad one is one line and exit 2.
Toy-scale, CDC-MMPG-style figures: never the paper's.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from cdc import cloud, device, experiment, finetune, models, moving_shapes, objectives, train
from common import fileio
from common.metrics import flops as flops_lib

METRICS = ("qa_accuracy", "R@1", "R@5")


@jax.jit
def _score(theta, q_video, question, video, caption):
  return (
    models.qa_logits(theta, q_video, question),
    models.embed_video(theta, video),
    models.embed_text(theta, caption),
  )


def _metrics(theta, test) -> dict:
  logits, v_emb, t_emb = _score(
    theta, test["video"][test["question_video"]], test["question"], test["video"], test["caption"]
  )
  return {
    "qa_accuracy": objectives.qa_accuracy(logits, test["answers"]),
    **objectives.recall_at_k(t_emb, v_emb, test["caption_video"]),
  }


def _timed(fn, *args, repeats: int = 3):
  """(result, median seconds) of ``fn(*args)`` after one untimed call (compilation)."""
  out = fn(*args)
  jax.block_until_ready(jax.tree.leaves(out))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(jax.tree.leaves(out))
    times.append(time.perf_counter() - t)
  return out, float(np.median(times))


def _features(encoders, enc_state, dataset, dev, split):
  _, video, question, caption, dom = train.device_features(encoders, enc_state, dataset, dev, split)
  return {
    "video": video,
    "question": question,
    "answers": dom.answers,
    "question_video": dom.question_video,
    "caption": caption,
    "caption_video": dom.caption_video,
  }, dom


def _labeled_subset(feats: dict, n: int | None, rng) -> dict:
  """n labeled samples (all when ``n`` is None): questions and captions of n drawn videos."""
  nq, nc = len(feats["answers"]), len(feats["caption_video"])
  qi = np.arange(nq) if n is None else rng.choice(nq, min(n, nq), replace=False)
  ci = np.arange(nc) if n is None else rng.choice(nc, min(n, nc), replace=False)
  videos = np.union1d(feats["question_video"][qi], feats["caption_video"][ci])
  return {
    "num_videos": len(videos),
    "q_video": feats["video"][feats["question_video"][qi]],
    "question": feats["question"][qi],
    "answers": feats["answers"][qi],
    "c_video": feats["video"][feats["caption_video"][ci]],
    "caption": feats["caption"][ci],
  }


def _uplink(the_device, pool, seed):
  return the_device.uplink(pool, seed=seed)[0]


def _all_frames(pool, dtype):
  """The upload of the "FDA fed all frames" arm: every pool frame, uniform weights."""
  m = len(pool)
  layout = device.uplink_layout(pool.shape[1], m, "anchors", dtype)
  payload = {"anchors": pool.astype(dtype), "weights": np.full(m, 1.0 / m, np.float32)}
  return device.Transfer(device.pack(payload, layout), layout)


def _fda_arm(ctx, arm, make_uplink, adr_flops):
  """One adaptation through the real wire: device upload, cloud FDA, download, install; scored."""
  up, up_seconds = _timed(make_uplink)
  down, cloud_seconds = _timed(ctx["cloud"].adapt, up)
  theta, install_seconds = _timed(ctx["device"].install, down)
  device_seconds = ctx["enc_seconds"] + up_seconds + install_seconds
  link = ctx["link"]
  ctx["add"](
    arm,
    ctx["dev"],
    {
      **_metrics(theta, ctx["test"]),
      "uplink_bytes": up.nbytes,
      "downlink_bytes": down.nbytes,
      "device_flops": ctx["enc_flops"] + adr_flops,
      "device_seconds": device_seconds,
      "cloud_seconds": cloud_seconds,
      "latency_seconds": device_seconds + up.nbytes / link + cloud_seconds + down.nbytes / link,
      "frames_in_pool": ctx["frames"],
    },
  )
  return theta


@dataclasses.dataclass
class _Evaluation:
  """What every arm of every held-out device shares, and the rows the arms add.

  Attributes:
    rows: arm -> device id (str) -> that arm's record on that device.
    flops_cache: XLA FLOP counts by program key; a count compiles the program, and devices with
      pools of one shape share it.
  """

  config: ml_collections.ConfigDict
  dataset: Any
  spec: models.ModelSpec
  graphdef: Any
  enc_state: Any
  head: dict
  the_cloud: cloud.Cloud
  encoders: tuple
  trainable: tuple[str, ...]  # the generated head tensors (what fine-tuning trains too)
  fda_base: dict  # the meta-trained base weights of the generated tensors
  down_bytes: int  # the downlink of one generated head
  link: float  # bytes per second, both directions
  rows: dict[str, dict[str, dict]] = dataclasses.field(default_factory=dict)
  flops_cache: dict = dataclasses.field(default_factory=dict)

  def add(self, arm: str, dev: int, rec: dict) -> None:
    self.rows.setdefault(arm, {})[str(dev)] = rec
    logging.info("device %s %s %s", dev, arm, {k: round(v, 4) for k, v in rec.items()})

  def flops(self, key, count) -> float:
    """``count()``'s FLOPs, computed once per ``key``."""
    if key not in self.flops_cache:
      self.flops_cache[key] = count()
    return self.flops_cache[key]


def _load_evaluation(workdir: str) -> _Evaluation:
  """The recorded config (validated first), the pretrained device model, the FDA and the cloud.

  Raises:
    ConfigError: a bad recorded config, or no intact ``pretrain.npz`` / ``fda.npz``.
  """
  config = experiment.read_config(workdir, "train_config.json")
  experiment.validate(config)  # the recorded config, before anything is read or written
  dataset = experiment.build_dataset(config)
  spec, graphdef, enc_state, head = experiment.load_pretrained(workdir, config, dataset)
  fspec = experiment.fda_spec(config)
  fda_graphdef, fda_params = train.load_fda(workdir, config, dataset, spec, head)
  a = config.cdc.adr
  the_cloud = cloud.Cloud(
    fda_graphdef,
    fda_params,
    downlink_dtype=a.downlink_dtype,
    summary_samples=a.summary_samples,
    seed=config.seed,
  )
  return _Evaluation(
    config=config,
    dataset=dataset,
    spec=spec,
    graphdef=graphdef,
    enc_state=enc_state,
    head=head,
    the_cloud=the_cloud,
    encoders=train.make_encoders(graphdef),
    trainable=fspec.generated_names(spec),
    fda_base=nnx.merge(fda_graphdef, fda_params).base(),
    down_bytes=cloud.generated_nbytes(spec, fspec, a.downlink_dtype),
    link=config.cdc.eval.link_mbps * 1e6 / 8.0,
  )


def evaluate(workdir: str) -> dict:
  """Runs every arm on every held-out device; returns (and writes) the metrics."""
  t_start = time.perf_counter()
  ev = _load_evaluation(workdir)
  config, dataset, spec = ev.config, ev.dataset, ev.spec
  heldout = [int(d) for d in dataset.heldout_devices]
  for dev in heldout:
    _evaluate_device(ev, dev, heldout)

  summary = {arm: _mean(per_dev) for arm, per_dev in ev.rows.items()}
  result = {
    "note": "toy-scale, CDC-MMPG-style reference design (spec section 5); not the paper's figures",
    "heldout_devices": [int(d) for d in dataset.heldout_devices],
    "link_mbps": config.cdc.eval.link_mbps,
    "generated_params": int(
      sum(np.prod(s) for n, s in spec.head_shapes().items() if n in ev.trainable)
    ),
    "per_device": ev.rows,
    "mean": summary,
  }
  if isinstance(dataset, moving_shapes.MovingShapes):
    result["drift"] = drift_demo(
      config, dataset, spec, ev.graphdef, ev.enc_state, ev.head, ev.the_cloud, ev.encoders
    )
  out = os.path.join(workdir, "eval")
  fileio.write_json(os.path.join(out, "metrics.json"), result)
  fileio.write_text(os.path.join(out, "summary.md"), summary_table(result))
  write_headline(workdir, config, result, time.perf_counter() - t_start)
  return result


def _evaluate_device(ev: _Evaluation, dev: int, heldout: list[int]) -> None:
  """Every arm on held-out device ``dev``, one row each (``static`` first, ``oracle`` last)."""
  a = ev.config.cdc.adr
  test, _ = _features(ev.encoders, ev.enc_state, ev.dataset, dev, "test")
  ev.add("static", dev, _metrics(ev.head, test))

  pdom = ev.dataset.domain(dev, "pool")
  the_device = device.Device(
    ev.spec,
    ev.graphdef,
    ev.enc_state,
    ev.head,
    weighting=a.weighting,
    kmedoids_iters=a.kmedoids_iters,
    uplink_dtype=a.uplink_dtype,
  )
  pool, enc_seconds = _timed(the_device.pool, pdom.frames, pdom.frame_mask)
  # FLOPs of the executable ``pool`` ran (lowering is cached: this compiles nothing new).
  enc_flops = ev.flops(
    ("encode", pdom.frames.shape),
    lambda: flops_lib.compiled_flops(
      the_device.encode_frames.lower(ev.enc_state, pdom.frames).compile()
    ),
  )
  ctx = dict(
    dev=dev,
    test=test,
    device=the_device,
    cloud=ev.the_cloud,
    link=ev.link,
    add=ev.add,
    enc_seconds=enc_seconds,
    enc_flops=enc_flops,
    frames=len(pool),
  )
  _fda_arms(ev, ctx, pool)
  _conditioning_ablations(ev, dev, heldout, the_device, test)
  # The device also encodes its labeled videos (the frozen encoder's frame FLOPs, per frame).
  _finetune_arms(ev, dev, test, enc_flops / len(pool), pdom.frames.shape[1])


def _fda_arms(ev: _Evaluation, ctx: dict, pool: np.ndarray) -> None:
  """``fda/<sel>/K<k>`` for every evaluated selector and K <= the pool's frames, then ``fda/all``.

  pool: float32 [M, d], the device's encoded pool frames.
  """
  a, e = ev.config.cdc.adr, ev.config.cdc.eval
  dev, the_device, m = ctx["dev"], ctx["device"], ctx["frames"]
  for sel in e.selectors:
    for k in e.anchor_counts:
      if k > m:
        continue
      the_device.selector, the_device.num_anchors = sel, int(k)
      if sel == "gaussian":
        fn, static = device._summary, dict(g=int(k))
      else:
        fn = device._anchors
        static = dict(k=int(k), method=sel, weighting=a.weighting, iters=a.kmedoids_iters)
      # The program the device's uplink runs, compiled once for both (lowering is cached).
      adr_flops = ev.flops(
        ("adr", sel, int(k), m),
        lambda fn=fn, static=static: flops_lib.compiled_flops(
          fn.lower(pool, jax.random.key(0), **static).compile()
        ),
      )
      make = functools.partial(_uplink, the_device, pool, ev.config.seed)
      _fda_arm(ctx, f"fda/{sel}/K{k}", make, adr_flops)
      if sel == a.selector and k == a.num_anchors:
        # The scores above use precomputed features; the device's own jitted forward must agree.
        tdom = ev.dataset.domain(dev, "test")
        out = the_device.forward(tdom)
        acc = objectives.qa_accuracy(out["qa_logits"], tdom.answers)
        if abs(acc - ev.rows[f"fda/{sel}/K{k}"][str(dev)]["qa_accuracy"]) > 1e-6:
          raise AssertionError("device_forward disagrees with the precomputed-feature scoring")

  _fda_arm(ctx, "fda/all", functools.partial(_all_frames, pool, a.uplink_dtype), 0.0)


def _conditioning_ablations(ev: _Evaluation, dev: int, heldout: list[int], the_device, test):
  """``fda/base`` and ``fda/mismatched``: how much the generated head owes to the device's own
  anchors. The base is what meta-training gives without looking at the device; the mismatched
  head is generated from the anchors of the next held-out device."""
  a = ev.config.cdc.adr
  base = models.merge_head(ev.head, ev.fda_base)
  ev.add(
    "fda/base", dev, {**_metrics(base, test), "uplink_bytes": 0, "downlink_bytes": ev.down_bytes}
  )
  other = int(heldout[(heldout.index(dev) + 1) % len(heldout)])
  odom = ev.dataset.domain(other, "pool")
  other_pool = the_device.pool(odom.frames, odom.frame_mask)
  the_device.selector, the_device.num_anchors = a.selector, a.num_anchors
  theta = the_device.install(
    ev.the_cloud.adapt(the_device.uplink(other_pool, seed=ev.config.seed)[0])
  )
  ev.add("fda/mismatched", dev, {**_metrics(theta, test), "anchors_from": other})


def _finetune_arms(ev: _Evaluation, dev: int, test, frame_flops: float, num_frames: int):
  """``ft/n<n>`` for every shot count, then ``oracle`` (all labeled videos): backprop on device.

  frame_flops: the frozen encoder's FLOPs per frame; num_frames: T, frames per video.
  """
  config = ev.config
  meta, ft = config.cdc.meta, config.cdc.finetune
  labeled, _ = _features(ev.encoders, ev.enc_state, ev.dataset, dev, "train")
  weights = dict(
    qa_weight=meta.qa_weight, retrieval_weight=meta.retrieval_weight, temperature=meta.temperature
  )
  for n in list(ft.shots) + [None]:
    rng = np.random.default_rng([config.seed, dev, 0 if n is None else n])
    sub = _labeled_subset(labeled, n, rng)
    encode_flops = frame_flops * sub.pop("num_videos") * num_frames
    res = finetune.finetune(
      ev.head,
      ev.trainable,
      sub,
      steps=ft.oracle_steps if n is None else ft.steps,
      batch_size=ft.batch_size,
      learning_rate=ft.learning_rate,
      seed=config.seed,
      **weights,
    )
    ev.add(
      "oracle" if n is None else f"ft/n{n}",
      dev,
      {
        **_metrics(res.head, test),
        "labels": len(sub["answers"]) + len(sub["caption"]),
        "device_flops": res.flops + encode_flops,
        "device_seconds": res.seconds,
        "latency_seconds": res.seconds,
        "uplink_bytes": 0,
        "downlink_bytes": 0,
      },
    )


HEADLINE_KEYS = (
  "qa_accuracy",
  "R@1",
  "R@5",
  "device_flops",
  "device_seconds",
  "uplink_bytes",
  "latency_seconds",
)


def write_headline(workdir: str, config, result: dict, wall_time_s: float) -> str:
  """``workdir/headline.json`` (``common.headline``): the configured FDA arm (selector, K) against
  the static model, few-shot fine-tuning and the oracle, means over the held-out devices."""
  from common import headline

  mean = result["mean"]
  a = config.cdc.adr
  arm = f"fda/{a.selector}/K{a.num_anchors}"
  if arm not in mean:  # the configured K was not among cdc.eval.anchor_counts
    arm = next(k for k in mean if k.startswith("fda/") and k.count("/") == 2)

  def pick(name):
    return {k: mean[name][k] for k in HEADLINE_KEYS if k in mean[name]}

  baselines = [n for n in mean if n == "static" or n.startswith("ft/") or n == "oracle"]
  return headline.write(
    workdir,
    method="cdc",
    kind="adaptation",
    arm=arm,
    metrics=pick(arm),
    primary="qa_accuracy",
    higher_is_better=True,
    baselines={n: pick(n) for n in [*baselines, "fda/all"] if n in mean},
    flops=mean[arm].get("device_flops"),
    flops_what="device FLOPs per adaptation",
    wall_time_s=wall_time_s,
    note=f"means over held-out devices {result['heldout_devices']}; {result['note']}",
  )


def _mean(per_dev: dict) -> dict:
  keys = next(iter(per_dev.values())).keys()
  out = {}
  for k in keys:
    vals = np.array([r[k] for r in per_dev.values()], np.float64)
    out[k] = float(np.nanmean(vals))
    out[k + "_std"] = float(np.nanstd(vals))
  return out


def summary_table(result: dict) -> str:
  """A markdown table of the per-arm means over the held-out devices."""
  lines = [
    "Toy-scale CDC-MMPG-style results (reference design, not the paper's figures); means over "
    f"held-out devices {result['heldout_devices']}, link {result['link_mbps']} Mbit/s.",
    "",
    "| arm | QA acc | R@1 | R@5 | uplink B | downlink B | device MFLOPs | device ms | latency ms |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for arm, m in result["mean"].items():
    lines.append(
      f"| {arm} | {m['qa_accuracy']:.3f} | {m['R@1']:.3f} | {m['R@5']:.3f} | "
      f"{m.get('uplink_bytes', 0):.0f} | {m.get('downlink_bytes', 0):.0f} | "
      f"{m.get('device_flops', 0) / 1e6:.2f} | {1e3 * m.get('device_seconds', 0):.1f} | "
      f"{1e3 * m.get('latency_seconds', 0):.1f} |"
    )
  return "\n".join(lines) + "\n"


def drift_demo(config, dataset, spec, graphdef, enc_state, head, the_cloud, encoders) -> dict:
  """The drift trigger on a stream that switches from one held-out device to another.

  Window by window the device pools its recent frames, computes MMD^2 against its last upload and
  re-requests parameters when it exceeds ``cdc.eval.drift_threshold``. Recorded per window: the
  statistic, whether it triggered, and the QA accuracy on the test set of the device the window
  came from of the head installed before and after the window's check.
  """
  e, a = config.cdc.eval, config.cdc.adr
  first, second = (int(d) for d in dataset.heldout_devices[:2])
  frames, source = dataset.drift_stream(
    first, second, e.drift_windows, e.drift_switch_at, e.drift_window_videos
  )
  tests = {d: _features(encoders, enc_state, dataset, d, "test")[0] for d in (first, second)}
  the_device = device.Device(
    spec, graphdef, enc_state, head, selector=a.selector, num_anchors=a.num_anchors
  )
  monitor = device.DriftMonitor(threshold=e.drift_threshold)
  mask = np.ones(frames.shape[1:3], bool)
  trace = []
  for w in range(len(frames)):
    pool = the_device.pool(frames[w], mask)
    test = tests[int(source[w])]
    before = _metrics(the_device.head, test)["qa_accuracy"] if w else None
    trigger, stat = monitor.check(pool)
    if trigger:
      up, _ = the_device.uplink(pool, seed=config.seed)
      the_device.install(the_cloud.adapt(up))
      sent = device.unpack(up.payload, up.layout)
      monitor.uploaded(pool, sent["anchors"], sent["weights"])
    trace.append(
      {
        "window": w,
        "device": int(source[w]),
        "mmd2": stat if np.isfinite(stat) else None,
        "triggered": bool(trigger),
        "qa_before": before,
        "qa_after": _metrics(the_device.head, test)["qa_accuracy"],
      }
    )
  return {
    "first": first,
    "second": second,
    "switch_at": e.drift_switch_at,
    "threshold": e.drift_threshold,
    "trace": trace,
  }


def main(argv):
  del argv
  from common.train import cli

  cli.start_binary()
  result = cli.run_or_exit(evaluate, flags.FLAGS.workdir)
  print(summary_table(result))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "workdir of cdc.pretrain and cdc.train")
  flags.mark_flags_as_required(["workdir"])
  from common.train import cli

  app.run(main, flags_parser=cli.parse_flags_or_exit)
