"""The repo's DDPM method around ``torch_unet``'s network, in PyTorch, for ``vs_pytorch.py``.

So that the benchmark's PyTorch side is the repo's method and not a look-alike:

* ``DiffusionLoss``: ``GaussianDiffusion.training_losses`` for the simple loss (eps / x0 / v,
  min-SNR-gamma weights); ``TorchTrainer`` does ``DDPM.conditioning``'s label dropout;
* ``TorchTrainer``: one ``common.train.state.default_train_step`` (clip by global norm, Adam(W)
  on ``method.make_optimizer``'s schedule, EMA);
* ``sample``: ``DDPM.sample``'s chain (the respaced grid and per-step coefficients of
  ``common.diffusion.steps``, DDIM or DDPM, classifier-free guidance as one [cond; uncond] call,
  x0 clipping).

The schedule tables come from ``common.diffusion.schedules`` (float64 on the host), the same
numbers the JAX side casts to float32.

``config.model.dtype = "bfloat16"`` (the JAX side: bf16 compute, float32 parameters, norms and
softmax in float32) runs the network under ``torch.autocast(bfloat16)``: float32 parameters,
matmuls and convolutions in bf16, GroupNorm in float32 (``autocast``).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from common.diffusion import schedules, steps

# config.model.dtype -> the autocast dtype of the network's forward (None: plain float32).
AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16}


def autocast(dtype_name: str, device) -> contextlib.AbstractContextManager:
  """``torch.autocast`` for ``config.model.dtype`` on ``device`` (a no-op for float32)."""
  dtype = AUTOCAST[dtype_name]
  if dtype is None:
    return contextlib.nullcontext()
  return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class Schedule:
  """The float64 host tables of ``GaussianDiffusion`` for ``config.diffusion``, as torch
  float32 [T] tensors (and the duck type ``steps.step_coefficients`` reads)."""

  def __init__(self, d, device="cpu"):
    if d.loss != "simple":
      raise NotImplementedError(
        f"torch_unet: diffusion.loss={d.loss!r}: only the simple loss is ported (digits, shapes)"
      )
    self.num_timesteps = int(d.num_timesteps)
    self.parameterization = d.parameterization
    self.min_snr_gamma = float(d.min_snr_gamma)
    self._betas = schedules.get_betas(d.schedule, self.num_timesteps)
    ac = schedules.alphas_cumprod(self._betas)

    def f32(a):
      return torch.tensor(np.asarray(a, np.float64), dtype=torch.float32, device=device)

    self.sqrt_ac = f32(np.sqrt(ac))
    self.sqrt_1m_ac = f32(np.sqrt(1.0 - ac))
    self.sqrt_recip_ac = f32(np.sqrt(1.0 / ac))
    self.sqrt_recipm1_ac = f32(np.sqrt(1.0 / ac - 1.0))
    self.snr = f32(schedules.snr(ac))

  def np_alpha_bar_levels(self) -> np.ndarray:
    return schedules.alpha_bar_levels(self._betas)


def _take(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
  return table[t][:, None, None, None]


class DiffusionLoss(nn.Module):
  """``GaussianDiffusion.training_losses`` (simple loss) mean over the batch: a module so that
  ``torch.compile`` sees the noising, the network and the loss as one graph.

  ``forward(x0 [B, C, H, W], t [B] int64, noise like x0, y [B] | None) -> scalar``.
  """

  def __init__(self, model: nn.Module, schedule: Schedule):
    super().__init__()
    self.model = model
    self.s = schedule

  def forward(self, x0, t, noise, y):
    s = self.s
    sa, s1 = _take(s.sqrt_ac, t), _take(s.sqrt_1m_ac, t)
    pred = self.model(sa * x0 + s1 * noise, t, y)
    if s.parameterization == "eps":
      target = noise
    elif s.parameterization == "x0":
      target = x0
    else:
      target = sa * noise - s1 * x0
    mse = torch.mean(torch.square(target - pred), dim=(1, 2, 3))
    if s.min_snr_gamma > 0:
      snr = s.snr[t]
      w = torch.clamp(snr, max=s.min_snr_gamma)
      w = {"eps": w / snr, "x0": w, "v": w / (snr + 1.0)}[s.parameterization]
      mse = w * mse
    return torch.mean(mse)


def lr_at(opt, total_steps: int, step: int) -> float:
  """``common.train.method.make_optimizer``'s learning-rate schedule at update ``step``."""
  peak, warm = float(opt.learning_rate), int(opt.warmup_steps)
  if step < warm:
    return peak * step / warm
  if opt.get("schedule", "constant") == "cosine":
    frac = min((step - warm) / max(total_steps - warm, 1), 1.0)
    return peak * 0.5 * (1.0 + math.cos(math.pi * frac))
  return peak


