"""Speed side by side: the repo's JAX U-Net step against the same network in PyTorch.

  python benchmarks/vs_pytorch.py --config=configs/ddpm.py:digits
  python benchmarks/vs_pytorch.py --config=configs/ddpm.py:shapes --parts=train,block \
      --mobile_config=configs/mobile.py:shapes_config1 --rounds=2 --steps_per_round=2
  python benchmarks/vs_pytorch.py --config=configs/ddpm.py:digits --variants=jax,eager@1 --quick

Needs PyTorch (``pip install -e ".[bench]"``). What runs, per variant:

* ``jax``: the project's own jitted train step (``common.train.loop.build``, as
  ``benchmarks/train_step.py``: same shardings, donation, optimizer, EMA), ``DDPM.sample`` for
  sampling, and ``mobile.model.CoreBlock`` under ``jax.jit(value_and_grad)`` for the TFDiff block;
* ``jax-xla``: the same JAX programs without the binaries' XLA:CPU defaults
  (``common/train/xla_flags.py``), for their A/B in the same rounds;
* ``eager``: ``benchmarks/torch_unet.py``'s U-Net with ``benchmarks/torch_ddpm.py``'s loss,
  Adam(W) + clipping + EMA and sampler, and ``benchmarks/torch_tfdiff.py``'s block, in eager mode;
* ``compile``: the same with ``torch.compile`` (the loss graph, the sampling network, the block);
  a failure to compile is reported in the table, the other variants go on.

Each variant runs in its own worker process (this file with ``--worker``, serving
``benchmarks/vs_pytorch_workers.py``), started once and kept
alive for the whole run, so compilation and warm-up happen once and are excluded. The driver then
times the variants in interleaved rounds (round i: every variant's K train steps, then every
variant's sampling run, then K block steps; the order rotates each round), so a change in the
machine's load hits all of them alike, and prints median / min / max per step, the ratios of JAX
to each PyTorch variant, achieved FLOP/s against the device peak and the load average before and
after. FLOPs are XLA's cost analysis of the JAX programs, used for every variant (same network).
The last line printed is one JSON object; ``ratio_jax_over_best_torch`` is the headline: the JAX
train step's median over the best PyTorch variant's (> 1: JAX is slower).

Devices and dtype: ``--torch_device=cuda`` runs the PyTorch variants on the GPU (JAX runs on its
default backend); ``--config.model.dtype=bfloat16`` runs JAX's step in bf16 compute (params
float32) and PyTorch's under ``torch.autocast(bfloat16)``, its mixed-precision counterpart.

Threads: ``--threads`` (default 2) sets ``torch.set_num_threads`` (and OMP/MKL) in each PyTorch
worker, with one inter-op thread and ``OMP_WAIT_POLICY=PASSIVE`` (``--omp_wait_policy``);
``eager@1`` names a variant with its own count (the defaults: jax, eager, eager@1, compile). JAX runs with
the XLA_FLAGS of the environment (minus any forced host device count: this is a one-device
benchmark); XLA:CPU's default intra-op pool has one thread per core. ``jax@N`` adds
``intra_op_parallelism_threads=N``. The flags in force are printed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cpu_peak  # noqa: E402
import numpy as np  # noqa: E402
import vs_pytorch_workers as vs_workers  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "The U-Net config and preset (config.model.name = 'unet').", lock_config=True
)
_MOBILE_DEFAULT = os.path.join(_ROOT, "configs", "mobile.py") + ":digits_config1"
_MOBILE = config_flags.DEFINE_config_file(
  "mobile_config",
  _MOBILE_DEFAULT,
  "The TFDiff config whose core block (width, tokens, batch) is timed.",
  lock_config=True,
)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
_STEPS = flags.DEFINE_integer("steps_per_round", 10, "Train / block steps per variant per round.")
_THREADS = flags.DEFINE_integer("threads", 2, "PyTorch intra-op threads (variants without @N).")
_PEAK = flags.DEFINE_float(
  "peak_gflops", 0.0, "Device peak GFLOP/s (float32); 0: estimated from /proc/cpuinfo."
)
_VARIANTS = flags.DEFINE_list(
  "variants",
  ["jax", "eager", "eager@1", "compile"],
  "Variants: jax, jax-xla (JAX without the binaries' XLA:CPU defaults), eager, compile, each "
  "optionally @threads (eager@1: PyTorch eager on 1 thread).",
)
_OMP_WAIT = flags.DEFINE_enum(
  "omp_wait_policy",
  "passive",
  ["passive", "active", "default"],
  "OMP_WAIT_POLICY of the PyTorch workers. passive: idle OpenMP threads sleep instead of spinning;"
  " on a loaded 2-core machine (load 4.5) a spinning 2-thread digits step took 6.5 s instead of"
  " 0.13 s, so spinning measures the load, not the framework. default: leave it unset.",
)
_PARTS = flags.DEFINE_list("parts", ["train", "sample", "block"], "What to time.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 0, "Images per sampling run (0: batch_size).")
_QUICK = flags.DEFINE_bool("quick", False, "1 round of 2 steps (a smoke test, not a measurement).")
_TIMEOUT = flags.DEFINE_integer("worker_timeout", 3600, "Seconds a worker may take per command.")
_TORCH_DEVICE = flags.DEFINE_string(
  "torch_device", "cpu", "Device of the PyTorch variants: cpu | cuda | cuda:N."
)
_WORKER = flags.DEFINE_string("worker", "", "Internal: run as the worker of this variant kind.")
_WORKER_THREADS = flags.DEFINE_integer("worker_threads", 0, "Internal: the worker's threads.")

_KINDS = ("jax", "eager", "compile")
# A variant spec: JAX without the binaries' XLA:CPU defaults (common/train/xla_flags.py), timed
# in the same rounds as ``jax``, so the table's ratio column is their A/B on one machine state.
PLAIN_JAX = "jax-xla"


# ==============================================================================================
# The driver.
# ==============================================================================================


class Worker:
  """One variant's process; ``call`` sends a command for one part and waits for its answer.

  A failure is recorded per part (``errors``), so a variant whose sampler or block fails to
  compile still reports its train step; a failed train setup fails every part (they reuse it).
  """

  def __init__(self, name, kind, threads, argv):
    self.name, self.kind, self.threads = name, kind, threads
    self.errors: dict[str, str] = {}
    env = dict(os.environ)
    flags_ = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    if kind == "jax" and threads:
      flags_ += f" intra_op_parallelism_threads={threads}"
    env["XLA_FLAGS"] = " ".join(flags_.split())
    if kind == "jax" and name.startswith(PLAIN_JAX):
      # XLA's and glibc's own defaults: the A/B of the project's.
      env["SEGDIFF_XLA_DEFAULTS"] = env["SEGDIFF_KEEP_HOST_MEMORY"] = "0"
    elif kind == "jax":
      from common.train import xla_flags

      # The U-Net binaries' XLA:CPU defaults (what users run); TFDiff's binaries run without.
      xla_flags.apply_cpu_defaults("unet", env)
    if kind != "jax":
      for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
      if _OMP_WAIT.value != "default":
        env["OMP_WAIT_POLICY"] = _OMP_WAIT.value.upper()
    self.stderr = tempfile.TemporaryFile(mode="w+")
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={kind}"]
    cmd += [f"--worker_threads={threads}"] + argv
    self.proc = subprocess.Popen(
      cmd,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self.stderr,
      text=True,
      bufsize=1,
      cwd=_ROOT,
      env=env,
    )
    self.lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      if line.startswith(vs_workers.MARK):
        self.lines.put(json.loads(line[len(vs_workers.MARK) :]))
    self.lines.put(None)

  def error(self, part: str) -> str | None:
    return self.errors.get(part) or (self.errors.get("train") if part != "train" else None)

  def call(self, timeout, cmd: str, part: str, **kw):
    """The command's result, or None when it (or the part's setup) failed."""
    if self.error(part) or self.errors.get("process"):
      return None
    try:
      self.proc.stdin.write(json.dumps({"cmd": cmd, "part": part, **kw}) + "\n")
      self.proc.stdin.flush()
      answer = self.lines.get(timeout=timeout)
    except (BrokenPipeError, queue.Empty) as e:
      answer = {"error": f"no answer ({type(e).__name__})"}
    if answer is None:
      self.stderr.seek(0)
      tail = self.stderr.read().strip().splitlines()[-3:]
      answer = {"error": "worker exited: " + " | ".join(tail)}
      self.errors["process"] = answer["error"]
    if "error" in answer:
      self.errors[part] = f"{cmd} {part}: {answer['error']}"
      return None
    return answer["ok"]

  def close(self):
    try:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.close()
      self.proc.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
      self.proc.kill()
      self.proc.wait()


def _parse_variants(specs, default_threads):
  out = []
  for spec in specs:
    kind, _, threads = spec.partition("@")
    plain = kind == PLAIN_JAX
    if plain:
      kind = "jax"
    if kind not in _KINDS:
      raise app.UsageError(f"--variants: unknown variant {spec!r}; allowed: {', '.join(_KINDS)}")
    if kind == "jax":
      n = int(threads) if threads else 0  # 0: XLA's own default
    else:
      n = int(threads) if threads else default_threads
    label = {"jax": "jax", "eager": "torch eager", "compile": "torch.compile"}[kind]
    if plain:
      label = "jax, XLA defaults"
    if kind != "jax":
      label += f" ({n} thr)"
    elif n:
      label += f" ({n} thr)"
    out.append((spec, kind, n, label))
  if len({s for s, *_ in out}) != len(out):
    raise app.UsageError("--variants: a variant is listed twice")
  return out


def _stats(times_s, flops, peak):
  ms = [t * 1e3 for t in times_s]
  med = statistics.median(ms)
  gflops = flops / (med / 1e3) / 1e9 if flops == flops and flops > 0 else float("nan")
  return {
    "median_ms": med,
    "min_ms": min(ms),
    "max_ms": max(ms),
    "n": len(ms),
    "gflops": gflops,
    "frac_peak": gflops / peak if peak == peak and peak > 0 else float("nan"),
  }


def _fmt(v, spec=".1f"):
  return "n/a" if v is None or v != v else format(v, spec)


def _table(title, part, variants, workers, results, jax_name):
  lines = [title]
  lines.append(
    f"  {'variant':<26}{'median ms':>11}{'min':>10}{'max':>10}{'GFLOP/s':>10}{'% peak':>8}"
    f"{'JAX / this':>12}"
  )
  jax_med = results.get(jax_name, {}).get(part, {}).get("median_ms")
  for spec, _, _, label in variants:
    w = workers[spec]
    r = results.get(spec, {}).get(part)
    if r is None:
      why = w.error(part) or w.errors.get("process") or "not run"
      lines.append(f"  {label:<26}FAILED: {why[:200]}")
      continue
    ratio = jax_med / r["median_ms"] if jax_med else None
    lines.append(
      f"  {label:<26}{r['median_ms']:>11.1f}{r['min_ms']:>10.1f}{r['max_ms']:>10.1f}"
      f"{_fmt(r['gflops']):>10}{_fmt(100 * r['frac_peak']):>8}{_fmt(ratio, '.2f'):>12}"
    )
  return lines


@dataclasses.dataclass
class _Run:
  """What the driver times, and what the timing brought back (filled in by ``_time_variants``)."""

  variants: list  # (spec, kind, threads, label) per variant, from _parse_variants
  parts: list  # the parts timed, in the order train, sample, block
  rounds: int
  k: int  # train / block steps per variant per round
  workers: dict  # spec -> Worker (closed once timed; its errors stay)
  setup: dict = dataclasses.field(default_factory=dict)  # spec -> the worker's setup answers
  times: dict = dataclasses.field(default_factory=dict)  # spec -> part -> step times (s)
  run_s: float = float("nan")  # wall time of the timed rounds
  load_before: tuple = ()  # os.getloadavg() before and after the timed rounds
  load_after: tuple = ()

  @property
  def jax_name(self) -> str | None:
    return next(
      (s for s, kind, *_ in self.variants if kind == "jax" and not s.startswith(PLAIN_JAX)), None
    )

  @property
  def jax_setup(self) -> dict:
    return self.setup.get(self.jax_name, {}) if self.jax_name else {}


def _time_variants(run: _Run) -> None:
  """Sets every variant up, then times them in interleaved rounds; closes the workers."""
  run.setup = {spec: {} for spec, *_ in run.variants}
  try:
    # One setup at a time: compiles do not fight over the cores, and their times are clean.
    # Sampling reuses the train setup's model (its EMA weights), so it is set up too.
    parts = run.parts
    setup_parts = ["train"] + parts[1:] if "sample" in parts else parts
    for spec, *_ in run.variants:
      for part in setup_parts:
        run.setup[spec].update(run.workers[spec].call(_TIMEOUT.value, "setup", part) or {})
    run.load_before = os.getloadavg()
    run.times = {spec: {p: [] for p in parts} for spec, *_ in run.variants}
    order = [spec for spec, *_ in run.variants]
    t_run = time.perf_counter()
    for r in range(run.rounds):
      turn = order[r % len(order) :] + order[: r % len(order)]
      for part in parts:
        for spec in turn:
          got = run.workers[spec].call(_TIMEOUT.value, "run", part, k=run.k)
          if got is not None:
            run.times[spec][part] += got
    run.run_s = time.perf_counter() - t_run
    run.load_after = os.getloadavg()
  finally:
    for w in run.workers.values():
      w.close()


def _driver_main(argv_flags) -> None:
  """Times the variants (``_time_variants``), then prints the setup, one table per part and the
  headline, and last the JSON summary."""
  rounds, k = (1, 2) if _QUICK.value else (_ROUNDS.value, _STEPS.value)
  parts = [p for p in ("train", "sample", "block") if p in _PARTS.value]
  unknown = set(_PARTS.value) - set(parts)
  if unknown:
    raise app.UsageError(f"--parts: unknown {sorted(unknown)}; allowed: train, sample, block")
  variants = _parse_variants(_VARIANTS.value, _THREADS.value)
  peak, peak_how = (_PEAK.value, "given") if _PEAK.value > 0 else cpu_peak.estimate_peak_gflops()

  workers = {spec: Worker(spec, kind, n, argv_flags) for spec, kind, n, _ in variants}
  run = _Run(variants=variants, parts=parts, rounds=rounds, k=k, workers=workers)
  _time_variants(run)

  flops = {p: run.jax_setup.get(f"{p}_flops", float("nan")) for p in parts}
  results = {}
  for spec, *_ in variants:
    results[spec] = {
      p: _stats(run.times[spec][p], flops[p], peak)
      for p in parts
      if run.times[spec][p] and not workers[spec].error(p)
    }

  _print_header(run, argv_flags, peak, peak_how)
  _print_tables(run, argv_flags, flops, results)
  best, ratio = _headline(run, results)
  summary = {
    "config": _config_name(argv_flags),
    "batch": _CONFIG.value.batch_size,
    "dtype": _CONFIG.value.model.dtype,
    "jax_device": run.jax_setup.get("device"),
    "torch_device": _TORCH_DEVICE.value,
    "rounds": rounds,
    "steps_per_round": k,
    "params": {s: run.setup.get(s, {}).get("params") for s, *_ in variants},
    "block_params": {s: run.setup.get(s, {}).get("block_params") for s, *_ in variants},
    "threads": {s: n for s, _, n, _ in variants},
    "xla_flags": run.jax_setup.get("xla_flags"),
    "omp_wait_policy": _OMP_WAIT.value,
    "peak_gflops": peak,
    "flops": flops,
    "load_before": list(run.load_before),
    "load_after": list(run.load_after),
    "setup_s": {
      s: {key: v for key, v in run.setup.get(s, {}).items() if key.endswith("_setup_s")}
      for s, *_ in variants
    },
    "results": results,
    "errors": {s: w.errors for s, w in workers.items() if w.errors},
    "best_torch": best,
    "ratio_jax_over_best_torch": ratio,
  }
  print(json.dumps(summary, default=_json_default))


def _print_header(run: _Run, argv_flags, peak, peak_how) -> None:
  """The lines above the tables: config, device and peak, versions and threads, setup times,
  rounds and the load average."""
  config, parts, setup, jax_setup = _CONFIG.value, run.parts, run.setup, run.jax_setup
  info = vs_workers.data_info(config)
  torch_setup = next((setup[s] for s, kind, *_ in run.variants if kind != "jax" and setup[s]), {})
  r = info.resolution
  print(
    f"vs_pytorch: {_config_name(argv_flags)}  batch {config.batch_size}  {r}x{r}x{info.channels}"
    f"  {config.model.dtype}  params JAX {_fmt(jax_setup.get('params'), ',')}"
    f" / PyTorch {_fmt(torch_setup.get('params'), ',')}"
  )
  print(f"device: {jax_setup.get('device', 'cpu')}; peak {peak:.1f} GFLOP/s float32 ({peak_how})")
  print(
    f"versions: torch {torch_setup.get('torch', 'n/a')} on {_TORCH_DEVICE.value}; threads: PyTorch set_num_threads per "
    f"variant, set_num_interop_threads(1), OMP_WAIT_POLICY {_OMP_WAIT.value};"
    f" JAX XLA_FLAGS={jax_setup.get('xla_flags', '')!r}"
    f" (XLA:CPU default intra-op pool: one thread per core, {len(os.sched_getaffinity(0))})"
  )
  print(
    "setup s (build + compile + warm-up, excluded): "
    + "; ".join(
      f"{label} " + " ".join(f"{p} {_fmt(setup[s].get(f'{p}_setup_s'))}" for p in parts)
      for s, _, _, label in run.variants
    )
  )
  print(
    f"rounds {run.rounds} x {run.k} steps"
    f"{' (sampling: 1 run per round)' if 'sample' in parts else ''},"
    f" interleaved, {run.run_s:.0f} s;"
    f" load average (1/5/15 min) before {_load(run.load_before)},"
    f" after {_load(run.load_after)}"
  )
  print()


def _print_tables(run: _Run, argv_flags, flops, results) -> None:
  """One table per part timed (``_table``), each under a title that says what one step does."""
  config, mc, jax_setup = _CONFIG.value, _MOBILE.value, run.jax_setup
  sample_batch = _SAMPLE_BATCH.value or config.batch_size
  titles = {
    "train": f"train step (batch {config.batch_size}, loss + backward + clip + Adam + EMA),"
    f" XLA FLOPs/step {_fmt(flops.get('train'), '.3g')}",
    "sample": f"{config.diffusion.sampler.upper()}-{config.diffusion.sample_steps} sampling of"
    f" {sample_batch} images (one run), XLA FLOPs {_fmt(flops.get('sample'), '.3g')}",
    "block": f"TFDiff core block fwd+bwd ({_config_name(argv_flags, 'mobile_config')}:"
    f" D={mc.model.width}, {_block_tokens(mc)} tokens, batch {mc.batch_size},"
    f" params {_fmt(jax_setup.get('block_params'), ',')}), XLA FLOPs"
    f" {_fmt(flops.get('block'), '.3g')}",
  }
  for part in run.parts:
    for line in _table(titles[part], part, run.variants, run.workers, results, run.jax_name):
      print(line)
    print()


def _headline(run: _Run, results) -> tuple[str | None, float | None]:
  """The fastest PyTorch variant's train step and JAX's median over it (printed when known)."""
  torch_train = {
    s: results[s]["train"]["median_ms"]
    for s, kind, *_ in run.variants
    if kind != "jax" and "train" in results.get(s, {})
  }
  best = min(torch_train, key=torch_train.get) if torch_train else None
  ratio = None
  jax_name = run.jax_name
  if best and jax_name in results and "train" in results[jax_name]:
    ratio = results[jax_name]["train"]["median_ms"] / torch_train[best]
    print(f"headline: JAX train step / best PyTorch ({best}) = {ratio:.2f}  (> 1: JAX is slower)")
  return best, ratio


def _json_default(v):
  return float(v) if isinstance(v, np.floating) else str(v)


def _load(avg):
  return "/".join(f"{a:.2f}" for a in avg)


def _block_tokens(mc):
  return (mc.data.resolution // mc.model.stride) ** 2


def _config_name(argv_flags, name="config"):
  value = _MOBILE_DEFAULT if name == "mobile_config" else "?"
  for a in argv_flags:
    if a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
  return os.path.relpath(value, _ROOT) if os.path.isabs(value) else value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKER.value:
    config = _CONFIG.value
    sample_batch = _SAMPLE_BATCH.value or config.batch_size
    vs_workers.serve(
      _WORKER.value,
      config,
      _MOBILE.value,
      sample_batch,
      _WORKER_THREADS.value,
      torch_device=_TORCH_DEVICE.value,
    )
    return
  # The workers get this command line's config flags (and overrides) as they are.
  forwarded = [
    a
    for a in sys.argv[1:]
    if a.startswith(("--config", "--mobile_config", "--sample_batch", "--torch_device"))
  ]
  _driver_main(forwarded)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
