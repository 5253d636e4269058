"""common.compare's report: the figure each run is judged by (table and plot alike), labels of the
Pareto plot that never overlap, the training compute of each generative run, and what one seed can
say; common.train.compute, which records that compute in the shared loop."""

import csv
import itertools
import json
import os

import jax
import pytest

from common import compare, fileio, headline, pareto, replicates
from common.train import compute, loop
from tests.common.test_train import tiny_config

FEATURES = {"feature_net": "digits", "feature_net_sha256": "0" * 64, "reference_statistics": "r"}


def _evaluated(root, name, **metrics):
  """A workdir holding only an ``eval/metrics.json`` (what compare reads of a generative run)."""
  wd = os.path.join(str(root), name)
  fileio.write_json(os.path.join(wd, "eval", "metrics.json"), {**FEATURES, **metrics})
  return wd


def _collab_and_ddpm(root):
  """collab's pooled FID far above its clients' mean (as the main job's: 369 vs 61.67)."""
  groups = [{"group": "client0", "num_samples": 100, "fid": 60.0},
            {"group": "client1", "num_samples": 100, "fid": 63.34}]  # fmt: skip
  collab = _evaluated(root, "collab_cut", fid=369.0, flops_per_sample=7.4e8, groups=groups)
  ddpm = _evaluated(root, "ddpm", fid=60.49, flops_per_sample=1.5e9, groups=[])
  meta = {
    "ddpm": {"section": "ddpm", "label": "DDPM U-Net"},
    "collab_cut": {"section": "collab", "label": "CollaFuse", "primary": "fid_groups_mean"},
  }
  return compare.load_runs([ddpm, collab]), meta


def test_the_plot_shows_the_headline_figure_of_every_run(tmp_path):
  runs, meta = _collab_and_ddpm(tmp_path)
  by_name = {r["run"]: r for r in runs}
  assert headline.headline_figure(by_name["collab_cut"], meta) == {
    "name": "fid_groups_mean", "value": pytest.approx(61.67), "higher_is_better": False,
  }  # fmt: skip
  fig, points = pareto.pareto_figure(runs, meta)
  plotted = {run: y for run, _, y, _ in points}
  assert plotted == {"ddpm": 60.49, "collab_cut": pytest.approx(61.67)}
  # The annotated point is the plotted one, and its label names the figure.
  texts = {a.get_text(): a.xy[1] for a in fig.axes[0].texts}
  assert texts["CollaFuse (fid_groups_mean)"] == pytest.approx(61.67)

  paths = compare.write_report(runs, str(tmp_path / "report"), {"runs": meta})
  md = open(paths["md"]).read()
  assert "| collab | collab_cut | CollaFuse | fid_groups_mean (lower better) | 61.67 |" in md
  assert "`fid_groups_mean` for collab_cut" in md and "`fid` for ddpm" in md
  assert replicates.ONE_SEED_NOTE in md


def _boxes(fig):
  """Each label's text box in display pixels, as the renderer draws it (its leader line left out)."""
  from matplotlib.text import Text

  fig.canvas.draw()  # where an annotation's text lies is settled when it is drawn
  renderer = fig.canvas.get_renderer()
  return [Text.get_window_extent(a, renderer) for a in fig.axes[0].texts]


def test_labels_of_near_identical_points_do_not_overlap(tmp_path):
  # adaptive's two arms in the main job: FIDs 542 and 545.8 at 1.68e9 and 1.88e9 FLOPs printed
  # over each other; here three points closer still, with a fourth far away.
  runs = [
    {"run": "tdc", "kind": "generative", "fid": 542.0, "flops_per_sample": 1.68e9},
    {"run": "single", "kind": "generative", "fid": 542.5, "flops_per_sample": 1.70e9},
    {"run": "third", "kind": "generative", "fid": 541.5, "flops_per_sample": 1.69e9},
    {"run": "ddpm", "kind": "generative", "fid": 60.0, "flops_per_sample": 1.5e9},
  ]
  meta = {"tdc": {"label": "TDC groups (stage 2)"}, "single": {"label": "single model (stage 1)"}}
  import matplotlib.pyplot as plt

  # Without placement the first two labels do overlap: the test measures a real collision.
  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
  ax.set_xscale("log")
  for r in runs:
    ax.scatter([r["flops_per_sample"]], [r["fid"]])
    ax.annotate(meta.get(r["run"], {}).get("label", r["run"]), (r["flops_per_sample"], r["fid"]),
                textcoords="offset points", xytext=(5, 5), fontsize=8)  # fmt: skip
  fig.tight_layout()
  first, second = _boxes(fig)[:2]
  assert first.overlaps(second)
  plt.close(fig)

  fig, points = pareto.pareto_figure(runs, meta)
  boxes = _boxes(fig)
  assert len(boxes) == len(points) == 4
  for a, b in itertools.combinations(boxes, 2):
    assert not a.overlaps(b), (a, b)
  inside = fig.axes[0].get_window_extent(fig.canvas.get_renderer())
  assert all(inside.contains(b.x0, b.y0) and inside.contains(b.x1, b.y1) for b in boxes)
  plt.close(fig)


