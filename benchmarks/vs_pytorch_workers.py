"""The worker processes of ``benchmarks/vs_pytorch.py``: one variant each (jax, eager, compile).

A worker builds its variant's train step, sampler and TFDiff block once (``setup``, compile and
warm-up included), then answers ``run`` commands with the seconds of each step, until the driver
says ``quit``. Commands and answers are JSON lines on stdin / stdout; an answer line starts with
``MARK``, and whatever the libraries print goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np

MARK = "@@vs_pytorch@@ "
WARMUP_STEPS = 2


def data_info(config):
  from common import data

  return data.get_info(config.data)


class JaxWorker:
  """The project's jitted train step, ``DDPM.sample`` and TFDiff's ``CoreBlock``."""

  def __init__(self, config, mobile_config, sample_batch):
    import jax

    from common.train import host_memory

    host_memory.keep_freed(jax.default_backend())  # as the binaries (off for jax-xla)
    self.jax = jax
    self.config, self.mobile_config, self.sample_batch = config, mobile_config, sample_batch
    self.sample_count = 0

  def setup_train(self):
    jax = self.jax
    from common import parallel
    from common.models import count_params
    from common.train import loop, validate
    from common.train import method as method_lib

    config = self.config
    info = data_info(config)
    dev = jax.devices()[0]
    out = {"device": f"{dev.platform} ({dev.device_kind}) x{jax.device_count()}"}
    out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    mesh_shape = validate.validate_common(config, num_devices=jax.device_count())
    self.method = method_lib.load_method(config, info)
    fns = loop.build(config, self.method, parallel.make_mesh(mesh_shape))
    b, r, c = config.batch_size, info.resolution, info.channels
    rng = np.random.default_rng(0)
    host = {
      "image": rng.uniform(-1, 1, (b, r, r, c)).astype(np.float32),
      "label": rng.integers(0, max(info.num_classes, 1), (b,)).astype(np.int32),
    }
    self.batch = parallel.global_batch(host, fns["batch_sharding"])
    self.state = fns["init"]()
    out["params"] = count_params(self.state.params)
    self.step = fns["step"].lower(self.state, self.batch).compile()
    out["train_flops"] = _xla_flops(self.step)
    return out

  def setup_sample(self):
    return {"sample_flops": self.method.flops_per_sample(self.state.ema_params) * self.sample_batch}

  def setup_block(self):
    jax, jnp = self.jax, self.jax.numpy
    from flax import nnx

    from mobile import formulas
    from mobile.model import CoreBlock
    from mobile.spec import spec_from_config

    mc = self.mobile_config
    info = data_info(mc)
    spec = spec_from_config(mc, in_channels=info.channels, num_classes=info.num_classes)
    block = CoreBlock(spec, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(block, nnx.Param)
    side = spec.image_size // spec.stride
    shape = (mc.batch_size, side, side, spec.width)
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], shape)
    cond = jax.random.normal(keys[1], (mc.batch_size, spec.d_cond))
    cot = jax.random.normal(keys[2], shape)

    def fwd_bwd(params, x):
      # One block's forward and backward as inside a network: gradients for its parameters and
      # its input, against a fixed cotangent.
      return jax.value_and_grad(
        lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x, cond) * cot), argnums=(0, 1)
      )(params, x)

    self.block_fn = jax.jit(fwd_bwd).lower(params, x).compile()
    self.block_args = (params, x)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    if n != formulas.block_params(spec):
      raise AssertionError(
        f"CoreBlock has {n} parameters, formulas say {formulas.block_params(spec)}"
      )
    return {
      "block_flops": _xla_flops(self.block_fn),
      "block_params": n,
      "block_shape": list(shape),
    }

  def train(self, k):
    times = []
    for _ in range(k):
      t = time.perf_counter()
      self.state, metrics = self.step(self.state, self.batch)
      self.jax.block_until_ready((self.state, metrics))
      times.append(time.perf_counter() - t)
    return times

  def sample(self):
    self.sample_count += 1
    rng = self.jax.random.key(self.sample_count)
    t = time.perf_counter()
    self.method.sample(self.state.ema_params, rng, self.sample_batch)  # a host array: waits
    return [time.perf_counter() - t]

  def block(self, k):
    times = []
    for _ in range(k):
      t = time.perf_counter()
      self.jax.block_until_ready(self.block_fn(*self.block_args))
      times.append(time.perf_counter() - t)
    return times


def _xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


class TorchWorker:
  """``torch_unet``'s trainer and sampler and ``torch_tfdiff``'s block, eager or compiled."""

  def __init__(self, config, mobile_config, sample_batch, *, compile, threads, device="cpu"):
    import torch

    # Before any parallel work, or PyTorch refuses to change the inter-op pool.
    torch.set_num_interop_threads(1)
    torch.set_num_threads(threads)
    self.torch = torch
    self.compile = compile
    self.device = torch.device(device)
    self.config, self.mobile_config, self.sample_batch = config, mobile_config, sample_batch

  def setup_train(self):
    import copy

    import torch_ddpm
    import torch_unet

    torch = self.torch
    torch.manual_seed(0)
    config = self.config
    if config.model.dtype not in torch_ddpm.AUTOCAST:
      raise NotImplementedError(
        f"config.model.dtype={config.model.dtype!r}: the PyTorch side runs"
        f" {', '.join(torch_ddpm.AUTOCAST)}"
      )
    info = data_info(config)
    self.info = info
    out = {
      "torch": torch.__version__,
      "torch_device": str(self.device),
      "threads": torch.get_num_threads(),
      "interop_threads": torch.get_num_interop_threads(),
    }
    model = torch_unet.unet_from_config(
      config, in_channels=info.channels, num_classes=info.num_classes
    )
    out["params"] = torch_unet.count_params(model)
    # The EMA copy is a second network whose parameters the trainer updates in place: sampling
    # uses EMA weights, as DDPM.sample is given them.
    self.ema_model = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)
    self.trainer = torch_ddpm.TorchTrainer(
      model, config, num_classes=info.num_classes, compile=self.compile, device=self.device
    )
    self.trainer.ema = list(self.ema_model.parameters())
    b, r, c = config.batch_size, info.resolution, info.channels
    self.x0 = (torch.rand(b, c, r, r) * 2 - 1).to(self.device)
    self.labels = torch.randint(0, max(info.num_classes, 1), (b,)).to(self.device)
    self.schedule = self.trainer.schedule
    return out

  def setup_sample(self):
    torch = self.torch
    self.sampler_net = torch.compile(self.ema_model) if self.compile else self.ema_model
    return {}

  def setup_block(self):
    import torch_tfdiff

    from mobile.spec import spec_from_config

    torch = self.torch
    mc = self.mobile_config
    info = data_info(mc)
    spec = spec_from_config(mc, in_channels=info.channels, num_classes=info.num_classes)
    block = torch_tfdiff.CoreBlock(spec).to(self.device)
    self.block_net = torch.compile(block) if self.compile else block
    self.block_params = list(block.parameters())
    side = spec.image_size // spec.stride
    shape = (mc.batch_size, side, side, spec.width)
    self.block_x = torch.randn(shape, device=self.device, requires_grad=True)
    self.block_c = torch.randn(mc.batch_size, spec.d_cond, device=self.device)
    self.block_cot = torch.randn(shape, device=self.device)
    return {"block_params": sum(p.numel() for p in self.block_params)}

  def train(self, k):
    times = []
    for _ in range(k):
      t = time.perf_counter()
      self.trainer.step(self.x0, self.labels).item()
      times.append(time.perf_counter() - t)
    return times

  def sample(self):
    import torch_ddpm

    torch = self.torch
    info = self.info
    n = self.sample_batch
    shape = (n, info.channels, info.resolution, info.resolution)
    labels = None
    if self.trainer.conditional:
      labels = torch.randint(0, info.num_classes, (n,), device=self.device)
    noise = torch.randn(shape, device=self.device)
    self._sync()
    t = time.perf_counter()
    with torch_ddpm.autocast(self.config.model.dtype, self.device):
      torch_ddpm.sample(
        self.sampler_net,
        self.config,
        self.schedule,
        noise,
        labels,
        num_classes=info.num_classes,
      )
    self._sync()
    return [time.perf_counter() - t]

  def block(self, k):
    times = []
    for _ in range(k):
      t = time.perf_counter()
      for p in self.block_params:
        p.grad = None
      self.block_x.grad = None
      out = self.block_net(self.block_x, self.block_c)
      (out * self.block_cot).sum().backward()
      self._sync()
      times.append(time.perf_counter() - t)
    return times

  def _sync(self):
    """Waits for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if self.device.type == "cuda":
      self.torch.cuda.synchronize(self.device)


