"""``pareto.png`` of the main job's report (``common.compare``): each generative run's headline figure
against its sampling FLOPs per sample, with every label placed where it overlaps no other label and
no point.
"""

from __future__ import annotations

from typing import Any

from common import fileio, headline

_LABEL_GAP = 5.0  # points between the point and its label
_LABEL_TRIES = 12  # heights up and down


def _label_places(fontsize: float) -> list[tuple[str, tuple[float, float]]]:
  """``(horizontal alignment, offset in points)`` of each place a label may take, in turn."""
  line = fontsize * 1.4
  places = []
  for dy in [0.0, *(s * k * line for k in range(1, _LABEL_TRIES + 1) for s in (1, -1))]:
    places += [("left", (_LABEL_GAP, _LABEL_GAP + dy)), ("right", (-_LABEL_GAP, _LABEL_GAP + dy))]
  return places


def _label_box(annotation, renderer, place: tuple[str, tuple[float, float]]):
  """Moves ``annotation`` to ``place``; returns its box in display pixels, 1 px padded."""
  annotation.set_horizontalalignment(place[0])
  annotation.xyann = place[1]
  return annotation.get_window_extent(renderer).padded(1.0)


def _marker_box(ax, x: float, y: float, radius_px: float):
  """The display box a point's marker covers (its label may not cover it)."""
  from matplotlib.transforms import Bbox

  px, py = ax.transData.transform((x, y))
  return Bbox.from_extents(px - radius_px, py - radius_px, px + radius_px, py + radius_px)


def _place_labels(fig, ax, points: list[tuple[float, float, str, Any]], fontsize: float = 8):
  """Annotates each ``(x, y, text, color)`` near its point so that no two labels' boxes overlap
  and no label covers a point.

  Greedy, in the order given: each label takes the first place (``_label_places``) whose box, as
  the renderer measures the text, overlaps no label placed before it nor any point's marker and
  lies inside the axes; else the first free one outside the axes; else the first place. A label
  moved off its point's line gets a thin leader line to it, and every label its point's colour.
  Call it once the layout is final: the boxes are in display coordinates. Returns the
  annotations.
  """
  renderer = fig.canvas.get_renderer()
  inside = ax.get_window_extent(renderer)
  radius = fig.dpi / 72 * 4  # the markers' (s=40: ~6.3 points across), with a margin
  taken = [_marker_box(ax, x, y, radius) for x, y, _, _ in points]
  places = _label_places(fontsize)
  annotations = []
  for x, y, text, color in points:
    probe = ax.annotate(
      text, (x, y), xytext=places[0][1], textcoords="offset points", fontsize=fontsize, va="bottom"
    )
    chosen = None
    for place in places:
      box = _label_box(probe, renderer, place)
      if any(box.overlaps(b) for b in taken):
        continue
      if inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1):
        chosen = place
        break
      chosen = chosen or place  # free but outside the axes: kept unless a better one comes
    chosen = chosen or places[0]
    taken.append(_label_box(probe, renderer, chosen))
    probe.remove()
    ha, offset = chosen
    leader = None
    if offset[1] != places[0][1][1]:  # off its point's line: a thin line says whose label it is
      corner = (0.0, 0.0) if ha == "left" else (1.0, 0.0)
      leader = {"arrowstyle": "-", "color": color, "lw": 0.6, "shrinkB": 4, "relpos": corner}
    a = ax.annotate(
      text, (x, y), xytext=offset, textcoords="offset points", fontsize=fontsize, va="bottom",
      ha=ha, color=color, arrowprops=leader,
    )  # fmt: skip
    annotations.append(a)
  return annotations


def pareto_figure(runs: list[dict], meta: dict | None = None):
  """The figure of ``pareto.png``: each generative run's headline figure
  (``common.headline.headline_figure``) against its sampling FLOPs per sample, one labelled point
  per run (labels never overlap).

  Args:
    runs: generative records from ``common.compare.load_runs``.
    meta: the plan's ``runs`` (labels, ``primary``); None: names and each record's ``fid``.

  Returns:
    (figure, points): the matplotlib figure and ``[(run, x, y, label)]``, the points it plots.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  meta = meta or {}
  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
  points = []
  for r in runs:
    figure = headline.headline_figure(r, meta)
    x, y = r.get("flops_per_sample"), figure["value"]
    if x is None or y is None:
      continue
    label = meta.get(r["run"], {}).get("label") or r["run"]
    if figure["name"] != "fid":
      label += f" ({figure['name']})"
    dot = ax.scatter([x], [y], s=40)
    points.append((r["run"], x, y, label, dot.get_facecolor()[0]))
  ax.set_xscale("log")
  ax.set_xlabel("FLOPs per sample (whole sampling chain)")
  net = runs[0].get("feature_net", "?") if runs else "?"
  ax.set_ylabel(f"headline FID ({net} features)")
  ax.set_title("Quality against sampling compute (lower left is better)")
  ax.grid(True, which="both", alpha=0.3)
  ax.margins(x=0.1, y=0.12)  # room for the labels of the outermost points
  fig.tight_layout()
  # After the layout: the labels are placed by their boxes on the final canvas.
  _place_labels(fig, ax, [p[1:] for p in points])
  return fig, [p[:4] for p in points]


def write(runs: list[dict], path: str, meta: dict | None = None) -> None:
  """Writes :func:`pareto_figure` to ``path`` (PNG)."""

  fig, _ = pareto_figure(runs, meta)
  fileio.write_figure(fig, path)