def test_record_keeps_the_steps_a_resume_keeps(tmp_path):
  wd = str(tmp_path)
  seg = {"images_per_step": 8, "step_flops": 10.0}
  compute.record(wd, 0, 6, seg)
  # A resume from the checkpoint at step 3 with twice the batch: steps 3-6 of the first
  # invocation are gone, the new ones count at their own cost.
  data = json.load(open(compute.record(wd, 3, 5, {"images_per_step": 16, "step_flops": 30.0})))
  assert [(s["first_step"], s["last_step"]) for s in data["segments"]] == [(0, 3), (3, 5)]
  assert data["steps"] == 5 and data["images_seen"] == 3 * 8 + 2 * 16
  assert data["flops"] == 3 * 10.0 + 2 * 30.0
  assert data["flops_per_image"] == pytest.approx(data["flops"] / data["images_seen"])
  # A segment without FLOPs leaves the total unknown, the images still counted.
  data = json.load(open(compute.record(wd, 5, 7, {"images_per_step": 16, "step_flops": None})))
  assert data["images_seen"] == 3 * 8 + 4 * 16 and data["flops"] is None


def test_a_tiny_run_reports_images_seen_and_train_flops(tmp_path):
  wd = str(tmp_path / "run")
  config = tiny_config(**{"mesh.data": 1, "total_steps": 2, "ckpt_every_steps": 1})
  loop.train(config, wd, devices=jax.devices()[:1])
  config.total_steps = 3  # a resume adds a segment
  loop.train(config, wd, devices=jax.devices()[:1])
  spent = compute.read(wd)
  assert [(s["first_step"], s["last_step"]) for s in spent["segments"]] == [(0, 2), (2, 3)]
  seg = spent["segments"][1]
  assert seg["images_per_step"] == config.batch_size == 16 and seg["flops_from"] == "lowered"
  assert seg["step_flops"] == spent["segments"][0]["step_flops"] > 0
  assert spent["images_seen"] == 3 * 16 and spent["flops"] == 3 * seg["step_flops"]

  # A second stage trained in a subdirectory (adaptive's stage1/) counts too; eval/ does not.
  os.makedirs(os.path.join(wd, "stage1"))
  os.makedirs(os.path.join(wd, "eval"))
  for sub in ("stage1", "eval"):
    fileio.write_json(os.path.join(wd, sub, compute.FILENAME), spent)
  whole = compute.of_workdir(wd)
  assert whole["parts"] == [".", "stage1"] and whole["images_seen"] == 2 * 3 * 16

  _evaluated(tmp_path, "run", fid=100.0, flops_per_sample=1e8, groups=[])
  alone = _evaluated(tmp_path, "untracked", fid=90.0, flops_per_sample=1e8, groups=[])
  paths = compare.write_report(compare.load_runs([wd, alone]), str(tmp_path / "report"))
  with open(paths["csv"]) as f:
    rows = {r["run"]: r for r in csv.DictReader(f)}
  assert int(rows["run"]["images_seen"]) == 2 * 3 * 16
  assert float(rows["run"]["train_pflop"]) == pytest.approx(2 * spent["flops"] / 1e15)
  assert float(rows["run"]["train_flops_per_image"]) == pytest.approx(seg["step_flops"] / 16)
  assert rows["untracked"]["images_seen"] == ""
  md = open(paths["md"]).read()
  assert "| images_seen | train_flops |" in md and compare.TRAIN_COMPUTE_NOTE in md
  header, row = [ln for ln in md.splitlines() if ln.startswith("| run |")][:2]
  cells = dict(zip(header.split(" | "), row.split(" | "), strict=True))
  assert cells["images_seen"] == "96" and float(cells["train_flops"]) > 0


def test_runs_scored_against_other_references_are_named(tmp_path):
  # collab scores each client against held-out (test) digits, the others against train digits.
  test_ref = {"reference_statistics": "/cache/digits_test_8px.npz"}
  a = _evaluated(tmp_path, "ddpm", fid=60.0, groups=[])
  b = _evaluated(tmp_path, "collab_cut", fid=369.0, groups=[], **test_ref)
  paths = compare.write_report(compare.load_runs([a, b]), str(tmp_path / "report"))
  warning = next(ln for ln in open(paths["md"]) if ln.startswith("**Warning:**"))
  assert "ddpm: `digits`" in warning and "collab_cut: `digits`" in warning
  assert "reference `digits_test_8px.npz`" in warning
