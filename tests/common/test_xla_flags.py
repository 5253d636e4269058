"""common.train.xla_flags: the XLA:CPU defaults the binaries choose, for which models and jaxlibs."""

from common.train import xla_flags

YNN = "--xla_cpu_experimental_ynn_fusion_type=dot"


def test_u_net_runs_get_the_ynn_flag_and_others_do_not(monkeypatch):
  monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 10, 2))
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_flags.apply_cpu_defaults("unet", env) == [YNN]
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {YNN}"
  assert xla_flags.apply_cpu_defaults("unet", env) == []  # already there: added once
  # TFDiff's small dots are slower through YNNPACK (benchmarks/RESULTS.md).
  assert xla_flags.apply_cpu_defaults("tfdiff", {}) == []


def test_the_users_flag_the_opt_out_and_other_jaxlibs_are_left_alone(monkeypatch):
  monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 10, 2))
  mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"}
  assert xla_flags.apply_cpu_defaults("unet", mine) == []
  assert mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"
  assert xla_flags.apply_cpu_defaults("unet", {xla_flags.OPT_OUT: "0"}) == []
  # XLA aborts on a flag it does not know: only the jaxlib line the flag was measured with.
  for version in [(0, 10, 1), (0, 11, 2), ()]:
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda v=version: v)
    assert xla_flags.apply_cpu_defaults("unet", {}) == [], version
