#!/usr/bin/env bash
# The GPU check of issue 24: every accelerator figure the repo lacks, in one run of under 8
# minutes on one H100 or H200, written under $OUT (benchmarks/gpu_check.py has the details):
#   1. the hybrid edge server's batched step at B = 1, 4, 16 (throughput at B=16 over B=1);
#   2. a few hundred real training steps of ddpm.py:shapes (procedural data) with its loss;
#   3. step time, images/s and MFU against the card's bf16 peak: ddpm.py:imagenet64 (bf16 and
#      float32), ddpm.py:cifar10, mobile.py:celeba64_config1, collab.py:celeba64;
#   4. JAX vs PyTorch eager vs torch.compile on the same U-Net (imagenet64 size, bf16, train step).
# Files: $OUT/gpu_check.json (every figure, `headline` first), $OUT/gpu_check.log (progress with
# UTC timestamps, then every command and its whole output), $OUT/shapes_samples.png.
#
# On the device machine (its image lacks grain, ml_collections and three more: carry them):
#   once, here:   bash benchmarks/fetch_gpu_wheels.sh
#                 grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
#   the call:     run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560)
# Options go to the driver: --peak_tflops=N (else from nvidia-smi's name: H100 / H200 989),
# --budget_s=440 (every part's timeout is cut to what is left of it), --parts=hybrid,shapes,...
#
# CPU mode, every part at tiny sizes in 2-5 minutes on 2 cores (what tests/common/test_gpu_check.py runs):
#   bash benchmarks/gpu_check.sh --cpu          (or GPU_CHECK_CPU=1; OUT defaults to a temp dir)
# PYTHON picks the interpreter (default python3, the one that holds PyTorch on the device).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
args=()
for a in "$@"; do
  if [[ $a == --cpu ]]; then mode=cpu; else args+=("$a"); fi
done
[[ ${GPU_CHECK_CPU:-0} == 1 ]] && mode=cpu
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log=$OUT/gpu_check.log
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$log"; }
say "gpu_check.sh: mode $mode, OUT=$OUT, python $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1)"

if [[ $mode == gpu ]]; then
  # The README's recipe for the wheels the image lacks (benchmarks/fetch_gpu_wheels.sh).
  if compgen -G ".whl/*.whl" > /dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >> "$log" 2>&1; then
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
      say "installed $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
    else
      say "ERROR: pip could not install the carried wheels in .whl/ (see above in $log)"
    fi
  else
    say "WARNING: no .whl/ folder with wheels: grain, ml_collections, array_record, portpicker and"
    say "  tensorboardX are not on the device image, so every part will fail to import them."
    say "  Here: bash benchmarks/fetch_gpu_wheels.sh, then run again with carry=[\".whl\"]."
  fi
  command -v nvidia-smi > /dev/null && nvidia-smi >> "$log" 2>&1
fi

"$PY" benchmarks/gpu_check.py --mode="$mode" --out="$OUT" ${args[@]+"${args[@]}"}
rc=$?
say "gpu_check.sh: exit $rc; files: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
