"""mobile.summarize's M7 table: mean +- std over seeds and TFDiff's paired wins per arm."""

import json
import os

from mobile import summarize


def _write(runs, name, fid):
  os.makedirs(os.path.join(runs, name, "eval"))
  m = dict(fid=fid, kid_mean=fid / 2, precision=0.5, recall=0.5, params=1000, flops_per_sample=2e8)
  with open(os.path.join(runs, name, "eval", "metrics.json"), "w") as f:
    json.dump(m, f)


def test_m7_rows_average_over_seeds_and_count_paired_wins(tmp_path):
  runs = str(tmp_path)
  for s, (c1, uvit) in enumerate([(60.0, 70.0), (62.0, 61.0), (64.0, 90.0)]):
    _write(runs, f"c1_s{s}", c1)
    _write(runs, f"uvit_f1_s{s}", uvit)
  _write(runs, "unet_s0", 50.0)  # one seed only
  rows = {line.split("`")[1]: line for line in summarize._m7_section(runs) if "`" in line}
  assert set(rows) == {"c1", "uvit_f1", "unet"}  # arms with no evaluated seed are left out
  assert "| 3 | 62.00 +- 2.00 |" in rows["c1"] and rows["c1"].endswith("| - |")
  assert "| 3 | 73.67 +- 14.84 |" in rows["uvit_f1"] and rows["uvit_f1"].endswith("| 2/3 |")
  assert rows["unet"].endswith("| 0/1 |")