def run(worker, part: str, k: int) -> list[float]:
  """Seconds of each of ``k`` train or block steps, or of one sampling run."""
  return worker.sample() if part == "sample" else getattr(worker, part)(k)


def serve(
  kind: str, config, mobile_config, sample_batch: int, threads: int, *, torch_device: str = "cpu"
) -> None:
  """Serves ``{"cmd": ...}`` lines from stdin; answers each with one ``MARK``ed JSON line."""
  reply = sys.stdout
  # Whatever the libraries print goes to stderr; stdout carries the answers only.
  sys.stdout = sys.stderr
  worker = None
  for line in sys.stdin:
    cmd = json.loads(line)
    try:
      if cmd["cmd"] == "quit":
        break
      if worker is None:
        if kind == "jax":
          worker = JaxWorker(config, mobile_config, sample_batch)
        else:
          worker = TorchWorker(
            config,
            mobile_config,
            sample_batch,
            compile=kind == "compile",
            threads=threads,
            device=torch_device,
          )
      name, part = cmd["cmd"], cmd["part"]
      if name == "setup":
        # Build (and compile) one part, then its warm-up, excluded from the timings.
        t0 = time.perf_counter()
        result = getattr(worker, f"setup_{part}")()
        run(worker, part, WARMUP_STEPS)
        result[f"{part}_setup_s"] = time.perf_counter() - t0
      elif name == "run":
        result = run(worker, part, cmd["k"])
      else:
        raise ValueError(f"unknown command {cmd!r}")
      answer = {"ok": result}
    except Exception as e:  # reported by the driver in the table, never a crash of the run
      tb = traceback.format_exc().strip().splitlines()
      answer = {"error": f"{type(e).__name__}: {e}".strip()[:400], "traceback": tb[-12:]}
    reply.write(MARK + json.dumps(answer) + "\n")
    reply.flush()
