"""The figures of ``hybrid.profile``: the PAI sweep with its sigmoid fit (``accuracy.png``), the
batched-step latency with its linear fit (``latency.png``) and the images per cut point
(``cut_points.png``).

Each takes the measurement dicts ``hybrid.profile`` writes as JSON (``cut_points.png`` also needs
the unsaved ``_images``), so ``hybrid.profile --rewrite_only`` redraws the first two from disk.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from common import fileio
from hybrid import system
from hybrid.system import sigmoid


def save_accuracy_png(path: str, acc: dict[str, Any]) -> None:
  """PAI_raw vs cut point with its fit and the paper's A(n); Sim and Diff beside it."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = np.asarray(acc["cut_points"])
  big_t = acc["num_timesteps"]
  fit = acc["fit"]
  grid = np.linspace(0, big_t, 201)
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
  ax1.plot(n, acc["pai"], "o", color="C0", label="PAI_raw (measured)")
  ax1.plot(
    grid,
    sigmoid(grid, fit["a"], fit["b"]),
    "-",
    color="C0",
    label=f"fit a={fit['a']:.4f}, b={fit['b']:.1f} (R2 {fit['r2']:.3f})",
  )
  paper = system.AccuracyProfile()
  ax1.plot(
    grid, paper(grid * 200 / big_t), "--", color="0.5", label="paper A(n), a=0.0413, b=71.44"
  )
  ax1.set_xlabel("cut point n (steps on the device)")
  ax1.set_ylabel("personalized accuracy index")
  ax1.set_ylim(-0.03, 1.05)
  ax1.legend(fontsize=7)
  ax2.plot(n, acc["sim"], "o-", label="Sim: P(user's class)")
  ax2.plot(n, acc["diff"], "s-", label="Diff: inter-user distance / real")
  for u, row in enumerate(np.asarray(acc["sim_per_user"]).T):
    ax2.plot(n, row, ":", lw=0.8, color=f"C{u + 2}", label=f"Sim user {u}")
  ax2.axhline(acc["d0"], color="0.6", lw=0.8, ls="--")
  ax2.set_xlabel("cut point n")
  ax2.legend(fontsize=7)
  fig.tight_layout()
  fileio.write_figure(fig, path, dpi=120)


def save_latency_png(path: str, lat: dict[str, Any]) -> None:
  """One batched step's median latency (with its IQR) vs batch size B, and the fit k B + h."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  b = np.asarray(lat["batch_sizes"], np.float64)
  ms = np.asarray(lat["seconds_median"]) * 1e3
  iqr = np.asarray(lat["seconds_iqr"]) * 1e3
  fit = lat["fit"]
  fig, ax = plt.subplots(figsize=(5, 3.6))
  ax.errorbar(b, ms, yerr=[ms - iqr[:, 0], iqr[:, 1] - ms], fmt="o", ms=4, label="median (IQR)")
  ax.plot(
    b,
    (fit["k"] * b + fit["h"]) * 1e3,
    "-",
    label=f"k={fit['k'] * 1e3:.3f} ms, h={fit['h'] * 1e3:.3f} ms, R2={fit['r2']:.3f}",
  )
  ax.set_xlabel("batch size B")
  ax.set_ylabel("one cluster-wide step (ms)")
  ax.set_title(lat["device"], fontsize=8)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fileio.write_figure(fig, path, dpi=120)


def save_cut_points_png(path: str, acc: dict[str, Any], seeds: int = 2) -> None:
  """Rows: (seed, user); columns: cut points. Every row of a seed starts from the same noise."""
  from common import images as images_lib

  imgs = acc["_images"]  # [S, U, seeds, H, W, C]
  rows, names = [], []
  for s in range(min(seeds, imgs.shape[2])):
    for u, user in enumerate(acc["users"]):
      rows.append(imgs[:, u, s])
      names.append(f"seed {s} user {u} ({user['class']})")
  images_lib.save_grid(path, np.concatenate(rows), ncols=imgs.shape[0], row_labels=names)
