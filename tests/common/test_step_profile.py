"""benchmarks/step_profile.py: a step's time by op, from XLA's own trace."""

import sys

from tests.common.test_train import REPO, run_benchmark

sys.path.insert(0, REPO)
from benchmarks import step_profile  # noqa: E402


def test_ops_are_named_and_grouped_and_runtime_events_left_out():
  trace = {
    "traceEvents": [
      {"ph": "X", "name": "convolution.12", "dur": 340.0},
      {"ph": "X", "name": "conv_general_dilated.3", "dur": 60.0},
      {"ph": "X", "name": "transpose_copy_fusion.3", "dur": 100.0},
      {"ph": "X", "name": "multiply_add_fusion", "dur": 50.0},
      {"ph": "X", "name": "wrapped_reduce-window", "dur": 40.0},
      {"ph": "X", "name": "while.2", "dur": 1000.0},  # holds the ops above
      {"ph": "X", "name": "CommonPjRtClient::CreateOutputs", "dur": 9.0},
      {"ph": "X", "name": "end: convolution", "dur": 1.0},
      {"ph": "i", "name": "dot.1"},
    ]
  }
  events = step_profile.op_events(trace)
  assert sorted(n for n, _ in events) == [
    "conv_general_dilated.3",
    "convolution.12",
    "multiply_add_fusion",
    "transpose_copy_fusion.3",
    "wrapped_reduce-window",
  ]
  kinds = {step_profile.op_kind(n) for n, _ in events}
  assert kinds == {"convolution", "layout fusion", "fusion", "reduce-window"}
  table = step_profile.summarize(events, steps=2, step_ms=0.5, top=2).splitlines()
  assert "ops 0.3 ms per step" in table[0]
  # Per step: 400 us over 2 steps = 0.2 ms, 40% of a 0.5 ms step; the largest kind comes first.
  assert table[2].split() == ["convolution", "0.2", "40%"]
  assert [line.split()[0] for line in table[-2:]] == ["convolution.12", "transpose_copy_fusion.3"]


def test_profiles_a_real_step():
  out = run_benchmark(
    "step_profile.py",
    "--config=configs/ddpm.py:digits",
    "--config.model.channels=(8,16)",
    "--config.model.num_res_blocks=1",
    "--config.model.attention_resolutions=()",
    "--config.batch_size=8",
    "--config.mesh.data=1",
    "--steps=2",
    "--top=5",
  )
  assert "ms per step" in out and "convolution" in out, out
