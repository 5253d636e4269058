"""The convex sub-problem: each admitted user's cut point in closed form (spec §6).

With the admissions fixed (hence B), users decouple. Dropping terms constant in n,

  f_i(n) = alpha_i A(n) - (T - n) tau_e(B) - n tau_i = alpha_i A(n) - n Delta_i(B) + const,
  f_i'(n) = alpha_i a A(n) (1 - A(n)) - Delta_i(B),   Delta_i(B) = tau_i - tau_e(B).

* Delta_i <= 0: local steps are no dearer than edge steps, f' > 0, n* = T.
* c = Delta_i / (alpha_i a) >= 1/4: A (1 - A) <= 1/4 so f' <= 0, n* = n_min.
* else f' = 0 at A = p or A = 1 - p, p = (1 + sqrt(1 - 4c)) / 2; the larger root
  n+ = b + ln(p / (1 - p)) / a is the local maximum (f' goes from + to - there), so
  n* = clip(n+, n_min, T).

The paper's b = 71.44 < n_min = 80 makes A concave on [n_min, T] and n* exactly that clip (the
code brackets the root of f' instead; the two agree). A measured sigmoid may have b > n_min; then
f is not concave on the interval, its other stationary point n- < n+ is a local minimum, and the
maximum is n_min or clip(n+): we compare the two, which changes nothing in the concave case.
"""

from __future__ import annotations

import numpy as np

from hybrid import system


def cut_point_gain(n, alpha, delta, accuracy: system.AccuracyProfile) -> np.ndarray:
  """The n-dependent part of a user's utility, ``alpha A(n) - n Delta`` (broadcasting)."""
  return np.asarray(alpha) * accuracy(n) - np.asarray(n, dtype=np.float64) * np.asarray(delta)


def optimal_cut_point(
  alpha, delta, accuracy: system.AccuracyProfile, min_cut_point: float, num_steps: float
) -> np.ndarray:
  """argmax over n in [min_cut_point, num_steps] of ``alpha A(n) - n Delta``, in closed form.

  Args:
    alpha: [...] preferences alpha_i >= 0.
    delta: [...] Delta_i(B) = tau_i - tau_e(B) (seconds), broadcastable with alpha.
    accuracy: the sigmoid A.
    min_cut_point, num_steps: the interval [n_min, T].

  Returns:
    [...] float64 cut points (local steps) in [min_cut_point, num_steps].
  """
  if not (0 <= min_cut_point <= num_steps):
    raise ValueError(
      f"optimal_cut_point: need 0 <= n_min <= T, got n_min={min_cut_point}, T={num_steps}"
    )
  alpha, delta = np.broadcast_arrays(
    np.asarray(alpha, dtype=np.float64), np.asarray(delta, dtype=np.float64)
  )
  if np.any(alpha < 0) or np.any(~np.isfinite(alpha)) or np.any(~np.isfinite(delta)):
    raise ValueError("optimal_cut_point: alpha must be finite and >= 0, delta finite")
  a, b = accuracy.a, accuracy.b
  positive = delta > 0
  c = np.divide(delta, alpha * a, out=np.full_like(delta, np.inf), where=alpha > 0)
  interior = positive & (c < 0.25)
  c_safe = np.where(interior, c, 0.125)
  s = np.sqrt(1.0 - 4.0 * c_safe)
  # ln(p / (1 - p)) with 1 - p = 2c / (1 + s): no cancellation as c -> 0 (Delta small, n+ large).
  n_plus = b + (2.0 * np.log1p(s) - np.log(4.0 * c_safe)) / a
  cand = np.clip(n_plus, min_cut_point, num_steps)
  # Only a sigmoid with b > n_min can make the interval's lower end the better one.
  low_wins = cut_point_gain(min_cut_point, alpha, delta, accuracy) > cut_point_gain(
    cand, alpha, delta, accuracy
  )
  interior_cut_point = np.where(low_wins, min_cut_point, cand)
  return np.where(
    ~positive, float(num_steps), np.where(interior, interior_cut_point, float(min_cut_point))
  )


def cut_points_for_admission(
  scn: system.Scenario, sysp: system.SystemParams, profile: system.Profile, admit
) -> np.ndarray:
  """Every user's optimal cut point for admissions ``admit``; denied users get T.

  Args:
    admit: [..., N] bool.

  Returns:
    [..., N] float64 cut points.
  """
  admit = np.asarray(admit, dtype=bool)
  if admit.shape[-1:] != (scn.num_users,):
    raise ValueError(f"admit must have shape [..., N={scn.num_users}], got {admit.shape}")
  batch = admit.sum(-1, keepdims=True)
  n = optimal_cut_point(
    scn.alpha, scn.delta(batch), profile.accuracy, sysp.min_cut_point, sysp.num_steps
  )
  return np.where(admit, n, float(sysp.num_steps))


def evaluate_admission(
  scn: system.Scenario, sysp: system.SystemParams, profile: system.Profile, admit
) -> tuple[np.ndarray, np.ndarray]:
  """(U [...], cut_points [..., N]) of admissions [..., N] with their closed-form cut points."""
  cut_points = cut_points_for_admission(scn, sysp, profile, admit)
  return system.objective(scn, sysp, profile, admit, cut_points), cut_points
