"""tests/compile_profile.py: per-test compile figures, the worker's and its launches', summed right."""

import json
import os
import subprocess
import sys

from common.train import timing
from tests import compile_profile
from tests.common.test_train import REPO


def _write(directory, worker_rows, subs):
  with open(os.path.join(directory, "worker-1.jsonl"), "w") as f:
    for row in worker_rows:
      f.write(json.dumps(row) + "\n")
  for name, data in subs.items():
    with open(os.path.join(directory, name), "w") as f:
      json.dump(data, f)


def _row(test, wall, trace, lower, xla, programs, hits):
  return {"test": test, "key": compile_profile.test_key(test), "wall_s": wall, "trace_s": trace,
          "lower_s": lower, "compile_s": xla, "programs": programs, "cache_hits": hits}  # fmt: skip


def test_report_sums_each_tests_launches_and_orders_by_wall(tmp_path):
  a, b = "tests/x.py::test_a", "tests/x.py::test_b"
  key = compile_profile.test_key(b)
  sub = {
    "trace_s": 1.0,
    "lower_s": 0.5,
    "compile_s": 4.0,
    "programs": 7,
    "cache_hits": 2,
    "wall_s": 9,
    "xla_by_program": [["jit(train_step)", 1, 3.5], ["jit(init)", 2, 0.5]],
  }
  row_a = _row(a, 10.0, 1.0, 2.0, 3.0, 5, 1)
  row_a["xla_by_program"] = {"jit(init)": [1, 2.0], "jit(run)": [3, 1.0]}
  _write(
    tmp_path,
    [row_a, _row(b, 30.0, 0.0, 0.0, 0.0, 0, 0)],
    {f"sub-{key}-11.json": sub, f"sub-{key}-12.json": sub, "sub-ffffffffffff-13.json": sub},
  )
  rows = compile_profile.rows(str(tmp_path))
  assert [r["test"] for r in rows] == [b, a]
  assert rows[0]["launches"] == 2 and rows[0]["sub_making_s"] == 11.0
  assert (rows[0]["sub_programs"], rows[0]["sub_cache_hits"]) == (14, 4)
  assert rows[1]["launches"] == 0 and rows[1]["making_s"] == 6.0
  text = compile_profile.report(str(tmp_path))
  assert f"| {b} | 30.0 | 0.0 (0.0 / 0.0 / 0.0) | 0 (0) | 2 | 11.0 | 14 (4) |" in text
  assert "2 tests, 40 s in the workers, of which making programs 6 s" in text
  assert "their launches made programs for 11 s" in text
  # XLA's seconds by program, the workers' and every launch's (the third one's test is unknown,
  # its compiles still count) summed, the largest first.
  assert compile_profile.xla_by_program(str(tmp_path)) == [
    ["jit(train_step)", 3, 10.5],
    ["jit(init)", 7, 3.5],
    ["jit(run)", 3, 1.0],
  ]
  assert "| jit(train_step) | 3 | 10.5 |" in text
  assert compile_profile.main(["x", str(tmp_path / "empty")]) == 2


def test_a_launch_writes_its_own_timing_file_by_pid(tmp_path):
  env = dict(os.environ, **{timing.ENV: str(tmp_path / "t-{pid}.json")})
  code = (
    "import jax, os; from common.train import timing; timing.record_if_asked();"
    " jax.jit(lambda x: x * 2)(1.0); print(os.getpid())"
  )
  pids = [
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                   text=True, check=True).stdout.split()[-1]
    for _ in range(2)
  ]  # fmt: skip
  for pid in pids:
    data = timing.read(str(tmp_path / f"t-{pid}.json"))
    assert data is not None and data["programs"] >= 0 and data["wall_s"] > 0, data
    # The doubling's program, by JAX's name, with its compile seconds.
    names = {name: (n, sec) for name, n, sec in data["xla_by_program"]}
    assert names["jit(<lambda>)"][0] == 1 and names["jit(<lambda>)"][1] > 0, names