class TorchTrainer:
  """One update of ``common.train.state.default_train_step`` for the DDPM method in PyTorch.

  Draws t uniformly in [0, T), the noise, and (class-conditional) the CFG label dropout; the
  loss's gradient, clipping by global norm (``optimizer.grad_clip_norm``), Adam / AdamW with the
  config's lr schedule, b1, b2, eps and weight decay, then the EMA with ``config.ema_decay``.
  ``compile``: run the loss (noising + network + MSE) through ``torch.compile``. With
  ``config.model.dtype = "bfloat16"`` the loss's forward runs under ``autocast`` (bf16 compute,
  float32 parameters, optimizer and EMA).
  """

  def __init__(self, model, config, *, num_classes: int, compile: bool = False, device="cpu"):
    self.model = model.to(device).train()
    self.config = config
    self.device = device
    self.num_classes = num_classes
    self.conditional = bool(config.model.class_conditional) and num_classes > 0
    self.schedule = Schedule(config.diffusion, device)
    loss = DiffusionLoss(self.model, self.schedule)
    self.loss = torch.compile(loss) if compile else loss
    self.params = [p for p in self.model.parameters()]
    self.ema = [p.detach().clone() for p in self.params]
    o = config.optimizer
    kw = dict(lr=float(o.learning_rate), betas=(o.b1, o.b2), eps=o.eps)
    # The fused kernels are PyTorch's fastest Adam on CPU and GPU (one pass over all tensors).
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    if o.name == "adamw":
      kw["weight_decay"] = float(o.weight_decay)
    try:
      self.opt = cls(self.params, fused=True, **kw)
    except (RuntimeError, TypeError):
      self.opt = cls(self.params, foreach=True, **kw)
    self.step_count = 0

  def step(self, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One update on ``x0`` [B, C, H, W] in [-1, 1]; returns the loss (a 0-d tensor)."""
    b = x0.shape[0]
    d = self.config.diffusion
    t = torch.randint(0, self.schedule.num_timesteps, (b,), device=self.device)
    noise = torch.randn_like(x0)
    y = None
    if self.conditional:
      y = labels
      if d.cond_drop_prob > 0:
        drop = torch.rand(b, device=self.device) < d.cond_drop_prob
        y = torch.where(drop, torch.full_like(y, self.num_classes), y)
    for g in self.opt.param_groups:
      g["lr"] = lr_at(self.config.optimizer, self.config.total_steps, self.step_count)
    self.opt.zero_grad(set_to_none=True)
    with autocast(self.config.model.dtype, self.device):
      loss = self.loss(x0, t, noise, y)
    loss.backward()
    clip = float(self.config.optimizer.grad_clip_norm)
    if clip > 0:
      torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
    self.opt.step()
    with torch.no_grad():
      # ema <- ema + (1 - decay) (params - ema), common.train.state.ema_update.
      torch._foreach_lerp_(self.ema, self.params, 1.0 - float(self.config.ema_decay))
    self.step_count += 1
    return loss


@torch.inference_mode()
def sample(model, config, schedule: Schedule, noise: torch.Tensor, labels=None, num_classes=0):
  """``DDPM.sample``: the configured sampler from ``noise`` (x_T, [B, C, H, W]) to x_0.

  ``model`` is called as ``model(x, t, y)``; with labels and ``guidance_scale != 1`` each step
  makes one call on [cond; uncond] (null label ``num_classes``), as ``steps.predict``.
  """
  d = config.diffusion
  levels = steps.make_levels(schedule.num_timesteps, d.sample_steps)
  co = steps.step_coefficients(schedule, levels, d.ddim_eta)
  guided = labels is not None and d.guidance_scale != 1.0
  x = noise
  b = x.shape[0]
  for i in range(len(levels) - 1):
    tt = torch.full((b,), int(co["k"][i]) - 1, dtype=torch.long, device=x.device)
    if guided:
      out = model(
        torch.cat([x, x]),
        torch.cat([tt, tt]),
        torch.cat([labels, torch.full_like(labels, num_classes)]),
      )
      eps_c, eps_u = _eps(schedule, out[:b], x, tt), _eps(schedule, out[b:], x, tt)
      eps = eps_u + d.guidance_scale * (eps_c - eps_u)
    else:
      eps = _eps(schedule, model(x, tt, labels), x, tt)
    x0 = _take(schedule.sqrt_recip_ac, tt) * x - _take(schedule.sqrt_recipm1_ac, tt) * eps
    if d.clip_denoised:
      x0 = x0.clamp(-1.0, 1.0)
      eps = (x - _take(schedule.sqrt_ac, tt) * x0) / _take(schedule.sqrt_1m_ac, tt)
    last = int(co["k_next"][i]) == 0
    if d.sampler == "ddim":
      x = float(co["sqrt_abar_next"][i]) * x0 + float(co["ddim_eps_coef"][i]) * eps
      std = float(co["ddim_sigma"][i])
    else:
      x = float(co["coef1"][i]) * x0 + float(co["coef2"][i]) * x
      std = math.exp(0.5 * float(co["post_log_var"][i]))
    if std > 0 and not last:
      x = x + std * torch.randn_like(x)
  return x


def _eps(s: Schedule, out, x, t):
  """The network output read as eps (``GaussianDiffusion.model_output_to_x0_eps``)."""
  if s.parameterization == "eps":
    return out
  if s.parameterization == "x0":
    return (x - _take(s.sqrt_ac, t) * out) / _take(s.sqrt_1m_ac, t)
  return _take(s.sqrt_1m_ac, t) * x + _take(s.sqrt_ac, t) * out
