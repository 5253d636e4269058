#!/usr/bin/env bash
# The wheels that benchmarks/gpu_check.sh needs on the device machine, into .whl/ (run here, where
# pip reaches the registry; the device machine reaches nothing).
#
# The device image (/work/.library/device/KINDS.md: Python 3.12, jax, flax, optax, orbax-checkpoint,
# chex, absl-py, numpy, protobuf, psutil, pyyaml, etils, cloudpickle, torch, ...) lacks five
# packages this repo imports: grain and ml_collections (the data pipeline and configs), array_record
# (grain's dependency, and common.data's), portpicker (grain's) and tensorboardX (common.train's
# logger). Their other dependencies are in the image. Versions: constraints.txt, the lock the
# tests pass with.
#
#   bash benchmarks/fetch_gpu_wheels.sh
#   grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude   # keep them out of git
#
# then name .whl in the device call's carry (benchmarks/gpu_check.sh's header has the command).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pkgs=(grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 portpicker==1.6.0 tensorboardX==2.6.5)
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${pkgs[@]}"
ls -l .whl
