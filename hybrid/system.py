"""The system model: accuracy A(n), latencies, per-user utility and the GQAP objective (spec §3-§5).

A user i either is admitted (``x_i = 1``): the edge runs the first ``T - n_i`` denoising steps for
all ``B = sum_j x_j`` admitted users in one batch, ships the latent, and the device runs the last
``n_i`` steps; or is denied (``x_i = 0``) and runs all ``T`` steps on its device. The cut point
``n`` (``cut_point`` in code and configs; the paper's split point n_i) counts the *local*
(personalized) steps: ``n = 0`` is the cluster model alone, ``n = T`` the
personalized model alone. The objective is ``U = sum_i alpha_i A(n_i) - L_i``.

Profiles. ``Profile.paper()`` is the official code's model: the fitted sigmoid ``a = 0.0413,
b = 71.44`` and the measured 11-GPU ``(k, h)`` table (``computing_power_profile.npy``).
``Profile.from_json`` reads a measured profile (``hybrid.profile`` writes one):

  {"accuracy": {"a": 0.05, "b": 60.0},
   "latency": {"k": 0.004, "h": 0.002, "unit": "s",
               "device_slowdowns": [3.3, 4.1, ...],     # optional
               "devices": [[k, h], ...],                 # optional, instead of slowdowns
               "device_weights": [1.0, ...]}}            # optional

``k, h`` is the linear fit ``tau(B) = k B + h`` of one batched cluster-wide step on one edge
accelerator; the edge of a scenario is G of them (``(k, h) / G``, as the code). Devices are either
explicit ``(k, h)`` rows or slowdown factors applied to ``(k, h)``; by default the paper's device
rows 3..10 relative to its edge GPU (row 0), drawn with weights ``linspace(1, 2)``.

Everything here is NumPy float64: the simulator and the exact solvers must agree to round-off.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import chex
import numpy as np

# computing_power_profile.npy of the official code: per-step latency (k, h) in ms of 11 GPU types,
# tau(B) = k B + h, row 0 the best. The code multiplies by 1e-3 (seconds).
PAPER_GPU_PROFILE_MS = np.array(
  [
    (36.46, 13.77),
    (54.35, 21.38),
    (81.97, -8.38),
    (103.90, 15.59),
    (121.23, -1.08),
    (195.75, -67.01),
    (203.05, 3.78),
    (240.71, 29.26),
    (174.46, 65.11),
    (281.04, 14.82),
    (344.09, -38.26),
  ]
)
PAPER_EDGE_ROW = 0
PAPER_DEVICE_ROWS = tuple(range(3, 11))

TRANSMISSION_FORMULAS = ("code", "physical")


# ------------------------------------------------------------------------------------------------
# Profiles.


def sigmoid(n, a: float, b: float) -> np.ndarray:
  """A(n) = 1 / (1 + exp(-a (n - b))), float64, for any shape of n."""
  return 1.0 / (1.0 + np.exp(-a * (np.asarray(n, np.float64) - b)))


@dataclasses.dataclass(frozen=True)
class AccuracyProfile:
  """The personalized-accuracy index vs cut point, ``A(n) = 1 / (1 + exp(-a (n - b)))``.

  ``alpha_lo_slope`` / ``alpha_hi_slope`` bound the preference draw (spec §5): the code's 0.01 is
  about ``a / 4`` (A's largest slope: below it n* = n_min) and 0.0002 about
  ``a A(T) (1 - A(T))`` (A's slope at T: above it n* = T). A measured profile derives them.
  """

  a: float = 0.0413
  b: float = 71.44
  alpha_lo_slope: float = 0.01
  alpha_hi_slope: float = 0.0002
  source: str = "paper"

  def __post_init__(self):
    if not (math.isfinite(self.a) and self.a > 0):
      raise ValueError(f"AccuracyProfile: slope a must be finite and > 0, got {self.a}")
    if not math.isfinite(self.b):
      raise ValueError(f"AccuracyProfile: midpoint b must be finite, got {self.b}")
    if not (self.alpha_lo_slope > 0 and self.alpha_hi_slope > 0):
      raise ValueError("AccuracyProfile: alpha_lo_slope and alpha_hi_slope must be > 0")

  def __call__(self, n) -> np.ndarray:
    """A(n) for an array of cut points n (any shape), float64."""
    return sigmoid(n, self.a, self.b)

  def slope(self, n) -> np.ndarray:
    """dA/dn = a A (1 - A), same shape as n."""
    acc = self(n)
    return self.a * acc * (1.0 - acc)

  @classmethod
  def fitted(cls, a: float, b: float, num_steps: int, source: str = "measured") -> AccuracyProfile:
    """A measured sigmoid with the preference bounds derived as the code's constants are."""
    probe = cls(a=a, b=b)
    return cls(
      a=a,
      b=b,
      alpha_lo_slope=a / 4.0,
      alpha_hi_slope=float(probe.slope(num_steps)),
      source=source,
    )


@dataclasses.dataclass(frozen=True)
class LatencyProfile:
  """Per-step latencies in seconds: one edge accelerator's linear fit and the device types.

  Attributes:
    edge_k, edge_h: ``tau(B) = edge_k B + edge_h`` of one edge accelerator (seconds).
    device_k, device_h: [M] per-step ``(k, h)`` of each device type; a device runs batch 1, so
      its per-step latency is ``k + h``.
    device_weights: [M] unnormalized draw probabilities of the device types.
  """

  edge_k: float
  edge_h: float
  device_k: tuple[float, ...]
  device_h: tuple[float, ...]
  device_weights: tuple[float, ...]
  source: str = "paper"

  def __post_init__(self):
    m = len(self.device_k)
    if m == 0 or len(self.device_h) != m or len(self.device_weights) != m:
      raise ValueError(
        "LatencyProfile: device_k, device_h and device_weights must be non-empty and of one length"
      )
    if self.edge_k * 1 + self.edge_h <= 0:
      raise ValueError("LatencyProfile: the edge's batch-1 step latency k + h must be > 0")
    if min(k + h for k, h in zip(self.device_k, self.device_h, strict=True)) <= 0:
      raise ValueError("LatencyProfile: every device type's step latency k + h must be > 0")
    if min(self.device_weights) < 0 or sum(self.device_weights) <= 0:
      raise ValueError("LatencyProfile: device_weights must be >= 0 and not all 0")

  @property
  def device_tau(self) -> np.ndarray:
    """[M] batch-1 per-step latency of each device type (seconds)."""
    return np.asarray(self.device_k) + np.asarray(self.device_h)

  @property
  def device_probs(self) -> np.ndarray:
    w = np.asarray(self.device_weights, dtype=np.float64)
    return w / w.sum()

  def edge(self, num_gpus: float) -> tuple[float, float]:
    """(k_e, h_e) of an edge of ``num_gpus`` accelerators: the code's ``(k_0, h_0) / G``."""
    if not (num_gpus > 0 and math.isfinite(num_gpus)):
      raise ValueError(f"edge size G must be a finite number > 0, got {num_gpus}")
    return self.edge_k / num_gpus, self.edge_h / num_gpus


@dataclasses.dataclass(frozen=True)
class Profile:
  accuracy: AccuracyProfile
  latency: LatencyProfile

  @classmethod
  def paper(cls) -> Profile:
    """The official code's sigmoid and GPU table (spec §3, §4)."""
    table = PAPER_GPU_PROFILE_MS * 1e-3
    rows = list(PAPER_DEVICE_ROWS)
    latency = LatencyProfile(
      edge_k=float(table[PAPER_EDGE_ROW, 0]),
      edge_h=float(table[PAPER_EDGE_ROW, 1]),
      device_k=tuple(float(v) for v in table[rows, 0]),
      device_h=tuple(float(v) for v in table[rows, 1]),
      device_weights=tuple(float(v) for v in np.linspace(1, 2, len(rows))),
    )
    return cls(AccuracyProfile(), latency)

  @classmethod
  def from_dict(cls, d: dict[str, Any], num_steps: int, source: str = "measured") -> Profile:
    """A profile from the JSON layout of the module docstring; missing parts are the paper's."""
    paper = cls.paper()
    unknown = set(d) - {"accuracy", "latency"}
    if unknown:
      raise ValueError(f"profile: unknown top-level keys {sorted(unknown)}")
    accuracy = paper.accuracy
    if "accuracy" in d:
      acc = d["accuracy"]
      if "a" not in acc or "b" not in acc:
        raise ValueError("profile: accuracy needs the fitted sigmoid's 'a' and 'b'")
      accuracy = AccuracyProfile.fitted(float(acc["a"]), float(acc["b"]), num_steps, source)
      if "alpha_lo_slope" in acc or "alpha_hi_slope" in acc:
        accuracy = dataclasses.replace(
          accuracy,
          alpha_lo_slope=float(acc.get("alpha_lo_slope", accuracy.alpha_lo_slope)),
          alpha_hi_slope=float(acc.get("alpha_hi_slope", accuracy.alpha_hi_slope)),
        )
    latency = paper.latency
    if "latency" in d:
      lat = d["latency"]
      unit = lat.get("unit", "s")
      if unit not in ("s", "ms"):
        raise ValueError(f"profile: latency unit must be 's' or 'ms', got {unit!r}")
      scale = 1e-3 if unit == "ms" else 1.0
      if "k" not in lat or "h" not in lat:
        raise ValueError("profile: latency needs the linear fit's 'k' and 'h'")
      k, h = float(lat["k"]) * scale, float(lat["h"]) * scale
      if "devices" in lat and "device_slowdowns" in lat:
        raise ValueError("profile: give latency.devices or latency.device_slowdowns, not both")
      if "devices" in lat:
        rows = np.asarray(lat["devices"], dtype=np.float64).reshape(-1, 2) * scale
        dk, dh = rows[:, 0], rows[:, 1]
      else:
        if "device_slowdowns" in lat:
          slow = np.asarray(lat["device_slowdowns"], dtype=np.float64)
        else:
          # The paper's device heterogeneity relative to its edge GPU, carried over to ours.
          slow = paper.latency.device_tau / (paper.latency.edge_k + paper.latency.edge_h)
        dk, dh = slow * k, slow * h
      weights = lat.get("device_weights")
      if weights is None:
        weights = np.linspace(1, 2, len(dk)) if len(dk) > 1 else np.ones(1)
      latency = LatencyProfile(
        edge_k=k,
        edge_h=h,
        device_k=tuple(float(v) for v in dk),
        device_h=tuple(float(v) for v in dh),
        device_weights=tuple(float(v) for v in weights),
        source=source,
      )
    return cls(accuracy, latency)

  @classmethod
  def from_json(cls, path: str, num_steps: int) -> Profile:
    with open(path) as f:
      return cls.from_dict(json.load(f), num_steps, source=path)


def load_profile(spec: str, num_steps: int) -> Profile:
  """``"paper"`` or the path of a measured profile JSON."""
  if spec == "paper":
    return Profile.paper()
  return Profile.from_json(spec, num_steps)


# ------------------------------------------------------------------------------------------------
# System constants.


@dataclasses.dataclass(frozen=True)
class SystemParams:
  """The simulator's constants (spec §4, §5); the defaults are the official code's.

  ``transmission``: ``"code"`` is the released code's ``B (S_p + S_z) / W * eta`` (0.44 B s),
  ``"physical"`` the physical ``B (S_p + S_z) / (W eta)`` (0.0044 B s).
  """

  num_steps: int = 200  # T
  min_cut_point: float = 80.0  # n_min: A is concave on [n_min, T] because b < n_min
  capacity: int = 18  # C: the most users one edge batch takes
  max_users: int = 20  # rows of the state; also the batch size of the alpha lower bound
  window: float = 1.0  # K (s): requests arrive in [0, K), the batch launches at K
  bandwidth_hz: float = 100e6  # W, shared by the B admitted users
  spectral_efficiency: float = 10.0  # eta (b/s/Hz)
  prompt_bits: float = 216.0  # S_p, up
  latent_bits: float = 4.4e6  # S_z, down
  transmission: str = "code"
  alpha_upper_scale: float = 0.05  # the code's factor on the alpha upper bound

  def __post_init__(self):
    if self.num_steps < 1:
      raise ValueError(f"SystemParams: num_steps T must be >= 1, got {self.num_steps}")
    if not (0 <= self.min_cut_point <= self.num_steps):
      raise ValueError(
        f"SystemParams: min_cut_point must lie in [0, T={self.num_steps}], got {self.min_cut_point}"
      )
    if self.capacity < 1:
      raise ValueError(f"SystemParams: capacity C must be >= 1, got {self.capacity}")
    if self.max_users < 1:
      raise ValueError(f"SystemParams: max_users must be >= 1, got {self.max_users}")
    if self.transmission not in TRANSMISSION_FORMULAS:
      raise ValueError(
        f"SystemParams: transmission must be one of {TRANSMISSION_FORMULAS}, "
        f"got {self.transmission!r}"
      )
    if self.window <= 0 or self.bandwidth_hz <= 0 or self.spectral_efficiency <= 0:
      raise ValueError("SystemParams: window, bandwidth_hz and spectral_efficiency must be > 0")

  @classmethod
  def from_config(cls, c) -> SystemParams:
    """From a ``scheduler.system`` ConfigDict (field for field)."""
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(c.keys()) - names
    if extra:
      raise ValueError(f"scheduler.system: unknown fields {sorted(extra)}")
    return cls(**{k: c[k] for k in c.keys()})

  def transmission_latency(self, batch) -> np.ndarray:
    """L^tx(B) in seconds for an array of batch sizes B (W shared by the B users)."""
    batch = np.asarray(batch, dtype=np.float64)
    bits = self.prompt_bits + self.latent_bits
    if self.transmission == "code":
      return batch * bits / self.bandwidth_hz * self.spectral_efficiency
    return batch * bits / (self.bandwidth_hz * self.spectral_efficiency)


# ------------------------------------------------------------------------------------------------
# Scenarios.


@dataclasses.dataclass(frozen=True)
class Scenario:
  """One scheduling window: N requesting users and an edge of G accelerators.

  Users are in the order the agent visits them (device type ascending: strongest first).

  Attributes:
    alpha: [N] accuracy-vs-latency preference alpha_i >= 0.
    tau: [N] device per-step latency (batch 1), seconds.
    wait: [N] residual wait R_i = K - r_i, seconds.
    device_type: [N] int, index into the profile's device types.
    num_gpus: G.
    edge_k, edge_h: the edge's per-step fit, ``tau_e(B) = edge_k B + edge_h`` (already / G).
  """

  alpha: np.ndarray
  tau: np.ndarray
  wait: np.ndarray
  device_type: np.ndarray
  num_gpus: float
  edge_k: float
  edge_h: float

  def __post_init__(self):
    n = np.shape(self.alpha)[0] if np.ndim(self.alpha) == 1 else -1
    if n < 1:
      raise ValueError(f"Scenario: need at least one user (alpha of shape [N>=1]), got N={n}")
    chex.assert_shape([self.alpha, self.tau, self.wait, self.device_type], (n,))
    if np.any(~np.isfinite(self.alpha)) or np.any(np.asarray(self.alpha) < 0):
      raise ValueError("Scenario: alpha must be finite and >= 0")
    if np.any(np.asarray(self.tau) <= 0):
      raise ValueError("Scenario: device step latencies tau must be > 0")
    if not (self.num_gpus > 0):
      raise ValueError(f"Scenario: edge size G must be > 0, got {self.num_gpus}")

  @property
  def num_users(self) -> int:
    return int(np.shape(self.alpha)[0])

  def edge_step(self, batch) -> np.ndarray:
    """tau_e(B) for an array of batch sizes."""
    return self.edge_k * np.asarray(batch, dtype=np.float64) + self.edge_h

  def delta(self, batch) -> np.ndarray:
    """Delta_i(B) = tau_i - tau_e(B): [..., N] for batch of shape [..., 1] (or a scalar)."""
    return self.tau - self.edge_step(batch)


def sample_scenario(
  rng: np.random.Generator, profile: Profile, sysp: SystemParams, num_users: int, num_gpus: float
) -> Scenario:
  """Draws a scenario as the official code does (spec §4, §5).

  Device types from the profile with its weights, sorted (strongest first: the visiting order);
  alpha_i ~ U[l_i, u_i] with ``l_i = max(Delta_i(max_users) / lo_slope, 0)`` and
  ``u_i = scale * max(Delta_i(1) / hi_slope, 0)``; arrivals r_i ~ U(0, K) sorted independently.
  """
  if int(num_users) != num_users or num_users < 1:
    raise ValueError(f"sample_scenario: number of users N must be an integer >= 1, got {num_users}")
  if num_users > sysp.max_users:
    raise ValueError(f"sample_scenario: N={num_users} exceeds max_users={sysp.max_users}")
  num_users = int(num_users)
  edge_k, edge_h = profile.latency.edge(num_gpus)
  lat = profile.latency
  types = np.sort(rng.choice(len(lat.device_k), size=num_users, p=lat.device_probs))
  tau = lat.device_tau[types]
  acc = profile.accuracy
  delta_lo = tau - (edge_k * sysp.max_users + edge_h)
  delta_hi = tau - (edge_k * 1 + edge_h)
  lo = np.maximum(delta_lo / acc.alpha_lo_slope, 0.0)
  hi = sysp.alpha_upper_scale * np.maximum(delta_hi / acc.alpha_hi_slope, 0.0)
  alpha = rng.uniform(lo, hi)
  arrival = np.sort(rng.uniform(0.0, sysp.window, size=num_users))
  return Scenario(
    alpha=alpha,
    tau=tau,
    wait=sysp.window - arrival,
    device_type=types,
    num_gpus=float(num_gpus),
    edge_k=edge_k,
    edge_h=edge_h,
  )


# ------------------------------------------------------------------------------------------------
# Latency, utility, objective.


def _check_decision(scn: Scenario, sysp: SystemParams, admit, cut_point):
  admit = np.asarray(admit)
  cut_point = np.asarray(cut_point, dtype=np.float64)
  if admit.shape[-1:] != (scn.num_users,):
    raise ValueError(f"admit must have shape [..., N={scn.num_users}], got {admit.shape}")
  if admit.dtype != bool:
    if not np.all((admit == 0) | (admit == 1)):
      raise ValueError("admit must be boolean or 0/1")
    admit = admit.astype(bool)
  cut_point = np.broadcast_to(cut_point, admit.shape)
  used = cut_point[admit]
  if used.size and (np.any(~np.isfinite(used)) or used.min() < 0 or used.max() > sysp.num_steps):
    raise ValueError(
      f"cut points of admitted users must lie in [0, T={sysp.num_steps}], got "
      f"[{used.min()}, {used.max()}]"
    )
  batch = admit.sum(-1, keepdims=True)
  if np.any(batch > sysp.capacity):
    raise ValueError(f"an admission exceeds the edge capacity C={sysp.capacity}: B={batch.max()}")
  return admit, cut_point, batch


def admitted_latency(scn: Scenario, sysp: SystemParams, batch, cut_point) -> np.ndarray:
  """[..., N] latency of users admitted into a batch of B users with cut points n (spec §4).

  ``(T - n) tau_e(B) + L^tx(B) + n tau_i + R_i``: every admitted user pays the full batch's step
  for all of its edge steps (no shrinkage as users with larger n leave the batch earlier).

  Args:
    batch: B, broadcastable against [..., N] (e.g. [..., 1]).
    cut_point: [..., N] cut points (local steps).
  """
  t = sysp.num_steps
  cut_point = np.asarray(cut_point, dtype=np.float64)
  edge = (t - cut_point) * scn.edge_step(batch) + sysp.transmission_latency(batch)
  return edge + cut_point * scn.tau + scn.wait


def local_latency(scn: Scenario, sysp: SystemParams) -> np.ndarray:
  """[N] latency of a denied user: all T steps on its device, ``T tau_i + R_i``."""
  return sysp.num_steps * scn.tau + scn.wait


def user_latency(scn: Scenario, sysp: SystemParams, admit, cut_point) -> np.ndarray:
  """Per-user latency L_i (spec §4), batched over leading axes.

  Args:
    admit: [..., N] bool (or 0/1): x_i.
    cut_point: [..., N] cut points n_i in [0, T] (local steps); ignored for denied users.

  Returns:
    [..., N] float64 seconds: admitted users as ``admitted_latency`` with ``B = sum_j x_j`` per
    leading index, denied users ``T tau_i + R_i``.
  """
  admit, cut_point, batch = _check_decision(scn, sysp, admit, cut_point)
  return np.where(admit, admitted_latency(scn, sysp, batch, cut_point), local_latency(scn, sysp))


def user_utility(
  scn: Scenario, sysp: SystemParams, profile: Profile, admit, cut_point
) -> np.ndarray:
  """[..., N] per-user utility ``alpha_i A(n_i) - L_i`` (denied users: ``n_i = T``)."""
  admit, cut_point, _ = _check_decision(scn, sysp, admit, cut_point)
  n = np.where(admit, cut_point, sysp.num_steps)
  return scn.alpha * profile.accuracy(n) - user_latency(scn, sysp, admit, cut_point)


def objective(scn: Scenario, sysp: SystemParams, profile: Profile, admit, cut_point) -> np.ndarray:
  """The GQAP objective U = sum_i (alpha_i A(n_i) - L_i): [...] for decisions [..., N]."""
  return user_utility(scn, sysp, profile, admit, cut_point).sum(-1)
